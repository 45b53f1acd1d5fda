"""Read an offline wandb run back from its transaction log (``run-<id>.wandb``), the file ``wandb sync`` uploads.

The file is wandb's 7-byte header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-log records
(blocks of 32 KiB; each chunk: CRC-32 (4 bytes), length (2, little-endian), type (1: full, 2: first, 3: middle,
4: last)) whose payloads are ``wandb_internal_pb2.Record`` protobuf messages. wandb 0.2x+ has no Python
reader of its own (its writer is the Go service), so the tests read the file with this one: the real bytes
wandb wrote, decoded with wandb's own protobuf schema.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def read_records(path: str | Path) -> list[Any]:
    """Every ``Record`` of the run's transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:7]!r})")
    records, pending, offset = [], b"", HEADER
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is zero padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + CHUNK_HEADER])
        if kind == 0 and length == 0:  # padding up to the next block
            offset += left_in_block
            continue
        payload = data[offset + CHUNK_HEADER:offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if kind in (1, 2):
            pending = payload
        else:
            pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_summary(path: str | Path) -> dict[str, Any]:
    """The run summary as the log holds it: every ``summary`` record's updates applied in order."""
    summary: dict[str, Any] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
    return summary


def is_complete(path: str | Path) -> bool:
    """True when the log holds the run's exit record (wandb finished writing it)."""
    return any(r.WhichOneof("record_type") == "exit" for r in read_records(path))
