// The dashboard's pure helpers: time conventions, tick labels, numbers, CSV. No DOM, no clock
// (every "now" is an argument), so tests/test_dashboard_format.py runs them in Node.js.
//
// One time convention everywhere: UTC by default, the browser's local time as a toggle. A time
// is seconds since the Unix epoch (uPlot's unit); `zone` is "utc" or "local".

export const ZONES = ["utc", "local"];
export const MISSING = "—"; // a value that is null or absent: never a silent zero

/** Seconds since the epoch of an RFC 3339 time (microseconds kept), or null when unparseable. */
export function parseTime(text) {
  if (typeof text !== "string") return null;
  const match = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(text);
  if (!match) return null;
  const whole = Date.parse(match[1] + match[3]);
  if (Number.isNaN(whole)) return null;
  const fraction = match[2] ? Number(`0.${match[2]}`) : 0;
  return whole / 1000 + fraction;
}

function parts(seconds, zone) {
  const date = new Date(Math.floor(seconds * 1000));
  const utc = zone !== "local";
  return {
    year: utc ? date.getUTCFullYear() : date.getFullYear(),
    month: (utc ? date.getUTCMonth() : date.getMonth()) + 1,
    day: utc ? date.getUTCDate() : date.getDate(),
    hour: utc ? date.getUTCHours() : date.getHours(),
    minute: utc ? date.getUTCMinutes() : date.getMinutes(),
    second: utc ? date.getUTCSeconds() : date.getSeconds(),
    ms: date.getUTCMilliseconds(),
  };
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** "UTC" or the browser's offset, e.g. "UTC+02:00" (at `seconds`, for daylight saving). */
export function zoneName(zone, seconds = 0) {
  if (zone !== "local") return "UTC";
  const offset = -new Date(seconds * 1000).getTimezoneOffset();
  const sign = offset < 0 ? "-" : "+";
  const abs = Math.abs(offset);
  return `local, UTC${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;
}

/** "YYYY-MM-DD" of `seconds` in `zone`. */
export function formatDate(seconds, zone) {
  const p = parts(seconds, zone);
  return `${p.year}-${pad(p.month)}-${pad(p.day)}`;
}

/** "YYYY-MM-DD HH:MM:SS.mmm UTC" (or the local offset): the tables' and the headers' format. */
export function formatTimestamp(seconds, zone) {
  if (seconds == null || !Number.isFinite(seconds)) return MISSING;
  const p = parts(seconds, zone);
  const clock = `${pad(p.hour)}:${pad(p.minute)}:${pad(p.second)}.${pad(p.ms, 3)}`;
  return `${formatDate(seconds, zone)} ${clock} ${zone === "local" ? zoneName(zone, seconds) : "UTC"}`;
}

/**
 * The labels of a time axis' ticks: one format per axis, chosen from the tick step `increment`
 * (seconds), so no label carries a date glued to a time: "HH:MM:SS" below a minute, "HH:MM"
 * below a day, "MM-DD" from a day up. The date of a sub-day axis goes in its title
 * (`axisTitle`), where it cannot collide with a tick.
 */
export function tickLabels(ticks, increment, zone) {
  return ticks.map((t) => {
    const p = parts(t, zone);
    if (increment >= 86400) return `${pad(p.month)}-${pad(p.day)}`;
    if (increment >= 60) return `${pad(p.hour)}:${pad(p.minute)}`;
    return `${pad(p.hour)}:${pad(p.minute)}:${pad(p.second)}`;
  });
}

/** The time axis' title: "time (UTC) · 2026-04-12" (two dates when the range spans midnight). */
export function axisTitle(min, max, zone) {
  const name = zoneName(zone, max ?? 0);
  if (min == null || max == null || !Number.isFinite(min) || !Number.isFinite(max)) {
    return `time (${name})`;
  }
  const first = formatDate(min, zone);
  const last = formatDate(max, zone);
  return `time (${name}) · ${first === last ? first : `${first} – ${last}`}`;
}

/** The quote currency of a symbol: "USD" for "BTC/USD" or "BTC-USD"; null when not written. */
export function quoteCurrency(symbol) {
  const match = /^[^/\-_:]+[/\-_:]([A-Za-z0-9]{2,10})$/.exec(String(symbol));
  return match ? match[1].toUpperCase() : null;
}

export function formatPrice(v) {
  if (v == null || !Number.isFinite(v)) return MISSING;
  const digits = Math.abs(v) < 10 ? 6 : 2;
  return v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
}

export function formatAxisPrice(v) {
  // Ticks differ by round steps: whole units are enough above 1,000, and keep the axis narrow.
  const digits = Math.abs(v) >= 1000 ? 0 : Math.abs(v) >= 10 ? 2 : 6;
  return v.toLocaleString("en-US", { maximumFractionDigits: digits });
}

export function formatNumber(v, precision) {
  return v == null || !Number.isFinite(Number(v)) ? MISSING : Number(v).toPrecision(precision);
}

/** A fraction as a percentage: 0.4791 -> "47.91 %". */
export function formatPercent(v, digits = 2) {
  return v == null || !Number.isFinite(v) ? MISSING : `${(v * 100).toFixed(digits)} %`;
}

/** A signed percentage change: "+1.23 %", "−0.40 %". */
export function formatChange(v) {
  if (v == null || !Number.isFinite(v)) return MISSING;
  const text = `${Math.abs(v * 100).toFixed(2)} %`;
  return v > 0 ? `+${text}` : v < 0 ? `−${text}` : text;
}

/** An age in seconds, short: "0.4 s", "12 s", "3 min 04 s", "2 h 05 min". */
export function formatAge(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return MISSING;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${pad(Math.floor(seconds % 60))} s`;
  return `${Math.floor(seconds / 3600)} h ${pad(Math.floor((seconds % 3600) / 60))} min`;
}

/** Relative change from `first` to `last`, or null when either is missing or `first` is 0. */
export function change(first, last) {
  if (first == null || last == null || first === 0) return null;
  return last / first - 1;
}

/** The median of the finite numbers in `values`, or null when there are none. */
export function median(values) {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (!sorted.length) return null;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * Rows sorted by `key` (a function of a row giving a number, a string or null), `direction` 1
 * (ascending) or -1. Missing values go last in both directions; ties keep `tieKey`'s order.
 */
export function sortRows(rows, key, direction, tieKey = (row) => String(row)) {
  const keyed = rows.map((row) => [key(row), tieKey(row), row]);
  keyed.sort(([a, ta], [b, tb]) => {
    const aMissing = a == null || (typeof a === "number" && Number.isNaN(a));
    const bMissing = b == null || (typeof b === "number" && Number.isNaN(b));
    if (aMissing || bMissing) return aMissing - bMissing || ta.localeCompare(tb);
    const order = typeof a === "string" ? a.localeCompare(b) : a - b;
    return order * direction || ta.localeCompare(tb);
  });
  return keyed.map(([, , row]) => row);
}

/** RFC 4180 CSV: a header and rows, CRLF line ends; null/undefined become empty fields. */
export function toCsv(header, rows) {
  const field = (v) => {
    if (v == null) return "";
    const text = String(v);
    return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  };
  return [header, ...rows].map((row) => row.map(field).join(",")).join("\r\n") + "\r\n";
}

/** A file name part from a symbol: "BTC/USD" -> "BTC-USD". */
export function fileSafe(text) {
  return String(text).replace(/[^A-Za-z0-9._-]+/g, "-");
}

/** "HH:MM:SS UTC" (or the local offset): notices' and messages' times. */
export function formatClock(seconds, zone) {
  const p = parts(seconds, zone);
  const name = zone === "local" ? zoneName(zone, seconds).replace("local, ", "") : "UTC";
  return `${pad(p.hour)}:${pad(p.minute)}:${pad(p.second)} ${name}`;
}
