//! Test helpers shared by `tests/redis.rs` and `tests/nats.rs`: a recording [`Submit`] (the
//! gateway as a source sees it) and a process-wide metrics recorder that keeps counters.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use herald_ingest::{Rejected, Submit, Submitted};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use serde_json::Value;
use tokio::sync::Notify;

/// One submit the recorder saw.
#[derive(Debug, Clone)]
pub struct Call {
    pub source: String,
    pub body: Value,
}

type Answer = dyn Fn(&Value) -> Option<Result<Submitted, Rejected>> + Send + Sync;

/// A recording [`Submit`]: answers like the gateway (a durable id seen before is a
/// `duplicate`; the "store" of ids may be shared by several recorders, like the nodes of a
/// cluster share one database), unless `answer` decides otherwise for a body.
pub struct Recorder {
    calls: Mutex<Vec<Call>>,
    changed: Notify,
    stored: Arc<Mutex<HashSet<String>>>,
    answer: Box<Answer>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Self::answering(|_| None)
    }

    /// `answer` returns `Some` to answer a body its own way.
    pub fn answering(
        answer: impl Fn(&Value) -> Option<Result<Submitted, Rejected>> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            changed: Notify::new(),
            stored: Arc::default(),
            answer: Box::new(answer),
        })
    }

    /// A recorder with the same store of durable ids as `self` (another node).
    pub fn sharing_store(&self) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            changed: Notify::new(),
            stored: self.stored.clone(),
            answer: Box::new(|_| None),
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Calls whose body contains `marker` anywhere (in its JSON text).
    pub fn calls_with(&self, marker: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.body.to_string().contains(marker))
            .collect()
    }

    /// Waits until `done(calls)` holds; panics with what was seen after `timeout`.
    pub async fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&[Call]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if done(&self.calls()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let seen = self.calls();
                assert!(
                    done(&seen),
                    "timed out waiting for {what}; saw {} calls: {:#?}",
                    seen.len(),
                    seen.iter().rev().take(10).collect::<Vec<_>>()
                );
                return;
            }
        }
    }

    /// Waits until `n` calls contain `marker`.
    pub async fn wait_marker(&self, marker: &str, n: usize, timeout: Duration) -> Vec<Call> {
        self.wait(&format!("{n} calls with {marker}"), timeout, |calls| {
            calls
                .iter()
                .filter(|c| c.body.to_string().contains(marker))
                .count()
                >= n
        })
        .await;
        self.calls_with(marker)
    }
}

#[async_trait]
impl Submit for Recorder {
    async fn submit(&self, source: &str, body: &[u8]) -> Result<Submitted, Rejected> {
        let body: Value = serde_json::from_slice(body)
            .map_err(|e| Rejected::Invalid(format!("the recorder got no JSON: {e}")))?;
        let answer = (self.answer)(&body);
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(Call {
                source: source.to_owned(),
                body: body.clone(),
            });
        }
        self.changed.notify_waiters();
        if let Some(answer) = answer {
            return answer;
        }
        let id = body["id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let duplicate = body["durable"] == Value::Bool(true)
            && !self
                .stored
                .lock()
                .map(|mut s| s.insert(id.clone()))
                .unwrap_or(true);
        // As the gateway: a durable request is stored (unless its id was already).
        let stored = body["durable"] == Value::Bool(true) && !duplicate;
        Ok(Submitted {
            id,
            duplicate,
            stored,
        })
    }
}

/// Counters by `name{label=value,…}` (labels sorted), for the whole test process.
#[derive(Clone, Default)]
struct Counters(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

static COUNTERS: OnceLock<Counters> = OnceLock::new();

fn render(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let name = render(key.name(), &labels);
        let Ok(mut map) = self.0.lock() else {
            return Counter::noop();
        };
        Counter::from_arc(map.entry(name).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Installs the counting recorder (once per process; call it before the code under test runs).
pub fn install_metrics() {
    let counters = COUNTERS.get_or_init(Counters::default);
    let _ = metrics::set_global_recorder(counters.clone());
}

/// The counter's value (0 when never incremented).
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    COUNTERS
        .get()
        .and_then(|c| {
            c.0.lock().ok().and_then(|m| {
                m.get(&render(name, labels))
                    .map(|v| v.load(Ordering::SeqCst))
            })
        })
        .unwrap_or(0)
}

/// Waits until `f()` holds, polling every 20 ms; panics after `timeout`.
pub async fn until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
