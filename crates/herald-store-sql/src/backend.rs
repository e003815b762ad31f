//! The three backends: opening a pool, migrating the schema, and the batched insert. What is
//! the same everywhere is written once in `store.rs` through [`with_pool!`].

use std::collections::HashSet;
use std::ops::Range;

use herald_core::store::InboxRecord;
use sqlx::QueryBuilder;

use crate::Options;
use crate::error::SetupError;
use crate::record::to_db_ms;
use crate::store::Backend;

/// The newest schema version (the number of entries of each `MIGRATIONS` list).
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// An open pool of one backend. Cheap to clone (the pools are reference-counted).
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
}

/// Runs `$body` with `$p` bound to the concrete pool and `$db` naming its database type, so
/// code written once is compiled for each backend.
macro_rules! with_pool {
    ($pool:expr, |$p:ident, $db:ident| $body:expr) => {
        // On the place, not the reference: with no backend compiled in, `Pool` is empty and
        // so is this match.
        match *$pool {
            #[cfg(feature = "sqlite")]
            $crate::backend::Pool::Sqlite(ref $p) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                $body
            }
            #[cfg(feature = "postgres")]
            $crate::backend::Pool::Postgres(ref $p) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                $body
            }
            #[cfg(feature = "mysql")]
            $crate::backend::Pool::MySql(ref $p) => {
                #[allow(dead_code)]
                type $db = sqlx::MySql;
                $body
            }
        }
    };
}
pub(crate) use with_pool;

/// The column list of reads on `backend`. MySQL keeps `id` and `user_id` as VARBINARY (exact,
/// no trailing-space padding in comparisons), so they are converted back to text.
pub(crate) fn columns(backend: Backend) -> &'static str {
    match backend {
        Backend::MySql => {
            "CONVERT(id USING utf8mb4), CONVERT(user_id USING utf8mb4), topic, event, payload, \
             trace_id, status, retry_count, created_at, updated_at"
        }
        Backend::Sqlite | Backend::Postgres => crate::record::COLUMNS,
    }
}

// --- opening ------------------------------------------------------------------------------

/// Opens the pool of `backend` (the URL already normalized) and checks that it connects.
pub(crate) async fn open(
    backend: Backend,
    url: &str,
    options: &Options,
) -> Result<Pool, SetupError> {
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => open_sqlite(url, options).await,
        #[cfg(feature = "postgres")]
        Backend::Postgres => open_postgres(url, options).await,
        #[cfg(feature = "mysql")]
        Backend::MySql => open_mysql(url, options).await,
        #[allow(unreachable_patterns)]
        other => Err(SetupError::NotCompiled {
            backend: other.name(),
            feature: other.feature(),
        }),
    }
}

fn invalid_url(backend: Backend, url: &str) -> impl FnOnce(sqlx::Error) -> SetupError {
    let url = herald_core::redact::url_password(url);
    move |source| SetupError::InvalidUrl {
        backend: backend.name(),
        url,
        source,
    }
}

fn connect_failed(backend: Backend, url: &str) -> impl FnOnce(sqlx::Error) -> SetupError {
    let url = herald_core::redact::url_password(url);
    move |source| SetupError::Connect {
        backend: backend.name(),
        url,
        cause: crate::error::connect_cause(&source),
        source,
    }
}

/// One direct connection before the pool is built: a refused connection fails at once with
/// its real cause, where the pool would retry until its acquire timeout and report only that.
async fn probe<C: sqlx::Connection>(
    opts: &<C as sqlx::Connection>::Options,
    limit: std::time::Duration,
) -> Result<(), sqlx::Error> {
    match tokio::time::timeout(limit, C::connect_with(opts)).await {
        Ok(Ok(conn)) => {
            // Closing politely is a courtesy; the pool opens its own connections.
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        ))),
    }
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(url: &str, o: &Options) -> Result<Pool, SetupError> {
    use std::str::FromStr;

    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };

    let opts = SqliteConnectOptions::from_str(url).map_err(invalid_url(Backend::Sqlite, url))?;
    let opts = opts
        .busy_timeout(o.busy_timeout)
        // FULL: each (batched) commit is fsynced before the publisher is answered, so an
        // acknowledged durable message survives a power failure too, not only a crash.
        .synchronous(SqliteSynchronous::Full)
        // Statement journals (multi-row statements inside a batch transaction) in memory, not
        // in temporary files: they only matter until the statement ends.
        .pragma("temp_store", "MEMORY");
    let in_memory = is_sqlite_memory(url);
    let (opts, pool) = if in_memory {
        // One connection, kept for the life of the pool: the database lives and dies with it.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        (opts, pool)
    } else {
        let file = opts.get_filename().to_path_buf();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|source| SetupError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        // No ping before each acquire: the database is a local file, and the ping is one more
        // round trip to the connection's thread on every transaction of the writer.
        let pool = SqlitePoolOptions::new()
            .max_connections(o.max_connections.max(1))
            .test_before_acquire(false);
        (opts, pool)
    };
    if !in_memory {
        probe::<sqlx::SqliteConnection>(&opts, o.acquire_timeout)
            .await
            .map_err(connect_failed(Backend::Sqlite, url))?;
    }
    let pool = pool
        .acquire_timeout(o.acquire_timeout)
        .connect_with(opts)
        .await
        .map_err(connect_failed(Backend::Sqlite, url))?;
    Ok(Pool::Sqlite(pool))
}

/// The writer's pool. For a SQLite file: its own connection, kept open, so the one connection
/// that writes keeps a warm page cache and the writer never waits for a connection (the
/// shared pool hands out a different connection on each transaction, whose cache the other
/// connections' writes have made stale). Otherwise the pool itself: an in-memory SQLite
/// database lives in its one connection; PostgreSQL and MySQL cache on the server.
pub(crate) async fn writer_pool(pool: &Pool, url: &str) -> Result<Pool, SetupError> {
    match pool {
        #[cfg(feature = "sqlite")]
        Pool::Sqlite(p) if !is_sqlite_memory(url) => {
            let writer = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .test_before_acquire(false)
                .acquire_timeout(p.options().get_acquire_timeout())
                .connect_with((*p.connect_options()).clone())
                .await
                .map_err(connect_failed(Backend::Sqlite, url))?;
            Ok(Pool::Sqlite(writer))
        }
        other => Ok(other.clone()),
    }
}

/// `sqlite::memory:`, `sqlite://:memory:` or `mode=memory`: sqlx shares one named in-memory
/// database between the connections of a pool.
#[cfg(feature = "sqlite")]
fn is_sqlite_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (db, params) = rest.split_once('?').unwrap_or((rest, ""));
    db == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, o: &Options) -> Result<Pool, SetupError> {
    use std::str::FromStr;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    let mut opts = PgConnectOptions::from_str(url).map_err(invalid_url(Backend::Postgres, url))?;
    if opts.get_application_name().is_none() {
        opts = opts.application_name("herald");
    }
    probe::<sqlx::PgConnection>(&opts, o.acquire_timeout)
        .await
        .map_err(connect_failed(Backend::Postgres, url))?;
    let pool = PgPoolOptions::new()
        .max_connections(o.max_connections.max(1))
        .acquire_timeout(o.acquire_timeout)
        .connect_with(opts)
        .await
        .map_err(connect_failed(Backend::Postgres, url))?;
    Ok(Pool::Postgres(pool))
}

#[cfg(feature = "mysql")]
async fn open_mysql(url: &str, o: &Options) -> Result<Pool, SetupError> {
    use std::str::FromStr;

    use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

    let opts = MySqlConnectOptions::from_str(url).map_err(invalid_url(Backend::MySql, url))?;
    probe::<sqlx::MySqlConnection>(&opts, o.acquire_timeout)
        .await
        .map_err(connect_failed(Backend::MySql, url))?;
    let pool = MySqlPoolOptions::new()
        .max_connections(o.max_connections.max(1))
        .acquire_timeout(o.acquire_timeout)
        .connect_with(opts)
        .await
        .map_err(connect_failed(Backend::MySql, url))?;
    Ok(Pool::MySql(pool))
}

// --- migrations ---------------------------------------------------------------------------

/// Version `i + 1` of the schema is `MIGRATIONS[i]`, applied in order, each once.
#[cfg(feature = "sqlite")]
const SQLITE_MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE messages (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        event TEXT NOT NULL,
        payload TEXT NOT NULL,
        trace_id TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'acked', 'failed')),
        retry_count INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )",
    "CREATE INDEX messages_user_status_created ON messages (user_id, status, created_at)",
    "CREATE INDEX messages_created ON messages (created_at)",
]];

#[cfg(feature = "postgres")]
const POSTGRES_MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE messages (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id VARCHAR(128) NOT NULL UNIQUE,
        user_id VARCHAR(255) NOT NULL,
        topic VARCHAR(256) NOT NULL,
        event VARCHAR(128) NOT NULL,
        payload TEXT NOT NULL,
        trace_id VARCHAR(128),
        status VARCHAR(8) NOT NULL CHECK (status IN ('pending', 'sent', 'acked', 'failed')),
        retry_count INTEGER NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    "CREATE INDEX messages_user_status_created ON messages (user_id, status, created_at)",
    "CREATE INDEX messages_created ON messages (created_at)",
]];

/// MySQL DDL commits implicitly, so each version is one statement with its indexes inline;
/// `IF NOT EXISTS` makes a version interrupted before it was recorded safe to run again.
/// `id` and `user_id` are VARBINARY: byte-exact, where every text collation of MySQL and
/// MariaDB either folds case or ignores trailing spaces (`'a' = 'a '`).
#[cfg(feature = "mysql")]
const MYSQL_MIGRATIONS: &[&[&str]] = &[&["CREATE TABLE IF NOT EXISTS messages (
        seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        id VARBINARY(512) NOT NULL,
        user_id VARBINARY(1020) NOT NULL,
        topic VARCHAR(256) NOT NULL,
        event VARCHAR(128) NOT NULL,
        payload MEDIUMTEXT NOT NULL,
        trace_id VARCHAR(128),
        status VARCHAR(8) NOT NULL CHECK (status IN ('pending', 'sent', 'acked', 'failed')),
        retry_count INT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        UNIQUE KEY messages_id (id),
        KEY messages_user_status_created (user_id, status, created_at),
        KEY messages_created (created_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"]];

/// Why migrating failed.
pub(crate) enum MigrateError {
    Sql(sqlx::Error),
    TooNew(i32),
    #[cfg(feature = "mysql")]
    Locked,
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

impl MigrateError {
    pub(crate) fn into_setup(self, backend: Backend, url: &str) -> SetupError {
        let url = herald_core::redact::url_password(url);
        match self {
            Self::Sql(source) => SetupError::Migrate {
                backend: backend.name(),
                url,
                source,
            },
            Self::TooNew(found) => SetupError::SchemaTooNew {
                url,
                found,
                known: SCHEMA_VERSION,
            },
            #[cfg(feature = "mysql")]
            Self::Locked => SetupError::MigrationLocked { url },
        }
    }
}

/// Creates `herald_schema_version` if needed and applies the missing versions of
/// `$migrations` on the connection `$conn`, recording each. Evaluates to the version found.
macro_rules! apply_migrations {
    ($conn:expr, $migrations:expr) => {{
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS herald_schema_version (
                version INTEGER NOT NULL PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )",
        )
        .execute(&mut *$conn)
        .await?;
        let applied: Vec<i32> = sqlx::query_scalar("SELECT version FROM herald_schema_version")
            .fetch_all(&mut *$conn)
            .await?;
        let found = applied.into_iter().max().unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(MigrateError::TooNew(found));
        }
        for (version, statements) in (1..).zip($migrations.iter()) {
            if version <= found {
                continue;
            }
            for statement in statements.iter() {
                sqlx::query(*statement).execute(&mut *$conn).await?;
            }
            let mut record = QueryBuilder::new(
                "INSERT INTO herald_schema_version (version, applied_at) VALUES (",
            );
            record.push_bind(version);
            record.push(", ");
            record.push_bind(to_db_ms(herald_core::message::now_ms()));
            record.push(")");
            record.build().execute(&mut *$conn).await?;
            tracing::info!(version, "store schema migrated");
        }
        found
    }};
}

/// Applies the missing schema versions, serialized between nodes starting at once.
pub(crate) async fn migrate(pool: &Pool) -> Result<i32, MigrateError> {
    match pool {
        // SQLite: BEGIN IMMEDIATE takes the file's write lock before anything is read.
        #[cfg(feature = "sqlite")]
        Pool::Sqlite(p) => {
            let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
            let found = apply_migrations!(tx, SQLITE_MIGRATIONS);
            tx.commit().await?;
            Ok(found)
        }
        // PostgreSQL: DDL is transactional; a transaction-scoped advisory lock (per schema)
        // makes a second node wait, then see the versions the first one recorded.
        #[cfg(feature = "postgres")]
        Pool::Postgres(p) => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "SELECT pg_advisory_xact_lock(1751478892, hashtext(COALESCE(current_schema(), '')))",
            )
            .execute(&mut *tx)
            .await?;
            let found = apply_migrations!(tx, POSTGRES_MIGRATIONS);
            tx.commit().await?;
            Ok(found)
        }
        // MySQL: DDL is not transactional; a named lock (per database) held by this session
        // serializes nodes. It is released on every path, and by the server if we vanish.
        #[cfg(feature = "mysql")]
        Pool::MySql(p) => {
            const LOCK: &str = "LEFT(CONCAT('herald_schema:', COALESCE(DATABASE(), '')), 64)";
            let mut conn = p.acquire().await?;
            let got: Option<i64> = sqlx::query_scalar(&format!("SELECT GET_LOCK({LOCK}, 60)"))
                .fetch_one(&mut *conn)
                .await?;
            if got != Some(1) {
                return Err(MigrateError::Locked);
            }
            let result: Result<i32, MigrateError> =
                async { Ok(apply_migrations!(conn, MYSQL_MIGRATIONS)) }.await;
            let released = sqlx::query(&format!("DO RELEASE_LOCK({LOCK})"))
                .execute(&mut *conn)
                .await;
            let found = result?;
            released?;
            Ok(found)
        }
    }
}

// --- the batched insert -------------------------------------------------------------------

/// What a failed batch says about what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Deadlock or serialization failure with another writer: the same batch again.
    Conflict,
    /// The database refused something in the batch: split it to find the record.
    Record,
    /// Unreachable, shutting down, or waiting on a lock past its timeout: give up now.
    Unavailable,
}

/// Classifies an error of [`insert_batch`] (the transaction was rolled back in every case).
pub(crate) fn classify(backend: Backend, e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match backend {
                // Extended result codes; the primary code is the low byte. BUSY and LOCKED
                // mean the busy timeout passed with the file still locked.
                Backend::Sqlite => match code.parse::<u32>().map(|c| c & 0xff) {
                    Ok(5 | 6) => Failure::Unavailable,
                    _ => Failure::Record,
                },
                // SQLSTATE: 40001 serialization failure (MySQL: deadlock 1213), 40P01 deadlock;
                // class 08 connection exception, 57 operator intervention (shutdown), 53
                // insufficient resources, 55P03 lock not available. MySQL's lock wait timeout
                // (1205) has the generic HY000 and is told by its message.
                Backend::Postgres | Backend::MySql => match code.as_ref() {
                    "40001" | "40P01" => Failure::Conflict,
                    "55P03" => Failure::Unavailable,
                    c if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                        Failure::Unavailable
                    }
                    _ if db.message().contains("Lock wait timeout") => Failure::Unavailable,
                    _ => Failure::Record,
                },
            }
        }
        sqlx::Error::Encode(_) => Failure::Record,
        _ => Failure::Unavailable,
    }
}

/// Rows per INSERT statement, and a budget of payload bytes per statement (MySQL refuses a
/// packet over `max_allowed_packet`, 4 MiB on old servers).
const ROWS_PER_STATEMENT: usize = 500;
const BYTES_PER_STATEMENT: usize = 2 * 1024 * 1024;

/// Splits `recs` into the ranges written by one statement each (never empty, at least one
/// record each).
pub(crate) fn statements(recs: &[InboxRecord]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, r) in recs.iter().enumerate() {
        let size = r.data.get().len() + r.id.len() + r.user.len() + r.topic.len() + r.event.len();
        if i > start && (i - start == ROWS_PER_STATEMENT || bytes + size > BYTES_PER_STATEMENT) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < recs.len() {
        out.push(start..recs.len());
    }
    out
}

/// The INSERT of `$chunk` into `$qb`, columns and VALUES, without the conflict clause.
macro_rules! push_insert {
    ($qb:expr, $chunk:expr) => {
        $qb.push(
            " INTO messages (id, user_id, topic, event, payload, trace_id, status, retry_count, \
             created_at, updated_at) ",
        );
        $qb.push_values($chunk, |mut row, r| {
            row.push_bind(r.id.as_str())
                .push_bind(r.user.as_str())
                .push_bind(r.topic.as_str())
                .push_bind(r.event.as_str())
                .push_bind(r.data.get())
                .push_bind(r.trace_id.as_deref())
                .push_bind(r.status.as_str())
                .push_bind(i32::try_from(r.retry_count).unwrap_or(i32::MAX))
                .push_bind(to_db_ms(r.created_at))
                .push_bind(to_db_ms(r.updated_at));
        });
    };
}

/// One transaction of multi-row `INSERT … ON CONFLICT (id) DO NOTHING RETURNING id` (SQLite
/// and PostgreSQL, which differ only in their sqlx database type): which records were new.
macro_rules! insert_returning {
    ($pool:expr, $db:ty, $recs:expr) => {{
        let recs = $recs;
        let mut tx = $pool.begin().await?;
        let mut new: HashSet<String> = HashSet::with_capacity(recs.len());
        for range in statements(recs) {
            let mut qb = QueryBuilder::<$db>::new("INSERT");
            push_insert!(qb, &recs[range]);
            qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
            let ids: Vec<String> = qb
                .build_query_scalar()
                .persistent(false)
                .fetch_all(&mut *tx)
                .await?;
            new.extend(ids);
        }
        tx.commit().await?;
        Ok(recs.iter().map(|r| new.contains(&r.id)).collect())
    }};
}

/// Writes `recs` (distinct ids) in one transaction, skipping ids that exist; says for each
/// whether it was new. Returns only after COMMIT; on error everything was rolled back.
pub(crate) async fn insert_batch(
    pool: &Pool,
    recs: &[InboxRecord],
) -> Result<Vec<bool>, sqlx::Error> {
    if recs.is_empty() {
        return Ok(Vec::new());
    }
    match pool {
        #[cfg(feature = "sqlite")]
        Pool::Sqlite(p) => insert_returning!(p, sqlx::Sqlite, recs),
        #[cfg(feature = "postgres")]
        Pool::Postgres(p) => insert_returning!(p, sqlx::Postgres, recs),
        // MySQL has no RETURNING: select the ids that exist, insert the others with INSERT
        // IGNORE, and trust the affected-row count when it settles the question (all or none
        // inserted). Anything in between means another writer inserted some of these ids
        // since we looked: back to a savepoint, and one statement per row, where the count is
        // exact. Still one transaction, one commit.
        #[cfg(feature = "mysql")]
        Pool::MySql(p) => {
            use sqlx::Connection as _;

            let mut tx = p.begin().await?;
            let mut new: HashSet<&str> = HashSet::with_capacity(recs.len());
            for range in statements(recs) {
                let chunk = &recs[range];
                let mut qb =
                    QueryBuilder::<sqlx::MySql>::new("SELECT id FROM messages WHERE id IN (");
                let mut list = qb.separated(", ");
                for r in chunk {
                    list.push_bind(r.id.as_str());
                }
                qb.push(")");
                let existing: HashSet<Vec<u8>> = qb
                    .build_query_scalar::<Vec<u8>>()
                    .persistent(false)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
                let fresh: Vec<&InboxRecord> = chunk
                    .iter()
                    .filter(|r| !existing.contains(r.id.as_bytes()))
                    .collect();
                if fresh.is_empty() {
                    continue;
                }
                let mut savepoint = tx.begin().await?;
                let mut qb = QueryBuilder::<sqlx::MySql>::new("INSERT IGNORE");
                push_insert!(qb, fresh.iter().copied());
                let inserted = qb
                    .build()
                    .persistent(false)
                    .execute(&mut *savepoint)
                    .await?
                    .rows_affected();
                if inserted == fresh.len() as u64 || inserted == 0 {
                    savepoint.commit().await?;
                    if inserted != 0 {
                        new.extend(fresh.iter().map(|r| r.id.as_str()));
                    }
                    continue;
                }
                savepoint.rollback().await?;
                for r in fresh {
                    let mut qb = QueryBuilder::<sqlx::MySql>::new("INSERT IGNORE");
                    push_insert!(qb, [r]);
                    if qb.build().execute(&mut *tx).await?.rows_affected() == 1 {
                        new.insert(r.id.as_str());
                    }
                }
            }
            tx.commit().await?;
            Ok(recs.iter().map(|r| new.contains(r.id.as_str())).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_core::store::InboxStatus;
    use serde_json::value::RawValue;

    use super::*;

    fn rec(id: usize, data_len: usize) -> InboxRecord {
        InboxRecord {
            id: id.to_string(),
            user: "u".into(),
            topic: "t".into(),
            event: "e".into(),
            data: RawValue::from_string(format!("\"{}\"", "x".repeat(data_len)))
                .expect("valid JSON"),
            trace_id: None,
            status: InboxStatus::Pending,
            retry_count: 0,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn statements_split_by_rows_and_bytes() {
        let recs: Vec<_> = (0..1201).map(|i| rec(i, 1)).collect();
        assert_eq!(statements(&recs), [0..500, 500..1000, 1000..1201]);
        let big: Vec<_> = (0..5).map(|i| rec(i, 1024 * 1024)).collect();
        assert_eq!(statements(&big), [0..1, 1..2, 2..3, 3..4, 4..5]);
        let huge = [rec(0, 3 * 1024 * 1024)];
        let alone: Vec<Range<usize>> = std::iter::once(0..1).collect();
        assert_eq!(
            statements(&huge),
            alone,
            "an oversized record still goes alone"
        );
        assert!(statements(&[]).is_empty());
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_memory_urls() {
        assert!(is_sqlite_memory("sqlite::memory:"));
        assert!(is_sqlite_memory("sqlite://:memory:"));
        assert!(is_sqlite_memory("sqlite://?mode=memory"));
        assert!(!is_sqlite_memory("sqlite://data/herald.db"));
        assert!(!is_sqlite_memory("sqlite:///tmp/memory.db"));
    }
}
