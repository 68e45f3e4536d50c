"""Read an offline wandb run file (`run-*.wandb`): the leveldb-log framing wandb's core writes, records in protobuf.

No Python reader ships with wandb 0.31 (its Go core writes the file), so the tests parse it to check what an
offline run holds: header `:W&B` + 3 bytes, then 32 KiB blocks of [crc32 u32, length u16, type u8] + payload.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if kind == 0 and length == 0:
            position += BLOCK - position % BLOCK if position % BLOCK else 0
            continue
        pending += data[position : position + length]
        position += length
        if kind in (FULL, LAST):
            yield pending
            pending = b""


def run_contents(path: Path) -> tuple[set[str], set[str]]:
    """(config keys, history keys) recorded in the run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    config_keys, history_keys = set(), set()
    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config_keys |= {item.key for item in record.config.update}
        elif kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "run":
            config_keys |= {item.key for item in record.run.config.update}
    return config_keys, history_keys
