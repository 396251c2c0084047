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
from helpers import free_port

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


CLIENT_AND_NESTED_ENV = {
    "AGENTSPOONSD_TOKEN": "a-client-token",
    "AGENTSPOONSD_URL": "ws://127.0.0.1:1/",
    "AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED": "false",
}


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
        # The clients' variables exported in the same shell, as the README's `watch` has them.
        "check_client_env": (["check-config", "--config", str(good)], CLIENT_AND_NESTED_ENV),
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
    assert data["log"] == {"level": "info", "format": "auto"}
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


def test_check_config_ignores_the_clients_variables_and_takes_a_nested_key(runs: Runs) -> None:
    """$AGENTSPOONSD_TOKEN and $AGENTSPOONSD_URL are never overrides (exporting them for `watch`
    once stopped the daemon with exit 78); a nested key's variable is one."""
    r = runs["check_client_env"]
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["generator"]["garch_fit"]["enabled"] is False
    assert "a-client-token" not in r.stdout + r.stderr


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
    from agentspoonsd import configpaths

    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())  # the host's /etc stays out of it
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


# --- token new --file | list | revoke, as subprocesses --------------------------------------------
# Independent scenarios run side by side (one thread each); the steps of one run in order.

DIGEST_CFG = hashlib.sha256(b"in-the-config").hexdigest()
DIGEST_OLD = hashlib.sha256(b"expired-one").hexdigest()


def cli_run(args: list[str], cwd: Path) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "agentspoonsd", *args],
        cwd=cwd,
        env=clean_environ(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class TokenRuns:
    dir: Path
    results: dict[str, Result]
    snapshots: dict[str, bytes]  # the tokens file after the named step
    modes: dict[str, int]

    def __getitem__(self, name: str) -> Result:
        return self.results[name]


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory: pytest.TempPathFactory) -> TokenRuns:
    import threading

    tmp = tmp_path_factory.mktemp("tokens")
    results: dict[str, Result] = {}
    snapshots: dict[str, bytes] = {}
    modes: dict[str, int] = {}

    # A: a tokens file and no config at all.
    file_dir = tmp / "file"
    file_dir.mkdir()
    tokens = file_dir / "tokens.toml"
    steps_a = [
        (
            "new_first",
            [
                *("token", "new", "first", "--file", str(tokens), "--symbols", "ETH/USD"),
                *("--expires", "2099-01-01T00:00:00+01:00", "--max-connections", "3"),
            ],
        ),
        ("new_second", ["token", "new", "second", "--file", str(tokens)]),
        ("new_duplicate", ["token", "new", "first", "--file", str(tokens)]),
        ("revoke_first", ["token", "revoke", "first", "--file", str(tokens)]),
    ]

    # B: a config with its own token and a tokens file (one entry, expired).
    conf_dir = tmp / "conf"
    conf_dir.mkdir()
    (conf_dir / "tokens.toml").write_text(
        f'[[tokens]]\nname = "old"\nsha256 = "{DIGEST_OLD}"\nexpires = 2020-01-01T00:00:00Z\n'
    )
    (conf_dir / "tokens.toml").chmod(0o600)
    config = conf_dir / "c.toml"
    config.write_text(
        '[auth]\ntokens_file = "tokens.toml"\n'
        f'[[auth.tokens]]\nname = "cfg"\nsha256 = "{DIGEST_CFG}"\n'
        'symbols = ["BTC/USD", "ETH/USD"]\n'
    )
    c = ["--config", str(config)]
    steps_b = [
        ("list", ["token", "list", *c]),
        ("revoke_config_token", ["token", "revoke", "cfg", *c]),
    ]

    # C: a config naming a tokens file that does not exist yet.
    new_dir = tmp / "new"
    new_dir.mkdir()
    (new_dir / "c.toml").write_text('[auth]\ntokens_file = "created.toml"\n')
    steps_c = [("new_creates_configured", ["token", "new", "x", "--config", "c.toml"])]

    def sequence(steps: list[tuple[str, list[str]]], cwd: Path, watch: Path | None) -> None:
        for name, args in steps:
            results[name] = cli_run(args, cwd)
            if watch is not None and watch.exists():
                snapshots[name] = watch.read_bytes()
                modes[name] = watch.stat().st_mode & 0o7777

    threads = [
        threading.Thread(target=sequence, args=(steps_a, file_dir, tokens)),
        threading.Thread(target=sequence, args=(steps_b, conf_dir, conf_dir / "tokens.toml")),
        threading.Thread(target=sequence, args=(steps_c, new_dir, new_dir / "created.toml")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return TokenRuns(tmp, results, snapshots, modes)


def printed(result: Result) -> str:
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("token: ")]
    return line.removeprefix("token: ")


def test_token_new_file_creates_it_0600_with_the_entry(token_runs: TokenRuns) -> None:
    r = token_runs["new_first"]
    token = printed(r)
    assert r.stdout.count(token) == 1 and "created, mode 0600" in r.stdout
    assert token_runs.modes["new_first"] == 0o600
    text = token_runs.snapshots["new_first"].decode()
    assert text.startswith("# agentspoonsd tokens")
    assert tomllib.loads(text) == {
        "tokens": [
            {
                "name": "first",
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "symbols": ["ETH/USD"],
                "expires": tomllib.loads("x = 2099-01-01T00:00:00+01:00")["x"],
                "max_connections": 3,
            }
        ]
    }
    assert token not in text


def test_token_new_file_appends_without_rewriting(token_runs: TokenRuns) -> None:
    token = printed(token_runs["new_second"])
    before, after = token_runs.snapshots["new_first"], token_runs.snapshots["new_second"]
    assert after.startswith(before) and len(after) > len(before)
    names = [t["name"] for t in tomllib.loads(after.decode())["tokens"]]
    assert names == ["first", "second"]
    assert hashlib.sha256(token.encode()).hexdigest().encode() in after
    assert token_runs.modes["new_second"] == 0o600


def test_token_new_refuses_a_duplicate_name(token_runs: TokenRuns) -> None:
    r = token_runs["new_duplicate"]
    assert r.returncode == EX_CONFIG
    assert 'a token named "first" already exists' in r.stderr
    assert "token:" not in r.stdout  # no token made
    assert token_runs.snapshots["new_duplicate"] == token_runs.snapshots["new_second"]


def test_token_revoke_removes_the_entry_atomically(token_runs: TokenRuns) -> None:
    r = token_runs["revoke_first"]
    assert r.returncode == 0, r.stderr
    assert "systemctl reload agentspoonsd" in r.stdout and "kill -HUP" in r.stdout
    assert "4001" in r.stdout
    text = token_runs.snapshots["revoke_first"].decode()
    assert [t["name"] for t in tomllib.loads(text)["tokens"]] == ["second"]
    assert text.startswith("# agentspoonsd tokens")  # the header comment stays
    assert token_runs.modes["revoke_first"] == 0o600
    assert sorted(p.name for p in (token_runs.dir / "file").iterdir()) == ["tokens.toml"]


def test_token_list_shows_both_sources_and_never_a_whole_digest(token_runs: TokenRuns) -> None:
    r = token_runs["list"]
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows == [
        ["NAME", "STATUS", "SYMBOLS", "EXPIRES", "MAX_CONNECTIONS", "SHA256", "SOURCE"],
        ["cfg", "active", "BTC/USD,ETH/USD", "never", "unlimited", DIGEST_CFG[:8], "config"],
        ["old", "expired", "*", "2020-01-01T00:00:00Z", "unlimited", DIGEST_OLD[:8], "tokens_file"],
    ]
    for digest in (DIGEST_CFG, DIGEST_OLD):
        assert digest[:9] not in r.stdout + r.stderr
    assert "tokens.toml" in r.stderr  # where they came from


def test_token_revoke_of_a_config_token_is_refused(token_runs: TokenRuns) -> None:
    r = token_runs["revoke_config_token"]
    assert r.returncode == EX_CONFIG
    assert "c.toml" in r.stderr and "[[auth.tokens]]" in r.stderr
    assert "remove its block from the config" in r.stderr
    assert token_runs.snapshots["revoke_config_token"] == token_runs.snapshots["list"]


def test_token_new_creates_the_configured_tokens_file(token_runs: TokenRuns) -> None:
    r = token_runs["new_creates_configured"]
    printed(r)
    created = token_runs.dir / "new" / "created.toml"
    assert str(created) in r.stdout  # relative to the config's directory, shown absolute
    assert [t["name"] for t in tomllib.loads(created.read_text())["tokens"]] == ["x"]
    assert token_runs.modes["new_creates_configured"] == 0o600
    for result in token_runs.results.values():
        assert "Traceback" not in result.stderr


# --- token refusals, in process: nothing is made, nothing is changed ------------------------------


def token_main(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    status = main(["token", *args])
    captured = capsys.readouterr()
    return Result(status, captured.out, captured.err)


def test_token_new_refuses_bad_expiry_and_limits(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    from agentspoonsd import configpaths

    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())  # the host's /etc stays out of it
    for args, message in [
        (["--expires", "2099-01-01T00:00:00"], "--expires: needs a timezone"),
        (["--expires", "2099-01-01"], "--expires: must be an RFC 3339 date-time"),
        (["--expires", "2001-01-01T00:00:00Z"], "already past"),
        (["--max-connections", "0"], "--max-connections: Input should be greater than"),
    ]:
        r = token_main(capsys, "new", "x", *args)
        assert r.returncode == EX_CONFIG and message in r.stderr, (args, r.stderr)
        assert "token:" not in r.stdout


def test_token_new_without_a_file_prints_expiry_and_limit_in_the_block(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    from agentspoonsd import configpaths

    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())
    r = token_main(
        capsys, "new", "x", "--expires", "2099-01-01T00:00:00+02:00", "--max-connections", "4"
    )
    assert r.returncode == 0, r.stderr
    entry = tomllib.loads(r.stdout[r.stdout.index("[[auth.tokens]]") :])["auth"]["tokens"][0]
    assert entry["max_connections"] == 4
    assert TokenSettings(**entry).expires.isoformat() == "2099-01-01T00:00:00+02:00"  # type: ignore[union-attr]
    assert list(no_agentspoonsd_env.iterdir()) == []  # no file written


def test_token_refusals_with_a_config(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    tmp = no_agentspoonsd_env
    plain = tmp / "plain.toml"
    plain.write_text(GOOD)  # a [[auth.tokens]] "dashboard", no tokens file
    r = token_main(capsys, "revoke", "x", "--config", str(plain))
    assert r.returncode == EX_CONFIG and "auth.tokens_file is not set" in r.stderr
    r = token_main(capsys, "new", "dashboard", "--config", str(plain))
    assert r.returncode == EX_CONFIG and '"dashboard" is already in' in r.stderr
    assert "token:" not in r.stdout

    missing = tmp / "missing.toml"
    missing.write_text('[auth]\ntokens_file = "nowhere.toml"\n')
    r = token_main(capsys, "list", "--config", str(missing))
    assert r.returncode == EX_CONFIG
    assert "auth.tokens_file: " in r.stderr and "nowhere.toml: file not found" in r.stderr
    r = token_main(capsys, "revoke", "x", "--config", str(missing))
    assert r.returncode == EX_CONFIG and "file not found" in r.stderr

    tokens = tmp / "t.toml"
    assert token_main(capsys, "new", "a", "--file", str(tokens)).returncode == 0
    before = tokens.read_bytes()
    r = token_main(capsys, "revoke", "b", "--file", str(tokens))
    assert r.returncode == EX_CONFIG and 'no token named "b"' in r.stderr
    assert tokens.read_bytes() == before


def test_token_list_without_tokens(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    from agentspoonsd import configpaths

    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())
    r = token_main(capsys, "list")
    assert r.returncode == 0
    assert r.stdout.split() == [
        "NAME",
        "STATUS",
        "SYMBOLS",
        "EXPIRES",
        "MAX_CONNECTIONS",
        "SHA256",
        "SOURCE",
    ]
    assert "ephemeral" in r.stderr


# --- stdout closed early (`| head`), port clashes, --help -----------------------------------------


def run_with_closed_stdout(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command with a stdout pipe whose reader is already gone: its first write fails with
    EPIPE, as it does after `| head -1` has read its line and exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "agentspoonsd", *args],
            cwd=cwd,
            env=clean_environ(),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["check-config"],
        ["--version"],
        ["--help"],
        ["run", "--help"],
        ["simulate", "--steps", "3"],
        ["token", "list"],
        ["token", "new", "dashboard"],
    ],
    ids=" ".join,
)
def test_a_closed_stdout_ends_every_printing_command_quietly(
    args: list[str], tmp_path: Path
) -> None:
    result = run_with_closed_stdout(args, tmp_path)
    # 128 + SIGPIPE, as a shell reports it; argparse prints --help and --version itself and
    # ignores a failed write (then 0).
    expected = {0, 141} if "--help" in args or "--version" in args else {141}
    assert result.returncode in expected, result.stderr
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
    assert "Exception ignored" not in result.stderr


def test_check_config_piped_into_head_prints_no_traceback(tmp_path: Path) -> None:
    """The shell pipeline itself; simulate's output is far larger than the pipe's buffer, so the
    daemon's writes outlive `head` whatever the timing."""
    script = (
        f"{sys.executable} -m agentspoonsd check-config | head -1 &&"
        f" {sys.executable} -m agentspoonsd simulate --steps 20000 | head -1"
    )
    result = subprocess.run(
        ["sh", "-c", script],
        cwd=tmp_path,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "{"
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


@pytest.mark.parametrize("service", ["websocket", "http"])
def test_a_port_clash_names_the_address(service: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ws_port, http_port = (port, 0) if service == "websocket" else (0, port)
        config = tmp_path / "clash.toml"
        config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {ws_port}\n'
            f'[health]\nhost = "127.0.0.1"\nport = {http_port}\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "agentspoonsd", "run", "--config", str(config)],
            cwd=tmp_path,
            env=clean_environ(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 71, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [e for e in events if e["event"] == "listener_bind_failed"]
    assert len(failed) == 1, events
    assert failed[0]["service"] == service
    assert failed[0]["address"] == f"127.0.0.1:{port}"
    assert failed[0]["error"] == "Address already in use"


def test_run_and_check_config_help_list_search_order_environment_and_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agentspoonsd import cli, exits

    assert [status for status, _ in cli.RUN_EXIT_STATUSES] == [
        exits.EX_OK,
        exits.EX_SOFTWARE,
        exits.EX_OSERR,
        exits.EX_CANTCREAT,
        exits.EX_CONFIG,
    ]
    for command, statuses in (("run", (0, 70, 71, 73, 78)), ("check-config", (0, 78))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        order = [
            "--config PATH",
            "$AGENTSPOONSD_CONFIG",
            "./agentspoonsd.toml",
            "/etc/agentspoonsd",
        ]
        positions = [text.index(item, text.index("config file")) for item in order]
        assert positions == sorted(positions), text
        for name in (
            "AGENTSPOONSD_<SECTION>__<KEY>",
            "AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED",
            "AGENTSPOONSD_TOKEN",
            "AGENTSPOONSD_URL",
        ):
            assert name in text
        listed = [
            int(line.split()[0])
            for line in text[text.index("exit status:") :].splitlines()[1:]
            if line.strip()
        ]
        assert listed == sorted({*statuses, 2, 141})


def test_token_new_warns_about_symbols_the_config_does_not_publish(
    capsys: pytest.CaptureFixture[str], no_agentspoonsd_env: Path
) -> None:
    """A warning on stderr, per symbol, with the close match; the token is still made (the
    config may be about to publish it). Checked against the config in use, file or not."""
    config = no_agentspoonsd_env / "c.toml"
    config.write_text(GOOD)  # publishes BTC/USD and ETH/USD
    with_file = no_agentspoonsd_env / "f.toml"
    with_file.write_text(GOOD.replace("[auth]\n", '[auth]\ntokens_file = "t.toml"\n'))
    for path in (config, with_file):
        c = ("--config", str(path))
        for n, symbols in enumerate((["ETH/USD"], ["*"], ["BTC/USD", "ETH/USD"])):
            r = token_main(capsys, "new", f"ok{n}", *c, "--symbols", *symbols)
            assert r.returncode == 0 and r.stderr.count("warning") == 0, (symbols, r.stderr)

        r = token_main(capsys, "new", "typo", *c, "--symbols", "btc/usd", "DOGE/USD")
        assert r.returncode == 0 and r.stdout.startswith("token: ")
        lines = r.stderr.splitlines()
        assert len(lines) == 3, r.stderr
        assert '"btc/usd" is not published by' in lines[0] and str(path) in lines[0]
        assert "(generator.symbols: BTC/USD, ETH/USD)" in lines[0]
        assert 'did you mean "BTC/USD"?' in lines[0]
        assert '"DOGE/USD" is not published' in lines[1] and "did you mean" not in lines[1]
        assert "allows none of the published symbols" in lines[2] and "no_symbols" in lines[2]

        r = token_main(capsys, "new", "part", *c, "--symbols", "ETH/USD", "ETHUSD")
        assert r.returncode == 0
        (line,) = r.stderr.splitlines()
        assert '"ETHUSD" is not published' in line and 'did you mean "ETH/USD"?' in line
    assert [
        t["name"] for t in tomllib.loads((no_agentspoonsd_env / "t.toml").read_text())["tokens"]
    ] == ["ok0", "ok1", "ok2", "typo", "part"]


def test_token_new_without_a_config_checks_the_built_in_symbols(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_agentspoonsd_env: Path,
) -> None:
    from agentspoonsd import configpaths

    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())
    r = token_main(capsys, "new", "x", "--symbols", "ETH/USD")
    assert r.returncode == 0
    assert '"ETH/USD" is not published by the built-in defaults' in r.stderr
    assert "(generator.symbols: BTC/USD)" in r.stderr
