"""External market-data sources: follow a file written by another process, or replay a CSV.

The thin Trio layer over `agentspoonsd.market.records`: it owns the files, the clock and the
channel; parsing, validation and the never-twice filter are the pure functions there. Blocking
file system calls run in worker threads (abandoned on cancellation: they only read), so the event
loop never waits on a disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import trio
from structlog.typing import FilteringBoundLogger

from agentspoonsd.market.records import (
    JsonLinesDecoder,
    Parsed,
    Record,
    RecordError,
    parse_json_array,
    parse_replay_csv,
    replay_schedule,
    select_unpublished,
)

FileFormat = Literal["auto", "json", "jsonl"]

#: Bytes read per thread call when following JSON Lines: bounds memory for a huge file.
_CHUNK_BYTES = 256 * 1024

_SUFFIX_FORMATS: dict[str, Literal["json", "jsonl"]] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

_T = TypeVar("_T")


async def follow_file(
    path: Path,
    *,
    send: trio.MemorySendChannel[Record],
    log: FilteringBoundLogger,
    default_symbol: str,
    file_format: FileFormat = "auto",
    poll_interval: float = 0.5,
    published: dict[str, datetime] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish the records another process writes to ``path``, forever.

    Format: ``"auto"`` picks by suffix (``.json`` ⇒ ``"json"``, ``.jsonl``/``.ndjson`` ⇒
    ``"jsonl"``, case-insensitive; any other suffix raises ValueError before `started()`).

    - ``"json"``: one JSON array, rewritten wholesale by its producer (the prototype's
      ``data/results.json``). On every change the whole file is re-read and parsed. A file that
      does not parse (typically half-written) is logged once per version as
      ``source_parse_failed`` (``reason``, ``error``) and retried at the next change; a file
      that changed while being read is simply re-read at the next poll. Invalid elements are
      logged as ``source_record_rejected`` (``reason``, ``index``) once — not again while they
      stay in later versions.
    - ``"jsonl"``: JSON Lines, appended to. Reading resumes at the saved byte offset, in chunks
      (memory stays bounded whatever the file size); only lines ending in ``\\n`` count, a partial
      last line waits for its end. A shrunk file (``source_file_truncated``) or a new inode
      (``source_file_replaced``) restarts at offset 0. Each malformed line is logged as
      ``source_record_rejected`` (``reason``, ``line`` number) and skipped. Limitation: a
      truncation followed by a rewrite to at least the old size between two polls is not seen
      as a truncation (reading resumes at the old offset).

    Publication: records are sent with ``await send.send(record)`` in file order. Per symbol,
    only a record strictly newer than the last one published passes (`select_unpublished`), so
    no record is published twice — re-reads, rewrites, truncations and replacements included —
    and each symbol's timestamps strictly increase; older records are dropped silently (a debug
    ``source_records_skipped`` with the count). ``published`` is that per-symbol watermark: pass
    the same dict to a restarted `follow_file` to carry on without republishing. It is updated
    after each completed send, so a send interrupted by cancellation is retried, not lost.

    Polling: ``os.stat`` every ``poll_interval`` seconds of Trio's clock, measured from the end
    of one poll to the start of the next (a slow consumer delays polling, never causes a burst
    of polls). Nothing about the file is fatal: a missing file is logged once per absence
    (``source_file_missing``, then ``source_file_appeared``) and waited for; read errors are
    logged as ``source_read_failed`` (once until the error changes) and retried.

    `task_status.started()` is called before the first poll. Cancellable at every await. Errors
    from the channel (`trio.BrokenResourceError`, `trio.ClosedResourceError`) propagate; the
    channel is never closed here. Raises ValueError for a bad ``poll_interval``, format or
    ``default_symbol``.
    """
    if not (math.isfinite(poll_interval) and poll_interval > 0):
        raise ValueError(f"poll_interval must be a positive number of seconds: {poll_interval!r}")
    if not default_symbol.strip():
        raise ValueError("default_symbol must not be empty")
    resolved = _resolve_format(path, file_format)
    log = log.bind(path=str(path))
    watermarks = {} if published is None else published
    follower: _JsonLinesFollower | _JsonArrayFollower
    if resolved == "jsonl":
        follower = _JsonLinesFollower(path, send, log, default_symbol, watermarks)
    else:
        follower = _JsonArrayFollower(path, send, log, default_symbol, watermarks)
    task_status.started()
    log.info("source_started", format=resolved, poll_interval=poll_interval)
    missing = False
    last_error: str | None = None
    while True:
        try:
            stat = await _in_thread(_stat, path)
            if missing:
                log.info("source_file_appeared")
                missing = False
            await follower.poll(stat)
        except FileNotFoundError:
            if not missing:
                log.warning("source_file_missing")
                missing = True
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != last_error:
                log.warning("source_read_failed", error=error)
                last_error = error
        else:
            last_error = None
        await trio.sleep(poll_interval)


async def replay_csv(
    path: Path,
    *,
    send: trio.MemorySendChannel[Record],
    log: FilteringBoundLogger,
    default_symbol: str,
    speed: float = 1.0,
    loop: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Replay the bars of a CSV file (``timestamp,open,high,low,close,volume[,symbol]``) in
    accelerated real time.

    The file is read and parsed once, up front (`parse_replay_csv`): malformed or out-of-order
    rows are logged as ``source_record_rejected`` (``reason``, ``line``) and skipped. Then
    `task_status.started()` is called and, with ``start`` the current time on Trio's clock, bar
    ``k`` is sent at ``start + (t_k - t_0) / speed`` (``t_0`` the first bar's timestamp):
    speed 60 replays one-minute bars one per second. Deadlines are absolute, so a slow consumer
    causes no drift; when behind, the bars already due are sent at once, in order — no bar is
    ever dropped. Records keep their own timestamps.

    ``loop=False``: after the last bar, logs ``replay_finished bars=N`` and returns.
    ``loop=True``: starts over forever; pass ``p`` shifts every timestamp (and deadline) by
    ``p * (span + median bar gap)`` (`replay_schedule`), so downstream timestamps keep
    increasing; each new pass is logged as ``replay_looped``.

    Every bar of a pass is sent exactly once per pass, in file order, each symbol's timestamps
    strictly increasing. State is local to the call: a restarted replay starts from the first
    bar again. Cancellable at every await (a bar whose send was cancelled was not delivered).

    Raises (before `started()`): OSError when the file cannot be read; ValueError when its
    header is unusable, when no row is valid, when ``loop`` is set but the bars have fewer than
    two distinct timestamps, or for a non-positive or non-finite ``speed``. Channel errors
    propagate; the channel is never closed here.
    """
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a positive number: {speed!r}")
    log = log.bind(path=str(path))
    data = await trio.Path(path).read_bytes()
    try:
        parsed = await _in_thread(partial(parse_replay_csv, data, default_symbol=default_symbol))
    except RecordError as exc:
        raise ValueError(f"cannot replay {path}: {exc}") from exc
    for rejection in parsed.rejected:
        log.warning(
            "source_record_rejected",
            reason=rejection.error.reason,
            line=rejection.position,
            error=str(rejection.error),
        )
    records = parsed.records
    if not records:
        raise ValueError(f"cannot replay {path}: no valid rows")
    offsets, period = replay_schedule([record.timestamp for record in records])
    if loop and period == 0:
        raise ValueError(f"cannot loop {path}: it needs at least two distinct timestamps")
    start = trio.current_time()
    task_status.started()
    log.info(
        "replay_started",
        bars=len(records),
        rejected=len(parsed.rejected),
        speed=speed,
        loop=loop,
    )
    # Market microseconds per second of Trio's clock; each deadline is computed from `start`,
    # never from the previous one, so rounding and slow sends cannot accumulate as drift.
    scale = 1e6 * speed
    sent = 0
    shift = 0
    while True:
        delta = timedelta(microseconds=shift)
        for record, offset in zip(records, offsets, strict=True):
            await trio.sleep_until(start + (offset + shift) / scale)
            await send.send(
                replace(record, timestamp=record.timestamp + delta) if shift else record
            )
            sent += 1
        if not loop:
            log.info("replay_finished", bars=sent)
            return
        shift += period
        log.info("replay_looped", bars=sent, shift_s=shift / 1e6)


# --- followers -------------------------------------------------------------------------------


class _FileStat(NamedTuple):
    """What identifies one version of a file: ``(dev, ino)`` the file, the rest its content."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _FileStat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def identity(self) -> tuple[int, int]:
        return self.dev, self.ino


class _Publisher:
    """Shared by both followers: the never-twice filter in front of the channel."""

    def __init__(
        self,
        send: trio.MemorySendChannel[Record],
        log: FilteringBoundLogger,
        watermarks: dict[str, datetime],
    ) -> None:
        self._send = send
        self._log = log
        self._watermarks = watermarks

    async def publish(self, records: list[Record]) -> None:
        fresh = select_unpublished(records, self._watermarks)
        if len(fresh) < len(records):
            self._log.debug("source_records_skipped", count=len(records) - len(fresh))
        for record in fresh:
            await self._send.send(record)
            # Only after the send completed: a cancelled send must be retried by the next read.
            self._watermarks[record.symbol] = record.timestamp


class _JsonLinesFollower(_Publisher):
    def __init__(
        self,
        path: Path,
        send: trio.MemorySendChannel[Record],
        log: FilteringBoundLogger,
        default_symbol: str,
        watermarks: dict[str, datetime],
    ) -> None:
        super().__init__(send, log, watermarks)
        self._path = path
        self._default_symbol = default_symbol
        self._identity: tuple[int, int] | None = None
        self._restart()

    def _restart(self) -> None:
        self._decoder = JsonLinesDecoder(default_symbol=self._default_symbol)
        # Bytes consumed so far: complete lines plus the partial line the decoder holds.
        self._offset = 0

    async def poll(self, stat: _FileStat) -> None:
        if stat.identity != self._identity:
            if self._identity is not None:
                self._log.info("source_file_replaced")
            self._identity = stat.identity
            self._restart()
        elif stat.size < self._offset:
            self._log.info("source_file_truncated", size=stat.size, offset=self._offset)
            self._restart()
        while stat.size > self._offset:
            stat, chunk = await _in_thread(_read_at, self._path, self._offset, _CHUNK_BYTES)
            if stat.identity != self._identity or not chunk:
                return  # replaced or truncated since the stat: the next poll sorts it out
            self._offset += len(chunk)
            records = []
            for line, result in self._decoder.feed(chunk):
                if isinstance(result, RecordError):
                    self._log.warning(
                        "source_record_rejected",
                        reason=result.reason,
                        line=line,
                        error=str(result),
                    )
                else:
                    records.append(result)
            await self.publish(records)


class _JsonArrayFollower(_Publisher):
    def __init__(
        self,
        path: Path,
        send: trio.MemorySendChannel[Record],
        log: FilteringBoundLogger,
        default_symbol: str,
        watermarks: dict[str, datetime],
    ) -> None:
        super().__init__(send, log, watermarks)
        self._path = path
        self._default_symbol = default_symbol
        self._seen: _FileStat | None = None
        # repr() of the elements rejected in the last parsed version, to log each bad element
        # once rather than on every rewrite of the file.
        self._rejected: set[str] = set()

    async def poll(self, stat: _FileStat) -> None:
        if stat == self._seen:
            return
        before, after, data = await _in_thread(_read_whole, self._path)
        if before != after:
            return  # being written right now: whatever we read is stale, re-read next poll
        if after == self._seen:
            return
        self._seen = after
        try:
            parsed: Parsed = await _in_thread(
                partial(parse_json_array, data, default_symbol=self._default_symbol)
            )
        except RecordError as exc:
            self._log.warning(
                "source_parse_failed", reason=exc.reason, error=str(exc), size=after.size
            )
            return
        rejected = set()
        for rejection in parsed.rejected:
            key = repr(rejection.raw)
            rejected.add(key)
            if key not in self._rejected:
                self._log.warning(
                    "source_record_rejected",
                    reason=rejection.error.reason,
                    index=rejection.position,
                    error=str(rejection.error),
                )
        self._rejected = rejected
        await self.publish(parsed.records)


# --- blocking helpers (run in worker threads) ------------------------------------------------


async def _in_thread(function: Callable[..., _T], *args: object) -> _T:
    # Abandoning on cancel is safe: the helpers only read, and close what they open.
    return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)


def _stat(path: Path) -> _FileStat:
    return _FileStat.of(os.stat(path))


def _read_at(path: Path, offset: int, limit: int) -> tuple[_FileStat, bytes]:
    """The file's identity (of the file actually opened) and up to ``limit`` bytes at
    ``offset``."""
    with open(path, "rb") as file:
        stat = _FileStat.of(os.fstat(file.fileno()))
        file.seek(offset)
        return stat, file.read(limit)


def _read_whole(path: Path) -> tuple[_FileStat, _FileStat, bytes]:
    """The whole file, with its stat before and after reading: if they differ, the content may
    be a mix of two versions."""
    with open(path, "rb") as file:
        before = _FileStat.of(os.fstat(file.fileno()))
        data = file.read()
        after = _FileStat.of(os.fstat(file.fileno()))
    return before, after, data


def _resolve_format(path: Path, file_format: FileFormat) -> Literal["json", "jsonl"]:
    if file_format == "json" or file_format == "jsonl":
        return file_format
    if file_format != "auto":
        raise ValueError(f"file_format must be auto, json or jsonl: {file_format!r}")
    resolved = _SUFFIX_FORMATS.get(path.suffix.lower())
    if resolved is None:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix (.json, .jsonl or .ndjson):"
            " set the format explicitly"
        )
    return resolved
