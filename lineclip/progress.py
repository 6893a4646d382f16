"""Progress for a person watching: a bar on a terminal, or log lines with the rate and the time to go.

Shared by training and the commands (shard, synth), so it sits at the bottom: light, tqdm imported when a bar is
made."""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("lineclip")


def duration(seconds: float) -> str:
    """`45 s`, `3 min 10 s`, `2 h 05 min`: a time to go, as a person reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A progress bar on a terminal; where stderr is not one (a log file, a batch job) no bar, whose `\\r` redraws
    would fill the log, but one log line every 10% with the rate and the time to go. `first_at`: after that many
    units, one such line whether or not the bar is drawn (training's first ETA, which a bar shows only once its
    rate has settled and a log never shows)."""

    def __init__(self, total: int, *, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 first_at: int | None = None, logger: logging.Logger = log) -> None:
        import time

        from tqdm.auto import tqdm

        self._clock = time.monotonic
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True)
        self.total, self.done, self.desc, self.unit, self.log = total, initial, desc, unit, logger
        self._start, self._start_done = self._clock(), initial
        self._every = max(1, math.ceil(total / 10)) if enabled and self.bar.disable else None
        self._first_at = initial + first_at if enabled and first_at else None
        self._next = initial + self._every if self._every else None

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        due = self._first_at is not None and self.done >= self._first_at
        if self._next is not None and self.done >= min(self._next, self.total):
            due = True
            while self._next <= self.done:
                self._next += self._every or 1
        if due:
            self._first_at = None
            self.say()

    def say(self) -> None:
        elapsed, done = self._clock() - self._start, self.done - self._start_done
        if done <= 0:
            return
        pace = elapsed / done
        left = "" if self.done >= self.total else f", about {duration(pace * (self.total - self.done))} to go"
        rate = f"{pace:.2f} s a {self.unit}" if pace >= 1 else f"{1 / pace:.1f} {self.unit}s/s"
        self.log.info("%s: %d/%d %ss (%d%%), %s%s", self.desc, self.done, self.total, self.unit,
                      100 * self.done // max(1, self.total), rate, left)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self.bar.set_postfix(*args, **kwargs)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
