"""Reading back what an offline W&B run wrote: the records of its `.wandb` file (what `wandb sync` uploads),
the media files under the run dir and the staged artifact files they point to. For tests only."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

# The .wandb file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB
# blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`; a record is one FULL chunk or FIRST,
# MIDDLE..., LAST. A block's tail shorter than a chunk header is zero padding.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B record file"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += (-pos) % _BLOCK
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_run(run_dir: Path) -> Path:
    """The one offline W&B run under a lineclip run dir."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def history(run_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every history row of the run: (step, {key: value}); a media value (table, images, histogram), which W&B
    writes as one item per field, comes back as one dict."""
    run = offline_run(run_dir)
    rows = []
    for record in records(next(run.glob("*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            items: dict[str, Any] = {}
            for item in record.history.item:
                value = json.loads(item.value_json)
                if item.key:
                    items[item.key] = value
                else:
                    *parents, last = item.nested_key
                    node = items
                    for key in parents:
                        node = node.setdefault(key, {})
                    node[last] = value
            rows.append((int(record.history.step.num), items))
    return rows


def artifacts(run_dir: Path) -> list[wandb_internal_pb2.ArtifactRecord]:
    run = offline_run(run_dir)
    return [r.artifact for r in records(next(run.glob("*.wandb"))) if r.WhichOneof("record_type") == "artifact"]


def manifest_files(artifact: wandb_internal_pb2.ArtifactRecord) -> dict[str, str]:
    """An artifact's files: name inside the artifact -> the local file W&B will upload."""
    return {entry.path: entry.local_path for entry in artifact.manifest.contents}
