// agentspoonsd in a browser: an ES module with no dependencies, served by the daemon on its HTTP
// port at /client.js (with `Access-Control-Allow-Origin: *`, so a page of any origin may import it).
// docs/CLIENT.md ("JavaScript") shows it in use; docs/PROTOCOL.md has the messages.
//
//   import { connect } from "http://127.0.0.1:8766/client.js";
//   const stream = connect({ url: "ws://127.0.0.1:8765/", token, symbols: ["BTC/USD"],
//                            onUpdate: (data) => console.log(data.symbol, data.seq) });
//
// What `connect` guarantees:
// - onUpdate gets each update once, in seq order per symbol: an update whose seq is not above the
//   last one delivered is dropped; a seq jump is never delivered: the socket is closed and the
//   stream resumed from the last seq, so the missed updates come first;
// - a lost connection is retried with exponential backoff and full jitter (the Python client's
//   backoff_delay), resuming each symbol after its last seq (?resume=SYMBOL:SEQ): no gap and no
//   duplicate across a daemon restart that kept its history; when the daemon no longer has what
//   followed, it says `reset` (onReset) and the symbol starts again from what it has;
// - a refused upgrade (the token unknown or expired, the page's Origin not allowed, or the daemon
//   at a connection limit) and a revoked token (close code 4001) stop it: onStatus says "refused"
//   or "revoked", and nothing more is tried.
// Browsers hide the HTTP status of a failed WebSocket handshake, so a handshake that failed is
// diagnosed by asking the daemon's /healthz (beside this module unless `healthUrl` says otherwise):
// no answer means the daemon is down (retry later); an answer, twice in a row, means it refused.
//
// The pure parts (backoffDelay, StreamState, closeVerdict) touch no socket and no clock.

export const CLOSE_TOKEN_REVOKED = 4001;
const REQUEST_BUDGET = 16; // request cost units sent per second; the daemon allows 20 by default
const UPDATES_PER_COST_UNIT = 50; // a history reply costs 1 + 1 per 50 updates (PROTOCOL.md)

/**
 * Milliseconds to wait before reconnect attempt `attempt` (0 for the first retry): uniform in
 * [0, min(maxMs, initialMs × 2^attempt)) — exponential backoff with full jitter, the formula of
 * the Python client's `backoff_delay`. `rand` returns a number in [0, 1).
 */
export function backoffDelay(attempt, initialMs = 500, maxMs = 30000, rand = Math.random) {
  if (!(attempt >= 0 && initialMs >= 0 && maxMs >= 0)) {
    throw new RangeError("attempt, initialMs and maxMs must be >= 0");
  }
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 64));
  return rand() * ceiling;
}

/**
 * What to do after a socket closed: `{ stop: "revoked" | "refused" }` or
 * `{ retry: "lost" | "down" | "refused" }` ("refused" once: the daemon may have been restarting).
 * `opened`: the handshake had succeeded; `daemonAnswers`: /healthz answered after a failed one
 * (null when not asked); `refusals`: failed handshakes the daemon answered, this one included.
 */
export function closeVerdict({ code, opened, daemonAnswers = null, refusals = 0 }) {
  if (code === CLOSE_TOKEN_REVOKED) return { stop: "revoked" };
  if (opened) return { retry: "lost" };
  if (!daemonAnswers) return { retry: "down" };
  return refusals < 2 ? { retry: "refused" } : { stop: "refused" };
}

/**
 * The stream's position: which symbols are wanted (null: every symbol the token may see) and the
 * last seq delivered of each. Decides what each update is, and what to ask for on each connection.
 */
export class StreamState {
  constructor({ symbols = null, resume = {} } = {}) {
    this.wanted = symbols === null || symbols === "*" ? null : new Set(symbols);
    this.positions = new Map();
    for (const [symbol, seq] of Object.entries(resume)) {
      if (this.wants(symbol) && Number.isSafeInteger(seq)) this.positions.set(symbol, seq);
    }
  }

  wants(symbol) {
    return this.wanted === null || this.wanted.has(symbol);
  }

  /** The last seq delivered of each wanted symbol: where the next connection resumes. */
  resumePositions() {
    const positions = {};
    for (const [symbol, seq] of this.positions) if (this.wants(symbol)) positions[symbol] = seq;
    return positions;
  }

  /**
   * The WebSocket URL for the next connection: `base` with access_token, symbols (wanted ones
   * not resumed; empty when `history` loads them first, or when every symbol is wanted: those are
   * subscribed after `connected`) and resume (SYMBOL:SEQ,…). Other query parameters are kept.
   */
  connectUrl(base, token, history = 0) {
    const url = new URL(base);
    const query = [];
    for (const [key, value] of url.searchParams) {
      if (!["access_token", "symbols", "resume"].includes(key)) {
        query.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
      }
    }
    if (token) query.push(`access_token=${encodeURIComponent(token)}`);
    const positions = this.resumePositions();
    const fresh =
      this.wanted === null || history > 0 ? [] : [...this.wanted].filter((s) => !(s in positions));
    query.push(`symbols=${fresh.map(encodeURIComponent).join(",")}`);
    const resume = Object.entries(positions).map(([s, seq]) => `${encodeURIComponent(s)}:${seq}`);
    if (resume.length) query.push(`resume=${resume.join(",")}`);
    url.search = query.join("&");
    return url.href;
  }

  /**
   * What to request once `connected` arrives: the wanted symbols the token may see that the
   * connection does not receive yet — `history` for those without a position when `history` > 0
   * (then resumed from the newest update of the reply), `subscribe` for the others.
   * Every symbol wanted: positions of symbols the token may no longer see are forgotten.
   */
  afterConnected(connected, history = 0) {
    const available = new Set(connected.available || []);
    if (this.wanted === null) {
      for (const symbol of [...this.positions.keys()]) {
        if (!available.has(symbol)) this.positions.delete(symbol);
      }
    }
    const receiving = new Set(connected.symbols || []);
    const wanted = this.wanted === null ? [...available] : [...this.wanted];
    const plan = { history: [], subscribe: [], resume: {} };
    for (const symbol of wanted) {
      if (!available.has(symbol) || receiving.has(symbol)) continue;
      if (this.positions.has(symbol)) plan.resume[symbol] = this.positions.get(symbol);
      else if (history > 0) plan.history.push(symbol);
      else plan.subscribe.push(symbol);
    }
    return plan;
  }

  /** "deliver" (and recorded as the last seq), "duplicate", "gap" or "unwanted". */
  accept(symbol, seq) {
    if (!this.wants(symbol)) return "unwanted";
    const last = this.positions.get(symbol);
    if (last !== undefined) {
      if (seq <= last) return "duplicate";
      if (seq !== last + 1) return "gap";
    }
    this.positions.set(symbol, seq);
    return "deliver";
  }

  /** A `reset`: the next update of `symbol` is `oldestSeq`. Returns the previous last seq. */
  reset(symbol, oldestSeq) {
    const previous = this.positions.has(symbol) ? this.positions.get(symbol) : null;
    this.positions.set(symbol, oldestSeq - 1);
    return previous;
  }

  /** Adds `symbols` to the wanted ones; returns those newly wanted. */
  subscribe(symbols) {
    if (this.wanted === null) return [];
    const added = symbols.filter((s) => !this.wanted.has(s));
    for (const symbol of added) this.wanted.add(symbol);
    return added;
  }

  /** Removes `symbols` (their positions are forgotten); `available`: the token's symbols, needed
   * when every symbol was wanted. Returns those no longer wanted. */
  unsubscribe(symbols, available = []) {
    if (this.wanted === null) this.wanted = new Set(available);
    const removed = symbols.filter((s) => this.wanted.has(s));
    for (const symbol of removed) {
      this.wanted.delete(symbol);
      this.positions.delete(symbol);
    }
    return removed;
  }
}

/**
 * Connects to the daemon and keeps the stream going until `close()`, a refused or a revoked token.
 * Returns at once; the first attempt (and every callback) comes after.
 *
 * Options:
 * - `url`: the WebSocket URL (ws://host:8765/), or a function returning it (or a promise of it),
 *   asked before each attempt; a function that throws counts as the daemon being down.
 * - `token`: the access token (sent as ?access_token=, since browsers cannot set headers).
 * - `symbols`: the symbols to receive; absent or "*": every symbol the token may see.
 * - `history`: load up to this many recent updates of each symbol that has no position yet
 *   (delivered through onUpdate before its live ones); 0 (default): live updates only.
 * - `resume`: `{SYMBOL: seq}` to continue from (e.g. kept from an earlier page).
 * - `onUpdate(data, meta)`: an update's `data`; meta is `{ published, history }`.
 * - `onStatus(status)`: `{ state, attempt, … }` with state "connecting", "open" (with `connected`,
 *   the daemon's first message, and `resumed`, the positions this connection resumed),
 *   "reconnecting" (with `delayMs`, `cause`: "lost", "down", "refused" or "gap", and `code`,
 *   `reason` of the close), "refused", "revoked" (`reason`), "failed" (`error`: a bad URL) or
 *   "closed" (after close()).
 * - `onReset({ symbol, previousSeq, oldestSeq, latestSeq })`: the daemon could not fill a gap.
 * - `onError(message)`: an `error` message (unknown_symbol, forbidden_symbol, …).
 * - `onMessage(message)`: every message, before it is handled (replies to `send`).
 * - `backoffInitialMs` (500), `backoffMaxMs` (30000), `refusalConfirmMs` (1000),
 *   `healthUrl` (the daemon's /healthz beside this module; null: never diagnose, always retry),
 *   `healthTimeoutMs` (3000).
 *
 * Returns `{ subscribe(symbols), unsubscribe(symbols), send(request), positions(), close() }`.
 */
export function connect(options) {
  return new Stream(options);
}

// The daemon's /healthz on the origin this module came from; null when it came from no HTTP
// origin (a data: or blob: URL, a file), which cannot be asked.
function healthBeside(moduleUrl) {
  try {
    const url = new URL("/healthz", moduleUrl);
    return ["http:", "https:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

class Stream {
  constructor(options) {
    const defaultHealth = healthBeside(import.meta.url);
    this.options = {
      history: 0,
      backoffInitialMs: 500,
      backoffMaxMs: 30000,
      refusalConfirmMs: 1000,
      healthTimeoutMs: 3000,
      healthUrl: defaultHealth,
      ...options,
    };
    this.state = new StreamState({ symbols: this.options.symbols, resume: this.options.resume });
    this.available = [];
    this.ws = null;
    this.requests = null;
    this.timer = null;
    this.attempt = 0;
    this.refusals = 0;
    this.opened = false; // the current socket's handshake succeeded
    this.resumed = {}; // the positions the current connection's URL resumes
    this.closed = false;
    this.generation = 0; // bumped per attempt: callbacks of an older one then do nothing
    // Started after connect() returns, so no callback runs before the caller holds the stream.
    queueMicrotask(() => this.attemptNow());
  }

  // --- the public methods ----------------------------------------------------------------------

  subscribe(symbols) {
    const added = this.state.subscribe(symbols);
    if (!this.requests) return; // the next connection asks for them
    // Unknown or forbidden ones are asked for too: the daemon's `error` says which (onError).
    for (const symbol of added) this.requests.subscribe(symbol);
  }

  unsubscribe(symbols) {
    const removed = this.state.unsubscribe(symbols, this.available);
    if (this.requests && removed.length) this.send({ type: "unsubscribe", symbols: removed });
  }

  /** Sends a protocol request now; false when no connection is open. Replies go to onMessage. */
  send(request) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(request));
    return true;
  }

  positions() {
    return this.state.resumePositions();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.generation += 1;
    clearTimeout(this.timer);
    this.dropSocket();
    this.status({ state: "closed" });
  }

  // --- connecting ------------------------------------------------------------------------------

  status(status) {
    this.options.onStatus?.({ attempt: this.attempt, ...status });
  }

  async attemptNow() {
    this.timer = null;
    if (this.closed) return;
    const generation = ++this.generation;
    this.status({ state: "connecting" });
    let base;
    try {
      const url = this.options.url;
      base = typeof url === "function" ? await url() : url;
    } catch (error) {
      if (generation === this.generation) this.retry("down", { error });
      return;
    }
    if (generation !== this.generation) return; // closed meanwhile
    let ws;
    try {
      const history = this.options.history;
      this.resumed = this.state.resumePositions();
      ws = new WebSocket(this.state.connectUrl(base, this.options.token, history));
    } catch (error) {
      this.closed = true;
      this.status({ state: "failed", error });
      return;
    }
    this.ws = ws;
    this.opened = false;
    ws.onopen = () => {
      if (ws === this.ws) this.opened = true;
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this.onText(ws, event.data);
    };
    // A failure fires `error`, then `close`: the close event carries all that can be known.
    ws.onclose = (event) => {
      if (ws === this.ws) this.onClose(event, generation);
    };
  }

  dropSocket() {
    const ws = this.ws;
    this.ws = null;
    this.requests?.cancel();
    this.requests = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  }

  async onClose(event, generation) {
    const opened = this.opened;
    this.dropSocket();
    let daemonAnswers = null;
    if (!opened && event.code !== CLOSE_TOKEN_REVOKED) {
      daemonAnswers = await this.daemonAnswers();
      if (generation !== this.generation) return; // closed meanwhile
      if (daemonAnswers) this.refusals += 1;
    }
    const verdict = closeVerdict({ code: event.code, opened, daemonAnswers, refusals: this.refusals });
    const why = { code: event.code, reason: event.reason };
    if (verdict.stop) {
      this.closed = true;
      this.status({ state: verdict.stop, ...why });
    } else {
      if (verdict.retry === "down") this.refusals = 0;
      this.retry(verdict.retry, why);
    }
  }

  async daemonAnswers() {
    const health = this.options.healthUrl;
    if (!health) return false;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.options.healthTimeoutMs);
    try {
      // no-cors: any answer is enough (its status is not needed), and a page of another origin
      // may ask without the daemon's CORS headers.
      await fetch(health, { mode: "no-cors", cache: "no-store", signal: abort.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  retry(cause, details = {}) {
    if (this.closed) return;
    clearTimeout(this.timer);
    const o = this.options;
    const delayMs =
      cause === "refused"
        ? o.refusalConfirmMs
        : backoffDelay(this.attempt, o.backoffInitialMs, o.backoffMaxMs);
    this.attempt += 1;
    this.status({ state: "reconnecting", delayMs, cause, ...details });
    this.timer = setTimeout(() => this.attemptNow(), delayMs);
  }

  // --- messages --------------------------------------------------------------------------------

  onText(ws, text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    this.options.onMessage?.(message);
    switch (message.type) {
      case "connected":
        this.onConnected(ws, message);
        break;
      case "volatility_update":
        this.deliver(message.data, { published: message.timestamp, history: false });
        break;
      case "history":
        this.onHistory(message);
        break;
      case "reset":
        this.onReset(message);
        break;
      case "error":
        this.options.onError?.(message);
        break;
      default: // subscribed, unsubscribed, pong, and anything newer
    }
  }

  onConnected(ws, message) {
    this.refusals = 0;
    this.available = message.available || [];
    const history = Math.min(this.options.history, message.history_size ?? Infinity);
    const plan = this.state.afterConnected(message, history);
    const requests = (this.requests = new Requests(ws));
    this.status({ state: "open", connected: message, resumed: this.resumed });
    if (this.requests !== requests) return; // the status callback closed it
    for (const symbol of plan.history) requests.history(symbol, history);
    for (const [symbol, seq] of Object.entries(plan.resume)) requests.resume(symbol, seq);
    for (const symbol of plan.subscribe) requests.subscribe(symbol);
  }

  onHistory(message) {
    const requests = this.requests;
    if (!requests || !this.state.wants(message.symbol)) return;
    for (const data of message.updates || []) this.deliver(data, { published: null, history: true });
    if (this.requests !== requests) return; // a gap or the callback ended this connection
    const seq = this.state.positions.get(message.symbol);
    if (seq === undefined) requests.subscribe(message.symbol);
    else requests.resume(message.symbol, seq);
  }

  deliver(data, meta) {
    if (!data) return;
    const verdict = this.state.accept(data.symbol, data.seq);
    if (verdict === "gap") {
      // Missed updates: resume from the last one delivered, on a new connection.
      this.dropSocket();
      this.retry("gap", { symbol: data.symbol, seq: data.seq });
      return;
    }
    if (verdict !== "deliver") return;
    this.attempt = 0; // an update arrived: this connection worked (as the Python client counts)
    this.options.onUpdate?.(data, meta);
  }

  onReset(message) {
    if (!this.state.wants(message.symbol)) return;
    const previousSeq = this.state.reset(message.symbol, message.oldest_seq);
    this.options.onReset?.({
      symbol: message.symbol,
      previousSeq,
      oldestSeq: message.oldest_seq,
      latestSeq: message.latest_seq,
    });
  }
}

// The requests of one connection, paced under the daemon's per-second budget
// (server.max_client_messages_per_second, where a history reply costs 1 + 1 per 50 updates);
// the resumes and subscriptions of one flush go out as one message each.
class Requests {
  constructor(ws) {
    this.ws = ws;
    this.queue = [];
    this.resumes = {};
    this.subscriptions = [];
    this.timer = null;
    this.lastFlush = -Infinity;
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
    const batch = [];
    let spent = 0;
    if (Object.keys(this.resumes).length) batch.push({ type: "resume", from: this.resumes });
    if (this.subscriptions.length) batch.push({ type: "subscribe", symbols: this.subscriptions });
    spent += batch.length;
    while (this.queue.length) {
      const cost = 1 + Math.ceil(this.queue[0].limit / UPDATES_PER_COST_UNIT);
      if (spent > 0 && spent + cost > REQUEST_BUDGET) break;
      batch.push(this.queue.shift());
      spent += cost;
    }
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
