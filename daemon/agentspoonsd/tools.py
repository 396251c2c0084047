"""`agentspoonsd watch` and `agentspoonsd probe`: the Python client on the command line.

``watch [URL] [--config PATH] [--symbol S ...] [--json] [--token T] [--count N]``
    The live stream: a table line per update for people (symbol, seq, bar time, price,
    volatility per bar, annualised close-to-close, GARCH one-step volatility per bar), or with
    ``--json`` each update's ``data`` object as one JSON line (what ``simulate`` writes).
    Reconnects and resumes by itself (`agentspoonsd.client`), so the stream it prints has no gap
    and no duplicate unless the daemon says it cannot replay (a ``reset``, reported on stderr).
    Connection events go to stderr; stdout carries only the header and the updates.
    Exit: 0 after SIGINT/SIGTERM (the connection is closed with 1000), after ``--count``
    updates, or when stdout is closed; 77 (EX_NOPERM) if the token is refused; 64 (EX_USAGE)
    for a bad URL; 78 (EX_CONFIG) for a config that cannot be used.

``probe [URL] [--config PATH] [--timeout S] [--token T] [--symbol S]``
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
    78   EX_CONFIG       the config the URL is taken from cannot be used
    ===  ==============  ==========================================================

Both take the token from ``--token`` or, better (it stays out of shell history and ``ps``),
from ``AGENTSPOONSD_TOKEN``. They find the daemon as `resolve_target` says (`WHERE`): the URL
argument, else ``AGENTSPOONSD_URL``, else the daemon's own config (``--config``,
``AGENTSPOONSD_CONFIG``, ./agentspoonsd.toml, /etc/agentspoonsd/agentspoonsd.toml, with the
``AGENTSPOONSD_SERVER__*`` overrides), else ``ws://127.0.0.1:8765/``. A config that cannot be
used is one line on stderr naming the key, and exit 78 (EX_CONFIG), as ``check-config``. When
the daemon's certificate is refused and the URL came from a config with ``tls_cert``, the message
says how to trust it with ``--cafile`` (the file itself when it is self-signed).

`add_commands` registers both on the ``agentspoonsd`` argument parser, `run_command` runs one;
``python -m agentspoonsd.tools watch ...`` works on its own too.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configpaths import ConfigError, find_config_path
from .exits import EX_CONFIG, EX_NOPERM, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

if TYPE_CHECKING:  # the client (anyio, wsproto) and the config models only when a command runs
    from .client import Status, VolatilityClient
    from .settings import ServerSettings

COMMANDS = ("watch", "probe")
DEFAULT_URL = "ws://127.0.0.1:8765/"
TOKEN_ENV = "AGENTSPOONSD_TOKEN"
URL_ENV = "AGENTSPOONSD_URL"

WHERE = f"""\
Where the daemon is: the first of these that is given.
  1. the URL argument;
  2. ${URL_ENV};
  3. its config: --config PATH, else $AGENTSPOONSD_CONFIG, else ./agentspoonsd.toml,
     else /etc/agentspoonsd/agentspoonsd.toml (with AGENTSPOONSD_SERVER__PORT etc. applied):
     wss:// when [server] tls_cert is set, [server] host (0.0.0.0 and :: become 127.0.0.1
     and ::1) and [server] port; a config that cannot be used exits 78;
  4. {DEFAULT_URL}
The token: --token, else ${TOKEN_ENV} (which keeps it out of shell history and ps)."""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``watch`` and ``probe`` on an argparse subparsers object (``dest="command"``)."""
    token_help = f"bearer token (default: ${TOKEN_ENV})"
    cafile_help = "wss://: trust this CA (PEM) instead of the system's"
    url_help = (
        f"ws:// or wss:// URL (default: ${URL_ENV}, else from the config, else {DEFAULT_URL})"
    )
    config_help = "the daemon's TOML config, to find its address (when no URL is given)"
    watch = subparsers.add_parser(
        "watch",
        help="print the live stream (reconnects and resumes by itself)",
        description="Print the live stream: a table for people, or JSON lines with --json.",
        epilog=WHERE
        + "\nExit: 0 after Ctrl-C/SIGTERM or --count updates, 77 token refused, 64 bad URL,"
        " 78 bad config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument("url", nargs="?", help=url_help)
    watch.add_argument("--config", metavar="PATH", help=config_help)
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
        description="Connectivity check: 0 ok, 69 unavailable, 75 timeout, 77 token refused,\n"
        "64 bad URL, 78 bad config.",
        epilog=WHERE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument("url", nargs="?", help=url_help)
    probe.add_argument("--config", metavar="PATH", help=config_help)
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
        target = resolve_target(args.url, args.config)
    except ConfigError as exc:
        # One line, as a monitoring check's output is read: several problems joined with "; ".
        problems = "; ".join(str(exc).splitlines())
        _note(args.command, f"invalid configuration: {problems}")
        return EX_CONFIG
    try:
        context = _ssl_context(args.cafile)
    except OSError as exc:  # ssl.SSLError is an OSError
        _note(args.command, f"--cafile {args.cafile}: {exc}")
        return EX_USAGE
    hint = None if context is not None else _HintOnce(target)
    if args.command == "watch":
        return _run_watch(
            target.url,
            token,
            args.symbol,
            as_json=args.json,
            count=args.count,
            context=context,
            hint=hint,
        )
    return _run_probe(target, token, args.timeout, args.symbol, context, hint)


# --- where the daemon is ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where `watch` and `probe` connect, and why there."""

    url: str
    # "argument", "$AGENTSPOONSD_URL", the config file's path, or "built-in defaults" (which
    # the AGENTSPOONSD_SERVER__* overrides may have changed).
    source: str
    # The config's server.tls_cert (absolute) when the URL came from a config: what to trust.
    tls_cert: Path | None = None


def connect_host(bind_host: str) -> str:
    """The host, as a URL writes it, at which a listener bound to `bind_host` is reached.

    A wildcard ("" or any spelling of 0.0.0.0 or ::) is every local address, not one to connect
    to: it becomes the loopback address of its family. An IPv6 literal is bracketed; a name is
    kept as it is.
    """
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        return bind_host or "127.0.0.1"  # a name, or "" (binds every IPv4 address)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"[{address}]" if address.version == 6 else str(address)


def server_url(server: ServerSettings) -> str:
    """The URL of the daemon these ``[server]`` settings describe: ``wss://`` when tls_cert is
    set, else ``ws://``; `connect_host` of the host; the port. No I/O.

    Raises ValueError for port 0: the daemon then picks a free port at each start, which no
    config can tell.
    """
    if server.port == 0:
        raise ValueError(
            "server.port is 0 (a free port picked at each start, logged as listener_bound):"
            " there is no port to connect to; pass the URL"
        )
    scheme = "wss" if server.tls_cert is not None else "ws"
    return f"{scheme}://{connect_host(server.host)}:{server.port}/"


def resolve_target(url: str | None, config: str | None) -> Target:
    """Where to connect: `url` (the argument), else ``$AGENTSPOONSD_URL``, else the daemon's
    config, found as the daemon finds it (`config` is ``--config``) with the environment
    overrides applied, else the built-in defaults (``ws://127.0.0.1:8765/``).

    The config is read only when no URL is given, and then neither the TLS key nor the tokens
    file is opened (a client need not be able to read them). Raises ConfigError, naming the
    key and where its value came from, for a config that cannot be used, port 0 included.
    """
    if url is not None:
        return Target(url, "argument")
    from_env = os.environ.get(URL_ENV)
    if from_env:
        return Target(from_env, f"${URL_ENV}")
    from .settings.loader import key_source, load_settings

    path = find_config_path(config, os.environ)
    settings = load_settings(path, read_tokens_file=False, check_tls_files=False)
    source = str(path) if path is not None else "built-in defaults"
    try:
        found = server_url(settings.server)
    except ValueError as exc:
        raise ConfigError(f"{key_source('server', 'port', path, os.environ)}: {exc}") from None
    return Target(found, source, settings.server.tls_cert)


def untrusted_hint(target: Target) -> str | None:
    """What to do when the daemon's certificate is not trusted, if its config names it: a
    self-signed certificate is its own CA, so ``--cafile`` takes the file itself; otherwise the
    CA that issued it. None when the URL did not come from a config with TLS."""
    cert = target.tls_cert
    if cert is None:
        return None
    if _holds_self_signed(cert):
        return f"server.tls_cert {cert} is self-signed: trust it with --cafile {cert}"
    return (
        f"the daemon's certificate (server.tls_cert {cert}) is not trusted here: pass the CA"
        " that issued it with --cafile PEM"
    )


def _holds_self_signed(cert: Path) -> bool:
    """Whether the PEM file holds a self-signed CA certificate (one that can anchor the chain);
    False when it cannot be read."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=cert)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False
    return any(ca.get("subject") == ca.get("issuer") for ca in context.get_ca_certs())


def _untrusted(error: BaseException | str) -> bool:
    """Whether a connection failure (an exception or its message) is a certificate refused."""
    seen: BaseException | None = error if isinstance(error, BaseException) else None
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(error)  # OpenSSL's reason, as messages carry it


class _HintOnce:
    """Adds `untrusted_hint` to the first message about a refused certificate."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.given = False

    def add(self, message: str, error: BaseException | None = None) -> str:
        """`message`, with the hint when it (or `error`) is the first certificate refusal."""
        if self.given or not _untrusted(message if error is None else error):
            return message
        hint = untrusted_hint(self.target)
        if hint is None:
            return message
        self.given = True
        return f"{message} ({hint})"


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


def _number(value: object, digits: int) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _price(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.6g}"


def _percent(value: object) -> str:
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
    hint: _HintOnce | None = None,
) -> int:
    import trio

    from .client import VolatilityClient

    _quiet_client_log()

    def on_status(status: Status) -> None:
        _note("watch", status.message if hint is None else hint.add(status.message))

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
    target: Target,
    token: str | None,
    timeout: float,
    symbol: str | None,
    context: ssl.SSLContext | None,
    hint: _HintOnce | None = None,
) -> int:
    import trio

    from .client import VolatilityClient

    _quiet_client_log()
    if timeout <= 0:
        _note("probe", "--timeout must be > 0")
        return EX_USAGE
    try:
        client = VolatilityClient(
            target.url,
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

    def note(message: str, error: BaseException | None = None) -> None:
        if target.source != "argument":  # the URL was found, not given: say where
            message = f"{message} (URL from {target.source})"
        _note("probe", message if hint is None else hint.add(message, error))

    try:
        return trio.run(_probe, client, timeout, note)
    except KeyboardInterrupt:
        return 130


async def _probe(
    client: VolatilityClient, seconds: float, note: Callable[[str, BaseException | None], None]
) -> int:
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
            note(f"{exc}: {client.display_url}", None)
            return EX_NOPERM
        except ConnectFailed as exc:
            note(str(exc), exc)
            return EX_TEMPFAIL if exc.timeout else EX_UNAVAILABLE
        except ClientError as exc:
            note(f"{exc}: {client.display_url}", exc)
            return EX_UNAVAILABLE
    if update is None:
        where = "connecting" if client.connections == 0 else "an update"
        note(f"timed out after {seconds:g} s waiting for {where}: {client.display_url}", None)
        return EX_TEMPFAIL
    latency = update.latency
    shown = "-" if latency is None else f"{latency * 1000:.1f}"
    print(f"ok {update.symbol} seq={update.seq} latency_ms={shown}", flush=True)
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
