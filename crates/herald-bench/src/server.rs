//! Starting a server under test (Herald: `herald serve --config <generated file>`) or
//! attaching to a running one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::targets::herald::HeraldSpec;
use crate::targets::nats::NatsSpec;

/// The JWT secret and API key of a Herald the bench starts itself.
pub const BENCH_SECRET: &str = "herald-bench-jwt-secret-0123456789abcdef0123456789";
pub const BENCH_API_KEY: &str = "herald-bench-api-key-0123456789abcdef";

/// The config of a bench-started Herald: memory store, limits raised so that only the
/// server's own costs are measured (`send_queue` and heartbeats stay at their defaults).
pub fn herald_config() -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[auth]
jwt_secret = "{BENCH_SECRET}"

[[auth.api_keys]]
key = "{BENCH_API_KEY}"
scopes = ["publish"]
name = "herald-bench"

[store]
url = "memory"

[limits]
subscribes_per_second = 100000
ingest_per_second = 10000000

[log]
level = "warn"
"#
    )
}

/// A server process the bench started; stopped (SIGTERM, then SIGKILL) by [`Self::stop`] or
/// killed on drop.
pub struct Managed {
    child: Child,
    pub pid: u32,
    dir: PathBuf,
}

impl Managed {
    pub async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `bin serve` with [`herald_config`] and waits for its `listening on http://…` line.
pub async fn start_herald(bin: &Path) -> anyhow::Result<(Managed, HeraldSpec)> {
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("herald.toml");
    std::fs::write(&config, herald_config())?;
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
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("the server printed nothing within 20 s")??
        .context("the server exited before listening")?;
    let Some(http_url) = first.strip_prefix("listening on ") else {
        bail!("unexpected first line from the server: {first}");
    };
    let http_url = http_url.trim().to_owned();
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let spec = HeraldSpec {
        ws_url: format!("{}/ws", http_url.replacen("http://", "ws://", 1)),
        http_url,
        secret: BENCH_SECRET.to_owned(),
        api_key: BENCH_API_KEY.to_owned(),
    };
    Ok((Managed { child, pid, dir }, spec))
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
    let managed = Managed { child, pid, dir };
    for addr in [format!("127.0.0.1:{port}"), format!("127.0.0.1:{ws_port}")] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("nats-server did not listen on {addr} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok((
        managed,
        NatsSpec {
            ws_url: format!("ws://127.0.0.1:{ws_port}"),
            tcp_addr: format!("127.0.0.1:{port}"),
        },
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_is_valid_toml_with_the_known_credentials() {
        let text = super::herald_config();
        let v: toml_like::Doc = toml_like::parse(&text);
        assert!(v.has("jwt_secret"));
        assert!(v.has("ingest_per_second"));
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
