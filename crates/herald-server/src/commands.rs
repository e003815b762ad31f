//! Upstream commands (SPEC §7, seed 003): a client's `command` goes to the service the command
//! map (`[upstream.commands.<NAME>]`) names, and the service's answer comes back to that
//! connection as a `command_reply`.
//!
//! The request is answered at once (`reply` with the `trace_id`, when it carried an `id`); the
//! forwarding runs in a task of its own, so a slow service never holds the connection. What the
//! client then gets:
//! - the service's reply `{code, message, data}` as `command_reply`;
//! - nothing when the service answered 202 (it replies later through `POST /api/v1/replies`);
//! - `command_reply` with code 504 when it did not answer within the command's timeout, 503
//!   when it cannot be reached, 502 when its answer is not a reply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::error::Error;
use herald_core::hub::ConnHandle;
use herald_core::identity::Identity;
use herald_ingest::command::{Envelope, Reply, Target, Upstream, UpstreamError, User};
use herald_ingest::config::UpstreamConfig;
use herald_ingest::http::{HttpUpstream, REPLY_LATER};
use herald_proto::json;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

/// One command of the map.
struct Route {
    target: Target,
    timeout: Duration,
}

/// The command map and the connections to its targets.
pub struct Commands {
    routes: HashMap<String, Route>,
    amqp: Option<Arc<dyn Upstream>>,
    nats: Option<Arc<dyn Upstream>>,
    http: Option<Arc<dyn Upstream>>,
}

impl Commands {
    /// Connects what the map needs (the config was validated: every target parses and has its
    /// connection configured). Fails fast when a broker is unreachable.
    pub async fn connect(
        cfg: &UpstreamConfig,
        node_id: &str,
        stop: CancellationToken,
    ) -> Result<Commands, String> {
        let mut routes = HashMap::new();
        let (mut amqp, mut nats, mut http) = (false, false, false);
        for (name, r) in &cfg.commands {
            let target = Target::parse(&r.target)?;
            match target {
                Target::Amqp { .. } => amqp = true,
                Target::Nats { .. } => nats = true,
                Target::Http { .. } => http = true,
            }
            routes.insert(
                name.clone(),
                Route {
                    target,
                    timeout: r.timeout.unwrap_or(cfg.timeout),
                },
            );
        }
        let amqp: Option<Arc<dyn Upstream>> = match (&cfg.amqp_url, amqp) {
            (Some(url), true) => Some(connect_amqp(url, node_id, stop.clone()).await?),
            _ => None,
        };
        let nats: Option<Arc<dyn Upstream>> = match (&cfg.nats_url, nats) {
            (Some(url), true) => Some(connect_nats(url).await?),
            _ => None,
        };
        let http: Option<Arc<dyn Upstream>> = if http {
            Some(Arc::new(HttpUpstream::new()?))
        } else {
            None
        };
        Ok(Commands {
            routes,
            amqp,
            nats,
            http,
        })
    }

    /// No commands configured.
    pub fn empty() -> Commands {
        Commands {
            routes: HashMap::new(),
            amqp: None,
            nats: None,
            http: None,
        }
    }

    fn upstream(&self, target: &Target) -> Option<Arc<dyn Upstream>> {
        match target {
            Target::Amqp { .. } => self.amqp.clone(),
            Target::Nats { .. } => self.nats.clone(),
            Target::Http { .. } => self.http.clone(),
        }
    }
}

#[cfg(feature = "amqp")]
async fn connect_amqp(
    url: &str,
    node_id: &str,
    stop: CancellationToken,
) -> Result<Arc<dyn Upstream>, String> {
    let u = herald_ingest::amqp::AmqpUpstream::connect(url, node_id, stop)
        .await
        .map_err(|e| format!("upstream.amqp_url: {e}"))?;
    Ok(u)
}

#[cfg(not(feature = "amqp"))]
async fn connect_amqp(_: &str, _: &str, _: CancellationToken) -> Result<Arc<dyn Upstream>, String> {
    Err("upstream.amqp_url: AMQP is not compiled into this build".into())
}

#[cfg(feature = "nats")]
async fn connect_nats(url: &str) -> Result<Arc<dyn Upstream>, String> {
    let u = herald_ingest::nats::NatsUpstream::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    Ok(u)
}

#[cfg(not(feature = "nats"))]
async fn connect_nats(_: &str) -> Result<Arc<dyn Upstream>, String> {
    Err("upstream.nats_url: NATS is not compiled into this build".into())
}

/// A command ready to go: what [`Forward::run`] needs, owned.
pub struct Forward {
    upstream: Arc<dyn Upstream>,
    target: Target,
    timeout: Duration,
    command: String,
    trace_id: String,
    envelope: Bytes,
    conn: Arc<ConnHandle>,
}

impl Commands {
    /// Checks the command and builds its envelope; `Err` (404 unknown command) is answered to
    /// the client at once.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        command: &str,
        trace_id: String,
        data: &RawValue,
        identity: &Identity,
        conn_id: &str,
        node_id: &str,
        conn: &Arc<ConnHandle>,
    ) -> Result<Forward, Error> {
        let route = self
            .routes
            .get(command)
            .ok_or_else(|| Error::NotFound(format!("unknown command: {command}")))?;
        let upstream = self
            .upstream(&route.target)
            .ok_or_else(|| Error::Internal(format!("no connection for the target of {command}")))?;
        // `id` is the user id's key in the envelope: a claim of that name is not repeated.
        let claims = if identity.claims.contains_key("id") {
            let mut c = identity.claims.clone();
            c.remove("id");
            std::borrow::Cow::Owned(c)
        } else {
            std::borrow::Cow::Borrowed(&identity.claims)
        };
        let envelope = Envelope {
            command,
            trace_id: &trace_id,
            user: User {
                id: &identity.user_id,
                claims: &claims,
            },
            conn_id,
            node_id,
            data,
        }
        .to_bytes();
        Ok(Forward {
            upstream,
            target: route.target.clone(),
            timeout: route.timeout,
            command: command.to_owned(),
            trace_id,
            envelope,
            conn: conn.clone(),
        })
    }
}

impl Forward {
    /// Sends the command and queues what the client gets (see the module doc).
    pub async fn run(self) {
        let result = self
            .upstream
            .call(&self.target, self.envelope, &self.trace_id, self.timeout)
            .await;
        let (code, message, data): (u16, String, Option<Box<RawValue>>) = match result {
            Ok(Reply { code, .. }) if code == REPLY_LATER => return,
            Ok(Reply {
                code,
                message,
                data,
            }) => {
                let message =
                    message.unwrap_or_else(|| if code == 0 { "success" } else { "" }.to_owned());
                (code, message, data)
            }
            Err(e) => {
                let code = match e {
                    UpstreamError::Timeout(_) => 504,
                    UpstreamError::Unavailable(_) => 503,
                    UpstreamError::BadReply(_) => 502,
                };
                tracing::debug!(trace_id = %self.trace_id, command = %self.command, error = %e, "command failed");
                (code, e.to_string(), None)
            }
        };
        self.conn.queue.push_frame(json::encode_command_reply(
            &self.command,
            &self.trace_id,
            code,
            &message,
            data.as_deref(),
        ));
    }
}
