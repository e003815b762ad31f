//! Durable user inboxes behind the [`Store`] trait, and the in-memory implementation.
//!
//! A durable message is inserted before the publisher is answered, delivered to every
//! connection of its user with `ack:true`, marked `sent` once written, `acked` on the client's
//! `ack`, and replayed on every connect until acked. Ids are unique across the store: inserting
//! an id that exists is a no-op ([`Inserted::Duplicate`]), which makes publishes idempotent.
//!
//! [`MemoryStore`] keeps inboxes in this process only: they survive disconnects, not
//! restarts. SQL backends (SQLite, PostgreSQL, MySQL) implement the same trait.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::message::now_ms;

/// Delivery status of an inbox message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboxStatus {
    Pending,
    Sent,
    Acked,
    Failed,
}

impl InboxStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "sent" => Some(Self::Sent),
            "acked" => Some(Self::Acked),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Acked => "acked",
            Self::Failed => "failed",
        }
    }
}

/// One message of a user's inbox.
#[derive(Debug, Clone, Serialize)]
pub struct InboxRecord {
    pub id: String,
    pub user: String,
    pub topic: String,
    pub event: String,
    pub data: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub status: InboxStatus,
    pub retry_count: u32,
    /// Unix milliseconds.
    pub created_at: u64,
    pub updated_at: u64,
}

/// Whether an insert stored a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The id exists already: nothing stored, nothing to deliver.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Durable per-user inboxes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert(&self, record: InboxRecord) -> Result<Inserted, StoreError>;
    /// Messages not yet acked (pending, sent, failed), oldest first.
    async fn undelivered(&self, user: &str, limit: usize) -> Result<Vec<InboxRecord>, StoreError>;
    async fn mark_sent(&self, user: &str, ids: &[String]) -> Result<(), StoreError>;
    /// Mark acked; returns how many of `ids` were this user's unacked messages.
    async fn ack(&self, user: &str, ids: &[String]) -> Result<usize, StoreError>;
    /// Count one more delivery attempt of each of `ids` (those not acked).
    async fn record_retry(&self, user: &str, ids: &[String]) -> Result<(), StoreError>;
    /// Mark `ids` failed (delivery attempts exhausted); they are kept and still replayed on the
    /// next connect.
    async fn mark_failed(&self, user: &str, ids: &[String]) -> Result<(), StoreError>;
    /// Delete messages older than `retention.max_age` and, per user, all but the newest
    /// `retention.max_per_user`. Returns how many were deleted.
    async fn purge(&self, retention: Retention) -> Result<u64, StoreError>;
    /// The inbox, newest first, optionally filtered by status.
    async fn list(
        &self,
        user: &str,
        status: Option<InboxStatus>,
        limit: usize,
    ) -> Result<Vec<InboxRecord>, StoreError>;
    /// Reachability, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Retention limits of an inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per user; the oldest are evicted first.
    pub max_per_user: usize,
    /// Age after which a message is dropped.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_per_user: 1000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Default)]
struct Inboxes {
    by_user: HashMap<String, VecDeque<InboxRecord>>,
    /// id → user, for idempotency across the store.
    owner: HashMap<String, String>,
}

/// The in-process store (the `memory` backend).
#[derive(Default)]
pub struct MemoryStore {
    // Held for one map operation at a time; never across an await.
    inner: Mutex<Inboxes>,
    retention: Retention,
}

impl MemoryStore {
    pub fn new(retention: Retention) -> Self {
        Self {
            inner: Mutex::new(Inboxes::default()),
            retention,
        }
    }

    /// Apply `change` to this user's messages among `ids` that satisfy `when`, stamping
    /// `updated_at`; returns how many changed.
    fn update(
        &self,
        user: &str,
        ids: &[String],
        when: impl Fn(&InboxRecord) -> bool,
        mut change: impl FnMut(&mut InboxRecord),
    ) -> usize {
        let mut g = self.inner.lock();
        let now = now_ms();
        let Some(q) = g.by_user.get_mut(user) else {
            return 0;
        };
        let mut n = 0;
        for r in q.iter_mut().filter(|r| when(r) && ids.contains(&r.id)) {
            change(r);
            r.updated_at = now;
            n += 1;
        }
        n
    }

    fn expire(inboxes: &mut Inboxes, user: &str, retention: Retention) {
        let cutoff = now_ms().saturating_sub(retention.max_age.as_millis() as u64);
        let Inboxes { by_user, owner } = inboxes;
        if let Some(q) = by_user.get_mut(user) {
            while q.front().is_some_and(|r| r.created_at < cutoff)
                || q.len() > retention.max_per_user
            {
                if let Some(r) = q.pop_front() {
                    owner.remove(&r.id);
                }
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(&self, record: InboxRecord) -> Result<Inserted, StoreError> {
        let mut g = self.inner.lock();
        if g.owner.contains_key(&record.id) {
            return Ok(Inserted::Duplicate);
        }
        let user = record.user.clone();
        g.owner.insert(record.id.clone(), user.clone());
        g.by_user.entry(user.clone()).or_default().push_back(record);
        Self::expire(&mut g, &user, self.retention);
        Ok(Inserted::New)
    }

    async fn undelivered(&self, user: &str, limit: usize) -> Result<Vec<InboxRecord>, StoreError> {
        let mut g = self.inner.lock();
        Self::expire(&mut g, user, self.retention);
        Ok(g.by_user
            .get(user)
            .map(|q| {
                q.iter()
                    .filter(|r| r.status != InboxStatus::Acked)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn mark_sent(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(
            user,
            ids,
            |r| r.status == InboxStatus::Pending,
            |r| r.status = InboxStatus::Sent,
        );
        Ok(())
    }

    async fn ack(&self, user: &str, ids: &[String]) -> Result<usize, StoreError> {
        Ok(self.update(
            user,
            ids,
            |r| r.status != InboxStatus::Acked,
            |r| r.status = InboxStatus::Acked,
        ))
    }

    async fn list(
        &self,
        user: &str,
        status: Option<InboxStatus>,
        limit: usize,
    ) -> Result<Vec<InboxRecord>, StoreError> {
        let mut g = self.inner.lock();
        Self::expire(&mut g, user, self.retention);
        Ok(g.by_user
            .get(user)
            .map(|q| {
                q.iter()
                    .rev()
                    .filter(|r| status.is_none_or(|s| r.status == s))
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn record_retry(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(
            user,
            ids,
            |r| r.status != InboxStatus::Acked,
            |r| r.retry_count += 1,
        );
        Ok(())
    }

    async fn mark_failed(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(
            user,
            ids,
            |r| r.status != InboxStatus::Acked,
            |r| r.status = InboxStatus::Failed,
        );
        Ok(())
    }

    async fn purge(&self, retention: Retention) -> Result<u64, StoreError> {
        let mut g = self.inner.lock();
        let before: usize = g.by_user.values().map(VecDeque::len).sum();
        let users: Vec<String> = g.by_user.keys().cloned().collect();
        for u in &users {
            Self::expire(&mut g, u, retention);
        }
        g.by_user.retain(|_, q| !q.is_empty());
        let after: usize = g.by_user.values().map(VecDeque::len).sum();
        Ok((before - after) as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, user: &str) -> InboxRecord {
        InboxRecord {
            id: id.into(),
            user: user.into(),
            topic: format!("user/{user}"),
            event: "n".into(),
            data: RawValue::from_string("{}".into()).unwrap(),
            trace_id: None,
            status: InboxStatus::Pending,
            retry_count: 0,
            created_at: now_ms(),
            updated_at: now_ms(),
        }
    }

    #[tokio::test]
    async fn lifecycle_and_idempotency() {
        let s = MemoryStore::new(Retention {
            max_per_user: 2,
            ..Retention::default()
        });
        assert_eq!(s.insert(rec("1", "u")).await.unwrap(), Inserted::New);
        assert_eq!(s.insert(rec("1", "u")).await.unwrap(), Inserted::Duplicate);
        s.insert(rec("2", "u")).await.unwrap();
        s.mark_sent("u", &["1".into()]).await.unwrap();
        assert_eq!(
            s.list("u", Some(InboxStatus::Sent), 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(s.ack("u", &["1".into(), "nope".into()]).await.unwrap(), 1);
        assert_eq!(
            s.ack("other", &["2".into()]).await.unwrap(),
            0,
            "only the owner acks"
        );
        let und = s.undelivered("u", 10).await.unwrap();
        assert_eq!(und.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["2"]);
        s.insert(rec("3", "u")).await.unwrap();
        assert_eq!(
            s.list("u", None, 10).await.unwrap().len(),
            2,
            "oldest evicted past max_per_user"
        );
        assert_eq!(
            s.insert(rec("1", "u")).await.unwrap(),
            Inserted::New,
            "evicted ids are forgotten"
        );
    }
}
