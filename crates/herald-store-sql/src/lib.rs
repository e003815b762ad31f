//! Herald durable inboxes on SQL: the [`Store`] trait of `herald-core` on SQLite (the embedded
//! default), PostgreSQL and MySQL/MariaDB, each behind a cargo feature of the same name.
//!
//! # Layout
//! - this file: [`connect`] (the one factory: the backend is chosen by the scheme of
//!   `store.url`), [`Options`] and the public re-exports;
//! - [`error`]: [`SetupError`], every way start-up can fail, each naming `store.url`;
//! - `url`: scheme parsing;
//! - `backend`: the pools, connecting, migrations (`herald_schema_version`) and the batched
//!   multi-row insert of each backend;
//! - `store`: [`SqlStore`], the [`Store`] implementation; reads are written once and run on
//!   whichever pool is open;
//! - `writer`: the single writer task that turns concurrent `insert` calls into one
//!   transaction per batch, and concurrent status updates (`sent`, `acked`, retries,
//!   `failed`) into one more (group commit);
//! - `record`: conversions between [`herald_core::store::InboxRecord`] and rows, and the
//!   column limits.
//!
//! Data flows: `insert` → the writer's queue → one transaction for everything queued (a
//! multi-row insert that skips existing ids) → COMMIT → each caller is answered `New` or
//! `Duplicate`. Status updates take the same queue: those queued together share one
//! transaction (on SQLite and PostgreSQL one statement per kind and 500 messages). Reads go
//! straight to the pool.
//!
//! # Semantics
//!
//! Those of `herald_core::store::MemoryStore`, with one difference of timing: the memory
//! store trims an inbox to `max_per_user` on every insert, a SQL store only in
//! [`Store::purge`], which the gateway is expected to call periodically. Reads already skip
//! messages older than the retention age. Durability: PostgreSQL and MySQL commit as they are
//! configured; SQLite runs in WAL mode with `synchronous=FULL`: every commit (one per batch of
//! inserts) is fsynced before its callers are answered, so it survives a power failure too.
//!
//! # Schema (version 1)
//!
//! One table, `messages`: `seq` (auto-increment, insertion order), `id` (the message id,
//! unique across the store, up to 128 characters), `user_id`, `topic`, `event`, `payload`
//! (the JSON `data` as text), `trace_id` (nullable), `status` (`pending`, `sent`, `acked`,
//! `failed`), `retry_count`, `created_at` and `updated_at` (Unix milliseconds); indexes on
//! `(user_id, status, created_at)` for replay and on `created_at` for purging. Applied
//! versions are recorded in `herald_schema_version`.

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!("herald-store-sql needs at least one of its features: sqlite, postgres, mysql");

pub mod error;

mod backend;
mod record;
mod store;
mod url;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use herald_core::store::{Retention, Store};

pub use crate::error::SetupError;
pub use crate::store::{Backend, SqlStore, WriteStats};

/// The newest schema version this build knows (and applies at start-up).
pub const SCHEMA_VERSION: i32 = backend::SCHEMA_VERSION;

/// Tuning of a SQL store. [`Options::default`] suits a single gateway node.
#[derive(Debug, Clone)]
pub struct Options {
    /// Applied when reading: messages older than `max_age` are neither replayed nor listed.
    /// [`Store::purge`], called with the retention of the caller's choice, deletes them and
    /// enforces `max_per_user`.
    pub retention: Retention,
    /// Connections of the pool (SQLite in memory: always 1).
    pub max_connections: u32,
    /// How long an operation waits for a connection, and so how long start-up and calls wait
    /// for an unreachable database before failing.
    pub acquire_timeout: Duration,
    /// Bound on one batch write (connection, statements, commit). Past it the batch's callers
    /// get [`herald_core::store::StoreError::Unavailable`].
    pub write_timeout: Duration,
    /// Bound on `ping`.
    pub ping_timeout: Duration,
    /// Most inserts written in one transaction.
    pub batch_max: usize,
    /// Inserts waiting for the writer; callers past it wait for room (backpressure).
    pub queue_capacity: usize,
    /// SQLite: how long a statement waits for the file lock held by another connection.
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(2),
            batch_max: 500,
            queue_capacity: 8192,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens the store named by `store.url` (`sqlite://path`, `sqlite::memory:`, `postgres://…`,
/// `mysql://…` or `mariadb://…`) with default [`Options`], applies missing migrations, and
/// starts its writer. Fails fast, naming `store.url` and the cause.
///
/// Must be called within a tokio runtime (the writer is a task).
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, SetupError> {
    connect_with(url, Options::default()).await
}

/// [`connect`] with explicit [`Options`].
pub async fn connect_with(url: &str, options: Options) -> Result<Arc<dyn Store>, SetupError> {
    Ok(Arc::new(SqlStore::connect(url, options).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run with a subset of the features (`--no-default-features --features sqlite`) to see
    /// the others refused by name.
    #[tokio::test]
    async fn backends_not_compiled_are_named() {
        let urls = [
            (cfg!(feature = "sqlite"), "sqlite::memory:", "sqlite"),
            (
                cfg!(feature = "postgres"),
                "postgres://127.0.0.1:1/x",
                "postgres",
            ),
            (cfg!(feature = "mysql"), "mysql://127.0.0.1:1/x", "mysql"),
        ];
        for (compiled, url, feature) in urls {
            if compiled {
                continue;
            }
            let Err(e) = connect(url).await else {
                panic!("{url} connected without its backend");
            };
            assert!(matches!(e, SetupError::NotCompiled { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.starts_with("store.url: the "), "{msg}");
            assert!(msg.contains(&format!("cargo feature `{feature}`")), "{msg}");
        }
    }
}
