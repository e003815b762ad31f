// Herald bench peer: Socket.IO 4.8, WebSocket transport only (PEERS.md).
//
//   PORT=0 node server.js      → prints `listening on http://127.0.0.1:<port>`
//
// Clients connect to ws://127.0.0.1:<port>/socket.io/?EIO=4&transport=websocket, join the
// default namespace and emit `subscribe` with a room name and an ack callback: the server joins
// the room and acknowledges with {"ok":true}.
// Publish: POST /publish with {"topic": "...", "payloads": ["...", ...]}: each payload is one
// `io.to(topic).emit("message", payload)` (encoded once, written to every socket in the room).
// Answers {"published": <payloads>}.
// Heartbeat: Engine.IO's own, server pings every pingInterval (the default 25 s).
'use strict';

const http = require('node:http');
const { Server } = require('socket.io');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 0);

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
    const room = String(body.topic);
    const payloads = Array.isArray(body.payloads) ? body.payloads : [];
    for (const data of payloads) io.to(room).emit('message', data);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ published: payloads.length }));
  });
});

const io = new Server(server, {
  transports: ['websocket'],
  serveClient: false,
  pingInterval: 25000,
  pingTimeout: 20000,
  perMessageDeflate: false,
  httpCompression: false,
});

io.on('connection', (socket) => {
  socket.on('subscribe', (room, ack) => {
    socket.join(String(room));
    if (typeof ack === 'function') ack({ ok: true });
  });
});

server.listen(port, host, () => {
  const a = server.address();
  console.log(`listening on http://${a.address}:${a.port}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
