"""Reading an offline wandb run back in tests: its .wandb file is a LevelDB-style log of protobuf records."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest


def wandb_records(path: Path):
    """The protobuf records of an offline .wandb file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    raw, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out
