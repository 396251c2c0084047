"""Where the config file is found, the environment variables' names, and `ConfigError`.

Light on purpose (no pydantic): the command line reads these for its help and `--version`
without loading the config models; `settings.loader` builds on them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .tomlfile import file_kind

ENV_PREFIX = "AGENTSPOONSD_"
CONFIG_ENV_VAR = "AGENTSPOONSD_CONFIG"
# Read by the clients (`watch`, `probe`, `agentspoonsd.client`), not settings: one shell may
# export them and run the daemon or read its config, so they are not taken for mistyped keys.
CLIENT_ENV_VARS = frozenset({"AGENTSPOONSD_TOKEN", "AGENTSPOONSD_URL"})
DEFAULT_SEARCH_PATHS = (
    Path("agentspoonsd.toml"),
    Path("/etc/agentspoonsd/agentspoonsd.toml"),
)


class ConfigError(Exception):
    """The configuration cannot be used. The message is meant for the operator, as is."""


def find_config_path(
    explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> Path | None:
    """Return the config file to read, following the documented search order.

    An explicit path (``--config``) or ``$AGENTSPOONSD_CONFIG`` must exist; the default locations
    are optional, and ``None`` means "built-in defaults".
    """
    chosen = explicit if explicit is not None else environ.get(CONFIG_ENV_VAR) or None
    if chosen is not None:
        path = Path(chosen)
        try:
            mode = path.stat().st_mode  # stat, not open: a FIFO is not waited on
        except OSError:
            raise ConfigError(f"{path}: config file not found") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file ({file_kind(mode)})")
        return path
    for candidate in DEFAULT_SEARCH_PATHS:
        if candidate.is_file():
            return candidate
    return None
