"""The dashboard's files over HTTP: real requests to a live daemon (a subprocess), headers checked.

The page's behaviour in a browser is tests/test_dashboard_browser.py; here: what the HTTP port
serves at `/` and under `/dashboard/`, its security and cache headers, HEAD, and that no request
reaches a file outside the page's own (the table of files is fixed when the daemon starts).
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from agentspoonsd.dashboard import Dashboard, PageConfig, read_static
from daemon_process import DaemonProcess
from dashboard_support import Ports, free_ports, start_daemon

TOKEN = "dashboard-http-test-token"
# Relative to the page, so that it works below a proxy's path prefix too.
ASSET = re.compile(r'(?:src|href)="(dashboard/[^"]+)"')


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Ports]]:
    ports = free_ports()
    process = start_daemon(tmp_path_factory.mktemp("dashboard-http"), ports, {"dash": TOKEN})
    try:
        yield process, ports
    finally:
        process.kill()


def request(port: int, method: str, target: str) -> Reply:
    """One request with the target sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def csp_directives(reply: Reply) -> dict[str, list[str]]:
    policy = reply.headers["Content-Security-Policy"]
    assert policy, "no Content-Security-Policy"
    directives = {}
    for part in policy.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def assert_security_headers(reply: Reply, ports: Ports) -> None:
    csp = csp_directives(reply)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval', no CDN
    assert csp["style-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    # The page's own origin: its /ws by the allowed names (what 'self' means in CSP Level 3), and
    # the WebSocket port on the hosts allowed to connect: no more.
    assert set(csp["connect-src"]) == {
        "'self'",
        f"ws://127.0.0.1:{ports.http}",
        f"ws://localhost:{ports.http}",
        f"wss://127.0.0.1:{ports.http}",
        f"wss://localhost:{ports.http}",
        f"ws://127.0.0.1:{ports.ws}",
        f"ws://localhost:{ports.ws}",
    }
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert reply.headers["X-Frame-Options"] == "DENY"


def test_page_is_served_at_root_with_security_headers(daemon: tuple[DaemonProcess, Ports]) -> None:
    _, ports = daemon
    reply = request(ports.http, "GET", "/")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-cache"
    assert_security_headers(reply, ports)
    page = reply.body.decode()
    assert "<script>" not in page and "style=" not in page and "<style" not in page
    assets = ASSET.findall(page)
    assert {a.split("?")[0] for a in assets} == {
        "dashboard/favicon.svg",
        "dashboard/app.css",
        "dashboard/app.js",
        "dashboard/vendor/uplot/uPlot.min.css",
        "dashboard/vendor/uplot/uPlot.iife.min.js",
    }
    assert all(re.search(r"\?v=[0-9a-f]{16}$", a) for a in assets)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("client.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
        ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
        ("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
    ],
)
def test_assets_are_served_with_their_type_and_headers(
    daemon: tuple[DaemonProcess, Ports], name: str, content_type: str
) -> None:
    _, ports = daemon
    page = request(ports.http, "GET", "/").body.decode()
    local = Path(__file__).resolve().parents[1] / "daemon/agentspoonsd/dashboard/static" / name
    versioned = next((a for a in ASSET.findall(page) if a.startswith(f"dashboard/{name}?")), None)
    plain = request(ports.http, "GET", f"/dashboard/{name}")
    assert plain.status == 200
    assert plain.body == local.read_bytes()
    assert plain.headers["Content-Type"] == content_type
    assert plain.headers["Cache-Control"] == "no-cache"  # unversioned: revalidate
    assert_security_headers(plain, ports)
    if versioned is not None:  # what the page asks for may be cached for good
        cached = request(ports.http, "GET", "/" + versioned)
        assert cached.body == plain.body
        assert cached.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    stale = request(ports.http, "GET", f"/dashboard/{name}?v=0000000000000000")
    assert stale.headers["Cache-Control"] == "no-cache"


def test_client_module_is_served_at_its_public_url_to_any_origin(
    daemon: tuple[DaemonProcess, Ports],
) -> None:
    """/client.js: the browser module, importable by a page of another origin (CORS `*`: the file
    is public and the request carries no credentials), with a JavaScript type (module scripts
    demand one) and a CORP that lets it be loaded cross-origin."""
    _, ports = daemon
    local = Path(__file__).resolve().parents[1] / "daemon/agentspoonsd/dashboard/static/client.js"
    for target in ("/client.js", "/client.js?x=1"):
        reply = request(ports.http, "GET", target)
        assert reply.status == 200
        assert reply.body == local.read_bytes()
        assert reply.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert reply.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Cache-Control"] == "no-cache"  # the stable URL: revalidate
        assert reply.headers.get("Access-Control-Allow-Credentials") is None
    version = Dashboard(PageConfig("ws", 1, None), read_static()).asset_url("client.js")
    pinned = request(ports.http, "GET", "/client.js?" + version.split("?")[1])
    assert pinned.body == local.read_bytes()
    assert pinned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert pinned.headers["Access-Control-Allow-Origin"] == "*"
    head = request(ports.http, "HEAD", "/client.js")
    assert head.status == 200 and head.body == b""
    assert head.headers["Access-Control-Allow-Origin"] == "*"
    # The page's own files stay same-origin only.
    app = request(ports.http, "GET", "/dashboard/app.js")
    assert app.headers.get("Access-Control-Allow-Origin") is None
    assert app.headers["Cross-Origin-Resource-Policy"] == "same-origin"


def test_uplot_licence_is_the_mit_licence(daemon: tuple[DaemonProcess, Ports]) -> None:
    _, ports = daemon
    reply = request(ports.http, "GET", "/dashboard/vendor/uplot/LICENSE")
    assert b"The MIT License" in reply.body and b"Leon Sorokin" in reply.body
    assert b"1.6.32" in request(ports.http, "GET", "/dashboard/vendor/README.md").body


def test_config_names_the_same_origin_websocket_and_the_bound_port(
    daemon: tuple[DaemonProcess, Ports],
) -> None:
    _, ports = daemon
    reply = request(ports.http, "GET", "/dashboard/config.json")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Cache-Control"] == "no-store"
    assert_security_headers(reply, ports)
    config = orjson.loads(reply.body)
    # `ws` under the page's own URL (the HTTP port's /ws); the WebSocket port's own, as bound.
    assert config["websocket"] == {"url": "ws", "scheme": "ws", "port": ports.ws, "path": "/"}
    # The default Origin check: the dashboard's own origins, which the page checks itself against.
    assert f"http://127.0.0.1:{ports.http}" in config["allowed_origins"]
    assert f"http://localhost:{ports.http}" in config["allowed_origins"]


@pytest.mark.parametrize("target", ["/", "/dashboard/app.js", "/dashboard/config.json"])
def test_head_has_the_get_headers_and_no_body(
    daemon: tuple[DaemonProcess, Ports], target: str
) -> None:
    _, ports = daemon
    get = request(ports.http, "GET", target)
    head = request(ports.http, "HEAD", target)
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(get.body))
    for name in ("Content-Type", "Content-Security-Policy", "Cache-Control", "X-Frame-Options"):
        assert head.headers[name] == get.headers[name]


@pytest.mark.parametrize(
    "target",
    [
        "/index.html",
        "/dashboard",
        "/dashboard/",
        "/dashboard/index.html",  # the page is served at / only
        "/dashboard/nope.js",
        "/dashboard/../__init__.py",
        "/dashboard/..%2f__init__.py",
        "/dashboard/%2e%2e/__init__.py",
        "/dashboard/vendor/../app.js",
        "/dashboard//app.js",
        "/dashboard/static/app.js",
        "/dashboard/__init__.py",
        "/dashboard/APP.JS",
        "/dashboard/app.js/",
        "//etc/passwd",
        "/../../etc/passwd",
        "/dashboard/%00",
    ],
)
def test_unknown_paths_are_404_and_never_reach_a_file(
    daemon: tuple[DaemonProcess, Ports], target: str
) -> None:
    _, ports = daemon
    reply = request(ports.http, "GET", target)
    assert reply.status == 404
    assert b"import" not in reply.body and b"root:" not in reply.body


def test_other_methods_are_refused(daemon: tuple[DaemonProcess, Ports]) -> None:
    _, ports = daemon
    reply = request(ports.http, "POST", "/")
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


def test_health_routes_are_unchanged(daemon: tuple[DaemonProcess, Ports]) -> None:
    _, ports = daemon
    assert request(ports.http, "GET", "/healthz").status == 200
    assert request(ports.http, "GET", "/nope").body == b'{"error":"not_found"}'


# --- the pure parts ------------------------------------------------------------------------------


def test_connect_sources_follow_the_allowed_origins() -> None:
    origins = frozenset({"http://127.0.0.1:8766", "https://dash.example.com", "http://[::1]:8766"})
    config = PageConfig("wss", 8765, origins)
    # CSP has no syntax for IPv6 literals: that host is left out rather than break the policy.
    assert config.connect_sources() == [
        "ws://127.0.0.1:8766",  # same origin, the HTTP port's /ws
        "wss://127.0.0.1:8765",  # the WebSocket port
        "wss://dash.example.com",
        "wss://dash.example.com:8765",
    ]
    assert PageConfig("ws", 9000, None).connect_sources() == ["ws://*:9000"]
    assert (
        "connect-src 'self' ws://*:9000;" in PageConfig("ws", 9000, None).content_security_policy()
    )
    # public_url: the page connects there, and only there besides the ports above.
    public = PageConfig("ws", 9000, None, "wss://example.com/market/ws")
    assert public.connect_sources() == ["ws://*:9000", "wss://example.com"]
    assert orjson.loads(public.to_json())["websocket"]["url"] == "wss://example.com/market/ws"


def test_the_page_must_only_name_existing_assets() -> None:
    files = read_static()
    assert {"index.html", "app.js", "app.css", "vendor/uplot/uPlot.iife.min.js"} <= set(files)
    config = PageConfig("ws", 1, None)
    Dashboard(config, files)  # the shipped page is consistent
    broken = {**files, "index.html": b'<script src="/dashboard/missing.js"></script>'}
    with pytest.raises(ValueError, match=r"missing\.js"):
        Dashboard(config, broken)
    with pytest.raises(ValueError, match=r"index\.html"):
        Dashboard(config, {"app.js": b""})
    without_module = {name: body for name, body in files.items() if name != "client.js"}
    with pytest.raises(ValueError, match=r"client\.js"):
        Dashboard(config, without_module)
