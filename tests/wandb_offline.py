"""Read an offline W&B run back from its `run-<id>.wandb` file (what `wandb sync` would upload).

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of records,
each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); the
payloads are `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def _payloads(data: bytes):
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            yield parts + chunk
            parts = b""


def read_run(run_dir: str | Path) -> dict:
    """{"name", "group", "tags", "config"} of the offline run in `run_dir` (an `offline-run-*` folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out: dict = {"config": {}}
    for payload in _payloads(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, tags=list(rec.run.tags))
            updates = rec.run.config.update
        elif kind == "config":
            updates = rec.config.update
        else:
            continue
        for item in updates:
            out["config"][item.key] = json.loads(item.value_json)
    return out
