"""Write the JSON Schema of agentspoonsd.toml: python build/schema.py [OUTPUT]  (`make schema`).

The schema is generated from the pydantic models in `agentspoonsd.settings`, the one source of
truth, so it lists every key with its type, default, bounds and description. TOML editors use it
(Taplo / Even Better TOML: the `#:schema` line at the top of config/agentspoonsd.example.toml).
tests/test_config_files.py regenerates it and fails when the committed file differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the whole config file, deterministic for a given code."""
    from agentspoonsd.settings import Settings

    schema = Settings.model_json_schema(mode="validation")
    schema["title"] = "agentspoonsd configuration (agentspoonsd.toml)"
    schema["description"] = (
        "The TOML config of the agentspoonsd daemon. Generated from agentspoonsd.settings by "
        "`make schema`; do not edit. Check a file with `agentspoonsd check-config --config FILE`."
    )
    return {"$schema": SCHEMA_DIALECT, **schema}


def render() -> str:
    """The schema file's exact text."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if len(argv) > 1:
        Path(argv[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
