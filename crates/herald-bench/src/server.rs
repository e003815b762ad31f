//! Starting a server under test (Herald: `herald serve --config <generated file>`; the peers of
//! PEERS.md: nats-server, the Node servers of `bench/peers/`, Sockudo) on free loopback ports,
//! or attaching to a running Herald. The pid recorded is the server process itself (for the
//! Node peers, the `node` process), so `/proc` RSS and CPU are the server's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::targets::herald::HeraldSpec;
use crate::targets::nats::NatsSpec;
use crate::targets::node_ws::NodeWsSpec;
use crate::targets::rabbitmq_stomp::RabbitStompSpec;
use crate::targets::socketio::SocketIoSpec;
use crate::targets::sockudo::SockudoSpec;

/// The JWT secret and API key of a Herald the bench starts itself.
pub const BENCH_SECRET: &str = "herald-bench-jwt-secret-0123456789abcdef0123456789";
pub const BENCH_API_KEY: &str = "herald-bench-api-key-0123456789abcdef";

/// Where a bench-started Herald keeps durable inboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeraldStore {
    /// `store.url = "memory"` (S1–S5: nothing durable is published).
    Memory,
    /// A fresh SQLite file in the server's scratch directory (removed when it stops).
    SqliteScratch,
    /// Any `store.url` (e.g. PostgreSQL with `?options=-csearch_path%3D<schema>`).
    Url(String),
}

impl HeraldStore {
    /// The `store.url` for a server whose scratch directory is `dir`.
    pub fn url(&self, dir: &Path) -> String {
        match self {
            Self::Memory => "memory".to_owned(),
            Self::SqliteScratch => format!("sqlite://{}", dir.join("herald.db").display()),
            Self::Url(u) => u.clone(),
        }
    }
}

/// The config of a bench-started Herald: limits raised so that only the server's own costs are
/// measured (`send_queue` and heartbeats stay at their defaults); the API key has the `admin`
/// scope too (S6 reads inboxes back). The topic rules are Herald's defaults (CONFIGURATION.md
/// "Default rules": configuring any rule replaces them) plus `device/*/telemetry` for S5,
/// with no `retain` or `history`, so a topic nobody watches keeps nothing.
pub fn herald_config(store_url: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[auth]
jwt_secret = "{BENCH_SECRET}"

[[auth.api_keys]]
key = "{BENCH_API_KEY}"
scopes = ["publish", "admin"]
name = "herald-bench"

[store]
url = "{store_url}"

[limits]
subscribes_per_second = 100000
ingest_per_second = 10000000

[log]
level = "warn"

[[topics]]
pattern = "user/{{sub}}/**"
subscribe = "allow"

[[topics]]
pattern = "broadcast"
subscribe = "allow"

[[topics]]
pattern = "global/**"
subscribe = "allow"

[[topics]]
pattern = "org/{{org_id}}/**"
subscribe = "allow"

[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"

[[topics]]
pattern = "device/*/telemetry"
subscribe = "allow"
"#
    )
}

/// A server process the bench started; stopped (SIGTERM, then SIGKILL) by [`Self::stop`] or
/// killed on drop.
pub struct Managed {
    child: Child,
    pub pid: u32,
    dir: PathBuf,
    /// The child leads its own process group (RabbitMQ: the VM and its helpers), killed
    /// whole if SIGTERM does not end it.
    group: bool,
}

impl Managed {
    fn new(child: Child, pid: u32, dir: PathBuf) -> Self {
        Self {
            child,
            pid,
            dir,
            group: false,
        }
    }

    pub async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        let grace = Duration::from_secs(if self.group { 30 } else { 10 });
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            if self.group {
                // SAFETY: kill(2) on the process group our child leads.
                unsafe {
                    libc::kill(-(self.pid as i32), libc::SIGKILL);
                }
            }
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for the child's first stdout line `listening on http://…` (20 s at most) and returns
/// the URL; its stdout is drained afterwards so it never blocks on a full pipe.
async fn listening_url(child: &mut Child, what: &str) -> anyhow::Result<String> {
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .with_context(|| format!("{what} printed nothing within 20 s"))??
        .with_context(|| format!("{what} exited before listening"))?;
    let Some(http_url) = first.strip_prefix("listening on ") else {
        bail!("unexpected first line from {what}: {first}");
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(http_url.trim().trim_end_matches('/').to_owned())
}

/// A fresh scratch directory for one started server (removed by [`Managed::stop`]).
fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts `bin serve` with [`herald_config`] and waits for its `listening on http://…` line.
/// Returns the `store.url` it was given too.
pub async fn start_herald(
    bin: &Path,
    store: &HeraldStore,
) -> anyhow::Result<(Managed, HeraldSpec, String)> {
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("herald.toml");
    let store_url = store.url(&dir);
    std::fs::write(&config, herald_config(&store_url))?;
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("server exited at once")?;
    let http_url = listening_url(&mut child, "the server").await?;
    let spec = HeraldSpec {
        ws_url: format!("{}/ws", http_url.replacen("http://", "ws://", 1)),
        http_url,
        secret: BENCH_SECRET.to_owned(),
        api_key: BENCH_API_KEY.to_owned(),
    };
    Ok((Managed::new(child, pid, dir), spec, store_url))
}

/// A free loopback port (bound then released: a small race, acceptable on a bench machine).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The PEERS.md NATS config on free ports (a system NATS already holds 4222).
pub fn nats_config(port: u16, ws_port: u16) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nmax_connections: 200000\n\
         websocket {{ host: 127.0.0.1, port: {ws_port}, no_tls: true, compression: false }}\n"
    )
}

/// Starts `bin` (nats-server) with [`nats_config`] and waits until both ports accept.
pub async fn start_nats(bin: &Path) -> anyhow::Result<(Managed, NatsSpec)> {
    let dir = std::env::temp_dir().join(format!("herald-bench-nats-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (port, ws_port) = (free_port()?, free_port()?);
    let config = dir.join("nats.conf");
    std::fs::write(&config, nats_config(port, ws_port))?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("nats-server exited at once")?;
    let mut managed = Managed::new(child, pid, dir);
    for addr in [format!("127.0.0.1:{port}"), format!("127.0.0.1:{ws_port}")] {
        wait_listening(&mut managed, &addr, "nats-server", Duration::from_secs(10)).await?;
    }
    Ok((
        managed,
        NatsSpec {
            ws_url: format!("ws://127.0.0.1:{ws_port}"),
            tcp_addr: format!("127.0.0.1:{port}"),
        },
    ))
}

/// Waits until `addr` accepts TCP connections, failing if the server exits or `limit` passes.
async fn wait_listening(
    m: &mut Managed,
    addr: &str,
    what: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = m.child.try_wait()? {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{what} did not listen on {addr} within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `bench/peers/<name>`: under the working directory (the repository root, where the bench
/// commands run), else in the source tree this binary was built from.
pub fn peer_dir(name: &str) -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from("bench/peers").join(name),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../bench/peers")
            .join(name),
    ];
    candidates
        .iter()
        .find(|d| d.join("server.js").is_file() || d.join("sockudo.env").is_file())
        .cloned()
        .with_context(|| format!("bench/peers/{name} not found (run from the repository root)"))
}

/// Starts `node bench/peers/<name>/server.js` with `PORT=0` (`npm ci` first if its
/// `node_modules` is missing) and waits for its `listening on http://…` line. The pid measured
/// is the node process.
async fn start_node_peer(node: &Path, name: &str) -> anyhow::Result<(Managed, String)> {
    let peer = peer_dir(name)?;
    if !peer.join("node_modules").is_dir() {
        eprintln!("{}: node_modules missing, running npm ci", peer.display());
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&peer)
            .stdin(Stdio::null())
            .status()
            .await
            .context("cannot run npm ci")?;
        if !status.success() {
            bail!("npm ci in {} failed: {status}", peer.display());
        }
    }
    let dir = scratch_dir(name)?;
    let mut child = Command::new(node)
        .arg(peer.join("server.js"))
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("NODE_ENV", "production")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", node.display()))?;
    let pid = child.id().context("node exited at once")?;
    let http_url = listening_url(&mut child, name).await?;
    Ok((Managed::new(child, pid, dir), http_url))
}

/// The Node `ws` broadcast server (`bench/peers/node-ws`).
pub async fn start_node_ws(node: &Path) -> anyhow::Result<(Managed, NodeWsSpec)> {
    let (m, http_url) = start_node_peer(node, "node-ws").await?;
    let spec = NodeWsSpec {
        ws_url: format!("{}/", http_url.replacen("http://", "ws://", 1)),
        http_url,
    };
    Ok((m, spec))
}

/// Socket.IO (`bench/peers/socketio`).
pub async fn start_socketio(node: &Path) -> anyhow::Result<(Managed, SocketIoSpec)> {
    let (m, http_url) = start_node_peer(node, "socketio").await?;
    let spec = SocketIoSpec {
        ws_url: format!(
            "{}/socket.io/?EIO=4&transport=websocket",
            http_url.replacen("http://", "ws://", 1)
        ),
        http_url,
    };
    Ok((m, spec))
}

/// `bench/peers/sockudo/sockudo.env`, built in: `KEY=VALUE` lines, `#` comments.
const SOCKUDO_ENV: &str = include_str!("../../../bench/peers/sockudo/sockudo.env");

/// The `KEY=VALUE` pairs of an env file (blank lines and `#` comments skipped).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Where the Sockudo binary is by default: `sockudo` on the PATH, else where
/// `bench/peers/sockudo/install.sh` puts it.
pub fn default_sockudo_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("sockudo"))
            .find(|b| b.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/work/cache/sockudo/bin/sockudo"))
}

/// Starts `bin` (Sockudo) with `sockudo.env` on free ports (WebSocket/HTTP and metrics), in a
/// scratch directory (it looks for `config/config.toml` in its working directory), and waits
/// until it accepts.
pub async fn start_sockudo(bin: &Path) -> anyhow::Result<(Managed, SockudoSpec)> {
    let dir = scratch_dir("sockudo")?;
    let (port, metrics_port) = (free_port()?, free_port()?);
    let env = parse_env_file(SOCKUDO_ENV);
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("sockudo.env has no {k}"))
    };
    let (app_id, key, secret) = (
        get("SOCKUDO_DEFAULT_APP_ID")?,
        get("SOCKUDO_DEFAULT_APP_KEY")?,
        get("SOCKUDO_DEFAULT_APP_SECRET")?,
    );
    let log = std::fs::File::create(dir.join("sockudo.log"))?;
    let child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PORT", port.to_string())
        .env("METRICS_PORT", metrics_port.to_string())
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (bench/peers/sockudo/install.sh installs it)",
                bin.display()
            )
        })?;
    let pid = child.id().context("sockudo exited at once")?;
    let mut managed = Managed::new(child, pid, dir);
    let addr = format!("127.0.0.1:{port}");
    if let Err(e) = wait_listening(&mut managed, &addr, "sockudo", Duration::from_secs(30)).await {
        let log = std::fs::read_to_string(managed.dir.join("sockudo.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e:#}\n{}", tail.join("\n"));
    }
    let spec = SockudoSpec {
        ws_url: format!("ws://{addr}/app/{key}?protocol=7&client=herald-bench&version=0.1"),
        http_url: format!("http://{addr}"),
        app_id,
        key,
        secret,
    };
    Ok((managed, spec))
}

/// Where Debian's `rabbitmq-server` script is.
pub const DEFAULT_RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The bench node's `rabbitmq.conf`: AMQP, STOMP (TCP, unused but started by the plugin) and
/// Web-STOMP on free loopback ports; no connection cap; Cowboy's WebSocket idle timeout
/// (60 s by default) raised to an hour, as the STOMP clients ask for no heart-beats and S1
/// holds idle connections for minutes.
pub fn rabbitmq_config(amqp_port: u16, stomp_port: u16, web_stomp_port: u16) -> String {
    format!(
        "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
         stomp.listeners.tcp.1 = 127.0.0.1:{stomp_port}\n\
         web_stomp.tcp.ip = 127.0.0.1\n\
         web_stomp.tcp.port = {web_stomp_port}\n\
         web_stomp.tcp.backlog = 4096\n\
         web_stomp.max_connections = infinity\n\
         web_stomp.ws_opts.idle_timeout = 3600000\n\
         loopback_users.guest = true\n\
         log.console = true\n\
         log.console.level = warning\n\
         log.file = false\n"
    )
}

/// Starts a RabbitMQ node of the bench's own (never the machine's shared broker): node name
/// `bench-<pid>-<n>@localhost`, AMQP, Erlang distribution, STOMP and Web-STOMP on free
/// loopback ports, data, logs, plugins file (`[rabbitmq_web_stomp].`, no management) and
/// `$HOME` (so its Erlang cookie) in a scratch directory. `RUNNING_UNDER_SYSTEMD` makes the
/// script `exec` the VM (no signal-forwarding shell in between), so the child's pid is
/// `beam.smp` itself: the pid measured, stopped with SIGTERM (RabbitMQ shuts down cleanly),
/// its process group killed if that takes over 30 s. Waits until the AMQP and Web-STOMP ports
/// accept (90 s at most).
pub async fn start_rabbitmq(bin: &Path) -> anyhow::Result<(Managed, RabbitStompSpec)> {
    let dir = scratch_dir("rabbitmq")?;
    let (port, dist_port, stomp_port, web_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let node = format!(
        "bench-{}-{}@localhost",
        std::process::id(),
        crate::targets::now_ns() % 1_000_000_000
    );
    std::fs::write(
        dir.join("rabbitmq.conf"),
        rabbitmq_config(port, stomp_port, web_port),
    )?;
    std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_web_stomp].\n")?;
    let log = std::fs::File::create(dir.join("server.out"))?;
    let child = Command::new(bin)
        .env("HOME", &dir)
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("pid"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        // Not the system's rabbitmq.conf (it configures the shared broker).
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RUNNING_UNDER_SYSTEMD", "true")
        .env_remove("NOTIFY_SOCKET")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("rabbitmq-server exited at once")?;
    let mut managed = Managed::new(child, pid, dir);
    managed.group = true;
    for addr in [format!("127.0.0.1:{port}"), format!("127.0.0.1:{web_port}")] {
        if let Err(e) =
            wait_listening(&mut managed, &addr, "rabbitmq", Duration::from_secs(90)).await
        {
            let log = std::fs::read_to_string(managed.dir.join("server.out")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e:#}\n{}", tail.join("\n"));
        }
    }
    Ok((
        managed,
        RabbitStompSpec {
            ws_url: format!("ws://127.0.0.1:{web_port}/ws"),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            login: "guest".to_owned(),
            passcode: "guest".to_owned(),
        },
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rabbitmq_config_is_private() {
        let c = super::rabbitmq_config(1, 2, 3);
        assert!(c.contains("listeners.tcp.default = 127.0.0.1:1\n"));
        assert!(c.contains("web_stomp.tcp.ip = 127.0.0.1\nweb_stomp.tcp.port = 3\n"));
        assert!(!c.contains("management"));
    }

    #[test]
    fn sockudo_env_names_the_app_and_raises_the_limits() {
        let env = super::parse_env_file(super::SOCKUDO_ENV);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert!(get("SOCKUDO_DEFAULT_APP_KEY").is_some());
        let max: u64 = get("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(max >= 19_000);
        assert_eq!(get("ADAPTER_DRIVER"), Some("local"));
        assert_eq!(
            super::parse_env_file("# c\n\nA = b\nnot a pair\n"),
            vec![("A".to_owned(), "b".to_owned())]
        );
    }

    #[test]
    fn config_is_valid_toml_with_the_known_credentials() {
        let text = super::herald_config("memory");
        let v: toml_like::Doc = toml_like::parse(&text);
        assert!(v.has("jwt_secret"));
        assert!(v.has("ingest_per_second"));
        assert!(text.contains(r#"url = "memory""#));
        // S5 subscribes to device topics; S1/S3 to rooms; the defaults stay.
        for rule in ["device/*/telemetry", "room/*", "user/{sub}/**", "broadcast"] {
            assert!(text.contains(&format!("pattern = \"{rule}\"")), "{rule}");
        }
        assert!(!text.contains("retain") && !text.contains("history"));
    }

    #[test]
    fn store_urls() {
        use super::HeraldStore;
        let dir = std::path::Path::new("/tmp/x");
        assert_eq!(HeraldStore::Memory.url(dir), "memory");
        assert_eq!(
            HeraldStore::SqliteScratch.url(dir),
            "sqlite:///tmp/x/herald.db"
        );
        assert_eq!(
            HeraldStore::Url("postgres://h/d".into()).url(dir),
            "postgres://h/d"
        );
    }

    /// Tiny check without a toml dependency: every non-empty line is a table header or
    /// `key = value`.
    mod toml_like {
        pub struct Doc(Vec<String>);
        impl Doc {
            pub fn has(&self, key: &str) -> bool {
                self.0.iter().any(|k| k == key)
            }
        }
        pub fn parse(text: &str) -> Doc {
            let mut keys = Vec::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if line.starts_with('[') {
                    assert!(line.ends_with(']'), "{line}");
                } else {
                    let (k, v) = line.split_once(" = ").expect(line);
                    assert!(!v.is_empty());
                    keys.push(k.to_owned());
                }
            }
            Doc(keys)
        }
    }
}
