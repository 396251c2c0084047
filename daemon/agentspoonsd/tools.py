"""`agentspoonsd watch` and `agentspoonsd probe`: the Python client on the command line.

``watch [URL] [--symbol S ...] [--json] [--token T] [--count N]``
    The live stream: a table line per update for people (symbol, seq, bar time, price,
    volatility per bar, annualised close-to-close, GARCH one-step volatility per bar), or with
    ``--json`` each update's ``data`` object as one JSON line (what ``simulate`` writes).
    Reconnects and resumes by itself (`agentspoonsd.client`), so the stream it prints has no gap
    and no duplicate unless the daemon says it cannot replay (a ``reset``, reported on stderr).
    Connection events go to stderr; stdout carries only the header and the updates.
    Exit: 0 after SIGINT/SIGTERM (the connection is closed with 1000), after ``--count``
    updates, or when stdout is closed; 77 (EX_NOPERM) if the token is refused; 64 (EX_USAGE)
    for a bad URL.

``probe [URL] [--timeout S] [--token T] [--symbol S]``
    Connects, waits for one update, prints ``ok SYMBOL seq=N latency_ms=X`` (latency: now minus
    the update's outer ``timestamp``, the daemon's publish time; includes any clock offset
    between the hosts) and exits 0: the prototype's connectivity test, usable as a monitoring
    check. Otherwise one line on stderr says why, and the exit status (sysexits.h) is:

    ===  ==============  ==========================================================
    64   EX_USAGE        the URL is not a ws:// or wss:// URL
    69   EX_UNAVAILABLE  connection refused, unreachable, HTTP 503/400, or the
                         connection closed before an update came
    75   EX_TEMPFAIL     nothing within ``--timeout`` seconds (default 10; connecting
                         included)
    77   EX_NOPERM       the token was refused (HTTP 401/403)
    ===  ==============  ==========================================================

Both take the token from ``--token`` or, better (it stays out of shell history and ``ps``),
from ``AGENTSPOONSD_TOKEN``. The URL defaults to ``ws://127.0.0.1:8765/``.

`add_commands` registers both on the ``agentspoonsd`` argument parser, `run_command` runs one;
``python -m agentspoonsd.tools watch ...`` works on its own too.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client (anyio, wsproto) is imported only when a command runs
    from .client import Status, VolatilityClient

COMMANDS = ("watch", "probe")
DEFAULT_URL = "ws://127.0.0.1:8765/"
TOKEN_ENV = "AGENTSPOONSD_TOKEN"

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77


def add_commands(subparsers: Any) -> None:
    """Register ``watch`` and ``probe`` on an argparse subparsers object (``dest="command"``)."""
    token_help = f"bearer token (default: ${TOKEN_ENV})"
    cafile_help = "wss://: trust this CA (PEM) instead of the system's"
    watch = subparsers.add_parser(
        "watch",
        help="print the live stream (reconnects and resumes by itself)",
        description="Print the live stream: a table for people, or JSON lines with --json.",
        epilog="Exit: 0 after Ctrl-C/SIGTERM or --count updates, 77 token refused, 64 bad URL.",
    )
    watch.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    watch.add_argument(
        "--symbol",
        action="append",
        metavar="S",
        help="only this symbol; repeat for several (default: every symbol the token may see)",
    )
    watch.add_argument("--json", action="store_true", help="one JSON `data` object per line")
    watch.add_argument("--token", help=token_help)
    watch.add_argument("--cafile", metavar="PEM", help=cafile_help)
    watch.add_argument(
        "--count", type=int, default=0, metavar="N", help="exit after N updates (default: never)"
    )

    probe = subparsers.add_parser(
        "probe",
        help="connect, wait for one update, print its latency; exit 0, or non-zero with a reason",
        description="Connectivity check: 0 ok, 69 unavailable, 75 timeout, 77 token refused.",
    )
    probe.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    probe.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds (default 10)"
    )
    probe.add_argument("--token", help=token_help)
    probe.add_argument("--cafile", metavar="PEM", help=cafile_help)
    probe.add_argument("--symbol", metavar="S", help="wait for an update of this symbol")


def run_command(args: argparse.Namespace) -> int:
    """Run ``watch`` or ``probe`` (``args.command``) to completion; returns the exit status."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.command not in COMMANDS:
        raise ValueError(f"not a tools command: {args.command!r}")
    try:
        context = _ssl_context(args.cafile)
    except OSError as exc:  # ssl.SSLError is an OSError
        _note(args.command, f"--cafile {args.cafile}: {exc}")
        return EX_USAGE
    if args.command == "watch":
        return _run_watch(
            args.url, token, args.symbol, as_json=args.json, count=args.count, context=context
        )
    return _run_probe(args.url, token, args.timeout, args.symbol, context)


def _ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    return None if cafile is None else ssl.create_default_context(cafile=cafile)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agentspoonsd.tools watch|probe ...``."""
    parser = argparse.ArgumentParser(prog="agentspoonsd", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser.parse_args(argv))


# --- watch ----------------------------------------------------------------------------------

HEADER = (
    f"{'SYMBOL':<10} {'SEQ':>17} {'TIME':<12} {'PRICE':>14} {'VOL/BAR':>10} "
    f"{'C2C ANN':>8} {'GARCH 1-STEP':>12}"
)


def table_line(data: dict[str, Any]) -> str:
    """One update as a row under `HEADER` (missing values as ``-``)."""
    stamp = str(data.get("timestamp") or "")
    clock = stamp[11:23] if len(stamp) >= 19 and stamp[10] == "T" else stamp[:12]
    annual = (data.get("estimators_annualized") or {}).get("close_to_close")
    garch = data.get("garch_forecast") or {}
    garch_vol = garch.get("volatility_1")  # null until a fit: show the fit's status instead
    garch_text = str(garch.get("status") or "-") if garch_vol is None else _number(garch_vol, 8)
    return (
        f"{data.get('symbol')!s:<10} {data.get('seq')!s:>17} {clock:<12} "
        f"{_price(data.get('price')):>14} {_number(data.get('volatility'), 7):>10} "
        f"{_percent(annual):>8} {garch_text:>12}"
    )


def _number(value: Any, digits: int) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _price(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.6g}"


def _percent(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 100:.2f}%"


def _note(command: str, text: str) -> None:
    print(f"{command}: {text}", file=sys.stderr, flush=True)


def _quiet_client_log() -> None:
    """The commands print the client's statuses themselves (`_note`): without this, the
    client's WARNING records would reach stderr a second time through logging's last resort."""
    import logging

    logging.getLogger("agentspoonsd.client").addHandler(logging.NullHandler())


def _run_watch(
    url: str,
    token: str | None,
    symbols: list[str] | None,
    *,
    as_json: bool,
    count: int,
    context: ssl.SSLContext | None,
) -> int:
    import trio

    from .client import VolatilityClient

    _quiet_client_log()

    def on_status(status: Status) -> None:
        _note("watch", status.message)

    try:
        client = VolatilityClient(url, token, symbols, on_status=on_status, ssl_context=context)
    except ValueError as exc:
        _note("watch", str(exc))
        return EX_USAGE
    try:
        return trio.run(_watch, client, as_json, count)
    except KeyboardInterrupt:  # only if it arrives outside the signal handling below
        return EX_OK


async def _watch(client: VolatilityClient, as_json: bool, count: int) -> int:
    import signal

    import orjson
    import trio

    from .client import AuthenticationError, ClientError, StreamReset

    status = EX_OK

    async def stream(cancel_scope: trio.CancelScope) -> None:
        nonlocal status
        try:
            async with client:
                if not as_json:
                    _write(HEADER)
                seen = 0
                while count <= 0 or seen < count:
                    try:
                        data = await client.__anext__()
                    except StreamReset as reset:
                        _note("watch", f"gap: {reset}")
                        continue
                    except StopAsyncIteration:
                        break
                    _write(orjson.dumps(data).decode() if as_json else table_line(data))
                    seen += 1
        except AuthenticationError as exc:
            _note("watch", str(exc))
            status = EX_NOPERM
        except ClientError as exc:
            _note("watch", str(exc))
            status = EX_UNAVAILABLE
        except BrokenPipeError:  # stdout closed (`watch | head`): done, quietly
            _silence_stdout()
        cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, nursery.cancel_scope)
            async for _ in signals:  # stop: leaving the nursery closes the connection (1000)
                nursery.cancel_scope.cancel()
                break
    return status


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --- probe ----------------------------------------------------------------------------------


def _run_probe(
    url: str,
    token: str | None,
    timeout: float,
    symbol: str | None,
    context: ssl.SSLContext | None,
) -> int:
    import trio

    from .client import VolatilityClient

    _quiet_client_log()
    if timeout <= 0:
        _note("probe", "--timeout must be > 0")
        return EX_USAGE
    try:
        client = VolatilityClient(
            url,
            token,
            None if symbol is None else [symbol],
            reconnect=False,
            connect_timeout=timeout,
            close_timeout=min(1.0, timeout),
            keepalive=None,
            ssl_context=context,
        )
    except ValueError as exc:
        _note("probe", str(exc))
        return EX_USAGE
    try:
        return trio.run(_probe, client, timeout)
    except KeyboardInterrupt:
        return 130


async def _probe(client: VolatilityClient, seconds: float) -> int:
    import trio

    from .client import AuthenticationError, ClientError, ConnectFailed, StreamReset

    update = None
    with trio.move_on_after(seconds):
        try:
            async with client:
                while update is None:
                    try:
                        update = await client.receive()
                    except StreamReset:  # cannot happen without resume; keep waiting
                        continue
        except AuthenticationError as exc:
            _note("probe", f"{exc}: {client.display_url}")
            return EX_NOPERM
        except ConnectFailed as exc:
            _note("probe", str(exc))
            return EX_TEMPFAIL if exc.timeout else EX_UNAVAILABLE
        except ClientError as exc:
            _note("probe", f"{exc}: {client.display_url}")
            return EX_UNAVAILABLE
    if update is None:
        where = "connecting" if client.connections == 0 else "an update"
        _note("probe", f"timed out after {seconds:g} s waiting for {where}: {client.display_url}")
        return EX_TEMPFAIL
    latency = update.latency
    shown = "-" if latency is None else f"{latency * 1000:.1f}"
    print(f"ok {update.symbol} seq={update.seq} latency_ms={shown}", flush=True)
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
