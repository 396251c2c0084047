"""The HTTP routes: /healthz, /readyz, /metrics and the dashboard.

`readiness` is pure; the handler `make_handler` returns does no I/O (the daemon's state comes
through `Probes`, asked at request time; a response goes out). `HttpService` serves that handler
on the daemon's listener (httpserver.py does the I/O).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
import trio
from prometheus_client import CollectorRegistry

from . import metrics
from .dashboard import Dashboard
from .httpserver import Handler, HttpResponse, Upgrade, serve_http

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger
from .settings import HealthSettings

JSON = "application/json"
READY_AGE_FACTOR = 3  # the newest update must be younger than 3 × interval
METRICS_PATH = "/metrics"
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class Probes:
    """What the routes need to know about the running daemon, asked at request time."""

    ws_listening: Callable[[], bool]
    last_update_age: Callable[[], float | None]
    interval: Callable[[], float]
    broker_problem: Callable[[], str | None] = lambda: None  # the redis broker's, if any
    workers_problem: Callable[[], str | None] = lambda: None  # workers down, if any


def readiness(probes: Probes) -> tuple[bool, list[str]]:
    """Ready when the WebSocket listener is up and the newest update is fresh; else the reasons."""
    reasons = []
    if not probes.ws_listening():
        reasons.append("websocket listener is not accepting")
    workers = probes.workers_problem()
    if workers is not None:
        reasons.append(workers)
    broker = probes.broker_problem()
    if broker is not None:
        reasons.append(broker)
    age = probes.last_update_age()
    limit = READY_AGE_FACTOR * probes.interval()
    if age is None:
        reasons.append("no update published yet")
    elif age > limit:
        reasons.append(f"newest update is {age:.1f} s old (limit {limit:g} s)")
    return not reasons, reasons


def make_handler(
    probes: Probes, registry: CollectorRegistry, dashboard: Dashboard | None = None
) -> Callable[[str, str], HttpResponse]:
    """The request handler for `httpserver.serve_http`; `dashboard` adds `/` and `/dashboard/`."""

    def handle(method: str, target: str) -> HttpResponse:
        path = urlsplit(target).path
        if path == "/healthz":
            return HttpResponse(200, orjson.dumps({"status": "ok"}), JSON)
        if path == "/readyz":
            ready, reasons = readiness(probes)
            body = {"status": "ready" if ready else "not_ready", "reasons": reasons}
            return HttpResponse(200 if ready else 503, orjson.dumps(body), JSON)
        if path == METRICS_PATH:
            return HttpResponse(200, metrics.render(registry), metrics.CONTENT_TYPE)
        if dashboard is not None and (page := dashboard.response(target)) is not None:
            return page
        return HttpResponse(404, orjson.dumps({"error": "not_found"}), JSON)

    return handle


def http_options(settings: HealthSettings) -> dict[str, Any]:
    """`serve_http`'s keyword options for the `[health]` settings.

    /healthz and /readyz are the probe paths: answered even on a connection past a connection cap
    (they cost no more than a refusal), so a load balancer sharing an address with a client that
    holds all of that address's connections still gets its answer.
    """
    digest = settings.metrics_token_sha256
    return {
        "request_timeout": settings.request_timeout,
        "idle_timeout": settings.idle_timeout,
        "max_connections": settings.max_connections,
        "max_connections_per_ip": settings.max_connections_per_ip,
        "allowed_hosts": (
            None if settings.allowed_hosts is None else frozenset(settings.allowed_hosts)
        ),
        "bearer_digests": {} if digest is None else {METRICS_PATH: bytes.fromhex(digest)},
        "probe_paths": PROBE_PATHS,
    }


class HttpService:
    """The supervised HTTP service: serves `handler` on a listener the daemon bound, with the
    limits of `settings` (the built-in `[health]` defaults when None); `upgrades` (path to
    `Upgrade`, e.g. `/ws` to the WebSocket server) take over the connections that GET them."""

    def __init__(
        self,
        listener: trio.SocketListener,
        handler: Handler,
        log: FilteringBoundLogger,
        settings: HealthSettings | None = None,
        upgrades: dict[str, Upgrade] | None = None,
    ) -> None:
        self._listener = listener
        self._handler = handler
        self._log = log
        self._options = http_options(settings or HealthSettings())
        self._options["upgrades"] = upgrades or {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_http(
            self._listener, self._handler, self._log, task_status=task_status, **self._options
        )
