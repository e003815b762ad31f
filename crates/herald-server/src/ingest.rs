//! The server side of ingestion (SPEC §7): what the sources of `herald-ingest` submit goes
//! through the one publish path, as a server API publish would.
//!
//! A request is trusted like one with a `publish` API key (the broker is the credential): no
//! topic rule applies. The answer decides the broker message's fate: a backend outage (store,
//! bus, history: 503) is [`Rejected::Unavailable`] — the broker keeps the message and it comes
//! again — and everything else that fails (malformed, bad topic, too large…) is
//! [`Rejected::Invalid`] — dead-lettered, never retried. `limits.ingest_per_second` counts
//! these messages with the server API's.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::error::Origin;
use herald_ingest::{Rejected, Submit, Submitted};

use crate::publish::{PublishRequest, publish};
use crate::state::AppState;

/// The publish path, for the ingestion sources.
pub struct Ingest {
    pub state: Arc<AppState>,
}

#[async_trait]
impl Submit for Ingest {
    async fn submit(&self, source: &str, body: &[u8]) -> Result<Submitted, Rejected> {
        if !self.state.limiters.ingest(1) {
            return Err(Rejected::Unavailable(
                "limits.ingest_per_second reached".into(),
            ));
        }
        let req: PublishRequest = serde_json::from_slice(body)
            .map_err(|e| Rejected::Invalid(format!("not a publish request: {e}")))?;
        match publish(&self.state, req, None).await {
            Ok(p) => Ok(Submitted {
                duplicate: p.status == "duplicate",
                stored: p.status == "pending",
                id: p.id,
            }),
            Err(e) => {
                self.state.metrics.error(e.kind());
                tracing::debug!(source, error = %e, "ingest refused");
                Err(match e.origin() {
                    Origin::Backend => Rejected::Unavailable(e.to_string()),
                    Origin::Client | Origin::Internal => Rejected::Invalid(e.to_string()),
                })
            }
        }
    }
}

/// Whether a source is connected.
type Probe = Box<dyn Fn() -> bool + Send + Sync>;

/// The running sources, kept for as long as the node runs (each stops with the node's
/// shutdown token: at SIGTERM it stops consuming, and what it had not acknowledged goes back
/// to the broker for another node).
pub struct Sources {
    health: Vec<(&'static str, Probe)>,
    #[allow(dead_code)]
    keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Sources {
    /// `(source, connected)` for each configured source.
    pub fn health(&self) -> Vec<(&'static str, bool)> {
        self.health.iter().map(|(n, f)| (*n, f())).collect()
    }
}

/// Starts every configured source; fails fast when one cannot connect.
pub async fn start(state: &Arc<AppState>) -> Result<Sources, String> {
    let cfg = state.config.ingest.clone();
    let submit: Arc<dyn Submit> = Arc::new(Ingest {
        state: state.clone(),
    });
    let stop = state.shutdown.clone();
    let mut sources = Sources {
        health: Vec::new(),
        keep: Vec::new(),
    };
    if let Some(c) = cfg.amqp {
        start_amqp(c, submit.clone(), stop.clone(), &mut sources).await?;
    }
    if let Some(c) = cfg.redis {
        start_redis(c, submit.clone(), stop.clone(), &mut sources).await?;
    }
    if let Some(c) = cfg.nats {
        start_nats(c, submit, stop, &mut sources).await?;
    }
    Ok(sources)
}

#[cfg(feature = "amqp")]
async fn start_amqp(
    c: herald_ingest::config::AmqpSource,
    submit: Arc<dyn Submit>,
    stop: tokio_util::sync::CancellationToken,
    sources: &mut Sources,
) -> Result<(), String> {
    let h = herald_ingest::amqp::AmqpIngest::start(c, submit, stop)
        .await
        .map_err(|e| format!("ingest.amqp: {e}"))?;
    let status = h.status();
    sources
        .health
        .push(("amqp", Box::new(move || status.healthy())));
    sources.keep.push(Box::new(h));
    Ok(())
}

#[cfg(not(feature = "amqp"))]
async fn start_amqp(
    _: herald_ingest::config::AmqpSource,
    _: Arc<dyn Submit>,
    _: tokio_util::sync::CancellationToken,
    _: &mut Sources,
) -> Result<(), String> {
    Err("ingest.amqp: AMQP is not compiled into this build".into())
}

#[cfg(feature = "redis")]
async fn start_redis(
    c: herald_ingest::config::RedisSource,
    submit: Arc<dyn Submit>,
    stop: tokio_util::sync::CancellationToken,
    sources: &mut Sources,
) -> Result<(), String> {
    let h = herald_ingest::redis::RedisIngest::start(c, submit, stop)
        .await
        .map_err(|e| format!("ingest.redis: {e}"))?;
    let probe = h.clone();
    sources
        .health
        .push(("redis", Box::new(move || probe.healthy())));
    sources.keep.push(Box::new(h));
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn start_redis(
    _: herald_ingest::config::RedisSource,
    _: Arc<dyn Submit>,
    _: tokio_util::sync::CancellationToken,
    _: &mut Sources,
) -> Result<(), String> {
    Err("ingest.redis: Redis is not compiled into this build".into())
}

#[cfg(feature = "nats")]
async fn start_nats(
    c: herald_ingest::config::NatsSource,
    submit: Arc<dyn Submit>,
    stop: tokio_util::sync::CancellationToken,
    sources: &mut Sources,
) -> Result<(), String> {
    let h = herald_ingest::nats::NatsIngest::start(c, submit, stop)
        .await
        .map_err(|e| format!("ingest.nats: {e}"))?;
    let probe = h.clone();
    sources
        .health
        .push(("nats", Box::new(move || probe.healthy())));
    sources.keep.push(Box::new(h));
    Ok(())
}

#[cfg(not(feature = "nats"))]
async fn start_nats(
    _: herald_ingest::config::NatsSource,
    _: Arc<dyn Submit>,
    _: tokio_util::sync::CancellationToken,
    _: &mut Sources,
) -> Result<(), String> {
    Err("ingest.nats: NATS is not compiled into this build".into())
}
