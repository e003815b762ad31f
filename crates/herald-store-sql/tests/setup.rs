//! Start-up: the factory, its errors (each naming `store.url`, quickly), and what the SQLite
//! file looks like.

#![cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]

mod common;

use std::time::{Duration, Instant};

use common::{Kind, TestDb, ids, rec};
use herald_core::store::{Inserted, Store};
use herald_store_sql::{Backend, Options, SetupError, SqlStore, connect};
use sqlx::Connection as _;

/// The error of a start-up that must fail, and how long it took.
async fn fails(url: &str) -> (SetupError, Duration) {
    let start = Instant::now();
    match connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => (e, start.elapsed()),
    }
}

#[tokio::test]
async fn unsupported_schemes_name_the_setting() {
    for url in ["mongodb://db/x", "memory", "", "redis://127.0.0.1:6379"] {
        let (e, _) = fails(url).await;
        assert!(
            matches!(e, SetupError::UnsupportedScheme { .. }),
            "{url}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.starts_with("store.url: unsupported scheme"), "{msg}");
    }
}

#[tokio::test]
async fn unreachable_servers_fail_fast() {
    for url in [
        "postgres://postgres@127.0.0.1:1/test",
        "mysql://root:secret@127.0.0.1:1/test",
    ] {
        let (e, took) = fails(url).await;
        let msg = e.to_string();
        eprintln!("{url}: {msg} ({took:?})");
        assert!(took < Duration::from_secs(2), "{url} took {took:?}");
        assert!(msg.starts_with("store.url: cannot connect to"), "{msg}");
        assert!(msg.contains("unreachable"), "{msg}");
        assert!(msg.contains("refused"), "the real cause: {msg}");
        assert!(!msg.contains("secret"), "password shown: {msg}");
        assert!(matches!(e, SetupError::Connect { .. }));
    }
}

#[tokio::test]
async fn silent_servers_time_out() {
    // Accepts connections (the kernel's backlog) and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    for url in [
        format!("postgres://postgres@127.0.0.1:{port}/test"),
        format!("mysql://root@127.0.0.1:{port}/test"),
    ] {
        let options = Options {
            acquire_timeout: Duration::from_millis(500),
            ..Options::default()
        };
        let start = Instant::now();
        let Err(e) = SqlStore::connect(&url, options).await else {
            panic!("{url} connected");
        };
        let took = start.elapsed();
        let msg = e.to_string();
        eprintln!("{url}: {msg} ({took:?})");
        assert!(took < Duration::from_secs(2), "{url} took {took:?}");
        assert!(
            msg.contains("unreachable") && msg.contains("no answer within"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn refused_connections_say_why() {
    let cases = [
        (
            "postgres://nosuchrole@127.0.0.1:5432/test",
            "authentication failed",
        ),
        (
            "postgres://postgres@127.0.0.1:5432/herald_no_such_db",
            "database does not exist",
        ),
        (
            "mysql://nosuchuser@127.0.0.1:3306/test",
            "authentication failed",
        ),
        (
            "mysql://root@127.0.0.1:3306/herald_no_such_db",
            "database does not exist",
        ),
    ];
    for (url, cause) in cases {
        let (e, took) = fails(url).await;
        let msg = e.to_string();
        eprintln!("{url}: {msg}");
        assert!(took < Duration::from_secs(6), "{url} took {took:?}");
        assert!(msg.starts_with("store.url: cannot connect to"), "{msg}");
        assert!(msg.contains(cause), "{url}: expected {cause:?} in {msg}");
    }
}

#[tokio::test]
async fn invalid_urls_name_the_setting() {
    let (e, _) = fails("postgres://postgres@127.0.0.1:notaport/test").await;
    assert!(
        e.to_string()
            .starts_with("store.url: invalid PostgreSQL URL"),
        "{e}"
    );
    let (e, _) = fails("sqlite://x.db?mode=bogus").await;
    assert!(
        e.to_string().starts_with("store.url: invalid SQLite URL"),
        "{e}"
    );
}

#[tokio::test]
async fn sqlite_directory_that_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let url = format!("sqlite://{}/sub/herald.db", blocker.display());
    let (e, _) = fails(&url).await;
    assert!(matches!(e, SetupError::CreateDir { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("store.url: cannot create the directory"),
        "{e}"
    );
}

#[tokio::test]
async fn connect_picks_the_backend_by_scheme() {
    let db = TestDb::new(Kind::MySql).await;
    let mariadb = db.url.replacen("mysql://", "mariadb://", 1);
    let store = connect(&mariadb).await.unwrap();
    assert_eq!(store.insert(rec("1", "u")).await.unwrap(), Inserted::New);
    store.ping().await.unwrap();

    let db = TestDb::new(Kind::Postgres).await;
    let url = db.url.replacen("postgres://", "PostgreSQL://", 1);
    let store = SqlStore::connect(&url, Options::default()).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    store.ping().await.unwrap();
}

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode_and_persists() {
    let db = TestDb::new(Kind::Sqlite).await;
    let file = db.sqlite_file().unwrap();
    assert!(!file.exists());
    let store = db.open().await;
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(file.exists(), "file and parent directory created");
    store.insert(rec("p1", "sam")).await.unwrap();
    store.mark_sent("sam", &["p1".into()]).await.unwrap();
    store.close().await;
    drop(store);

    let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE tbl_name = 'messages' ORDER BY name",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert!(
        names.contains(&"messages_user_status_created".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"messages_created".to_owned()), "{names:?}");
    c.close().await.unwrap();

    let store = db.open().await;
    let got = store.undelivered("sam", 10).await.unwrap();
    assert_eq!(ids(&got), ["p1"], "survives a restart");
    assert_eq!(got[0].status, herald_core::store::InboxStatus::Sent);
}
