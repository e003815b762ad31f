//! Required test 7: SIGTERM drains (reconnect frame, close 1012, no new connections) and the
//! process exits 0 within the grace period.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn sigterm_drains_clients_and_exits_zero() {
    let mut server = Server::start("").await; // shutdown_grace = "1s"
    let mut clients = vec![
        server.connect_user("alice").await,
        server.connect_user("alice").await,
        server.connect_user("bob").await,
    ];
    for ws in &mut clients {
        ws.join_room_ok("drain").await;
    }

    let started = Instant::now();
    server.signal(libc::SIGTERM);

    // Every client: a reconnect frame, then close 1012.
    let first = clients[0].recv_json(T).await;
    assert_eq!(first["type"], "reconnect", "{first}");
    assert_eq!(first["reason"], "node draining", "{first}");
    assert!(first["after_ms"].is_u64(), "after_ms: {first}");

    // Draining: new connections are refused (HTTP 503 or no listener at all).
    let token = server.token("carol", 3600, serde_json::json!({}));
    match connect(&server.ws_url(), Some(&token)).await {
        Ok(mut ws) => match ws.next_frame(T).await {
            Some(Frame::Json(v)) if v["type"] == "welcome" => {
                panic!("a new connection was welcomed during drain: {v}")
            }
            other => panic!("upgrade accepted during drain (then {other:?}); want it refused"),
        },
        Err(e) => assert!(
            e.status == 0 || e.status == 503,
            "refusal during drain: {e:?}"
        ),
    }

    for (i, ws) in clients.iter_mut().enumerate() {
        if i > 0 {
            let r = ws.recv_json(T).await;
            assert_eq!(r["type"], "reconnect", "client {i}: {r}");
            assert_eq!(r["reason"], "node draining", "client {i}: {r}");
        }
        let (code, _) = ws.expect_close(T).await;
        assert_eq!(code, 1012, "client {i}");
        assert!(
            ws.skipped.is_empty(),
            "client {i}: frames between reconnect and close: {:?}",
            ws.skipped
        );
    }

    let status = server.wait_exit(Duration::from_secs(6)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} with shutdown_grace = 1s",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_with_clients_that_never_close_still_exits_within_grace() {
    let mut server = Server::start("").await;
    // These clients never read again, so they never answer the close handshake.
    let _c1 = server.connect_user("u1").await;
    let _c2 = server.connect_user("u2").await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} with shutdown_grace = 1s",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_when_idle_exits_zero_quickly() {
    let mut server = Server::start("").await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}
