"""Market records from external sources: parsing and validation, no I/O and no clocks.

External producers (the prototype's ``data/results.json``, JSON Lines feeds, replay CSVs) hand us
loosely typed values. This module turns them into `Record`s whose invariants downstream code can
rely on, or into a `RecordError` carrying a short, stable ``reason`` for logs and metrics. The
Trio layer that reads the files and publishes the records is `agentspoonsd.market.sources`.

Reasons (`Reason`): ``not_an_object``, ``missing_field``, ``bad_symbol``, ``bad_timestamp``,
``bad_number``, ``non_positive_price``, ``ohlc_inconsistent``, ``negative_volume`` (one record);
``bad_json``, ``bad_utf8``, ``line_too_long`` (one line or document); ``not_an_array`` (a JSON
array file); ``bad_header``, ``bad_csv``, ``extra_fields``, ``out_of_order`` (a replay CSV).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import orjson

Reason = Literal[
    "not_an_object",
    "missing_field",
    "bad_symbol",
    "bad_timestamp",
    "bad_number",
    "non_positive_price",
    "ohlc_inconsistent",
    "negative_volume",
    "bad_json",
    "bad_utf8",
    "line_too_long",
    "not_an_array",
    "bad_header",
    "bad_csv",
    "extra_fields",
    "out_of_order",
]

#: Longest JSON Lines line accepted, in bytes. A record is a few hundred bytes; the bound keeps a
#: writer that never emits a newline from growing our buffer without limit.
MAX_LINE_BYTES = 1 << 20

CSV_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")

_NUMBER_FIELDS = ("open", "high", "low", "close", "volume")
_ONE_MICROSECOND = timedelta(microseconds=1)


class RecordError(ValueError):
    """A value that cannot become a `Record` (or a file that cannot be parsed at all).

    ``reason`` is a short stable code (see `Reason`) for logs and metrics; ``str(error)`` is a
    human-readable explanation naming the field at fault.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One validated OHLCV bar of one symbol, as read from an external source.

    Guarantees (checked on construction, which raises `RecordError` otherwise): ``symbol`` is a
    non-empty string without surrounding whitespace; ``timestamp`` is timezone-aware and in UTC
    (an aware timestamp in another zone is converted); every number is a finite Python ``float``
    (ints are converted, booleans refused); prices are > 0;
    ``low <= min(open, close) <= max(open, close) <= high``; ``volume >= 0``.

    A record carries no returns or volatility: sources are not trusted with those, the pipeline
    recomputes them from the closes.

    ``has_range`` says whether ``high`` and ``low`` were given by the source (True) or made up
    as max/min of open and close because it gave no range (False, a close-only record: the
    range-based estimators must not read it).
    """

    symbol: str
    timestamp: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    has_range: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.symbol, str) or not self.symbol.strip():
            raise RecordError("bad_symbol", f"symbol must be a non-empty string: {self.symbol!r}")
        if self.symbol != self.symbol.strip():
            object.__setattr__(self, "symbol", self.symbol.strip())
        object.__setattr__(self, "timestamp", _to_utc(self.timestamp))
        for name in _NUMBER_FIELDS:
            object.__setattr__(self, name, _finite(getattr(self, name), name))
        for name in ("open", "high", "low", "close"):
            if getattr(self, name) <= 0:
                raise RecordError(
                    "non_positive_price", f"{name} must be > 0, got {getattr(self, name)!r}"
                )
        body_low, body_high = min(self.open, self.close), max(self.open, self.close)
        if not self.low <= body_low <= body_high <= self.high:
            raise RecordError(
                "ohlc_inconsistent",
                f"need low <= min(open, close) <= max(open, close) <= high, got open={self.open!r}"
                f" high={self.high!r} low={self.low!r} close={self.close!r}",
            )
        if self.volume < 0:
            raise RecordError("negative_volume", f"volume must be >= 0, got {self.volume!r}")


@dataclass(frozen=True, slots=True)
class Rejection:
    """One input that was skipped: its ``position`` (1-based line number for JSON Lines and
    CSV, 0-based index for a JSON array), the error, and for JSON arrays the ``raw`` element
    (so a caller re-reading a rewritten file can tell an old rejection from a new one)."""

    position: int
    error: RecordError
    raw: object = None


@dataclass(frozen=True, slots=True)
class Parsed:
    """The result of parsing a whole document: valid records in document order, and the
    rejected entries in document order."""

    records: list[Record]
    rejected: list[Rejection]


# --- single values ---------------------------------------------------------------------------


def parse_timestamp(value: object) -> datetime:
    """An aware UTC datetime from an ISO-8601 string or from epoch seconds.

    Strings are read by `datetime.fromisoformat` (``Z`` and ``±HH:MM`` offsets accepted, a naive
    time is taken as UTC). Numbers (int or float, not bool) are seconds since the Unix epoch,
    rounded to the microsecond. Raises `RecordError` ``bad_timestamp`` for anything else, for
    non-finite numbers and for instants outside `datetime`'s range (e.g. epoch milliseconds).
    """
    if isinstance(value, bool):
        raise RecordError("bad_timestamp", "timestamp must be an ISO-8601 string or epoch seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise RecordError("bad_timestamp", f"timestamp must be finite, got {value!r}")
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise RecordError("bad_timestamp", f"epoch seconds out of range: {value!r}") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise RecordError("bad_timestamp", f"not an ISO-8601 timestamp: {value!r}") from None
        if parsed.utcoffset() is None:
            parsed = parsed.replace(tzinfo=UTC)
        return _to_utc(parsed)
    raise RecordError(
        "bad_timestamp",
        f"timestamp must be an ISO-8601 string or epoch seconds, got {type(value).__name__}",
    )


def parse_record(obj: object, *, default_symbol: str, previous_close: float | None) -> Record:
    """A `Record` from one decoded JSON value (the prototype's update ``data`` or plain OHLCV).

    Fields: ``timestamp`` (required, see `parse_timestamp`); close is ``close``, else ``price``
    (one is required); ``open`` missing ⇒ ``previous_close`` (the previous record's close of
    the same symbol, supplied by the caller) moved into ``[low, high]`` when the record states
    its own range (a gap open), else ``close``; ``high``/``low`` missing ⇒ max/min of open and
    close, and ``has_range`` False (either one missing makes the range unreal); ``volume``
    missing ⇒ 0; ``symbol`` missing ⇒ ``default_symbol``. A JSON ``null`` counts as missing.
    Numbers must be JSON numbers (int or float; booleans and numeric strings are refused).
    Every other field (``volatility``, ``returns``, ``seq``...) is ignored.

    Raises `RecordError` (never anything else) with the first problem found.
    """
    if not isinstance(obj, dict):
        raise RecordError(
            "not_an_object", f"a record must be a JSON object, got {type(obj).__name__}"
        )
    symbol = obj.get("symbol")
    if symbol is None:
        symbol = default_symbol
    elif not isinstance(symbol, str):
        raise RecordError("bad_symbol", f"symbol must be a string, got {type(symbol).__name__}")
    raw_timestamp = obj.get("timestamp")
    if raw_timestamp is None:
        raise RecordError("missing_field", "record has no timestamp")
    timestamp = parse_timestamp(raw_timestamp)
    close_field = "close" if obj.get("close") is not None else "price"
    if obj.get(close_field) is None:
        raise RecordError("missing_field", "record has neither close nor price")
    close = _finite(obj[close_field], close_field)
    high = _optional_number(obj, "high")
    low = _optional_number(obj, "low")
    open_ = _optional_number(obj, "open")
    if open_ is None:
        open_ = close if previous_close is None else _clamp(previous_close, low, high)
    volume = _optional_number(obj, "volume")
    return Record(
        symbol=symbol,
        timestamp=timestamp,
        open=open_,
        high=max(open_, close) if high is None else high,
        low=min(open_, close) if low is None else low,
        close=close,
        volume=0.0 if volume is None else volume,
        has_range=high is not None and low is not None,
    )


def parse_csv_row(row: Mapping[str | None, object], *, default_symbol: str) -> Record:
    """A `Record` from one `csv.DictReader` row of a replay file.

    Column names are matched case-insensitively and ignoring surrounding whitespace; the columns
    ``timestamp, open, high, low, close, volume`` are required and must be non-empty, ``symbol``
    is optional (empty ⇒ ``default_symbol``). The timestamp is epoch seconds if it parses as a
    number, else ISO-8601. Numbers are parsed with `float` and must be finite. Values in
    columns without a header (DictReader's ``None`` key) raise ``extra_fields``: such a row is
    misaligned. Raises `RecordError` (never anything else).
    """
    values: dict[str, str] = {}
    for key, value in row.items():
        if key is None:
            raise RecordError("extra_fields", "row has more fields than the header")
        if isinstance(value, str):
            values[key.strip().lower()] = value.strip()
    text = {name: _csv_field(values, name) for name in CSV_COLUMNS}
    try:
        epoch = float(text["timestamp"])
    except ValueError:
        timestamp = parse_timestamp(text["timestamp"])
    else:
        timestamp = parse_timestamp(epoch)
    numbers: dict[str, float] = {}
    for name in _NUMBER_FIELDS:
        try:
            number = float(text[name])
        except ValueError:
            raise RecordError("bad_number", f"{name} is not a number: {text[name]!r}") from None
        numbers[name] = _finite(number, name)
    return Record(
        symbol=values.get("symbol") or default_symbol,
        timestamp=timestamp,
        open=numbers["open"],
        high=numbers["high"],
        low=numbers["low"],
        close=numbers["close"],
        volume=numbers["volume"],
    )


# --- whole documents -------------------------------------------------------------------------


def decode_json(raw: bytes) -> object:
    """One JSON document from UTF-8 bytes. Raises `RecordError` ``bad_utf8`` or ``bad_json``
    (NaN and Infinity literals are not JSON and are refused)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RecordError("bad_utf8", f"not valid UTF-8 at byte {bad.start}") from None
        raise RecordError("bad_json", f"not valid JSON: {exc}") from None


def parse_json_array(data: bytes, *, default_symbol: str) -> Parsed:
    """Parse a whole JSON array file (the prototype's ``data/results.json``).

    A leading UTF-8 byte-order mark is ignored. Each element goes through `parse_record`, with
    ``previous_close`` the close of the previous valid element of the same symbol; invalid
    elements are returned as `Rejection`s (with their index and ``raw`` element), not raised.
    Raises `RecordError` ``bad_utf8``/``bad_json`` when the document does not parse (e.g. a
    half-written file, or an empty one) and ``not_an_array`` when it is not an array.
    """
    document = decode_json(data.removeprefix(codecs.BOM_UTF8))
    if not isinstance(document, list):
        raise RecordError(
            "not_an_array", f"the file must hold a JSON array, got {type(document).__name__}"
        )
    records: list[Record] = []
    rejected: list[Rejection] = []
    closes: dict[str, float] = {}
    for index, element in enumerate(document):
        try:
            record = parse_record(
                element,
                default_symbol=default_symbol,
                previous_close=closes.get(_symbol_of(element, default_symbol)),
            )
        except RecordError as error:
            rejected.append(Rejection(index, error, element))
            continue
        closes[record.symbol] = record.close
        records.append(record)
    return Parsed(records, rejected)


class JsonLinesDecoder:
    """Incremental JSON Lines parser: feed bytes as they arrive, get one result per line.

    Only complete lines (ending in ``\\n``) are parsed; the bytes of an incomplete last line are
    kept until the rest arrives (`pending` bytes, never more than ``max_line_bytes``). Blank
    lines are skipped silently; each other line yields a `Record` or a `RecordError`
    (``bad_utf8``, ``bad_json``, any `parse_record` reason, or ``line_too_long`` — reported once
    per line, as soon as it exceeds the limit, the rest of that line being discarded unread). A
    UTF-8 byte-order mark at the start of line 1 is ignored. A missing ``open`` defaults to the
    previous valid line's close of the same symbol.
    """

    def __init__(self, *, default_symbol: str, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be >= 1")
        self._default_symbol = default_symbol
        self._max_line_bytes = max_line_bytes
        self._pending = b""
        self._line = 1
        self._discarding = False
        self._closes: dict[str, float] = {}

    @property
    def line(self) -> int:
        """The 1-based number of the line the next fed byte belongs to."""
        return self._line

    @property
    def pending(self) -> int:
        """How many bytes of an incomplete line are held."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[tuple[int, Record | RecordError]]:
        """Consume ``data``; return ``(line number, record or error)`` for each line it
        completes (and for a line it makes too long), in file order."""
        results: list[tuple[int, Record | RecordError]] = []
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
            else:
                line = self._pending + data[start:newline]
                result = self._decode(line)
                if result is not None:
                    results.append((self._line, result))
            self._pending = b""
            self._line += 1
            start = newline + 1
        if not self._discarding and start < len(data):
            if len(self._pending) + len(data) - start > self._max_line_bytes:
                results.append((self._line, self._too_long()))
                self._pending = b""
                self._discarding = True
            else:
                self._pending += data[start:]
        return results

    def _decode(self, line: bytes) -> Record | RecordError | None:
        if self._line == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            return None
        if len(line) > self._max_line_bytes:
            return self._too_long()
        try:
            obj = decode_json(line)
            record = parse_record(
                obj,
                default_symbol=self._default_symbol,
                previous_close=self._closes.get(_symbol_of(obj, self._default_symbol)),
            )
        except RecordError as error:
            return error
        self._closes[record.symbol] = record.close
        return record

    def _too_long(self) -> RecordError:
        return RecordError("line_too_long", f"line exceeds {self._max_line_bytes} bytes")


def parse_replay_csv(data: bytes, *, default_symbol: str) -> Parsed:
    """Parse a whole replay CSV (header ``timestamp,open,high,low,close,volume[,symbol]``).

    The bytes are decoded as UTF-8 (a byte-order mark is ignored); a row holding undecodable
    bytes is rejected as ``bad_utf8``. Blank lines are skipped. Each row goes through
    `parse_csv_row`; additionally a row whose timestamp is not strictly after the previous
    accepted row of the same symbol is rejected as ``out_of_order`` (replayed series must be
    strictly increasing per symbol). Rejections carry the row's line number.

    Raises `RecordError` ``bad_header`` when the file is empty or its header lacks a required
    column or repeats one.
    """
    # surrogateescape keeps undecodable bytes visible, so one bad row is rejected rather than
    # the whole file.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames
    if header is None:
        raise RecordError("bad_header", "the file is empty: no header")
    names = [name.strip().lower() for name in header]
    missing = [name for name in CSV_COLUMNS if name not in names]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if missing or repeated:
        raise RecordError(
            "bad_header",
            f"header {header!r}: missing {missing}, repeated {repeated}"
            f" (need {', '.join(CSV_COLUMNS)}, optional symbol)",
        )
    records: list[Record] = []
    rejected: list[Rejection] = []
    last: dict[str, datetime] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rejected.append(Rejection(reader.line_num, RecordError("bad_csv", str(exc))))
            continue
        try:
            _check_utf8(row.values())
            record = parse_csv_row(row, default_symbol=default_symbol)
            previous = last.get(record.symbol)
            if previous is not None and record.timestamp <= previous:
                raise RecordError(
                    "out_of_order",
                    f"{record.symbol} at {record.timestamp.isoformat()} is not after the"
                    f" previous row ({previous.isoformat()})",
                )
        except RecordError as error:
            rejected.append(Rejection(reader.line_num, error))
            continue
        last[record.symbol] = record.timestamp
        records.append(record)
    return Parsed(records, rejected)


# --- publication order and replay pacing -----------------------------------------------------


def select_unpublished(
    records: Iterable[Record], watermarks: Mapping[str, datetime]
) -> list[Record]:
    """The records that may still be published, in input order.

    ``watermarks`` maps a symbol to the timestamp of the last record published for it. A record
    passes only if its timestamp is strictly greater than its symbol's watermark and than every
    earlier passing record of that symbol, so the result is strictly increasing per symbol:
    re-reading a rewritten file never republishes a record, and never publishes out of order.
    ``watermarks`` is not modified (the caller advances it as each record is actually sent).
    """
    latest = dict(watermarks)
    selected = []
    for record in records:
        previous = latest.get(record.symbol)
        if previous is None or record.timestamp > previous:
            latest[record.symbol] = record.timestamp
            selected.append(record)
    return selected


def replay_schedule(timestamps: Sequence[datetime]) -> tuple[list[int], int]:
    """Offsets and loop period for replaying bars with these timestamps, in microseconds.

    Returns ``(offsets, period)``: ``offsets[k]`` is ``timestamps[k] - timestamps[0]`` (exact
    integer microseconds; negative if a row precedes the first one); ``period`` is the span
    ``max - min`` plus the median gap between consecutive distinct timestamps (rounded to the
    microsecond), the shift that makes the next pass of a looped replay start one typical bar
    after this one ends. ``period`` is 0 when there are fewer than two distinct timestamps
    (nothing to loop on). Raises ValueError for an empty sequence.
    """
    if not timestamps:
        raise ValueError("no timestamps")
    first = timestamps[0]
    offsets = [(timestamp - first) // _ONE_MICROSECOND for timestamp in timestamps]
    distinct = np.unique(np.asarray(offsets, dtype=np.int64))
    if distinct.size < 2:
        return offsets, 0
    span = int(distinct[-1] - distinct[0])
    median_gap = max(1, round(float(np.median(np.diff(distinct)))))
    return offsets, span + median_gap


# --- helpers ---------------------------------------------------------------------------------


def _finite(value: object, name: str) -> float:
    # bool is an int subclass, and True as a price is certainly a producer bug.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError("bad_number", f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise RecordError("bad_number", f"{name} is out of range: {value!r}") from None
    if not math.isfinite(number):
        raise RecordError("bad_number", f"{name} must be finite, got {number!r}")
    return number


def _optional_number(obj: Mapping[str, object], name: str) -> float | None:
    value = obj.get(name)
    return None if value is None else _finite(value, name)


def _clamp(value: float, low: float | None, high: float | None) -> float:
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return value


def _to_utc(value: object) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise RecordError("bad_timestamp", f"timestamp must be an aware datetime: {value!r}")
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise RecordError("bad_timestamp", f"timestamp out of range: {value!r}") from None


def _symbol_of(obj: object, default_symbol: str) -> str:
    """The symbol `parse_record` will give ``obj``, to look up its previous close first."""
    symbol = obj.get("symbol") if isinstance(obj, dict) else None
    return symbol.strip() if isinstance(symbol, str) else default_symbol


def _csv_field(values: Mapping[str, str], name: str) -> str:
    value = values.get(name)
    if not value:
        raise RecordError("missing_field", f"row has no {name}")
    return value


def _check_utf8(values: Iterable[object]) -> None:
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RecordError("bad_utf8", "row is not valid UTF-8") from None
