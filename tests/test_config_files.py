"""config/: the JSON Schema is what the pydantic models generate today, and the shipped example
config and env file are accepted by the real `agentspoonsd check-config`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from agentspoonsd.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
SCHEMA = CONFIG / "agentspoonsd.schema.json"
EXAMPLE = CONFIG / "agentspoonsd.example.toml"
ENV_FILE = CONFIG / "agentspoonsd.env"


def schema_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "agentspoonsd_schema", ROOT / "build" / "schema.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    return subprocess.run(
        [sys.executable, "-m", "agentspoonsd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_committed_schema_is_up_to_date() -> None:
    fresh = schema_module().render()
    committed = SCHEMA.read_text(encoding="utf-8") if SCHEMA.exists() else ""
    assert committed == fresh, (
        "config/agentspoonsd.schema.json is out of date with agentspoonsd.settings: "
        "run `make schema` and commit the result"
    )


def test_schema_describes_every_section_and_forbids_unknown_keys() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == {
        "server",
        "auth",
        "generator",
        "history",
        "broker",
        "health",
        "log",
    }
    assert schema["additionalProperties"] is False
    server = schema["$defs"]["ServerSettings"]
    assert server["additionalProperties"] is False
    assert server["properties"]["port"]["maximum"] == 65535
    assert server["properties"]["max_connections"]["default"] == 20000


def test_example_and_default_configs_validate_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")  # a test-only helper, where installed
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in (EXAMPLE, ROOT / "agentspoonsd.toml"):
        with path.open("rb") as f:
            validator.validate(tomllib.load(f))
    errors = list(validator.iter_errors({"server": {"prot": 8765}, "log": {"level": "loud"}}))
    assert len(errors) == 2


def test_example_declares_its_schema_for_editors() -> None:
    first = EXAMPLE.read_text(encoding="utf-8").splitlines()[0]
    assert first == "#:schema ./agentspoonsd.schema.json"  # Taplo / Even Better TOML


def test_example_config_passes_check_config() -> None:
    result = check_config(EXAMPLE)
    assert result.returncode == 0, result.stderr
    effective: dict[str, Any] = json.loads(result.stdout)
    # Production choices: auth on, health and metrics only on loopback, the documented port.
    assert effective["auth"]["enabled"] is True
    assert effective["health"]["host"] == "127.0.0.1"
    assert effective["server"]["port"] == 8765
    assert effective["history"]["dir"] == "/var/lib/agentspoonsd"  # the unit's StateDirectory
    assert effective["log"]["format"] == "json"


def test_example_generator_section_is_minimal() -> None:
    """[generator] is being extended elsewhere: the example sets only long-standing keys."""
    with EXAMPLE.open("rb") as f:
        generator = tomllib.load(f)["generator"]
    assert set(generator) <= {"interval", "symbols", "model", "seed"}


def env_file_assignments() -> dict[str, str]:
    """Every `# AGENTSPOONSD_…=value` example line, uncommented, quotes removed as systemd does."""
    found = {}
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        text = line.removeprefix("# ").strip()
        if text.startswith("AGENTSPOONSD_") and "=" in text:
            key, _, value = text.partition("=")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[key] = value
    return found


def test_env_file_examples_name_real_keys() -> None:
    assignments = env_file_assignments()
    assert len(assignments) >= 5
    result = check_config(EXAMPLE, assignments)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["generator"]["symbols"] == ["BTC/USD", "ETH/USD"]
    assert effective["server"]["port"] == int(assignments["AGENTSPOONSD_SERVER__PORT"])


def test_env_file_is_all_comments() -> None:
    """Shipped inert: the TOML file is the config until the operator uncomments a line."""
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        assert not line.strip() or line.startswith("#"), line


# --- the shipped agentspoonsd.toml shows every key ------------------------------------------------

SHIPPED = ROOT / "agentspoonsd.toml"
# `# key = value` and `# [table]` lines: a key shown commented out (its default is unset).
_COMMENTED_KEY = re.compile(r"^# ?(?=\[|[a-z][a-z0-9_]* +=  *\S)")


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of `model` as a dotted path. Tables (a model, or a list of models such as
    [[auth.tokens]]) are walked into; a mapping of tables keyed by the operator's own names
    (generator.overrides."SYMBOL") is one key."""
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if get_origin(annotation) is list and get_args(annotation):
            annotation = get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= model_keys(annotation, f"{key}.")
        else:
            keys.add(key)
    return keys


def file_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {k: v for entry in value for k, v in entry.items()}  # [[array of tables]]
        if isinstance(value, dict) and key != "generator.overrides":
            keys |= file_keys(value, f"{key}.")
        else:
            keys.add(key)
    return keys


def test_shipped_config_shows_every_key_of_the_settings_models() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    active = file_keys(tomllib.loads(text))
    uncommented = "\n".join(_COMMENTED_KEY.sub("", line) for line in text.splitlines())
    shown = file_keys(tomllib.loads(uncommented))
    keys = model_keys(Settings)
    assert keys - shown == set(), "keys of the settings missing from agentspoonsd.toml"
    assert shown - keys == set(), "keys in agentspoonsd.toml that the settings do not have"
    # Set where the default is set (test_settings checks the values are the defaults), commented
    # out where it is unset or is one of a collection of tables that is empty by default
    # ([[auth.tokens]], generator.overrides): the file is the defaults, and uncommenting a line
    # sets a key.
    unset = {key for key in keys if _unset_by_default(key)}
    # The one exception: the default symbols' own prices and volatilities.
    assert active == keys - unset | {"generator.overrides"}
    assert {"server.allowed_origins", "auth.tokens.name", "generator.seed"} <= unset


def _unset_by_default(key: str) -> bool:
    model: Any = Settings
    for name in key.split("."):
        field = model.model_fields[name]
        annotation = field.annotation
        args = get_args(annotation)
        if get_origin(annotation) in (list, dict) and any(
            isinstance(arg, type) and issubclass(arg, BaseModel) for arg in args
        ):
            return True  # a collection of tables: empty by default, shown as a commented example
        if field.default is None and field.default_factory is None and not field.is_required():
            return True
        model = annotation
    return False
