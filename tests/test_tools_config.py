"""`watch` and `probe` find the daemon: URL argument > $AGENTSPOONSD_URL > the config > default.

The URL a config implies (`server_url`) and the precedence (`resolve_target`) are tested without
sockets; then `agentspoonsd watch|probe` run as subprocesses against the real daemon, finding it
through `--config`, `$AGENTSPOONSD_CONFIG`, `./agentspoonsd.toml` and the environment overrides,
over ws:// and over wss:// with a self-signed certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from agentspoonsd.settings import DEFAULT_SEARCH_PATHS, ConfigError, ServerSettings
from agentspoonsd.tools import DEFAULT_URL, Target, resolve_target, server_url, untrusted_hint
from daemon_process import DaemonProcess, config_text, new_token
from test_tools import free_port

Factory = Callable[..., DaemonProcess]


# --- server_url: the [server] settings -> the URL to connect to -----------------------------


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("0.0.0.0", 8765, "ws://127.0.0.1:8765/"),  # a wildcard bind: connect to loopback
        ("", 9000, "ws://127.0.0.1:9000/"),  # "" binds every IPv4 address too
        ("::", 9001, "ws://[::1]:9001/"),
        ("0:0::0", 9002, "ws://[::1]:9002/"),  # the same wildcard, spelt otherwise
        ("127.0.0.1", 1, "ws://127.0.0.1:1/"),
        ("10.1.2.3", 65535, "ws://10.1.2.3:65535/"),
        ("::1", 8765, "ws://[::1]:8765/"),  # an IPv6 literal needs brackets in a URL
        ("fd00::5", 8765, "ws://[fd00::5]:8765/"),
        ("daemon.example", 443, "ws://daemon.example:443/"),
        ("localhost", 8765, "ws://localhost:8765/"),
    ],
)
def test_server_url_connects_where_the_daemon_listens(host: str, port: int, url: str) -> None:
    assert server_url(ServerSettings(host=host, port=port)) == url


def test_server_url_defaults_are_the_builtin_default() -> None:
    assert server_url(ServerSettings()) == DEFAULT_URL == "ws://127.0.0.1:8765/"


def test_server_url_is_wss_when_tls_is_configured() -> None:
    server = ServerSettings(
        host="::", port=8443, tls_cert=Path("/x/tls.crt"), tls_key=Path("/x/tls.key")
    )
    assert server_url(server) == "wss://[::1]:8443/"


def test_server_url_refuses_port_zero() -> None:
    with pytest.raises(ValueError, match=r"server\.port is 0") as raised:
        server_url(ServerSettings(port=0))
    assert "URL" in str(raised.value)  # and says what to do instead


# --- resolve_target: which source wins --------------------------------------------------------


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AGENTSPOONSD_* variable from the caller's shell, and no ./agentspoonsd.toml."""
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    if any(path.exists() for path in DEFAULT_SEARCH_PATHS):
        pytest.skip("a system-wide agentspoonsd.toml exists here")
    return tmp_path


def write(directory: Path, text: str, name: str = "agentspoonsd.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_precedence(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_target(None, None) == Target(DEFAULT_URL, "built-in defaults")

    write(clean, "[server]\nport = 7001\n")  # ./agentspoonsd.toml, named as the search found it
    assert resolve_target(None, None) == Target("ws://127.0.0.1:7001/", "agentspoonsd.toml")

    from_env = write(clean, "[server]\nport = 7002\n", "env.toml")
    monkeypatch.setenv("AGENTSPOONSD_CONFIG", str(from_env))
    assert resolve_target(None, None) == Target("ws://127.0.0.1:7002/", str(from_env))

    explicit = write(clean, '[server]\nhost = "::"\nport = 7003\n', "explicit.toml")
    assert resolve_target(None, str(explicit)) == Target("ws://[::1]:7003/", str(explicit))

    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "7004")  # overrides whichever file
    assert resolve_target(None, str(explicit)).url == "ws://[::1]:7004/"

    monkeypatch.setenv("AGENTSPOONSD_URL", "wss://daemon.example/")
    assert resolve_target(None, str(explicit)) == Target(
        "wss://daemon.example/", "$AGENTSPOONSD_URL"
    )
    assert resolve_target("ws://10.0.0.1:1/", str(explicit)) == Target(
        "ws://10.0.0.1:1/", "argument"
    )


def test_env_overrides_apply_without_a_file(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "9100")
    monkeypatch.setenv("AGENTSPOONSD_SERVER__HOST", "127.0.0.2")
    assert resolve_target(None, None) == Target("ws://127.0.0.2:9100/", "built-in defaults")


def test_empty_url_variable_is_unset(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_URL", "")
    assert resolve_target(None, None).url == DEFAULT_URL


def test_client_variables_are_not_unknown_config_keys(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token and URL variables are the clients': one shell exports them and reads the
    config (the daemon's own check of AGENTSPOONSD_* names must not call them typos)."""
    from agentspoonsd.settings import load_settings

    monkeypatch.setenv("AGENTSPOONSD_TOKEN", "secret")
    config = write(clean, "[server]\nport = 7005\n")
    assert resolve_target(None, str(config)).url == "ws://127.0.0.1:7005/"
    assert load_settings(config).server.port == 7005
    monkeypatch.setenv("AGENTSPOONSD_URL", "ws://127.0.0.1:7006/")
    assert load_settings(config).server.port == 7005


def test_a_url_needs_no_config(clean: Path) -> None:
    """With a URL, the config is not read: a broken one does not stand in the way."""
    broken = write(clean, "[server]\nport = 'x'\n")
    assert resolve_target("ws://127.0.0.1:1/", str(broken)).source == "argument"
    assert resolve_target("ws://127.0.0.1:1/", None).source == "argument"


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port: Input should be a valid integer"),
        ("[server]\nprot = 1\n", {}, "server.prot: unknown key"),
        ("[server]\nport = 0\n", {}, "server.port is 0"),
        ("", {"AGENTSPOONSD_SERVER__PORT": "0"}, "server.port is 0"),
        ("", {"AGENTSPOONSD_SERVER__PROT": "1"}, "AGENTSPOONSD_SERVER__PROT: no key"),
        ("[server\n", {}, "agentspoonsd.toml"),
    ],
)
def test_bad_config_names_the_key_and_its_source(
    clean: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], problem: str
) -> None:
    config = write(clean, text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        resolve_target(None, str(config))
    message = str(raised.value)
    assert problem in message
    assert next(iter(env), str(config)) in message  # the file, or the variable that set it


def test_missing_explicit_config(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        resolve_target(None, str(clean / "nope.toml"))
    monkeypatch.setenv("AGENTSPOONSD_CONFIG", str(clean / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml: config file not found"):
        resolve_target(None, None)


def test_tls_config_is_wss_without_reading_the_key(clean: Path) -> None:
    """A client may read the config but not the daemon's key (or even its certificate)."""
    config = write(
        clean,
        '[server]\nport = 7443\ntls_cert = "certs/tls.crt"\ntls_key = "/root/none/tls.key"\n',
    )
    target = resolve_target(None, str(config))
    assert target == Target("wss://127.0.0.1:7443/", str(config), clean / "certs" / "tls.crt")


# --- the hint when the daemon's certificate is not trusted -------------------------------------


def self_signed(directory: Path, name: str = "tls") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (as `openssl req -x509` makes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentspoonsd test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_untrusted_hint(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    trustme = pytest.importorskip("trustme")
    cert, _ = self_signed(tmp_path)
    config = str(tmp_path / "c.toml")
    hint = untrusted_hint(Target("wss://127.0.0.1:1/", config, cert))
    assert hint is not None and f"--cafile {cert}" in hint and "self-signed" in hint

    leaf = tmp_path / "leaf.crt"  # issued by a CA: that CA is what to trust, not the leaf
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(leaf))
    hint = untrusted_hint(Target("wss://127.0.0.1:1/", config, leaf))
    assert hint is not None and "self-signed" not in hint and "--cafile" in hint
    assert str(leaf) in hint

    missing = untrusted_hint(Target("wss://127.0.0.1:1/", config, tmp_path / "none.crt"))
    assert missing is not None and "--cafile" in missing
    assert untrusted_hint(Target("wss://127.0.0.1:1/", "argument")) is None


# --- the commands, against the real daemon --------------------------------------------------


# daemon_factory: conftest.py


def tool_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    return {**env, **variables}


async def run_tool(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "agentspoonsd", *args],
            env=env,
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def with_port(text: str, port: int, host: str = "0.0.0.0") -> str:
    """The daemon's config as a client sees it: the port it listens on, and a wildcard host
    (the usual bind), which the tools must turn into loopback."""
    listener = 'host = "127.0.0.1"\nport = 0\n'  # config_text's [server], the first
    assert listener in text
    return text.replace(listener, f'host = "{host}"\nport = {port}\n', 1)


async def test_watch_and_probe_find_the_daemon(daemon_factory: Factory, tmp_path: Path) -> None:
    token = new_token()
    text = config_text(tokens={"t": token}, interval=0.05)
    daemon = daemon_factory(text)
    port, _ = await daemon.ports()
    assert port != 8765
    config = write(tmp_path, with_port(text, port), "client.toml")
    dead_port = free_port()
    dead = write(tmp_path, with_port(text, dead_port), "dead.toml")
    away = tmp_path / "elsewhere"  # no ./agentspoonsd.toml here
    away.mkdir()
    env = tool_env(AGENTSPOONSD_TOKEN=token)

    # --config: a non-default port, and 0.0.0.0 as the host.
    code, out, err = await run_tool(
        "watch", "--config", str(config), "--json", "--count", "1", env=env, cwd=away
    )
    assert code == 0, err
    assert json.loads(out)["symbol"] in ("BTC/USD", "ETH/USD")
    assert f"ws://127.0.0.1:{port}/" in err  # "connected to ..."

    # $AGENTSPOONSD_CONFIG, for probe.
    code, out, err = await run_tool(
        "probe", env={**env, "AGENTSPOONSD_CONFIG": str(config)}, cwd=away
    )
    assert code == 0 and out.startswith("ok "), err

    # ./agentspoonsd.toml, the search's first default location.
    local = tmp_path / "local"
    local.mkdir()
    write(local, with_port(text, port))
    code, out, err = await run_tool("watch", "--count", "1", env=env, cwd=local)
    assert code == 0 and len(out.splitlines()) == 2, err  # the header and one row

    # The config's port is the one tried: refused at the dead port, not at 8765.
    code, out, err = await run_tool(
        "probe", "--config", str(dead), "--timeout", "3", env=env, cwd=away
    )
    assert code == 69 and f"connection refused: ws://127.0.0.1:{dead_port}/" in err, err
    assert str(dead) in err  # and it says where the URL came from

    # The environment override beats the file's port.
    code, out, err = await run_tool(
        "probe",
        "--config",
        str(dead),
        env={**env, "AGENTSPOONSD_SERVER__PORT": str(port)},
        cwd=away,
    )
    assert code == 0, err

    # $AGENTSPOONSD_URL beats the config; the URL argument beats $AGENTSPOONSD_URL.
    live_url, dead_url = f"ws://127.0.0.1:{port}/", f"ws://127.0.0.1:{dead_port}/"
    code, out, err = await run_tool(
        "probe", "--config", str(dead), env={**env, "AGENTSPOONSD_URL": live_url}, cwd=away
    )
    assert code == 0, err
    code, out, err = await run_tool(
        "watch", live_url, "--count", "1", env={**env, "AGENTSPOONSD_URL": dead_url}, cwd=away
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port: Input should be a valid integer"),
        ("[server]\nport = 0\n", {}, "server.port is 0"),
        ("", {"AGENTSPOONSD_SERVER__PORT": "0"}, "server.port is 0"),
        ("[generator]\ninterval = -1\n", {}, "generator.interval"),
    ],
)
@pytest.mark.parametrize("command", ["watch", "probe"])
async def test_bad_config_exits_78_with_one_line(
    tmp_path: Path, command: str, text: str, env: dict[str, str], problem: str
) -> None:
    config = write(tmp_path, text)
    code, out, err = await run_tool(
        command, "--config", str(config), env=tool_env(**env), cwd=tmp_path
    )
    assert (code, out) == (78, ""), err
    assert err.startswith(f"{command}: ") and err.count("\n") == 1 and problem in err
    assert (next(iter(env)) if env else str(config)) in err


async def test_tls_config_and_its_self_signed_certificate(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)
    token = new_token()
    tls = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    text = config_text(tokens={"t": token}, interval=0.05).replace("[server]\n", tls, 1)
    daemon = daemon_factory(text)
    port, _ = await daemon.ports()
    # The client's copy names a key it cannot read: only the certificate's presence matters.
    client_text = with_port(text, port).replace(str(key), str(tmp_path / "unreadable.key"))
    config = write(tmp_path, client_text, "client.toml")
    env = tool_env(AGENTSPOONSD_TOKEN=token)

    code, out, err = await run_tool(
        "watch",
        "--config",
        str(config),
        "--cafile",
        str(cert),
        "--count",
        "1",
        "--json",
        env=env,
        cwd=tmp_path,
    )
    assert code == 0 and json.loads(out)["seq"] > 0, err
    assert f"wss://127.0.0.1:{port}/" in err

    # Not trusted by the system: the one line says so, and how to trust it.
    code, out, err = await run_tool(
        "probe", "--config", str(config), "--timeout", "5", env=env, cwd=tmp_path
    )
    assert code == 69 and "CERTIFICATE_VERIFY_FAILED" in err and err.count("\n") == 1, err
    assert f"--cafile {cert}" in err and "self-signed" in err
    code, out, err = await run_tool(
        "probe", "--config", str(config), "--cafile", str(cert), env=env, cwd=tmp_path
    )
    assert code == 0 and out.startswith("ok "), err

    # watch keeps retrying (the daemon may get a trusted certificate), with the same advice.
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "agentspoonsd", "watch", "--config", str(config)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        said = b""
        while b"--cafile" not in said:
            chunk = await process.stderr.receive_some()
            assert chunk, said
            said += chunk
        process.terminate()
        await process.wait()
        await process.stderr.aclose()
    assert f"--cafile {cert}".encode() in said
