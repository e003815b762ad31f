//! S6 durable (PERFORMANCE.md): Herald on a durable store (a fresh SQLite file, a scratch
//! PostgreSQL schema, or memory), U users each holding one connection, M user-inbox messages
//! published through the API (`POST /api/v1/users/{u}/messages`, durable by default; or
//! `/api/v1/publish/batch` entries with `durable:true` on `user/<u>`), `concurrency` requests in
//! flight. Every worker acks each durable message as soon as it arrives.
//!
//! Figures: messages per second end to end (first publish → last ack written by a client; and
//! → last ack reply, i.e. committed), publish request latency (HTTP 200 = committed),
//! publish → receive latency, ack round trip, drops and duplicates, server CPU; then the store
//! is read back through `GET /api/v1/users/{u}/messages?status=…` to confirm that every
//! message is `acked` and none is left `pending`, `sent` or `failed`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::coordinator::{Common, Server, Workers, cell, round, run_record, save};
use crate::hist;
use crate::many_topics::herald_spec;
use crate::procfs;
use crate::server::HeraldStore;
use crate::targets::herald::{HeraldApi, prom_sum};
use crate::targets::{make_payload, now_ns};
use crate::worker::TopicMode;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A fresh SQLite file (WAL, synchronous=FULL), removed afterwards.
    Sqlite,
    /// A fresh schema in `--postgres-url`, dropped afterwards.
    Postgres,
    /// Herald's in-memory store (the baseline without a database).
    Memory,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /api/v1/users/{u}/messages`, one message per request.
    Inbox,
    /// `POST /api/v1/publish/batch`, `--batch` entries `{topic:"user/<u>", durable:true}`.
    Batch,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DurableArgs {
    #[command(flatten)]
    pub common: Common,
    /// The store Herald is started with (ignored when attaching with --url).
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    /// PostgreSQL server and database for `--store postgres` (trust auth); the run creates a
    /// schema of its own there and drops it at the end.
    #[arg(
        long,
        env = "HERALD_BENCH_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// Directory for the SQLite file (default: the server's scratch directory under $TMPDIR).
    #[arg(long)]
    pub store_dir: Option<PathBuf>,
    /// Users, one connection each (`bench-<u>`).
    #[arg(long, short = 'u', default_value_t = 1000)]
    pub users: usize,
    /// Messages in all; message k goes to user k mod U (at most 1000 per user: the inbox
    /// listing that confirms the acks reads 1000).
    #[arg(long, short = 'm', default_value_t = 100_000)]
    pub messages: u64,
    /// HTTP requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, value_enum, default_value_t = Via::Inbox)]
    pub via: Via,
    /// Entries per batch request with `--via batch` (Herald accepts at most 1000).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Offered messages per second (0: as fast as the server answers).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Users whose inboxes are read back after the run, spread evenly (0: every user).
    #[arg(long, default_value_t = 0)]
    pub verify_users: usize,
    /// Give up waiting for deliveries and acks after this long without progress.
    #[arg(long, default_value_t = 15)]
    pub stall_secs: u64,
}

/// `postgres://…?a=b` + `options=-csearch_path%3D<schema>` (libpq URL parameters).
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// A URL with its password, if any, replaced by `***` (for the result files).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// The user of message `k` and the id it is published with.
pub fn message_user(k: u64, users: usize) -> usize {
    (k % users.max(1) as u64) as usize
}

pub fn message_id(tag: &str, k: u64) -> String {
    format!("s6-{tag}-{k}")
}

/// `n` of `of` users, spread evenly (all when `n` is 0 or ≥ `of`).
pub fn sample_users(n: usize, of: usize) -> Vec<usize> {
    if n == 0 || n >= of {
        return (0..of).collect();
    }
    (0..n).map(|i| i * of / n).collect()
}

/// The body of one user message (`POST /api/v1/users/{u}/messages`).
fn inbox_body(id: &str, data: &str) -> String {
    json!({"event": "bench", "data": data, "id": id}).to_string()
}

/// A batch body of durable user messages `ks`.
fn durable_batch_body(ks: &[u64], users: usize, tag: &str, data: &str) -> String {
    let messages: Vec<Value> = ks
        .iter()
        .map(|&k| {
            json!({
                "topic": format!("user/bench-{}", message_user(k, users)),
                "event": "bench",
                "data": data,
                "id": message_id(tag, k),
                "durable": true,
            })
        })
        .collect();
    json!({ "messages": messages }).to_string()
}

/// Where the run's store lives; [`Scratch::cleanup`] removes it.
enum Scratch {
    None,
    Dir(PathBuf),
    PgSchema { admin: String, schema: String },
}

impl Scratch {
    async fn create(a: &DurableArgs, tag: &str) -> anyhow::Result<(HeraldStore, Scratch)> {
        Ok(match a.store {
            StoreKind::Memory => (HeraldStore::Memory, Scratch::None),
            StoreKind::Sqlite => match &a.store_dir {
                None => (HeraldStore::SqliteScratch, Scratch::None),
                Some(d) => {
                    let dir = std::path::absolute(d)?.join(format!("herald-bench-s6-{tag}"));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    let url = format!("sqlite://{}", dir.join("herald.db").display());
                    (HeraldStore::Url(url), Scratch::Dir(dir))
                }
            },
            StoreKind::Postgres => {
                let schema = format!("herald_bench_{tag}");
                pg_exec(&a.postgres_url, &format!("CREATE SCHEMA {schema}"))
                    .await
                    .with_context(|| {
                        format!("cannot create a schema in {}", redact_url(&a.postgres_url))
                    })?;
                (
                    HeraldStore::Url(with_search_path(&a.postgres_url, &schema)),
                    Scratch::PgSchema {
                        admin: a.postgres_url.clone(),
                        schema,
                    },
                )
            }
        })
    }

    async fn cleanup(self) {
        match self {
            Scratch::None => {}
            Scratch::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Scratch::PgSchema { admin, schema } => {
                let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                if let Err(e) = pg_exec(&admin, &sql).await {
                    eprintln!("could not drop schema {schema}: {e:#}");
                }
            }
        }
    }
}

async fn pg_exec(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql(sql).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// What the publishing side saw.
struct Published {
    ok: u64,
    duplicates: u64,
    failed: u64,
    first_error: Option<String>,
    requests: u64,
    /// Per message: accepted (stored) by the server.
    accepted: Vec<bool>,
    latency: Histogram<u64>,
    secs: f64,
}

/// One request's worth of messages: `ks`, due at `start + ks[0] / rate`.
async fn send_unit(
    api: &HeraldApi,
    a: &DurableArgs,
    tag: &str,
    start: Instant,
    ks: Vec<u64>,
) -> (Vec<u64>, anyhow::Result<Vec<Option<String>>>, u64) {
    if a.rate > 0.0 {
        let due = start + Duration::from_secs_f64(ks[0] as f64 / a.rate);
        tokio::time::sleep_until(due.into()).await;
    }
    let data = make_payload(now_ns(), a.payload_bytes);
    let t = Instant::now();
    // Per message: Some(status) when accepted ("pending", "duplicate", …), None when refused.
    let answer = match a.via {
        Via::Inbox => {
            let k = ks[0];
            let user = format!("bench-{}", message_user(k, a.users));
            api.user_message(&user, inbox_body(&message_id(tag, k), &data))
                .await
                .map(|status| vec![Some(status)])
        }
        Via::Batch => {
            let body = durable_batch_body(&ks, a.users, tag, &data);
            api.post("/api/v1/publish/batch", body)
                .await
                .and_then(|bytes| {
                    let v: Value = serde_json::from_slice(&bytes)?;
                    let results = v["results"]
                        .as_array()
                        .context("batch answer has no results")?;
                    Ok(results
                        .iter()
                        .map(|r| {
                            r.get("id")
                                .map(|_| r["status"].as_str().unwrap_or("pending").to_owned())
                        })
                        .collect())
                })
        }
    };
    let ns = t.elapsed().as_nanos() as u64;
    (ks, answer, ns)
}

async fn publish(api: &HeraldApi, a: &DurableArgs, tag: &str) -> Published {
    let per = match a.via {
        Via::Inbox => 1,
        Via::Batch => a.batch.max(1) as u64,
    };
    let start = Instant::now();
    let units = (0..a.messages.div_ceil(per))
        .map(|u| (u * per..((u + 1) * per).min(a.messages)).collect::<Vec<u64>>());
    let requests = futures_util::stream::iter(units)
        .map(|ks| send_unit(api, a, tag, start, ks))
        .buffer_unordered(a.concurrency.max(1));
    let mut requests = pin!(requests);
    let mut p = Published {
        ok: 0,
        duplicates: 0,
        failed: 0,
        first_error: None,
        requests: 0,
        accepted: vec![false; a.messages as usize],
        latency: hist::new_histogram(),
        secs: 0.0,
    };
    while let Some((ks, answer, ns)) = requests.next().await {
        p.requests += 1;
        hist::record(&mut p.latency, ns);
        match answer {
            Ok(statuses) => {
                for (&k, status) in ks.iter().zip(&statuses) {
                    match status.as_deref() {
                        Some("duplicate") => p.duplicates += 1,
                        Some(_) => {
                            p.ok += 1;
                            p.accepted[k as usize] = true;
                        }
                        None => {
                            p.failed += 1;
                            p.first_error
                                .get_or_insert_with(|| format!("message {k} refused in a batch"));
                        }
                    }
                }
                p.failed += ks.len().saturating_sub(statuses.len()) as u64;
            }
            Err(e) => {
                p.failed += ks.len() as u64;
                p.first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    p.secs = start.elapsed().as_secs_f64();
    p
}

/// The inbox read back: per status, how many messages the checked users hold.
#[derive(Default)]
struct Verified {
    users: usize,
    expected: u64,
    acked: u64,
    /// Expected messages not listed as acked.
    missing: u64,
    pending: u64,
    sent: u64,
    failed: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn verify(api: &HeraldApi, a: &DurableArgs, tag: &str, accepted: &[bool]) -> Verified {
    let users = sample_users(a.verify_users, a.users);
    let checks = futures_util::stream::iter(users.iter().copied())
        .map(|u| async move {
            let user = format!("bench-{u}");
            let mut lists = Vec::new();
            for status in ["acked", "pending", "sent", "failed"] {
                lists.push(api.inbox_ids(&user, status).await);
            }
            (u, lists)
        })
        .buffer_unordered(8);
    let mut checks = pin!(checks);
    let mut v = Verified {
        users: users.len(),
        ..Verified::default()
    };
    while let Some((u, lists)) = checks.next().await {
        let expected: Vec<String> = (u as u64..a.messages)
            .step_by(a.users.max(1))
            .filter(|&k| accepted[k as usize])
            .map(|k| message_id(tag, k))
            .collect();
        v.expected += expected.len() as u64;
        let mut found = Vec::new();
        for list in lists {
            match list {
                Ok(ids) => found.push(Some(ids)),
                Err(e) => {
                    v.errors += 1;
                    v.first_error.get_or_insert(format!("{e:#}"));
                    found.push(None);
                }
            }
        }
        let len = |i: usize| {
            found
                .get(i)
                .and_then(Option::as_ref)
                .map_or(0, |l| l.len() as u64)
        };
        if let Some(Some(acked)) = found.first() {
            let acked: HashSet<&String> = acked.iter().collect();
            v.acked += acked.len() as u64;
            v.missing += expected.iter().filter(|id| !acked.contains(id)).count() as u64;
        }
        v.pending += len(1);
        v.sent += len(2);
        v.failed += len(3);
    }
    v
}

/// Durable-delivery counters from `/metrics`.
async fn durable_metrics(api: &HeraldApi) -> Value {
    match api.metrics().await {
        Ok(t) => json!({
            "herald_durable_retries_total": prom_sum(&t, "herald_durable_retries_total"),
            "herald_durable_failed_total": prom_sum(&t, "herald_durable_failed_total"),
            "herald_durable_unacked": prom_sum(&t, "herald_durable_unacked"),
            "herald_messages_sent_total": prom_sum(&t, "herald_messages_sent_total"),
            "herald_messages_dropped_total": prom_sum(&t, "herald_messages_dropped_total"),
            "herald_errors_total": prom_sum(&t, "herald_errors_total"),
        }),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

pub async fn durable(a: DurableArgs) -> anyhow::Result<()> {
    if a.users == 0 || a.messages == 0 {
        bail!("need --users and --messages ≥ 1");
    }
    if a.messages.div_ceil(a.users as u64) > 1000 {
        bail!(
            "at most 1000 messages per user (--messages ≤ 1000 × --users): the inbox listing \
             that confirms the acks returns 1000, and the inbox keeps store.max_per_user = 1000"
        );
    }
    if a.via == Via::Batch && !(1..=1000).contains(&a.batch) {
        bail!("--batch must be 1 to 1000 (Herald's batch limit)");
    }
    // Unique per run: the schema name, the SQLite directory and the message ids.
    let tag = format!(
        "{}_{}",
        std::process::id(),
        now_ns() / 1_000_000 % 1_000_000_000
    );
    let (store, scratch) = Scratch::create(&a, &tag).await?;
    let result = run(&a, &store, &tag).await;
    scratch.cleanup().await;
    result
}

async fn run(a: &DurableArgs, store: &HeraldStore, tag: &str) -> anyhow::Result<()> {
    let server = Server::open_with_store(&a.common, store).await?;
    let spec = herald_spec(&server, "durable")?;
    let api = HeraldApi::new(&spec, a.concurrency.max(8))?;
    let mut workers =
        Workers::start(&a.common, &server.target, a.users, TopicMode::None, true).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m0 = durable_metrics(&api).await;
    workers.reset().await?;
    // PostgreSQL does part of the work in its own processes, on the same two cores.
    let db_cpu = || (a.store == StoreKind::Postgres).then(|| procfs::cpu_secs_of_comm("postgres"));
    let d0 = db_cpu();
    let (s0, w0) = (server.sample()?, workers.cpu_secs());
    let g0 = procfs::sample(std::process::id()).map_or(0.0, |s| s.cpu_secs);
    let t0_ns = now_ns();
    let published = publish(&api, a, tag).await;
    let g1 = procfs::sample(std::process::id()).map_or(0.0, |s| s.cpu_secs);
    eprintln!(
        "published {} ({} failed) in {:.2} s; waiting for deliveries and acks",
        published.ok, published.failed, published.secs
    );
    // Drain: until every stored message was delivered and its ack answered, or nothing moved
    // for --stall-secs (retransmissions come after store.retry_after = 5 s).
    let want = published.ok;
    let (mut last, mut last_change) = ((0, 0), Instant::now());
    let (mut s1, mut w1, mut d1) = (server.sample()?, workers.cpu_secs(), db_cpu());
    loop {
        let c = workers.counts().await?;
        if (c.delivered, c.acks_confirmed) != last {
            (last, last_change) = ((c.delivered, c.acks_confirmed), Instant::now());
            (s1, w1, d1) = (server.sample()?, workers.cpu_secs(), db_cpu());
        }
        if (c.delivered >= want && c.acks_confirmed >= want)
            || last_change.elapsed() > Duration::from_secs(a.stall_secs)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = workers.report_all().await?;
    let c = report.counts;
    let m1 = durable_metrics(&api).await;
    let verified = verify(&api, a, tag, &published.accepted).await;

    let secs_to = |ns: u64| ns.saturating_sub(t0_ns) as f64 / 1e9;
    let e2e = secs_to(c.last_ack_ns).max(1e-9);
    let e2e_committed = secs_to(c.last_ack_reply_ns).max(1e-9);
    let window = published.secs.max(e2e_committed);
    let server_cpu = s1.cpu_secs - s0.cpu_secs;
    let done = c.delivered.min(c.acks_confirmed);
    let delta = |k: &str| match (m1[k].as_f64(), m0[k].as_f64()) {
        (Some(b), Some(a)) => json!(b - a),
        _ => Value::Null,
    };
    let figures = json!({
        "users_open": workers.open(),
        "users_failed": workers.ready["failed"],
        "connect_secs": workers.ready["connect_secs"],
        "errors": workers.ready["errors"],
        "published": published.ok,
        "publish_duplicates": published.duplicates,
        "publish_errors": published.failed,
        "publish_first_error": published.first_error,
        "requests": published.requests,
        "publish_secs": round(published.secs, 3),
        "publish_rate": round(published.ok as f64 / published.secs.max(1e-9), 0),
        "delivered": c.delivered,
        "drops": published.ok as i64 - c.delivered as i64,
        "duplicates_received": c.duplicates,
        "acks_sent": c.acks_sent,
        "acks_confirmed": c.acks_confirmed,
        "ack_errors": c.ack_errors,
        "untimed_deliveries": c.untimed,
        // First publish → the last ack written by a client, and → its reply (committed).
        "end_to_end_secs": round(e2e, 3),
        "end_to_end_committed_secs": round(e2e_committed, 3),
        "messages_per_sec": round(done as f64 / e2e, 0),
        "messages_per_sec_committed": round(done as f64 / e2e_committed, 0),
    });
    let mut figures = figures;
    let extra = json!({
        "publish_latency": hist::summarize(&published.latency),
        "receive_latency": hist::summarize(&report.hist),
        "ack_latency": hist::summarize(&report.ack_hist),
        "server_cpu_secs": round(server_cpu, 3),
        "server_cpu_percent": round(server_cpu / window.max(1e-9) * 100.0, 1),
        "messages_per_server_cpu_sec": round(done as f64 / server_cpu.max(1e-9), 0),
        "generator_cpu_secs": round(g1 - g0, 3),
        // Every `postgres` process on the machine (other databases' users included).
        "postgres_cpu_secs": match (d0, d1) {
            (Some((a, _)), Some((b, n))) => json!({"secs": round(b - a, 3), "processes": n}),
            _ => Value::Null,
        },
        "worker_cpu_secs": round(w1 - w0, 3),
        "server_rss_end_kib": s1.rss_kib,
        "server_hwm_kib": s1.hwm_kib,
        "retransmissions": delta("herald_durable_retries_total"),
        "metrics_before": m0,
        "metrics_after": m1,
        "verify": {
            "users_checked": verified.users,
            "expected": verified.expected,
            "acked": verified.acked,
            "missing": verified.missing,
            "pending": verified.pending,
            "sent": verified.sent,
            "failed": verified.failed,
            "errors": verified.errors,
            "first_error": verified.first_error,
        },
    });
    if let (Some(f), Value::Object(extra)) = (figures.as_object_mut(), extra) {
        f.extend(extra);
    }
    let store_name = match (server.store_url.as_deref(), a.store) {
        (None, _) => "attached",
        (Some(_), StoreKind::Sqlite) => "sqlite",
        (Some(_), StoreKind::Postgres) => "postgres",
        (Some(_), StoreKind::Memory) => "memory",
    };
    let params = json!({
        "store": store_name,
        "store_url": server.store_url.as_deref().map(redact_url),
        "users": a.users,
        "messages": a.messages,
        "via": match a.via {
            Via::Inbox => "POST /api/v1/users/{u}/messages (durable by default), one message per request",
            Via::Batch => "POST /api/v1/publish/batch, entries {topic:user/<u>, durable:true}",
        },
        "batch": (a.via == Via::Batch).then_some(a.batch),
        "concurrency": a.concurrency,
        "rate": if a.rate > 0.0 { json!(a.rate) } else { json!("unpaced") },
        "payload_bytes": a.payload_bytes,
        "workers": workers.ready["workers"],
        "ack": "each worker sends {\"type\":\"ack\",\"id\":\"ack-<ns>\",\"ids\":[id]} for every durable message as it arrives",
    });
    let run = run_record("s6-durable", "herald", &server, params, figures.clone());
    let f = &figures;
    save(
        &a.common,
        "s6-durable",
        &run,
        &[
            "time (UTC)",
            "store",
            "users",
            "via × concurrency",
            "published",
            "delivered",
            "drops",
            "dup recv",
            "acks confirmed",
            "verified acked / expected",
            "not acked",
            "end-to-end s",
            "msg/s",
            "publish p50 / p99 ms",
            "receive p50 / p99 ms",
            "ack p50 / p99 ms",
            "server CPU %",
            "msg/server CPU-s",
            "postgres CPU s",
        ],
        vec![
            run["date"].as_str().unwrap_or("").to_owned(),
            store_name.to_owned(),
            workers.open().to_string(),
            format!(
                "{} × {}",
                match a.via {
                    Via::Inbox => "inbox".to_owned(),
                    Via::Batch => format!("batch {}", a.batch),
                },
                a.concurrency
            ),
            published.ok.to_string(),
            c.delivered.to_string(),
            cell(&f["drops"]),
            c.duplicates.to_string(),
            c.acks_confirmed.to_string(),
            format!("{} / {}", verified.acked, verified.expected),
            (verified.missing + verified.pending + verified.sent + verified.failed).to_string(),
            cell(&f["end_to_end_secs"]),
            cell(&f["messages_per_sec"]),
            format!(
                "{} / {}",
                f["publish_latency"]["p50_ms"], f["publish_latency"]["p99_ms"]
            ),
            format!(
                "{} / {}",
                f["receive_latency"]["p50_ms"], f["receive_latency"]["p99_ms"]
            ),
            format!(
                "{} / {}",
                f["ack_latency"]["p50_ms"], f["ack_latency"]["p99_ms"]
            ),
            cell(&f["server_cpu_percent"]),
            cell(&f["messages_per_server_cpu_sec"]),
            cell(&f["postgres_cpu_secs"]["secs"]),
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
    fn postgres_urls() {
        assert_eq!(
            with_search_path("postgres://postgres@127.0.0.1:5432/test", "s1"),
            "postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Ds1"
        );
        assert_eq!(
            with_search_path("postgres://h/db?application_name=x", "s1"),
            "postgres://h/db?application_name=x&options=-csearch_path%3Ds1"
        );
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    #[test]
    fn messages_and_users() {
        assert_eq!(message_user(0, 3), 0);
        assert_eq!(message_user(7, 3), 1);
        assert_eq!(message_id("t", 7), "s6-t-7");
        assert_eq!(sample_users(0, 4), vec![0, 1, 2, 3]);
        assert_eq!(sample_users(9, 4), vec![0, 1, 2, 3]);
        assert_eq!(sample_users(2, 10), vec![0, 5]);
    }

    #[test]
    fn request_bodies() {
        let v: Value = serde_json::from_str(&inbox_body("s6-t-1", "hbts=1;x")).unwrap();
        assert_eq!(
            v,
            json!({"event": "bench", "data": "hbts=1;x", "id": "s6-t-1"})
        );
        let v: Value = serde_json::from_str(&durable_batch_body(&[3, 4], 3, "t", "d")).unwrap();
        assert_eq!(v["messages"][0]["topic"], "user/bench-0");
        assert_eq!(v["messages"][1]["topic"], "user/bench-1");
        assert_eq!(v["messages"][1]["id"], "s6-t-4");
        assert_eq!(v["messages"][1]["durable"], true);
    }
}
