//! Configuration (SPEC §9, §11): the whole TOML file, its environment overrides and its
//! validation.
//!
//! # Sources and precedence
//!
//! defaults < file < environment < flags, written once in `load_layers` (behind [`load`] and
//! [`load_dev`]):
//!
//! 1. **Defaults**: every field has one (the [`Default`] impls below), so an empty file
//!    deserializes. It does not *validate*, though: `[auth]` needs a JWT key or client keys.
//!    `herald serve --dev` starts from [`Config::dev`] instead (random secret and admin key).
//! 2. **File**: TOML, `deny_unknown_fields` everywhere. A relative `auth.jwt_public_key_file`
//!    in the file is resolved against the file's directory.
//! 3. **Environment**: `HERALD_<SECTION>__<KEY>` sets `<section>.<key>` (lowercased; more `__`
//!    go deeper), e.g. `HERALD_SERVER__LISTEN`, `HERALD_AUTH__JWT_SECRET`,
//!    `HERALD_LIMITS__SEND_QUEUE`; `HERALD_TOPICS` sets the `[[topics]]` list (a TOML array of
//!    inline tables). A value is read as TOML when it is an integer, float, boolean or array,
//!    else as a string (and as a string anyway when the key wants one, so
//!    `HERALD_SERVER__NODE_ID=7` works). Values are applied to the file's table *before*
//!    deserializing, so an unknown key is refused exactly as in the file. Any other `HERALD_*`
//!    variable is an error, except those in [`ENV_ALLOWLIST`] (read by the binary).
//! 4. **Flags**: [`Overrides`], typed by the CLI, applied last.
//!
//! Then [`Config::validate`] runs. Nothing falls back silently: an unsupported backend, a bad
//! range or an unreadable key file is an error that names the setting and where it came from
//! (`config file herald.toml, line 3, column 1 in [server]: unknown field …`,
//! `environment HERALD_LIMITS__SEND_QUEUE: invalid type …`,
//! `limits.send_queue must be between 1 and 1000000, got 0`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_core::acl::{Acl, AclError, TopicRule};
use herald_core::duration::{format_duration, serde_duration};
use herald_core::topic::is_valid_segment;
use serde::Deserialize;
use toml::{Table, Value};

use crate::auth::{AuthConfig, AuthSetupError, JwtAuthenticator, Secret, random_key};

/// Re-exported for the CLI (`herald token --ttl 1h`), which parses durations like the file.
pub use herald_core::duration::{DurationError, parse_duration};

/// Where `herald serve` listens by default (and in `--dev`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

/// Prefix of the environment variables that configure Herald.
pub const ENV_PREFIX: &str = "HERALD_";

/// `HERALD_*` variables that are not settings: the binary reads them itself (`--config`,
/// a log filter, and the `publish` / `subscribe` credentials).
pub const ENV_ALLOWLIST: &[&str] = &[
    "HERALD_CONFIG",
    "HERALD_LOG",
    "HERALD_API_KEY",
    "HERALD_TOKEN",
];

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub bus: BusConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    /// `[[topics]]`, SPEC §5. Empty means the default rules ([`Acl::from_config`]).
    pub topics: Vec<TopicRule>,
    /// `[ingest]`: RabbitMQ queues, Redis channels and NATS subjects publishing (SPEC §7).
    pub ingest: herald_ingest::config::IngestConfig,
    /// `[upstream]`: the command map (SPEC §7).
    pub upstream: herald_ingest::config::UpstreamConfig,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// This node's name in the cluster; a valid topic segment. Default: `n-` and 8 random
    /// lowercase base32 characters.
    pub node_id: String,
    /// Exact `Origin` values accepted on `/ws` (`scheme://host[:port]`); empty accepts any.
    pub allowed_origins: Vec<String>,
    /// Drain window on SIGTERM before the remaining connections are closed with 1012.
    #[serde(with = "serde_duration")]
    pub shutdown_grace: Duration,
    /// `reconnect.after_ms` values are spread over `[0, drain_spread]`.
    #[serde(with = "serde_duration")]
    pub drain_spread: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            node_id: random_node_id(),
            allowed_origins: Vec::new(),
            shutdown_grace: Duration::from_secs(10),
            drain_spread: Duration::from_secs(2),
        }
    }
}

/// The embedded default store: an SQLite file under `data/` (relative to the working directory).
pub const DEFAULT_STORE_URL: &str = "sqlite://data/herald.db";

/// `[store]`: where durable inboxes live.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory`, `sqlite://…`, `postgres://…` or `mysql://…`.
    pub url: String,
    /// An unacked durable message is sent again after this long…
    #[serde(with = "herald_core::duration::serde_duration")]
    pub retry_after: Duration,
    /// …at most this many times; then it is marked `failed` (kept, replayed on connect).
    pub max_retries: u32,
    /// Inbox messages kept per user (the oldest are deleted first).
    pub max_per_user: usize,
    /// Inbox messages older than this are deleted.
    #[serde(with = "herald_core::duration::serde_duration")]
    pub max_age: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORE_URL.to_owned(),
            retry_after: Duration::from_secs(5),
            max_retries: 3,
            max_per_user: 1000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl StoreConfig {
    /// The backend the URL names (available in this build or not; see
    /// [`StoreBackend::is_available`]). Errors on an empty URL or an unknown scheme.
    pub fn backend(&self) -> Result<StoreBackend, ConfigError> {
        backend_of("store.url", &self.url)
    }
}

/// `[bus]`: how nodes reach each other (SPEC §6).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `memory` (one node), `redis://…` or `nats://…`.
    pub url: String,
    /// Prefix of every key, channel, subject and bucket the cluster writes: the nodes of one
    /// cluster share it, two clusters on one server must not.
    pub prefix: String,
    /// A node that dies is gone from presence and subscriber counts within this.
    #[serde(with = "serde_duration")]
    pub presence_ttl: Duration,
    /// A node stays subscribed to a topic on the bus this long after its last local
    /// subscriber left (against subscribe/unsubscribe flapping).
    #[serde(with = "serde_duration")]
    pub linger: Duration,
    /// Seed 001's interest counters.
    pub interest: InterestConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "memory".to_owned(),
            prefix: "herald".to_owned(),
            presence_ttl: Duration::from_secs(15),
            linger: Duration::from_secs(2),
            interest: InterestConfig::default(),
        }
    }
}

/// `[bus.interest]`: per watched device, a counter an uplink checks before sending telemetry
/// (seed 001). Written by clustered buses only.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterestConfig {
    pub enabled: bool,
    /// Topics counted; a whole segment `{name}` captures one topic segment.
    pub topic: String,
    /// The counter's key; `{name}` is replaced by the captured segment. Not prefixed: an
    /// existing uplink reads it as is. On NATS, a key of the KV bucket `<prefix>_interest`
    /// with `:` written as `.`.
    pub key: String,
    /// A counter not refreshed for this long disappears.
    #[serde(with = "serde_duration")]
    pub ttl: Duration,
    /// While a topic is watched, its counter is rewritten this often.
    #[serde(with = "serde_duration")]
    pub refresh: Duration,
}

impl Default for InterestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: "device/{deviceID}/telemetry".to_owned(),
            key: "ws:sub:{deviceID}".to_owned(),
            ttl: Duration::from_secs(300),
            refresh: Duration::from_secs(120),
        }
    }
}

impl BusConfig {
    /// The backend the URL names; see [`StoreConfig::backend`].
    pub fn backend(&self) -> Result<BusBackend, ConfigError> {
        backend_of("bus.url", &self.url)
    }

    /// The interest counters, when enabled (templates checked).
    pub fn interest_counters(
        &self,
    ) -> Result<Option<herald_cluster::InterestCounters>, ConfigError> {
        let i = &self.interest;
        if !i.enabled {
            return Ok(None);
        }
        herald_cluster::InterestCounters::new(&i.topic, &i.key, i.ttl, i.refresh)
            .map(Some)
            .map_err(|e| invalid("bus.interest", format!("is not usable: {e}")))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 32
            && self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prefix_ok {
            return Err(invalid(
                "bus.prefix",
                format!(
                    "must be 1 to 32 characters of A-Z a-z 0-9 _ - (it names Redis keys and NATS \
                     subjects and buckets), got {:?}",
                    excerpt(&self.prefix)
                ),
            ));
        }
        check_duration(
            "bus.presence_ttl",
            self.presence_ttl,
            Duration::from_secs(3),
            Duration::from_secs(3600),
        )?;
        check_duration(
            "bus.linger",
            self.linger,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        self.interest_counters()?;
        Ok(())
    }
}

/// The store backends Herald knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    Memory,
    Sqlite,
    Postgres,
    Mysql,
}

impl StoreBackend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }

    /// Whether this build can run it.
    pub fn is_available(self) -> bool {
        // Every store backend is compiled in (herald-store-sql).
        true
    }
}

/// The bus backends Herald knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusBackend {
    Memory,
    Redis,
    Nats,
}

impl BusBackend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }

    /// Whether this build can run it.
    pub fn is_available(self) -> bool {
        match self {
            Self::Memory => true,
            Self::Redis => cfg!(feature = "redis"),
            Self::Nats => cfg!(feature = "nats"),
        }
    }
}

/// `[limits]`, SPEC §9. Counts are per the unit in their name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame and message, in bytes (at least 1024).
    pub max_message_size: usize,
    pub max_connections_per_user: usize,
    pub max_subscriptions_per_connection: usize,
    /// Per user; one subscribe request counts once, whatever its topic count.
    pub subscribes_per_second: u32,
    /// Per user.
    pub client_publishes_per_minute: u32,
    /// Per node, messages through the server API and ingest.
    pub ingest_per_second: u32,
    /// Per-connection send queue, in messages.
    pub send_queue: usize,
    /// A connection whose queue stays full this long is closed with 4009.
    #[serde(with = "serde_duration")]
    pub slow_consumer_timeout: Duration,
    /// A socket write blocked this long drops the connection.
    #[serde(with = "serde_duration")]
    pub write_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub handshake_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub auth_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub heartbeat_interval: Duration,
    /// Silence after which a connection is closed; greater than `heartbeat_interval`.
    #[serde(with = "serde_duration")]
    pub heartbeat_timeout: Duration,
    /// Bad frames per connection per minute before closing with 4008.
    pub max_errors_per_minute: u32,
    /// New connections per client IP per second; 0 = unlimited.
    pub connections_per_ip_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_size: 524_288,
            max_connections_per_user: 10,
            max_subscriptions_per_connection: 512,
            subscribes_per_second: 10,
            client_publishes_per_minute: 100,
            ingest_per_second: 10_000,
            send_queue: 1024,
            slow_consumer_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            max_errors_per_minute: 30,
            connections_per_ip_per_second: 0,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive (`info`, `herald=debug,info`); `RUST_LOG`
    /// overrides it. Checked fully by the binary, which owns the subscriber.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Values from command-line flags; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub node_id: Option<String>,
    pub store_url: Option<String>,
    pub bus_url: Option<String>,
}

impl Overrides {
    fn apply(&self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(node_id) = &self.node_id {
            config.server.node_id.clone_from(node_id);
        }
        if let Some(url) = &self.store_url {
            config.store.url.clone_from(url);
        }
        if let Some(url) = &self.bus_url {
            config.bus.url.clone_from(url);
        }
    }
}

/// The credentials `herald serve --dev` generated, to print for the user.
#[derive(Debug, Clone)]
pub struct DevSecrets {
    /// The HS256 secret tokens are signed with.
    pub jwt_secret: Secret,
    /// A server API key with scopes `publish` and `admin`. `None` when the environment
    /// replaced `auth.api_keys` (see [`load_dev`]).
    pub admin_key: Option<Secret>,
}

/// The `name` of the generated admin key.
const DEV_ADMIN_KEY_NAME: &str = "dev-admin";

impl DevSecrets {
    fn generate() -> Self {
        Self {
            jwt_secret: Secret::new(random_key()),
            admin_key: Some(Secret::new(random_key())),
        }
    }

    /// The `[server]` and `[auth]` settings of dev mode, as the base layer of [`load_dev`].
    fn base_table(&self, listen: SocketAddr) -> Table {
        let mut server = Table::new();
        server.insert("listen".into(), Value::String(listen.to_string()));
        let mut auth = Table::new();
        auth.insert(
            "jwt_secret".into(),
            Value::String(self.jwt_secret.expose().to_owned()),
        );
        if let Some(admin_key) = &self.admin_key {
            let mut key = Table::new();
            key.insert("key".into(), Value::String(admin_key.expose().to_owned()));
            key.insert(
                "scopes".into(),
                Value::Array(vec!["publish".into(), "admin".into()]),
            );
            key.insert("name".into(), DEV_ADMIN_KEY_NAME.into());
            auth.insert("api_keys".into(), Value::Array(vec![Value::Table(key)]));
        }
        let mut table = Table::new();
        table.insert("server".into(), Value::Table(server));
        table.insert("auth".into(), Value::Table(auth));
        table
    }
}

impl Config {
    /// The embedded configuration of `herald serve --dev`: the defaults (memory store and
    /// bus, default topic rules, text logs at `info`) plus a random HS256 secret and a random
    /// admin API key, returned so they can be printed.
    pub fn dev(listen: SocketAddr) -> (Config, DevSecrets) {
        let secrets = DevSecrets::generate();
        let mut config = Config::default();
        config.server.listen = listen;
        config.auth.jwt_secret = Some(secrets.jwt_secret.clone());
        if let Some(admin_key) = &secrets.admin_key {
            config.auth.api_keys = vec![crate::auth::ApiKeyConfig {
                key: admin_key.clone(),
                scopes: vec![crate::auth::Scope::Publish, crate::auth::Scope::Admin],
                name: Some(DEV_ADMIN_KEY_NAME.to_owned()),
            }];
        }
        (config, secrets)
    }

    /// Checks everything deserialization cannot: ranges, cross-field rules, backends,
    /// `[auth]` (and reads `auth.jwt_public_key_file`, so a missing or bad key fails here),
    /// topic rules. The first problem is returned; its message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        check_backend("store.url", self.store.backend()?)?;
        check_duration(
            "store.retry_after",
            self.store.retry_after,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        check_range("store.max_retries", self.store.max_retries, 0, 100)?;
        check_range("store.max_per_user", self.store.max_per_user, 1, 1_000_000)?;
        check_duration(
            "store.max_age",
            self.store.max_age,
            Duration::from_secs(60),
            Duration::from_secs(365 * 24 * 3600),
        )?;
        let bus = self.bus.backend()?;
        check_backend("bus.url", bus)?;
        self.bus.validate()?;
        let store = self.store.backend()?;
        if bus != BusBackend::Memory && matches!(store, StoreBackend::Sqlite | StoreBackend::Memory)
        {
            return Err(invalid(
                "store.url",
                format!(
                    "must be postgres://… or mysql://… with bus {}: durable inboxes are shared \
                     by every node, and a {} store is one node's",
                    bus.name(),
                    store.name()
                ),
            ));
        }
        self.limits.validate()?;
        self.log.validate()?;
        validate_ingest(&self.ingest)?;
        validate_upstream(&self.upstream)?;
        self.auth.validate().map_err(ConfigError::Auth)?;
        if self.auth.jwt_public_key_file.is_some() {
            JwtAuthenticator::new(&self.auth)?;
        }
        self.acl()?;
        Ok(())
    }

    /// The compiled topic rules: `[[topics]]`, or the defaults when there are none.
    pub fn acl(&self) -> Result<Acl, ConfigError> {
        Ok(Acl::from_config(
            self.topics.clone(),
            &self.auth.user_claim,
        )?)
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_segment(&self.node_id) {
            return Err(invalid(
                "server.node_id",
                format!(
                    "{:?} is not a valid topic segment (1-64 characters of A-Z a-z 0-9 _ . : @ -)",
                    excerpt(&self.node_id)
                ),
            ));
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if !is_origin(origin) {
                return Err(invalid(
                    &format!("server.allowed_origins[{i}]"),
                    format!(
                        "{:?} is not an origin: write scheme://host[:port], with no path or \
                         trailing slash (e.g. \"https://app.example.com\")",
                        excerpt(origin)
                    ),
                ));
            }
        }
        check_duration(
            "server.shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        // Not tied to shutdown_grace: with a spread longer than the grace, the last clients
        // are simply closed with 1012 before their `after_ms`, and reconnect then.
        check_duration(
            "server.drain_spread",
            self.drain_spread,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        const MS: Duration = Duration::from_millis(1);
        const HOUR: Duration = Duration::from_secs(3600);

        check_range(
            "limits.max_message_size",
            self.max_message_size,
            1024,
            64 << 20,
        )?;
        check_range(
            "limits.max_connections_per_user",
            self.max_connections_per_user,
            1,
            100_000,
        )?;
        check_range(
            "limits.max_subscriptions_per_connection",
            self.max_subscriptions_per_connection,
            1,
            100_000,
        )?;
        check_range(
            "limits.subscribes_per_second",
            self.subscribes_per_second,
            1,
            100_000,
        )?;
        check_range(
            "limits.client_publishes_per_minute",
            self.client_publishes_per_minute,
            1,
            1_000_000,
        )?;
        check_range(
            "limits.ingest_per_second",
            self.ingest_per_second,
            1,
            10_000_000,
        )?;
        check_range("limits.send_queue", self.send_queue, 1, 1_000_000)?;
        check_duration(
            "limits.slow_consumer_timeout",
            self.slow_consumer_timeout,
            MS,
            HOUR,
        )?;
        check_duration("limits.write_timeout", self.write_timeout, MS, HOUR)?;
        check_duration("limits.handshake_timeout", self.handshake_timeout, MS, HOUR)?;
        check_duration("limits.auth_timeout", self.auth_timeout, MS, HOUR)?;
        check_duration(
            "limits.heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(100),
            HOUR,
        )?;
        check_duration(
            "limits.heartbeat_timeout",
            self.heartbeat_timeout,
            Duration::from_millis(200),
            2 * HOUR,
        )?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(invalid(
                "limits.heartbeat_timeout",
                format!(
                    "({}) must be greater than limits.heartbeat_interval ({})",
                    format_duration(self.heartbeat_timeout),
                    format_duration(self.heartbeat_interval)
                ),
            ));
        }
        check_range(
            "limits.max_errors_per_minute",
            self.max_errors_per_minute,
            1,
            100_000,
        )?;
        check_range(
            "limits.connections_per_ip_per_second",
            self.connections_per_ip_per_second,
            0,
            1_000_000,
        )?;
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.level.trim().is_empty() {
            return Err(invalid(
                "log.level",
                "must not be empty (e.g. \"info\" or \"herald=debug,info\")".to_owned(),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why the configuration was refused. Every message names the setting and, for syntax and
/// type errors, where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value in it has the wrong key, type or form.
    #[error("config file {}{}: {}", .path.display(), DisplayLocation(.location.as_ref()), .source.message().trim_end())]
    File {
        path: PathBuf,
        location: Option<Location>,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A `HERALD_*` variable has an unknown key, or a value of the wrong type or form.
    #[error("environment {var}: {}", .source.message().trim_end())]
    Env {
        var: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A `HERALD_*` variable that is not a setting.
    #[error(
        "environment {var}: not a Herald setting; settings are HERALD_<SECTION>__<KEY> \
         (e.g. HERALD_SERVER__LISTEN, HERALD_AUTH__JWT_SECRET) or HERALD_TOPICS"
    )]
    EnvName { var: String },
    /// A `HERALD_*` variable reaches into a key that is not a table.
    #[error("environment {var}: {key} is not a table, so it has no keys to set")]
    EnvNotTable { var: String, key: String },
    /// File and environment were fine one by one but not together (should not happen).
    #[error("configuration: {}", .0.message().trim_end())]
    Merged(#[source] Box<toml::de::Error>),
    /// A value out of range or inconsistent with another: `<key> <reason>`.
    #[error("{key} {reason}")]
    Invalid { key: String, reason: String },
    /// A section checked by the crate that uses it; the message names the key.
    #[error("{0}")]
    Section(String),
    /// A backend Herald knows of but this build does not include.
    #[error("{key}: backend \"{backend}\" is not available in this build (supported: {supported})")]
    BackendUnavailable {
        key: &'static str,
        backend: &'static str,
        supported: String,
    },
    #[error("{key}: unknown scheme \"{scheme}\" (expected {expected})")]
    UnknownScheme {
        key: &'static str,
        scheme: String,
        expected: &'static str,
    },
    /// `[auth]` refused by [`AuthConfig::validate`] (the message names the key).
    #[error("{0}")]
    Auth(String),
    /// The public key file could not be read or used.
    #[error(transparent)]
    AuthKey(#[from] AuthSetupError),
    /// A `[[topics]]` rule does not compile.
    #[error(transparent)]
    Topics(#[from] AclError),
}

/// Where in a config file an error is: 1-based line and column, and (best effort, read from
/// the text around it) the enclosing table header and the dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
    /// The header of the enclosing table, as written (`[server]`, `[[topics]]`).
    pub section: Option<String>,
    /// The key on that line, with its table path: `limits.send_queue`, `topics[1].subscribe`.
    pub key: Option<String>,
}

struct DisplayLocation<'a>(Option<&'a Location>);

impl fmt::Display for DisplayLocation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(loc) = self.0 else {
            return Ok(());
        };
        write!(f, ", line {}, column {}", loc.line, loc.column)?;
        match (&loc.key, &loc.section) {
            (Some(key), _) => write!(f, ", {key}"),
            (None, Some(section)) => write!(f, ", in {section}"),
            (None, None) => Ok(()),
        }
    }
}

impl Location {
    /// The location of byte `offset` in `text`.
    fn find(text: &str, offset: usize) -> Location {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        let lines: Vec<&str> = text.lines().take(line).collect();
        let (this_line, above) = lines.split_last().unwrap_or((&"", &[]));

        // An error on a header line itself (`[servr]`) is about that table name.
        if let Some(header) = table_header(this_line) {
            return Location {
                line,
                column,
                section: None,
                key: Some(header_name(&header).to_owned()),
            };
        }
        let enclosing = above
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, l)| Some((i, table_header(l)?)));
        let (section, path) = match enclosing {
            None => (None, None),
            Some((i, header)) => {
                let name = header_name(&header).to_owned();
                let path = if header.starts_with("[[") {
                    // The how-many-th entry of this array of tables.
                    let index = above
                        .get(..i)
                        .unwrap_or_default()
                        .iter()
                        .filter(|l| table_header(l).as_deref() == Some(header.as_str()))
                        .count();
                    format!("{name}[{index}]")
                } else {
                    name
                };
                (Some(header), Some(path))
            }
        };
        let key_here = this_line
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('#'));
        let key = match (path, key_here) {
            (Some(path), Some(k)) => Some(format!("{path}.{k}")),
            (None, Some(k)) => Some(k.to_owned()),
            (path, None) => path,
        };
        Location {
            line,
            column,
            section,
            key,
        }
    }
}

/// `[name]` or `[[name]]` when `line` is a table header.
fn table_header(line: &str) -> Option<String> {
    let line = line.trim_start();
    let close = if line.starts_with("[[") {
        "]]"
    } else if line.starts_with('[') {
        "]"
    } else {
        return None;
    };
    let end = line.find(close)? + close.len();
    line.get(..end).map(str::to_owned)
}

/// `server` for `[server]`, `topics` for `[[topics]]`.
fn header_name(header: &str) -> &str {
    header.trim_matches(|c| c == '[' || c == ']').trim()
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason,
    }
}

fn check_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn check_duration(
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {}, got {}",
                format_duration(min),
                format_duration(max),
                format_duration(value)
            ),
        ));
    }
    Ok(())
}

/// What [`backend_of`] and [`check_backend`] need of a backend enum.
trait Backend: Copy + PartialEq + 'static {
    /// URL schemes (lowercase) and the backend each names.
    const SCHEMES: &'static [(&'static str, Self)];
    /// The accepted forms, for messages.
    const EXPECTED: &'static str;
    fn backend_name(self) -> &'static str;
    fn available(self) -> bool;
}

impl Backend for StoreBackend {
    const SCHEMES: &'static [(&'static str, Self)] = &[
        ("memory", Self::Memory),
        ("sqlite", Self::Sqlite),
        ("postgres", Self::Postgres),
        ("postgresql", Self::Postgres),
        ("mysql", Self::Mysql),
        ("mariadb", Self::Mysql),
    ];
    const EXPECTED: &'static str = "memory, sqlite://…, postgres://… or mysql://…";
    fn backend_name(self) -> &'static str {
        self.name()
    }
    fn available(self) -> bool {
        self.is_available()
    }
}

impl Backend for BusBackend {
    const SCHEMES: &'static [(&'static str, Self)] = &[
        ("memory", Self::Memory),
        ("redis", Self::Redis),
        ("rediss", Self::Redis),
        ("nats", Self::Nats),
    ];
    const EXPECTED: &'static str = "memory, redis://… or nats://…";
    fn backend_name(self) -> &'static str {
        self.name()
    }
    fn available(self) -> bool {
        self.is_available()
    }
}

/// The backend `url` names, by its scheme (case-insensitive).
fn backend_of<B: Backend>(key: &'static str, url: &str) -> Result<B, ConfigError> {
    let url = url.trim();
    if url.is_empty() {
        return Err(invalid(
            key,
            format!("must not be empty (expected {})", B::EXPECTED),
        ));
    }
    let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
    B::SCHEMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(scheme))
        .map(|(_, backend)| *backend)
        .ok_or_else(|| ConfigError::UnknownScheme {
            key,
            scheme: excerpt(scheme),
            expected: B::EXPECTED,
        })
}

/// `[ingest]`: URLs present, names usable.
fn validate_ingest(c: &herald_ingest::config::IngestConfig) -> Result<(), ConfigError> {
    if let Some(a) = &c.amqp {
        a.check().map_err(ConfigError::Section)?;
    }
    if let Some(r) = &c.redis {
        check_url("ingest.redis.url", &r.url, &["redis", "rediss"])?;
        if !r.seed002 && !r.seed001 {
            return Err(invalid(
                "ingest.redis",
                "enables no channel (seed002 and seed001 are both false): remove the section"
                    .into(),
            ));
        }
    }
    if let Some(n) = &c.nats {
        check_url("ingest.nats.url", &n.url, &["nats", "tls"])?;
        if n.subjects.is_empty() {
            return Err(invalid(
                "ingest.nats.subjects",
                "must list at least one subject".into(),
            ));
        }
        for (i, s) in n.subjects.iter().enumerate() {
            if s.is_empty() || s.contains(char::is_whitespace) || s.split('.').any(str::is_empty) {
                return Err(invalid(
                    &format!("ingest.nats.subjects[{i}]"),
                    format!("{:?} is not a NATS subject", excerpt(s)),
                ));
            }
        }
    }
    Ok(())
}

/// `[upstream]`: every command's target parses, and its connection is configured.
fn validate_upstream(c: &herald_ingest::config::UpstreamConfig) -> Result<(), ConfigError> {
    use herald_ingest::command::Target;
    if let Some(u) = &c.amqp_url {
        check_url("upstream.amqp_url", u, &["amqp", "amqps"])?;
    }
    if let Some(u) = &c.nats_url {
        check_url("upstream.nats_url", u, &["nats", "tls"])?;
    }
    check_duration(
        "upstream.timeout",
        c.timeout,
        Duration::from_millis(10),
        Duration::from_secs(3600),
    )?;
    for (name, route) in &c.commands {
        let key = format!("upstream.commands.{name}");
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(invalid(&key, "a command name is 1 to 128 bytes".into()));
        }
        let target =
            Target::parse(&route.target).map_err(|e| invalid(&format!("{key}.target"), e))?;
        match target {
            Target::Amqp { .. } if c.amqp_url.is_none() => {
                return Err(invalid(
                    &format!("{key}.target"),
                    "is an amqp: target, which needs upstream.amqp_url".into(),
                ));
            }
            Target::Nats { .. } if c.nats_url.is_none() => {
                return Err(invalid(
                    &format!("{key}.target"),
                    "is a nats: target, which needs upstream.nats_url".into(),
                ));
            }
            _ => {}
        }
        if let Some(t) = route.timeout {
            check_duration(
                &format!("{key}.timeout"),
                t,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            )?;
        }
    }
    Ok(())
}

/// A URL with one of `schemes`.
fn check_url(key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let ok = url
        .split_once("://")
        .is_some_and(|(s, rest)| schemes.contains(&s) && !rest.is_empty());
    if ok {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "must be a {} URL, got {:?}",
            schemes
                .iter()
                .map(|s| format!("{s}://…"))
                .collect::<Vec<_>>()
                .join(" or "),
            excerpt(url)
        ),
    ))
}

/// Refuses a backend this build does not include, listing those it does.
fn check_backend<B: Backend>(key: &'static str, backend: B) -> Result<(), ConfigError> {
    if backend.available() {
        return Ok(());
    }
    let mut supported: Vec<&str> = Vec::new();
    for (_, b) in B::SCHEMES {
        if b.available() && !supported.contains(&b.backend_name()) {
            supported.push(b.backend_name());
        }
    }
    Err(ConfigError::BackendUnavailable {
        key,
        backend: backend.backend_name(),
        supported: supported.join(", "),
    })
}

/// `scheme://host[:port]`: what a browser sends as `Origin`.
fn is_origin(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return false;
        };
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
        {
            return false;
        }
        match after {
            "" => ("v6", None),
            _ => match after.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return false,
            },
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    scheme_ok && host_ok && port_ok
}

/// At most 64 characters of `s`, for messages.
fn excerpt(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", s.get(..end).unwrap_or_default()),
    }
}

fn random_node_id() -> String {
    // Crockford's base32 alphabet, lowercase: no i, l, o, u.
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut bits = ulid::Ulid::new().random();
    let mut id = String::from("n-");
    for _ in 0..8 {
        id.push(char::from(ALPHABET[(bits & 31) as usize]));
        bits >>= 5;
    }
    id
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Loads the configuration: defaults, then `file`, then the `HERALD_*` variables of `env`,
/// then `overrides`; then [`Config::validate`]. Pass `std::env::vars()` (or a test list) as
/// `env`; variables without the `HERALD_` prefix are ignored.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    load_layers(Table::new(), file, env, overrides)
}

/// `herald serve --dev`: [`Config::dev`] as the defaults, then `env`, then `overrides`; no
/// file. The returned secrets are the effective ones: a `HERALD_AUTH__JWT_SECRET` replaces
/// the generated secret, and a `HERALD_AUTH__API_KEYS` drops the generated admin key.
pub fn load_dev(
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<(Config, DevSecrets), ConfigError> {
    let mut secrets = DevSecrets::generate();
    let base = secrets.base_table(DEFAULT_LISTEN);
    let config = load_layers(base, None, env, overrides)?;
    if let Some(secret) = &config.auth.jwt_secret {
        secrets.jwt_secret = secret.clone();
    }
    let still_configured = |key: &Secret| {
        config
            .auth
            .api_keys
            .iter()
            .any(|k| k.key.expose() == key.expose())
    };
    if !secrets.admin_key.as_ref().is_some_and(still_configured) {
        secrets.admin_key = None;
    }
    Ok((config, secrets))
}

/// The one place where precedence is decided: `base` < file < environment < flags.
fn load_layers(
    base: Table,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let mut table = base;
    if let Some(path) = file {
        merge(&mut table, read_file(path)?);
    }
    for setting in env_settings(env)? {
        set_path(&mut table, &setting.var, &setting.path, setting.value)?;
    }
    let mut config: Config = table
        .try_into()
        .map_err(|e| ConfigError::Merged(Box::new(e)))?;
    overrides.apply(&mut config);
    config.validate()?;
    Ok(config)
}

/// Reads and checks one file on its own (so errors point into it), as a table.
fn read_file(path: &Path) -> Result<Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file_error = |source: toml::de::Error| ConfigError::File {
        path: path.to_owned(),
        location: source.span().map(|span| Location::find(&text, span.start)),
        source: Box::new(source),
    };
    let mut table: Table = toml::from_str(&text).map_err(file_error)?;
    // Types, keys and forms, with spans. Validation comes after all layers are applied.
    toml::from_str::<Config>(&text).map_err(file_error)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        resolve_relative(&mut table, dir);
    }
    Ok(table)
}

/// Makes a relative `auth.jwt_public_key_file` relative to `dir` (the file's directory).
fn resolve_relative(table: &mut Table, dir: &Path) {
    let Some(Value::Table(auth)) = table.get_mut("auth") else {
        return;
    };
    if let Some(Value::String(file)) = auth.get_mut("jwt_public_key_file") {
        let path = Path::new(file.as_str());
        if path.is_relative() && !file.is_empty() {
            *file = dir.join(path).to_string_lossy().into_owned();
        }
    }
}

/// Deep merge: tables merge key by key, anything else in `top` replaces what is in `base`.
fn merge(base: &mut Table, top: Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(below)), Value::Table(above)) => merge(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// One `HERALD_*` setting, checked on its own.
struct EnvSetting {
    var: String,
    path: Vec<String>,
    value: Value,
}

/// The `HERALD_*` settings in `env`, sorted by name, each checked alone against [`Config`] so
/// an error names its variable.
fn env_settings(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<EnvSetting>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(var, _)| var.starts_with(ENV_PREFIX) && !ENV_ALLOWLIST.contains(&var.as_str()))
        .collect();
    vars.sort();
    vars.into_iter()
        .map(|(var, raw)| {
            let path = env_path(&var)?;
            let value = env_value(&var, &path, &raw)?;
            Ok(EnvSetting { var, path, value })
        })
        .collect()
}

/// `HERALD_LIMITS__SEND_QUEUE` → `["limits", "send_queue"]`; `HERALD_TOPICS` → `["topics"]`.
fn env_path(var: &str) -> Result<Vec<String>, ConfigError> {
    let name = var.get(ENV_PREFIX.len()..).unwrap_or_default();
    let path: Vec<String> = name.split("__").map(str::to_ascii_lowercase).collect();
    let well_formed = path.iter().all(|p| !p.is_empty())
        && (path.len() >= 2 || path.first().is_some_and(|p| p == "topics"));
    if well_formed {
        Ok(path)
    } else {
        Err(ConfigError::EnvName {
            var: var.to_owned(),
        })
    }
}

/// The TOML value of `raw`: typed when it reads as an integer, float, boolean or array and
/// the key accepts that; otherwise the string itself.
fn env_value(var: &str, path: &[String], raw: &str) -> Result<Value, ConfigError> {
    let alone = |value: &Value| -> Result<(), toml::de::Error> {
        let mut table = Table::new();
        // `path` is non-empty and the table is fresh, so this cannot fail.
        let _ = set_path(&mut table, var, path, value.clone());
        table.try_into::<Config>().map(drop)
    };
    let string = Value::String(raw.to_owned());
    let Some(typed) = typed_value(raw) else {
        return match alone(&string) {
            Ok(()) => Ok(string),
            Err(source) => Err(ConfigError::Env {
                var: var.to_owned(),
                source: Box::new(source),
            }),
        };
    };
    let Err(typed_error) = alone(&typed) else {
        return Ok(typed);
    };
    // A string key given a number-like value (`HERALD_SERVER__NODE_ID=7`).
    match alone(&string) {
        Ok(()) => Ok(string),
        // Report the attempt that got further: a string that was refused for its type means
        // the key wants the typed value; otherwise the key wants a string and said why not
        // (`HERALD_LIMITS__WRITE_TIMEOUT=10`: missing unit).
        Err(string_error) => Err(ConfigError::Env {
            var: var.to_owned(),
            source: Box::new(
                if string_error.message().starts_with("invalid type: string") {
                    typed_error
                } else {
                    string_error
                },
            ),
        }),
    }
}

/// `raw` as a TOML integer, float, boolean or array, if it is exactly one of those.
fn typed_value(raw: &str) -> Option<Value> {
    let mut doc: Table = toml::from_str(&format!("v = {raw}")).ok()?;
    if doc.len() != 1 {
        return None;
    }
    match doc.remove("v")? {
        v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Array(_)) => Some(v),
        _ => None,
    }
}

/// Sets `path` (non-empty) in `table` to `value`, creating tables on the way.
fn set_path(
    table: &mut Table,
    var: &str,
    path: &[String],
    value: Value,
) -> Result<(), ConfigError> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut current = table;
    for (depth, key) in parents.iter().enumerate() {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        current = match entry {
            Value::Table(t) => t,
            _ => {
                return Err(ConfigError::EnvNotTable {
                    var: var.to_owned(),
                    key: path.get(..=depth).unwrap_or(path).join("."),
                });
            }
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-long-test-secret-of-at-least-32-bytes!";

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Only a JWT secret: the smallest configuration that validates.
    fn base_env() -> Vec<(String, String)> {
        env(&[("HERALD_AUTH__JWT_SECRET", SECRET)])
    }

    fn load_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = base_env();
        all.extend(env(vars));
        load(None, all, &Overrides::default())
    }

    fn err(r: Result<Config, ConfigError>) -> String {
        match r {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let dir = std::env::temp_dir().join(format!("herald-config-{}", ulid::Ulid::new()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(c.server.allowed_origins.is_empty());
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.server.drain_spread, Duration::from_secs(2));
        assert_eq!(c.store.url, "sqlite://data/herald.db");
        assert_eq!(c.bus.url, "memory");
        let l = &c.limits;
        assert_eq!(l.max_message_size, 512 * 1024);
        assert_eq!(l.max_connections_per_user, 10);
        assert_eq!(l.max_subscriptions_per_connection, 512);
        assert_eq!(l.subscribes_per_second, 10);
        assert_eq!(l.client_publishes_per_minute, 100);
        assert_eq!(l.ingest_per_second, 10_000);
        assert_eq!(l.send_queue, 1024);
        assert_eq!(l.slow_consumer_timeout, Duration::from_secs(5));
        assert_eq!(l.write_timeout, Duration::from_secs(10));
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        assert_eq!(l.auth_timeout, Duration::from_secs(10));
        assert_eq!(l.heartbeat_interval, Duration::from_secs(25));
        assert_eq!(l.heartbeat_timeout, Duration::from_secs(60));
        assert_eq!(l.max_errors_per_minute, 30);
        assert_eq!(l.connections_per_ip_per_second, 0);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert!(c.topics.is_empty());
        assert_eq!(c.auth.user_claim, "sub");
    }

    #[test]
    fn generated_node_id_is_a_segment() {
        let a = random_node_id();
        let b = random_node_id();
        assert_eq!(a.len(), 10);
        assert!(a.starts_with("n-"), "{a}");
        assert!(is_valid_segment(&a));
        assert!(
            a.bytes()
                .skip(2)
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn empty_config_deserializes_but_needs_auth() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        let e = err(load(None, Vec::new(), &Overrides::default()));
        assert!(e.contains("auth.jwt_secret"), "{e}");
        load_env(&[]).unwrap();
    }

    #[test]
    fn precedence_defaults_file_env_flags() {
        let f = TempFile::new(
            "herald.toml",
            "[server]\nlisten = \"127.0.0.1:1000\"\nnode_id = \"file\"\n\
             [limits]\nsend_queue = 10\nsubscribes_per_second = 3\n\
             [auth]\njwt_secret = \"from-the-file-from-the-file-from-the-file\"\nissuer = \"me\"\n",
        );
        let vars = env(&[
            ("HERALD_SERVER__LISTEN", "127.0.0.1:2000"),
            ("HERALD_SERVER__NODE_ID", "env"),
            ("HERALD_LIMITS__SEND_QUEUE", "20"),
            ("HERALD_AUTH__JWT_SECRET", SECRET),
            ("PATH", "/bin"),
            ("HERALD_CONFIG", "ignored.toml"),
        ]);
        let flags = Overrides {
            listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Overrides::default()
        };
        let c = load(Some(&f.0), vars, &flags).unwrap();
        assert_eq!(c.server.listen.port(), 3000, "flag wins");
        assert_eq!(c.server.node_id, "env", "env beats file");
        assert_eq!(c.limits.send_queue, 20);
        assert_eq!(c.limits.subscribes_per_second, 3, "file beats default");
        assert_eq!(c.limits.max_connections_per_user, 10, "default");
        assert_eq!(c.auth.jwt_secret.as_ref().map(Secret::expose), Some(SECRET));
        assert_eq!(
            c.auth.issuer.as_deref(),
            Some("me"),
            "file keys merge with env keys"
        );
    }

    #[test]
    fn flags_override_everything() {
        let flags = Overrides {
            listen: Some("0.0.0.0:0".parse().unwrap()),
            node_id: Some("flag-node".into()),
            store_url: Some("memory".into()),
            bus_url: Some("memory".into()),
        };
        let mut vars = base_env();
        vars.extend(env(&[
            ("HERALD_STORE__URL", "postgres://x"),
            ("HERALD_SERVER__NODE_ID", "e"),
        ]));
        let c = load(None, vars, &flags).unwrap();
        assert_eq!(c.server.node_id, "flag-node");
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.store.url, "memory");

        let flags = Overrides {
            store_url: Some("mysql://db/herald".into()),
            ..Overrides::default()
        };
        let c = load(None, base_env(), &flags).unwrap();
        assert_eq!(c.store.url, "mysql://db/herald");
    }

    #[test]
    fn env_values_are_typed_or_strings() {
        let c = load_env(&[
            ("HERALD_LIMITS__SEND_QUEUE", "64"),
            ("HERALD_SERVER__NODE_ID", "7"),
            (
                "HERALD_SERVER__ALLOWED_ORIGINS",
                r#"["https://a.example", "http://localhost:3000"]"#,
            ),
            ("HERALD_LIMITS__HEARTBEAT_INTERVAL", "10s"),
            ("HERALD_LOG__FORMAT", "json"),
            ("HERALD_AUTH__ISSUER", "true"),
        ])
        .unwrap();
        assert_eq!(c.limits.send_queue, 64);
        assert_eq!(c.server.node_id, "7");
        assert_eq!(c.server.allowed_origins.len(), 2);
        assert_eq!(c.limits.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.auth.issuer.as_deref(), Some("true"));
    }

    #[test]
    fn env_topics_and_api_keys() {
        let c = load_env(&[
            (
                "HERALD_TOPICS",
                r#"[{ pattern = "room/*", subscribe = "allow", publish = "allow" }]"#,
            ),
            (
                "HERALD_AUTH__API_KEYS",
                r#"[{ key = "0123456789abcdef0123", scopes = ["publish"] }]"#,
            ),
        ])
        .unwrap();
        assert_eq!(c.topics.len(), 1);
        assert_eq!(c.auth.api_keys.len(), 1);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = err(load_env(&[("HERALD_LIMITS__SEND_QUEUE", "lots")]));
        assert!(
            e.starts_with("environment HERALD_LIMITS__SEND_QUEUE: invalid type"),
            "{e}"
        );

        let e = err(load_env(&[("HERALD_LIMITS__SEND_QUEU", "1")]));
        assert!(
            e.starts_with("environment HERALD_LIMITS__SEND_QUEU: unknown field `send_queu`"),
            "{e}"
        );

        let e = err(load_env(&[("HERALD_SERVR__LISTEN", "127.0.0.1:1")]));
        assert!(
            e.contains("environment HERALD_SERVR__LISTEN: unknown field `servr`"),
            "{e}"
        );

        let e = err(load_env(&[("HERALD_SERVER__LISTEN", "nowhere")]));
        assert!(
            e.starts_with("environment HERALD_SERVER__LISTEN: invalid socket address"),
            "{e}"
        );

        let e = err(load_env(&[("HERALD_LIMITS__WRITE_TIMEOUT", "10")]));
        assert!(e.contains("missing unit"), "{e}");

        for var in [
            "HERALD_FOO",
            "HERALD_SERVER__",
            "HERALD___LISTEN",
            "HERALD_",
        ] {
            let e = err(load_env(&[(var, "1")]));
            assert!(
                e.starts_with(&format!("environment {var}: not a Herald setting")),
                "{e}"
            );
        }

        let e = err(load_env(&[("HERALD_LOG__LEVEL__X", "1")]));
        assert_eq!(
            e,
            "environment HERALD_LOG__LEVEL__X: invalid type: map, expected a string"
        );

        // Validation errors name the key, whatever set it.
        let e = err(load_env(&[("HERALD_LIMITS__SEND_QUEUE", "0")]));
        assert_eq!(e, "limits.send_queue must be between 1 and 1000000, got 0");

        // Allowlisted and foreign variables are ignored.
        load_env(&[
            ("HERALD_LOG", "debug"),
            ("HERALD_TOKEN", "x"),
            ("herald_foo", "1"),
        ])
        .unwrap();
    }

    #[test]
    fn file_errors_point_into_the_file() {
        let f = TempFile::new(
            "herald.toml",
            "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n\n[server]\nlisen = \"127.0.0.1:1\"\n",
        );
        let e = err(load(Some(&f.0), Vec::new(), &Overrides::default()));
        assert!(e.starts_with("config file "), "{e}");
        assert!(e.contains("herald.toml, line 5, column 1, server.lisen: unknown field `lisen`, expected one of `listen`"), "{e}");

        let f = TempFile::new("h.toml", "[servr]\nlisten = 1\n");
        let e = err(load(Some(&f.0), Vec::new(), &Overrides::default()));
        assert!(
            e.contains("h.toml, line 1, column 2, servr: unknown field `servr`"),
            "{e}"
        );

        // Type and form errors name the key (the message from serde does not).
        let f = TempFile::new(
            "h.toml",
            "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n\
             [limits]\nheartbeat_interval = \"10\"\n",
        );
        let e = err(load(Some(&f.0), Vec::new(), &Overrides::default()));
        assert!(
            e.contains("line 4, column 22, limits.heartbeat_interval: invalid duration \"10\""),
            "{e}"
        );

        let f = TempFile::new("h.toml", "[server\n");
        let e = err(load(Some(&f.0), Vec::new(), &Overrides::default()));
        assert!(e.contains("h.toml, line 1"), "{e}");

        let e = err(load(
            Some(Path::new("/nonexistent/herald.toml")),
            Vec::new(),
            &Overrides::default(),
        ));
        assert!(
            e.starts_with("cannot read config file /nonexistent/herald.toml: "),
            "{e}"
        );
    }

    #[test]
    fn relative_key_file_is_resolved_against_the_file() {
        let f = TempFile::new(
            "herald.toml",
            "[auth]\njwt_public_key_file = \"keys/pub.pem\"\njwt_algorithm = \"RS256\"\n",
        );
        let mut table = read_file(&f.0).unwrap();
        let auth = table.remove("auth").unwrap();
        let file = auth
            .get("jwt_public_key_file")
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(Path::new(file), f.0.parent().unwrap().join("keys/pub.pem"));
        // It does not exist, and validation reads it.
        let e = err(load(Some(&f.0), Vec::new(), &Overrides::default()));
        assert!(e.contains("cannot read auth.jwt_public_key_file"), "{e}");
    }

    #[test]
    fn limit_ranges() {
        let cases = [
            (
                "HERALD_LIMITS__MAX_MESSAGE_SIZE",
                "1023",
                "limits.max_message_size must be between 1024",
            ),
            (
                "HERALD_LIMITS__MAX_CONNECTIONS_PER_USER",
                "0",
                "limits.max_connections_per_user must be",
            ),
            (
                "HERALD_LIMITS__MAX_SUBSCRIPTIONS_PER_CONNECTION",
                "0",
                "limits.max_subscriptions_per_connection",
            ),
            (
                "HERALD_LIMITS__SUBSCRIBES_PER_SECOND",
                "0",
                "limits.subscribes_per_second",
            ),
            (
                "HERALD_LIMITS__CLIENT_PUBLISHES_PER_MINUTE",
                "0",
                "limits.client_publishes_per_minute",
            ),
            (
                "HERALD_LIMITS__INGEST_PER_SECOND",
                "0",
                "limits.ingest_per_second",
            ),
            ("HERALD_LIMITS__SEND_QUEUE", "1000001", "limits.send_queue"),
            (
                "HERALD_LIMITS__SLOW_CONSUMER_TIMEOUT",
                "0s",
                "limits.slow_consumer_timeout must be between 1ms and 1h, got 0s",
            ),
            (
                "HERALD_LIMITS__WRITE_TIMEOUT",
                "0ms",
                "limits.write_timeout",
            ),
            (
                "HERALD_LIMITS__HANDSHAKE_TIMEOUT",
                "2h",
                "limits.handshake_timeout",
            ),
            ("HERALD_LIMITS__AUTH_TIMEOUT", "0s", "limits.auth_timeout"),
            (
                "HERALD_LIMITS__HEARTBEAT_INTERVAL",
                "50ms",
                "limits.heartbeat_interval",
            ),
            (
                "HERALD_LIMITS__HEARTBEAT_TIMEOUT",
                "25s",
                "limits.heartbeat_timeout (25s) must be greater than limits.heartbeat_interval (25s)",
            ),
            (
                "HERALD_LIMITS__MAX_ERRORS_PER_MINUTE",
                "0",
                "limits.max_errors_per_minute",
            ),
            (
                "HERALD_LIMITS__CONNECTIONS_PER_IP_PER_SECOND",
                "-1",
                "environment HERALD_LIMITS__CONNECTIONS_PER_IP_PER_SECOND",
            ),
            (
                "HERALD_SERVER__SHUTDOWN_GRACE",
                "2h",
                "server.shutdown_grace must be between 0s and 1h, got 2h",
            ),
            (
                "HERALD_SERVER__DRAIN_SPREAD",
                "61m",
                "server.drain_spread must be between 0s and 1h, got 61m",
            ),
            (
                "HERALD_SERVER__NODE_ID",
                "a/b",
                "server.node_id \"a/b\" is not a valid topic segment",
            ),
            ("HERALD_LOG__LEVEL", " ", "log.level must not be empty"),
            ("HERALD_LOG__FORMAT", "xml", "unknown variant `xml`"),
        ];
        for (var, value, want) in cases {
            let e = err(load_env(&[(var, value)]));
            assert!(e.contains(want), "{var}={value}: {e}");
        }
        load_env(&[
            ("HERALD_LIMITS__MAX_MESSAGE_SIZE", "1024"),
            ("HERALD_LIMITS__HEARTBEAT_TIMEOUT", "26s"),
            ("HERALD_SERVER__SHUTDOWN_GRACE", "0s"),
            ("HERALD_SERVER__DRAIN_SPREAD", "0s"),
            ("HERALD_LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "5"),
        ])
        .unwrap();
    }

    #[test]
    fn backends() {
        let store = |url: &str| {
            StoreConfig {
                url: url.into(),
                ..StoreConfig::default()
            }
            .backend()
        };
        assert_eq!(store("memory").unwrap(), StoreBackend::Memory);
        assert_eq!(
            store("sqlite://data/herald.db").unwrap(),
            StoreBackend::Sqlite
        );
        assert_eq!(store("PostgreSQL://h/db").unwrap(), StoreBackend::Postgres);
        assert_eq!(store("mysql://h/db").unwrap(), StoreBackend::Mysql);
        assert_eq!(
            store("mongodb://h").unwrap_err().to_string(),
            "store.url: unknown scheme \"mongodb\" (expected memory, sqlite://…, postgres://… or mysql://…)"
        );
        assert!(
            store("")
                .unwrap_err()
                .to_string()
                .starts_with("store.url must not be empty")
        );
        let bus = |url: &str| {
            BusConfig {
                url: url.into(),
                ..BusConfig::default()
            }
            .backend()
        };
        assert_eq!(bus("redis://localhost:6379").unwrap(), BusBackend::Redis);
        assert_eq!(bus("nats://localhost:4222").unwrap(), BusBackend::Nats);
        assert!(
            bus("kafka://x")
                .unwrap_err()
                .to_string()
                .contains("bus.url: unknown scheme")
        );

        // Every store backend is built in; the connection is made by `serve`, not here.
        let c = load_env(&[("HERALD_STORE__URL", "postgres://u@h/db")]).unwrap();
        assert_eq!(c.store.backend().unwrap(), StoreBackend::Postgres);
        // A clustered bus needs a store every node shares.
        for store in ["sqlite://x.db", "memory"] {
            let e = err(load_env(&[
                ("HERALD_BUS__URL", "redis://localhost"),
                ("HERALD_STORE__URL", store),
            ]));
            assert!(
                e.starts_with("store.url must be postgres://… or mysql://… with bus redis"),
                "{e}"
            );
        }
        let c = load_env(&[
            ("HERALD_BUS__URL", "nats://localhost:4222"),
            ("HERALD_STORE__URL", "postgres://u@h/db"),
        ])
        .unwrap();
        assert_eq!(c.bus.backend().unwrap(), BusBackend::Nats);
        assert_eq!(c.bus.prefix, "herald");
        assert!(c.bus.interest_counters().unwrap().is_some());
    }

    #[test]
    fn bus_settings_are_checked() {
        let cluster = [
            ("HERALD_BUS__URL", "redis://localhost"),
            ("HERALD_STORE__URL", "postgres://u@h/db"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut v = cluster.to_vec();
            v.extend_from_slice(extra);
            load_env(&v)
        };
        let e = err(with(&[("HERALD_BUS__PREFIX", "a b")]));
        assert!(
            e.starts_with("bus.prefix must be 1 to 32 characters"),
            "{e}"
        );
        assert!(e.ends_with("got \"a b\""), "{e}");
        let e = err(with(&[("HERALD_BUS__PRESENCE_TTL", "1s")]));
        assert!(e.starts_with("bus.presence_ttl must be between 3s"), "{e}");
        let e = err(with(&[("HERALD_BUS__INTEREST__KEY", "ws:sub:{id}")]));
        assert!(
            e.contains("bus.interest") && e.contains("{id} is not a variable of the topic"),
            "{e}"
        );
        let e = err(with(&[("HERALD_BUS__INTEREST__REFRESH", "10m")]));
        assert!(e.contains("must be shorter than its ttl"), "{e}");
        let c = with(&[
            ("HERALD_BUS__INTEREST__ENABLED", "false"),
            ("HERALD_BUS__INTEREST__KEY", "broken{"),
        ])
        .unwrap();
        assert!(c.bus.interest_counters().unwrap().is_none());
    }

    #[test]
    fn origins() {
        for ok in [
            "https://app.example.com",
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "app://x",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "https://h:",
            "https://h:99999",
            "https://h:80:80",
            "https://user@h",
            "*",
            "null",
            "http://[::1",
            "://h",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
        let e = err(load_env(&[(
            "HERALD_SERVER__ALLOWED_ORIGINS",
            r#"["https://a.example/"]"#,
        )]));
        assert!(
            e.starts_with("server.allowed_origins[0] \"https://a.example/\" is not an origin"),
            "{e}"
        );
    }

    #[test]
    fn auth_and_topics_are_validated() {
        let e = err(load_env(&[("HERALD_AUTH__JWT_PUBLIC_KEY_FILE", "k.pem")]));
        assert!(
            e.contains("auth.jwt_secret and auth.jwt_public_key_file are exclusive"),
            "{e}"
        );
        let e = err(load_env(&[(
            "HERALD_TOPICS",
            r#"[{ pattern = "a/**/b" }]"#,
        )]));
        assert!(e.starts_with("topics[0].pattern \"a/**/b\""), "{e}");
        let e = err(load_env(&[(
            "HERALD_TOPICS",
            r#"[{ pattern = "a", subscribe = "maybe" }]"#,
        )]));
        assert!(
            e.starts_with("environment HERALD_TOPICS: invalid value: string \"maybe\""),
            "{e}"
        );
    }

    #[test]
    fn dev_config() {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (c, secrets) = Config::dev(listen);
        c.validate().unwrap();
        assert_eq!(c.server.listen, listen);
        assert!(secrets.jwt_secret.expose().len() >= 32);
        let admin = secrets.admin_key.clone().unwrap();
        assert_ne!(admin.expose(), secrets.jwt_secret.expose());
        assert_eq!(c.auth.api_keys.len(), 1);
        assert_eq!(c.auth.api_keys[0].key.expose(), admin.expose());
        assert!(
            c.auth.api_keys[0]
                .scopes
                .contains(&crate::auth::Scope::Admin)
        );
        assert!(
            c.auth.api_keys[0]
                .scopes
                .contains(&crate::auth::Scope::Publish)
        );
        assert!(c.topics.is_empty());
        assert_eq!(c.store.url, DEFAULT_STORE_URL);
        assert_eq!(c.log, LogConfig::default());
        // Secrets never reach Debug output.
        let debug = format!("{c:?} {secrets:?}");
        assert!(!debug.contains(secrets.jwt_secret.expose()));
        assert!(!debug.contains(admin.expose()));
        // Fresh secrets each time.
        let (_, again) = Config::dev(listen);
        assert_ne!(again.jwt_secret.expose(), secrets.jwt_secret.expose());
    }

    #[test]
    fn load_dev_layers_env_and_flags_on_dev_defaults() {
        let (c, secrets) = load_dev(Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(c.server.listen, DEFAULT_LISTEN);
        assert_eq!(
            c.auth.jwt_secret.as_ref().map(Secret::expose),
            Some(secrets.jwt_secret.expose())
        );
        let admin = secrets.admin_key.unwrap();
        assert_eq!(c.auth.api_keys[0].key.expose(), admin.expose());
        assert_eq!(c.auth.api_keys[0].name.as_deref(), Some(DEV_ADMIN_KEY_NAME));

        let flags = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let (c, secrets) = load_dev(
            env(&[
                ("HERALD_AUTH__JWT_SECRET", SECRET),
                (
                    "HERALD_AUTH__API_KEYS",
                    r#"[{ key = "0123456789abcdef0123", scopes = ["admin"] }]"#,
                ),
                ("HERALD_LIMITS__SEND_QUEUE", "8"),
            ]),
            &flags,
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.limits.send_queue, 8);
        assert_eq!(secrets.jwt_secret.expose(), SECRET);
        assert!(secrets.admin_key.is_none());
    }

    #[test]
    fn typed_values() {
        assert_eq!(typed_value("12"), Some(Value::Integer(12)));
        assert_eq!(typed_value("1.5"), Some(Value::Float(1.5)));
        assert_eq!(typed_value("false"), Some(Value::Boolean(false)));
        assert!(matches!(typed_value("[1, 2]"), Some(Value::Array(_))));
        for s in [
            "10s",
            "abc",
            "\"quoted\"",
            "1979-05-27",
            "{ a = 1 }",
            "1\nx = 2",
            "",
            "127.0.0.1:80",
        ] {
            assert_eq!(typed_value(s), None, "{s:?}");
        }
    }

    #[test]
    fn locations() {
        let text = "a = 1\n[server]\nlisen = 2\n[[topics]]\npattern = 3\n[[topics]]\n\
                    subscribe = { roles = [] }\nlist = [\n  1,\n]\n";
        let at = |needle: &str| Location::find(text, text.find(needle).unwrap());
        assert_eq!(
            at("lisen"),
            Location {
                line: 3,
                column: 1,
                section: Some("[server]".into()),
                key: Some("server.lisen".into()),
            }
        );
        assert_eq!(at("3").key.as_deref(), Some("topics[0].pattern"));
        assert_eq!(at("{ roles").key.as_deref(), Some("topics[1].subscribe"));
        assert_eq!(at("1,").key.as_deref(), Some("topics[1]"));
        assert_eq!(at("1,").section.as_deref(), Some("[[topics]]"));
        assert_eq!(at("= 1").key.as_deref(), Some("a"));
        assert_eq!(at("= 1").section, None);
        assert_eq!(at("server").key.as_deref(), Some("server"));
        assert_eq!(Location::find(text, 10_000).line, 11);
    }
}
