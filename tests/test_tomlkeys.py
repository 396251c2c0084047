"""tomlkeys: every key path tomllib finds in a document is located, at the text that writes it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentspoonsd.tomlkeys import KeyPath, key_positions, locate

ROOT = Path(__file__).resolve().parents[1]


def paths_of(data: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every key path and array index tomllib gives for a document."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths_of(value, (*prefix, index))
    return found


def text_at(text: str, position: tuple[int, int]) -> str:
    line, column = position
    return text.splitlines()[line - 1][column - 1 :]


def assert_all_located(text: str) -> dict[KeyPath, tuple[int, int]]:
    positions = key_positions(text)
    for path in paths_of(tomllib.loads(text)):
        assert path in positions, path
        at = text_at(text, positions[path])
        last = path[-1]
        if isinstance(last, str):
            # The key itself (bare or quoted), or the header of the table it names.
            starts = (last, json.dumps(last), f"'{last}'", "[")
            assert at.startswith(starts), (path, at)
    return positions


def test_tables_keys_and_values() -> None:
    text = (
        "top = 1\n"
        "[server]\n"
        "port = 70000          # a comment with = and [brackets]\n"
        "  max_conections = 5\n"
        "\n"
        "[generator]\n"
        'symbols = ["A", "B,]", 3]\n'
        "garch_fit.enabled = true\n"
    )
    positions = assert_all_located(text)
    assert positions[("top",)] == (1, 1)
    assert positions[("server",)] == (2, 1)
    assert positions[("server", "port")] == (3, 1)
    assert positions[("server", "max_conections")] == (4, 3)
    assert positions[("generator", "symbols", 2)] == (7, 24)
    assert positions[("generator", "garch_fit")] == (8, 1)
    assert positions[("generator", "garch_fit", "enabled")] == (8, 11)


def test_arrays_of_tables_are_indexed() -> None:
    text = (
        '[[auth.tokens]]\nname = "a"\n\n[[auth.tokens]]\nname = "b"\nsha256 = "xyz"\n'
        "[auth]\nenabled = true\n"
    )
    positions = assert_all_located(text)
    assert positions[("auth", "tokens", 0)] == (1, 1)
    assert positions[("auth", "tokens", 1)] == (4, 1)
    assert positions[("auth", "tokens", 1, "sha256")] == (6, 1)
    assert positions[("auth", "enabled")] == (8, 1)


def test_nested_arrays_of_tables_belong_to_the_latest_parent() -> None:
    text = "[[a]]\nx = 1\n[[a.b]]\ny = 1\n[[a]]\n[[a.b]]\ny = 2\n[[a.b]]\ny = 3\n"
    positions = assert_all_located(text)
    assert positions[("a", 1, "b", 1, "y")] == (9, 1)


def test_quoted_keys_inline_tables_and_multiline_values() -> None:
    text = (
        '[generator.overrides."ETH/USD"]\n'
        'model = "heston"\n'
        "heston = { kappa = 0.05, 'xi' = 2.5e-4 }\n"
        '"a.b" = """\nnot = a key\n[nor] a table\n"""\n'
        "list = [\n  1,\n  [2, 3],  # comment ]\n  { k = 1 },\n]\n"
        "when = 1979-05-27 07:32:00\n"
        "after = 1\n"
    )
    positions = assert_all_located(text)
    overrides = ("generator", "overrides", "ETH/USD")
    assert positions[(*overrides, "heston", "xi")] == (3, 26)
    assert positions[(*overrides, "after")] == (14, 1)
    assert positions[(*overrides, "list", 2, "k")] == (11, 5)
    assert (*overrides, "not") not in positions


@pytest.mark.parametrize(
    "path",
    [ROOT / "agentspoonsd.toml", *sorted((ROOT / "config").glob("*.toml"))],
    ids=lambda p: p.name,
)
def test_shipped_configs(path: Path) -> None:
    assert_all_located(path.read_text(encoding="utf-8"))


def test_locate_falls_back_to_the_enclosing_table() -> None:
    positions = key_positions("[server]\nport = 1\n")
    assert locate(positions, ("server", "port")) == (2, 1)
    assert locate(positions, ("server", "tls_key")) == (1, 1)
    assert locate(positions, ("log", "level")) is None


@pytest.mark.parametrize(
    "text",
    ["[", "[[", "a = [", "a = {", 'a = "', "= = =", "]]]", "a.b.", "[a\n]b = {,,}", "\x00\n'"],
)
def test_not_toml_never_raises(text: str) -> None:
    key_positions(text)


# --- any document a small TOML writer makes -------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "port", "ETH/USD", "with space", "dot.ted", "x-y", "1"])
SCALARS = st.one_of(
    st.integers(-(2**31), 2**31),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(alphabet="ab ,=]}[{#\"\\'\n", max_size=8),
)


def key_text(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else json.dumps(key)


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "\n" in value and '"' not in value and "\\" not in value:
            return f'"""{value}"""'  # a multi-line string with key-like lines inside
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + "".join(f"{value_text(v)},\n" for v in value) + "]"  # trailing commas
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key_text(k)} = {value_text(v)}" for k, v in value.items()) + " }"
    return repr(value)


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
TABLES = st.dictionaries(KEYS, VALUES, max_size=4)


def document(root: dict[str, Any], tables: dict[str, dict[str, Any]], arrays: list[dict]) -> str:
    lines = [f"{key_text(k)} = {value_text(v)}  # {k} = 1" for k, v in root.items()]
    for name, table in tables.items():
        lines.append(f"[ t.{key_text(name)} ]")
        lines += [f"{key_text(k)} = {value_text(v)}" for k, v in table.items()]
    for table in arrays:
        lines.append("[[arr]]")
        lines += [f"{key_text(k)} = {value_text(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(TABLES, st.dictionaries(KEYS, TABLES, max_size=3), st.lists(TABLES, max_size=3))
def test_every_written_key_is_located(
    root: dict[str, Any], tables: dict[str, dict[str, Any]], arrays: list[dict]
) -> None:
    root = {k: v for k, v in root.items() if k not in ("t", "arr")}
    assert_all_located(document(root, tables, arrays))
