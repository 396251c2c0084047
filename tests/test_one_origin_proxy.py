"""One origin behind a real nginx and a real Caddy: docs/SCALING.md's configurations, as written
(ports and certificate paths aside), in front of a real daemon on loopback, TLS at the proxy with a
throwaway CA (trustme).

build/ensure-nginx.sh and build/ensure-caddy.sh install Debian's packages when missing; the test
runs its own proxy (foreground, files in a temporary directory), never a system service.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import ConnectionRejected, open_websocket_url

from daemon_process import DaemonProcess, config_text, new_token
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
NGINX = Path("/usr/sbin/nginx")
CADDY = Path("/usr/bin/caddy")
TIMEOUT = 10.0


def documented(language: str) -> str:
    """The `language` block of docs/SCALING.md's "One origin" section, verbatim."""
    text = (ROOT / "docs" / "SCALING.md").read_text()
    section = text.split("## One origin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, f"the One origin section has one {language} example"
    return blocks[0]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the documented config no longer has {old!r}"
    return text.replace(old, new)


class Nginx:
    def __init__(self, directory: Path, site: str, port: int) -> None:
        self.directory = directory
        self.port = port
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (directory / name).mkdir()
        temp = "".join(
            f"    {n}_temp_path {directory / n};\n" for n in ("proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {directory / 'nginx.pid'};\n"
            f"error_log {directory / 'error.log'} info;\nevents {{}}\n"
            f"http {{\n    access_log {directory / 'access.log'};\n"
            f"    client_body_temp_path {directory / 'client_body'};\n{temp}"
            f"{site}\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.directory / "nginx.conf"
        args = [str(NGINX), "-p", str(self.directory), "-e", str(self.directory / "error.log")]
        check = subprocess.run([*args, "-t", "-c", str(conf)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode()
        self.proc = subprocess.Popen([*args, "-c", str(conf)])
        wait_listening(self.proc, self.port, self.directory / "error.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Caddy:
    """caddy run on the documented Caddyfile: no admin endpoint, its data in `directory`."""

    def __init__(self, directory: Path, site: str, port: int) -> None:
        self.directory = directory
        self.port = port
        (directory / "Caddyfile").write_text("{\n    admin off\n    auto_https off\n}\n" + site)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            "HOME": str(self.directory),
            "XDG_DATA_HOME": str(self.directory / "data"),
            "XDG_CONFIG_HOME": str(self.directory / "config"),
            "PATH": "/usr/bin:/bin",
        }
        log = (self.directory / "caddy.log").open("wb")
        self.proc = subprocess.Popen(
            [str(CADDY), "run", "--adapter", "caddyfile", "--config", "Caddyfile"],
            cwd=self.directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.proc, self.port, self.directory / "caddy.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
    raise AssertionError(f"the proxy did not listen:\n{log.read_text()}")


def nginx_site(site: str, proxy_port: int, http_port: int, cert: Path, key: Path) -> str:
    site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;")
    site = replace_once(site, "server 127.0.0.1:8766;", f"server 127.0.0.1:{http_port};")
    site = replace_once(site, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    return replace_once(site, "/etc/letsencrypt/live/example.com/privkey.pem", str(key))


def caddy_site(site: str, proxy_port: int, http_port: int, cert: Path, key: Path) -> str:
    # The documented site gets its certificate from Let's Encrypt; here, from the test's CA.
    site = replace_once(
        site, "example.com {\n", f"https://127.0.0.1:{proxy_port} {{\n    tls {cert} {key}\n"
    )
    upstream = f"reverse_proxy 127.0.0.1:{http_port}"
    return replace_once(site, "reverse_proxy 127.0.0.1:8766", upstream)


PROXIES = {
    "nginx": (NGINX, "ensure-nginx.sh", nginx_site, Nginx),
    "caddy": (CADDY, "ensure-caddy.sh", caddy_site, Caddy),
}


@pytest.fixture(params=sorted(PROXIES))
def one_origin(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[int, str, trustme.CA]]:
    """A daemon configured as documented, behind a proxy configured as documented: the proxy's
    port, the daemon's token and the CA the proxy's certificate comes from."""
    binary, ensure, make_site, proxy_class = PROXIES[request.param]
    subprocess.run(["sh", str(ROOT / "build" / ensure)], check=True, timeout=300)
    assert binary.exists()
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    http_port, proxy_port = free_port(), free_port()
    public = f"https://127.0.0.1:{proxy_port}/market/"

    token = new_token()
    keys = replace_once(documented("toml"), "https://example.com/market/", public)
    keys = replace_once(keys, "port = 8766", f"port = {http_port}")
    server, health = keys.split("[health]\n")
    text = config_text(tokens={"t": token})
    text = replace_once(text, '[server]\nhost = "127.0.0.1"\n', server)
    text = replace_once(text, '[health]\nhost = "127.0.0.1"\nport = 0\n', "[health]\n" + health)
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(text)
    daemon = DaemonProcess(config)

    site = make_site(documented(request.param), proxy_port, http_port, cert, key)
    proxy_dir = tmp_path / request.param
    proxy_dir.mkdir()
    proxy = proxy_class(proxy_dir, site, proxy_port)
    daemon.start()
    try:
        proxy.start()
        yield proxy_port, token, ca
    finally:
        proxy.stop()
        daemon.kill()


def https_get(port: int, path: str, ca: trustme.CA) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    deadline = time.monotonic() + TIMEOUT
    while True:  # the daemon may still be starting: nginx answers 502 until it listens
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}{path}", timeout=5, context=context
            ) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as error:
            if error.code != 502 or time.monotonic() > deadline:
                return error.code, dict(error.headers), error.read()
            time.sleep(0.1)


async def test_the_proxy_serves_the_dashboard_and_the_stream_on_one_tls_origin(
    one_origin: tuple[int, str, trustme.CA],
) -> None:
    port, token, ca = one_origin
    origin = f"https://127.0.0.1:{port}"
    status, _, page = await trio.to_thread.run_sync(https_get, port, "/market/", ca)
    assert status == 200 and b"<html" in page.lower()
    # The page's assets are relative: under /market/ they resolve to the daemon's, via nginx.
    asset = re.search(rb'src="(dashboard/app\.js\?v=[0-9a-f]+)"', page)
    assert asset is not None
    status, _, script = await trio.to_thread.run_sync(
        https_get, port, "/market/" + asset[1].decode(), ca
    )
    assert status == 200 and b"WebSocket" in script
    status, _, body = await trio.to_thread.run_sync(
        https_get, port, "/market/dashboard/config.json", ca
    )
    config = json.loads(body)
    assert config["websocket"]["url"] == f"wss://127.0.0.1:{port}/market/ws"
    assert origin in config["allowed_origins"]
    status, _, _ = await trio.to_thread.run_sync(https_get, port, "/market/metrics", ca)
    assert status == 404

    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"{config['websocket']['url']}?access_token={token}"
    headers = [(b"Origin", origin.encode())]  # what a browser on the page sends
    async with open_websocket_url(url, context, extra_headers=headers) as ws:
        with trio.fail_after(TIMEOUT):
            assert json.loads(await ws.get_message())["type"] == "connected"
            while json.loads(await ws.get_message())["type"] != "volatility_update":
                pass
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(f"wss://127.0.0.1:{port}/market/ws", context):
            pass
    assert rejected.value.status_code == 401  # the daemon's answer, through the proxy
    # Without the trailing slash: redirected to the page, not a 404 or the daemon's root.
    status, _, page_again = await trio.to_thread.run_sync(https_get, port, "/market", ca)
    assert status == 200 and page_again == page
