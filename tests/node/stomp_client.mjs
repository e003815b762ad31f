// The real @stomp/stompjs client, unmodified, driven by the Rust tests (crates/herald/tests/stomp.rs).
//
// Environment: URL (ws://…/stomp or ws://…/ws), TOKEN, AUTH ("header" | "passcode" | "none"),
// HB_IN / HB_OUT (heart-beat ms, default 0), VERSIONS (comma list, default stompjs' own).
// Prints one JSON object per line: {"event":"connected"|"message"|"receipt"|"error"|"closed"|
// "heartbeat"|"heartbeat_lost"|"sent", …}. Reads commands, one JSON object per line, on stdin:
//   {"op":"subscribe","id":"s1","destination":"/topic/x","headers":{…},"receipt":"r1"}
//   {"op":"unsubscribe","id":"s1","receipt":"r2"}
//   {"op":"send","destination":"/topic/x","body":"…","headers":{…},"receipt":"r3"}
//   {"op":"ack"|"nack","message_id":"…","receipt":"r4"}   (acks the MESSAGE received with that id)
//   {"op":"disconnect"}
import { Client, Versions } from '@stomp/stompjs';
import WebSocket from 'ws';
import readline from 'node:readline';

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const env = process.env;
const connectHeaders = {};
if (env.AUTH === 'passcode') connectHeaders.passcode = env.TOKEN;
else if (env.AUTH !== 'none') connectHeaders.Authorization = `Bearer ${env.TOKEN}`;

const received = new Map();
const client = new Client({
  brokerURL: env.URL,
  webSocketFactory: () =>
    new WebSocket(
      env.URL,
      (env.VERSIONS ? new Versions(env.VERSIONS.split(',')) : Versions.default).protocolVersions(),
    ),
  connectHeaders,
  reconnectDelay: 0,
  heartbeatIncoming: Number(env.HB_IN || 0),
  heartbeatOutgoing: Number(env.HB_OUT || 0),
  onConnect: (frame) => out({ event: 'connected', headers: frame.headers }),
  onStompError: (frame) => out({ event: 'error', headers: frame.headers, body: frame.body }),
  onWebSocketClose: (evt) => {
    out({ event: 'closed', code: evt.code });
    process.exit(0);
  },
  onHeartbeatReceived: () => out({ event: 'heartbeat' }),
  onHeartbeatLost: () => out({ event: 'heartbeat_lost' }),
  debug: () => {},
});

const subs = new Map();
function onMessage(msg) {
  received.set(msg.headers['message-id'], msg);
  out({ event: 'message', headers: msg.headers, body: msg.body });
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = JSON.parse(line);
  const receiptHeaders = {};
  if (cmd.receipt) {
    receiptHeaders.receipt = cmd.receipt;
    client.watchForReceipt(cmd.receipt, (f) =>
      out({ event: 'receipt', id: f.headers['receipt-id'] }),
    );
  }
  switch (cmd.op) {
    case 'subscribe':
      subs.set(
        cmd.id,
        client.subscribe(cmd.destination, onMessage, {
          id: cmd.id,
          ...(cmd.headers || {}),
          ...receiptHeaders,
        }),
      );
      break;
    case 'unsubscribe':
      subs.get(cmd.id).unsubscribe(receiptHeaders);
      break;
    case 'send':
      client.publish({
        destination: cmd.destination,
        body: cmd.body ?? '',
        headers: { ...(cmd.headers || {}), ...receiptHeaders },
      });
      out({ event: 'sent' });
      break;
    case 'ack':
    case 'nack': {
      const msg = received.get(cmd.message_id);
      if (!msg) {
        out({ event: 'script_error', message: `no message ${cmd.message_id}` });
        break;
      }
      if (cmd.op === 'ack') msg.ack(receiptHeaders);
      else msg.nack(receiptHeaders);
      out({ event: 'sent' });
      break;
    }
    case 'disconnect':
      client.deactivate();
      break;
    default:
      out({ event: 'script_error', message: `unknown op ${cmd.op}` });
  }
});

client.activate();
