//! Herald server: listeners, the HTTP API, connection tasks, authentication, metrics and
//! configuration, wired over `herald-core`.
//!
//! # Layout
//! - [`config`]: the TOML configuration, environment overrides and validation.
//! - [`auth`]: JWT and API-key authentication, revocations.
//! - [`ws`]: the `/ws` endpoint and the per-connection task (JSON v1); the WebSocket
//!   handshake checks and upgrade shared with [`stomp`] and [`telemetry`].
//! - [`session`]: what every client transport shares (registration, limits, subscribe,
//!   publish, commands, acks, delivery bookkeeping).
//! - [`stomp`]: STOMP 1.2 over WebSocket (`/stomp`, or `/ws` with `v12.stomp`).
//! - [`sse`], [`poll`]: Server-Sent Events (`/sse`), long polling (`/api/v1/poll`) and
//!   `POST /api/v1/ack`.
//! - [`telemetry`]: seed 001's telemetry compatibility endpoints.
//! - [`api`]: the HTTP server API, health, metrics and the demo page.
//! - [`publish`]: the one publish path (store, history, retained, ordering, bus).
//! - [`state`]: the shared node state and the router applying bus deliveries to the hub.
//! - [`inbox`]: retransmission of unacked durable messages.
//! - [`limits`]: rate limiters.
//! - [`metrics`]: Prometheus metrics.
//!
//! Data path: `POST /api/v1/publish` ([`api`]) or a client `publish` ([`ws`]) → the bus →
//! [`state::Router`] → the hub's fanout → each connection's queue → the connection task,
//! which writes the shared encoded frame. [`run`] builds it all from a [`config::Config`] and
//! serves until its shutdown token is cancelled, then drains.

pub mod api;
pub mod auth;
pub mod commands;
pub mod config;
pub mod inbox;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod poll;
pub mod publish;
pub mod session;
pub mod sse;
pub mod state;
pub mod stomp;
pub mod telemetry;
pub mod ws;
pub mod wsio;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use herald_core::acl::{Acl, AclError};
use herald_core::bus::{Bus, ControlEvent, MemoryBus, MemoryPresence, Presence};
use herald_core::history::{History, MemoryHistory};
use herald_core::hub::Hub;
use herald_core::store::{MemoryStore, Retention, Store};
use herald_proto::close;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::auth::{AuthSetupError, JwtAuthenticator, Revocation};
use crate::config::{BusBackend, Config, StoreBackend};
use crate::state::{AppState, Router};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("auth: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("topics: {0}")]
    Acl(#[from] AclError),
    #[error("{message}")]
    Backend {
        setting: &'static str,
        message: String,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// The bus, presence and history of this node: in memory for one node, or the cluster
/// backend `bus.url` names (the config parses the scheme, in one place). Never a silent
/// fallback: an unreachable bus fails the start.
struct Seams {
    bus: Arc<dyn Bus>,
    presence: Arc<dyn Presence>,
    history: Arc<dyn History>,
    /// Swept by the node's housekeeping (the cluster servers expire their own entries).
    memory_history: Option<Arc<MemoryHistory>>,
}

async fn build_seams(
    config: &Config,
    node_id: &str,
    hub: &Arc<Hub>,
    stop: CancellationToken,
) -> Result<Seams, ServerError> {
    let backend = config.bus.backend().map_err(|e| ServerError::Backend {
        setting: "bus.url",
        message: e.to_string(),
    })?;
    if backend == BusBackend::Memory {
        let history = Arc::new(MemoryHistory::new());
        return Ok(Seams {
            bus: Arc::new(MemoryBus::new(node_id)),
            presence: Arc::new(MemoryPresence::new(hub.clone())),
            history: history.clone(),
            memory_history: Some(history),
        });
    }
    let interest = config
        .bus
        .interest_counters()
        .map_err(|e| ServerError::Backend {
            setting: "bus.interest",
            message: e.to_string(),
        })?;
    let options = herald_cluster::Options {
        url: config.bus.url.clone(),
        node_id: node_id.to_owned(),
        prefix: config.bus.prefix.clone(),
        presence_ttl: config.bus.presence_ttl,
        linger: config.bus.linger,
        interest,
    };
    let c = herald_cluster::connect(options, hub.clone(), stop)
        .await
        .map_err(|e| ServerError::Backend {
            setting: "bus.url",
            message: e.to_string(),
        })?;
    Ok(Seams {
        bus: c.bus,
        presence: c.presence,
        history: c.history,
        memory_history: None,
    })
}

/// The inbox retention configured in `[store]`.
fn retention(config: &Config) -> Retention {
    Retention {
        max_per_user: config.store.max_per_user,
        max_age: config.store.max_age,
    }
}

/// The store named by `store.url`: memory, or SQLite / PostgreSQL / MySQL (schema migrated at
/// start-up). Fails fast with the cause; never falls back to another backend.
async fn build_store(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    let backend = config.store.backend().map_err(|e| ServerError::Backend {
        setting: "store.url",
        message: e.to_string(),
    })?;
    match backend {
        StoreBackend::Memory => Ok(Arc::new(MemoryStore::new(retention(config)))),
        StoreBackend::Sqlite | StoreBackend::Postgres | StoreBackend::Mysql => {
            let options = herald_store_sql::Options {
                retention: retention(config),
                ..Default::default()
            };
            herald_store_sql::connect_with(&config.store.url, options)
                .await
                .map_err(|e| ServerError::Backend {
                    setting: "store.url",
                    message: e.to_string(),
                })
        }
    }
}

/// Serve on `listener` until `shutdown` is cancelled, then drain: refuse new connections,
/// send every client `reconnect` with a staggered `after_ms`, wait up to
/// `server.shutdown_grace` for them to leave, close the rest with 1012, and return.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Node::start(config, shutdown).await?.serve(listener).await
}

/// A node whose backends are connected and whose state is built, not yet serving: starting
/// fails fast (bad key file, unreachable store…) before anything is listening.
pub struct Node {
    state: Arc<AppState>,
    memory_history: Option<Arc<MemoryHistory>>,
    /// Stops the cluster backend's tasks, after the drain (clients still connected while
    /// draining keep receiving what other nodes publish).
    bus_stop: CancellationToken,
    /// The ingestion sources (they stop with the shutdown token).
    _sources: ingest::Sources,
}

impl Node {
    /// Connect the backends and build the state. `shutdown` stops the node once serving.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Node, ServerError> {
        let node_id: Arc<str> = config.server.node_id.as_str().into();
        let auth = Arc::new(JwtAuthenticator::new(&config.auth)?);
        let acl = Acl::from_config(config.topics.clone(), &config.auth.user_claim)?;
        let hub = Arc::new(Hub::new());
        let store = build_store(&config).await?;
        let bus_stop = CancellationToken::new();
        let seams = build_seams(&config, &node_id, &hub, bus_stop.clone()).await?;
        let bus = seams.bus;
        let commands = if config.upstream.commands.is_empty() {
            commands::Commands::empty()
        } else {
            commands::Commands::connect(&config.upstream, &node_id, bus_stop.clone())
                .await
                .map_err(|message| ServerError::Backend {
                    setting: "upstream",
                    message,
                })?
        };
        let metrics = metrics::Metrics::new();
        bus.attach(Arc::new(Router {
            hub: hub.clone(),
            metrics: metrics.clone(),
            auth: auth.clone(),
        }));
        hub.set_interest(bus.clone());
        // Revocations made on other nodes before this one started.
        match bus.revocations().await {
            Ok(events) => {
                for event in events {
                    if let ControlEvent::Revoke {
                        jti,
                        user,
                        at,
                        until,
                    } = event
                    {
                        auth.revoke(Revocation {
                            jti,
                            user,
                            at,
                            until,
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not load the cluster's revocations"),
        }

        let inbox = inbox::Inbox::new(config.store.retry_after, config.store.max_retries);
        let state = Arc::new(AppState {
            inbox,
            limiters: limits::Limiters::new(&config.limits),
            config,
            node_id,
            hub,
            bus,
            presence: seams.presence,
            commands,
            store,
            history: seams.history,
            order: publish::OrderLocks::default(),

            auth,
            acl,
            metrics,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
        });
        let sources = ingest::start(&state)
            .await
            .map_err(|message| ServerError::Backend {
                setting: "ingest",
                message,
            })?;
        Ok(Node {
            state,
            memory_history: seams.memory_history,
            bus_stop,
            _sources: sources,
        })
    }

    /// Serve on `listener` until the shutdown token is cancelled, then drain (see [`run`]).
    pub async fn serve(self, listener: TcpListener) -> Result<(), ServerError> {
        let Node {
            state,
            memory_history,
            bus_stop,
            _sources,
        } = self;
        let shutdown = state.shutdown.clone();
        let housekeeping = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut minute = tokio::time::interval(Duration::from_secs(60));
                // Retransmission timers are checked a few times per retry interval.
                let mut retransmit = tokio::time::interval(
                    (state.config.store.retry_after / 4).max(Duration::from_millis(50)),
                );
                let retention = retention(&state.config);
                loop {
                    tokio::select! {
                        _ = minute.tick() => {
                            state.limiters.housekeep();
                            if let Some(h) = &memory_history {
                                h.sweep();
                            }
                            match state.store.purge(retention).await {
                                Ok(0) => {}
                                Ok(n) => tracing::debug!(deleted = n, "inbox purge"),
                                Err(e) => tracing::warn!(error = %e, "inbox purge failed"),
                            }
                        }
                        _ = retransmit.tick() => state.inbox.tick(&state.hub, state.store.as_ref(), &state.metrics).await,
                        _ = state.shutdown.cancelled() => break,
                    }
                }
            })
        };

        let addr = listener.local_addr()?;
        tracing::info!(%addr, node_id = %state.node_id, "serving");
        let http = tokio::spawn(serve_http(
            listener,
            api::router(state.clone()),
            state.clone(),
        ));

        shutdown.cancelled().await;
        drain(&state).await;
        housekeeping.abort();
        bus_stop.cancel();
        if let Err(e) = http.await {
            tracing::warn!(error = %e, "http server task ended abnormally");
        }
        Ok(())
    }
}

/// The accept loop: one hyper HTTP/1 connection per socket, with upgrades (for `/ws`), a
/// header-read timeout of `limits.handshake_timeout` (a client that connects and sends
/// nothing is dropped), and the peer address given to handlers as `ConnectInfo`. On shutdown
/// it stops accepting, lets in-flight requests finish (idle keep-alive connections close at
/// once) and waits for them up to `write_timeout`.
async fn serve_http(listener: TcpListener, app: axum::Router, state: Arc<AppState>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.limits.handshake_timeout);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = state.shutdown.cancelled() => break,
        };
        // Latency matters more than packet count; writes are already coalesced per batch.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                async move { app.call(req.map(axum::body::Body::new)).await }
            });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let shutdown = state.shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(%peer, error = %e, "http connection ended");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let limit = state.config.limits.write_timeout;
    if tokio::time::timeout(limit, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!("some http connections were still open at shutdown");
    }
}

/// The graceful drain (SPEC §6): what must stay true is that no client is cut without a
/// `reconnect` first, and that the process ends within `shutdown_grace` plus one write timeout.
async fn drain(state: &Arc<AppState>) {
    state.draining.store(true, Ordering::Release);
    let grace = state.config.server.shutdown_grace;
    let spread = state.config.server.drain_spread.as_millis() as u64;
    let total = state.hub.connection_count();
    tracing::info!(
        connections = total,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    // Stagger reconnects over [0, spread] so clients do not all come back at once.
    let mut i = 0u64;
    state.hub.for_each_connection(|c| {
        let after_ms = if total <= 1 {
            0
        } else {
            spread * i / (total as u64 - 1)
        };
        i += 1;
        c.queue.push_frame(herald_proto::json::encode_reconnect(
            "node draining",
            after_ms,
        ));
    });
    let deadline = Instant::now() + grace;
    while state.hub.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state
        .hub
        .for_each_connection(|c| c.queue.close(close::SERVICE_RESTART, "server restart"));
    state.tasks.close();
    let limit = state.config.limits.write_timeout + Duration::from_secs(1);
    if tokio::time::timeout(limit, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
    tracing::info!("drained");
}
