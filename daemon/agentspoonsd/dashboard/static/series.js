// The dashboard's data, apart from the page: a symbol's window of bars, its liveness, and the
// stream's rate and latency. Pure: every time is an argument (milliseconds, as Date.now()), so
// tests/test_dashboard_format.py runs it in Node.js.

import { median, parseTime } from "./format.js";

// key, label, shown on the chart at first. The defaults are explained on the page (help text).
export const ESTIMATORS = [
  ["close_to_close", "close-to-close", true],
  ["ewma", "EWMA", true],
  ["parkinson", "Parkinson", false],
  ["garman_klass", "Garman–Klass", false],
  ["rogers_satchell", "Rogers–Satchell", false],
  ["yang_zhang", "Yang–Zhang", true],
];
export const RANGE_ESTIMATORS = ["parkinson", "garman_klass", "rogers_satchell", "yang_zhang"];

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/**
 * sqrt(periods per year): the daemon's own annualisation factor, read back from any estimator
 * given both per bar and annualised (null when none is: e.g. before the window fills).
 */
export function annualizeFactor(data) {
  const est = data.estimators || {};
  const annual = data.estimators_annualized || {};
  for (const [key] of ESTIMATORS) {
    const bar = num(est[key]);
    const year = num(annual[key]);
    if (bar && year !== null) return year / bar;
  }
  return null;
}

/** An update's `data` as one bar of the window: every field optional (absent -> null). */
export function barFromUpdate(data, factor = null) {
  const est = data.estimators || {};
  const annual = data.estimators_annualized || {};
  const garch = data.garch_forecast || {};
  const scale = (v) => (num(v) !== null && factor ? v * factor : null);
  return {
    t: parseTime(data.timestamp),
    timestamp: data.timestamp ?? null,
    seq: data.seq ?? null,
    open: num(data.open),
    high: num(data.high),
    low: num(data.low),
    close: num(data.close ?? data.price),
    volume: num(data.volume),
    returns: num(data.returns),
    perBar: ESTIMATORS.map(([key]) => num(est[key])),
    annual: ESTIMATORS.map(([key]) => num(annual[key])),
    window: num(est.window),
    garch1: num(garch.volatility_1),
    garchH: num(garch.volatility_h),
    garchCumH: num(garch.volatility_cum_h),
    garch1Annual: scale(garch.volatility_1),
  };
}

/**
 * The last `size` bars of a symbol, in time order. A bar not after the last one is refused (the
 * stream delivers each seq once, in order; a bar time going backwards would draw a false line).
 * A bar more than `gapFactor` bar spacings after the previous one (a daemon that was down, bars
 * never generated) is preceded by a break, so charts draw no line across the hole: what they show
 * is what was published, and a reconnect that resumed by seq shows no jump of its own.
 */
export class BarWindow {
  constructor(size, gapFactor = 3) {
    this.size = size;
    this.gapFactor = gapFactor;
    this.points = []; // bars, and breaks ({ t, gap: true })
    this.bars = 0;
  }

  /** The median spacing of the last bars, in seconds (null with fewer than two). */
  spacing() {
    const times = [];
    for (let i = this.points.length - 1; i >= 0 && times.length < 21; i -= 1) {
      if (!this.points[i].gap) times.push(this.points[i].t);
    }
    const steps = [];
    for (let i = 1; i < times.length; i += 1) steps.push(times[i - 1] - times[i]);
    return median(steps);
  }

  /** Adds `bar`; returns "added", "after-gap" (a break went first) or "refused". */
  push(bar) {
    if (bar.t === null) return "refused";
    const last = this.points.at(-1);
    if (last && bar.t <= last.t) return "refused";
    let verdict = "added";
    const spacing = this.spacing();
    if (last && spacing && bar.t - last.t > this.gapFactor * spacing) {
      this.points.push({ t: last.t + spacing, gap: true });
      verdict = "after-gap";
    }
    this.points.push(bar);
    this.bars += 1;
    while (this.points.length > this.size || this.points[0]?.gap) {
      if (!this.points.shift().gap) this.bars -= 1;
    }
    return verdict;
  }

  clear() {
    this.points = [];
    this.bars = 0;
  }

  latest() {
    return this.points.at(-1) ?? null;
  }

  first() {
    return this.points[0] ?? null;
  }

  /** `field(bar)` for every point (null at breaks): a chart's column. */
  column(field) {
    return this.points.map((p) => (p.gap ? null : field(p)));
  }

  /** The bars only (no breaks): what an export holds. */
  barsOnly() {
    return this.points.filter((p) => !p.gap);
  }
}

/**
 * When a symbol's updates arrive: its age, its publication interval (the median spacing of its
 * live arrivals) and whether it is stale: no update for `staleFactor` × that interval.
 */
export class Liveness {
  constructor(staleFactor = 3, keep = 12) {
    this.staleFactor = staleFactor;
    this.keep = keep;
    this.arrivals = []; // live updates only: history replies arrive in bursts
    this.lastMs = null;
  }

  /** An update of this symbol arrived at `nowMs`; `live`: not from a history reply. */
  arrive(nowMs, live = true) {
    this.lastMs = nowMs;
    if (!live) return;
    this.arrivals.push(nowMs);
    if (this.arrivals.length > this.keep) this.arrivals.shift();
  }

  /** Seconds between updates (median of live arrivals; a daemon catching up sends bursts), or
   * `fallback` (e.g. the bar spacing) until three live updates arrived. */
  intervalSeconds(fallback = null) {
    const steps = [];
    for (let i = 1; i < this.arrivals.length; i += 1) {
      steps.push((this.arrivals[i] - this.arrivals[i - 1]) / 1000);
    }
    const measured = steps.length >= 2 ? median(steps) : null;
    return measured && measured > 0 ? measured : fallback;
  }

  ageSeconds(nowMs) {
    return this.lastMs === null ? null : Math.max(0, (nowMs - this.lastMs) / 1000);
  }

  /**
   * Stale: an interval is known and no update came for staleFactor × it. Before the first live
   * update (a symbol whose history just loaded waits up to a second for its live stream: the
   * requests are paced) `graceSeconds` more are allowed.
   */
  isStale(nowMs, fallback = null, graceSeconds = 2) {
    const interval = this.intervalSeconds(fallback);
    const age = this.ageSeconds(nowMs);
    if (interval === null || age === null) return false;
    const grace = this.arrivals.length ? 0 : graceSeconds;
    return age > this.staleFactor * interval + grace;
  }
}

/**
 * The whole stream's update rate (live updates per second over the last `spanMs`) and its
 * delivery latency (arrival minus the update's publish `timestamp`: the daemon's clock against
 * this browser's, so it includes their offset), as a median of the last `keep`.
 */
export class StreamMeter {
  constructor(spanMs = 10000, keep = 200) {
    this.spanMs = spanMs;
    this.keep = keep;
    this.arrivals = [];
    this.latencies = [];
    this.startMs = null;
  }

  record(nowMs, publishedSeconds) {
    this.startMs ??= nowMs;
    this.arrivals.push(nowMs);
    this.trim(nowMs);
    if (publishedSeconds != null && Number.isFinite(publishedSeconds)) {
      this.latencies.push(nowMs - publishedSeconds * 1000);
      if (this.latencies.length > this.keep) this.latencies.shift();
    }
  }

  trim(nowMs) {
    let drop = 0;
    while (drop < this.arrivals.length && this.arrivals[drop] <= nowMs - this.spanMs) drop += 1;
    if (drop) this.arrivals.splice(0, drop);
  }

  /** Updates per second over the span (or since the first update, when that is shorter). */
  rate(nowMs) {
    if (this.startMs === null) return null;
    this.trim(nowMs);
    const span = Math.min(this.spanMs, nowMs - this.startMs);
    return span >= 1000 ? (this.arrivals.length * 1000) / span : null;
  }

  latencyMs() {
    return median(this.latencies);
  }

  reset() {
    this.arrivals = [];
    this.latencies = [];
    this.startMs = null;
  }
}
