"""The daemon's configuration: pydantic models for every section, and how they are loaded.

- `sections`: the tables `[server]`, `[auth]`, `[history]`, `[broker]`, `[health]`, `[log]`
  and `Settings`, the whole config;
- `generator`: the `[generator]` table, which builds the plain `market.spec.GeneratorSpec`;
- `loader`: `load_settings` (file, environment, tokens file, TLS files) and its messages.

The light pieces (where the file is searched, `ConfigError`, the variables' names) live in
`configpaths`, and the exit statuses in `exits`, so the command line can use them without
loading pydantic. Everything is re-exported here: ``from agentspoonsd.settings import Settings,
load_settings, ConfigError`` is the usual way in.

Layering: this package builds the plain types of the layers below it (`market.spec`,
`auth.TokenSpec`); nothing below imports it.
"""

from __future__ import annotations

from ..configpaths import (
    CLIENT_ENV_VARS,
    CONFIG_ENV_VAR,
    DEFAULT_SEARCH_PATHS,
    ENV_PREFIX,
    ConfigError,
    find_config_path,
)
from ..exits import EX_CONFIG as EXIT_CONFIG
from .generator import (
    FileSourceSettings,
    GarchFitSettings,
    GarchModelSettings,
    GbmSettings,
    GeneratorSettings,
    GjrGarchSettings,
    HestonSettings,
    ReplaySourceSettings,
    SymbolOverride,
    VolumeSettings,
)
from .loader import load_settings, read_tokens_file, read_toml, redacted
from .sections import (
    AuthSettings,
    BrokerSettings,
    HealthSettings,
    HistorySettings,
    LogSettings,
    ServerSettings,
    Settings,
    TokenSettings,
    TokensFile,
    parse_tokens_file,
)

__all__ = [
    "CLIENT_ENV_VARS",
    "CONFIG_ENV_VAR",
    "DEFAULT_SEARCH_PATHS",
    "ENV_PREFIX",
    "EXIT_CONFIG",
    "AuthSettings",
    "BrokerSettings",
    "ConfigError",
    "FileSourceSettings",
    "GarchFitSettings",
    "GarchModelSettings",
    "GbmSettings",
    "GeneratorSettings",
    "GjrGarchSettings",
    "HealthSettings",
    "HestonSettings",
    "HistorySettings",
    "LogSettings",
    "ReplaySourceSettings",
    "ServerSettings",
    "Settings",
    "SymbolOverride",
    "TokenSettings",
    "TokensFile",
    "VolumeSettings",
    "find_config_path",
    "load_settings",
    "parse_tokens_file",
    "read_tokens_file",
    "read_toml",
    "redacted",
]
