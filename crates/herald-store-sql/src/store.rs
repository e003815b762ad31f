//! [`SqlStore`]: the [`Store`] trait on an open pool. Inserts and status updates go through
//! the batching writer; reads are written once here and compiled for each backend.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::message::now_ms;
use herald_core::store::{InboxRecord, InboxStatus, Inserted, Retention, Store, StoreError};
use sqlx::QueryBuilder;

use crate::Options;
use crate::backend::with_pool;
use crate::backend::{self, Pool};
use crate::error::SetupError;
use crate::record::{decode, distinct, to_db_count, to_db_ms};
use crate::writer::Writer;

/// Which SQL database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
            Self::MySql => "MySQL",
        }
    }

    /// The cargo feature of this crate that compiles the backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }
}

/// What the writer has committed since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteStats {
    /// Committed insert transactions (each holds one batch, or one record when a batch had
    /// to be split).
    pub transactions: u64,
    /// Records written by them, new or duplicate.
    pub records: u64,
}

/// Durable inboxes on SQLite, PostgreSQL or MySQL/MariaDB.
pub struct SqlStore {
    backend: Backend,
    pool: Pool,
    /// The writer's connections (for a SQLite file its own one, else `pool`).
    write_pool: Pool,
    writer: Writer,
    retention: Retention,
    /// Bound on a read or an update: a locked table must not hang a connection task.
    op_timeout: Duration,
    ping_timeout: Duration,
}

/// Status updates, each restricted to the user's rows not in a final state for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Update {
    Sent,
    Acked,
    Retry,
    Failed,
}

impl Update {
    /// `SET …` and the status condition of the rows it touches.
    pub(crate) fn sql(self) -> (&'static str, &'static str) {
        match self {
            Self::Sent => ("status = 'sent'", "status = 'pending'"),
            Self::Acked => ("status = 'acked'", "status <> 'acked'"),
            Self::Retry => ("retry_count = retry_count + 1", "status <> 'acked'"),
            Self::Failed => ("status = 'failed'", "status <> 'acked'"),
        }
    }
}

/// Longest start-up wait for migrations (MySQL waits 60 s for the lock itself).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(90);

/// Ids per `IN (…)` list.
pub(crate) const IDS_PER_STATEMENT: usize = 500;

impl SqlStore {
    /// Opens the store named by `url` (see [`crate::connect`]), applies missing migrations and
    /// starts the writer.
    pub async fn connect(url: &str, options: Options) -> Result<Self, SetupError> {
        let (backend, url) = crate::url::parse(url)?;
        let pool = backend::open(backend, &url, &options).await?;
        // Bounded: another node may hold the migration lock and hang.
        let found = match tokio::time::timeout(MIGRATE_TIMEOUT, backend::migrate(&pool)).await {
            Ok(found) => found.map_err(|e| e.into_setup(backend, &url))?,
            Err(_) => {
                return Err(SetupError::MigrationLocked {
                    url: herald_core::redact::url_password(&url),
                });
            }
        };
        tracing::info!(
            backend = backend.name(),
            url = %herald_core::redact::url_password(&url),
            schema_version = found.max(backend::SCHEMA_VERSION),
            "store opened"
        );
        let write_pool = backend::writer_pool(&pool, &url).await?;
        let writer = Writer::spawn(write_pool.clone(), backend, &options);
        Ok(Self {
            backend,
            pool,
            write_pool,
            writer,
            retention: options.retention,
            op_timeout: options.acquire_timeout + options.write_timeout,
            ping_timeout: options.ping_timeout,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Transactions and records the writer has committed (batching shows as far fewer
    /// transactions than records).
    pub fn write_stats(&self) -> WriteStats {
        self.writer.stats()
    }

    /// The schema version recorded in `herald_schema_version`.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        self.bounded(self.op_timeout, async {
            with_pool!(&self.pool, |p, Db| {
                let versions: Vec<i32> =
                    sqlx::query_scalar("SELECT version FROM herald_schema_version")
                        .fetch_all(p)
                        .await?;
                Ok(versions.into_iter().max().unwrap_or(0))
            })
        })
        .await
    }

    /// Closes the pool: waits for connections in use to be returned, then closes them all.
    /// Inserts still queued fail.
    pub async fn close(&self) {
        with_pool!(&self.pool, |p, Db| p.close().await);
        with_pool!(&self.write_pool, |p, Db| p.close().await);
    }

    /// Runs `op` within `limit`, mapping both failures to [`StoreError::Unavailable`].
    async fn bounded<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "{}: {e}",
                self.backend.name()
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: no answer within {limit:?}",
                self.backend.name()
            ))),
        }
    }

    /// Oldest `created_at` still within the retention age.
    fn cutoff(&self) -> i64 {
        to_db_ms(now_ms().saturating_sub(duration_ms(self.retention.max_age)))
    }

    /// Status changes go through the writer too: every change queued while a commit is in
    /// flight shares the next one (one fsync for many acks), instead of one commit each.
    async fn update(&self, update: Update, user: &str, ids: &[String]) -> Result<u64, StoreError> {
        let ids: Vec<String> = distinct(ids).into_iter().map(str::to_owned).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        self.writer.update(update, user.to_owned(), ids).await
    }

    async fn select(
        &self,
        user: &str,
        statuses: &[InboxStatus],
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<InboxRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let columns = backend::columns(self.backend);
        let cutoff = self.cutoff();
        self.bounded(self.op_timeout, async {
            with_pool!(&self.pool, |p, Db| {
                let mut qb = QueryBuilder::<Db>::new(format!(
                    "SELECT {columns} FROM messages WHERE user_id = "
                ));
                qb.push_bind(user);
                qb.push(" AND created_at >= ");
                qb.push_bind(cutoff);
                if !statuses.is_empty() {
                    qb.push(" AND status IN (");
                    let mut list = qb.separated(", ");
                    for s in statuses {
                        list.push_bind(s.as_str());
                    }
                    qb.push(")");
                }
                qb.push(if newest_first {
                    " ORDER BY created_at DESC, seq DESC LIMIT "
                } else {
                    " ORDER BY created_at, seq LIMIT "
                });
                qb.push_bind(to_db_count(limit));
                let rows = qb.build().fetch_all(p).await?;
                rows.iter().map(decode).collect::<Result<Vec<_>, _>>()
            })
        })
        .await
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Store for SqlStore {
    async fn insert(&self, record: InboxRecord) -> Result<Inserted, StoreError> {
        self.writer.insert(record).await
    }

    async fn undelivered(&self, user: &str, limit: usize) -> Result<Vec<InboxRecord>, StoreError> {
        use InboxStatus::{Failed, Pending, Sent};
        self.select(user, &[Pending, Sent, Failed], false, limit)
            .await
    }

    async fn mark_sent(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(Update::Sent, user, ids).await.map(drop)
    }

    async fn ack(&self, user: &str, ids: &[String]) -> Result<usize, StoreError> {
        let n = self.update(Update::Acked, user, ids).await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn record_retry(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(Update::Retry, user, ids).await.map(drop)
    }

    async fn mark_failed(&self, user: &str, ids: &[String]) -> Result<(), StoreError> {
        self.update(Update::Failed, user, ids).await.map(drop)
    }

    async fn purge(&self, retention: Retention) -> Result<u64, StoreError> {
        let cutoff = to_db_ms(now_ms().saturating_sub(duration_ms(retention.max_age)));
        let keep = to_db_count(retention.max_per_user);
        // Generous: a purge after a long outage may delete many rows.
        self.bounded(self.op_timeout * 6, async {
            with_pool!(&self.pool, |p, Db| {
                let mut by_age =
                    QueryBuilder::<Db>::new("DELETE FROM messages WHERE created_at < ");
                by_age.push_bind(cutoff);
                let aged = by_age.build().execute(p).await?.rows_affected();
                // Per user, all but the newest `keep` (in list order), looking only at users
                // over the limit. The derived table is materialized, which MySQL requires
                // to delete from the table it reads.
                let mut by_count = QueryBuilder::<Db>::new(
                    "DELETE FROM messages WHERE seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() \
                     OVER (PARTITION BY user_id ORDER BY created_at DESC, seq DESC) AS rn \
                     FROM messages WHERE user_id IN (SELECT user_id FROM messages GROUP BY \
                     user_id HAVING COUNT(*) > ",
                );
                by_count.push_bind(keep);
                by_count.push(")) ranked WHERE rn > ");
                by_count.push_bind(keep);
                by_count.push(")");
                let counted = by_count.build().execute(p).await?.rows_affected();
                Ok(aged + counted)
            })
        })
        .await
    }

    async fn list(
        &self,
        user: &str,
        status: Option<InboxStatus>,
        limit: usize,
    ) -> Result<Vec<InboxRecord>, StoreError> {
        let statuses: &[InboxStatus] = match &status {
            Some(s) => std::slice::from_ref(s),
            None => &[],
        };
        self.select(user, statuses, true, limit).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.ping_timeout, async {
            with_pool!(&self.pool, |p, Db| sqlx::query("SELECT 1")
                .execute(p)
                .await
                .map(drop))
        })
        .await
    }
}
