"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) without syncing it: its config,
metric history and summary. The file is W&B's transaction log: a 7-byte header, then
LevelDB-log records (32 KiB blocks; 7-byte record headers: CRC, length, type) of protobuf ``Record``s.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

HEADER = b":W&B"
HEADER_SIZE = 7
BLOCK_SIZE = 32768
RECORD_HEADER = struct.Struct("<IHB")  # masked CRC32C, payload length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    """The records of the log, fragments joined (CRCs are not checked: this is a reader for tests and inspection)."""
    position, pieces = HEADER_SIZE, []
    while position + RECORD_HEADER.size <= len(data):
        left = BLOCK_SIZE - position % BLOCK_SIZE
        if left < RECORD_HEADER.size:  # the block's zero-filled tail
            position += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:
            position += left
            continue
        payload = data[position + RECORD_HEADER.size:position + RECORD_HEADER.size + length]
        position += RECORD_HEADER.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pieces = [payload]
        elif kind == MIDDLE:
            pieces.append(payload)
        elif kind == LAST:
            yield b"".join([*pieces, payload])


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def find_offline_run(wandb_dir: str | os.PathLike) -> Path:
    """The newest ``run-*.wandb`` file under ``wandb_dir`` (the ``tracking.wandb.dir`` of a run)."""
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {wandb_dir}")
    return files[-1]


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """``{"run_id", "project", "name", "config": {...}, "history": [{"_step": n, key: value}], "summary": {...}}``
    of a ``run-*.wandb`` file (or the newest under a directory)."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        path = find_offline_run(path)
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a W&B run file")
    run: dict[str, Any] = {"run_id": "", "project": "", "name": "", "config": {}, "history": [], "summary": {}}
    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, project=record.run.project, name=record.run.display_name)
            run["config"].update({_item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
    run["config"].pop("_wandb", None)
    return run


def main(argv: list[str] | None = None) -> int:
    """``python -m dinov2_repro.tracking.wandb_offline DIR``: the newest offline run under DIR as
    JSON: its id, summary, the history's length and last row (and the config with --config)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dinov2_repro.tracking.wandb_offline", description=main.__doc__)
    parser.add_argument("path", help="a run-*.wandb file, or a folder with offline runs under it (tracking.wandb.dir)")
    parser.add_argument("--config", action="store_true", help="print the logged config too")
    args = parser.parse_args(argv)
    try:
        run = read_offline_run(args.path)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    history = run.pop("history")
    run.update(steps=len(history), last=history[-1] if history else None)
    if not args.config:
        del run["config"]
    print(json.dumps(run, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
