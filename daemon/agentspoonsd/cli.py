"""Command line: `agentspoonsd run | check-config | token new NAME | simulate | --version`.

Exit statuses follow sysexits: 0 ok, 70 a service exhausted its crash budget, 71 a listener could
not be bound, 78 the configuration is invalid (nothing was started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .auth import hash_token, new_token
from .settings import EXIT_CONFIG, ConfigError, Settings, find_config_path, load_settings, redacted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentspoonsd", description="Real-time market-volatility streaming daemon."
    )
    parser.add_argument("--version", action="version", version=f"agentspoonsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the daemon")
    run.add_argument("--config", metavar="PATH", help="TOML config file")
    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", metavar="PATH", help="TOML config file")

    token = commands.add_parser("token", help="manage bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser("new", help="print a new token and its config block")
    new.add_argument("name", help="the token's name, shown in logs (e.g. dashboard)")
    new.add_argument("--symbols", nargs="+", default=["*"], help='allowed symbols (default "*")')

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
        help="timestamp origin: update k is stamped start + k × bar_seconds",
    )
    sim.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    return parser


def _settings(config: str | None) -> tuple[Settings, Path | None]:
    path = find_config_path(config, os.environ)
    return load_settings(path), path


def _check_config(config: str | None) -> int:
    try:
        settings, path = _settings(config)
    except ConfigError as exc:
        print(f"agentspoonsd: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"# effective configuration from {path or 'built-in defaults'}", file=sys.stderr)
    print(json.dumps(redacted(settings), indent=2, ensure_ascii=False))
    return 0


def _toml_string(value: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, except the surrogate pairs `ensure_ascii`
    writes for characters past U+FFFF (TOML wants scalar values) and DEL, which JSON leaves raw."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _token_new(name: str, symbols: list[str]) -> int:
    from .settings import TokenSettings

    try:
        TokenSettings(name=name, sha256="0" * 64, symbols=symbols)
    except ValueError as exc:
        print(f"agentspoonsd: invalid token name or symbols: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    token = new_token()
    listed = ", ".join(_toml_string(s) for s in symbols)
    print(f"token: {token}")
    print("# Shown once: give it to the client; only its digest goes in the config.")
    print("# Paste into agentspoonsd.toml, then reload (systemctl reload agentspoonsd):\n")
    print(f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{hash_token(token)}"\nsymbols = [{listed}]')
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
            overrides = dict(generator.overrides)
            override = overrides.get(symbol)
            overrides[symbol] = (
                override.model_copy(update={"model": args.model})
                if override
                else {"model": args.model}
            )
            changes["overrides"] = overrides
        generator = type(generator).model_validate({**generator.model_dump(), **changes})
        start = datetime.fromisoformat(args.start.replace("Z", "+00:00"))
        if start.utcoffset() is None or args.steps < 0:
            raise ValueError("--start needs a UTC offset (e.g. Z) and --steps must be >= 0")
    except (ConfigError, ValueError) as exc:
        print(f"agentspoonsd: simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    tune_gc()  # a few dicts per bar and no cycles: the collector would only cost time
    write = write_csv if args.format == "csv" else write_jsonl
    records = simulate(generator, symbol, args.steps, start)
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
        print(f"agentspoonsd: invalid configuration:\n{exc}", file=sys.stderr)
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
        return EXIT_CONFIG
    # Imported here so `--version`, `token` and `check-config` don't pay for numpy and trio.
    import trio

    from .daemon import EXIT_SOFTWARE, Daemon
    from .logs import configure_logging
    from .supervisor import CrashBudgetExceeded

    gate = configure_logging(settings.log.level, settings.log.format)
    daemon = Daemon(settings, path, gate)
    tune_gc()
    try:
        return trio.run(daemon.run)
    except BaseExceptionGroup as group:
        if group.subgroup(CrashBudgetExceeded) is None:
            raise
        return EXIT_SOFTWARE


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
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "token":
        return _token_new(args.name, args.symbols)
    if args.command == "simulate":
        return _simulate(args)
    return _run(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
