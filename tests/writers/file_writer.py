"""A separate process that writes a data file the way external producers do (tests only).

Usage: ``python file_writer.py PATH``. Reads one JSON command per line on stdin, performs it on
PATH, then prints ``ok`` (or ``error: ...``) on stdout, flushed: the test drives the writer step by
step and knows exactly what is on disk at each moment. EOF on stdin ends the process.

Commands (``data`` is UTF-8 text, or raw bytes given as ``b64``):
  {"op": "append", "data": ...}     append and close (one write)
  {"op": "rewrite", "data": ...}    truncate and write in place (not atomic; same inode)
  {"op": "truncate"}                truncate to 0 bytes
  {"op": "replace", "data": ...}    write PATH.tmp and rename it over PATH (atomic; new inode)
  {"op": "remove"}                  delete PATH
  {"op": "trickle", "data": ..., "seed": S}
        append in random pieces of 1..max_piece bytes, pausing 0..max_pause s between pieces
  {"op": "grow_array", "records": [...], "seed": S}
        for i = 1..n, rewrite PATH in place with the JSON array of the first i records, in two
        writes split at a random byte with a 0..max_pause s pause between them, so a reader
        often sees a half-written file
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time
from pathlib import Path


def payload(command: dict[str, object]) -> bytes:
    if "b64" in command:
        return base64.b64decode(str(command["b64"]))
    return str(command.get("data", "")).encode("utf-8")


def write(path: Path, mode: str, data: bytes) -> None:
    with open(path, mode) as file:
        file.write(data)
        file.flush()


def rewrite_in_two(path: Path, data: bytes, rng: random.Random, max_pause: float) -> None:
    cut = rng.randrange(len(data) + 1)
    with open(path, "r+b" if path.exists() else "wb") as file:
        file.truncate(0)
        file.write(data[:cut])
        file.flush()
        time.sleep(rng.uniform(0, max_pause))
        file.write(data[cut:])
        file.flush()


def run(path: Path, command: dict[str, object]) -> None:
    op = command["op"]
    rng = random.Random(int(command.get("seed", 0)))  # type: ignore[call-overload]
    max_piece = int(command.get("max_piece", 40))  # type: ignore[call-overload]
    max_pause = float(command.get("max_pause", 0.002))  # type: ignore[arg-type]
    if op == "append":
        write(path, "ab", payload(command))
    elif op == "rewrite":
        # r+b then truncate keeps the inode, like a producer that reopens with "w".
        with open(path, "r+b" if path.exists() else "wb") as file:
            file.truncate(0)
            file.write(payload(command))
    elif op == "truncate":
        with open(path, "r+b") as file:
            file.truncate(0)
    elif op == "replace":
        tmp = path.with_name(path.name + ".tmp")
        write(tmp, "wb", payload(command))
        os.replace(tmp, path)
    elif op == "remove":
        path.unlink()
    elif op == "trickle":
        data = payload(command)
        while data:
            size = rng.randint(1, max_piece)
            write(path, "ab", data[:size])
            data = data[size:]
            time.sleep(rng.uniform(0, max_pause))
    elif op == "grow_array":
        records = command["records"]
        assert isinstance(records, list)
        for i in range(1, len(records) + 1):
            rewrite_in_two(path, json.dumps(records[:i]).encode(), rng, max_pause)
            time.sleep(rng.uniform(0, max_pause))
    else:
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    path = Path(sys.argv[1])
    for line in sys.stdin:
        try:
            run(path, json.loads(line))
        except Exception as exc:
            print(f"error: {type(exc).__name__}: {exc}", flush=True)
        else:
            print("ok", flush=True)


if __name__ == "__main__":
    main()
