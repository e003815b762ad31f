//! Test databases of their own: a temporary directory (SQLite), a random schema (PostgreSQL)
//! or a random database (MariaDB), removed when the [`TestDb`] is dropped, failed test or not.

#![allow(dead_code)]

use std::time::Duration;

use herald_core::message::now_ms;
use herald_core::store::{InboxRecord, InboxStatus};
use herald_store_sql::{Options, SqlStore};
use serde_json::value::RawValue;
use sqlx::Connection as _;

/// The shared servers of this machine (trust / passwordless root).
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const MYSQL: &str = "mysql://root@127.0.0.1:3306/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    SqliteMemory,
    Postgres,
    MySql,
}

enum Place {
    Dir(tempfile::TempDir),
    Memory,
    PgSchema(String),
    MyDatabase(String),
}

pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    place: Place,
}

fn random_name() -> String {
    format!("herald_t_{}", ulid::Ulid::new().to_string().to_lowercase())
}

impl TestDb {
    pub async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                // A directory that does not exist yet: the store creates it.
                let file = dir.path().join("data").join("herald.db");
                let url = format!("sqlite://{}", file.display());
                Self {
                    kind,
                    url,
                    place: Place::Dir(dir),
                }
            }
            Kind::SqliteMemory => Self {
                kind,
                url: "sqlite::memory:".into(),
                place: Place::Memory,
            },
            Kind::Postgres => {
                let schema = random_name();
                admin(kind, &format!("CREATE SCHEMA {schema}")).await;
                let url = format!(
                    "{POSTGRES}?options=-csearch_path%3D{schema}&application_name={schema}"
                );
                Self {
                    kind,
                    url,
                    place: Place::PgSchema(schema),
                }
            }
            Kind::MySql => {
                let db = random_name();
                admin(kind, &format!("CREATE DATABASE {db}")).await;
                let url = format!("mysql://root@127.0.0.1:3306/{db}");
                Self {
                    kind,
                    url,
                    place: Place::MyDatabase(db),
                }
            }
        }
    }

    pub async fn open(&self) -> SqlStore {
        self.open_with(Options::default()).await
    }

    pub async fn open_with(&self, options: Options) -> SqlStore {
        SqlStore::connect(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url))
    }

    /// Path of the SQLite file, if this is one.
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        match &self.place {
            Place::Dir(d) => Some(d.path().join("data").join("herald.db")),
            _ => None,
        }
    }

    /// Terminates, server side, every connection the store under test holds (never anyone
    /// else's). Returns how many; SQLite has none to kill.
    pub async fn kill_connections(&self) -> usize {
        match &self.place {
            Place::PgSchema(schema) => {
                let mut c = sqlx::PgConnection::connect(POSTGRES)
                    .await
                    .expect("admin connection");
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                )
                .bind(schema)
                .fetch_all(&mut c)
                .await
                .expect("terminate");
                killed.into_iter().filter(|k| *k).count()
            }
            Place::MyDatabase(db) => {
                let mut c = sqlx::MySqlConnection::connect(MYSQL)
                    .await
                    .expect("admin connection");
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT ID FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> CONNECTION_ID()",
                )
                .bind(db)
                .fetch_all(&mut c)
                .await
                .expect("processlist");
                for id in &ids {
                    // A connection may have ended meanwhile.
                    let _ = sqlx::query(&format!("KILL {id}")).execute(&mut c).await;
                }
                ids.len()
            }
            Place::Dir(_) | Place::Memory => 0,
        }
    }

    /// Runs one statement in the database under test, beside the store.
    pub async fn execute(&self, sql: &str) {
        let result = match self.kind {
            Kind::Postgres => match sqlx::PgConnection::connect(&self.url).await {
                Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(drop),
                Err(e) => Err(e),
            },
            Kind::MySql => match sqlx::MySqlConnection::connect(&self.url).await {
                Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(drop),
                Err(e) => Err(e),
            },
            Kind::Sqlite => match sqlx::SqliteConnection::connect(&self.url).await {
                Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(drop),
                Err(e) => Err(e),
            },
            Kind::SqliteMemory => panic!("no second connection to an in-memory database"),
        };
        result.unwrap_or_else(|e| panic!("{:?}: {e}", self.kind));
    }

    /// Holds a lock that makes every insert into `messages` wait, until released.
    pub async fn block_writes(&self) -> Blocker {
        match &self.place {
            Place::PgSchema(schema) => {
                let mut c = sqlx::PgConnection::connect(POSTGRES)
                    .await
                    .expect("blocker connection");
                sqlx::query("BEGIN").execute(&mut c).await.expect("begin");
                sqlx::query(&format!(
                    "LOCK TABLE {schema}.messages IN ACCESS EXCLUSIVE MODE"
                ))
                .execute(&mut c)
                .await
                .expect("lock");
                Blocker::Pg(c)
            }
            Place::MyDatabase(_) => {
                let mut c = sqlx::MySqlConnection::connect(&self.url)
                    .await
                    .expect("blocker connection");
                sqlx::query("LOCK TABLES messages WRITE")
                    .execute(&mut c)
                    .await
                    .expect("lock");
                Blocker::My(c)
            }
            Place::Dir(_) => {
                let mut c = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("blocker connection");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .expect("lock");
                Blocker::Lite(c)
            }
            Place::Memory => panic!("no second connection to an in-memory database"),
        }
    }
}

pub enum Blocker {
    Pg(sqlx::PgConnection),
    My(sqlx::MySqlConnection),
    Lite(sqlx::SqliteConnection),
}

impl Blocker {
    pub async fn release(self) {
        match self {
            Blocker::Pg(mut c) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut c)
                    .await
                    .expect("unlock");
            }
            Blocker::My(mut c) => {
                sqlx::query("UNLOCK TABLES")
                    .execute(&mut c)
                    .await
                    .expect("unlock");
            }
            Blocker::Lite(mut c) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut c)
                    .await
                    .expect("unlock");
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = match &self.place {
            Place::PgSchema(s) => format!("DROP SCHEMA IF EXISTS {s} CASCADE"),
            Place::MyDatabase(d) => format!("DROP DATABASE IF EXISTS {d}"),
            Place::Dir(_) | Place::Memory => return,
        };
        let kind = self.kind;
        // Drop cannot await, and may run inside the test's runtime: a thread of its own with
        // a runtime of its own.
        let done = std::thread::spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(admin(kind, &sql)),
                Err(e) => eprintln!("cleanup runtime: {e}"),
            }
        })
        .join();
        if done.is_err() {
            eprintln!("cleanup of {} failed", self.url);
        }
    }
}

/// Runs one statement on the shared server as its administrator.
async fn admin(kind: Kind, sql: &str) {
    let result = match kind {
        Kind::Postgres => match sqlx::PgConnection::connect(POSTGRES).await {
            Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(drop),
            Err(e) => Err(e),
        },
        Kind::MySql => match sqlx::MySqlConnection::connect(MYSQL).await {
            Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(drop),
            Err(e) => Err(e),
        },
        Kind::Sqlite | Kind::SqliteMemory => Ok(()),
    };
    if let Err(e) = result {
        panic!("{kind:?} admin statement failed: {e}");
    }
}

/// A pending record of `user`, created `age` ago.
pub fn rec_aged(id: &str, user: &str, age: Duration) -> InboxRecord {
    let at = now_ms() - age.as_millis() as u64;
    InboxRecord {
        id: id.into(),
        user: user.into(),
        topic: format!("user/{user}"),
        event: "notification".into(),
        data: RawValue::from_string(format!(r#"{{"n":"{id}","text":"héllo ✓ 🚀"}}"#))
            .expect("valid JSON"),
        trace_id: None,
        status: InboxStatus::Pending,
        retry_count: 0,
        created_at: at,
        updated_at: at,
    }
}

pub fn rec(id: &str, user: &str) -> InboxRecord {
    rec_aged(id, user, Duration::ZERO)
}

pub fn ids(records: &[InboxRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

pub fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}
