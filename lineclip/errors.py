"""The one base class of lineclip's one-line errors.

An exception deriving from `LineclipError` means bad input, not a bug: every command (`lineclip.cli.run_command`)
reports it as one error line and exit status 2. Each module raises its own subclass (ManifestError, BundleError,
...), defined where it is raised; `cli` catches this base, so it learns them without importing the modules that
raise them (which would point imports from the commands' plumbing back down into, and around, the whole package).
"""

from __future__ import annotations


class LineclipError(Exception):
    """Bad input that a command reports as one line and exit status 2 (the message is that line)."""
