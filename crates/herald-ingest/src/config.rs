//! The `[ingest]` and `[upstream]` configuration sections (embedded in the server's config;
//! every struct refuses unknown keys). The server's config validation checks them (URLs,
//! names, command targets) and names the key in its messages.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_core::duration::serde_duration;
use serde::Deserialize;

/// `[ingest]`: where backend services publish from. Every source is off unless configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub amqp: Option<AmqpSource>,
    pub redis: Option<RedisSource>,
    pub nats: Option<NatsSource>,
}

/// `[ingest.amqp]`: RabbitMQ queues whose messages are publish requests (or user messages).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSource {
    /// `amqp://user:pass@host:5672/vhost` (`%2f` for the default vhost).
    pub url: String,
    /// Unacknowledged deliveries per queue at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Where rejected (malformed, refused) messages go: a fanout exchange declared by Herald,
    /// with a queue `<dead_letter_exchange>.queue` bound to it.
    #[serde(default = "default_dlx")]
    pub dead_letter_exchange: String,
    pub queues: Vec<AmqpQueue>,
}

impl AmqpSource {
    /// Checks `[ingest.amqp]` without I/O: what the server's config validation (and so
    /// `herald check-config`) and the source's start both refuse. Messages name the key.
    pub fn check(&self) -> Result<(), String> {
        let short = |key: &str, v: &str| -> Result<(), String> {
            if v.len() > 255 {
                return Err(format!("{key}: {v:?} is longer than 255 bytes"));
            }
            Ok(())
        };
        let scheme_ok = ["amqp://", "amqps://"].iter().any(|s| {
            self.url
                .strip_prefix(s)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !scheme_ok {
            return Err(format!(
                "ingest.amqp.url: {:?} is not an amqp:// or amqps:// URL",
                herald_core::redact::url_password(&self.url)
            ));
        }
        if self.prefetch == 0 {
            return Err("ingest.amqp.prefetch: must be at least 1 (0 would mean unlimited)".into());
        }
        if self.dead_letter_exchange.is_empty() {
            return Err("ingest.amqp.dead_letter_exchange: must not be empty".into());
        }
        short(
            "ingest.amqp.dead_letter_exchange",
            &format!("{}.queue", self.dead_letter_exchange),
        )?;
        if self.queues.is_empty() {
            return Err(
                "ingest.amqp.queues: name at least one queue ([[ingest.amqp.queues]] name = \"…\")"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            if q.name.trim().is_empty() || q.name.starts_with("amq.") {
                return Err(format!(
                    "ingest.amqp.queues.name: {:?} is not a queue name Herald can declare",
                    q.name
                ));
            }
            short("ingest.amqp.queues.name", &q.name)?;
            if !seen.insert(q.name.as_str()) {
                return Err(format!("ingest.amqp.queues: {:?} is listed twice", q.name));
            }
            if !["direct", "fanout", "topic", "headers"].contains(&q.exchange_type.as_str()) {
                return Err(format!(
                    "ingest.amqp.queues.exchange_type ({}): {:?} is not direct, fanout, topic or headers",
                    q.name, q.exchange_type
                ));
            }
            if let Some(ex) = &q.exchange {
                if ex.is_empty() {
                    return Err(format!(
                        "ingest.amqp.queues.exchange ({}): leave it out to use the default exchange",
                        q.name
                    ));
                }
                short("ingest.amqp.queues.exchange", ex)?;
            }
            for key in &q.routing_keys {
                short("ingest.amqp.queues.routing_keys", key)?;
            }
        }
        Ok(())
    }
}

/// One `[[ingest.amqp.queues]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpQueue {
    /// Declared durable (with the dead-letter exchange as its `x-dead-letter-exchange`).
    pub name: String,
    /// Optional exchange to declare and bind the queue to.
    #[serde(default)]
    pub exchange: Option<String>,
    /// `direct`, `fanout`, `topic` (default) or `headers`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    /// Binding keys (default: the queue name).
    #[serde(default)]
    pub routing_keys: Vec<String>,
}

/// `[ingest.redis]`: seed 002's and seed 001's Redis channels (see [`crate::map`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    pub url: String,
    /// `websocket:broadcast`, `websocket:user:{id}`, `websocket:room:{room}`,
    /// `websocket:notification:{id}`.
    #[serde(default = "yes")]
    pub seed002: bool,
    /// `ws:device:{deviceID}` → `device/{deviceID}/telemetry`.
    #[serde(default = "yes")]
    pub seed001: bool,
    /// Prefix of the keys that elect one node per ephemeral message (`SET <prefix><hash>:<n>
    /// NX PX 60000`, see `crate::redis`). Two deployments that take the same channels from
    /// one Redis database must use different prefixes (or databases).
    #[serde(default = "default_election_prefix")]
    pub election_prefix: String,
}

/// `[ingest.nats]`: NATS subjects carrying publish requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSource {
    pub url: String,
    /// Subjects (wildcards allowed) whose messages are publish requests.
    pub subjects: Vec<String>,
    /// Queue group: in a cluster each message is taken by one node.
    #[serde(default = "default_queue_group")]
    pub queue_group: String,
}

/// `[upstream]`: where clients' `command`s go (seed 003's command map).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Connection for `amqp:` targets (and this node's reply queue).
    pub amqp_url: Option<String>,
    /// Connection for `nats:` targets.
    pub nats_url: Option<String>,
    /// How long a service has to answer, unless the command says otherwise.
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
    /// `[upstream.commands.<NAME>]`.
    pub commands: BTreeMap<String, CommandRoute>,
}

/// One command: `target = "amqp:<queue>" | "nats:<subject>" | "http(s)://…"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRoute {
    pub target: String,
    #[serde(default, with = "herald_core::duration::serde_duration_opt")]
    pub timeout: Option<Duration>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            amqp_url: None,
            nats_url: None,
            timeout: Duration::from_secs(10),
            commands: BTreeMap::new(),
        }
    }
}

fn default_prefetch() -> u16 {
    64
}
fn default_dlx() -> String {
    "herald.dead-letter".to_owned()
}
fn default_exchange_type() -> String {
    "topic".to_owned()
}
fn default_queue_group() -> String {
    "herald-ingest".to_owned()
}
fn default_election_prefix() -> String {
    "herald:ingest:".to_owned()
}
fn yes() -> bool {
    true
}
