#!/usr/bin/env node
// Watch an agentspoonsd daemon from Node.js with the `ws` package (npm install, beside this file).
//
//   AGENTSPOONSD_TOKEN=<token> node client.js [ws://127.0.0.1:8765/] [--symbol BTC/USD ...]
//                                             [--count N]
//
// Prints one line per update and exits after N updates (default: never). The wire protocol is
// in docs/PROTOCOL.md; client.py beside this file is the same program for Python. In a browser,
// which cannot set the Authorization header, use the built-in WebSocket and put the token in the
// URL instead: new WebSocket(`ws://host:8765/?access_token=${token}`).
'use strict';

const WebSocket = require('ws');

function parseArgs(argv) {
  const args = { url: 'ws://127.0.0.1:8765/', symbols: [], count: 0 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--symbol') args.symbols.push(argv[++i]);
    else if (argv[i] === '--count') args.count = Number.parseInt(argv[++i], 10);
    else args.url = argv[i];
  }
  return args;
}

const fmt = (value, digits) => (value === null ? '-' : value.toFixed(digits));

function main() {
  const args = parseArgs(process.argv.slice(2));
  const token = process.env.AGENTSPOONSD_TOKEN;
  if (!token) {
    console.error('set AGENTSPOONSD_TOKEN to a token of the daemon');
    process.exit(2);
  }
  let url = args.url;
  if (args.symbols.length) {
    // The initial subscription; without it, every symbol the token may see.
    url += '?symbols=' + args.symbols.map(encodeURIComponent).join(',');
  }
  const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } });
  const lastSeq = new Map();
  let seen = 0;
  let done = false;

  ws.on('message', (raw) => {
    const message = JSON.parse(raw.toString());
    switch (message.type) {
      case 'connected': {
        const subscribed = message.symbols;
        console.log(`connected: token=${message.token} symbols=${subscribed.join(',')}`);
        if (subscribed.length) {
          // A request: the newest updates the daemon keeps.
          ws.send(JSON.stringify({ type: 'history', symbol: subscribed[0], limit: 5 }));
        }
        break;
      }
      case 'history': {
        const seqs = message.updates.map((update) => update.seq);
        const span = seqs.length ? `seq ${seqs[0]}..${seqs[seqs.length - 1]}` : 'none';
        console.log(`history ${message.symbol}: ${seqs.length} updates, ${span}`);
        break;
      }
      case 'volatility_update': {
        if (done) break;
        const data = message.data;
        const previous = lastSeq.get(data.symbol);
        if (previous !== undefined && data.seq !== previous + 1) {
          // Reconnect with ?resume=SYMBOL:<previous> to get the missed ones back.
          console.log(`gap ${data.symbol}: missed ${data.seq - previous - 1} updates after seq ${previous}`);
        }
        lastSeq.set(data.symbol, data.seq); // below 2^53: exact as a JavaScript number
        console.log(
          `update ${data.symbol} seq=${data.seq} close=${fmt(data.close, 2)}` +
            ` volatility=${fmt(data.volatility, 6)} garch=${data.garch_forecast.status}`,
        );
        seen += 1;
        if (seen === args.count) {
          done = true;
          ws.close(1000); // the normal close; exits once the server answers
        }
        break;
      }
      case 'error':
        console.error(`error ${message.code}: ${message.message}`);
        break;
      default: // new message types may come: ignore them
    }
  });
  ws.on('close', (code, reason) => {
    if (done) process.exit(0);
    console.error(`closed ${code} ${reason.toString()}`.trimEnd());
    process.exit(1);
  });
  ws.on('error', (err) => {
    console.error(`error: ${err.message}`);
    process.exit(1);
  });
}

main();
