// agentspoonsd dashboard: one WebSocket, one card per symbol (price and volatility charts, the
// latest bar, every estimator, the GARCH forecast). An ES module, no build step; uPlot is vendored.
//
// The connection is the browser module the daemon serves at /client.js (docs/CLIENT.md ("JavaScript")): it
// reconnects with backoff, resumes each symbol from its last seq (no gap, no duplicate), loads the
// recent history of a symbol it has no position for, and tells a refused token (401), a revoked
// one (4001) and a daemon that is down apart. This page adds, in short:
// - the token comes from the URL fragment (#access_token=…, then removed from the address bar) or
//   the form, and lives in sessionStorage: this tab only, gone when it closes;
// - the WebSocket's URL and the origins it admits come from dashboard/config.json, asked before
//   each attempt (a restarted daemon may listen elsewhere); an origin it would refuse is shown
//   before anything is tried;
// - `reset` says the daemon could not fill a gap: that symbol's charts restart and the page says so.

import { connect as openStream } from "../client.js"; // /client.js, under a proxy's path too

const TOKEN_KEY = "agentspoonsd.token";
const WINDOW = 300; // points kept per chart
const BACKOFF_MAX_MS = 15000;
const MAX_NOTICES = 6;
const ESTIMATORS = [
  // key, label, shown on the chart at first (the legend toggles the others)
  ["close_to_close", "close-to-close", true],
  ["ewma", "EWMA", true],
  ["parkinson", "Parkinson", false],
  ["garman_klass", "Garman–Klass", false],
  ["rogers_satchell", "Rogers–Satchell", false],
  ["yang_zhang", "Yang–Zhang", true],
];
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#ba68c8", "#f06292", "#e6ee9c"];
const GARCH_COLOR = "#ff5252";

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
  drawPending: false,
};

// --- token -------------------------------------------------------------------------------

function tokenFromFragment() {
  if (!location.hash) return;
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("access_token")) return;
  const token = params.get("access_token").trim();
  // The fragment never reaches a server, but it stays in the address bar and the history.
  history.replaceState(null, "", location.pathname + location.search);
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
  time.textContent = new Date().toLocaleTimeString();
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
    history: WINDOW,
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
      const since = state.downSince === null ? "" : new Date(state.downSince).toLocaleTimeString();
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
    const since = new Date(state.downSince).toLocaleTimeString();
    detail = `The daemon does not answer (down or restarting) since ${since}.`;
  } else if (status.cause === "gap") {
    const s = state.symbols.get(status.symbol);
    if (s) s.card.dataset.gaps = String((s.gaps += 1)); // the protocol forbids it: counted
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
  ui.sessionText.textContent = `token ${message.token} · daemon ${message.version}`;
  setState("live", "Live");
  const available = new Set(message.available);
  for (const [symbol, s] of state.symbols) {
    if (!available.has(symbol)) {
      s.card.remove();
      state.symbols.delete(symbol);
    }
  }
  for (const symbol of message.available) symbolView(symbol);
  if (wasDown !== null) {
    const seconds = ((Date.now() - wasDown) / 1000).toFixed(1);
    const from = Object.entries(resumed).map(([symbol, seq]) => `${symbol} after seq ${seq}`);
    const detail = from.length ? `; resuming ${from.join(", ")}` : "";
    notice(`Reconnected after ${seconds} s${detail}.`);
  }
}

// Each update once, in seq order (the stream drops duplicates and repairs gaps).
function onUpdate(data) {
  addPoint(symbolView(data.symbol), data);
}

function onReset({ symbol, previousSeq, oldestSeq, latestSeq }) {
  const s = symbolView(symbol);
  clearSeries(s);
  s.resets += 1;
  s.card.dataset.resets = String(s.resets);
  s.resetFlag.hidden = false;
  s.resetFlag.textContent = `history reset at ${new Date().toLocaleTimeString()}`;
  notice(
    `History reset for ${symbol}: the daemon no longer has what followed seq ${previousSeq} ` +
      `(it keeps seq ${oldestSeq} to ${latestSeq}). ` +
      "Its charts start again from what the daemon has.",
  );
}

// --- per-symbol data and view --------------------------------------------------------------

function emptySeries() {
  return {
    x: [],
    close: [],
    high: [],
    low: [],
    vols: ESTIMATORS.map(() => []),
    garch: [],
  };
}

function clearSeries(s) {
  s.series = emptySeries();
  s.lastSeq = null;
  s.latest = null;
  markDirty(s);
}

function addPoint(s, data) {
  s.lastSeq = data.seq;
  s.latest = data;
  s.updates += 1;
  const est = data.estimators || {};
  const annual = data.estimators_annualized || {};
  // Per-bar numbers × sqrt(bars per year) = annualized: the daemon's own factor, read back.
  if (est.close_to_close && annual.close_to_close) {
    s.annualize = annual.close_to_close / est.close_to_close;
  }
  const series = s.series;
  series.x.push(barTime(data.timestamp));
  series.close.push(data.close ?? data.price);
  series.high.push(data.high);
  series.low.push(data.low);
  ESTIMATORS.forEach(([key], i) => series.vols[i].push(percent(annual[key])));
  const garch = data.garch_forecast;
  const sigma = garch && garch.volatility_1 != null && s.annualize ? garch.volatility_1 * s.annualize : null;
  series.garch.push(percent(sigma));
  if (series.x.length > WINDOW) {
    series.x.shift();
    series.close.shift();
    series.high.shift();
    series.low.shift();
    series.vols.forEach((values) => values.shift());
    series.garch.shift();
  }
  s.card.dataset.updates = String(s.updates);
  s.card.dataset.seq = String(data.seq);
  s.card.dataset.gaps = String(s.gaps);
  markDirty(s);
}

function markDirty(s) {
  s.dirty = true;
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(draw); // at most one redraw per frame, however fast updates come
}

function draw() {
  state.drawPending = false;
  for (const s of state.symbols.values()) {
    if (!s.dirty) continue;
    s.dirty = false;
    const series = s.series;
    s.priceChart.setData([series.x, series.close, series.high, series.low]);
    s.volChart.setData([series.x, ...series.vols, series.garch]);
    s.card.dataset.points = String(series.x.length);
    renderTables(s);
  }
}

function symbolView(symbol) {
  let s = state.symbols.get(symbol);
  if (s) return s;
  s = {
    symbol,
    series: emptySeries(),
    lastSeq: null,
    latest: null,
    updates: 0,
    gaps: 0,
    resets: 0,
    annualize: null,
    dirty: false,
  };
  buildCard(s);
  state.symbols.set(symbol, s);
  return s;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildCard(s) {
  const card = element("section", "symbol");
  card.dataset.symbol = s.symbol;
  card.dataset.updates = "0";
  card.dataset.points = "0";
  card.dataset.resets = "0";
  card.dataset.gaps = "0";
  const header = element("header");
  s.priceText = element("span", "price", "–");
  s.metaText = element("span", "meta", "waiting for the first update");
  s.resetFlag = element("span", "reset-flag");
  s.resetFlag.hidden = true;
  header.append(element("h2", "", s.symbol), s.priceText, s.metaText, s.resetFlag);

  const charts = element("div", "charts");
  const pricePlot = element("div", "plot price-plot");
  const volPlot = element("div", "plot vol-plot");
  const priceBox = element("div", "chart");
  priceBox.append(element("h3", "", "Price (close, high, low)"), pricePlot);
  const volBox = element("div", "chart");
  volBox.append(element("h3", "", "Volatility, annualized % (estimators, GARCH σ next bar)"), volPlot);
  charts.append(priceBox, volBox);

  const tables = element("div", "tables");
  s.barTable = table(tables, "Latest bar", ["", "value"]);
  s.estTable = table(tables, "Estimators", ["", "per bar", "annualized"]);
  s.garchTable = table(tables, "GARCH(1,1) forecast", ["", "value"]);
  card.append(header, charts, tables);
  ui.symbols.append(card);
  s.card = card;

  const width = Math.max(300, priceBox.clientWidth || 400);
  s.priceChart = new uPlot(priceOptions(width), [[], [], [], []], pricePlot);
  s.volChart = new uPlot(volOptions(width), [[], ...ESTIMATORS.map(() => []), []], volPlot);
  const resize = new ResizeObserver(() => {
    const w = Math.max(300, priceBox.clientWidth);
    s.priceChart.setSize({ width: w, height: 220 });
    s.volChart.setSize({ width: Math.max(300, volBox.clientWidth), height: 220 });
  });
  resize.observe(charts);
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

function axes(format) {
  const style = { stroke: "#8aa0b2", grid: { stroke: "#263544" }, ticks: { stroke: "#263544" } };
  return [style, { ...style, size: 80, values: (u, ticks) => ticks.map(format) }];
}

function priceOptions(width) {
  const value = (u, v) => (v == null ? "–" : formatPrice(v));
  return {
    width,
    height: 220,
    scales: { x: { time: true } },
    axes: axes(formatAxisPrice),
    series: [
      {},
      { label: "close", stroke: COLORS[0], width: 1.5, value },
      { label: "high", stroke: "#5d7284", width: 1, dash: [4, 4], value },
      { label: "low", stroke: "#5d7284", width: 1, dash: [4, 4], value },
    ],
  };
}

function volOptions(width) {
  const value = (u, v) => (v == null ? "–" : `${v.toFixed(2)} %`);
  return {
    width,
    height: 220,
    scales: { x: { time: true } },
    axes: axes((v) => `${v} %`),
    series: [
      {},
      ...ESTIMATORS.map(([, label, show], i) => ({ label, show, stroke: COLORS[i], width: 1, value })),
      { label: "GARCH σ₁", stroke: GARCH_COLOR, width: 1.5, dash: [6, 3], value },
    ],
  };
}

function renderTables(s) {
  const d = s.latest;
  if (!d) {
    s.priceText.textContent = "–";
    s.metaText.textContent = "waiting for the first update";
    return;
  }
  s.priceText.textContent = formatPrice(d.price);
  s.metaText.textContent = `seq ${d.seq} · bar ${d.timestamp} · ${s.updates} updates`;
  fill(s.barTable, [
    ["time", d.timestamp],
    ["open", formatPrice(d.open)],
    ["high", formatPrice(d.high)],
    ["low", formatPrice(d.low)],
    ["close", formatPrice(d.close)],
    ["volume", formatNumber(d.volume, 6)],
    ["log return", formatNumber(d.returns, 4)],
  ]);
  const est = d.estimators || {};
  const annual = d.estimators_annualized || {};
  fill(s.estTable, [
    ...ESTIMATORS.map(([key, label]) => [label, formatNumber(est[key], 4), formatPercent(annual[key])]),
    ["window (bars)", est.window ?? "–", ""],
  ]);
  const g = d.garch_forecast || {};
  const annualize = (v) => (v != null && s.annualize ? v * s.annualize : null);
  fill(s.garchTable, [
    ["status", g.status ?? "–"],
    ["σ next bar", `${formatNumber(g.volatility_1, 4)} (${formatPercent(annualize(g.volatility_1))})`],
    [`σ in ${g.horizon ?? "h"} bars`, `${formatNumber(g.volatility_h, 4)} (${formatPercent(annualize(g.volatility_h))})`],
    ["ω", formatNumber(g.omega, 4)],
    ["α", formatNumber(g.alpha, 4)],
    ["β", formatNumber(g.beta, 4)],
    ["α + β", formatNumber(g.persistence, 4)],
    ["fitted on (bars)", g.fit_bars ?? "–"],
    ["bars since fit", g.bars_since_fit ?? "–"],
    ...(g.message ? [["message", g.message]] : []),
  ]);
}

function fill(grid, rows) {
  while (grid.rows.length > rows.length + 1) grid.deleteRow(-1);
  rows.forEach((cells, i) => {
    const row = grid.rows[i + 1] || grid.insertRow();
    cells.forEach((text, j) => {
      const cell = row.cells[j] || row.insertCell();
      cell.className = j > 0 ? "num" : "";
      cell.textContent = String(text);
    });
  });
}

// --- formatting ------------------------------------------------------------------------------

function barTime(timestamp) {
  // RFC 3339 with microseconds: Date.parse is only specified for milliseconds.
  const ms = Date.parse(String(timestamp).replace(/(\.\d{3})\d+/, "$1"));
  return ms / 1000;
}

function percent(v) {
  return v == null ? null : v * 100;
}

function formatPrice(v) {
  if (v == null) return "–";
  const digits = Math.abs(v) < 10 ? 6 : 2;
  return v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
}

function formatAxisPrice(v) {
  // Ticks differ by round steps: whole units are enough above 1,000, and keep the axis narrow.
  const digits = Math.abs(v) >= 1000 ? 0 : Math.abs(v) >= 10 ? 2 : 6;
  return v.toLocaleString("en-US", { maximumFractionDigits: digits });
}

function formatNumber(v, precision) {
  return v == null ? "–" : Number(v).toPrecision(precision);
}

function formatPercent(v) {
  return v == null ? "–" : `${(v * 100).toFixed(2)} %`;
}

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

tokenFromFragment();
state.token = sessionStorage.getItem(TOKEN_KEY);
document.body.dataset.cspViolations = "0";
restart();
