"""Editing `auth.tokens_file`: append an entry, remove one. Used by `agentspoonsd token`.

The file is the operator's as much as ours: adding a token appends its `[[tokens]]` table and
never rewrites a byte of what is there; removing one rewrites the file without that table (and
the comment lines directly above it), everything else kept as it was, through a temporary file
renamed over the old one, so a reader (the daemon on SIGHUP) sees the old file or the new one,
never half of either. Every change holds an exclusive flock, so two commands cannot interleave.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .auth import TokenSpec
from .tomlfile import MAX_TOKENS_FILE_BYTES, FileRefused, file_kind, parse_toml

EntriesParser = Callable[[Mapping[str, Any]], Sequence[TokenSpec]]
"""Validates a parsed tokens file as the daemon would (`settings.parse_tokens_file`): its
entries, or ValueError ``KEY: PROBLEM``. Passed in, so editing a file needs no config models."""

FILE_MODE = 0o600
HEADER = """\
# agentspoonsd tokens (auth.tokens_file): one [[tokens]] table per client, with the keys of
# [[auth.tokens]]: name, sha256, symbols, and optionally expires and max_connections. Only the
# SHA-256 digest of a token is stored, never the token. Keep this file mode 0600.
# `agentspoonsd token new NAME --file THIS` appends an entry, `agentspoonsd token revoke NAME`
# removes one; then reload the daemon (systemctl reload agentspoonsd, or kill -HUP <pid>).
"""
_TOO_LARGE = f"larger than the {MAX_TOKENS_FILE_BYTES >> 20} MiB limit for a tokens file"
_TABLE_HEADER = re.compile(r"^\s*\[\[\s*tokens\s*\]\]\s*(#.*)?$")


class TokenFileError(Exception):
    """The change was refused; the message says why, for the operator. Nothing was written."""


def toml_string(value: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, except the surrogate pairs `ensure_ascii`
    writes for characters past U+FFFF (TOML wants scalar values) and DEL, which JSON leaves raw."""
    import json

    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def format_expires(expires: datetime) -> str:
    """An RFC 3339 date-time (a TOML offset date-time), `Z` for UTC."""
    text = expires.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def entry_text(token: TokenSpec, table: str = "tokens") -> str:
    """The `[[tokens]]` (or `[[auth.tokens]]`) table of `token`, ending with a newline."""
    listed = ", ".join(toml_string(s) for s in token.symbols)
    lines = [
        f"[[{table}]]",
        f"name = {toml_string(token.name)}",
        f'sha256 = "{token.sha256}"',
        f"symbols = [{listed}]",
    ]
    if token.expires is not None:
        lines.append(f"expires = {format_expires(token.expires)}")
    if token.max_connections is not None:
        lines.append(f"max_connections = {token.max_connections}")
    return "\n".join(lines) + "\n"


def scope_warnings(symbols: Sequence[str], published: Sequence[str], source: str) -> list[str]:
    """One line per symbol of a new token that `published` (the config's generator.symbols,
    read from `source`) lacks, with the published symbol it most resembles, if any; then one
    line more when the token allows none of them. Empty for "*" or when all are published."""
    if "*" in symbols:
        return []
    listed = ", ".join(published)
    # Case-insensitive resemblance: "btc/usd" and "BTCUSD" both point at "BTC/USD".
    folded = {p.casefold(): p for p in published}
    lines = []
    for symbol in symbols:
        if symbol in published:
            continue
        line = f"symbol {toml_string(symbol)} is not published by {source}"
        line += f" (generator.symbols: {listed})"
        close = difflib.get_close_matches(symbol.casefold(), list(folded), n=1, cutoff=0.75)
        if close:
            line += f"; did you mean {toml_string(folded[close[0]])}?"
        lines.append(line)
    if len(lines) == len(symbols):
        lines.append(
            "this token allows none of the published symbols: its connections will receive no"
            " updates, only an error (no_symbols) after `connected`"
        )
    return lines


@contextlib.contextmanager
def _locked(path: Path, *, create: bool) -> Iterator[tuple[int, bool]]:
    """An fd of `path` open for read and append, flock'ed; and whether this call created it.

    After the lock is taken the path must still name the same file: a `revoke` that held the
    lock before may have renamed a new file over it, and that one is the file to lock.
    """
    while True:
        created = False
        # O_NONBLOCK: a FIFO at the path is refused below instead of waited on.
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            if create:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
                    created = True
                except FileExistsError:
                    fd = os.open(path, flags)
            else:
                fd = os.open(path, flags)
        except FileNotFoundError:
            raise TokenFileError(f"{path}: file not found") from None
        try:
            kind = os.fstat(fd).st_mode
            if not stat.S_ISREG(kind):
                raise TokenFileError(f"{path}: not a regular file ({file_kind(kind)})")
            if created:
                os.fchmod(fd, FILE_MODE)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX)
            opened = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                yield fd, created
                return
        finally:
            os.close(fd)


def _read_all(path: Path, fd: int) -> bytes:
    """The whole file, refused (TokenFileError) past MAX_TOKENS_FILE_BYTES, as the daemon would."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    total = 0
    while chunk := os.read(fd, min(65536, MAX_TOKENS_FILE_BYTES + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_TOKENS_FILE_BYTES:
            raise TokenFileError(f"{path}: {_TOO_LARGE}")
    return b"".join(chunks)


def _parse(path: Path, raw: bytes, parse: EntriesParser) -> tuple[str, list[TokenSpec]]:
    """The file's text and entries; TokenFileError when it is not a valid tokens file."""
    try:
        data = parse_toml(raw)
    except FileRefused as exc:
        raise TokenFileError(f"{path}: {exc}; fix it first") from None
    text = raw.decode("utf-8").removeprefix("\ufeff")  # parse_toml decoded it already
    try:
        return text, list(parse(data))
    except ValueError as exc:
        raise TokenFileError(f"{path}: {exc}; fix it first") from None


def append_token(
    path: Path, token: TokenSpec, *, parse: EntriesParser, taken: set[str] | None = None
) -> bool:
    """Append `token`'s entry to the tokens file at `path`, creating it (mode 0600, with a comment
    header) when missing. Refuses a name already in the file or in `taken`, and a file `parse`
    refuses. Returns whether the file was created. Raises TokenFileError (nothing written) or
    OSError."""
    path = path.resolve()  # a symlinked file is edited where it lives
    with _locked(path, create=True) as (fd, created):
        try:
            raw = _read_all(path, fd)
            text, tokens = _parse(path, raw, parse)
            if any(t.name == token.name for t in tokens) or token.name in (taken or set()):
                raise TokenFileError(
                    f'a token named "{token.name}" already exists; revoke it first'
                    " (agentspoonsd token revoke NAME) or choose another name"
                )
            if any(t.sha256 == token.sha256 for t in tokens):
                raise TokenFileError(f"{path}: that digest is already in the file")
            addition = entry_text(token)
            if not text:
                addition = HEADER + "\n" + addition
            else:
                addition = ("\n" if text.endswith("\n") else "\n\n") + addition
            encoded = addition.encode("utf-8")
            if len(raw) + len(encoded) > MAX_TOKENS_FILE_BYTES:
                raise TokenFileError(f"{path}: {_TOO_LARGE} with one more entry")
            os.write(fd, encoded)
            os.fsync(fd)
        except BaseException:
            if created:  # leave nothing behind a refused first entry
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return created


def _entry_spans(lines: list[str]) -> list[tuple[int, int]]:
    """[start, end) line ranges of each `[[tokens]]` table, with the comment lines directly
    above its header (no blank line between): those describe it and go with it."""
    headers = [i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)]
    starts = []
    for k, header in enumerate(headers):
        start = header
        floor = headers[k - 1] + 1 if k else 0
        while start > floor and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        starts.append(start)
    return [
        (start, (starts[k + 1] if k + 1 < len(starts) else len(lines)))
        for k, start in enumerate(starts)
    ]


def _without(
    path: Path, text: str, name: str, tokens: list[TokenSpec], parse: EntriesParser
) -> str:
    lines = text.splitlines(keepends=True)
    remaining = None
    for start, end in _entry_spans(lines):
        with contextlib.suppress(FileRefused):
            entries = parse_toml("".join(lines[start:end]).encode()).get("tokens", [])
            if len(entries) == 1 and entries[0].get("name") == name:
                remaining = "".join(lines[:start] + lines[end:])
                break
    # The rewrite must leave exactly the other entries: anything else (an inline array of
    # tables, a multi-line string that looks like a header) is for a human to edit.
    expected = [t for t in tokens if t.name != name]
    if remaining is not None:
        try:
            left = list(parse(parse_toml(remaining.encode())))
        except (FileRefused, ValueError, TypeError):
            left = None
        if left == expected:
            return remaining
    raise TokenFileError(
        f'{path}: cannot remove "{name}" safely (it is not a plain [[tokens]] table); '
        "edit the file by hand"
    )


def remove_token(path: Path, name: str, *, parse: EntriesParser) -> TokenSpec:
    """Rewrite the tokens file at `path` without the entry called `name` (atomically, mode and
    owner kept); `parse` validates the file before and after. Returns the removed entry. Raises
    TokenFileError (nothing changed) or OSError."""
    path = path.resolve()  # the rename replaces the file a symlink points to, not the symlink
    with _locked(path, create=False) as (fd, _):
        text, tokens = _parse(path, _read_all(path, fd), parse)
        removed = next((t for t in tokens if t.name == name), None)
        if removed is None:
            raise TokenFileError(f'{path}: no token named "{name}"')
        remaining = _without(path, text, name, tokens, parse)
        st = os.fstat(fd)
        tmp_fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(tmp_fd, "wb") as out:
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):  # not root: the file is ours anyway
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
                out.write(remaining.encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return removed


def check_new(token: TokenSpec, now: datetime | None = None) -> None:
    """Refuse a token that would be born expired."""
    if token.expires is not None and token.expires <= (now or datetime.now(UTC)):
        raise TokenFileError(f"--expires {format_expires(token.expires)} is already past")


__all__ = [
    "FILE_MODE",
    "HEADER",
    "EntriesParser",
    "TokenFileError",
    "append_token",
    "check_new",
    "entry_text",
    "format_expires",
    "remove_token",
    "toml_string",
]
