//! The one publish path: every message — from the HTTP API, a client `publish`, or (later)
//! an ingest source — goes through [`publish`].
//!
//! What it guarantees:
//! - a durable message is in the store before the caller is answered, and a publisher `id`
//!   that exists already stores and delivers nothing (`status: "duplicate"`);
//! - a topic with history gets the next gapless `seq`, a topic with `retain` keeps the message
//!   as its current value;
//! - **ordering**: appending to the history and handing to the bus happen under a per-topic
//!   lock (per `partition` key for topics without history), so messages of one topic, and of
//!   one partition key, reach the bus — and so every subscriber — in the order they were
//!   accepted. Subscribing with `since` or to a retained topic takes the same lock (see
//!   [`OrderLocks`]), so a resume can never interleave with live messages.

use std::hash::BuildHasher;
use std::sync::Arc;

use herald_core::error::Error;
use herald_core::message::MessageBuilder;
use herald_core::store::{InboxRecord, InboxStatus, Inserted};
use herald_core::topic::Topic;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};

use crate::state::AppState;

/// A publish request: the body of `POST /api/v1/publish`, an entry of a batch, and what
/// ingest sources carry.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub topic: String,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub durable: Option<bool>,
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub trace_id: Option<String>,
}

/// What a successful publish answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub seq: Option<u64>,
    /// `published`, `pending` (durable, stored) or `duplicate` (nothing stored or delivered).
    pub status: &'static str,
}

impl Published {
    pub fn to_json(&self, with_status: bool) -> Value {
        let mut v = json!({ "id": self.id });
        if let Some(seq) = self.seq {
            v["seq"] = json!(seq);
        }
        // A duplicate is always flagged: nothing was stored or delivered for it.
        if with_status || self.status == "duplicate" {
            v["status"] = json!(self.status);
        }
        v
    }
}

/// Ids, event names, trace ids, partition keys: 1 to 128 bytes, no control characters.
pub fn check_token(name: &str, v: &str) -> Result<(), Error> {
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
        return Err(Error::BadRequest(format!(
            "`{name}` must be 1 to 128 bytes with no control characters"
        )));
    }
    Ok(())
}

/// Per-key ordering locks (sharded: two keys may share a lock, which only costs concurrency).
/// Held across the history append and the bus hand-off, never across client I/O.
pub struct OrderLocks {
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<()>]>,
}

impl Default for OrderLocks {
    fn default() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            shards: (0..256).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl OrderLocks {
    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().await
    }
}

/// Publish one message. `from` is the publishing user for client publishes.
pub async fn publish(
    state: &AppState,
    req: PublishRequest,
    from: Option<&str>,
) -> Result<Published, Error> {
    let mut p = prepare(state, req, from)?;
    if let Some(dup) = store(state, &mut p).await? {
        return Ok(dup);
    }
    deliver(state, p, from).await
}

/// A validated publish, built once: the message, and its inbox record when durable.
pub struct Prepared {
    msg: herald_core::message::Message,
    record: Option<InboxRecord>,
    options: herald_core::acl::TopicOptions,
    partition: Option<String>,
    durable: bool,
}

/// Validates `req` and builds its message (no I/O).
pub fn prepare(
    state: &AppState,
    req: PublishRequest,
    from: Option<&str>,
) -> Result<Prepared, Error> {
    let topic = Topic::parse(&req.topic)?;
    let event = req.event.unwrap_or_else(|| "message".to_owned());
    check_token("event", &event)?;
    for (name, v) in [
        ("id", &req.id),
        ("trace_id", &req.trace_id),
        ("partition", &req.partition),
    ] {
        if let Some(v) = v {
            check_token(name, v)?;
        }
    }
    if req.ttl.is_some() {
        return Err(Error::BadRequest(
            "`ttl` is not supported by this build".into(),
        ));
    }
    let data = match req.data {
        Some(d) => d,
        None => {
            RawValue::from_string("null".to_owned()).map_err(|e| Error::Internal(e.to_string()))?
        }
    };
    let max = state.config.limits.max_message_size;
    if data.get().len() > max {
        return Err(Error::TooLarge(format!(
            "`data` is larger than {max} bytes"
        )));
    }
    let options = state.acl.options(&topic);
    let durable = req.durable.unwrap_or(options.durable);
    let inbox_user = if durable {
        Some(topic.inbox_owner().map(str::to_owned).ok_or_else(|| {
            Error::BadRequest(
                "durable messages go to a user's inbox: topic `user/{id}` or `user/{id}/…`".into(),
            )
        })?)
    } else {
        None
    };
    let mut b = MessageBuilder::new(topic, event, data);
    b.id = req.id;
    b.trace_id = req.trace_id;
    b.durable = durable;
    b.from = from.map(str::to_owned);
    let msg = b.build();
    let record = inbox_user.map(|user| InboxRecord {
        id: msg.id.to_string(),
        user,
        topic: msg.topic.as_str().to_owned(),
        event: msg.event.to_string(),
        data: msg.data.clone(),
        trace_id: msg.trace_id.as_deref().map(str::to_owned),
        status: InboxStatus::Pending,
        retry_count: 0,
        created_at: msg.ts,
        updated_at: msg.ts,
    });
    Ok(Prepared {
        msg,
        record,
        options,
        partition: req.partition,
        durable,
    })
}

/// Stores a durable message (committed before the publisher is answered); `Some` when the id
/// was already stored: a duplicate stores and delivers nothing. Ephemeral messages pass.
pub async fn store(state: &AppState, p: &mut Prepared) -> Result<Option<Published>, Error> {
    let Some(record) = p.record.take() else {
        return Ok(None);
    };
    if state.store.insert(record).await? == Inserted::Duplicate {
        return Ok(Some(Published {
            id: p.msg.id.to_string(),
            seq: None,
            status: "duplicate",
        }));
    }
    Ok(None)
}

/// Appends to history, retains, and hands the message to the bus, in publish order per topic
/// (or partition).
pub async fn deliver(
    state: &AppState,
    p: Prepared,
    from: Option<&str>,
) -> Result<Published, Error> {
    let Prepared {
        msg,
        options,
        partition,
        durable,
        ..
    } = p;
    let status = if durable {
        InboxStatus::Pending.as_str()
    } else {
        "published"
    };
    let ordered = options.history.is_some() || options.retain || partition.is_some();
    // Topics with history or a retained value are ordered per topic (subscribers resume under
    // the same lock); other topics per partition key when one is given.
    let key = match &partition {
        Some(p) if options.history.is_none() && !options.retain => p.as_str(),
        _ => msg.topic.as_str(),
    };
    let _guard = if ordered {
        Some(state.order.lock(key).await)
    } else {
        None
    };
    let (msg, published_on_append) = match options.history {
        Some(h) => (
            state.history.append(msg, h).await?,
            state.history.publishes_on_append(),
        ),
        None => (Arc::new(msg), false),
    };
    if options.retain {
        state.history.retain(msg.clone()).await?;
    }
    let published = Published {
        id: msg.id.to_string(),
        seq: msg.seq,
        status,
    };
    tracing::debug!(
        trace_id = msg.trace_id.as_deref(),
        topic = %msg.topic,
        id = %msg.id,
        seq = msg.seq,
        durable,
        "publish"
    );
    if from.is_some() {
        state.metrics.received_client.increment(1);
    } else {
        state.metrics.received_api.increment(1);
    }
    if !published_on_append {
        state.bus.publish(msg).await?;
    }
    Ok(published)
}
