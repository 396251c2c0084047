"""cli: `python -m agentspoonsd …` as real subprocesses, plus a few in-process variants.

Starting the interpreter costs ~0.4 s, so the subprocess cases are all launched at once by one
module fixture and each test checks its own result.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentspoonsd import __version__
from agentspoonsd.cli import main
from agentspoonsd.settings import TokenSettings

EX_CONFIG = 78
DIGEST = hashlib.sha256(b"the-dashboard-token").hexdigest()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Runs:
    dir: Path
    results: dict[str, Result]
    bad_ports: tuple[int, int]

    def __getitem__(self, name: str) -> Result:
        return self.results[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    env.update(extra)
    return env


GOOD = f"""
[server]
host = "127.0.0.1"
port = 0
[auth]
[[auth.tokens]]
name = "dashboard"
sha256 = "{DIGEST}"
symbols = ["BTC/USD"]
[generator]
symbols = ["BTC/USD", "ETH/USD"]
[health]
port = 0
"""


def bad_config(ws_port: int, http_port: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {ws_port}
[health]
host = "127.0.0.1"
port = {http_port}
[generator]
interval = -1
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("cli")
    good = tmp / "good.toml"
    good.write_text(GOOD)
    ports = (free_port(), free_port())
    bad = tmp / "bad.toml"
    bad.write_text(bad_config(*ports))

    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        "version": (["--version"], {}),
        "token": (["token", "new", "dashboard"], {}),
        "check_good": (["check-config", "--config", str(good)], {}),
        "check_bad": (["check-config", "--config", str(bad)], {}),
        "run_bad": (["run", "--config", str(bad)], {}),
        "run_unknown_env": (["run", "--config", str(good)], {"AGENTSPOONSD_SERVER__PROT": "1"}),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "agentspoonsd", *args],
            cwd=tmp,  # no ./agentspoonsd.toml here
            env=clean_environ(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # e.g. a `run` that should have refused to start
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{name}: still running after 20 s\n{out}\n{err}")
        results[name] = Result(proc.returncode, out, err)
    return Runs(tmp, results, ports)


def test_version(runs: Runs) -> None:
    r = runs["version"]
    assert r.returncode == 0
    assert r.stdout.strip() == f"agentspoonsd {__version__}"


def test_token_new_prints_a_token_and_a_matching_block(runs: Runs) -> None:
    r = runs["token"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    token_lines = [line for line in lines if line.startswith("token: ")]
    assert len(token_lines) == 1
    token = token_lines[0].removeprefix("token: ")
    assert len(token) >= 43
    assert r.stdout.count(token) == 1  # printed once, never in the block

    block = r.stdout[r.stdout.index("[[auth.tokens]]") :]
    entry = tomllib.loads(block)["auth"]["tokens"][0]
    assert entry == {
        "name": "dashboard",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "symbols": ["*"],
    }
    assert TokenSettings(**entry).sha256 == entry["sha256"]
    # the whole output pastes as TOML: the rest are comments
    assert tomllib.loads(r.stdout.replace(token_lines[0], "")) == {"auth": {"tokens": [entry]}}


def test_check_config_good_prints_redacted_json(runs: Runs) -> None:
    r = runs["check_good"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["server"] == data["server"] | {"host": "127.0.0.1", "port": 0}
    assert data["generator"]["symbols"] == ["BTC/USD", "ETH/USD"]
    assert data["log"] == {"level": "info", "format": "json"}
    (token,) = data["auth"]["tokens"]
    assert token["name"] == "dashboard"
    assert DIGEST not in r.stdout and DIGEST not in r.stderr
    assert token["sha256"].startswith(DIGEST[:8]) and "redacted" in token["sha256"]
    assert "good.toml" in r.stderr  # where the effective config came from


def test_check_config_bad_names_key_and_file(runs: Runs) -> None:
    r = runs["check_bad"]
    assert r.returncode == EX_CONFIG
    assert r.stdout == ""
    assert f"{runs.dir / 'bad.toml'}: generator.interval: " in r.stderr
    assert "greater than 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_with_bad_config_exits_78_and_starts_nothing(runs: Runs) -> None:
    r = runs["run_bad"]
    assert r.returncode == EX_CONFIG
    assert f"{runs.dir / 'bad.toml'}: generator.interval: " in r.stderr
    assert "Traceback" not in r.stderr
    # one JSON line for the journal, and no sign of anything having started
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "config_invalid" and lines[0]["level"] == "error"
    assert "generator.interval" in lines[0]["error"]
    assert "listener_bound" not in r.stdout and "daemon_started" not in r.stdout
    ws_port, http_port = runs.bad_ports
    assert port_is_free(ws_port) and port_is_free(http_port)


def test_unknown_env_var_exits_78(runs: Runs) -> None:
    r = runs["run_unknown_env"]
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert "AGENTSPOONSD_SERVER__PROT" in r.stderr and "server.prot" in r.stderr
    assert "Traceback" not in r.stderr
    assert "listener_bound" not in r.stdout


# --- in process: cheap variants of the same commands ----------------------------------------------


@pytest.fixture
def no_agentspoonsd_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_token_new_with_symbols_is_valid_toml(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    symbols = ["ETH/USD", "🚀/USD", 'quo"te', "back\\slash", "del\x7f", "tab\t"]
    assert main(["token", "new", "eth.feed@desk-1", "--symbols", *symbols]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].removeprefix("token: ")
    entry = tomllib.loads(out[out.index("[[auth.tokens]]") :])["auth"]["tokens"][0]
    assert entry["symbols"] == symbols
    assert entry["name"] == "eth.feed@desk-1"
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()


def test_token_new_tokens_differ(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    tokens = set()
    for _ in range(3):
        assert main(["token", "new", "x"]) == 0
        tokens.add(capsys.readouterr().out.splitlines()[0])
    assert len(tokens) == 3


@pytest.mark.parametrize("name", ["has space", 'quo"te', "", "x" * 65])
def test_token_new_rejects_a_bad_name(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path, name: str
) -> None:
    assert main(["token", "new", name]) == EX_CONFIG
    captured = capsys.readouterr()
    assert "token:" not in captured.out
    assert "invalid token name" in captured.err


def test_check_config_missing_file(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    missing = no_agentspoonsd_env / "missing.toml"
    assert main(["check-config", "--config", str(missing)]) == EX_CONFIG
    assert f"{missing}: config file not found" in capsys.readouterr().err


def test_run_missing_file_exits_78(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    missing = no_agentspoonsd_env / "missing.toml"
    assert main(["run", "--config", str(missing)]) == EX_CONFIG
    captured = capsys.readouterr()
    assert str(missing) in captured.err
    assert json.loads(captured.out)["event"] == "config_invalid"


def test_check_config_follows_env_and_overrides(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    path = no_agentspoonsd_env / "from-env.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("AGENTSPOONSD_CONFIG", str(path))
    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "9000")
    assert main(["check-config"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["server"]["port"] == 9000  # the environment beats the file
    assert data["server"]["host"] == "127.0.0.1"  # the file beats the defaults
    assert str(path) in captured.err


def test_check_config_defaults_without_any_file(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    from agentspoonsd import settings

    monkeypatch.setattr(settings, "DEFAULT_SEARCH_PATHS", ())  # the host's /etc stays out of it
    assert main(["check-config"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["server"]["port"] == 8765
    assert "built-in defaults" in captured.err


def test_check_config_bad_env_value_names_the_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__SYMBOLS", "BTC/USD")  # not a JSON list
    assert main(["check-config"]) == EX_CONFIG
    assert "AGENTSPOONSD_GENERATOR__SYMBOLS" in capsys.readouterr().err


def test_check_config_unknown_env_var(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    monkeypatch.setenv("AGENTSPOONSD_LOGG__LEVEL", "debug")
    assert main(["check-config"]) == EX_CONFIG
    captured = capsys.readouterr()
    assert "AGENTSPOONSD_LOGG__LEVEL" in captured.err and "logg" in captured.err
    assert captured.out == ""


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["token"], ["token", "new"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()
