// agentspoonsd dashboard: one WebSocket; an overview table of every symbol the token may see
// (sortable: price, change, volatility, GARCH forecast, trend, age), and the charts of the rows
// selected (price as line or candles with volume, every volatility estimator annualised or per
// bar, the latest bar, the GARCH forecast; CSV and PNG export). An ES module, no build step;
// uPlot is vendored. The pure parts are format.js and series.js (tests/test_dashboard_format.py).
//
// The connection is the browser module the daemon serves at /client.js (docs/CLIENT.md ("JavaScript")): it
// reconnects with backoff, resumes each symbol from its last seq (no gap, no duplicate), loads the
// recent history of a symbol it has no position for, and tells a refused token (401), a revoked
// one (4001) and a daemon that is down apart. This page adds, in short:
// - the token comes from the URL (#access_token=… or ?access_token=…, then removed from the
//   address bar) or the form, and lives in sessionStorage: this tab only, gone when it closes;
// - the WebSocket's URL and the origins it admits come from dashboard/config.json, asked before
//   each attempt (a restarted daemon may listen elsewhere); an origin it would refuse is shown
//   before anything is tried;
// - `reset` says the daemon could not fill a gap: that symbol's charts restart and the page says so;
// - honest state: each symbol's last-update age, stale (no update for 3 × its interval) dimmed and
//   labelled; the stream's update rate and delivery latency.
//
// Preferences (time zone, sorting, estimator, selected symbols) are kept in localStorage; the
// token never is.

import { connect as openStream } from "../client.js"; // /client.js, under a proxy's path too
import { chartPng, priceOptions, showLatest, volatilityOptions } from "./charts.js";
import {
  MISSING,
  ZONES,
  change,
  fileSafe,
  formatAge,
  formatChange,
  formatClock,
  formatNumber,
  formatPercent,
  formatPrice,
  formatTimestamp,
  parseTime,
  quoteCurrency,
  sortRows,
  toCsv,
} from "./format.js";
import {
  BarWindow,
  ESTIMATORS,
  Liveness,
  RANGE_ESTIMATORS,
  StreamMeter,
  annualizeFactor,
  barFromUpdate,
} from "./series.js";

const TOKEN_KEY = "agentspoonsd.token";
const PREFS_KEY = "agentspoonsd.prefs";
const WINDOW = 300; // bars kept per symbol (charts, sparkline, change, export)
// Bars of recent history loaded per symbol on first sight. The daemon charts a history reply
// 1 + 1 per 50 updates against its 20 requests/s (client.js spends 16): 100 bars load 5 symbols
// a second, so 50 symbols fill in ~10 s; the charts then grow to WINDOW from the live stream.
const HISTORY = 100;
const BACKOFF_MAX_MS = 15000;
const MAX_NOTICES = 6;
const OPEN_AT_FIRST = 4; // with no saved selection: every symbol's charts up to this many, else the first
const TICK_MS = 500; // ages, staleness, rate and latency refresh
const STALE_FACTOR = 3;
const CHART_HEIGHT = 240;
const CHART_HEIGHT_SMALL = 200;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  detail: $("detail"),
  form: $("token-form"),
  input: $("token"),
  session: $("session"),
  sessionText: $("session-text"),
  forget: $("forget"),
  retryRow: $("retry-row"),
  retry: $("retry"),
  notices: $("notices"),
  symbols: $("symbols"),
  stats: $("stream-stats"),
  rate: $("rate"),
  latency: $("latency"),
  zone: $("zone"),
  overview: $("overview-box"),
  overviewCount: $("overview-count"),
  estimator: $("estimator"),
  rows: $("overview-rows"),
  sortHeads: [...document.querySelectorAll("#overview th[data-sort]")],
};

const state = {
  config: null,
  token: null,
  stream: null,
  downSince: null,
  countdown: null,
  cspBlocked: false,
  cspViolations: 0,
  symbols: new Map(),
  order: [], // the overview's rows, as shown
  drawPending: false,
  meter: new StreamMeter(),
  prefs: loadPrefs(),
};

function loadPrefs() {
  const defaults = {
    zone: "utc",
    sort: { key: "symbol", direction: 1 },
    estimator: "close_to_close",
    selected: null, // null: none chosen yet (OPEN_AT_FIRST decides)
  };
  try {
    const saved = JSON.parse(localStorage.getItem(PREFS_KEY) || "{}");
    const prefs = { ...defaults, ...saved };
    if (!ZONES.includes(prefs.zone)) prefs.zone = defaults.zone;
    if (!ESTIMATORS.some(([key]) => key === prefs.estimator)) prefs.estimator = defaults.estimator;
    if (!Array.isArray(prefs.selected)) prefs.selected = null;
    return prefs;
  } catch {
    return defaults;
  }
}

function savePrefs() {
  try {
    localStorage.setItem(PREFS_KEY, JSON.stringify(state.prefs));
  } catch {
    // storage full or refused: preferences last as long as the page
  }
}

// --- token -------------------------------------------------------------------------------

// A token in the URL, as a fragment (#access_token=…, never sent to a server) or a query
// parameter (?access_token=…, RFC 6750 §2.3: it reached the daemon with the page's request, whose
// logs never contain query strings): moved to sessionStorage and removed from the address bar
// and the history, other parameters kept. The fragment wins when both are given.
function tokenFromUrl() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!query.has("access_token") && !fragment.has("access_token")) return;
  const token = (fragment.get("access_token") ?? query.get("access_token")).trim();
  // What does not carry the token is kept as it was written (`#note` stays `#note`).
  const without = (params, original, mark) => {
    if (!params.has("access_token")) return original;
    params.delete("access_token");
    const rest = params.toString();
    return rest ? `${mark}${rest}` : "";
  };
  const search = without(query, location.search, "?");
  const hash = without(fragment, location.hash, "#");
  history.replaceState(null, "", location.pathname + search + hash);
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
}

function askForToken() {
  ui.form.hidden = false;
  ui.session.hidden = true;
  ui.input.focus();
}

function onTokenSubmitted(event) {
  event.preventDefault(); // never submitted: CSP form-action 'none' would refuse it anyway
  const token = ui.input.value.trim();
  if (!token) return;
  ui.input.value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  state.token = token;
  ui.form.hidden = true;
  restart();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  stopStream();
  setState("signed-out", "Signed out", "The token was removed from this tab.");
  askForToken();
}

// --- status --------------------------------------------------------------------------------

function setState(name, title, detail = "", kind = "") {
  ui.status.dataset.state = name;
  document.body.dataset.state = name;
  ui.statusText.textContent = title;
  ui.detail.textContent = detail;
  ui.detail.hidden = !detail;
  ui.detail.classList.toggle("bad", kind === "bad");
  ui.retryRow.hidden = !["down", "refused", "origin"].includes(name) || !state.token;
}

function notice(text) {
  const item = document.createElement("div");
  item.className = "notice";
  const time = document.createElement("time");
  time.textContent = clock();
  item.append(time, text);
  ui.notices.prepend(item);
  while (ui.notices.children.length > MAX_NOTICES) ui.notices.lastElementChild.remove();
}

// --- connection ----------------------------------------------------------------------------

async function loadConfig() {
  const response = await fetch("dashboard/config.json", { cache: "no-store" });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

function originAllowed() {
  const allowed = state.config.allowed_origins;
  return allowed === null || allowed.includes(location.origin.toLowerCase());
}

// The stream's URL, asked before each attempt: a config that cannot be read means the daemon is
// down (the stream retries); an origin the daemon would refuse stops the stream here.
async function socketUrl() {
  state.config ??= await loadConfig();
  if (!originAllowed()) {
    stopStream();
    setState(
      "origin",
      "Origin not allowed",
      `The daemon accepts WebSocket connections only from ${state.config.allowed_origins.join(", ")}; ` +
        `this page is ${location.origin}. Open it by one of those names, or add this origin ` +
        "to server.allowed_origins.",
      "bad",
    );
    throw new Error("origin not allowed");
  }
  // Same origin by default: "ws" under this page's URL (its path too, behind a proxy);
  // absolute when the daemon's public_url says where a proxy serves it.
  const url = new URL(state.config.websocket.url, location.href);
  url.protocol = { "http:": "ws:", "https:": "wss:" }[url.protocol] || url.protocol;
  return url.href;
}

// Where each symbol on the page is: a new stream (another token, Retry) continues from there.
function positions() {
  const from = {};
  for (const [symbol, s] of state.symbols) if (s.lastSeq !== null) from[symbol] = s.lastSeq;
  return from;
}

function restart() {
  stopStream();
  state.cspBlocked = false;
  if (!state.token) {
    setState("no-token", "Not connected", "Enter an access token to watch the stream.");
    askForToken();
    return;
  }
  state.stream = openStream({
    url: socketUrl,
    token: state.token,
    history: HISTORY,
    resume: positions(),
    backoffMaxMs: BACKOFF_MAX_MS,
    healthUrl: "healthz",
    onStatus,
    onUpdate,
    onReset,
    onError: (message) => notice(`The daemon answered ${message.code}: ${message.message}`),
  });
}

function stopStream() {
  clearInterval(state.countdown);
  state.countdown = null;
  const stream = state.stream;
  state.stream = null;
  stream?.close();
}

function onStatus(status) {
  clearInterval(state.countdown);
  state.countdown = null;
  switch (status.state) {
    case "connecting": {
      const again = status.attempt > 0 || state.downSince !== null;
      // While retrying, the page keeps saying since when the daemon has been gone.
      const since = state.downSince === null ? "" : clock(state.downSince);
      setState(
        again ? "reconnecting" : "connecting",
        again ? "Reconnecting…" : "Connecting…",
        since ? `The daemon has not answered since ${since}; trying again now.` : "",
      );
      break;
    }
    case "open":
      onConnected(status.connected, status.resumed);
      break;
    case "reconnecting":
      onRetry(status);
      break;
    case "refused":
      tokenRejected(
        "refused",
        "Token refused",
        "The daemon is running but refused this token: it is unknown, expired or revoked. " +
          "Enter another token. (A daemon at its connection limits refuses the same way: Retry.)",
      );
      break;
    case "revoked":
      tokenRejected(
        "revoked",
        "Token revoked",
        `The daemon closed the stream: ${status.reason || "token revoked"}. ` +
          "Enter a valid token to continue.",
      );
      break;
    case "failed":
      setState("origin", "Cannot connect", String(status.error), "bad");
      break;
    default: // closed: this page stopped it
  }
}

function onRetry(status) {
  if (state.cspBlocked && ["down", "refused"].includes(status.cause)) {
    stopStream();
    setState(
      "origin",
      "Blocked by the page's security policy",
      `This page (${location.origin}) may not open a WebSocket to ${location.hostname}: ` +
        "open it as localhost or 127.0.0.1, or add its origin to server.allowed_origins.",
      "bad",
    );
    return;
  }
  if (status.cause === "refused") {
    // The daemon answers HTTP but refused the upgrade: confirmed once (it may have been restarting).
    setState("connecting", "Connecting…", "The daemon refused the connection; trying once more.");
    return;
  }
  state.downSince ??= Date.now();
  state.config = null; // a restarted daemon may listen elsewhere: ask again
  let name = "reconnecting";
  let title = "Disconnected";
  let detail;
  if (status.cause === "down") {
    name = "down";
    title = "Daemon unreachable";
    const since = clock(state.downSince);
    detail = `The daemon does not answer (down or restarting) since ${since}.`;
  } else if (status.cause === "gap") {
    const s = state.symbols.get(status.symbol);
    if (s) {
      s.gaps += 1; // the protocol forbids it: counted
      markDirty(s);
    }
    detail = `Missed updates of ${status.symbol}: resuming after its last seq.`;
  } else {
    const why =
      {
        1001: "the daemon is shutting down or restarting",
        1008: "too many errors",
        1013: "this page read the stream too slowly",
      }[status.code] || `the connection was lost (code ${status.code})`;
    detail = `Disconnected: ${why}.`;
  }
  const due = Date.now() + status.delayMs;
  const show = () => {
    const seconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
    setState(name, title, `${detail} Retrying in ${seconds} s.`, name === "down" ? "bad" : "");
  };
  show();
  state.countdown = setInterval(show, 1000);
}

function tokenRejected(name, title, detail) {
  sessionStorage.removeItem(TOKEN_KEY); // kept in memory only, for the Retry button
  setState(name, title, detail, "bad");
  askForToken();
}

// --- messages ------------------------------------------------------------------------------

function onConnected(message, resumed) {
  const wasDown = state.downSince;
  state.downSince = null;
  ui.form.hidden = true;
  ui.session.hidden = false;
  ui.stats.hidden = false;
  ui.sessionText.textContent = `token ${message.token} · daemon ${message.version}`;
  setState("live", "Live");
  const available = message.available || [];
  const allowed = new Set(available);
  for (const symbol of [...state.symbols.keys()]) {
    if (!allowed.has(symbol)) dropSymbol(symbol);
  }
  for (const symbol of available) symbolState(symbol);
  applySelection(available);
  ui.overview.hidden = false;
  ui.overviewCount.textContent = `${available.length} symbol${available.length === 1 ? "" : "s"}`;
  sortOverview(true);
  if (wasDown !== null) {
    const seconds = ((Date.now() - wasDown) / 1000).toFixed(1);
    const from = Object.entries(resumed).map(([symbol, seq]) => `${symbol} after seq ${seq}`);
    const detail = from.length ? `; resuming ${from.join(", ")}` : "";
    notice(`Reconnected after ${seconds} s${detail}.`);
  }
}

// Each update once, in seq order (the stream drops duplicates and repairs gaps).
function onUpdate(data, meta = {}) {
  const s = symbolState(data.symbol);
  const now = Date.now();
  const live = !meta.history;
  s.liveness.arrive(now, live);
  if (live) state.meter.record(now, parseTime(meta.published));
  s.lastSeq = data.seq;
  s.latest = data;
  s.updates += 1;
  s.annualize = annualizeFactor(data) ?? s.annualize;
  s.window.push(barFromUpdate(data, s.annualize));
  markDirty(s);
}

function onReset({ symbol, previousSeq, oldestSeq, latestSeq }) {
  const s = symbolState(symbol);
  s.window.clear();
  s.lastSeq = null;
  s.latest = null;
  s.resets += 1;
  s.resetAt = Date.now();
  markDirty(s);
  notice(
    `History reset for ${symbol}: the daemon no longer has what followed seq ${previousSeq} ` +
      `(it keeps seq ${oldestSeq} to ${latestSeq}). ` +
      "Its charts start again from what the daemon has.",
  );
}

// --- per-symbol state ------------------------------------------------------------------------

function symbolState(symbol) {
  let s = state.symbols.get(symbol);
  if (s) return s;
  s = {
    symbol,
    currency: quoteCurrency(symbol),
    window: new BarWindow(WINDOW),
    liveness: new Liveness(STALE_FACTOR),
    lastSeq: null,
    latest: null,
    updates: 0,
    gaps: 0,
    resets: 0,
    resetAt: null,
    annualize: null,
    stale: false,
    dirty: false,
    row: null,
    card: null, // the detail view, while the symbol is selected
  };
  buildRow(s);
  state.symbols.set(symbol, s);
  state.order.push(s);
  return s;
}

function dropSymbol(symbol) {
  const s = state.symbols.get(symbol);
  if (!s) return;
  closeCard(s);
  s.row.tr.remove();
  state.symbols.delete(symbol);
  state.order = state.order.filter((other) => other !== s);
}

function markDirty(s) {
  s.dirty = true;
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(draw); // at most one redraw per frame, however fast updates come
}

function draw() {
  state.drawPending = false;
  let changed = false;
  for (const s of state.symbols.values()) {
    if (!s.dirty) continue;
    s.dirty = false;
    changed = true;
    renderRow(s);
    if (s.card) renderCard(s);
  }
  if (changed && state.prefs.sort.key !== "age") sortOverview();
}

// Ages, staleness, rate and latency: on a timer, since they change without any update.
function tick() {
  const now = Date.now();
  for (const s of state.symbols.values()) {
    const fallback = s.window.spacing();
    const stale = s.updates > 0 && s.liveness.isStale(now, fallback);
    if (stale !== s.stale) {
      s.stale = stale;
      s.row.tr.classList.toggle("stale", stale);
      s.row.tr.dataset.stale = String(stale);
      if (s.card) s.card.section.dataset.stale = String(stale);
      s.card?.section.classList.toggle("stale", stale);
    }
    const age = s.liveness.ageSeconds(now);
    setText(s.row.age, formatAge(age));
    s.row.age.dataset.value = age ?? "";
    if (s.card) {
      const interval = s.liveness.intervalSeconds(fallback);
      setText(
        s.card.staleFlag,
        stale
          ? `stale: no update for ${formatAge(age)} (expected every ${formatAge(interval)})`
          : "",
      );
      s.card.staleFlag.hidden = !stale;
      setText(s.card.age, `updated ${formatAge(age)} ago`);
    }
  }
  const rate = state.meter.rate(now);
  const latency = state.meter.latencyMs();
  setText(ui.rate, rate === null ? "— upd/s" : `${rate.toFixed(1)} upd/s`);
  setText(ui.latency, latency === null ? "latency —" : `latency ${Math.round(latency)} ms`);
  document.body.dataset.rate = rate === null ? "" : rate.toFixed(2);
  document.body.dataset.latencyMs = latency === null ? "" : String(Math.round(latency));
  if (state.prefs.sort.key === "age") sortOverview();
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- overview ------------------------------------------------------------------------------

function buildRow(s) {
  const tr = element("tr");
  tr.dataset.symbol = s.symbol;
  tr.dataset.updates = "0";
  tr.dataset.stale = "false";
  const pick = element("input");
  pick.type = "checkbox";
  pick.setAttribute("aria-label", `Show the charts of ${s.symbol}`);
  pick.addEventListener("change", () => select(s, pick.checked));
  const cell = (className, text = MISSING) => {
    const td = element("td", className, text);
    tr.append(td);
    return td;
  };
  const pickCell = cell("col-pick", "");
  pickCell.append(pick);
  const name = cell("symbol-name", s.symbol);
  const spark = element("canvas", "spark");
  spark.width = 96;
  spark.height = 24;
  s.row = {
    tr,
    pick,
    name,
    price: cell("num"),
    change: cell("num col-change"),
    vol: cell("num"),
    garch: cell("num col-garch"),
    spark,
    sparkCell: cell("col-spark", ""),
    age: cell("num age"),
  };
  s.row.sparkCell.append(spark);
  // The whole row toggles the charts (a large touch target); the checkbox does it by itself.
  tr.addEventListener("click", (event) => {
    if (event.target === pick) return;
    pick.checked = !pick.checked;
    select(s, pick.checked);
  });
  ui.rows.append(tr);
}

function rowValues(s) {
  const latest = s.window.latest();
  const first = s.window.first();
  const index = ESTIMATORS.findIndex(([key]) => key === state.prefs.estimator);
  return {
    symbol: s.symbol,
    price: latest?.close ?? null,
    change: change(first?.close ?? null, latest?.close ?? null),
    vol: latest ? latest.annual[index] : null,
    garch: latest?.garch1Annual ?? null,
  };
}

function renderRow(s) {
  const v = rowValues(s);
  const row = s.row;
  row.tr.dataset.updates = String(s.updates);
  setCell(row.price, formatPrice(v.price), v.price);
  setCell(row.change, formatChange(v.change), v.change);
  row.change.classList.toggle("up", v.change > 0);
  row.change.classList.toggle("down", v.change < 0);
  setCell(row.vol, formatPercent(v.vol), v.vol);
  setCell(row.garch, formatPercent(v.garch), v.garch);
  drawSparkline(s);
}

function setCell(td, text, value) {
  setText(td, text);
  td.dataset.value = value ?? "";
}

function drawSparkline(s) {
  const canvas = s.row.spark;
  const ratio = window.devicePixelRatio || 1;
  const width = 96;
  const height = 24;
  if (canvas.width !== width * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const points = s.window.points;
  let min = Infinity;
  let max = -Infinity;
  for (const p of points) {
    if (p.gap || p.close == null) continue;
    if (p.close < min) min = p.close;
    if (p.close > max) max = p.close;
  }
  if (!(max >= min) || points.length < 2) return;
  const t0 = points[0].t;
  const span = points.at(-1).t - t0 || 1;
  const range = max - min || 1;
  const first = points.find((p) => !p.gap)?.close;
  const last = points.at(-1).close;
  ctx.strokeStyle = last >= first ? "#3fb950" : "#f85149";
  ctx.lineWidth = 1.25;
  ctx.beginPath();
  let pen = false;
  for (const p of points) {
    if (p.gap || p.close == null) {
      pen = false; // a break: no line across the hole
      continue;
    }
    const x = 1 + ((p.t - t0) / span) * (width - 2);
    const y = height - 2 - ((p.close - min) / range) * (height - 4);
    if (pen) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    pen = true;
  }
  ctx.stroke();
}

const SORT_KEYS = {
  symbol: (s) => s.symbol,
  price: (s) => rowValues(s).price,
  change: (s) => rowValues(s).change,
  vol: (s) => rowValues(s).vol,
  garch: (s) => rowValues(s).garch,
  age: (s) => s.liveness.ageSeconds(Date.now()),
};

// Rows in the chosen order; the DOM is touched only when the order changed.
function sortOverview(force = false) {
  const { key, direction } = state.prefs.sort;
  const sorted = sortRows(state.order, SORT_KEYS[key] ?? SORT_KEYS.symbol, direction, (s) => s.symbol);
  const same = !force && sorted.every((s, i) => s === state.order[i]);
  state.order = sorted;
  if (!same) for (const s of sorted) ui.rows.append(s.row.tr);
  for (const th of ui.sortHeads) {
    const active = th.dataset.sort === key;
    if (active) th.setAttribute("aria-sort", direction > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

function onSortClicked(key) {
  const sort = state.prefs.sort;
  if (sort.key === key) sort.direction = -sort.direction;
  else state.prefs.sort = { key, direction: key === "symbol" ? 1 : -1 };
  savePrefs();
  sortOverview(true);
}

function onEstimatorChosen() {
  state.prefs.estimator = ui.estimator.value;
  savePrefs();
  for (const s of state.symbols.values()) renderRow(s);
  sortOverview();
}

// --- selection: the detail charts of the chosen rows ---------------------------------------

function applySelection(available) {
  let chosen = state.prefs.selected;
  if (chosen === null || !chosen.some((symbol) => available.includes(symbol))) {
    chosen = available.length <= OPEN_AT_FIRST ? available : available.slice(0, 1);
  }
  const wanted = new Set(chosen);
  for (const symbol of available) {
    const s = state.symbols.get(symbol);
    if (wanted.has(symbol) && !s.card) openCard(s);
    if (!wanted.has(symbol) && s.card) closeCard(s);
    s.row.pick.checked = wanted.has(symbol);
    s.row.tr.dataset.selected = String(wanted.has(symbol));
  }
}

function select(s, on) {
  if (on && !s.card) openCard(s);
  if (!on && s.card) closeCard(s);
  s.row.pick.checked = on;
  s.row.tr.dataset.selected = String(on);
  state.prefs.selected = [...state.symbols.values()].filter((x) => x.card).map((x) => x.symbol);
  savePrefs();
}

// --- detail card -----------------------------------------------------------------------------

function openCard(s) {
  const section = element("section", "symbol");
  section.dataset.symbol = s.symbol;
  section.dataset.stale = String(s.stale);
  section.classList.toggle("stale", s.stale);
  const header = element("header");
  const title = element("h2", "", s.symbol);
  const price = element("span", "price", MISSING);
  const age = element("span", "meta age", "");
  const staleFlag = element("span", "stale-flag");
  staleFlag.hidden = true;
  const meta = element("span", "meta", "waiting for the first update");
  const resetFlag = element("span", "reset-flag");
  resetFlag.hidden = true;
  header.append(title, price, age, staleFlag, meta, resetFlag);

  const toolbar = element("div", "toolbar");
  toolbar.setAttribute("role", "toolbar");
  toolbar.setAttribute("aria-label", `${s.symbol} chart options`);
  const choice = (options, current, onChoose) => {
    const group = element("div", "segmented");
    const buttons = options.map(([value, label]) => {
      const button = element("button", "", label);
      button.type = "button";
      button.dataset.value = value;
      button.setAttribute("aria-pressed", String(value === current));
      button.addEventListener("click", () => {
        for (const other of buttons) other.setAttribute("aria-pressed", String(other === button));
        onChoose(value);
      });
      return button;
    });
    group.append(...buttons);
    return group;
  };
  const action = (label, name, run) => {
    const button = element("button", "", label);
    button.type = "button";
    button.dataset.action = name;
    button.addEventListener("click", run);
    return button;
  };
  toolbar.append(
    choice([["line", "Line"], ["candles", "Candles"]], "line", (view) => {
      card.view = view;
      section.dataset.view = view;
      buildCharts(s);
    }),
    choice([["annual", "Annualised"], ["bar", "Per bar"]], "annual", (scale) => {
      card.scale = scale;
      section.dataset.scale = scale;
      buildCharts(s);
    }),
    action("CSV", "csv", () => exportCsv(s)),
    action("Price PNG", "price-png", () => exportPng(s, "price")),
    action("Volatility PNG", "vol-png", () => exportPng(s, "vol")),
    action("Close", "close", () => select(s, false)),
  );

  const charts = element("div", "charts");
  const priceBox = element("div", "chart");
  const priceTitle = element("h3");
  const pricePlot = element("div", "plot price-plot");
  priceBox.append(priceTitle, pricePlot);
  const volBox = element("div", "chart");
  const volHead = element("div", "chart-head");
  const volTitle = element("h3");
  volHead.append(volTitle, estimatorHelp());
  const volPlot = element("div", "plot vol-plot");
  const quality = element("p", "quality");
  quality.hidden = true;
  volBox.append(volHead, volPlot, quality);
  charts.append(priceBox, volBox);

  const tables = element("div", "tables");
  const card = {
    section,
    price,
    age,
    staleFlag,
    meta,
    resetFlag,
    priceTitle,
    volTitle,
    pricePlot,
    volPlot,
    quality,
    view: "line",
    scale: "annual",
    shown: ESTIMATORS.map(([, , show]) => show),
    priceChart: null,
    volChart: null,
    barTable: table(tables, "Latest bar", ["", "value"]),
    estTable: table(tables, "Estimators", ["", "per bar", "annualised"]),
    garchTable: table(tables, "GARCH(1,1) forecast", ["", "value"]),
    resize: null,
  };
  section.dataset.view = card.view;
  section.dataset.scale = card.scale;
  section.append(header, toolbar, charts, tables);
  ui.symbols.append(section);
  s.card = card;
  buildCharts(s);
  // Charts follow their box's width (phones, rotation, a resized window).
  card.resize = new ResizeObserver(() => resizeCharts(s));
  card.resize.observe(pricePlot);
  card.resize.observe(volPlot);
  renderCard(s);
}

function closeCard(s) {
  const card = s.card;
  if (!card) return;
  card.resize.disconnect();
  card.priceChart?.destroy();
  card.volChart?.destroy();
  card.section.remove();
  s.card = null;
}

function estimatorHelp() {
  const help = element("details", "help");
  const summary = element("summary", "", "?");
  const text =
    "Shown at first: close-to-close (the textbook standard deviation of log returns), EWMA " +
    "(RiskMetrics weighting: reacts first to a change) and Yang–Zhang (open, high, low and " +
    "close with the overnight jump: the most efficient). Parkinson, Garman–Klass and " +
    "Rogers–Satchell use the bar's range too; click a legend entry to show or hide any line. " +
    "Range estimators are blank (—) when the bars carry no real high and low. The dashed red " +
    "line is the GARCH(1,1) forecast of the next bar. All over the estimator window.";
  summary.title = text;
  summary.setAttribute("aria-label", "About the estimators");
  help.append(summary, element("p", "", text));
  return help;
}

function chartSize(plot) {
  const width = Math.max(120, Math.floor(plot.clientWidth || plot.parentElement.clientWidth || 300));
  return { width, height: width < 480 ? CHART_HEIGHT_SMALL : CHART_HEIGHT };
}

function buildCharts(s) {
  const card = s.card;
  card.priceChart?.destroy();
  card.volChart?.destroy();
  const zone = state.prefs.zone;
  const price = chartSize(card.pricePlot);
  card.priceChart = new uPlot(
    priceOptions({ ...price, zone, currency: s.currency, view: card.view }),
    priceData(s),
    card.pricePlot,
  );
  const vol = chartSize(card.volPlot);
  card.volChart = new uPlot(
    volatilityOptions({
      ...vol,
      zone,
      perBar: card.scale === "bar",
      shown: card.shown,
      onToggle: (i, show) => {
        if (i >= 0 && i < card.shown.length) card.shown[i] = show;
      },
    }),
    volData(s),
    card.volPlot,
  );
  showLatest(card.priceChart);
  showLatest(card.volChart);
  renderTitles(s);
}

function resizeCharts(s) {
  const card = s.card;
  if (!card) return;
  for (const [chart, plot] of [
    [card.priceChart, card.pricePlot],
    [card.volChart, card.volPlot],
  ]) {
    const size = chartSize(plot);
    if (chart.width !== size.width || chart.height !== size.height) chart.setSize(size);
  }
}

function priceData(s) {
  const w = s.window;
  return [
    w.points.map((p) => p.t),
    w.column((p) => p.open),
    w.column((p) => p.high),
    w.column((p) => p.low),
    w.column((p) => p.close),
    w.column((p) => p.volume),
  ];
}

function volData(s) {
  const w = s.window;
  const perBar = s.card.scale === "bar";
  const pct = (v) => (v == null ? null : v * 100);
  return [
    w.points.map((p) => p.t),
    ...ESTIMATORS.map((_, i) => w.column((p) => pct(perBar ? p.perBar[i] : p.annual[i]))),
    w.column((p) => pct(perBar ? p.garch1 : p.garch1Annual)),
  ];
}

function renderTitles(s) {
  const card = s.card;
  const latest = s.window.latest();
  const unit = s.currency ?? "quote currency";
  setText(card.priceTitle, `Price (${unit}) · ${card.view === "candles" ? "OHLC candles" : "close, high, low"} · volume`);
  const window = latest?.window ?? null;
  const scale = card.scale === "bar" ? "per bar, %" : "annualised, %";
  setText(
    card.volTitle,
    `Volatility (${scale}) · window ${window === null ? MISSING : `${window} bars`} · GARCH σ next bar`,
  );
}

function renderCard(s) {
  const card = s.card;
  const section = card.section;
  const d = s.latest;
  section.dataset.updates = String(s.updates);
  section.dataset.seq = s.lastSeq === null ? "" : String(s.lastSeq);
  section.dataset.gaps = String(s.gaps);
  section.dataset.resets = String(s.resets);
  card.resetFlag.hidden = s.resets === 0;
  if (s.resets) setText(card.resetFlag, `history reset at ${clock(s.resetAt)}`);
  card.priceChart.setData(priceData(s));
  card.volChart.setData(volData(s));
  showLatest(card.priceChart);
  showLatest(card.volChart);
  section.dataset.points = String(s.window.points.length);
  renderTitles(s);
  if (!d) {
    setText(card.price, MISSING);
    setText(card.meta, "waiting for the first update");
    return;
  }
  const zone = state.prefs.zone;
  const bar = s.window.latest();
  const barSeconds = d.bar_seconds ?? null;
  setText(card.price, `${formatPrice(d.price ?? d.close)}${s.currency ? ` ${s.currency}` : ""}`);
  setText(
    card.meta,
    `seq ${d.seq} · bar ${formatTimestamp(bar?.t, zone)}` +
      (barSeconds === null ? "" : ` · ${formatAge(barSeconds)} bars`) +
      ` · ${s.updates} updates`,
  );
  fill(card.barTable, [
    ["bar close", formatTimestamp(bar?.t, zone)],
    ["bar length", barSeconds === null ? MISSING : formatAge(barSeconds)],
    ["open", formatPrice(d.open)],
    ["high", formatPrice(d.high)],
    ["low", formatPrice(d.low)],
    ["close", formatPrice(d.close)],
    ["volume", formatNumber(d.volume, 6)],
    ["log return", formatNumber(d.returns, 4)],
  ]);
  const est = d.estimators || {};
  const annual = d.estimators_annualized || {};
  fill(card.estTable, [
    ...ESTIMATORS.map(([key, label]) => [label, formatNumber(est[key], 4), formatPercent(annual[key])]),
    ["window (bars)", est.window ?? MISSING, ""],
  ]);
  const rangeQuality = d.estimators_quality?.range ?? null;
  const rangeMissing = RANGE_ESTIMATORS.every((key) => est[key] == null) && est.close_to_close != null;
  card.quality.hidden = !(rangeQuality && rangeQuality !== "ok") && !rangeMissing;
  setText(
    card.quality,
    rangeQuality === "close_only"
      ? "Range estimators blank: the bars in the window carry no real high and low (close-only data)."
      : `Range estimators blank${rangeQuality ? ` (${rangeQuality})` : ""}.`,
  );
  const g = d.garch_forecast || {};
  const annualize = (v) => (v != null && s.annualize ? v * s.annualize : null);
  const both = (v) => `${formatNumber(v, 4)} (${formatPercent(annualize(v))})`;
  fill(card.garchTable, [
    ["status", g.status ?? MISSING],
    ["σ next bar", both(g.volatility_1)],
    [`σ of bar ${g.horizon ?? "h"}`, both(g.volatility_h)],
    ...(g.volatility_cum_h !== undefined
      ? [[`σ over ${g.horizon ?? "h"} bars (cumulative)`, formatNumber(g.volatility_cum_h, 4)]]
      : []),
    ["ω", formatNumber(g.omega, 4)],
    ["α", formatNumber(g.alpha, 4)],
    ["β", formatNumber(g.beta, 4)],
    ["α + β", formatNumber(g.persistence, 4)],
    ["fitted on (bars)", g.fit_bars ?? MISSING],
    ["bars since fit", g.bars_since_fit ?? MISSING],
    ...(g.message ? [["message", g.message]] : []),
  ]);
}

function table(parent, title, headings) {
  const box = element("div");
  const grid = element("table");
  const head = element("tr");
  for (const heading of headings) head.append(element("th", "", heading));
  grid.append(head);
  box.append(element("h3", "", title), grid);
  parent.append(box);
  return grid;
}

function fill(grid, rows) {
  while (grid.rows.length > rows.length + 1) grid.deleteRow(-1);
  rows.forEach((cells, i) => {
    const row = grid.rows[i + 1] || grid.insertRow();
    cells.forEach((text, j) => {
      const cell = row.cells[j] || row.insertCell();
      cell.className = j > 0 ? "num" : "";
      setText(cell, String(text));
    });
  });
}

// --- export ----------------------------------------------------------------------------------

function download(name, blob) {
  const url = URL.createObjectURL(blob);
  const link = element("a");
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

function stamp() {
  return new Date().toISOString().replace(/[-:]/g, "").replace(/\.\d+/, "");
}

// The shown window (up to WINDOW bars) as CSV: times as the daemon sent them (RFC 3339, UTC),
// numbers unrounded, empty fields for null ones.
function exportCsv(s) {
  const header = [
    "timestamp",
    "seq",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "log_return",
    ...ESTIMATORS.map(([key]) => `${key}_per_bar`),
    ...ESTIMATORS.map(([key]) => `${key}_annualized`),
    "estimator_window",
    "garch_volatility_1",
    "garch_volatility_h",
    "garch_volatility_cum_h",
  ];
  const rows = s.window
    .barsOnly()
    .map((p) => [
      p.timestamp,
      p.seq,
      p.open,
      p.high,
      p.low,
      p.close,
      p.volume,
      p.returns,
      ...p.perBar,
      ...p.annual,
      p.window,
      p.garch1,
      p.garchH,
      p.garchCumH,
    ]);
  const blob = new Blob([toCsv(header, rows)], { type: "text/csv" });
  download(`agentspoonsd-${fileSafe(s.symbol)}-${stamp()}.csv`, blob);
}

async function exportPng(s, which) {
  const card = s.card;
  if (!card) return;
  const chart = which === "price" ? card.priceChart : card.volChart;
  const title = `${s.symbol} · ${(which === "price" ? card.priceTitle : card.volTitle).textContent}`;
  const blob = await chartPng(chart, title);
  download(`agentspoonsd-${fileSafe(s.symbol)}-${which}-${stamp()}.png`, blob);
}

// --- preferences -------------------------------------------------------------------------------

function onZoneChosen() {
  state.prefs.zone = ui.zone.value;
  savePrefs();
  for (const s of state.symbols.values()) {
    if (s.card) {
      buildCharts(s);
      renderCard(s);
    }
  }
}

function clock(ms = Date.now()) {
  return formatClock(ms / 1000, state.prefs.zone);
}

// Read-only views for the browser tests and the console; the page never reads them.
window.dashboard = {
  bars: (symbol) =>
    state.symbols.get(symbol)?.window.points.map((p) => ({ t: p.t, seq: p.seq ?? null, gap: !!p.gap })),
  stats: () => ({ rate: state.meter.rate(Date.now()), latencyMs: state.meter.latencyMs() }),
};

// --- start -----------------------------------------------------------------------------------

document.addEventListener("securitypolicyviolation", (event) => {
  state.cspViolations += 1;
  document.body.dataset.cspViolations = String(state.cspViolations);
  if (event.effectiveDirective === "connect-src") state.cspBlocked = true;
});
ui.form.addEventListener("submit", onTokenSubmitted);
ui.forget.addEventListener("click", forgetToken);
ui.retry.addEventListener("click", () => {
  state.token ??= sessionStorage.getItem(TOKEN_KEY);
  restart();
});
for (const [key, label] of ESTIMATORS) ui.estimator.append(new Option(label, key));
ui.estimator.value = state.prefs.estimator;
ui.estimator.addEventListener("change", onEstimatorChosen);
ui.zone.value = state.prefs.zone;
ui.zone.addEventListener("change", onZoneChosen);
for (const th of ui.sortHeads) {
  th.querySelector("button").addEventListener("click", () => onSortClicked(th.dataset.sort));
}

tokenFromUrl();
state.token = sessionStorage.getItem(TOKEN_KEY);
document.body.dataset.cspViolations = "0";
setInterval(tick, TICK_MS);
restart();
