//! Targets: the servers under test. Each adapter is one file implementing [`Target`] (how a
//! subscriber connects, authenticates and subscribes; how a delivered message is recognised)
//! and [`Publisher`] (how the coordinator publishes), plus one arm in [`TargetSpec`].
//!
//! Payloads carry their send time: `hbts=<19-digit ns since the epoch>;` padded with `x` to
//! the requested size, so every adapter finds the timestamp with [`extract_ts`] whatever the
//! framing around it (JSON string, NATS `MSG` body, Socket.IO event argument, Pusher `data`).

pub mod herald;
pub mod nats;
pub mod node_ws;
pub mod rabbitmq_stomp;
pub mod socketio;
pub mod sockudo;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// What a worker must know to build a target (sent to worker processes as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetSpec {
    Herald(herald::HeraldSpec),
    Nats(nats::NatsSpec),
    NodeWs(node_ws::NodeWsSpec),
    SocketIo(socketio::SocketIoSpec),
    Sockudo(sockudo::SockudoSpec),
    /// RabbitMQ Web-STOMP, published to over AMQP.
    #[serde(rename = "rabbitmq_stomp")]
    RabbitStomp(rabbitmq_stomp::RabbitStompSpec),
    /// Herald's STOMP endpoint (`/stomp`), published to over Herald's HTTP API.
    HeraldStomp(herald::HeraldSpec),
}

impl TargetSpec {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Herald(_) => "herald",
            Self::Nats(_) => "nats",
            Self::NodeWs(_) => "node-ws",
            Self::SocketIo(_) => "socketio",
            Self::Sockudo(_) => "sockudo",
            Self::RabbitStomp(_) => "rabbitmq-stomp",
            Self::HeraldStomp(_) => "herald-stomp",
        }
    }

    /// What one S2 connection does until it counts as open (recorded with S2 results).
    pub fn connect_path(&self) -> &'static str {
        match self {
            Self::Herald(_) => "HS256 JWT in ?token=, one user per connection; until the welcome",
            Self::Nats(_) => "no auth; INFO, CONNECT + PING until PONG",
            Self::NodeWs(_) => "no auth; the WebSocket upgrade",
            Self::SocketIo(_) => "no auth; Engine.IO open, `40` until `40{sid}`",
            Self::Sockudo(_) => "app key in the URL; until pusher:connection_established",
            Self::RabbitStomp(_) => {
                "STOMP 1.2 (v12.stomp), CONNECT login/passcode guest/guest; until CONNECTED"
            }
            Self::HeraldStomp(_) => {
                "STOMP 1.2 (v12.stomp) on /stomp, CONNECT with Authorization: Bearer <HS256 JWT>, one user per connection; until CONNECTED"
            }
        }
    }

    /// How the coordinator publishes to this target (recorded with S3/S4 results).
    pub fn publish_path(&self) -> &'static str {
        match self {
            Self::Herald(_) | Self::HeraldStomp(_) => {
                "HTTP /api/v1/publish (one due message) or /api/v1/publish/batch (several), keep-alive"
            }
            Self::RabbitStomp(_) => {
                "AMQP 0-9-1 basic.publish to amq.topic (routing key = topic), one per message, publisher confirms awaited"
            }
            Self::Nats(_) => "NATS TCP protocol: PUB per message, then PING/PONG",
            Self::NodeWs(_) | Self::SocketIo(_) => {
                "HTTP POST /publish {topic, payloads: [every due message]}, keep-alive"
            }
            Self::Sockudo(_) => {
                "Pusher HTTP API, signed: /apps/{id}/events (one due message) or /batch_events (several, 10 per request), keep-alive"
            }
        }
    }
}

/// The coordinator's publisher for any target.
pub enum AnyPublisher {
    Herald(herald::HeraldPublisher),
    Nats(nats::NatsPublisher),
    Json(node_ws::JsonPublisher),
    Sockudo(sockudo::SockudoPublisher),
    Amqp(Box<rabbitmq_stomp::AmqpPublisher>),
}

impl AnyPublisher {
    pub async fn connect(spec: &TargetSpec) -> anyhow::Result<Self> {
        Ok(match spec {
            TargetSpec::Herald(s) | TargetSpec::HeraldStomp(s) => {
                Self::Herald(herald::HeraldPublisher::new(s)?)
            }
            TargetSpec::RabbitStomp(s) => {
                Self::Amqp(Box::new(rabbitmq_stomp::AmqpPublisher::connect(s).await?))
            }
            TargetSpec::Nats(s) => Self::Nats(nats::NatsPublisher::connect(s).await?),
            TargetSpec::NodeWs(s) => Self::Json(node_ws::JsonPublisher::new(&s.http_url)?),
            TargetSpec::SocketIo(s) => Self::Json(node_ws::JsonPublisher::new(&s.http_url)?),
            TargetSpec::Sockudo(s) => Self::Sockudo(sockudo::SockudoPublisher::new(s)?),
        })
    }
}

impl Publisher for AnyPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        match self {
            Self::Herald(p) => p.publish(topic, payloads).await,
            Self::Nats(p) => p.publish(topic, payloads).await,
            Self::Json(p) => p.publish(topic, payloads).await,
            Self::Sockudo(p) => p.publish(topic, payloads).await,
            Self::Amqp(p) => p.publish(topic, payloads).await,
        }
    }
}

/// What a received frame is, for the bench.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A delivered bench message, with its send timestamp (ns since the epoch) if found.
    Delivery(Option<u64>),
    /// Something the protocol requires us to answer (e.g. NATS `PING` → `PONG`).
    Reply(Message),
    /// A durable message to acknowledge (S6): its send timestamp and its message id.
    Durable { ts: Option<u64>, id: String },
    /// The server's answer to one of our acks: when the ack was sent (ns since the epoch, if
    /// the answer carries it), how many messages it newly acknowledged, and whether it was ok.
    AckReply {
        sent_ns: Option<u64>,
        acked: u64,
        ok: bool,
    },
}

/// A server under test, seen from one subscriber connection.
pub trait Target: Send + Sync + 'static {
    /// The WebSocket URL for connection number `conn` (credentials included if they go there;
    /// `topic` too, for servers that subscribe by URL).
    fn ws_url(&self, conn: usize, topic: Option<&str>) -> anyhow::Result<String>;
    /// The WebSocket subprotocol to ask for (`Sec-WebSocket-Protocol`), if any.
    fn subprotocol(&self) -> Option<&'static str> {
        None
    }
    /// After the WebSocket handshake: authenticate if needed, wait for the server's hello,
    /// subscribe to `topic` (if any) and wait until the subscription is confirmed.
    fn handshake(
        &self,
        ws: &mut Ws,
        conn: usize,
        topic: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Reports what `msg` holds to `on` (a frame may carry several deliveries: NATS
    /// coalesces `MSG`s); frames of no interest report nothing.
    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming));
    /// The frame acknowledging durable message `id`, sent at `sent_ns` (targets without
    /// durable messages: none).
    fn ack(&self, _id: &str, _sent_ns: u64) -> Option<Message> {
        None
    }
}

/// The coordinator's publisher for a target.
pub trait Publisher: Send {
    /// Publishes every payload to `topic` (in one request if the target can batch); returns
    /// how many the server accepted.
    fn publish(
        &mut self,
        topic: &str,
        payloads: &[String],
    ) -> impl Future<Output = anyhow::Result<usize>> + Send;
}

/// The next text frame, failing on close, or after 30 s (`who` names the server in errors).
/// Binary, ping and pong frames are skipped (tungstenite answers pings itself).
pub async fn next_text(ws: &mut Ws, who: &str) -> anyhow::Result<String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .with_context(|| format!("timed out waiting for {who}"))?
            .with_context(|| format!("{who} closed the connection"))??;
        match msg {
            Message::Text(t) => return Ok(t.as_str().to_owned()),
            Message::Close(c) => bail!("closed by {who}: {c:?}"),
            _ => {}
        }
    }
}

/// The publishers' keep-alive HTTP client: the same settings for every target, so no peer is
/// published to differently from another.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .build()?)
}

/// Opens a WebSocket to `url` from `local` (a loopback source address, to spread beyond one
/// address's ephemeral ports) with small buffers: the generator holds many idle sockets too.
/// `protocol`: the subprotocol to ask for (the server must accept it).
pub async fn open_ws(
    url: &str,
    local: Option<IpAddr>,
    protocol: Option<&'static str>,
) -> anyhow::Result<Ws> {
    let addr = host_port(url)?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("cannot bind source address {ip}"))?;
    }
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let mut request = url.into_client_request()?;
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static(p));
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
    Ok(ws)
}

/// `ws://127.0.0.1:8080/ws?…` → `127.0.0.1:8080` (numeric hosts only: loopback benches).
pub fn host_port(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    hostport
        .parse()
        .with_context(|| format!("{url}: the host must be a numeric address (127.0.0.1:port)"))
}

const TS_MARK: &[u8] = b"hbts=";

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A payload of exactly `size` bytes (at least 25) carrying `ts_ns`: ASCII, JSON-string safe.
pub fn make_payload(ts_ns: u64, size: usize) -> String {
    let mut p = format!("hbts={ts_ns:019};");
    while p.len() < size {
        p.push('x');
    }
    p
}

/// The timestamp written by [`make_payload`], found anywhere in `frame`.
pub fn extract_ts(frame: &[u8]) -> Option<u64> {
    let at = frame.windows(TS_MARK.len()).position(|w| w == TS_MARK)? + TS_MARK.len();
    let digits = frame.get(at..at + 19)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = make_payload(1_795_398_000_123_456_789, 100);
        assert_eq!(p.len(), 100);
        let frame = format!(r#"{{"type":"message","topic":"room/b","data":"{p}"}}"#);
        assert_eq!(
            extract_ts(frame.as_bytes()),
            Some(1_795_398_000_123_456_789)
        );
        assert_eq!(extract_ts(b"no mark"), None);
        assert_eq!(extract_ts(b"hbts=12"), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            host_port("ws://127.0.0.1:8080/ws?token=a").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            host_port("ws://127.0.0.1").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert!(host_port("wss://x").is_err());
        assert!(host_port("ws://localhost:1/").is_err());
    }
}
