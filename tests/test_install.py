"""`make install DESTDIR=…`: the staged tree is complete, passes `systemd-analyze verify` with the
frozen binary in place, runs, and never overwrites an operator's edited config; install never
builds; `make uninstall` removes exactly what install put there and keeps tokens, state and
edited configs unless PURGE=1."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from agentspoonsd import tokenfile

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "agentspoonsd.example.toml"
ENV_FILE = ROOT / "config" / "agentspoonsd.env"
SYSUSERS = ROOT / "systemd" / "agentspoonsd.sysusers"


@pytest.fixture(scope="module")
def frozen(frozen_binary: Path) -> Path:
    """dist/agentspoonsd (conftest.py freezes it while the other tests run)."""
    return frozen_binary


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze, installed from Debian's packages if missing. Never skipped."""
    subprocess.run(["sh", str(ROOT / "build" / "ensure-systemd.sh")], check=True)
    path = shutil.which("systemd-analyze")
    assert path is not None
    return path


def make_install(destdir: Path, *extra: str) -> str:
    result = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={destdir}", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_stages_everything_with_the_right_modes(frozen: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    out = make_install(dest)
    binary = dest / "usr/local/bin/agentspoonsd"
    assert binary.read_bytes() == frozen.read_bytes() and mode(binary) == 0o755
    for unit in ("agentspoonsd.service", "agentspoonsd.socket"):
        installed = dest / "etc/systemd/system" / unit
        assert installed.read_text() == (ROOT / "systemd" / unit).read_text()
        assert mode(installed) == 0o644
    config = dest / "etc/agentspoonsd/agentspoonsd.toml"
    assert config.read_text() == EXAMPLE.read_text() and mode(config) == 0o644
    env = dest / "etc/agentspoonsd/agentspoonsd.env"
    assert env.read_text() == ENV_FILE.read_text() and mode(env) == 0o600
    assert (dest / "etc/agentspoonsd/agentspoonsd.schema.json").is_file()
    tokens = dest / "etc/agentspoonsd/tokens.toml"
    assert tokens.read_text() == tokenfile.HEADER and mode(tokens) == 0o600
    sysusers = dest / "etc/sysusers.d/agentspoonsd.conf"
    assert sysusers.read_text() == SYSUSERS.read_text() and mode(sysusers) == 0o644
    # Nothing else, nowhere else: staging creates no user.
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [
        "etc/agentspoonsd/agentspoonsd.env",
        "etc/agentspoonsd/agentspoonsd.schema.json",
        "etc/agentspoonsd/agentspoonsd.toml",
        "etc/agentspoonsd/tokens.toml",
        "etc/systemd/system/agentspoonsd.service",
        "etc/systemd/system/agentspoonsd.socket",
        "etc/sysusers.d/agentspoonsd.conf",
        "usr/local/bin/agentspoonsd",
        "usr/local/share/agentspoonsd/install-manifest",
    ]
    assert "build/service-user.sh" in out
    assert "systemctl daemon-reload && systemctl enable --now agentspoonsd" in out
    assert "token new" in out and "journalctl -u agentspoonsd" in out


def test_installed_tree_passes_verify_and_runs(
    frozen: Path, systemd_analyze: str, tmp_path: Path
) -> None:
    dest = tmp_path / "root"
    make_install(dest)
    # What a real root also has: systemd's unit library (targets) and /bin/kill (ExecReload=).
    shutil.copytree("/usr/lib/systemd/system", dest / "usr/lib/systemd/system", symlinks=True)
    (dest / "bin").mkdir()
    shutil.copy2("/bin/kill", dest / "bin/kill")
    units = dest / "etc/systemd/system"
    result = subprocess.run(
        [
            systemd_analyze,
            "verify",
            f"--root={dest}",
            "--man=no",
            str(units / "agentspoonsd.service"),
            str(units / "agentspoonsd.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The installed binary accepts the installed config, as the unit will run them.
    checked = subprocess.run(
        [
            str(dest / "usr/local/bin/agentspoonsd"),
            "check-config",
            "--config",
            str(dest / "etc/agentspoonsd/agentspoonsd.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert checked.returncode == 0, checked.stderr


def test_reinstall_never_overwrites_an_edited_config(frozen: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    make_install(dest)
    config = dest / "etc/agentspoonsd/agentspoonsd.toml"

    again = make_install(dest)  # unchanged: left as is, nothing beside it
    assert f"unchanged {config}" in again
    assert not config.with_name("agentspoonsd.toml.new").exists()

    edited = config.read_text().replace("interval = 2.0", "interval = 1.0")
    config.write_text(edited)
    upgrade = make_install(dest)
    assert config.read_text() == edited  # the operator's file stays
    new = config.with_name("agentspoonsd.toml.new")
    assert new.read_text() == EXAMPLE.read_text()
    assert f"kept {config}" in upgrade and str(new) in upgrade
    # The env file was not edited: still the shipped one, no .new.
    assert not (dest / "etc/agentspoonsd/agentspoonsd.env.new").exists()


def test_prefix_moves_the_binary_and_the_units_exec_start(frozen: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    make_install(dest, "PREFIX=/opt/agentspoonsd")
    assert (dest / "opt/agentspoonsd/bin/agentspoonsd").is_file()
    assert not (dest / "usr/local/bin/agentspoonsd").exists()
    unit = (dest / "etc/systemd/system/agentspoonsd.service").read_text()
    assert "ExecStart=/opt/agentspoonsd/bin/agentspoonsd run --config" in unit
    assert "/usr/local/bin" not in unit
    assert (dest / "etc/agentspoonsd/agentspoonsd.toml").is_file()  # config stays in /etc


def test_shipped_tokens_file_is_the_header_token_new_writes() -> None:
    assert (ROOT / "config" / "tokens.toml").read_text() == tokenfile.HEADER


def test_installed_tokens_file_is_never_replaced(frozen: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    make_install(dest)
    tokens = dest / "etc/agentspoonsd/tokens.toml"
    tokens.write_text(tokenfile.HEADER + '\n[[tokens]]\nname = "a"\nsha256 = "' + "a" * 64 + '"\n')
    before = tokens.read_text()
    make_install(dest)
    assert tokens.read_text() == before
    assert not tokens.with_name("tokens.toml.new").exists()


def run_as(uid: int, gid: int, *argv: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """`argv` as uid:gid with no supplementary groups, as systemd runs the service."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )


def test_the_service_user_reads_its_tokens_file_and_root_edits_keep_it_theirs(
    frozen: Path,
) -> None:
    """The gap DynamicUser alone leaves: a 0600 tokens file root made is unreadable to the
    service. build/service-user.sh creates the static user (in the tree's own passwd) and gives
    it the file; `token new|revoke`, run as root, keep it that user's."""
    # Outside pytest's tmp_path: its parents are root-only, and the service user must traverse.
    base = Path(tempfile.mkdtemp(prefix="agentspoonsd-install-"))
    try:
        base.chmod(0o755)
        dest = base / "root"
        make_install(dest)
        user = subprocess.run(
            ["sh", str(ROOT / "build" / "service-user.sh"), str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert user.returncode == 0, user.stderr
        (entry,) = [
            line.split(":")
            for line in (dest / "etc/passwd").read_text().splitlines()
            if line.startswith("agentspoonsd:")
        ]
        uid, gid, shell = int(entry[2]), int(entry[3]), entry[6]
        assert 0 < uid < 1000 and shell == "/usr/sbin/nologin"  # a system user, no login
        tokens = dest / "etc/agentspoonsd/tokens.toml"
        assert (tokens.stat().st_uid, tokens.stat().st_gid, mode(tokens)) == (uid, gid, 0o600)

        binary = str(dest / "usr/local/bin/agentspoonsd")
        config = str(dest / "etc/agentspoonsd/agentspoonsd.toml")
        for name in ("dashboard", "scripts"):
            made = subprocess.run(
                [binary, "token", "new", name, "--config", config],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "TMPDIR": str(base)},
            )
            assert made.returncode == 0, made.stderr
        revoked = subprocess.run(
            [binary, "token", "revoke", "scripts", "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TMPDIR": str(base)},
        )
        assert revoked.returncode == 0, revoked.stderr
        assert (tokens.stat().st_uid, tokens.stat().st_gid, mode(tokens)) == (uid, gid, 0o600)

        unpack = base / "unpack"  # the one-file build's TMPDIR, the service user's
        unpack.mkdir()
        os.chown(unpack, uid, gid)
        checked = run_as(uid, gid, binary, "check-config", "--config", config, tmpdir=unpack)
        assert checked.returncode == 0, checked.stderr
        assert '"dashboard"' in checked.stdout and '"scripts"' not in checked.stdout

        # Without the user: the file root made is refused, naming the key (what the unit's
        # transient user hit before).
        os.chown(tokens, 0, 0)
        refused = run_as(uid, gid, binary, "check-config", "--config", config, tmpdir=unpack)
        assert refused.returncode == 78
        assert "auth.tokens_file" in refused.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- install never builds; uninstall; the installed config ----------------------------------------
# These install a stand-in executable (BINARY=): what is tested is what the scripts do with files.


def run_make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    binary = tmp_path / "agentspoonsd-stand-in"
    binary.write_text("#!/bin/sh\necho stand-in\n")
    binary.chmod(0o755)
    return binary


def tree(root: Path) -> set[str]:
    """Every file, link and directory under root, relative; directories end with a slash."""
    return {
        str(p.relative_to(root)) + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in root.rglob("*")
    }


def test_install_never_builds_the_binary() -> None:
    """`sudo make install` froze as root (the binary was a prerequisite). Whatever is out of
    date (-B), install's recipe is the install script alone."""
    planned = run_make("-n", "-B", "install", "DESTDIR=/nonexistent")
    assert planned.returncode == 0, planned.stderr
    assert "build/install.sh" in planned.stdout
    assert "freeze.sh" not in planned.stdout and "pyinstaller" not in planned.stdout
    assert "pip" not in planned.stdout


def test_install_without_a_binary_refuses_with_the_command_to_run(tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    for missing in (tmp_path / "nothing-here", tmp_path):  # absent; a directory
        result = run_make("install", f"DESTDIR={dest}", f"BINARY={missing}")
        assert result.returncode != 0
        assert f"no executable at {missing}" in result.stderr
        assert "make binary" in result.stderr and "not root" in result.stderr
        assert not dest.exists()  # refused before anything was written


def test_uninstall_removes_exactly_what_install_put_there(stand_in: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    # What the machine already had: install must not claim it, uninstall must not touch it.
    for name in ("etc/hostname", "etc/systemd/system/other.service", "usr/local/bin/other"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text("theirs\n")
    before = tree(dest)
    make_install(dest, f"BINARY={stand_in}")
    make_install(dest, f"BINARY={stand_in}")  # an upgrade: the manifest still has everything
    tokens = dest / "etc/agentspoonsd/tokens.toml"
    tokens.write_text(tokenfile.HEADER + '[[tokens]]\nname = "a"\nsha256 = "' + "a" * 64 + '"\n')
    state = dest / "var/lib/private/agentspoonsd"  # what systemd makes for the history
    state.mkdir(parents=True)
    (state / "history.bin").write_bytes(b"\x00" * 16)

    result = run_make("uninstall", f"DESTDIR={dest}")
    assert result.returncode == 0, result.stderr
    kept = {
        "etc/agentspoonsd/",
        "etc/agentspoonsd/tokens.toml",
        "var/",
        "var/lib/",
        "var/lib/private/",
        "var/lib/private/agentspoonsd/",
        "var/lib/private/agentspoonsd/history.bin",
    }
    assert tree(dest) == before | kept
    assert f"kept {tokens}" in result.stdout and f"kept {state}" in result.stdout
    assert "PURGE=1" in result.stdout

    purged = run_make("uninstall", f"DESTDIR={dest}")  # nothing left to uninstall: said so
    assert purged.returncode != 0 and "no install manifest" in purged.stderr


def test_uninstall_keeps_an_edited_config_and_purge_removes_it_tokens_and_state(
    stand_in: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "root"
    make_install(dest, f"BINARY={stand_in}")
    config = dest / "etc/agentspoonsd/agentspoonsd.toml"
    edited = config.read_text().replace("interval = 2.0", "interval = 1.0")
    config.write_text(edited)
    make_install(dest, f"BINARY={stand_in}")  # the upgrade puts the shipped one beside it
    assert config.with_name("agentspoonsd.toml.new").exists()
    state = dest / "var/lib/agentspoonsd"
    state.mkdir(parents=True)
    (state / "history").write_text("x")
    manifest = dest / "usr/local/share/agentspoonsd/install-manifest"
    saved = manifest.read_bytes()

    result = run_make("uninstall", f"DESTDIR={dest}")
    assert result.returncode == 0, result.stderr
    assert config.read_text() == edited and f"kept {config} (edited" in result.stdout
    assert not config.with_name("agentspoonsd.toml.new").exists()  # as installed: removed
    assert not (dest / "etc/agentspoonsd/agentspoonsd.env").exists()  # never edited: removed
    assert (dest / "etc/agentspoonsd/tokens.toml").exists() and state.is_dir()

    # PURGE=1: the same manifest again (as after a reinstall), and everything goes.
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(saved)
    result = run_make("uninstall", f"DESTDIR={dest}", "PURGE=1")
    assert result.returncode == 0, result.stderr
    assert tree(dest) == {"var/", "var/lib/"}  # made by the test, not by install
    assert "removed" in result.stdout and "kept" not in result.stdout

    refused = run_make("uninstall", f"DESTDIR={dest}", "PURGE=yes")
    assert refused.returncode != 0


def test_uninstall_follows_the_prefix_of_the_install(stand_in: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make_install(dest, f"BINARY={stand_in}", "PREFIX=/opt/agentspoonsd")
    assert (dest / "opt/agentspoonsd/share/agentspoonsd/install-manifest").is_file()
    wrong = run_make("uninstall", f"DESTDIR={dest}")  # the default PREFIX: no manifest there
    assert wrong.returncode != 0 and "PREFIX" in wrong.stderr
    assert (dest / "opt/agentspoonsd/bin/agentspoonsd").is_file()  # nothing was removed
    result = run_make("uninstall", f"DESTDIR={dest}", "PREFIX=/opt/agentspoonsd", "PURGE=1")
    assert result.returncode == 0, result.stderr
    assert tree(dest) == set()


def test_installed_config_persists_the_history_in_the_units_state_directory() -> None:
    """An upgrade (a restart) keeps seq and history: clients resume instead of starting over."""
    with EXAMPLE.open("rb") as f:
        history = tomllib.load(f)["history"]
    assert history["persist"] is True
    unit = (ROOT / "systemd" / "agentspoonsd.service").read_text()
    assert "StateDirectory=agentspoonsd" in unit
    assert history["dir"] == "/var/lib/agentspoonsd"
