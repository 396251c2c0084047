"""systemd/: the units pass `systemd-analyze verify`, rate 2.0 or better in `systemd-analyze
security --offline=yes`, agree with the daemon's defaults; the seccomp policy the tests run the
frozen binary under really is the unit's; and activation adopts sockets passed as systemd does.

No running systemd is needed: the tools work offline. build/ensure-systemd.sh installs Debian's
systemd package first when systemd-analyze is missing (as root, which CI and fresh machines are).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentspoonsd.activation import inherited_sockets, listen_fds
from agentspoonsd.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
SERVICE = UNITS / "agentspoonsd.service"
SOCKET = UNITS / "agentspoonsd.socket"
SANDBOX = ROOT / "build" / "unit_sandbox.py"
MAX_EXPOSURE = 2.0


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """The path of systemd-analyze, installed from Debian's packages if missing. Never skipped."""
    subprocess.run(["sh", str(ROOT / "build" / "ensure-systemd.sh")], check=True)
    path = shutil.which("systemd-analyze")
    assert path is not None
    return path


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (systemd allows repeated keys)."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(path) if s == section and k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= set {len(found)} times"
    return found[0]


def verify_root(root: Path, executable: Path) -> Path:
    """An offline root for `verify --root`: the host's unit library (targets), /bin/kill, the
    units under etc/systemd/system and `executable` as /usr/local/bin/agentspoonsd."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/kill", root / "bin" / "kill")
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy2(executable, root / "usr/local/bin" / "agentspoonsd")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (SERVICE, SOCKET):
        shutil.copy2(unit, units / unit.name)
    return root


def verify(analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    units = root / "etc/systemd/system"
    return subprocess.run(
        [
            analyze,
            "verify",
            f"--root={root}",
            "--man=no",
            str(units / SERVICE.name),
            str(units / SOCKET.name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- systemd-analyze -----------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    # The daemon's real entry point stands in for the frozen binary (test_install verifies the
    # installed tree with the frozen one).
    executable = Path(sys.executable).parent / "agentspoonsd"
    root = verify_root(tmp_path / "root", executable)
    result = verify(systemd_analyze, root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # not even a warning


def test_verify_really_checks(systemd_analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a missing ExecStart= binary and an unknown key are reported."""
    root = verify_root(tmp_path / "root", Path(sys.executable).parent / "agentspoonsd")
    (root / "usr/local/bin/agentspoonsd").unlink()
    result = verify(systemd_analyze, root)
    assert result.returncode != 0 and "agentspoonsd" in result.stderr

    root = verify_root(tmp_path / "root2", Path(sys.executable).parent / "agentspoonsd")
    unit = root / "etc/systemd/system" / SERVICE.name
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=5\n"))
    assert "Unknown key" in verify(systemd_analyze, root).stderr


def test_security_exposure_is_two_or_better(systemd_analyze: str) -> None:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for agentspoonsd\.service: (\d+\.\d+)", result.stdout
    )
    assert match, result.stdout
    exposure = float(match.group(1))
    print(f"systemd-analyze security --offline=yes: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout
    # --threshold makes systemd-analyze itself fail above 2.0 (it counts in tenths).
    strict = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=20", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert strict.returncode == 0


# --- what the unit says, and that it matches the daemon ------------------------------------------


def test_service_lifecycle_fits_a_one_file_notify_daemon() -> None:
    s = "Service"
    assert one(SERVICE, s, "Type") == "notify"
    # The bootloader is the main PID; the daemon (its child) sends the notifications.
    assert one(SERVICE, s, "NotifyAccess") == "all"
    assert one(SERVICE, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(SERVICE, s, "Restart") == "on-failure"
    assert "78" in one(SERVICE, s, "RestartPreventExitStatus").split()  # EX_CONFIG: don't loop
    assert one(SERVICE, s, "KillMode") == "mixed"  # SIGTERM to the bootloader, which forwards
    watchdog = one(SERVICE, s, "WatchdogSec")
    assert watchdog.endswith("s") and 5 <= int(watchdog[:-1]) <= 60
    exec_start = one(SERVICE, s, "ExecStart").split()
    assert exec_start[:2] == ["/usr/local/bin/agentspoonsd", "run"]
    config = exec_start[exec_start.index("--config") + 1]
    assert config == "%E/agentspoonsd/agentspoonsd.toml"  # %E = /etc
    assert one(SERVICE, s, "ConfigurationDirectory") == "agentspoonsd"
    assert one(SERVICE, s, "StateDirectory") == "agentspoonsd"


def test_limits_and_timeouts_cover_the_daemon_defaults() -> None:
    server = ServerSettings()
    assert int(one(SERVICE, "Service", "LimitNOFILE")) >= server.max_connections + 1024
    stop = one(SERVICE, "Service", "TimeoutStopSec")
    assert float(stop.rstrip("s")) >= server.shutdown_timeout + 5


def test_one_file_unpacks_into_the_runtime_directory_not_tmp() -> None:
    assert one(SERVICE, "Service", "RuntimeDirectory") == "agentspoonsd"
    assert "TMPDIR=%t/agentspoonsd" in values(SERVICE, "Service", "Environment")
    # Nothing in the unit makes that directory noexec.
    for key in ("NoExecPaths", "TemporaryFileSystem"):
        assert not any("%t" in v or "/run" in v for v in values(SERVICE, "Service", key))


def test_hardening_directives() -> None:
    expected = {
        "DynamicUser": "yes",
        "User": "agentspoonsd",  # the static one from sysusers.d when it exists
        "Group": "agentspoonsd",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one(SERVICE, "Service", key) == value, key
    assert values(SERVICE, "Service", "SystemCallFilter")[0] == "@system-service"


def test_socket_unit_matches_the_daemon_defaults() -> None:
    server = ServerSettings()
    assert one(SOCKET, "Socket", "ListenStream") == str(server.port)
    assert one(SOCKET, "Socket", "FileDescriptorName") == "websocket"
    assert one(SOCKET, "Socket", "Backlog") == str(server.listen_backlog)
    assert one(SOCKET, "Socket", "Service") == SERVICE.name


# --- the seccomp policy the frozen binary is tested under is the unit's, and it bites ------------


def sandboxed_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SANDBOX), str(SERVICE), "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unit_sandbox_applies_the_units_policy(systemd_analyze: str) -> None:
    probe = sandboxed_python(
        "import errno, json, mmap, os, socket\n"
        "out = {}\n"
        "def attempt(name, call):\n"
        "    try:\n"
        "        call(); out[name] = 'allowed'\n"
        "    except OSError as exc:\n"
        "        out[name] = errno.errorcode[exc.errno]\n"
        "wx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC\n"
        "attempt('wx_mmap', lambda: mmap.mmap(-1, 4096, prot=wx))\n"
        "attempt('rw_mmap', lambda: mmap.mmap(-1, 4096))\n"
        "attempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))\n"
        "attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))\n"
        "attempt('inet6', lambda: socket.socket(socket.AF_INET6).close())\n"
        "attempt('unix', lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close())\n"
        "attempt('setuid', lambda: os.setuid(os.getuid()))\n"
        "attempt('setaffinity', lambda: os.sched_setaffinity(0, {0}))\n"
        "print(json.dumps(out))\n"
    )
    assert probe.returncode == 0, probe.stderr
    assert "MemoryDenyWriteExecute" in probe.stderr and "SystemCallFilter" in probe.stderr
    out = json.loads(probe.stdout)
    assert out["wx_mmap"] == "EPERM"  # MemoryDenyWriteExecute=yes
    assert out["rw_mmap"] == "allowed"
    assert out["netlink"] == out["packet"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert out["inet6"] == out["unix"] == "allowed"
    assert out["setuid"] == "EPERM"  # ~@privileged
    assert out["setaffinity"] == "EPERM"  # ~@resources


# --- socket activation: LISTEN_FDS adoption, with real descriptors in a real process -------------


def test_listen_fds_parsing() -> None:
    me = os.getpid()
    env = {"LISTEN_PID": str(me), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "websocket:health"}
    assert listen_fds(env) == [(3, "websocket"), (4, "health")]
    assert listen_fds({**env, "LISTEN_FDNAMES": "websocket"}) == [(3, "websocket"), (4, "unknown")]
    assert listen_fds({**env, "LISTEN_PID": str(me + 1)}) == []
    assert listen_fds({**env, "LISTEN_FDS": "0"}) == []
    assert listen_fds({**env, "LISTEN_FDS": "x"}) == []
    assert listen_fds({"LISTEN_FDS": "1"}) == []
    assert listen_fds({**env, "LISTEN_PID": "42"}, pids=[42])[0] == (3, "websocket")


def test_no_activation_outside_systemd() -> None:
    env: dict[str, str] = {"OTHER": "1"}
    inherited = inherited_sockets(env)
    assert len(inherited) == 0 and inherited.take("websocket") is None and env == {"OTHER": "1"}


CHILD = """
import json, os, socket, sys
from structlog.testing import CapturingLogger
from agentspoonsd.activation import inherited_sockets
log = CapturingLogger()
inherited = inherited_sockets(log=log)
report = {"names": inherited.names, "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
          "log": [c.args[0] for c in log.calls]}
ws = inherited.take("websocket")
health = inherited.take("health")
report["unused"] = inherited.close_unused()
for name, sock in (("websocket", ws), ("health", health)):
    if sock is not None:
        report[name] = {"port": sock.getsockname()[1], "blocking": sock.getblocking(),
                        "inheritable": sock.get_inheritable(), "fd": sock.fileno()}
try:
    os.fstat(3)
    report["fd3_open"] = True
except OSError:
    report["fd3_open"] = False
print(json.dumps(report), flush=True)
if ws is not None:
    ws.setblocking(True)
    conn, _ = ws.accept()
    conn.sendall(b"adopted")
    conn.close()
"""


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    made = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        made.append(sock)
    yield made
    for sock in made:
        sock.close()


def run_activated(
    fds: list[int], env: dict[str, str], listen_pid: str = "$$"
) -> subprocess.Popen[str]:
    """CHILD with `fds` moved to 3, 4, … and LISTEN_PID set, as systemd execs a service.
    The descriptors go through 100, 101, … first, so no move overwrites another."""
    assert all(fd < 100 for fd in fds)
    moves = "".join(f"exec {100 + i}<&{fd} {fd}<&-; " for i, fd in enumerate(fds))
    moves += "".join(f"exec {3 + i}<&{100 + i} {100 + i}<&-; " for i in range(len(fds)))
    script = f'{moves}export LISTEN_PID={listen_pid}; exec "$@"'
    return subprocess.Popen(
        ["bash", "-c", script, "bash", sys.executable, "-c", CHILD],
        env={**os.environ, **env},
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_adopts_named_listening_sockets(listeners: list[socket.socket]) -> None:
    ws, health = listeners
    fds = [os.dup(ws.fileno()), os.dup(health.fileno())]
    try:
        child = run_activated(fds, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "websocket:health"})
    finally:
        for fd in fds:
            os.close(fd)
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert report["names"] == ["websocket", "health"]
    assert report["env"] == []  # LISTEN_* unset: nothing the daemon starts inherits them
    assert report["websocket"] == {
        "port": ws.getsockname()[1],
        "blocking": False,
        "inheritable": False,
        "fd": 3,
    }
    assert report["health"]["port"] == health.getsockname()[1] and report["health"]["fd"] == 4
    assert report["unused"] == [] and report["log"] == []
    # The adopted socket is the one we listen on: a connection to it reaches the child.
    ws.close()  # only the child's copy is left
    with socket.create_connection(("127.0.0.1", report["websocket"]["port"]), timeout=5) as conn:
        assert conn.recv(16) == b"adopted"
    assert child.wait(5) == 0


def test_sockets_for_another_process_are_left_alone(listeners: list[socket.socket]) -> None:
    fd = os.dup(listeners[0].fileno())
    try:
        child = run_activated([fd], {"LISTEN_FDS": "1"}, listen_pid="1")
    finally:
        os.close(fd)
    out, _ = child.communicate(timeout=10)
    report = json.loads(out)
    assert report["names"] == [] and report["env"] == [] and "websocket" not in report
    assert report["fd3_open"] is True  # not ours: not touched


def test_descriptors_that_are_not_listeners_are_skipped(listeners: list[socket.socket]) -> None:
    read_end, write_end = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fds = [read_end, os.dup(udp.fileno()), os.dup(listeners[0].fileno())]
    os.close(write_end)
    udp.close()
    try:
        names = "pipe:udp:websocket"
        child = run_activated(fds, {"LISTEN_FDS": "3", "LISTEN_FDNAMES": names})
    finally:
        for fd in fds:
            os.close(fd)
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert report["names"] == ["websocket"]
    assert report["log"] == ["inherited_fd_unusable", "inherited_fd_not_listening"]
    assert report["websocket"]["fd"] == 5
    assert report["fd3_open"] is False  # the pipe was ours (LISTEN_FDS): closed, not leaked
    child.send_signal(signal.SIGTERM)
    child.wait(5)


def test_sysusers_entry_names_the_units_user(tmp_path: Path) -> None:
    """systemd-sysusers accepts the shipped entry and creates the user and group the unit names."""
    subprocess.run(["sh", str(ROOT / "build" / "ensure-systemd.sh")], check=True)
    conf = ROOT / "systemd" / "agentspoonsd.sysusers"
    (tmp_path / "etc").mkdir()  # where it writes passwd and group
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(conf)], check=True)
    user = one(SERVICE, "Service", "User")
    group = one(SERVICE, "Service", "Group")
    assert (tmp_path / "etc/passwd").read_text().startswith(f"{user}:")
    assert (tmp_path / "etc/group").read_text().startswith(f"{group}:")
