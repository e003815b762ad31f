//! NATS: the source (`[ingest.nats]`, [`NatsIngest`]) and the `nats:<subject>` command
//! target ([`NatsUpstream`]).
//!
//! # Source
//!
//! Each configured subject (wildcards allowed) is queue-subscribed with `queue_group`
//! (default `herald-ingest`): in a cluster, NATS hands each message to one node of the group.
//! A message body is a publish request (the JSON of `POST /api/v1/publish`) or a user message
//! `{user, event, data, …}` ([`crate::map::normalize_body`]); it is submitted with source
//! `nats:<configured subject>`. Messages of one subject are handled one at a time, in order
//! (subjects run side by side, with no order between them). Configured subjects should not
//! overlap: a message that matches two of them is submitted twice.
//!
//! A message with a reply subject (a NATS request, `nats req …`) is answered:
//!
//! | outcome | reply |
//! | --- | --- |
//! | accepted | `{"id":"…","status":"published"}`, or `"pending"` when the message is durable (stored, awaiting delivery) |
//! | id already stored | `{"id":"…","status":"duplicate"}` (nothing stored or delivered) |
//! | malformed or refused | `{"code":400,"message":"…"}` |
//! | store or bus down | `{"code":503,"message":"…"}` (the publisher may retry) |
//!
//! Core NATS keeps nothing and has no dead-letter queue: a malformed or refused message is
//! logged and counted `rejected`; one that arrives while the gateway is unavailable is
//! counted `unavailable` and lost unless its publisher asked for a reply (it gets the 503 and
//! can retry). Messages published while this node is disconnected go to other members of the
//! queue group, or nowhere. A subscription that falls behind (more than 65,536 pending
//! messages) has messages dropped by the client (logged: "slow consumer"). Use JetStream or
//! RabbitMQ when each message must survive an outage.
//!
//! The client reconnects by itself (100 ms doubling to 5 s) and subscribes again;
//! [`NatsIngest::healthy`] is false meanwhile.
//!
//! Metrics: `herald_ingest_messages_total{source="nats:<subject>", outcome}` with `accepted`,
//! `duplicate`, `rejected`, `unavailable`. Core NATS gives no message timestamp and no
//! backlog: no lag or backlog gauge.
//!
//! # Command target
//!
//! [`NatsUpstream`] sends the command envelope as a NATS request to the subject (header
//! `X-Trace-Id` = the trace id) and waits for one reply, at most the command's timeout. The
//! reply body is a [`Reply`] `{code?, message?, data?}`; an empty body means "answered later
//! through `POST /api/v1/replies`" ([`crate::http::REPLY_LATER`]). Nobody subscribed to the
//! subject (NATS "no responders") → [`UpstreamError::Unavailable`] (503) at once; no reply in
//! time → [`UpstreamError::Timeout`] (504); a body that is not a reply →
//! [`UpstreamError::BadReply`] (502); NATS unreachable → [`UpstreamError::Unavailable`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, HeaderValue, Message, Request};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::command::{Reply, Target, Upstream, UpstreamError};
use crate::config::NatsSource;
use crate::{Rejected, Submit, map};

/// Connecting, and the round trip that confirms the subscriptions, give up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the source or the upstream could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{setting}: cannot connect to {url}: {message}")]
    Connect {
        setting: &'static str,
        url: String,
        message: String,
    },
    #[error("ingest.nats.subjects: give at least one subject")]
    NoSubjects,
    #[error("ingest.nats: cannot subscribe to {subject:?} (queue group {group:?}): {message}")]
    Subscribe {
        subject: String,
        group: String,
        message: String,
    },
}

/// The running source: [`NatsIngest::start`] connects, subscribes and spawns one task per
/// subject; they end with the shutdown token.
pub struct NatsIngest {
    client: Client,
}

impl NatsIngest {
    /// Connects and subscribes every subject (failing fast when NATS is unreachable or a
    /// subject or the queue group is invalid); returns once the server has registered the
    /// subscriptions.
    pub async fn start(
        cfg: NatsSource,
        submit: Arc<dyn Submit>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        if cfg.subjects.is_empty() {
            return Err(StartError::NoSubjects);
        }
        let client = connect(&cfg.url, "ingest.nats.url", "herald ingest").await?;
        let mut subscribers = Vec::with_capacity(cfg.subjects.len());
        for subject in &cfg.subjects {
            let sub = client
                .queue_subscribe(subject.clone(), cfg.queue_group.clone())
                .await
                .map_err(|e| StartError::Subscribe {
                    subject: subject.clone(),
                    group: cfg.queue_group.clone(),
                    message: e.to_string(),
                })?;
            subscribers.push((subject.clone(), sub));
        }
        round_trip(&client).await;
        for (subject, sub) in subscribers {
            let worker = Worker {
                client: client.clone(),
                submit: submit.clone(),
                source: format!("nats:{subject}"),
            };
            tokio::spawn(worker.run(sub, shutdown.clone()));
        }
        info!(
            url = %herald_core::redact::url_password(&cfg.url),
            subjects = ?cfg.subjects,
            queue_group = %cfg.queue_group,
            "nats ingest subscribed"
        );
        Ok(Arc::new(Self { client }))
    }

    /// Connected (false while the client reconnects).
    pub fn healthy(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// Consumes one subscription.
struct Worker {
    client: Client,
    submit: Arc<dyn Submit>,
    /// `nats:<configured subject>`.
    source: String,
}

impl Worker {
    async fn run(self, mut sub: async_nats::Subscriber, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                m = sub.next() => match m {
                    Some(m) => self.handle(m).await,
                    None => break,
                },
            }
        }
        // Dropping the subscriber unsubscribes: the group's other members take what follows.
        debug!(source = %self.source, "nats ingest: subscription ended");
    }

    async fn handle(&self, msg: Message) {
        let answer = match map::normalize_body(&msg.payload) {
            Err(e) => {
                warn!(source = %self.source, subject = %msg.subject, error = %e,
                      "nats ingest: dropped a malformed message");
                self.count("rejected");
                json!({"code": 400, "message": e})
            }
            Ok(body) => match self.submit.submit(&self.source, &body).await {
                Ok(s) => {
                    let status = if s.duplicate {
                        self.count("duplicate");
                        "duplicate"
                    } else {
                        self.count("accepted");
                        if s.stored { "pending" } else { "published" }
                    };
                    json!({"id": s.id, "status": status})
                }
                Err(Rejected::Invalid(e)) => {
                    warn!(source = %self.source, subject = %msg.subject, error = %e,
                          "nats ingest: the gateway refused a message");
                    self.count("rejected");
                    json!({"code": 400, "message": e})
                }
                Err(Rejected::Unavailable(e)) => {
                    warn!(source = %self.source, subject = %msg.subject, error = %e,
                          replied = msg.reply.is_some(),
                          "nats ingest: the gateway is unavailable; message not taken");
                    self.count("unavailable");
                    json!({"code": 503, "message": e})
                }
            },
        };
        if let Some(reply) = msg.reply {
            let bytes = Bytes::from(answer.to_string());
            if let Err(e) = self.client.publish(reply, bytes).await {
                warn!(source = %self.source, error = %e, "nats ingest: could not send a reply");
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("herald_ingest_messages_total",
            "source" => self.source.clone(), "outcome" => outcome)
        .increment(1);
    }
}

/// The `nats:<subject>` command target.
pub struct NatsUpstream {
    client: Client,
}

impl NatsUpstream {
    /// Connects to `upstream.nats_url` (failing fast when NATS is unreachable).
    pub async fn connect(url: &str) -> Result<Arc<Self>, StartError> {
        let client = connect(url, "upstream.nats_url", "herald upstream").await?;
        Ok(Arc::new(Self { client }))
    }
}

#[async_trait]
impl Upstream for NatsUpstream {
    async fn call(
        &self,
        target: &Target,
        envelope: Bytes,
        trace_id: &str,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError> {
        let Target::Nats { subject } = target else {
            return Err(UpstreamError::Unavailable(format!(
                "{target:?} is not a NATS target"
            )));
        };
        if self.client.connection_state() != State::Connected {
            return Err(UpstreamError::Unavailable(
                "NATS is unreachable (reconnecting)".into(),
            ));
        }
        let mut request = Request::new().payload(envelope).timeout(Some(timeout));
        if let Ok(v) = trace_id.parse::<HeaderValue>() {
            let mut headers = HeaderMap::new();
            headers.insert("X-Trace-Id", v);
            request = request.headers(headers);
        }
        let reply = match self.client.send_request(subject.clone(), request).await {
            Ok(m) => m,
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::TimedOut => UpstreamError::Timeout(timeout),
                    RequestErrorKind::NoResponders => {
                        UpstreamError::Unavailable(format!("no service listens on {subject}"))
                    }
                    _ => UpstreamError::Unavailable(format!("{subject}: {e}")),
                });
            }
        };
        if reply.payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(Reply {
                code: crate::http::REPLY_LATER,
                message: None,
                data: None,
            });
        }
        serde_json::from_slice(&reply.payload).map_err(|e| {
            UpstreamError::BadReply(format!(
                "{subject}: the reply is not {{code, message, data}}: {e}"
            ))
        })
    }
}

/// A client that reconnects by itself, 100 ms doubling to 5 s.
async fn connect(url: &str, setting: &'static str, name: &str) -> Result<Client, StartError> {
    ConnectOptions::new()
        .name(name)
        .connection_timeout(IO_TIMEOUT)
        .reconnect_delay_callback(|attempts| {
            let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            Duration::from_millis(100u64.saturating_mul(2u64.saturating_pow(exp.min(10))))
                .min(Duration::from_secs(5))
        })
        .event_callback(move |event| async move {
            match event {
                Event::Disconnected => warn!(setting, "nats: disconnected; reconnecting"),
                Event::Connected => info!(setting, "nats: connected"),
                Event::SlowConsumer(sid) => warn!(
                    setting,
                    sid,
                    "nats: slow consumer: a subscription fell behind and messages were dropped"
                ),
                other => debug!(setting, event = %other, "nats event"),
            }
        })
        .connect(url)
        .await
        .map_err(|e| StartError::Connect {
            setting,
            url: herald_core::redact::url_password(url),
            message: e.to_string(),
        })
}

/// A request nobody answers: when the server's "no responders" comes back, it has processed
/// every subscription sent before (one connection is handled in order).
async fn round_trip(client: &Client) {
    let request = Request::new().timeout(Some(IO_TIMEOUT));
    match client.send_request(client.new_inbox(), request).await {
        Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
        other => {
            debug!(result = ?other.map(|_| ()), "nats: unexpected answer to the sync round trip")
        }
    }
}
