"""Reading the operator's TOML files (the config, `auth.tokens_file`): bounded, never blocking.

Sans-IO where it can be: `parse_toml` turns bytes into data or a one-line reason; `read_bounded`
is the one function that touches the file system, and its only blocking call is `read(2)` on a
regular file (the daemon calls it from a worker thread on reload, so a slow disk never stalls the
event loop). Every refusal is a `FileRefused` whose message is one line for the operator, never
quoting the file's contents, and never a traceback:

- not a regular file (a directory, a FIFO, a device, a socket): refused by its type, without
  waiting for a writer (the open is O_NONBLOCK);
- larger than its limit (`MAX_CONFIG_BYTES`, `MAX_TOKENS_FILE_BYTES`): refused, never truncated;
- not UTF-8, a NUL byte, anything tomllib refuses: "invalid TOML" with the line and column;
- absurdly nested: a dotted key (or table header) of more than `MAX_KEY_PARTS` parts is refused
  before tomllib sees it (tomllib's memory for one dotted key grows with the square of its parts:
  a 200 KB key takes tens of GB), and arrays or inline tables nested past Python's recursion
  limit are refused instead of raising RecursionError.

A UTF-8 byte order mark at the very start is skipped (editors on Windows write one; TOML's test
suite accepts it there and only there).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the shipped agentspoonsd.toml is ~20 KB
MAX_TOKENS_FILE_BYTES = 1 << 20  # 1 MiB: ~6,000 [[tokens]] entries (read time: bench/micro.py)
MAX_KEY_PARTS = 32  # the deepest key the config has is generator.overrides."SYMBOL".model
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 65536

# One alternation, scanned left to right: strings and comments are skipped whole (a dot inside
# them is not a key's), and `deep` matches a chain of more than MAX_KEY_PARTS key parts joined
# by dots. `deep` comes first so that a chain of quoted parts ("a"."b"...) is seen as one chain,
# not as strings; its lookbehind keeps it from restarting inside a bare word (linear time), and
# possessive quantifiers keep it from backtracking.
_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_SCAN = re.compile(
    rf"""(?P<deep>(?<![A-Za-z0-9_-]){_PART}(?:[ \t]*+\.[ \t]*+{_PART}){{{MAX_KEY_PARTS},}})
    |\"\"\"(?:[^"\\]|\\.|"(?!""))*+\"{{3,5}}
    |'''(?:[^']|'(?!''))*+'{{3,5}}
    |"(?:[^"\\\n]|\\.)*+"
    |'[^'\n]*+'
    |\#[^\n]*+""",
    re.VERBOSE | re.DOTALL,
)


class FileRefused(Exception):
    """The file cannot be used. `str()` is the reason, one line, without the path: the caller
    names the file and the key that gave it. `missing` tells a file that does not exist."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


def file_kind(mode: int) -> str:
    """What a `st_mode` that is not a regular file is, for a message ("a FIFO")."""
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit:,} bytes"


def read_bounded(path: Path, limit: int) -> tuple[bytes, int]:
    """The contents of the regular file at `path` and its `st_mode`.

    Guarantees: the open never blocks (O_NONBLOCK: a FIFO without a writer, or a device, is
    refused by its type at once); at most `limit` + 1 bytes are read, and a file over `limit`
    is refused, not truncated; the type, the size and the contents all come from one open file
    descriptor, so a file renamed over or removed after the open is read whole as it was.
    Raises FileRefused (`missing` when there is no such file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileRefused("file not found", missing=True) from None
    except OSError as exc:
        raise FileRefused(f"cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"not a regular file ({file_kind(info.st_mode)})")
        too_large = f"larger than the {_size(limit)} limit for this file"
        if info.st_size > limit:
            raise FileRefused(f"{too_large} ({info.st_size:,} bytes)")
        chunks = []
        total = 0
        # Read to the end rather than trust st_size: the file may be growing.
        while chunk := os.read(fd, min(_READ_CHUNK, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileRefused(too_large)
        return b"".join(chunks), info.st_mode
    except OSError as exc:
        raise FileRefused(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _position(data: bytes | str, offset: int) -> str:
    if isinstance(data, bytes):
        line_start, line = data.rfind(b"\n", 0, offset) + 1, data.count(b"\n", 0, offset) + 1
    else:
        line_start, line = data.rfind("\n", 0, offset) + 1, data.count("\n", 0, offset) + 1
    column = offset - line_start + 1
    return f"line {line}, column {column}"


def check_key_depth(text: str) -> None:
    """Refuse a dotted key or table header of more than MAX_KEY_PARTS parts (FileRefused), in
    time linear in the text. Strings and comments are not keys and are skipped."""
    for match in _SCAN.finditer(text):
        if match.group("deep") is not None:
            raise FileRefused(
                f"invalid TOML: a key of more than {MAX_KEY_PARTS} dotted parts"
                f" (at {_position(text, match.start())})"
            )


def parse_toml(raw: bytes) -> dict[str, Any]:
    """The TOML document in `raw`, or FileRefused with a one-line reason and, where there is
    one, the line and column. Never raises anything else for any input."""
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(
            f"invalid TOML: not UTF-8: byte 0x{raw[exc.start]:02x} at {_position(raw, exc.start)}"
        ) from None
    check_key_depth(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FileRefused(f"invalid TOML: {exc}") from None
    except RecursionError:
        raise FileRefused("invalid TOML: arrays or inline tables nested too deeply") from None
    except ValueError as exc:  # a number of more than 4,300 digits (int_max_str_digits)
        raise FileRefused(f"invalid TOML: {str(exc).split(':')[0].split(';')[0]}") from None


def load_toml(path: Path, limit: int) -> tuple[dict[str, Any], int]:
    """`read_bounded` then `parse_toml`: the document at `path` and its `st_mode`."""
    raw, mode = read_bounded(path, limit)
    return parse_toml(raw), mode


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_KEY_PARTS",
    "MAX_TOKENS_FILE_BYTES",
    "FileRefused",
    "check_key_depth",
    "file_kind",
    "load_toml",
    "parse_toml",
    "read_bounded",
]
