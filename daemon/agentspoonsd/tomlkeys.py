"""Where each key of a TOML document is written: its line and column, for messages that point at it.

tomllib reports positions only for syntax errors; a config error found after parsing (a value
out of range, an unknown key) is about a document tomllib accepted, and gets no position from it.
`key_positions` scans the text once and maps every key path to where it is written, in the shape
of the locations pydantic reports: `("server", "port")`; `("auth", "tokens", 1, "sha256")` for
the second `[[auth.tokens]]` table; `("generator", "symbols", 2)` for the third element of an
array; `("generator", "overrides", "ETH/USD", "model")` for a quoted key.

Sans-IO: text in, positions out. The text is meant to be one tomllib accepted; on any other text
the result may be partial or wrong, but the scan never raises and always ends (each step consumes
at least one token), in time linear in the text.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator, Sequence

KeyPath = tuple[str | int, ...]
Position = tuple[int, int]  # line and column, both from 1 (columns count characters)

# One token per match, tried in order: the multi-line strings before the one-line ones that
# begin like them. A bare run stops at anything that can end a key or a value; a lone character
# that is none of these (a stray quote in an invalid document) is a token of its own.
_TOKEN = re.compile(
    r"""(?P<space>[ \t\r]+)
    |(?P<newline>\n)
    |(?P<comment>\#[^\n]*)
    |(?P<string>\"\"\"(?:[^"\\]|\\.|"(?!""))*\"{3,5}
        |'''(?:[^']|'(?!''))*'{3,5}
        |"(?:[^"\\\n]|\\.)*"
        |'[^'\n]*')
    |(?P<punct>[\[\]{}=.,])
    |(?P<bare>[^\s\[\]{}=.,\#"']+)
    |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_VALUE_ENDS = frozenset({",", "]", "}"})


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    """(kind, text, offset) of every token but spaces and comments."""
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "other"
        if kind not in ("space", "comment"):
            yield kind, match.group(), match.start()


def _key_text(kind: str, token: str) -> str:
    """The key a bare or quoted key token names."""
    if kind != "string":
        return token
    if token.startswith("'"):
        return token[1:-1]  # a literal string: no escapes
    try:
        return str(json.loads(token))  # TOML's basic-string escapes are JSON's, but \e and \U
    except ValueError:
        return token[1:-1]


class _Scanner:
    """A recursive-descent walk over the tokens that records where each key path starts."""

    def __init__(self, text: str) -> None:
        self.tokens = list(_tokens(text))
        self.i = 0
        self.offsets: dict[KeyPath, int] = {}
        self.array_tables: dict[KeyPath, int] = {}  # [[x]] headers seen per path
        self.table: KeyPath = ()  # the table the key/value lines now belong to

    def peek(self, ahead: int = 0) -> tuple[str, str, int]:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else ("eof", "", -1)

    def record(self, path: KeyPath, offset: int) -> None:
        # The first place a path appears is where it is defined (TOML defines each key once).
        if path:
            self.offsets.setdefault(path, offset)

    def at_value_end(self) -> bool:
        kind, token, _ = self.peek()
        return kind in ("newline", "eof") or (kind == "punct" and token in _VALUE_ENDS)

    def skip_newlines(self) -> None:
        while self.peek()[0] == "newline":
            self.i += 1

    def key(self) -> list[tuple[str, int]]:
        """A dotted key: each part and its offset."""
        parts: list[tuple[str, int]] = []
        while True:
            kind, token, offset = self.peek()
            if kind not in ("bare", "string"):
                break
            parts.append((_key_text(kind, token), offset))
            self.i += 1
            if self.peek()[1] != ".":
                break
            self.i += 1
        return parts

    def document(self) -> None:
        while self.peek()[0] != "eof":
            before = self.i
            self.skip_newlines()
            kind, token, offset = self.peek()
            if kind == "eof":
                break
            if token == "[":
                self.header(offset)
            elif kind in ("bare", "string"):
                self.keyval(self.table)
            if self.i == before:
                self.i += 1  # not TOML here: skip the token rather than stop or loop

    def resolve(self, parts: Sequence[str]) -> KeyPath:
        """A header's path, with the index of the latest table of each array of tables in it."""
        path: KeyPath = ()
        for part in parts:
            path += (part,)
            if path in self.array_tables:
                path += (self.array_tables[path] - 1,)
        return path

    def header(self, offset: int) -> None:
        self.i += 1
        is_array = self.peek()[1] == "["
        if is_array:
            self.i += 1
        parts = [part for part, _ in self.key()]
        while self.peek()[0] not in ("newline", "eof"):
            self.i += 1  # the closing brackets (and anything after them on the line)
        if not parts:
            return
        if is_array:
            path = (*self.resolve(parts[:-1]), parts[-1])
            index = self.array_tables.get(path, 0)
            self.array_tables[path] = index + 1
            self.record(path, offset)
            path += (index,)
        else:
            path = self.resolve(parts)
        for end in range(1, len(path) + 1):
            self.record(path[:end], offset)
        self.table = path

    def keyval(self, prefix: KeyPath) -> None:
        path = prefix
        for part, offset in self.key():
            path += (part,)
            self.record(path, offset)
        if self.peek()[1] == "=":
            self.i += 1
            self.value(path)

    def value(self, path: KeyPath) -> None:
        kind, token, _ = self.peek()
        if token == "[" and kind == "punct":
            self.i += 1
            self.array(path)
        elif token == "{" and kind == "punct":
            self.i += 1
            self.inline_table(path)
        else:
            # A scalar: one string, or bare runs and dots (1.5e-8, a date-time with a space).
            while not self.at_value_end():
                self.i += 1

    def array(self, path: KeyPath) -> None:
        index = 0
        while True:
            self.skip_newlines()
            kind, token, offset = self.peek()
            if kind == "eof":
                return
            if token == "]":
                self.i += 1
                return
            if token == ",":
                self.i += 1
                index += 1
                continue
            before = self.i
            self.record((*path, index), offset)
            self.value((*path, index))
            if self.i == before:
                self.i += 1

    def inline_table(self, path: KeyPath) -> None:
        while True:
            self.skip_newlines()  # not TOML 1.0, but harmless to allow
            kind, token, _ = self.peek()
            if kind == "eof":
                return
            if token == "}":
                self.i += 1
                return
            before = self.i
            if token == ",":
                self.i += 1
            else:
                self.keyval(path)
            if self.i == before:
                self.i += 1


def key_positions(text: str) -> dict[KeyPath, Position]:
    """Every key path of the TOML `text` (and every array element) and where it is first written:
    the first character of its key, of its table header, or of the element."""
    scanner = _Scanner(text)
    scanner.document()
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    positions = {}
    for path, offset in scanner.offsets.items():
        line = bisect.bisect_right(line_starts, offset)
        positions[path] = (line, offset - line_starts[line - 1] + 1)
    return positions


def locate(positions: dict[KeyPath, Position], loc: Sequence[str | int]) -> Position | None:
    """Where the key at `loc` is written, else its nearest enclosing key or table that is (a key
    missing from a table is reported at the table); None when not even the first part is."""
    for end in range(len(loc), 0, -1):
        found = positions.get(tuple(loc[:end]))
        if found is not None:
            return found
    return None


__all__ = ["KeyPath", "Position", "key_positions", "locate"]
