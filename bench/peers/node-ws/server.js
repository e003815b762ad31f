// Herald bench peer: the broadcast server most teams write by hand on npm `ws` (PEERS.md).
//
//   PORT=0 node server.js      → prints `listening on http://127.0.0.1:<port>`
//
// Subscribe: connect to ws://127.0.0.1:<port>/?topic=<topic> (the socket is registered in the
// same tick as the 101 response is written, so the open handshake is the confirmation);
// without `topic` the socket only stays connected.
// Publish: POST /publish with {"topic": "...", "payloads": ["...", ...]}: each payload is sent
// as one text frame {"topic":…,"data":…} to every socket on the topic (JSON encoded once per
// payload). Answers {"published": <payloads>, "subscribers": <sockets>}.
// Heartbeat: the ws README's ping/terminate loop, every 25 s (Herald's default interval).
'use strict';

const http = require('node:http');
const { WebSocketServer } = require('ws');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 0);
const HEARTBEAT_MS = Number(process.env.HEARTBEAT_MS || 25000);

/** topic → Set<WebSocket> */
const topics = new Map();

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || !req.url.startsWith('/publish')) {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch {
      res.writeHead(400).end('invalid JSON');
      return;
    }
    const topic = String(body.topic);
    const payloads = Array.isArray(body.payloads) ? body.payloads : [];
    const subs = topics.get(topic);
    for (const data of payloads) {
      const frame = JSON.stringify({ topic, data });
      if (subs) {
        for (const ws of subs) {
          if (ws.readyState === 1) ws.send(frame);
        }
      }
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ published: payloads.length, subscribers: subs ? subs.size : 0 }));
  });
});

const wss = new WebSocketServer({ server });

wss.on('connection', (ws, req) => {
  ws.isAlive = true;
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.on('error', () => {});
  const topic = new URL(req.url, 'http://x').searchParams.get('topic');
  if (topic === null) return;
  let subs = topics.get(topic);
  if (!subs) {
    subs = new Set();
    topics.set(topic, subs);
  }
  subs.add(ws);
  ws.on('close', () => {
    subs.delete(ws);
    if (subs.size === 0 && topics.get(topic) === subs) topics.delete(topic);
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, HEARTBEAT_MS);

wss.on('close', () => clearInterval(heartbeat));

server.listen(port, host, () => {
  const a = server.address();
  console.log(`listening on http://${a.address}:${a.port}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
