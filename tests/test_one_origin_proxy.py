"""One origin behind a real nginx: docs/SCALING.md's configuration, as written, in front of a real
daemon on loopback, TLS at nginx with a throwaway CA (trustme).

build/ensure-nginx.sh installs Debian's nginx when it is missing; the test runs its own nginx
(foreground, files in a temporary directory), never a system service.
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

ROOT = Path(__file__).resolve().parents[1]
NGINX = Path("/usr/sbin/nginx")
TIMEOUT = 10.0


def documented_nginx_config() -> str:
    """The nginx block of docs/SCALING.md's "One origin" section, verbatim."""
    text = (ROOT / "docs" / "SCALING.md").read_text()
    section = text.split("## One origin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```nginx\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the One origin section has one nginx example"
    return blocks[0]


def documented_daemon_keys() -> str:
    text = (ROOT / "docs" / "SCALING.md").read_text()
    section = text.split("## One origin", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    return block


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the documented config no longer has {old!r}"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def nginx_binary() -> Path:
    subprocess.run(["sh", str(ROOT / "build" / "ensure-nginx.sh")], check=True, timeout=300)
    return NGINX


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

    def start(self, binary: Path) -> None:
        conf = self.directory / "nginx.conf"
        args = [str(binary), "-p", str(self.directory), "-e", str(self.directory / "error.log")]
        check = subprocess.run([*args, "-t", "-c", str(conf)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode()
        self.proc = subprocess.Popen([*args, "-c", str(conf)])
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, (self.directory / "error.log").read_text()
                time.sleep(0.05)
        raise AssertionError("nginx did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def one_origin(tmp_path: Path, nginx_binary: Path) -> Iterator[tuple[int, str, trustme.CA]]:
    """A daemon configured as documented, behind nginx configured as documented: the nginx
    port, the daemon's token and the CA nginx's certificate comes from."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    http_port, proxy_port = free_port(), free_port()
    public = f"https://127.0.0.1:{proxy_port}/market/"

    token = new_token()
    keys = replace_once(documented_daemon_keys(), "https://example.com/market/", public)
    keys = replace_once(keys, "port = 8766", f"port = {http_port}")
    server, health = keys.split("[health]\n")
    text = config_text(tokens={"t": token})
    text = replace_once(text, '[server]\nhost = "127.0.0.1"\n', server)
    text = replace_once(text, '[health]\nhost = "127.0.0.1"\nport = 0\n', "[health]\n" + health)
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(text)
    daemon = DaemonProcess(config)

    site = documented_nginx_config()
    site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;")
    site = replace_once(site, "server 127.0.0.1:8766;", f"server 127.0.0.1:{http_port};")
    site = replace_once(site, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    site = replace_once(site, "/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    nginx = Nginx(proxy_dir, site, proxy_port)
    daemon.start()
    try:
        nginx.start(nginx_binary)
        yield proxy_port, token, ca
    finally:
        nginx.stop()
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


async def test_nginx_serves_the_dashboard_and_the_stream_on_one_tls_origin(
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
    assert rejected.value.status_code == 401  # the daemon's answer, through nginx
