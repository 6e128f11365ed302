"""W&B's offline runs read back for the tests: each run's transaction log
(`<WANDB_DIR>/wandb/offline-run-*/run-*.wandb`, what `wandb sync` uploads), whose records are W&B's own protobuf
messages (`wandb.proto.wandb_internal_pb2.Record`) in LevelDB's log format behind a 7-byte W&B header. wandb 0.31
writes no summary or history files in offline mode and ships no public reader of this file (its reader moved into the
Go core), so the framing is read here; the messages are parsed by W&B's own classes."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
CHUNK = struct.Struct("<IHB")  # crc32c, length, type (1 full, 2 first, 3 middle, 4 last)
BLOCK = 32768


@dataclass
class OfflineRun:
    """What a run's file holds: the run record's fields, its config, each history row, the summary's last values."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    magic, version, _ = HEADER.unpack_from(data)
    assert magic == b":W&B" and version == 0xBEE1, (magic, version)
    out, pos, pending = [], HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pos += CHUNK.size
        if pos + length > len(data):  # a record the service was still writing (or never finished)
            break
        if kind == 0:  # zeroed padding
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            run.config |= {_key(i): json.loads(i.value_json) for i in r.config.update}
        elif kind == "config":
            run.config |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_dir: Path, timeout_s: float = 60.0) -> dict[str, OfflineRun]:
    """Every offline run under WANDB_DIR, by display name, once each file holds its run's end (W&B's service writes
    the last records after `run.finish()` returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [read_run(p) for p in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))]
        if all(r.exit_code is not None for r in runs) or time.monotonic() > deadline:
            return {r.name: r for r in runs}
        time.sleep(0.2)
