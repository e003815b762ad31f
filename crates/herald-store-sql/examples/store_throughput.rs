//! Durable inserts per second with concurrent callers, each result beside its peer in the
//! same run: the batching writer (`batch_max` 500) against one transaction per insert
//! (`batch_max` 1).
//!
//! ```text
//! cargo run --release -p herald-store-sql --example store_throughput -- [BACKEND…] [--callers N] [--inserts N]
//! ```
//!
//! BACKEND is `sqlite` (a file in a temporary directory), `postgres` (a scratch schema in
//! `postgres://postgres@127.0.0.1:5432/test`, or `HERALD_BENCH_POSTGRES`) or `mysql` (a
//! scratch database on `mysql://root@127.0.0.1:3306`, or `HERALD_BENCH_MYSQL`); default
//! `sqlite postgres`. Scratch schemas and databases are dropped at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_core::message::now_ms;
use herald_core::store::{InboxRecord, InboxStatus, Inserted, Store};
use herald_store_sql::{Options, SqlStore};
use serde_json::value::RawValue;
use sqlx::Connection as _;

struct Args {
    backends: Vec<String>,
    callers: usize,
    inserts: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        backends: Vec::new(),
        callers: 64,
        inserts: 20_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--callers" => a.callers = it.next().context("--callers N")?.parse()?,
            "--inserts" => a.inserts = it.next().context("--inserts N")?.parse()?,
            "sqlite" | "postgres" | "mysql" => a.backends.push(arg),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.backends.is_empty() {
        a.backends = vec!["sqlite".into(), "postgres".into()];
    }
    Ok(a)
}

/// A scratch place for one backend, removed on drop of the returned guard.
enum Scratch {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(String, String),
    My(String, String),
}

impl Scratch {
    async fn new(backend: &str, run: &str) -> anyhow::Result<(String, Scratch)> {
        let name = format!("herald_bench_{}_{run}", std::process::id());
        Ok(match backend {
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}/herald.db", dir.path().display());
                (url, Scratch::Dir(dir))
            }
            "postgres" => {
                let admin = std::env::var("HERALD_BENCH_POSTGRES")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
                exec_pg(&admin, &format!("CREATE SCHEMA {name}")).await?;
                let url = format!("{admin}?options=-csearch_path%3D{name}");
                (url, Scratch::Pg(admin, name))
            }
            "mysql" => {
                let admin = std::env::var("HERALD_BENCH_MYSQL")
                    .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
                exec_my(&admin, &format!("CREATE DATABASE {name}")).await?;
                let url = format!("{admin}/{name}");
                (url, Scratch::My(admin, name))
            }
            other => bail!("unknown backend {other}"),
        })
    }

    async fn remove(self) -> anyhow::Result<()> {
        match self {
            Scratch::Dir(_) => Ok(()),
            Scratch::Pg(admin, name) => {
                exec_pg(&admin, &format!("DROP SCHEMA {name} CASCADE")).await
            }
            Scratch::My(admin, name) => exec_my(&admin, &format!("DROP DATABASE {name}")).await,
        }
    }
}

async fn exec_pg(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sql).execute(&mut c).await?;
    Ok(())
}

async fn exec_my(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut c = sqlx::MySqlConnection::connect(url).await?;
    sqlx::query(sql).execute(&mut c).await?;
    Ok(())
}

fn record(i: usize) -> InboxRecord {
    let at = now_ms();
    InboxRecord {
        id: format!("bench-{i}"),
        user: format!("user-{}", i % 1000),
        topic: format!("user/user-{}", i % 1000),
        event: "notification".into(),
        data: RawValue::from_string(format!(
            r#"{{"title":"Device alarm","content":"terminal {i} reported a fault","level":"warning"}}"#
        ))
        .expect("valid JSON"),
        trace_id: Some(format!("trace-{i}")),
        status: InboxStatus::Pending,
        retry_count: 0,
        created_at: at,
        updated_at: at,
    }
}

struct Measured {
    per_second: f64,
    transactions: u64,
    p50: Duration,
    p99: Duration,
}

async fn measure(
    url: &str,
    batch_max: usize,
    inserts: usize,
    callers: usize,
) -> anyhow::Result<Measured> {
    let store = Arc::new(
        SqlStore::connect(
            url,
            Options {
                batch_max,
                ..Options::default()
            },
        )
        .await?,
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (store, next, total) = (store.clone(), next.clone(), inserts);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                let r = store.insert(record(i)).await?;
                latencies.push(t.elapsed());
                if r != Inserted::New {
                    bail!("bench-{i} was not new");
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(inserts);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let stats = store.write_stats();
    Ok(Measured {
        per_second: inserts as f64 / elapsed.as_secs_f64(),
        transactions: stats.transactions,
        p50: at(0.5),
        p99: at(0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    println!(
        "durable inserts, {} concurrent callers, {} cores",
        a.callers,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<10} {:>9} {:>8} {:>11} {:>13} {:>10} {:>10}",
        "backend", "batch_max", "inserts", "inserts/s", "transactions", "p50", "p99"
    );
    for backend in &a.backends {
        // One transaction per insert is slow: a tenth of the inserts is enough to measure it.
        for (run, batch_max, inserts) in [
            ("batched", 500, a.inserts),
            ("single", 1, (a.inserts / 10).max(1)),
        ] {
            let (url, scratch) = Scratch::new(backend, run).await?;
            let r = measure(&url, batch_max, inserts, a.callers).await;
            scratch.remove().await?;
            let r = r.with_context(|| format!("{backend} batch_max {batch_max}"))?;
            println!(
                "{:<10} {:>9} {:>8} {:>11.0} {:>13} {:>10.1?} {:>10.1?}",
                backend, batch_max, inserts, r.per_second, r.transactions, r.p50, r.p99
            );
        }
    }
    Ok(())
}
