//! S5 many topics (PERFORMANCE.md): N connections, each watching its own device topic
//! `device/<k>/telemetry`, spread evenly over M topic numbers; the coordinator publishes through
//! `POST /api/v1/publish/batch` (large batches, several requests in flight, as fast as the
//! server answers) in two phases:
//!
//! 1. **all**: every one of the M topics, once per pass (1 % watched with the defaults) →
//!    publishes per server CPU-second; every watched publish must be delivered once;
//! 2. **unwatched**: only the M − N topics nobody watches → server CPU µs per unwatched
//!    publish and unwatched publishes per server CPU-second (the PERFORMANCE.md S5 bar), no
//!    delivery at all.
//!
//! Server RSS and Herald's `herald_topics` gauge are read before and after each phase: a topic
//! nobody watches must leave nothing behind.

use std::fmt;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::coordinator::{Common, Server, Workers, cell, round, run_record, save};
use crate::hist;
use crate::procfs;
use crate::targets::herald::{self, HeraldApi, HeraldSpec, prom_sum};
use crate::targets::{TargetSpec, make_payload, now_ns};
use crate::worker::{TopicMode, spread_index, watcher_of};

#[derive(clap::Args, Debug, Clone)]
pub struct ManyTopicsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscriber connections, each watching its own device topic (one user each).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: u64,
    /// Distinct device topics published to, `device/<k>/telemetry` for k < M; the N watched
    /// ones are spread evenly among them (connection i watches k = i × M / N).
    #[arg(long, short = 'm', default_value_t = 1_000_000)]
    pub topics: u64,
    /// Messages per batch request (Herald accepts at most 1000).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Batch requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// How many times each phase publishes to each of its topics.
    #[arg(long, default_value_t = 1)]
    pub passes: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Wait after the last subscription before sampling RSS.
    #[arg(long, default_value_t = 2)]
    pub settle_secs: u64,
}

/// `device/<k>/telemetry`, written without an allocation.
#[derive(Clone, Copy)]
pub struct DeviceTopic(pub u64);

impl fmt::Display for DeviceTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device/{}/telemetry", self.0)
    }
}

/// The topic numbers of one phase: `passes` rounds over `0 .. over`, keeping the watched ones
/// (`watched`) or only the unwatched ones.
pub fn phase_topics(among: u64, over: u64, passes: u64, unwatched_only: bool) -> Vec<u64> {
    let one: Vec<u64> = (0..over)
        .filter(|&k| !unwatched_only || watcher_of(k, among, over).is_none())
        .collect();
    let mut all = Vec::with_capacity(one.len() * passes as usize);
    for _ in 0..passes {
        all.extend_from_slice(&one);
    }
    all
}

/// What one publishing phase measured.
struct Phase {
    published: u64,
    failed: u64,
    first_error: Option<String>,
    /// Accepted entries whose topic has a subscriber (each expects one delivery).
    watched: u64,
    requests: u64,
    publish_secs: f64,
    /// First request → the later of the last answer and the last delivery.
    window_secs: f64,
    server_cpu_secs: f64,
    generator_cpu_secs: f64,
    worker_cpu_secs: f64,
    delivered: u64,
    hist: Histogram<u64>,
}

impl Phase {
    fn figures(&self, unwatched: bool) -> Value {
        let per_cpu = self.published as f64 / self.server_cpu_secs.max(1e-9);
        let mut v = json!({
            "published": self.published,
            "publish_errors": self.failed,
            "publish_first_error": self.first_error,
            "requests": self.requests,
            "watched_published": self.watched,
            "delivered": self.delivered,
            "drops": self.watched as i64 - self.delivered as i64,
            "publish_secs": round(self.publish_secs, 3),
            "window_secs": round(self.window_secs, 3),
            "publishes_per_sec": round(self.published as f64 / self.publish_secs.max(1e-9), 0),
            "server_cpu_secs": round(self.server_cpu_secs, 3),
            "server_cpu_percent": round(self.server_cpu_secs / self.window_secs.max(1e-9) * 100.0, 1),
            "publishes_per_server_cpu_sec": round(per_cpu, 0),
            "server_cpu_us_per_publish": round(self.server_cpu_secs * 1e6 / self.published.max(1) as f64, 3),
            "generator_cpu_secs": round(self.generator_cpu_secs, 3),
            "worker_cpu_secs": round(self.worker_cpu_secs, 3),
            "latency": hist::summarize(&self.hist),
        });
        if unwatched {
            v["unwatched_publishes_per_server_cpu_sec"] = json!(round(per_cpu, 0));
        }
        v
    }
}

/// This process's CPU seconds (the publisher builds a million JSON entries).
fn own_cpu() -> f64 {
    procfs::sample(std::process::id()).map_or(0.0, |s| s.cpu_secs)
}

/// Publishes one batch per `batch` topic numbers, `concurrency` requests in flight.
async fn publish_topics(
    api: &HeraldApi,
    topics: &[u64],
    a: &ManyTopicsArgs,
) -> (u64, u64, Option<String>, u64, u64) {
    let (among, over) = (a.connections, a.topics);
    let requests = futures_util::stream::iter(topics.chunks(a.batch.max(1)))
        .map(|chunk| async move {
            let data = make_payload(now_ns(), a.payload_bytes);
            let body =
                herald::batch_body(chunk.iter().map(|&k| DeviceTopic(k)), "telemetry", &data);
            (chunk, api.publish_batch(body).await)
        })
        .buffer_unordered(a.concurrency.max(1));
    let mut requests = pin!(requests);
    let (mut ok, mut failed, mut first_error, mut watched, mut n) = (0, 0, None, 0, 0);
    while let Some((chunk, answer)) = requests.next().await {
        n += 1;
        match answer {
            Ok(o) => {
                ok += o.ok;
                failed += o.failed;
                if let Some(e) = o.first_error {
                    first_error.get_or_insert(e);
                }
                watched += chunk
                    .iter()
                    .zip(&o.accepted)
                    .filter(|&(&k, &acc)| acc && watcher_of(k, among, over).is_some())
                    .count() as u64;
            }
            Err(e) => {
                failed += chunk.len() as u64;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    (ok, failed, first_error, watched, n)
}

async fn phase(
    server: &Server,
    workers: &mut Workers,
    api: &HeraldApi,
    topics: &[u64],
    a: &ManyTopicsArgs,
) -> anyhow::Result<Phase> {
    workers.reset().await?;
    let (s0, w0, g0) = (server.sample()?, workers.cpu_secs(), own_cpu());
    let (t0, t0_ns) = (Instant::now(), now_ns());
    let (published, failed, first_error, watched, requests) = publish_topics(api, topics, a).await;
    let publish_secs = t0.elapsed().as_secs_f64();
    let (g1, mut s1, mut w1) = (own_cpu(), server.sample()?, workers.cpu_secs());
    // Drain: until every watched publish is delivered, or nothing moved for 2 s (at most
    // 30 s). Unwatched phases wait 1 s for deliveries that must not come.
    let (mut last, mut last_change) = (0, Instant::now());
    let drain = Instant::now();
    loop {
        let c = workers.counts().await?;
        if c.delivered != last {
            (last, last_change) = (c.delivered, Instant::now());
            (s1, w1) = (server.sample()?, workers.cpu_secs());
        }
        let quiet = last_change.elapsed();
        if (watched > 0 && c.delivered >= watched)
            || (watched == 0 && drain.elapsed() > Duration::from_secs(1))
            || quiet > Duration::from_secs(2)
            || drain.elapsed() > Duration::from_secs(30)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = workers.report_all().await?;
    let c = report.counts;
    let last_ns = c.last_delivery_ns.max(t0_ns);
    Ok(Phase {
        published,
        failed,
        first_error,
        watched,
        requests,
        publish_secs,
        window_secs: publish_secs.max((last_ns - t0_ns) as f64 / 1e9),
        server_cpu_secs: s1.cpu_secs - s0.cpu_secs,
        generator_cpu_secs: g1 - g0,
        worker_cpu_secs: w1 - w0,
        delivered: c.delivered,
        hist: report.hist,
    })
}

/// `herald_topics` and `herald_subscriptions` from `/metrics` (null if unreadable).
async fn gauges(api: &HeraldApi) -> Value {
    match api.metrics().await {
        Ok(text) => json!({
            "herald_topics": prom_sum(&text, "herald_topics"),
            "herald_subscriptions": prom_sum(&text, "herald_subscriptions"),
            "herald_connections": prom_sum(&text, "herald_connections"),
        }),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

pub(crate) fn herald_spec(server: &Server, scenario: &str) -> anyhow::Result<HeraldSpec> {
    match &server.target {
        TargetSpec::Herald(h) => Ok(h.clone()),
        other => bail!(
            "{scenario} measures Herald only (its HTTP API), not {}",
            other.name()
        ),
    }
}

pub async fn many_topics(a: ManyTopicsArgs) -> anyhow::Result<()> {
    if a.connections == 0 || a.connections > a.topics {
        bail!("need 1 ≤ --connections ≤ --topics");
    }
    if !(1..=1000).contains(&a.batch) {
        bail!("--batch must be 1 to 1000 (Herald's batch limit)");
    }
    let server = Server::open(&a.common).await?;
    let spec = herald_spec(&server, "many-topics")?;
    let api = HeraldApi::new(&spec, a.concurrency)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = server.sample()?;
    let mut workers = Workers::start(
        &a.common,
        &server.target,
        a.connections as usize,
        TopicMode::Spread {
            prefix: "device/".into(),
            suffix: "/telemetry".into(),
            among: a.connections,
            over: a.topics,
        },
        false,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let subscribed = server.sample()?;
    let g_subscribed = gauges(&api).await;

    let all = phase_topics(a.connections, a.topics, a.passes, false);
    eprintln!("phase all: {} publishes", all.len());
    let p_all = phase(&server, &mut workers, &api, &all, &a).await?;
    drop(all);
    let after_all = server.sample()?;
    let g_all = gauges(&api).await;

    let unwatched = phase_topics(a.connections, a.topics, a.passes, true);
    eprintln!("phase unwatched: {} publishes", unwatched.len());
    let p_un = phase(&server, &mut workers, &api, &unwatched, &a).await?;
    drop(unwatched);
    let after_un = server.sample()?;
    let g_un = gauges(&api).await;
    let (_, open_after) = workers.count().await?;

    let f_all = p_all.figures(false);
    let f_un = p_un.figures(true);
    let figures = json!({
        "subscribers_open": workers.open(),
        "subscribers_failed": workers.ready["failed"],
        "subscribers_open_after": open_after,
        "connect_secs": workers.ready["connect_secs"],
        "errors": workers.ready["errors"],
        // The headline figures (PERFORMANCE.md S5).
        "publishes_per_server_cpu_sec": f_all["publishes_per_server_cpu_sec"],
        "watched_published": p_all.watched,
        "delivered": p_all.delivered,
        "drops": f_all["drops"],
        "unwatched_publishes_per_server_cpu_sec": f_un["unwatched_publishes_per_server_cpu_sec"],
        "server_cpu_us_per_unwatched_publish": f_un["server_cpu_us_per_publish"],
        "unwatched_delivered": p_un.delivered,
        "rss_kib": {
            "start": start.rss_kib,
            "subscribed": subscribed.rss_kib,
            "after_all": after_all.rss_kib,
            "after_unwatched": after_un.rss_kib,
            "hwm": after_un.hwm_kib,
        },
        "rss_growth_all_kib": after_all.rss_kib as i64 - subscribed.rss_kib as i64,
        "rss_growth_unwatched_kib": after_un.rss_kib as i64 - after_all.rss_kib as i64,
        "gauges": {
            "subscribed": g_subscribed,
            "after_all": g_all,
            "after_unwatched": g_un,
        },
        "phase_all": f_all,
        "phase_unwatched": f_un,
    });
    let params = json!({
        "connections": a.connections,
        "topics": a.topics,
        "watched_fraction": a.connections as f64 / a.topics as f64,
        "watched_topics": format!(
            "device/<i × {} / {}>/telemetry for connection i (device/0, device/{}, …)",
            a.topics, a.connections, spread_index(1, a.connections, a.topics)
        ),
        "batch": a.batch,
        "concurrency": a.concurrency,
        "passes": a.passes,
        "payload_bytes": a.payload_bytes,
        "workers": workers.ready["workers"],
        "publish": "POST /api/v1/publish/batch, unpaced, `concurrency` requests in flight, keep-alive; each entry {topic, event:\"telemetry\", data:\"hbts=…\"}",
        "store": server.store_url,
    });
    let run = run_record("s5-many-topics", "herald", &server, params, figures.clone());
    let f = &figures;
    save(
        &a.common,
        "s5-many-topics",
        &run,
        &[
            "time (UTC)",
            "connections",
            "topics",
            "batch × concurrency",
            "published",
            "watched",
            "delivered",
            "drops",
            "publishes/s",
            "publishes/server CPU-s",
            "unwatched published",
            "unwatched delivered",
            "server CPU µs/unwatched",
            "unwatched/server CPU-s",
            "RSS subscribed KiB",
            "RSS after all KiB",
            "RSS after unwatched KiB",
            "herald_topics after",
        ],
        vec![
            run["date"].as_str().unwrap_or("").to_owned(),
            workers.open().to_string(),
            a.topics.to_string(),
            format!("{} × {}", a.batch, a.concurrency),
            p_all.published.to_string(),
            p_all.watched.to_string(),
            p_all.delivered.to_string(),
            cell(&f["drops"]),
            cell(&f["phase_all"]["publishes_per_sec"]),
            cell(&f["publishes_per_server_cpu_sec"]),
            p_un.published.to_string(),
            p_un.delivered.to_string(),
            cell(&f["server_cpu_us_per_unwatched_publish"]),
            cell(&f["unwatched_publishes_per_server_cpu_sec"]),
            subscribed.rss_kib.to_string(),
            after_all.rss_kib.to_string(),
            after_un.rss_kib.to_string(),
            cell(&f["gauges"]["after_unwatched"]["herald_topics"]),
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
    fn device_topics() {
        assert_eq!(DeviceTopic(42).to_string(), "device/42/telemetry");
    }

    #[test]
    fn phases_cover_the_topics() {
        let all = phase_topics(3, 10, 2, false);
        assert_eq!(all.len(), 20);
        assert_eq!(&all[..10], &(0..10).collect::<Vec<_>>()[..]);
        let un = phase_topics(3, 10, 1, true);
        assert_eq!(un, vec![1, 2, 4, 5, 7, 8, 9]);
        // 1 % watched: 10 000 of 1 000 000 leaves 990 000 unwatched.
        assert_eq!(phase_topics(100, 10_000, 1, true).len(), 9_900);
    }
}
