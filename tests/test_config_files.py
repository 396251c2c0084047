"""config/: the JSON Schema is what the pydantic models generate today, and the shipped example
config and env file are accepted by the real `agentspoonsd check-config`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
