//! Durable delivery on the three SQL stores (and the memory store where it applies), against the real servers of this machine
//! (SQLite in a temporary directory, PostgreSQL in a random schema, MariaDB in a random
//! database; each dropped afterwards):
//! - a message published while the user is offline arrives on the next connect, is
//!   retransmitted while unacked, then marked failed, replayed on the next connect, and acked;
//! - the gateway killed with SIGKILL right after the publisher got 200 delivers it after restart;
//! - the same id published twice is stored once and delivered once;
//! - PostgreSQL unreachable: durable publishes get 503, ephemeral traffic goes on, `/readyz`
//!   says so, and all recovers when it is back.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Server;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const QUIET: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The in-process store (no persistence: not for the restart scenario).
    Memory,
    Sqlite,
    Postgres,
    Mysql,
}

/// An isolated database; dropped (schema / database / directory) with the value.
struct TestDb {
    kind: Kind,
    name: String,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

fn admin(kind: Kind, sql: &str) {
    let status = match kind {
        Kind::Postgres => Command::new("psql")
            .env("PGOPTIONS", "--client-min-messages=warning")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-qc",
                sql,
            ])
            .status(),
        Kind::Mysql => Command::new("mariadb")
            .args(["-h", "127.0.0.1", "-uroot", "-e", sql])
            .status(),
        Kind::Memory | Kind::Sqlite => return,
    };
    assert!(status.is_ok_and(|s| s.success()), "{kind:?}: {sql}");
}

impl TestDb {
    fn new(kind: Kind) -> TestDb {
        let name = format!("herald_t_{}", common::random_hex(12));
        match kind {
            Kind::Memory => TestDb {
                kind,
                name,
                url: "memory".into(),
                _dir: None,
            },
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                TestDb {
                    kind,
                    name,
                    url,
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => {
                admin(kind, &format!("CREATE SCHEMA {name}"));
                let url = format!("{PG}?options=-csearch_path%3D{name}");
                TestDb {
                    kind,
                    name,
                    url,
                    _dir: None,
                }
            }
            Kind::Mysql => {
                admin(kind, &format!("CREATE DATABASE {name}"));
                let url = format!("mysql://root@127.0.0.1:3306/{name}");
                TestDb {
                    kind,
                    name,
                    url,
                    _dir: None,
                }
            }
        }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "[store]\nurl = \"{}\"\nretry_after = \"1s\"\nmax_retries = 1\n{extra}",
            self.url
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match self.kind {
            Kind::Postgres => admin(
                self.kind,
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ),
            Kind::Mysql => admin(self.kind, &format!("DROP DATABASE IF EXISTS {}", self.name)),
            Kind::Memory | Kind::Sqlite => {}
        }
    }
}

async fn inbox(server: &Server, user: &str, status: &str) -> Vec<Value> {
    let (s, v) = server
        .api_get(
            &format!("/api/v1/users/{user}/messages?status={status}"),
            &server.admin_key,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["messages"].as_array().cloned().unwrap_or_default()
}

async fn offline_retransmit_fail_replay_ack(kind: Kind) {
    let db = TestDb::new(kind);
    let server = Server::start(&db.config("")).await;
    // Offline publish: stored before the 200.
    let (s, body) = server
        .api_post(
            "/api/v1/users/olga/messages",
            &server.publish_key,
            &json!({"event": "n", "data": {"k": 1}}),
        )
        .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (200, Some("pending")),
        "{body}"
    );
    let id = body["id"].as_str().expect("id").to_owned();
    assert_eq!(inbox(&server, "olga", "pending").await.len(), 1);

    // Next connect: delivered, then retransmitted once (unacked), then failed.
    let mut ws = server.connect_user("olga").await;
    for attempt in 0..2 {
        let m = ws.recv_message("user/olga").await;
        assert_eq!(
            (m["id"].as_str(), m["ack"].as_bool()),
            (Some(id.as_str()), Some(true)),
            "attempt {attempt}"
        );
    }
    common::eventually(Duration::from_secs(5), "marked failed", || async {
        inbox(&server, "olga", "failed")
            .await
            .first()
            .is_some_and(|m| m["retry_count"] == 1)
    })
    .await;
    ws.expect_no_message(QUIET).await;
    let metrics = server.metrics().await;
    for (name, want) in [
        ("herald_durable_retries_total", 1.0),
        ("herald_durable_failed_total", 1.0),
    ] {
        assert_eq!(
            common::metric_sum(&metrics, name, &[]),
            Some(want),
            "{name}: {metrics}"
        );
    }
    ws.close().await;

    // Replayed on the next connect; acked exactly once; not replayed again.
    let mut ws = server.connect_user("olga").await;
    let m = ws.recv_message("user/olga").await;
    assert_eq!(m["id"], id.as_str());
    let rid = ws.next_id();
    let r = ws
        .request(json!({"type": "ack", "id": rid, "ids": [id]}))
        .await;
    assert_eq!(r["acked"], 1, "{r}");
    ws.close().await;
    assert_eq!(inbox(&server, "olga", "acked").await.len(), 1);
    let mut ws = server.connect_user("olga").await;
    ws.expect_no_message(QUIET).await;
}

async fn survives_sigkill_after_200(kind: Kind) {
    let db = TestDb::new(kind);
    let secret = format!("secret-{}", common::random_hex(24));
    let server = Server::builder()
        .toml(&db.config(""))
        .secret(&secret)
        .start()
        .await;
    let (s, body) = server
        .api_post(
            "/api/v1/users/pia/messages",
            &server.publish_key,
            &json!({"event": "n", "data": {"v": 42}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    server.signal(libc::SIGKILL);
    drop(server);

    let server = Server::builder()
        .toml(&db.config(""))
        .secret(&secret)
        .start()
        .await;
    let mut ws = server.connect_user("pia").await;
    let m = ws.recv_message("user/pia").await;
    assert_eq!(
        (m["id"].as_str(), m["data"]["v"].as_i64()),
        (Some(id.as_str()), Some(42))
    );
}

async fn same_id_twice_one_row_one_delivery(kind: Kind) {
    let db = TestDb::new(kind);
    // Default retry interval: a retransmission is not what this test looks for.
    let server = Server::start(&format!("[store]\nurl = \"{}\"\n", db.url)).await;
    let mut ws = server.connect_user("quinn").await;
    let body = json!({"event": "n", "data": {}, "id": "invoice-9"});
    let (_, first) = server
        .api_post("/api/v1/users/quinn/messages", &server.publish_key, &body)
        .await;
    let (_, second) = server
        .api_post("/api/v1/users/quinn/messages", &server.publish_key, &body)
        .await;
    assert_eq!(first["status"], "pending", "{first}");
    assert_eq!(second["status"], "duplicate", "{second}");
    let m = ws.recv_message("user/quinn").await;
    assert_eq!(m["id"], "invoice-9");
    let rid = ws.next_id();
    ws.request(json!({"type": "ack", "id": rid, "ids": ["invoice-9"]}))
        .await;
    ws.expect_no_message(QUIET).await;
    let (_, all) = server
        .api_get("/api/v1/users/quinn/messages", &server.admin_key)
        .await;
    assert_eq!(
        all["messages"].as_array().map(Vec::len),
        Some(1),
        "one stored row: {all}"
    );
}

macro_rules! on_every_store {
    ($scenario:ident) => {
        mod $scenario {
            use super::*;
            #[tokio::test]
            async fn sqlite() {
                $scenario(Kind::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                $scenario(Kind::Postgres).await
            }
            #[tokio::test]
            async fn mysql() {
                $scenario(Kind::Mysql).await
            }
        }
    };
}

on_every_store!(offline_retransmit_fail_replay_ack);
on_every_store!(survives_sigkill_after_200);
on_every_store!(same_id_twice_one_row_one_delivery);

// The in-process store has the same semantics, except surviving a restart.
#[tokio::test]
async fn memory_offline_retransmit_fail_replay_ack() {
    offline_retransmit_fail_replay_ack(Kind::Memory).await
}

#[tokio::test]
async fn memory_same_id_twice_one_row_one_delivery() {
    same_id_twice_one_row_one_delivery(Kind::Memory).await
}

/// A TCP proxy to PostgreSQL that the test can cut (refusing and dropping connections) and
/// restore: from the gateway's side, the database goes down and comes back.
struct Cuttable {
    port: u16,
    up: watch::Sender<bool>,
}

impl Cuttable {
    async fn start(target: &'static str) -> Cuttable {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                if !*rx.borrow() {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Cuttable { port, up }
    }

    fn set(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

#[tokio::test]
async fn postgres_down_durable_503_ephemeral_flows_readyz_reports_and_recovers() {
    let db = TestDb::new(Kind::Postgres);
    let proxy = Cuttable::start("127.0.0.1:5432").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/test?options=-csearch_path%3D{}",
        proxy.port, db.name
    );
    let server = Server::start(&format!("[store]\nurl = \"{url}\"\n")).await;
    let (s, _) = server.get("/readyz").await;
    assert_eq!(s, 200);
    let mut ws = server.connect_user("rita").await;
    ws.join_room_ok("ops").await;

    proxy.set(false);
    // Durable: refused with 503, never acknowledged.
    let (s, body) = server
        .api_post(
            "/api/v1/users/rita/messages",
            &server.publish_key,
            &json!({"event": "n", "data": {"lost": false}}),
        )
        .await;
    assert_eq!(s, 503, "{body}");
    // Ephemeral traffic goes on.
    let (s, body) = server
        .api_post(
            "/api/v1/rooms/ops/messages",
            &server.publish_key,
            &json!({"event": "e", "data": "still here"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ws.recv_message("room/ops").await["data"], "still here");
    let (s, ready) = server.get("/readyz").await;
    assert_eq!(s, 503, "{ready}");
    assert!(ready.contains("\"store\":\"down\""), "{ready}");

    // Back: ready again, durable publishes stored and delivered.
    proxy.set(true);
    common::eventually(Duration::from_secs(15), "ready again", || async {
        server.get("/readyz").await.0 == 200
    })
    .await;
    let (s, body) = server
        .api_post(
            "/api/v1/users/rita/messages",
            &server.publish_key,
            &json!({"event": "n", "data": {"back": true}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let m = ws.recv_message("user/rita").await;
    assert_eq!(m["data"]["back"], true);
}
