//! Prometheus metrics (SPEC §10).
//!
//! Hot-path counters are registered once into [`Metrics`] and incremented through handles
//! (no registry lookup per message). Gauges that describe state (connections, users,
//! subscriptions, queue depth, backend health) are computed from the hub when `/metrics` is
//! scraped, so the fanout path never maintains them.

use std::sync::OnceLock;

use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use herald_core::hub::{Delivery, HubStats};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide Prometheus recorder once; later calls reuse it.
fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("herald_publish_to_write_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already (embedding); then our
            // handle renders an empty registry rather than crashing the server.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Every `kind` label of `herald_errors_total` (`herald_core::error::Error::kind` plus the
/// connection-level ones).
const ERROR_KINDS: &[&str] = &[
    "bad_request",
    "invalid_topic",
    "unauthenticated",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
    "too_many_subscriptions",
    "bus",
    "store",
    "history",
    "internal",
    "malformed_frame",
];

/// Handles to the hot-path metrics.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    pub received_api: Counter,
    pub received_client: Counter,
    pub sent: Counter,
    pub dropped_queue_full: Counter,
    /// Messages discarded with the queue of a connection closed as a slow consumer.
    pub dropped_slow_consumer: Counter,
    /// Connections closed as slow consumers (queue persistently full, or socket blocked).
    pub slow_consumers: Counter,
    /// Durable messages sent again because they were not acked in time.
    pub durable_retries: Counter,
    /// Durable messages marked failed (retries exhausted).
    pub durable_failed: Counter,
    pub publish_to_write: Histogram,
    /// Topic messages the bus handed to this node (on a cluster: only topics watched here).
    pub bus_messages: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let handle = handle();
        // Register the labelled families at zero so they are scraped before the first event.
        for kind in ERROR_KINDS {
            counter!("herald_errors_total", "kind" => *kind).increment(0);
        }
        for t in crate::session::Transport::ALL {
            counter!("herald_connections_opened_total", "transport" => t.label()).increment(0);
        }
        Self {
            handle,
            received_api: counter!("herald_messages_received_total", "source" => "api"),
            received_client: counter!("herald_messages_received_total", "source" => "client"),
            sent: counter!("herald_messages_sent_total"),
            dropped_queue_full: counter!("herald_messages_dropped_total", "reason" => "queue_full"),
            dropped_slow_consumer: counter!("herald_messages_dropped_total", "reason" => "slow_consumer"),
            slow_consumers: counter!("herald_slow_consumers_total"),
            durable_retries: counter!("herald_durable_retries_total"),
            durable_failed: counter!("herald_durable_failed_total"),
            publish_to_write: histogram!("herald_publish_to_write_seconds"),
            bus_messages: counter!("herald_bus_messages_received_total"),
        }
    }

    /// Count what a fanout dropped: messages over full queues, and connections it closed as
    /// slow consumers with the messages discarded with them.
    pub fn delivery(&self, d: &Delivery) {
        if d.dropped > 0 {
            self.dropped_queue_full.increment(d.dropped as u64);
        }
        if d.slow_closed > 0 {
            self.slow_consumers.increment(d.slow_closed as u64);
            self.dropped_slow_consumer.increment(d.discarded as u64);
        }
    }

    /// A session opened (authenticated, registered), by transport (`json`, `stomp`, `sse`,
    /// `poll`, `telemetry`).
    pub fn connection_opened(&self, transport: &'static str) {
        counter!("herald_connections_opened_total", "transport" => transport).increment(1);
    }

    /// A connection closed, by reason (`client`, `slow_consumer`, `token_expired`, …).
    pub fn connection_closed(&self, reason: &'static str) {
        counter!("herald_connections_closed_total", "reason" => reason).increment(1);
    }

    /// An error answered to a client or publisher, by kind.
    pub fn error(&self, kind: &'static str) {
        counter!("herald_errors_total", "kind" => kind).increment(1);
    }

    /// Render the exposition text, refreshing state gauges first.
    pub fn render(
        &self,
        hub: &HubStats,
        durable_unacked: usize,
        bus_up: bool,
        store_up: bool,
    ) -> String {
        gauge!("herald_durable_unacked").set(durable_unacked as f64);
        gauge!("herald_connections").set(hub.connections as f64);
        gauge!("herald_online_users").set(hub.online_users as f64);
        gauge!("herald_connections_per_user_max").set(hub.max_connections_per_user as f64);
        gauge!("herald_connections_per_user_mean").set(hub.mean_connections_per_user);
        gauge!("herald_subscriptions").set(hub.subscriptions as f64);
        gauge!("herald_topics").set(hub.topics as f64);
        gauge!("herald_send_queue_depth").set(hub.queued as f64);
        gauge!("herald_bus_up").set(if bus_up { 1.0 } else { 0.0 });
        if let Some(rss) = resident_bytes() {
            gauge!("process_resident_memory_bytes").set(rss as f64);
        }
        gauge!("herald_store_up").set(if store_up { 1.0 } else { 0.0 });
        self.handle.render()
    }
}

/// This process's resident set size, from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
