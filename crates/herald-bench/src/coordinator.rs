//! The coordinator: spawns worker processes (re-executing this binary as
//! `herald-bench worker`), drives them over JSON lines, samples the server and its own workers
//! from `/proc`, and runs the scenarios.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::hist;
use crate::procfs::{self, ProcSample};
use crate::results::{self, MdRow};
use crate::server::{self, HeraldStore, Managed};
use crate::targets::herald::HeraldSpec;
use crate::targets::{AnyPublisher, Publisher, TargetSpec, make_payload, now_ns};
use crate::worker::{TopicMode, WorkerSpec};

/// How to reach the target and how to spread the load (shared by every scenario).
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The server under test.
    #[arg(long, value_enum, default_value_t = TargetKind::Herald)]
    pub target: TargetKind,
    /// Start this server binary with a generated config (herald: `target/release/herald`,
    /// memory store, known secret; nats: `nats-server`, WebSocket listener on free ports;
    /// node-ws, socketio: the `node` that runs `bench/peers/<peer>/server.js`, default `node`;
    /// sockudo: the `sockudo` binary, default on the PATH or /work/cache/sockudo/bin/sockudo;
    /// rabbitmq-stomp: the `rabbitmq-server` script, default /usr/lib/rabbitmq/bin/rabbitmq-server;
    /// herald-stomp: the herald binary, as herald).
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub server_bin: Option<PathBuf>,
    /// Attach to a running Herald at this base URL (http://127.0.0.1:8080) instead.
    #[arg(long, requires_all = ["secret", "api_key", "pid"])]
    pub url: Option<String>,
    /// Its HS256 JWT secret (attach mode).
    #[arg(long, env = "HERALD_BENCH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Its publishing API key (attach mode).
    #[arg(long, env = "HERALD_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Its process id, for RSS and CPU (attach mode).
    #[arg(long)]
    pub pid: Option<u32>,
    /// At most this many connections per worker process (open-files limit 20 000).
    #[arg(long, default_value_t = 15_000)]
    pub per_worker: usize,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Connections per loopback source address (127.0.0.1, then .2, …); 0 = one address.
    #[arg(long, default_value_t = 25_000)]
    pub per_source_ip: usize,
    /// Tokio worker threads per worker process (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// Where result files go.
    #[arg(long, default_value = "bench/results")]
    pub results_dir: PathBuf,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Herald,
    Nats,
    /// The hand-written Node `ws` broadcast server (bench/peers/node-ws).
    NodeWs,
    /// Socket.IO 4.8 (bench/peers/socketio).
    #[value(name = "socketio")]
    SocketIo,
    /// Sockudo, Pusher protocol (bench/peers/sockudo).
    Sockudo,
    /// RabbitMQ Web-STOMP: a node of the bench's own (bench/peers/rabbitmq-web-stomp).
    #[value(name = "rabbitmq-stomp")]
    RabbitStomp,
    /// Herald through its STOMP endpoint (`/stomp`), with the rabbitmq-stomp client.
    #[value(name = "herald-stomp")]
    HeraldStomp,
}

/// The server under test, started or attached.
pub struct Server {
    pub target: TargetSpec,
    pub pid: u32,
    managed: Option<Managed>,
    /// The binary started (path, size, modification time): `git describe` names the checkout,
    /// not necessarily what the binary was built from.
    bin: Value,
    /// The `store.url` a started Herald was given (password-free bench URLs only).
    pub store_url: Option<String>,
}

fn bin_info(path: &std::path::Path) -> Value {
    // A bare name (`node`, `nats-server`) is the one found on the PATH.
    let resolved = (path.components().count() == 1)
        .then(|| std::env::var_os("PATH"))
        .flatten()
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(path))
                .find(|b| b.is_file())
        });
    let path = resolved.as_deref().unwrap_or(path);
    let meta = std::fs::metadata(path).ok();
    json!({
        "path": path.display().to_string(),
        "bytes": meta.as_ref().map(|m| m.len()),
        "modified": meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| results::utc_timestamp(d.as_secs())),
    })
}

impl Server {
    pub async fn open(c: &Common) -> anyhow::Result<Self> {
        Self::open_with_store(c, &HeraldStore::Memory).await
    }

    /// As [`Self::open`]; a started Herald keeps durable inboxes in `store`.
    pub async fn open_with_store(c: &Common, store: &HeraldStore) -> anyhow::Result<Self> {
        let peer_bin = |default: PathBuf| c.server_bin.clone().unwrap_or(default);
        let (managed, target, bin) = match c.target {
            TargetKind::Herald => return Self::open_herald(c, store).await,
            TargetKind::HeraldStomp => {
                let mut s = Self::open_herald(c, store).await?;
                if let TargetSpec::Herald(h) = &s.target {
                    s.target = TargetSpec::HeraldStomp(h.clone());
                }
                return Ok(s);
            }
            TargetKind::RabbitStomp => {
                let bin = peer_bin(server::DEFAULT_RABBITMQ_SERVER.into());
                let (m, spec) = server::start_rabbitmq(&bin).await?;
                (m, TargetSpec::RabbitStomp(spec), bin)
            }
            TargetKind::Nats => {
                let bin = peer_bin("nats-server".into());
                let (m, spec) = server::start_nats(&bin).await?;
                (m, TargetSpec::Nats(spec), bin)
            }
            TargetKind::NodeWs => {
                let bin = peer_bin("node".into());
                let (m, spec) = server::start_node_ws(&bin).await?;
                (m, TargetSpec::NodeWs(spec), bin)
            }
            TargetKind::SocketIo => {
                let bin = peer_bin("node".into());
                let (m, spec) = server::start_socketio(&bin).await?;
                (m, TargetSpec::SocketIo(spec), bin)
            }
            TargetKind::Sockudo => {
                let bin = peer_bin(server::default_sockudo_bin());
                let (m, spec) = server::start_sockudo(&bin).await?;
                (m, TargetSpec::Sockudo(spec), bin)
            }
        };
        let mut info = bin_info(&bin);
        let peer = match c.target {
            TargetKind::NodeWs => Some("node-ws"),
            TargetKind::SocketIo => Some("socketio"),
            _ => None,
        };
        if let Some(dir) = peer.and_then(|p| server::peer_dir(p).ok()) {
            // The pinned packages the script runs on (package.json; exact versions).
            let deps = std::fs::read_to_string(dir.join("package.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .map(|v| v["dependencies"].clone());
            info["script"] = json!(dir.join("server.js").display().to_string());
            info["packages"] = json!(deps);
        }
        Ok(Self {
            target,
            pid: managed.pid,
            managed: Some(managed),
            bin: info,
            store_url: None,
        })
    }

    async fn open_herald(c: &Common, store: &HeraldStore) -> anyhow::Result<Self> {
        if let Some(bin) = &c.server_bin {
            let (managed, spec, store_url) = server::start_herald(bin, store).await?;
            return Ok(Self {
                target: TargetSpec::Herald(spec),
                pid: managed.pid,
                managed: Some(managed),
                bin: bin_info(bin),
                store_url: Some(store_url),
            });
        }
        let (Some(url), Some(secret), Some(api_key), Some(pid)) =
            (&c.url, &c.secret, &c.api_key, c.pid)
        else {
            bail!("give --server-bin, or --url with --secret, --api-key and --pid");
        };
        let url = url.trim_end_matches('/').to_owned();
        Ok(Self {
            target: TargetSpec::Herald(HeraldSpec {
                ws_url: format!("{}/ws", url.replacen("http://", "ws://", 1)),
                http_url: url,
                secret: secret.clone(),
                api_key: api_key.clone(),
            }),
            pid,
            managed: None,
            bin: json!({"attached_pid": pid}),
            store_url: None,
        })
    }

    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        procfs::sample(self.pid).with_context(|| format!("server pid {} is gone", self.pid))
    }

    pub fn mode(&self) -> &'static str {
        if self.managed.is_some() {
            "started"
        } else {
            "attached"
        }
    }

    pub async fn stop(self) {
        if let Some(m) = self.managed {
            m.stop().await;
        }
    }
}

struct WorkerProc {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn expect(&mut self, event: &str) -> anyhow::Result<Value> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(180), self.lines.next_line())
                .await
                .with_context(|| format!("worker {} silent for 180 s", self.pid))??
                .with_context(|| format!("worker {} exited", self.pid))?;
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("worker {} wrote {line}", self.pid))?;
            if v["event"] == event {
                return Ok(v);
            }
        }
    }

    async fn command(&mut self, cmd: &str, event: &str) -> anyhow::Result<Value> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.expect(event).await
    }
}

/// The worker processes of one run.
pub struct Workers {
    procs: Vec<WorkerProc>,
    pub ready: Value,
}

impl Workers {
    /// Spawns enough workers for `n` connections and waits until every connection is open
    /// (or has failed). With `ack`, workers acknowledge durable messages as they arrive.
    pub async fn start(
        c: &Common,
        target: &TargetSpec,
        n: usize,
        topic: TopicMode,
        ack: bool,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let per = c.per_worker.max(1);
        let count = n.div_ceil(per).max(1);
        let mut procs = Vec::new();
        for w in 0..count {
            let first = w * n / count;
            let spec = WorkerSpec {
                target: target.clone(),
                first,
                count: (w + 1) * n / count - first,
                topic: topic.clone(),
                per_source_ip: c.per_source_ip,
                concurrency: c.connect_concurrency,
                ack,
            };
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .arg("--threads")
                .arg(c.worker_threads.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker")?;
            procs.push(WorkerProc {
                pid: child.id().context("worker exited at once")?,
                stdin: child.stdin.take().context("worker stdin")?,
                lines: BufReader::new(child.stdout.take().context("worker stdout")?).lines(),
                child,
            });
        }
        let (mut open, mut failed, mut secs, mut errors) = (0, 0, 0f64, Vec::new());
        for p in &mut procs {
            let r = p.expect("ready").await?;
            open += r["open"].as_u64().unwrap_or(0);
            failed += r["failed"].as_u64().unwrap_or(0);
            secs = secs.max(r["secs"].as_f64().unwrap_or(0.0));
            if let Some(e) = r["first_error"].as_str() {
                errors.push(e.to_owned());
            }
        }
        let ready = json!({
            "workers": count,
            "open": open,
            "failed": failed,
            "connect_secs": secs,
            "errors": errors,
        });
        eprintln!("workers ready: {ready}");
        Ok(Self { procs, ready })
    }

    pub fn open(&self) -> u64 {
        self.ready["open"].as_u64().unwrap_or(0)
    }

    async fn all(&mut self, cmd: &str, event: &str) -> anyhow::Result<Vec<Value>> {
        // Commands go to every worker first, then answers are read: workers work in parallel.
        for p in &mut self.procs {
            p.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
            p.stdin.flush().await?;
        }
        let mut out = Vec::new();
        for p in &mut self.procs {
            out.push(p.expect(event).await?);
        }
        Ok(out)
    }

    pub async fn reset(&mut self) -> anyhow::Result<()> {
        self.all("reset", "reset").await.map(drop)
    }

    /// (delivered, open connections) summed over workers.
    pub async fn count(&mut self) -> anyhow::Result<(u64, u64)> {
        let c = self.counts().await?;
        Ok((c.delivered, c.open))
    }

    /// Every counter, summed over workers (times: the latest).
    pub async fn counts(&mut self) -> anyhow::Result<Counts> {
        Ok(Counts::of(&self.all("count", "count").await?))
    }

    /// Deliveries, untimed deliveries, open connections and the merged latency histogram.
    pub async fn report(&mut self) -> anyhow::Result<(u64, u64, u64, Histogram<u64>)> {
        let r = self.report_all().await?;
        Ok((r.counts.delivered, r.counts.untimed, r.counts.open, r.hist))
    }

    /// Every counter and both merged histograms (deliveries; ack round trips).
    pub async fn report_all(&mut self) -> anyhow::Result<Report> {
        let v = self.all("report", "report").await?;
        let (mut h, mut ack) = (hist::new_histogram(), hist::new_histogram());
        for r in &v {
            let pairs: Vec<(u64, u64)> = serde_json::from_value(r["hist"].clone())?;
            hist::merge_pairs(&mut h, &pairs);
            let pairs: Vec<(u64, u64)> =
                serde_json::from_value(r["ack_hist"].clone()).unwrap_or_default();
            hist::merge_pairs(&mut ack, &pairs);
        }
        Ok(Report {
            counts: Counts::of(&v),
            hist: h,
            ack_hist: ack,
        })
    }

    /// CPU seconds used so far by the worker processes (the load generator's own cost).
    pub fn cpu_secs(&self) -> f64 {
        self.procs
            .iter()
            .filter_map(|p| procfs::sample(p.pid))
            .map(|s| s.cpu_secs)
            .sum()
    }

    pub async fn quit(mut self) {
        for p in &mut self.procs {
            let _ = p.command("quit", "never").await;
        }
        for p in &mut self.procs {
            let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
        }
    }
}

fn sum(v: &[Value], key: &str) -> u64 {
    v.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum()
}

fn max(v: &[Value], key: &str) -> u64 {
    v.iter()
        .map(|r| r[key].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
}

/// The workers' counters (`count` / `report` answers), summed; times are the latest of any
/// worker, in ns since the epoch (0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub open: u64,
    pub delivered: u64,
    pub untimed: u64,
    pub duplicates: u64,
    pub acks_sent: u64,
    pub acks_confirmed: u64,
    pub ack_errors: u64,
    pub last_delivery_ns: u64,
    pub last_ack_ns: u64,
    pub last_ack_reply_ns: u64,
}

impl Counts {
    fn of(v: &[Value]) -> Self {
        Self {
            open: sum(v, "open"),
            delivered: sum(v, "delivered"),
            untimed: sum(v, "untimed"),
            duplicates: sum(v, "duplicates"),
            acks_sent: sum(v, "acks_sent"),
            acks_confirmed: sum(v, "acks_confirmed"),
            ack_errors: sum(v, "ack_errors"),
            last_delivery_ns: max(v, "last_delivery_ns"),
            last_ack_ns: max(v, "last_ack_ns"),
            last_ack_reply_ns: max(v, "last_ack_reply_ns"),
        }
    }
}

/// A `report`: the counters and the merged histograms.
pub struct Report {
    pub counts: Counts,
    pub hist: Histogram<u64>,
    pub ack_hist: Histogram<u64>,
}

/// A figure for a markdown cell: whole numbers without `.0`, strings without quotes, `-` for
/// a figure that does not apply (null).
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// `git describe --always --dirty` of the checkout the bench runs in (best effort).
fn git_describe() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The common header of every result object.
pub(crate) fn run_record(
    scenario: &str,
    target: &str,
    server: &Server,
    params: Value,
    figures: Value,
) -> Value {
    let now = results::now_unix();
    json!({
        "scenario": scenario,
        "target": target,
        "server": server.mode(),
        "server_bin": server.bin,
        "date": results::utc_timestamp(now),
        "command": std::env::args().collect::<Vec<_>>(),
        "git": git_describe(),
        "machine": procfs::machine(),
        "params": params,
        "figures": figures,
    })
}

pub(crate) fn save(
    c: &Common,
    scenario: &str,
    run: &Value,
    columns: &[&str],
    row: Vec<String>,
) -> anyhow::Result<()> {
    let date = results::utc_date(results::now_unix());
    let (j, m) = results::append(
        &c.results_dir,
        scenario,
        &date,
        run,
        &MdRow { columns, row },
    )?;
    println!("{}", serde_json::to_string(&run["figures"])?);
    eprintln!("wrote {} and {}", j.display(), m.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// S1 idle
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Wait after the last connection before measuring RSS.
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// Window over which idle CPU is measured (heartbeats every 25 s by default).
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
}

pub async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let server = Server::open(&a.common).await?;
    let target = server.target.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.sample()?;
    let mut workers = Workers::start(
        &a.common,
        &target,
        a.connections,
        TopicMode::PerConnection("room/idle-".into()),
        false,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let after = server.sample()?;
    let client_cpu0 = workers.cpu_secs();
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let end = server.sample()?;
    let client_cpu = workers.cpu_secs() - client_cpu0;
    let (_, still_open) = workers.count().await?;
    let open = workers.open();
    let per_conn = (after.rss_kib as f64 - before.rss_kib as f64) / open.max(1) as f64;
    let idle_cpu = end.cpu_secs - after.cpu_secs;
    let figures = json!({
        "connections_open": open,
        "connections_failed": workers.ready["failed"],
        "still_open_after_idle": still_open,
        "connect_secs": workers.ready["connect_secs"],
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
        "rss_end_kib": end.rss_kib,
        "hwm_after_kib": after.hwm_kib,
        "rss_per_connection_kib": round(per_conn, 2),
        "idle_window_secs": a.idle_secs,
        "idle_server_cpu_secs": round(idle_cpu, 3),
        "idle_server_cpu_percent": round(idle_cpu / a.idle_secs as f64 * 100.0, 3),
        "idle_client_cpu_secs": round(client_cpu, 3),
        "errors": workers.ready["errors"],
    });
    let params = json!({
        "connections": a.connections,
        "workers": workers.ready["workers"],
        "per_worker": a.common.per_worker,
        "connect_concurrency": a.common.connect_concurrency,
        "settle_secs": a.settle_secs,
        "topic": "room/idle-<n> (one each)",
    });
    let run = run_record("s1-idle", target.name(), &server, params, figures);
    save(
        &a.common,
        "s1-idle",
        &run,
        &[
            "time (UTC)",
            "target",
            "connections",
            "workers",
            "open",
            "failed",
            "connect s",
            "RSS before KiB",
            "RSS after KiB",
            "KiB/conn",
            "idle CPU %",
            "window s",
        ],
        vec![
            run["date"].as_str().unwrap_or("").to_owned(),
            target.name().to_owned(),
            a.connections.to_string(),
            workers.ready["workers"].to_string(),
            open.to_string(),
            workers.ready["failed"].to_string(),
            format!(
                "{:.2}",
                workers.ready["connect_secs"].as_f64().unwrap_or(0.0)
            ),
            before.rss_kib.to_string(),
            after.rss_kib.to_string(),
            format!("{per_conn:.2}"),
            format!("{:.2}", idle_cpu / a.idle_secs as f64 * 100.0),
            a.idle_secs.to_string(),
        ],
    )?;
    workers.quit().await;
    server.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// S2 connect
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
}

pub async fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    let server = Server::open(&a.common).await?;
    let target = server.target.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = server.sample()?.cpu_secs;
    let t0 = Instant::now();
    let workers = Workers::start(&a.common, &target, a.connections, TopicMode::None, false).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = server.sample()?.cpu_secs - cpu0;
    let open = workers.open();
    // Worker start-up (exec, token minting) is inside `wall`; `connect_secs` is the slowest
    // worker's own clock from its first handshake to its last welcome.
    let secs = workers.ready["connect_secs"].as_f64().unwrap_or(wall);
    let figures = json!({
        "connections_open": open,
        "connections_failed": workers.ready["failed"],
        "connect_secs": round(secs, 3),
        "connections_per_sec": round(open as f64 / secs.max(1e-9), 1),
        "wall_secs_including_worker_start": round(wall, 3),
        "server_cpu_secs": round(cpu, 3),
        "server_cpu_ms_per_connection": round(cpu * 1000.0 / open.max(1) as f64, 4),
        "errors": workers.ready["errors"],
    });
    let params = json!({
        "connections": a.connections,
        "workers": workers.ready["workers"],
        "connect_concurrency": a.common.connect_concurrency,
        "auth": target.connect_path(),
    });
    let run = run_record("s2-connect", target.name(), &server, params, figures);
    save(
        &a.common,
        "s2-connect",
        &run,
        &[
            "time (UTC)",
            "target",
            "connections",
            "workers",
            "concurrency",
            "open",
            "failed",
            "secs",
            "conn/s",
            "server CPU ms/conn",
        ],
        vec![
            run["date"].as_str().unwrap_or("").to_owned(),
            target.name().to_owned(),
            a.connections.to_string(),
            workers.ready["workers"].to_string(),
            a.common.connect_concurrency.to_string(),
            open.to_string(),
            workers.ready["failed"].to_string(),
            format!("{secs:.3}"),
            format!("{:.0}", open as f64 / secs.max(1e-9)),
            format!("{:.4}", cpu * 1000.0 / open.max(1) as f64),
        ],
    )?;
    workers.quit().await;
    server.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// S3 fanout and S4 latency: one publishing phase, measured the same way
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    /// Publish rates to run one after the other, messages per second (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub rates: Vec<f64>,
    /// Publishing time per rate.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    #[arg(long, default_value = "room/bench")]
    pub topic: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    /// Publish rate, messages per second (deliveries/s = rate × subscribers).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Measured publishing time (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Publishing before measuring (not recorded).
    #[arg(long, default_value_t = 3)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    #[arg(long, default_value = "room/bench")]
    pub topic: String,
}

/// What one publishing phase measured.
struct Phase {
    offered_rate: f64,
    published: u64,
    publish_errors: u64,
    first_error: Option<String>,
    publish_secs: f64,
    expected: u64,
    delivered: u64,
    untimed: u64,
    open_after: u64,
    /// From the first publish to the last delivery seen (100 ms resolution).
    window_secs: f64,
    server_cpu_secs: f64,
    client_cpu_secs: f64,
    rss_end_kib: u64,
    hist: Histogram<u64>,
}

/// Publishes `rate` messages/s for `secs`: each message is due at `start + i / rate`; all due
/// messages go out together (one batch request when several are due).
async fn publish_paced<P: Publisher>(
    p: &mut P,
    topic: &str,
    rate: f64,
    secs: u64,
    size: usize,
) -> (u64, u64, Option<String>, f64) {
    let total = (rate * secs as f64).round() as u64;
    let start = Instant::now();
    let (mut sent, mut ok, mut errors, mut first_error) = (0u64, 0u64, 0u64, None);
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        if due > sent {
            let payloads: Vec<String> = (sent..due).map(|_| make_payload(now_ns(), size)).collect();
            match p.publish(topic, &payloads).await {
                Ok(n) => {
                    ok += n as u64;
                    errors += payloads.len() as u64 - n as u64;
                }
                Err(e) => {
                    errors += payloads.len() as u64;
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
            sent = due;
        }
        let next = start + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(next.into()).await;
    }
    (ok, errors, first_error, start.elapsed().as_secs_f64())
}

async fn phase(
    server: &Server,
    workers: &mut Workers,
    topic: &str,
    rate: f64,
    secs: u64,
    size: usize,
) -> anyhow::Result<Phase> {
    let mut publisher = AnyPublisher::connect(&server.target).await?;
    let subscribers = workers.open();
    workers.reset().await?;
    let s0 = server.sample()?;
    let c0 = workers.cpu_secs();
    let t0 = Instant::now();
    let (published, publish_errors, first_error, publish_secs) =
        publish_paced(&mut publisher, topic, rate, secs, size).await;
    let expected = published * subscribers;
    // Drain: poll until everything arrived or nothing moved for 2 s (at most 20 s).
    let (mut last, mut last_change, mut s_last, mut c_last) =
        (0u64, t0.elapsed(), server.sample()?, workers.cpu_secs());
    let drain_start = Instant::now();
    loop {
        let (delivered, _) = workers.count().await?;
        if delivered != last {
            last = delivered;
            last_change = t0.elapsed();
            s_last = server.sample()?;
            c_last = workers.cpu_secs();
        }
        if delivered >= expected
            || t0.elapsed() - last_change > Duration::from_secs(2)
            || drain_start.elapsed() > Duration::from_secs(20)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (delivered, untimed, open_after, hist) = workers.report().await?;
    Ok(Phase {
        offered_rate: rate,
        published,
        publish_errors,
        first_error,
        publish_secs,
        expected,
        delivered,
        untimed,
        open_after,
        window_secs: last_change.as_secs_f64().max(publish_secs),
        server_cpu_secs: s_last.cpu_secs - s0.cpu_secs,
        client_cpu_secs: c_last - c0,
        rss_end_kib: s_last.rss_kib,
        hist,
    })
}

impl Phase {
    fn figures(&self) -> Value {
        let lat = hist::summarize(&self.hist);
        json!({
            "offered_rate": self.offered_rate,
            "published": self.published,
            "publish_errors": self.publish_errors,
            "publish_first_error": self.first_error,
            "publish_secs": round(self.publish_secs, 3),
            "achieved_publish_rate": round(self.published as f64 / self.publish_secs, 1),
            "expected_deliveries": self.expected,
            "delivered": self.delivered,
            "drops": self.expected as i64 - self.delivered as i64,
            "untimed_deliveries": self.untimed,
            "subscribers_open_after": self.open_after,
            "window_secs": round(self.window_secs, 3),
            "deliveries_per_sec": round(self.delivered as f64 / self.window_secs, 0),
            "server_cpu_secs": round(self.server_cpu_secs, 3),
            "server_cpu_percent": round(self.server_cpu_secs / self.window_secs * 100.0, 1),
            "deliveries_per_server_cpu_sec": round(self.delivered as f64 / self.server_cpu_secs.max(1e-9), 0),
            "client_cpu_secs": round(self.client_cpu_secs, 3),
            "server_rss_end_kib": self.rss_end_kib,
            "latency": lat,
        })
    }
}

pub async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let server = Server::open(&a.common).await?;
    let target = server.target.clone();
    let mut workers = Workers::start(
        &a.common,
        &target,
        a.subscribers,
        TopicMode::Shared(a.topic.clone()),
        false,
    )
    .await?;
    for &rate in &a.rates {
        let p = phase(
            &server,
            &mut workers,
            &a.topic,
            rate,
            a.duration_secs,
            a.payload_bytes,
        )
        .await?;
        let f = p.figures();
        let params = json!({
            "subscribers": a.subscribers,
            "subscribers_open": workers.open(),
            "workers": workers.ready["workers"],
            "rate": rate,
            "duration_secs": a.duration_secs,
            "payload_bytes": a.payload_bytes,
            "topic": a.topic,
            "publish": target.publish_path(),
        });
        let run = run_record("s3-fanout", target.name(), &server, params, f.clone());
        save(
            &a.common,
            "s3-fanout",
            &run,
            &[
                "time (UTC)",
                "target",
                "subscribers",
                "rate offered",
                "published",
                "delivered",
                "drops",
                "deliveries/s",
                "server CPU %",
                "deliveries/server CPU-s",
                "client CPU s",
                "p50 ms",
                "p99 ms",
            ],
            vec![
                run["date"].as_str().unwrap_or("").to_owned(),
                target.name().to_owned(),
                workers.open().to_string(),
                rate.to_string(),
                p.published.to_string(),
                p.delivered.to_string(),
                f["drops"].to_string(),
                f["deliveries_per_sec"].to_string(),
                f["server_cpu_percent"].to_string(),
                f["deliveries_per_server_cpu_sec"].to_string(),
                f["client_cpu_secs"].to_string(),
                f["latency"]["p50_ms"].to_string(),
                f["latency"]["p99_ms"].to_string(),
            ],
        )?;
    }
    workers.quit().await;
    server.stop().await;
    Ok(())
}

pub async fn latency(a: LatencyArgs) -> anyhow::Result<()> {
    let server = Server::open(&a.common).await?;
    let target = server.target.clone();
    let mut workers = Workers::start(
        &a.common,
        &target,
        a.subscribers,
        TopicMode::Shared(a.topic.clone()),
        false,
    )
    .await?;
    if a.warmup_secs > 0 {
        phase(
            &server,
            &mut workers,
            &a.topic,
            a.rate,
            a.warmup_secs,
            a.payload_bytes,
        )
        .await?;
    }
    let p = phase(
        &server,
        &mut workers,
        &a.topic,
        a.rate,
        a.duration_secs,
        a.payload_bytes,
    )
    .await?;
    let f = p.figures();
    let params = json!({
        "subscribers": a.subscribers,
        "subscribers_open": workers.open(),
        "workers": workers.ready["workers"],
        "rate": a.rate,
        "target_deliveries_per_sec": a.rate * workers.open() as f64,
        "duration_secs": a.duration_secs,
        "warmup_secs": a.warmup_secs,
        "payload_bytes": a.payload_bytes,
        "topic": a.topic,
        "publish": target.publish_path(),
        "clock": "send time = SystemTime ns written into the payload just before the HTTP request; receive time = SystemTime when the worker reads the frame",
    });
    let run = run_record("s4-latency", target.name(), &server, params, f.clone());
    let l = &f["latency"];
    save(
        &a.common,
        "s4-latency",
        &run,
        &[
            "time (UTC)",
            "target",
            "subscribers",
            "rate",
            "deliveries/s",
            "drops",
            "server CPU %",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "samples",
        ],
        vec![
            run["date"].as_str().unwrap_or("").to_owned(),
            target.name().to_owned(),
            workers.open().to_string(),
            a.rate.to_string(),
            f["deliveries_per_sec"].to_string(),
            f["drops"].to_string(),
            f["server_cpu_percent"].to_string(),
            l["p50_ms"].to_string(),
            l["p90_ms"].to_string(),
            l["p99_ms"].to_string(),
            l["p999_ms"].to_string(),
            l["max_ms"].to_string(),
            l["count"].to_string(),
        ],
    )?;
    workers.quit().await;
    server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_cells() {
        assert_eq!(cell(&json!(319028.0)), "319028");
        assert_eq!(cell(&json!(2.626)), "2.626");
        assert_eq!(cell(&json!(12)), "12");
        assert_eq!(cell(&json!(-3)), "-3");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&Value::Null), "-");
    }
}
