"""The development token of `make run`: python build/devtoken.py DIR [--config PATH] [--program P]

`make run` starts the daemon with ``AGENTSPOONSD_AUTH__TOKENS_FILE=DIR/tokens.toml``. Run just
before it, this script makes sure that file holds one token named ``dev`` whose plain text is
in ``DIR/token``, and prints the token with the dashboard URL and a ``watch`` command (from the
config the daemon will read, when its ports are fixed). The first run makes the token; later
runs reuse it, so an open dashboard and a running ``watch`` reconnect with the same token after
the daemon restarts. When the two files no longer agree (one lost or edited), the ``dev`` entry
is replaced by a new token; other entries of the file are left alone.

Where the plain token is kept: ``DIR/token``, mode 0600, in a folder of mode 0700 (``.dev/`` by
default, which git ignores). Keeping a token in plain text is acceptable on a developer's
machine only: the installed daemon (config/, systemd/, build/install.sh) never does this; its
tokens are made with ``agentspoonsd token new``, handed to their clients, and only their
digests are stored.

Exit status: 0, or 73 (EX_CANTCREAT) when a file cannot be written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from agentspoonsd.auth import hash_token, new_token
from agentspoonsd.banner import dashboard_url, watch_command, websocket_url
from agentspoonsd.settings import (
    ConfigError,
    TokenSettings,
    find_config_path,
    load_settings,
    parse_tokens_file,
    read_tokens_file,
)
from agentspoonsd.tokenfile import TokenFileError, append_token, remove_token

NAME = "dev"
EX_CANTCREAT = os.EX_CANTCREAT


def _plain_token(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _dev_entries(tokens_file: Path) -> list[TokenSettings]:
    """The `dev` entries of the tokens file: none when it is missing or cannot be read."""
    if not tokens_file.exists():
        return []
    try:
        return [t for t in read_tokens_file(tokens_file)[0] if t.name == NAME]
    except ConfigError:
        # A damaged file in the development folder: it is this script's, made again below.
        tokens_file.unlink()
        return []


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600) atomically: a reader sees the old file or the new."""
    partial = path.with_name(f".{path.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def ensure_token(folder: Path) -> tuple[str, bool]:
    """The development token of `folder` and whether it was made now.

    Afterwards ``folder/token`` (0600) holds the token and ``folder/tokens.toml`` (0600) one
    ``dev`` entry with its digest; `folder` is mode 0700. Raises OSError or TokenFileError."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    plain, tokens_file = folder / "token", folder / "tokens.toml"
    token = _plain_token(plain)
    entries = _dev_entries(tokens_file)
    if token is not None and [e.sha256 for e in entries] == [hash_token(token)]:
        plain.chmod(0o600)
        return token, False
    if entries:
        remove_token(tokens_file, NAME, parse=parse_tokens_file)
    token = new_token()
    # The plain text first: a failure between the two writes leaves files that disagree, which
    # the next run replaces, never a digest whose token is lost.
    _write_private(plain, token + "\n")
    append_token(
        tokens_file,
        TokenSettings(name=NAME, sha256=hash_token(token)).spec(),
        parse=parse_tokens_file,
    )
    return token, True


def usage_lines(token: str, config: str | None, program: list[str]) -> list[str]:
    """``name  value`` lines: the token, and the dashboard URL and watch command carrying it
    when the config the daemon will read can tell its ports."""
    lines = [("token", token)]
    try:
        settings = load_settings(
            find_config_path(config, os.environ), read_tokens_file=False, check_tls_files=False
        )
    except ConfigError:
        settings = None  # the daemon itself says what is wrong, right after
    if settings is not None and settings.health.port != 0:
        lines.append(
            ("dashboard_url", dashboard_url(settings.health.host, settings.health.port, token))
        )
    if settings is not None and settings.server.port != 0:
        tls = settings.server.tls_cert is not None
        url = websocket_url(settings.server.host, settings.server.port, tls=tls)
        lines.append(("watch", watch_command(program, url, token)))
    width = max(len(name) for name, _ in lines)
    return [f"    {name.ljust(width)}  {value}" for name, value in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", type=Path, help="the development folder, e.g. .dev")
    parser.add_argument("--config", help="the config `make run` starts the daemon with")
    parser.add_argument(
        "--program", default="agentspoonsd", help="the daemon's command, for the watch line"
    )
    args = parser.parse_args(argv)
    try:
        token, made = ensure_token(args.folder)
    except (OSError, TokenFileError) as exc:
        print(f"devtoken: {args.folder}: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    state = "made now" if made else "kept from the last run"
    print(
        f'Development token "{NAME}" ({state}; plain text in {args.folder / "token"},'
        f" digest in {args.folder / 'tokens.toml'}):"
    )
    for line in usage_lines(token, args.config, shlex.split(args.program)):
        print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
