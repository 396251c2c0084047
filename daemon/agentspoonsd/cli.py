"""Command line: `agentspoonsd run | check-config | token new|list|revoke | simulate | --version`.

Exit statuses follow sysexits: 0 ok, 70 a service exhausted its crash budget, 71 a listener could
not be bound, 73 the tokens file cannot be written, 78 the configuration is invalid (nothing was
started) or a token command was refused (nothing was changed); 141 (128 + SIGPIPE, as a shell
reports a command killed by it) when the reader of stdout went away (`| head -1`): the command
stops quietly, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, tools
from .auth import hash_token, new_token
from .configpaths import (
    CLIENT_ENV_VARS,
    CONFIG_ENV_VAR,
    DEFAULT_SEARCH_PATHS,
    ENV_PREFIX,
    ConfigError,
    find_config_path,
)
from .exits import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_OSERR, EX_PIPE, EX_SOFTWARE

if TYPE_CHECKING:  # loaded by the commands that read the config, not by --version or --help
    from .settings import Settings

RUN_EXIT_STATUSES = (
    (EX_OK, "stopped by SIGTERM or SIGINT"),
    (EX_SOFTWARE, "a service exhausted its crash budget"),
    (EX_OSERR, "a listener could not be bound (the log's listener_bind_failed names the address)"),
    (EX_CANTCREAT, "the persisted history cannot be read or created"),
    (EX_CONFIG, "the configuration is invalid: nothing was started"),
)
CHECK_EXIT_STATUSES = (
    (EX_OK, "the configuration is valid (printed as JSON)"),
    (EX_CONFIG, "the configuration is invalid: one line per problem on stderr"),
)


def config_help(statuses: Sequence[tuple[int, str]]) -> str:
    """The epilog of the commands that read the config: where it is found, the environment
    variables, the exit statuses. Built from `configpaths` and `exits`, so it cannot drift from
    them."""
    search = [
        "  --config PATH                     (must exist)",
        f"  {'$' + CONFIG_ENV_VAR:<34}(must exist)",
        *(f"  {path if path.is_absolute() else f'./{path}'}" for path in DEFAULT_SEARCH_PATHS),
        "  else the built-in defaults",
    ]
    clients = ", ".join(sorted(CLIENT_ENV_VARS))
    environment = [
        f"  {ENV_PREFIX}<SECTION>__<KEY>=VALUE",
        "      overrides one key; `__` between every level of a nested key, e.g.",
        f"      {ENV_PREFIX}SERVER__PORT=9000,",
        f"      {ENV_PREFIX}GENERATOR__GARCH_FIT__ENABLED=false; lists and tables as JSON:",
        f'      {ENV_PREFIX}GENERATOR__SYMBOLS=\'["BTC/USD", "ETH/USD"]\'. It wins over the file;',
        "      one naming no key is an error (exit 78).",
        f"  {CONFIG_ENV_VAR}",
        "      the config file (above)",
        f"  {clients}",
        "      read by `watch` and `probe` only, never overrides",
    ]
    every = [
        *statuses,
        (2, "a usage error (a bad option)"),
        (EX_PIPE, "stdout was closed before all was written (`| head`): stopped quietly"),
    ]
    exits = [f"  {status:<4}{meaning}" for status, meaning in sorted(every)]
    return "\n".join(
        [
            "config file (the first of):",
            *search,
            "",
            "environment:",
            *environment,
            "",
            "exit status:",
            *exits,
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentspoonsd", description="Real-time market-volatility streaming daemon."
    )
    parser.add_argument("--version", action="version", version=f"agentspoonsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="start the daemon",
        description="Serve the stream until SIGTERM or SIGINT; SIGHUP reloads the config.",
        epilog=config_help(RUN_EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", metavar="PATH", help="TOML config file")
    check = commands.add_parser(
        "check-config",
        help="validate and print the effective config",
        description="Validate the config (file and environment) as `run` would, and print the"
        " effective configuration as JSON, token digests shortened.",
        epilog=config_help(CHECK_EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config", metavar="PATH", help="TOML config file")

    token = commands.add_parser("token", help="manage bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser(
        "new",
        help="make a token: append it to the tokens file, or print its config block",
        description="Print a new token once. With --file, or auth.tokens_file in the config, its"
        " entry is appended to that file (created mode 0600); otherwise the [[auth.tokens]]"
        " block to paste into the config is printed. A symbol the config in use does not"
        " publish (generator.symbols) is warned about on stderr; the token is still made.",
    )
    new.add_argument("name", help="the token's name, shown in logs (e.g. dashboard)")
    new.add_argument("--symbols", nargs="+", default=["*"], help='allowed symbols (default "*")')
    new.add_argument(
        "--expires", metavar="RFC3339", help="refused from then on, e.g. 2026-12-31T00:00:00Z"
    )
    new.add_argument(
        "--max-connections", type=int, metavar="N", help="connections at once (default: any)"
    )
    new.add_argument("--file", metavar="PATH", help="tokens file (default: auth.tokens_file)")
    new.add_argument("--config", metavar="PATH", help="TOML config file")
    listing = token_commands.add_parser(
        "list", help="the configured tokens: scopes, expiry, limits, source (digests shortened)"
    )
    listing.add_argument("--config", metavar="PATH", help="TOML config file")
    revoke = token_commands.add_parser(
        "revoke", help="remove a token from the tokens file (then reload the daemon)"
    )
    revoke.add_argument("name", help="the token's name")
    revoke.add_argument("--file", metavar="PATH", help="tokens file (default: auth.tokens_file)")
    revoke.add_argument("--config", metavar="PATH", help="TOML config file")

    sim = commands.add_parser(
        "simulate", help="write the synthetic stream offline (JSON Lines or CSV), at full speed"
    )
    sim.add_argument("--config", metavar="PATH", help="TOML config file (model parameters)")
    sim.add_argument("--symbol", default=None, help="symbol (default: the first configured)")
    sim.add_argument(
        "--model", choices=("gbm", "garch", "gjr_garch", "heston"), help="override the model"
    )
    sim.add_argument("--steps", type=int, default=1000, help="updates to write (default 1000)")
    sim.add_argument("--seed", type=int, default=None, help="override [generator] seed")
    sim.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    sim.add_argument(
        "--start",
        default="2025-01-01T00:00:00Z",
        help="close of the first update: update k closes at start + (k - 1) × bar_seconds",
    )
    sim.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    tools.add_commands(commands)
    # Hidden (no help): how a master with `[server] workers` > 1 starts each worker process.
    worker = commands.add_parser("_worker")
    for option in ("--index", "--channel-fd", "--handoff-fd"):
        worker.add_argument(option, type=int, required=True)
    return parser


def _invalid(exc: ConfigError) -> str:
    """The message for a refused config: on the same line when it is one problem, else one
    problem per line below."""
    message = str(exc)
    separator = "\n" if "\n" in message else " "
    return f"invalid configuration:{separator}{message}"


def _settings(config: str | None) -> tuple[Settings, Path | None]:
    from .settings import load_settings

    path = find_config_path(config, os.environ)
    return load_settings(path), path


def _check_config(config: str | None) -> int:
    from .settings import redacted

    try:
        settings, path = _settings(config)
    except ConfigError as exc:
        print(f"agentspoonsd: {_invalid(exc)}", file=sys.stderr)
        return EX_CONFIG
    print(f"# effective configuration from {path or 'built-in defaults'}", file=sys.stderr)
    print(json.dumps(redacted(settings), indent=2, ensure_ascii=False))
    return 0


_TOKEN_OPTIONS = {
    "name": "NAME",
    "symbols": "--symbols",
    "expires": "--expires",
    "max_connections": "--max-connections",
}
RELOAD_HINT = "systemctl reload agentspoonsd, or kill -HUP <pid>"


def _fail(message: str, status: int = EX_CONFIG) -> int:
    print(f"agentspoonsd: {message}", file=sys.stderr)
    return status


def _tokens_config(
    args: argparse.Namespace, *, read_tokens_file: bool
) -> tuple[Settings | None, Path | None]:
    """The config a token command works with. With --file and no --config there is none: the file
    is all the command touches."""
    from .settings import load_settings

    if getattr(args, "file", None) is not None and args.config is None:
        return None, None
    path = find_config_path(args.config, os.environ)
    return load_settings(path, read_tokens_file=read_tokens_file), path


def _token_new(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .settings import TokenSettings, parse_tokens_file
    from .tokenfile import TokenFileError, append_token, check_new, entry_text, scope_warnings

    try:
        entry = TokenSettings(
            name=args.name,
            sha256="0" * 64,
            symbols=args.symbols,
            expires=args.expires,
            max_connections=args.max_connections,
        ).spec()
        check_new(entry)
    except ValidationError as exc:
        details = "; ".join(
            f"{_TOKEN_OPTIONS.get(str(e['loc'][0]), e['loc'][0])}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        return _fail(f"invalid token name or options: {details}")
    except TokenFileError as exc:
        return _fail(f"invalid token options: {exc}")
    try:
        settings, config_path = _tokens_config(args, read_tokens_file=False)
    except ConfigError as exc:
        return _fail(_invalid(exc))
    in_config = {t.name for t in settings.auth.tokens} if settings else set()
    file = Path(args.file) if args.file else settings.auth.tokens_file if settings else None
    if args.name in in_config:
        return _fail(
            f'a token named "{args.name}" is already in {config_path or "the config"}'
            " ([[auth.tokens]]); choose another name"
        )

    if settings is not None:  # a warning, not a refusal: the config may be about to change
        source = str(config_path) if config_path else "the built-in defaults"
        for line in scope_warnings(entry.symbols, settings.generator.symbols, source):
            print(f"agentspoonsd: warning: {line}", file=sys.stderr)

    token = new_token()
    entry = dataclasses.replace(entry, sha256=hash_token(token))
    if file is None:
        print(f"token: {token}")
        print("# Shown once: give it to the client; only its digest goes in the config.")
        print(f"# Paste into agentspoonsd.toml, then reload: {RELOAD_HINT}\n")
        print(entry_text(entry, table="auth.tokens"), end="")
        return 0
    try:
        created = append_token(file, entry, parse=parse_tokens_file, taken=in_config)
    except TokenFileError as exc:
        return _fail(f"token new: {exc}")
    except OSError as exc:
        return _fail(f"token new: {file}: cannot write: {exc.strerror}", EX_CANTCREAT)
    print(f"token: {token}")
    print("# Shown once: give it to the client; only its digest is stored.")
    print(f'# Added "{entry.name}" to {file}' + (" (created, mode 0600)." if created else "."))
    print(f"# Reload the daemon to accept it: {RELOAD_HINT}")
    mode = os.stat(file).st_mode & 0o777
    if mode & 0o077:
        print(f"agentspoonsd: warning: {file} is mode {mode:04o}: chmod 600 it", file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from .tokenfile import format_expires

    try:
        settings, path = _tokens_config(args, read_tokens_file=True)
    except ConfigError as exc:
        return _fail(_invalid(exc))
    assert settings is not None
    auth = settings.auth
    now = datetime.now(UTC)
    rows = [("NAME", "STATUS", "SYMBOLS", "EXPIRES", "MAX_CONNECTIONS", "SHA256", "SOURCE")]
    for tokens, source in ((auth.tokens, "config"), (auth.file_tokens, "tokens_file")):
        for t in tokens:
            rows.append(
                (
                    t.name,
                    "expired" if t.expired(now) else "active",
                    ",".join(t.symbols) or "-",
                    format_expires(t.expires.astimezone(UTC)) if t.expires else "never",
                    str(t.max_connections) if t.max_connections is not None else "unlimited",
                    t.sha256[:8],  # enough to tell tokens apart, never the whole digest
                    source,
                )
            )
    print(
        f"# config: {path or 'built-in defaults'}; tokens_file: {auth.tokens_file or 'none'}",
        file=sys.stderr,
    )
    if not auth.enabled:
        print(
            "# auth is disabled: the daemon serves anyone, these tokens are not checked",
            file=sys.stderr,
        )
    elif len(rows) == 1:
        print("# no tokens: the daemon makes an ephemeral one at each start", file=sys.stderr)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from .settings import parse_tokens_file
    from .tokenfile import TokenFileError, remove_token

    try:
        settings, config_path = _tokens_config(args, read_tokens_file=args.file is None)
    except ConfigError as exc:
        return _fail(_invalid(exc))
    if settings is not None and any(t.name == args.name for t in settings.auth.tokens):
        return _fail(
            f'token "{args.name}" is defined in {config_path or "the environment"}'
            " ([[auth.tokens]]), not in a tokens file: remove its block from the config there,"
            f" then reload: {RELOAD_HINT}"
        )
    file = Path(args.file) if args.file else settings.auth.tokens_file if settings else None
    if file is None:
        return _fail(
            f"no tokens file: auth.tokens_file is not set in {config_path or 'the config'}"
            f' and no --file was given; no token "{args.name}" to revoke'
        )
    try:
        remove_token(file, args.name, parse=parse_tokens_file)
    except TokenFileError as exc:
        return _fail(f"token revoke: {exc}")
    except OSError as exc:
        return _fail(f"token revoke: {file}: cannot rewrite: {exc.strerror}", EX_CANTCREAT)
    print(f'Revoked "{args.name}": removed from {file}.')
    print("Reload the daemon to apply it; the token's live connections are then closed (4001):")
    print(f"  {RELOAD_HINT}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from .market.simulate import simulate, write_csv, write_jsonl

    try:
        settings, _ = _settings(args.config)
        generator = settings.generator
        symbol = generator.symbols[0] if args.symbol is None else args.symbol
        changes: dict[str, object] = {"source": "synthetic"}
        if symbol not in generator.symbols:
            changes["symbols"] = [*generator.symbols, symbol]
        if args.seed is not None:
            changes["seed"] = args.seed
        if args.model is not None:
            # Validated below, with the rest: a new symbol's override may be a plain table.
            overrides: dict[str, object] = dict(generator.overrides)
            override = generator.overrides.get(symbol)
            overrides[symbol] = (
                override.model_copy(update={"model": args.model})
                if override
                else {"model": args.model}
            )
            changes["overrides"] = overrides
        spec = type(generator).model_validate({**generator.model_dump(), **changes}).spec()
        start = datetime.fromisoformat(args.start.replace("Z", "+00:00"))
        if start.utcoffset() is None or args.steps < 0:
            raise ValueError("--start needs a UTC offset (e.g. Z) and --steps must be >= 0")
    except (ConfigError, ValueError) as exc:
        print(f"agentspoonsd: simulate: {exc}", file=sys.stderr)
        return EX_CONFIG
    tune_gc()  # a few dicts per bar and no cycles: the collector would only cost time
    write = write_csv if args.format == "csv" else write_jsonl
    records = simulate(spec, symbol, args.steps, start)
    if args.output:
        with open(args.output, "wb") as out:
            write(records, out)
    else:
        write(records, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return 0


def _run(config: str | None) -> int:
    try:
        settings, path = _settings(config)
    except ConfigError as exc:
        # Logging is not configured yet (the log settings may be what is wrong): plain stderr,
        # plus one JSON line on stdout so a journal reader sees it too.
        print(f"agentspoonsd: {_invalid(exc)}", file=sys.stderr)
        sys.stdout.write(
            json.dumps(
                {
                    "event": "config_invalid",
                    "level": "error",
                    "logger": "agentspoonsd.cli",
                    "error": str(exc),
                }
            )
            + "\n"
        )
        return EX_CONFIG
    # Imported here: `--version`, `token` and `check-config` need neither trio nor the daemon.
    import trio

    from .banner import program_command
    from .daemon import Daemon
    from .logs import configure_logging
    from .supervisor import CrashBudgetExceeded

    gate = configure_logging(settings.log.level, settings.log.format)
    program = program_command(sys.argv[0], sys.executable, frozen=getattr(sys, "frozen", False))
    daemon = Daemon(settings, path, gate, program=program)
    tune_gc()
    try:
        return trio.run(daemon.run)
    except BaseExceptionGroup as group:
        if group.subgroup(CrashBudgetExceeded) is None:
            raise
        return EX_SOFTWARE


def tune_gc() -> None:
    """Keep the cyclic collector off the hot path.

    Everything allocated at start-up lives for the whole run: `gc.freeze` takes it out of every
    future collection. Thousands of long-lived connection objects would otherwise make each
    young-generation collection expensive during a reconnect storm, so the first threshold is
    raised too. Nothing in the daemon relies on prompt collection of reference cycles.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A reader of stdout that went away (`| head -1`) ends
    any command quietly with EX_PIPE, never with a BrokenPipeError traceback."""
    broken_pipe = False
    status = 0
    try:
        try:
            status = _command(argv)
        finally:
            # Here, not at exit, where a broken pipe could only print a warning; `finally`: after
            # --help and --version too, which end in SystemExit.
            sys.stdout.flush()
    except* BrokenPipeError:  # a group too: `watch` prints from inside trio
        broken_pipe = True
    if broken_pipe:
        _discard_stdout()
        return EX_PIPE
    return status


def _discard_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered is then flushed there at exit instead of
    raising again ("Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _command(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "token":
        commands = {"new": _token_new, "list": _token_list, "revoke": _token_revoke}
        return commands[args.token_command](args)
    if args.command == "simulate":
        return _simulate(args)
    if args.command in tools.COMMANDS:
        return tools.run_command(args)
    if args.command == "_worker":
        return _worker(args)
    return _run(args.config)


def _worker(args: argparse.Namespace) -> int:
    """A fan-out worker, started by its master (`workerpool`) on inherited descriptors."""
    from .worker import run_worker

    tune_gc()
    return run_worker(args.index, args.channel_fd, args.handoff_fd)


if __name__ == "__main__":
    raise SystemExit(main())
