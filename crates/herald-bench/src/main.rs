//! `herald-bench`: Herald's load generator (PERFORMANCE.md scenarios S1–S6).
//!
//! # Layout
//!
//! - `coordinator` — the scenarios S1–S4: starts (or attaches to) the server, spawns worker
//!   processes, publishes, samples the server from `/proc`, writes the result files.
//! - `many_topics` (S5) and `durable` (S6) — Herald-only scenarios on the same machinery.
//! - `worker` — `herald-bench worker`: a child process holding ≤ 15 000 subscriber
//!   connections, counting deliveries and recording latencies; JSON lines on stdin/stdout.
//! - `targets` — one file per server under test (`Target` for subscribers, `Publisher` for
//!   the coordinator); `herald` today.
//! - `server` — starting Herald with a generated config.
//! - `procfs` — RSS and CPU of a pid, machine facts. `hist` — latency histograms.
//!   `results` — `bench/results/<scenario>-<date>.{json,md}`.
//!
//! Data flow: coordinator ──spawn──▶ workers ──WebSocket──▶ server ◀──HTTP publish──
//! coordinator; workers ──JSON lines (counts, histograms)──▶ coordinator ──▶ result files.

mod coordinator;
mod durable;
mod hist;
mod many_topics;
mod procfs;
mod results;
mod server;
mod targets;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "herald-bench",
    about = "Herald load generator (bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// S1: N idle subscribed connections → server RSS per connection, idle CPU.
    Idle(coordinator::IdleArgs),
    /// S2: open N connections as fast as possible → connections per second.
    Connect(coordinator::ConnectArgs),
    /// S3: S subscribers on one topic, R msgs/s published → deliveries per server CPU-second.
    Fanout(coordinator::FanoutArgs),
    /// S4: as S3 at one fixed rate → publish-to-receive p50/p99/p99.9.
    Latency(coordinator::LatencyArgs),
    /// S5: N connections on their own device topics, batches to M topics (1 % watched) →
    /// publishes per server CPU-second, cost of an unwatched publish.
    ManyTopics(many_topics::ManyTopicsArgs),
    /// S6: U users, inbox messages on a durable store (SQLite/PostgreSQL), acked by the
    /// clients → messages per second end to end, latencies, everything acked in the store.
    Durable(durable::DurableArgs),
    /// Internal: a worker process (started by the coordinator).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Worker { spec, threads } = &cli.cmd {
        return worker::run(spec, *threads);
    }
    // The coordinator publishes and polls; one thread leaves the cores to server and workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Idle(a) => coordinator::idle(a).await,
            Cmd::Connect(a) => coordinator::connect(a).await,
            Cmd::Fanout(a) => coordinator::fanout(a).await,
            Cmd::Latency(a) => coordinator::latency(a).await,
            Cmd::ManyTopics(a) => many_topics::many_topics(a).await,
            Cmd::Durable(a) => durable::durable(a).await,
            Cmd::Worker { .. } => unreachable!("handled above"),
        }
    })
}
