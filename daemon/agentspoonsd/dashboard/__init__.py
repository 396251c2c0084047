"""The live dashboard: a static page at `/` of the HTTP port. Pure: a target in, a response out.

The page (``static/``: HTML, JS, CSS and the vendored uPlot) is read from the package once, when the
daemon starts; a request never touches the file system. A path is served only when it is a key of
that table (`/` for the page, `/dashboard/NAME` for the rest), so no request can name another file.

The page finds the WebSocket through `/dashboard/config.json`: by default `ws`, resolved against the
page's own URL (the HTTP port serves the WebSocket at `/ws`, so behind a reverse proxy that serves
the page at `https://example.com/market/` it connects to `wss://example.com/market/ws`); with
`[server] public_url`, that URL's `ws`. The page refers to its assets, its config and /healthz
by relative URLs for the same reason. The config also gives the WebSocket port's own scheme and
port, and the origins allowed to connect.

The browser module (`static/client.js`: connect, reconnect, resume; docs/CLIENT.md) is also
served at `/client.js`, for pages of any origin: `Access-Control-Allow-Origin: *` (module scripts
are fetched with CORS; the file is public and the same for everyone, and the request carries no
credentials, so `*` exposes nothing) and `Cross-Origin-Resource-Policy: cross-origin`. The page's
own files stay same-origin.

Every response carries the same security headers: a Content-Security-Policy that allows the page's
own files and its WebSocket and nothing else (no inline script or style, no framing, no form
submission), nosniff, no referrer. Assets are referenced from the page as `NAME?v=DIGEST`, so they
may be cached for good; the page itself and its config are revalidated on every load.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson

from ..httpmessages import HttpResponse
from ..httppolicy import WEBSOCKET_PATH

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "CLIENT_PATH",
    "CONFIG_PATH",
    "PAGE_PATH",
    "Dashboard",
    "PageConfig",
    "load_dashboard",
    "read_static",
]

PAGE_PATH = "/"
ASSET_PREFIX = "/dashboard/"
CONFIG_PATH = ASSET_PREFIX + "config.json"
INDEX = "index.html"
CLIENT_MODULE = "client.js"  # the browser module: the page's connection code, and public
CLIENT_PATH = "/" + CLIENT_MODULE

CACHE_PAGE = "no-cache"  # revalidate: a new daemon version must bring its new page at once
CACHE_CONFIG = "no-store"
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"  # only when ?v= matches the content
_VERSION_LENGTH = 16

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
}
_TEXT = "text/plain; charset=utf-8"
# src="/dashboard/NAME" or href="/dashboard/NAME" in the page: rewritten to carry ?v=DIGEST.
_ASSET_REFERENCE = re.compile(r'(?P<attr>src|href)="/dashboard/(?P<name>[^"?#]+)"')


@dataclass(frozen=True, slots=True)
class PageConfig:
    """What the page needs to reach the WebSocket: from the settings and the bound listener."""

    ws_scheme: Literal["ws", "wss"]  # of the WebSocket port
    ws_port: int
    allowed_origins: frozenset[str] | None  # as the WebSocket server checks Origin; None: any
    # What the page connects to, resolved against its own URL: relative (same origin, the HTTP
    # port's /ws) unless `[server] public_url` makes it absolute.
    websocket_url: str = WEBSOCKET_PATH

    def to_json(self) -> bytes:
        origins = None if self.allowed_origins is None else sorted(self.allowed_origins)
        body: dict[str, Any] = {
            "websocket": {
                "url": self.websocket_url,
                "scheme": self.ws_scheme,
                "port": self.ws_port,
                "path": "/",
            },
            "allowed_origins": origins,
        }
        return orjson.dumps(body)

    def connect_sources(self) -> list[str]:
        """CSP sources for the WebSocket the page connects to, same origin or absolute.

        Same origin: each origin the WebSocket server accepts (only those can connect at all),
        its scheme made ws/wss (CSP Level 3's 'self' means the same, but not in every browser).
        Absolute: that URL's origin. Then the WebSocket port on each of those hosts, for a page
        built to connect there. CSP has no syntax for IPv6 literals: a page loaded from `[::1]`
        is refused by the browser (and says so).
        """
        sources = set()
        absolute = urlsplit(self.websocket_url)
        if absolute.scheme:
            sources.add(f"{absolute.scheme}://{absolute.netloc}")
        if self.allowed_origins is None:
            return sorted(sources | {f"{self.ws_scheme}://*:{self.ws_port}"})
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            host = parts.hostname
            if not host or not re.fullmatch(r"[A-Za-z0-9.-]+", host):
                continue
            same = {"http": "ws", "https": "wss"}.get(parts.scheme)
            if same is not None:
                sources.add(f"{same}://{parts.netloc}")
            sources.add(f"{self.ws_scheme}://{host}:{self.ws_port}")
        return sorted(sources)

    def content_security_policy(self) -> str:
        connect = " ".join(["'self'", *self.connect_sources()])
        return "; ".join(
            [
                "default-src 'none'",
                "script-src 'self'",
                "style-src 'self'",
                "img-src 'self'",
                f"connect-src {connect}",
                "base-uri 'none'",
                "form-action 'none'",  # the token form is handled by script, never submitted
                "frame-ancestors 'none'",
            ]
        )


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    version: str


class Dashboard:
    """The dashboard's routes over files read beforehand (`read_static`)."""

    def __init__(self, config: PageConfig, files: Mapping[str, bytes]) -> None:
        for required in (INDEX, CLIENT_MODULE):
            if required not in files:
                raise ValueError(f"the dashboard has no {required}")
        self._assets = {
            name: _Asset(body, _content_type(name), _digest(body))
            for name, body in files.items()
            if name != INDEX
        }
        self._page = self._versioned_page(files[INDEX])
        self._config = config.to_json()
        csp = config.content_security_policy()
        self._security = (
            ("Content-Security-Policy", csp),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),  # frame-ancestors for browsers that predate it
            ("Cross-Origin-Opener-Policy", "same-origin"),
            ("Cross-Origin-Resource-Policy", "same-origin"),
        )
        self._public = (
            *(header for header in self._security if header[0] != "Cross-Origin-Resource-Policy"),
            ("Cross-Origin-Resource-Policy", "cross-origin"),
            ("Access-Control-Allow-Origin", "*"),
        )

    @property
    def asset_names(self) -> list[str]:
        return sorted(self._assets)

    def asset_url(self, name: str) -> str:
        """The URL the page uses for asset `name` (with its content digest)."""
        return f"{ASSET_PREFIX}{name}?v={self._assets[name].version}"

    def response(self, target: str) -> HttpResponse | None:
        """The answer for `target` (path and query), or None when it is not a dashboard path.

        Any path under /dashboard/ is the dashboard's: an unknown one is a 404 with its headers.
        """
        parts = urlsplit(target)
        if parts.path == PAGE_PATH:
            return self._respond(self._page, _CONTENT_TYPES[".html"], CACHE_PAGE)
        if parts.path == CONFIG_PATH:
            return self._respond(self._config, _CONTENT_TYPES[".json"], CACHE_CONFIG)
        if parts.path == CLIENT_PATH:
            return self._asset(self._assets[CLIENT_MODULE], parts.query, self._public)
        if not parts.path.startswith(ASSET_PREFIX):
            return None
        asset = self._assets.get(parts.path[len(ASSET_PREFIX) :])
        if asset is None:
            return self.not_found()
        return self._asset(asset, parts.query, self._security)

    def not_found(self) -> HttpResponse:
        """A 404 with the dashboard's headers (for unknown paths under /dashboard/)."""
        return self._respond(b"Not Found\n", _TEXT, CACHE_CONFIG, status=404)

    def _asset(
        self, asset: _Asset, query: str, headers: tuple[tuple[str, str], ...]
    ) -> HttpResponse:
        # Cached for good only when ?v= names this very content; otherwise revalidated.
        versioned = parse_qs(query).get("v") == [asset.version]
        cache = CACHE_IMMUTABLE if versioned else CACHE_PAGE
        return self._respond(asset.body, asset.content_type, cache, headers=headers)

    def _respond(
        self,
        body: bytes,
        content_type: str,
        cache: str,
        status: int = 200,
        headers: tuple[tuple[str, str], ...] | None = None,
    ) -> HttpResponse:
        base = self._security if headers is None else headers
        return HttpResponse(status, body, content_type, (*base, ("Cache-Control", cache)))

    def _versioned_page(self, page: bytes) -> bytes:
        def versioned(match: re.Match[str]) -> str:
            name = match["name"]
            if name not in self._assets:
                raise ValueError(f"{INDEX} refers to a missing asset: {name}")
            # Relative to the page: right under a proxy that serves the page below its root.
            return f'{match["attr"]}="{self.asset_url(name).removeprefix("/")}"'

        return _ASSET_REFERENCE.sub(versioned, page.decode("utf-8")).encode("utf-8")


def read_static(root: Traversable | None = None) -> dict[str, bytes]:
    """Every file of the dashboard, by its path relative to `static/` (e.g. `vendor/x/y.js`).

    Raises OSError when the package's files cannot be read (a broken installation).
    """
    base = root if root is not None else resources.files(__package__).joinpath("static")
    return {name: entry.read_bytes() for name, entry in _walk(base, "")}


def load_dashboard(config: PageConfig, log: FilteringBoundLogger) -> Dashboard | None:
    """The dashboard, or None (logged as `dashboard_unavailable`) when its files are missing:
    a broken installation must not stop the stream, only the page."""
    try:
        return Dashboard(config, read_static())
    except (OSError, ValueError) as exc:
        log.error("dashboard_unavailable", error=str(exc))
        return None


def _walk(entry: Traversable, prefix: str) -> Iterator[tuple[str, Traversable]]:
    for child in entry.iterdir():
        name = prefix + child.name
        if child.is_dir():
            yield from _walk(child, name + "/")
        elif not child.name.startswith("."):
            yield name, child


def _content_type(name: str) -> str:
    suffix = name[name.rfind(".") :] if "." in name.rpartition("/")[2] else ""
    return _CONTENT_TYPES.get(suffix, _TEXT)


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:_VERSION_LENGTH]
