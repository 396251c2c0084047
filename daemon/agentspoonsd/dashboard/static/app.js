// agentspoonsd dashboard: one WebSocket, one card per symbol (price and volatility charts, the
// latest bar, every estimator, the GARCH forecast). Plain ES2020, no build step; uPlot is vendored.
//
// The connection, in short (docs/PROTOCOL.md has the messages):
// - the token comes from the URL fragment (#access_token=…, then removed from the address bar) or
//   the form, and lives in sessionStorage: this tab only, gone when it closes;
// - the socket opens with ?symbols= (nothing live yet); for a symbol seen before the page sends
//   `resume` from the last seq it has (the daemon replays the gap, then goes live: no gap, no
//   duplicate), for a new one `history` and then `resume` from the newest update in the reply;
// - a socket that never opened is diagnosed with GET /healthz on the page's own origin: no answer
//   means the daemon is down (retry with backoff); an answer twice in a row means the daemon is up
//   and refused the upgrade, which for a browser page means the token (401): browsers hide the
//   HTTP status of a failed WebSocket handshake, so this is the robust way to tell the two apart;
// - close code 4001 is a revoked or expired token; `reset` says the daemon could not fill a gap:
//   that symbol's charts restart and the page says so.
"use strict";

(function () {
  const TOKEN_KEY = "agentspoonsd.token";
  const WINDOW = 300; // points kept per chart
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const REFUSAL_CONFIRM_MS = 1000; // a refusal is confirmed once, in case the daemon was restarting
  const HEALTH_TIMEOUT_MS = 3000;
  const CLOSE_TOKEN_REVOKED = 4001;
  const REQUESTS_PER_FLUSH = 8; // the daemon allows 20 client messages per second
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
    ws: null,
    requests: null,
    generation: 0, // bumped by every connect(): an older attempt's late callbacks then do nothing
    opened: false, // the current socket's handshake succeeded
    attempt: 0, // failed attempts since the last good connection (backoff exponent)
    refusals: 0,
    downSince: null,
    timer: null,
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
    stopSocket();
    clearTimers();
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

  async function daemonAnswers() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), HEALTH_TIMEOUT_MS);
    try {
      const response = await fetch("healthz", { cache: "no-store", signal: abort.signal });
      return response.ok;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  function originAllowed() {
    const allowed = state.config.allowed_origins;
    return allowed === null || allowed.includes(location.origin.toLowerCase());
  }

  function socketUrl() {
    // Same origin by default: "ws" under this page's URL (its path too, behind a proxy);
    // absolute when the daemon's public_url says where a proxy serves it.
    const url = new URL(state.config.websocket.url, location.href);
    url.protocol = { "http:": "ws:", "https:": "wss:" }[url.protocol] || url.protocol;
    url.search = new URLSearchParams({ access_token: state.token, symbols: "" });
    return url.href;
  }

  function restart() {
    stopSocket();
    clearTimers();
    state.attempt = 0;
    state.refusals = 0;
    state.cspBlocked = false;
    connect();
  }

  async function connect() {
    clearTimers();
    stopSocket();
    const generation = ++state.generation;
    if (!state.token) {
      setState("no-token", "Not connected", "Enter an access token to watch the stream.");
      askForToken();
      return;
    }
    if (!state.config) {
      let config;
      try {
        config = await loadConfig();
      } catch {
        if (generation === state.generation) daemonDown();
        return;
      }
      if (generation !== state.generation) return;
      state.config = config;
    }
    if (!originAllowed()) {
      setState(
        "origin",
        "Origin not allowed",
        `The daemon accepts WebSocket connections only from ${state.config.allowed_origins.join(", ")}; ` +
          `this page is ${location.origin}. Open it by one of those names, or add this origin ` +
          "to server.allowed_origins.",
        "bad",
      );
      return;
    }
    const again = state.attempt > 0 || state.downSince !== null;
    setState(again ? "reconnecting" : "connecting", again ? "Reconnecting…" : "Connecting…");
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (error) {
      setState("origin", "Cannot connect", String(error), "bad");
      return;
    }
    state.ws = ws;
    state.opened = false;
    ws.onopen = () => {
      if (ws === state.ws) state.opened = true;
    };
    ws.onmessage = (event) => {
      if (ws === state.ws) onMessage(ws, event.data);
    };
    // A failure fires `error` then `close`; the close event carries all that can be known.
    ws.onclose = (event) => {
      if (ws === state.ws) onClose(event, generation);
    };
  }

  function stopSocket() {
    const ws = state.ws;
    state.ws = null;
    if (state.requests) state.requests.cancel();
    state.requests = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  }

  function clearTimers() {
    clearTimeout(state.timer);
    clearInterval(state.countdown);
    state.timer = state.countdown = null;
  }

  function onClose(event, generation) {
    const opened = state.opened;
    stopSocket();
    if (event.code === CLOSE_TOKEN_REVOKED) {
      tokenRejected(
        "revoked",
        "Token revoked",
        `The daemon closed the stream: ${event.reason || "token revoked"}. ` +
          "Enter a valid token to continue.",
      );
      return;
    }
    if (opened) {
      state.downSince ??= Date.now();
      state.config = null; // a restarted daemon may listen elsewhere: ask again
      const why =
        {
          1001: "the daemon is shutting down or restarting",
          1008: "too many errors",
          1013: "this page read the stream too slowly",
        }[event.code] || `the connection was lost (code ${event.code})`;
      scheduleReconnect("reconnecting", "Disconnected", `Disconnected: ${why}.`);
      return;
    }
    handshakeFailed(generation);
  }

  async function handshakeFailed(generation) {
    if (state.cspBlocked) {
      setState(
        "origin",
        "Blocked by the page's security policy",
        `This page (${location.origin}) may not open a WebSocket to ${location.hostname}: ` +
          "open it as localhost or 127.0.0.1, or add its origin to server.allowed_origins.",
        "bad",
      );
      return;
    }
    const answers = await daemonAnswers();
    if (generation !== state.generation) return; // a new token or Retry in the meantime
    if (!answers) {
      daemonDown();
      return;
    }
    state.refusals += 1;
    if (state.refusals < 2) {
      // The daemon answers HTTP but refused the upgrade: confirm once (it may have been restarting).
      setState("connecting", "Connecting…", "The daemon refused the connection; trying once more.");
      state.timer = setTimeout(connect, REFUSAL_CONFIRM_MS);
      return;
    }
    tokenRejected(
      "refused",
      "Token refused",
      "The daemon is running but refused this token: it is unknown, expired or revoked. " +
        "Enter another token. (A daemon at its connection limits refuses the same way: Retry.)",
    );
  }

  function tokenRejected(name, title, detail) {
    sessionStorage.removeItem(TOKEN_KEY); // kept in memory only, for the Retry button
    setState(name, title, detail, "bad");
    askForToken();
  }

  function daemonDown() {
    state.downSince ??= Date.now();
    state.config = null;
    state.refusals = 0;
    const since = new Date(state.downSince).toLocaleTimeString();
    scheduleReconnect(
      "down",
      "Daemon unreachable",
      `The daemon does not answer (down or restarting) since ${since}.`,
    );
  }

  function scheduleReconnect(name, title, detail) {
    clearTimers();
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
    const delay = Math.round(base * (0.5 + Math.random() / 2)); // jitter: not all tabs at once
    state.attempt += 1;
    const due = Date.now() + delay;
    const show = () => {
      const seconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setState(name, title, `${detail} Retrying in ${seconds} s.`, name === "down" ? "bad" : "");
    };
    show();
    state.countdown = setInterval(show, 1000);
    state.timer = setTimeout(connect, delay);
  }

  // --- messages ------------------------------------------------------------------------------

  function onMessage(ws, text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    switch (message.type) {
      case "connected":
        onConnected(ws, message);
        break;
      case "volatility_update":
        onUpdate(message.data);
        break;
      case "history":
        onHistory(message);
        break;
      case "reset":
        onReset(message);
        break;
      case "error":
        notice(`The daemon answered ${message.code}: ${message.message}`);
        break;
      default: // subscribed, unsubscribed, pong, and anything newer: nothing to do
    }
  }

  function onConnected(ws, message) {
    const wasDown = state.downSince;
    state.attempt = 0;
    state.refusals = 0;
    state.downSince = null;
    ui.form.hidden = true;
    ui.session.hidden = false;
    ui.sessionText.textContent = `token ${message.token} · daemon ${message.version}`;
    setState("live", "Live");
    const requests = (state.requests = new Requests(ws));
    const available = new Set(message.available);
    for (const [symbol, s] of state.symbols) {
      if (!available.has(symbol)) {
        s.card.remove();
        state.symbols.delete(symbol);
      }
    }
    const resumed = [];
    for (const symbol of message.available) {
      const s = symbolView(symbol);
      if (s.lastSeq !== null) {
        requests.resume(symbol, s.lastSeq);
        resumed.push(`${symbol} after seq ${s.lastSeq}`);
      } else {
        requests.history(symbol, Math.min(WINDOW, message.history_size));
      }
    }
    if (wasDown !== null) {
      const seconds = ((Date.now() - wasDown) / 1000).toFixed(1);
      const detail = resumed.length ? `; resuming ${resumed.join(", ")}` : "";
      notice(`Reconnected after ${seconds} s${detail}.`);
    }
  }

  function onHistory(message) {
    const s = state.symbols.get(message.symbol);
    if (!s || s.lastSeq !== null || !state.requests) return;
    for (const data of message.updates) addPoint(s, data);
    if (s.lastSeq !== null) state.requests.resume(message.symbol, s.lastSeq);
    else state.requests.subscribe(message.symbol);
  }

  function onUpdate(data) {
    const s = state.symbols.get(data.symbol);
    if (!s) return;
    if (s.lastSeq !== null && data.seq <= s.lastSeq) return; // already have it
    if (s.lastSeq !== null && data.seq !== s.lastSeq + 1) s.gaps += 1; // the protocol forbids it
    addPoint(s, data);
  }

  function onReset(message) {
    const s = symbolView(message.symbol);
    const had = s.lastSeq;
    clearSeries(s);
    s.resets += 1;
    s.card.dataset.resets = String(s.resets);
    s.resetFlag.hidden = false;
    s.resetFlag.textContent = `history reset at ${new Date().toLocaleTimeString()}`;
    notice(
      `History reset for ${message.symbol}: the daemon no longer has what followed seq ${had} ` +
        `(it keeps seq ${message.oldest_seq} to ${message.latest_seq}). ` +
        "Its charts start again from what the daemon has.",
    );
  }

  // Client requests of one connection, paced under the daemon's per-second message limit;
  // resumes and subscriptions of one flush go out as one message each.
  class Requests {
    constructor(ws) {
      this.ws = ws;
      this.queue = [];
      this.resumes = {};
      this.subscriptions = [];
      this.timer = null;
      this.lastFlush = 0;
    }

    history(symbol, limit) {
      this.queue.push({ type: "history", symbol, limit });
      this.schedule();
    }

    resume(symbol, seq) {
      this.resumes[symbol] = seq;
      this.schedule();
    }

    subscribe(symbol) {
      this.subscriptions.push(symbol);
      this.schedule();
    }

    schedule() {
      if (this.timer !== null) return;
      const wait = Math.max(0, this.lastFlush + 1000 - Date.now());
      this.timer = setTimeout(() => this.flush(), wait);
    }

    flush() {
      this.timer = null;
      this.lastFlush = Date.now();
      if (this.ws.readyState !== WebSocket.OPEN) return;
      const batch = this.queue.splice(0, REQUESTS_PER_FLUSH);
      if (Object.keys(this.resumes).length) batch.push({ type: "resume", from: this.resumes });
      if (this.subscriptions.length) batch.push({ type: "subscribe", symbols: this.subscriptions });
      this.resumes = {};
      this.subscriptions = [];
      for (const message of batch) this.ws.send(JSON.stringify(message));
      if (this.queue.length) this.schedule();
    }

    cancel() {
      clearTimeout(this.timer);
      this.timer = null;
    }
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
  connect();
})();
