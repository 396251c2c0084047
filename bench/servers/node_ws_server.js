#!/usr/bin/env node
// Comparison server for `make bench`: the daemon's job done with Node.js and the npm `ws` package.
//
// Same contract as agentspoonsd, as far as the benchmark sees it: a bearer-token check on the
// upgrade (401 otherwise), a `connected` greeting, then one `volatility_update` per symbol every
// `--interval` seconds on an absolute schedule, with per-symbol `seq` and the outer `timestamp`
// (ISO-8601 UTC with microseconds) taken at publish time. Each update is JSON-encoded once and the
// same Buffer is sent to every client, as the ws README's broadcast example does.
// A client whose unsent backlog passes --max-backlog-bytes is terminated by a once-a-second sweep
// (ws itself never bounds it). It prints the daemon's `listener_bound` log line with its port.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const { performance } = require('node:perf_hooks');
const { WebSocket, WebSocketServer } = require('ws');

function parseArgs(argv) {
  const args = {
    host: '127.0.0.1',
    port: 0,
    interval: 2.0,
    symbols: ['BTC/USD'],
    tokenSha256: '',
    maxBacklogBytes: 1 << 20,
    listenBacklog: 4096,
    seed: 42,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [name, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${name}: missing value`);
    switch (name) {
      case '--host': args.host = value; break;
      case '--port': args.port = Number(value); break;
      case '--interval': args.interval = Number(value); break;
      case '--symbols': args.symbols = value.split(','); break;
      case '--token-sha256': args.tokenSha256 = value.toLowerCase(); break;
      case '--max-backlog-bytes': args.maxBacklogBytes = Number(value); break;
      case '--listen-backlog': args.listenBacklog = Number(value); break;
      case '--seed': args.seed = Number(value); break;
      case '--deflate': args.deflate = value === 'true'; break;
      case '--extra-json': args.extra = JSON.parse(fs.readFileSync(value, 'utf8')); break;
      default: throw new Error(`unknown option ${name}`);
    }
  }
  return args;
}

// Wall-clock time with microseconds: Date has only milliseconds, performance.now() adds the rest.
function isoNowMicros() {
  const us = Math.round((performance.timeOrigin + performance.now()) * 1000);
  const iso = new Date(Math.floor(us / 1000)).toISOString(); // ...T18:21:17.252Z
  return `${iso.slice(0, 23)}${String(us % 1000).padStart(3, '0')}Z`;
}

function log(event, fields) {
  process.stdout.write(`${JSON.stringify({ timestamp: isoNowMicros(), event, ...fields })}\n`);
}

// A seeded PRNG (mulberry32), so a run is reproducible like the daemon's `seed`.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// A random walk producing the same fields (and so about the same message size) as the daemon.
// `extra`: the daemon's analytics fields (estimators, GARCH forecast) from a sample update, so
// every server sends messages of the same size.
function makeMarket(symbols, seed, extra = {}) {
  const random = prng(seed);
  const state = new Map(symbols.map((s) => [s, { price: 50000, seq: 0, vol: 0.001 }]));
  return (symbol) => {
    const s = state.get(symbol);
    const returns = (random() - 0.5) * 2 * s.vol;
    const open = s.price;
    const close = open * Math.exp(returns);
    s.price = close;
    s.vol = 0.9 * s.vol + 0.1 * Math.abs(returns) + 1e-6;
    s.seq += 1;
    return {
      timestamp: isoNowMicros(),
      symbol,
      seq: s.seq,
      volatility: s.vol,
      price: close,
      returns,
      open,
      high: Math.max(open, close) * (1 + random() * 1e-3),
      low: Math.min(open, close) * (1 - random() * 1e-3),
      close,
      volume: random(),
      ...extra,
    };
  };
}

function bearerToken(req) {
  const header = req.headers.authorization;
  if (header) {
    const [scheme, credentials] = header.trim().split(/\s+/, 2);
    return scheme.toLowerCase() === 'bearer' ? credentials : undefined;
  }
  return new URL(req.url, 'http://localhost').searchParams.get('access_token') ?? undefined;
}

function tokenValid(token, expectedHex) {
  const expected = Buffer.from(expectedHex, 'hex');
  if (!token || expected.length !== 32) return false; // timingSafeEqual throws on other lengths
  const digest = crypto.createHash('sha256').update(token, 'utf8').digest();
  return crypto.timingSafeEqual(digest, expected);
}

function refuse(socket) {
  socket.end('HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
}

function broadcast(wss, message) {
  const data = Buffer.from(JSON.stringify(message)); // one encode per update
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
  }
}

// Runs every symbol every `interval` seconds, on an absolute schedule so timer lateness
// does not accumulate into a lower rate.
function startPublishing(wss, args) {
  const next = makeMarket(args.symbols, args.seed, args.extra);
  const start = performance.now();
  let tick = 0;
  const step = () => {
    for (const symbol of args.symbols) {
      broadcast(wss, { type: 'volatility_update', data: next(symbol), timestamp: isoNowMicros() });
    }
    tick += 1;
    setTimeout(step, Math.max(0, start + tick * args.interval * 1000 - performance.now()));
  };
  setTimeout(step, args.interval * 1000);
}

function startBacklogSweep(wss, maxBytes) {
  setInterval(() => {
    for (const client of wss.clients) {
      if (client.bufferedAmount > maxBytes) client.terminate();
    }
  }, 1000);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const server = http.createServer((req, res) => res.writeHead(426).end());
  // --deflate: ws's permessage-deflate (it compresses each message once per client).
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: Boolean(args.deflate) });

  // Authenticate before the upgrade, as the ws README recommends, so a refusal is an HTTP 401.
  server.on('upgrade', (req, socket, head) => {
    socket.on('error', () => socket.destroy());
    if (!tokenValid(bearerToken(req), args.tokenSha256)) {
      refuse(socket);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on('error', () => ws.terminate());
      ws.send(JSON.stringify({
        type: 'connected',
        message: 'AgentSpoons WebSocket Server',
        timestamp: isoNowMicros(),
        symbols: args.symbols,
      }));
    });
  });

  server.listen({ host: args.host, port: args.port, backlog: args.listenBacklog }, () => {
    const { address, port } = server.address();
    log('listener_bound', { service: 'websocket', address: `${address}:${port}` });
    startPublishing(wss, args);
    startBacklogSweep(wss, args.maxBacklogBytes);
  });
  process.on('SIGTERM', () => process.exit(0));
}

main();
