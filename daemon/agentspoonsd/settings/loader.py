"""Loading the config: the TOML file, `AGENTSPOONSD_…` overrides, the tokens and TLS files.

`load_settings` is the one place that reads a TOML file, applies
`AGENTSPOONSD_<SECTION>__<KEY>` environment overrides (`__` separates every level of a nested key:
`AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED`) and turns every failure into a `ConfigError` whose
message names the key, where its value came from (the variable, or the file with the line and
column of the key), the value itself unless it may be a secret, and for an unknown key the
nearest real one.

Precedence, highest first: environment variables, the TOML file, the built-in defaults.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import types
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from ..configpaths import CLIENT_ENV_VARS, CONFIG_ENV_VAR, ENV_PREFIX, ConfigError
from ..tomlfile import (
    MAX_CONFIG_BYTES,
    MAX_TOKENS_FILE_BYTES,
    FileRefused,
    parse_toml,
    read_bounded,
)
from ..tomlkeys import key_positions, locate
from .generator import ModelTable
from .sections import Settings, TokenSettings, TokensFile

_NOT_SETTINGS = CLIENT_ENV_VARS | {CONFIG_ENV_VAR}


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the config file, raising ConfigError with one line naming the file (and the line
    and column) for anything `tomlfile.parse_toml` refuses: see there for the classes of input."""
    return _read_config(path)[0]


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    """The config file's document and its text (for the positions of keys in messages): both
    from one read, so a message never points into another version of the file."""
    try:
        raw, _ = read_bounded(path, MAX_CONFIG_BYTES)
        data = parse_toml(raw)
    except FileRefused as exc:
        if exc.missing:  # found, then removed before it was read
            raise ConfigError(f"{path}: config file not found") from None
        raise ConfigError(f"{path}: {exc}") from None
    # parse_toml accepted it, so it is UTF-8; a BOM is one character before line 1's first.
    return data, raw.decode("utf-8").removeprefix("\ufeff")


def load_settings(
    path: Path | None, *, read_tokens_file: bool = True, check_tls_files: bool = True
) -> Settings:
    """Build the Settings from `path` (None: defaults only), `os.environ` and `auth.tokens_file`.

    Raises ConfigError with one line per problem, each naming the key and its source. With
    `read_tokens_file=False` the tokens file's path is resolved but the file is not read (it may
    not exist yet: `agentspoonsd token new` creates it). With `check_tls_files=False` the paths
    of `server.tls_cert`/`tls_key` are resolved but neither file is opened (a client reading the
    config to find the daemon need not be able to read its key).
    """
    data, text = _read_config(path) if path is not None else ({}, "")
    _reject_unknown_env(os.environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, os.environ, text)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a list-valued variable (those must be JSON).
        raise ConfigError(_describe_undecodable_env(exc, os.environ)) from None
    _check_broker(settings, path, os.environ)
    settings = _with_tls_files(settings, path, os.environ, check=check_tls_files)
    return _with_tokens_file(settings, path, os.environ, read=read_tokens_file)


def _check_broker(settings: Settings, path: Path | None, environ: Mapping[str, str]) -> None:
    """With the redis broker the stream is the history: a second, local copy on disk would
    disagree with it after another node generated."""
    if settings.broker.kind == "redis" and settings.history.persist:
        source = key_source("history", "persist", path, environ)
        raise ConfigError(
            f'{source}: history.persist: must be false with broker.kind = "redis" '
            "(the Redis streams keep the history)"
        )


def key_source(section: str, key: str, path: Path | None, environ: Mapping[str, str]) -> str:
    """Where the value of `section.key` came from, as _describe names it."""
    return _source((section, key), path, environ)


def _source(loc: Sequence[str | int], path: Path | None, environ: Mapping[str, str]) -> str:
    """The environment variable that set the key at `loc` (itself or a table above it, given as
    JSON), else the file, else the built-in defaults."""
    env_name = _env_name_for(loc, environ)
    if env_name is not None:
        return f"environment variable {env_name}"
    return str(path) if path is not None else "built-in defaults"


def _env_name_for(loc: Sequence[str | int], environ: Mapping[str, str]) -> str | None:
    """The set `AGENTSPOONSD_…` variable that gives the key at `loc` or the nearest table above
    it (a whole section is not a variable), in upper case."""
    names = {name.upper() for name in environ}
    keys = [str(part) for part in _leading_keys(loc)]
    for end in range(len(keys), 1, -1):
        candidate = ENV_PREFIX + "__".join(keys[:end]).upper()
        if candidate in names:
            return candidate
    return None


def _leading_keys(loc: Sequence[str | int]) -> list[str]:
    """The names of `loc` before its first list index: the part a variable name can spell."""
    keys = []
    for part in loc:
        if not isinstance(part, str):
            break
        keys.append(part)
    return keys


def _with_tls_files(
    settings: Settings, path: Path | None, environ: Mapping[str, str], *, check: bool = True
) -> Settings:
    """Resolve `server.tls_cert`/`tls_key` against the config file and (`check`) that they make a
    usable TLS context now, so a bad certificate stops the daemon at start (or a reload keeps the
    old)."""
    server = settings.server
    if server.tls_cert is None or server.tls_key is None:
        return settings
    from ..tls import TlsConfigError, server_context

    files = {}
    for key in ("tls_cert", "tls_key"):
        file = getattr(server, key)
        source = key_source("server", key, path, environ)
        if not file.is_absolute():
            from_env = source.startswith("environment")
            base = path.parent if path is not None and not from_env else Path.cwd()
            file = Path(os.path.abspath(base / file))
        files[key] = (file, source)
    try:
        if check:
            server_context(files["tls_cert"][0], files["tls_key"][0])
    except TlsConfigError as exc:
        raise ConfigError(f"{files[exc.key][1]}: server.{exc.key}: {exc.message}") from None
    resolved = server.model_copy(update={key: file for key, (file, _) in files.items()})
    return settings.model_copy(update={"server": resolved})


def _with_tokens_file(
    settings: Settings, path: Path | None, environ: Mapping[str, str], *, read: bool
) -> Settings:
    auth = settings.auth
    if auth.tokens_file is None:
        return settings
    source = key_source("auth", "tokens_file", path, environ)
    file = auth.tokens_file
    if not file.is_absolute():
        # Relative to the file that names it, so the config and its tokens move together.
        from_env = source.startswith("environment")
        base = path.parent if path is not None and not from_env else Path.cwd()
        file = Path(os.path.abspath(base / file))
    merged = auth.model_copy(update={"tokens_file": file})
    if read:
        tokens, mode = read_tokens_file(file, named_by=f"{source}: auth.tokens_file")
        problems = []
        in_config = {t.name: i for i, t in enumerate(auth.tokens)}
        tokens_source = key_source("auth", "tokens", path, environ)
        for j, token in enumerate(tokens):
            if token.name in in_config:
                problems.append(
                    f'{file}: tokens[{j}].name: token "{token.name}" is also defined in'
                    f" {tokens_source}: auth.tokens[{in_config[token.name]}]"
                )
        config_digests = {t.sha256: t.name for t in auth.tokens}
        for j, token in enumerate(tokens):
            other = config_digests.get(token.sha256)
            if other is not None and other != token.name:
                problems.append(
                    f'{file}: tokens[{j}].sha256: the token of "{token.name}" is also'
                    f' "{other}" in {tokens_source}: auth.tokens (one token, one name)'
                )
        if problems:
            raise ConfigError("\n".join(problems))
        merged._file_tokens = tokens
        merged._tokens_file_mode = mode
    return settings.model_copy(update={"auth": merged})


def read_tokens_file(
    file: Path, *, named_by: str = "auth.tokens_file"
) -> tuple[tuple[TokenSettings, ...], int]:
    """The entries of a tokens file and its permission bits; ConfigError names the file and key.

    A missing file is an error, not an empty list: a typo in the path must not leave the daemon
    serving only the tokens of the main config (or only an ephemeral one).
    """
    try:
        raw, mode = read_bounded(file, MAX_TOKENS_FILE_BYTES)
    except FileRefused as exc:
        if exc.missing:
            raise ConfigError(
                f"{named_by}: {file}: file not found (`agentspoonsd token new NAME` creates it)"
            ) from None
        raise ConfigError(f"{named_by}: {file}: {exc}") from None
    try:
        data = parse_toml(raw)
    except FileRefused as exc:
        raise ConfigError(f"{file}: {exc}") from None
    try:
        parsed = TokensFile(**data)
    except ValidationError as exc:
        positions = _Positions(raw.decode("utf-8").removeprefix("\ufeff"))
        lines = [
            f"{file}: {_dotted(error['loc'])}: {_problem(error, TokensFile)}"
            + positions.at(error["loc"])
            for error in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None
    return tuple(parsed.tokens), stat.S_IMODE(mode)


def _strip_optional(annotation: Any) -> Any:
    """`X | None` as X; anything else as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _annotation_at(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> Any:
    """The type the config (or another `root` model) gives the key at `loc`, through tables,
    lists and the `generator.overrides` mapping; None when `loc` names no key."""
    current: Any = Settings if root is None else root
    for part in loc:
        model = _as_model(current)
        if model is not None:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
            continue
        current = _strip_optional(current)
        origin, args = get_origin(current), get_args(current)
        if origin is list and isinstance(part, int):
            current = args[0]
        elif origin is dict and isinstance(part, str):
            current = args[1]
        else:
            return None
    return current


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _suggest_key(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> str | None:
    """For an unknown key at `loc`: the real key of that table it was probably meant to be,
    else the config section that has a key of exactly that name (one put in the wrong table)."""
    name = loc[-1]
    table = _as_model(_annotation_at(loc[:-1], root))
    if not isinstance(name, str) or table is None:
        return None
    close = _closest(name, list(table.model_fields))
    if close is not None:
        return close
    if root is not None:
        return None
    # The ignore: every field of Settings is a table (a model class), never None.
    elsewhere = [
        f"{section}.{name}"
        for section, field in Settings.model_fields.items()
        if name in field.annotation.model_fields  # type: ignore[union-attr]
    ]
    return elsewhere[0] if len(elsewhere) == 1 else None


_RETIRED_NOTE = "model parameters are given per year now and scaled to bar_seconds"


def _retired_key(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> str | None:
    """For a per-bar model key of earlier versions (`generator.gbm.sigma`): the yearly key that
    replaces it; else None."""
    name = loc[-1]
    table = _as_model(_annotation_at(loc[:-1], root))
    if not isinstance(name, str) or table is None or not issubclass(table, ModelTable):
        return None
    return table.RETIRED.get(name)


def _reject_unknown_env(environ: Mapping[str, str]) -> None:
    """An `AGENTSPOONSD_X__Y[__Z…]` variable that names no key is a typo the operator wants to
    hear of, with the variable that was probably meant."""
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        problem = _env_key_problem(upper[len(ENV_PREFIX) :].lower().split("__"))
        if problem is not None:
            raise ConfigError(f"environment variable {name}: {problem}")


def _env_key_problem(parts: list[str]) -> str | None:
    """None when `parts` (a variable's name split at `__`) name a key, else why not, with the
    variable that does name one when a part is a near miss."""
    sections = list(Settings.model_fields)
    if parts[0] not in sections:
        problem = f"no config section '{parts[0]}'"
        close = _closest(parts[0], sections)
        fixed = [close, *parts[1:]] if close else None
    elif len(parts) < 2 or _annotation_at(parts) is None:
        problem = f"no key '{'.'.join(parts)}'"
        fixed = None
        for depth in range(1, len(parts)):
            table = _as_model(_annotation_at(parts[:depth]))
            if table is None:
                break
            if parts[depth] not in table.model_fields:
                retired = _retired_key(parts[: depth + 1])
                if retired is not None:
                    problem += f" ({_RETIRED_NOTE})"
                close = retired or _closest(parts[depth], list(table.model_fields))
                if close is not None:
                    fixed = [*parts[:depth], close, *parts[depth + 1 :]]
                break
        if fixed is not None and _annotation_at(fixed) is None:
            fixed = None
    else:
        return None
    if fixed is None:
        return problem
    return f"{problem}; did you mean {ENV_PREFIX}{'__'.join(fixed).upper()}?"


def _describe_undecodable_env(exc: SettingsError, environ: Mapping[str, str]) -> str:
    lines = []
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        annotation = _strip_optional(_annotation_at(parts))  # a key: _reject_unknown_env ran
        if get_origin(annotation) in (list, dict):
            kind = "list"
        elif _as_model(annotation) is not None:
            kind = "object (a table)"
        else:
            continue  # pydantic-settings decodes only lists, tables and mappings as JSON
        try:
            json.loads(value)
        except ValueError:
            lines.append(f"environment variable {upper}: {'.'.join(parts)}: must be a JSON {kind}")
    return "\n".join(lines) or f"environment: {exc}"


# The values of keys named like these are never repeated in a message: a token pasted where its
# digest belongs, or a broker URL with its password, must not reach a terminal log or a journal.
_SECRET_KEY_HINTS = ("sha256", "token", "url", "password", "secret")
_MAX_SHOWN_VALUE = 80


def _shown_value(loc: Sequence[str | int], value: Any) -> str | None:
    """The offending value as TOML would write it, for the message; None when it is not shown
    (a key that may hold a secret, a whole table, or too long a value)."""
    last = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if any(hint in last for hint in _SECRET_KEY_HINTS):
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str):
        text = json.dumps(value) if isinstance(value, str) else repr(value)
    elif isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, list) and all(isinstance(v, int | float | str) for v in value):
        text = json.dumps(value, ensure_ascii=False)
    else:
        return None
    return text if len(text) <= _MAX_SHOWN_VALUE else None


def _describe(
    exc: ValidationError, path: Path | None, environ: Mapping[str, str], text: str = ""
) -> str:
    """One line per problem: `SOURCE: KEY: PROBLEM[, got VALUE][; did you mean `KEY`?]`, and
    `(at line L, column C)` when the key is in the file `text` was read from."""
    positions = _Positions(text)
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        source = _source(loc, path, environ)
        message = _problem(error)
        if path is not None and not source.startswith("environment"):
            message += positions.at(loc)
        lines.append(f"{source}: {_dotted(loc)}: {message}")
    return "\n".join(lines)


def _problem(error: Any, root: type[BaseModel] | None = None) -> str:
    """What is wrong with one key (a pydantic error of a `root` model, default Settings): the
    rule it breaks and the value, or for an unknown key the real key it was probably meant to
    be."""
    loc = error["loc"]
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        retired = _retired_key(loc, root)
        suggestion = _suggest_key(loc, root) if retired is None else None
        if retired is not None:
            message += f"; {_RETIRED_NOTE}: use `{retired}`"
        elif suggestion is not None:
            message += f"; did you mean `{suggestion}`?"
    elif error["type"] != "missing":
        shown = _shown_value(loc, error["input"])
        if shown is not None:
            message += f", got {shown}"
    return message


class _Positions:
    """Where keys are in one file's text, scanned at the first question (only a config with an
    error pays for the scan)."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._positions: dict[Any, tuple[int, int]] | None = None

    def at(self, loc: Sequence[str | int]) -> str:
        """` (at line L, column C)` for the key at `loc` (or its nearest table), else ``."""
        if self._positions is None:
            self._positions = key_positions(self._text)
        found = locate(self._positions, loc)
        return f" (at line {found[0]}, column {found[1]})" if found is not None else ""


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A key path as the config writes it: `auth.tokens[0].name`, `overrides."ETH/USD".model`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out += ("." if out else "") + key
    return out


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, with token digests shortened (safe to print).

    `auth.tokens` lists the tokens file's entries too, each token with its `source`.
    """
    data = settings.model_dump(mode="json")
    auth = settings.auth
    data["auth"]["tokens"] = [
        {**token.model_dump(mode="json"), "source": source}
        for tokens, source in ((auth.tokens, "config"), (auth.file_tokens, "tokens_file"))
        for token in tokens
    ]
    for token in data["auth"]["tokens"]:
        token["sha256"] = token["sha256"][:8] + "…(redacted)"
    metrics_digest = data["health"].get("metrics_token_sha256")
    if metrics_digest:
        data["health"]["metrics_token_sha256"] = metrics_digest[:8] + "…(redacted)"
    return data
