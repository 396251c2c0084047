"""`Limits` for tests that build a server without a config: the config's defaults (which live
only in the settings models) with the given fields replaced."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agentspoonsd.limits import Limits
from agentspoonsd.reloading import limits_from
from agentspoonsd.settings import Settings

# Any Origin and the kernel's send buffer: these servers are reached without a dashboard, by
# clients that need no buffer tuning.
_DEFAULTS = replace(limits_from(Settings()), allowed_origins=None, send_buffer_bytes=None)


def make_limits(**overrides: Any) -> Limits:
    """The defaults of `[server]` (and `auth.max_failures_per_minute`), with `overrides`."""
    return replace(_DEFAULTS, **overrides)
