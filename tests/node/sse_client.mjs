// The real `eventsource` client (v3, the WHATWG EventSource for Node), unmodified, driven by the
// Rust tests (crates/herald/tests/sse.rs).
//
// Environment: URL (http://…/sse?topic=…), TOKEN, AUTH ("query": appended as ?token=,
// "header": Authorization: Bearer through the `fetch` option, "none"), LAST_EVENT_ID (sent as
// the Last-Event-ID header of the first request only, as a browser resuming would),
// CLOSE_ON ("close": close the EventSource on the server's `close` event; default: let it
// reconnect by itself).
// Prints one JSON object per line:
//   {"event":"request","last_event_id":…}   every HTTP request the client makes
//   {"event":"open"}
//   {"event":"welcome"|"subscribed"|"close","data":{…},"last_event_id":…}
//   {"event":"message","data":{…},"last_event_id":…}   (default events: messages, control frames)
//   {"event":"heartbeat"}                    a `: ping` comment seen on the wire
//   {"event":"error","code":…,"message":…,"ready_state":…}
// Note: `error` lines are normal when the server ends a stream (EventSource reports one, then
// reconnects); a refusal shows as `error` with ready_state 2 (closed), then the script exits.
// Reads commands on stdin, one JSON object per line: {"op":"close"} (close and exit).
import { EventSource } from 'eventsource';
import readline from 'node:readline';

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const env = process.env;

let url = env.URL;
if (env.AUTH === 'query') {
  url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(env.TOKEN);
}

let firstRequest = true;
// Watches the raw bytes for heartbeat comments (EventSource hides comments from the page).
function watchComments(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let tail = '';
  (async () => {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch {
        return;
      }
      if (chunk.done) return;
      tail += decoder.decode(chunk.value, { stream: true });
      const lines = tail.split('\n');
      tail = lines.pop();
      for (const line of lines) if (line.startsWith(':')) out({ event: 'heartbeat' });
    }
  })();
}

const es = new EventSource(url, {
  fetch: async (input, init) => {
    const headers = { ...(init.headers || {}) };
    if (env.AUTH === 'header') headers.Authorization = `Bearer ${env.TOKEN}`;
    if (firstRequest && env.LAST_EVENT_ID) headers['Last-Event-ID'] = env.LAST_EVENT_ID;
    firstRequest = false;
    out({ event: 'request', last_event_id: headers['Last-Event-ID'] ?? null });
    const res = await fetch(input, { ...init, headers });
    if (!res.body) return res;
    const [mine, theirs] = res.body.tee();
    watchComments(theirs);
    return new Response(mine, { status: res.status, statusText: res.statusText, headers: res.headers });
  },
});

const parse = (data) => {
  try {
    return JSON.parse(data);
  } catch {
    return { unparsed: data };
  }
};

es.onopen = () => out({ event: 'open' });
es.onmessage = (e) => out({ event: 'message', data: parse(e.data), last_event_id: e.lastEventId });
for (const name of ['welcome', 'subscribed', 'close']) {
  es.addEventListener(name, (e) => {
    out({ event: name, data: parse(e.data), last_event_id: e.lastEventId });
    if (name === 'close' && env.CLOSE_ON === 'close') {
      es.close();
      process.exit(0);
    }
  });
}
es.onerror = (e) => {
  out({ event: 'error', code: e.code ?? null, message: e.message ?? null, ready_state: es.readyState });
  if (es.readyState === EventSource.CLOSED) process.exit(0);
};

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = JSON.parse(line);
  if (cmd.op === 'close') {
    es.close();
    process.exit(0);
  }
});
