//! Required test 6 (slow consumer: bounded queue, drops counted, fast clients unaffected, the
//! slow one disconnected) and the heartbeat (server pings; a silent client is closed).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const N: u64 = 3000;

/// Reads `n` messages on `topic`, asserting `data.n` is 0, 1, 2… in order.
async fn read_all_in_order(mut ws: Ws, topic: &'static str, n: u64) -> Ws {
    for want in 0..n {
        let m = ws.recv_json(Duration::from_secs(20)).await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["topic"], topic, "{m}");
        assert_eq!(
            m["data"]["n"].as_u64(),
            Some(want),
            "fast client: message out of order or missing (got {}, want {want})",
            m["data"]["n"]
        );
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_and_fast_clients_get_everything() {
    let server = Server::start(
        r#"
[limits]
send_queue = 16
slow_consumer_timeout = "1s"
write_timeout = "2s"
ingest_per_second = 1000000
"#,
    )
    .await;

    // The slow client: tiny receive buffer and MSS, subscribes, then never reads again.
    let token = server.token("slow", 3600, json!({}));
    let mut slow = connect_with(
        &server.ws_url(),
        ConnectOpts {
            bearer: Some(&token),
            recv_buffer: Some(4096),
            max_segment: Some(536),
            ..Default::default()
        },
    )
    .await
    .expect("slow client handshake");
    slow.expect_welcome("slow").await;
    slow.join_room_ok("firehose").await;

    let mut fast1 = server.connect_user("fast1").await;
    let mut fast2 = server.connect_user("fast2").await;
    fast1.join_room_ok("firehose").await;
    fast2.join_room_ok("firehose").await;
    server.wait_subscribers("room/firehose", 3).await;
    assert_eq!(server.stats().await["total_clients"], 3);

    let readers = [
        tokio::spawn(read_all_in_order(fast1, "room/firehose", N)),
        tokio::spawn(read_all_in_order(fast2, "room/firehose", N)),
    ];

    let pad = "x".repeat(1000);
    let started = Instant::now();
    for i in 0..N {
        let (s, b) = server
            .api_post(
                "/api/v1/publish",
                &server.publish_key,
                &json!({"topic": "room/firehose", "event": "tick", "data": {"n": i, "pad": pad}}),
            )
            .await;
        assert_eq!(s, 200, "publish #{i}: {b}");
    }
    eprintln!("published {N} messages in {:?}", started.elapsed());

    let mut fast = Vec::new();
    for r in readers {
        fast.push(
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .expect("fast client did not get all messages in 30 s")
                .expect("fast client task panicked"),
        );
    }

    // The slow connection is gone: stats and presence show only the two fast clients.
    eventually(
        Duration::from_secs(15),
        "slow client dropped (total_clients == 2)",
        || async { server.stats().await["total_clients"] == 2 },
    )
    .await;
    assert_eq!(server.presence("slow").await, 0);
    assert_eq!(server.presence("fast1").await, 1);

    let metrics = server.metrics().await;
    let dropped = metric_sum(
        &metrics,
        "herald_messages_dropped_total",
        &[("reason", "queue_full")],
    )
    .unwrap_or_else(|| {
        panic!("no herald_messages_dropped_total{{reason=\"queue_full\"}}:\n{metrics}")
    });
    assert!(dropped > 0.0, "dropped = {dropped}");

    // The fast clients are still connected and got nothing more.
    for ws in &mut fast {
        ws.expect_no_message(Duration::from_millis(100)).await;
        ws.assert_alive().await;
    }

    // Reading the slow socket now: what it got is in order (drops are oldest-first, never a
    // reordering), then a 4009 close or a reset.
    let end = slow.expect_close_or_end(Duration::from_secs(15)).await;
    if let Ok((code, reason)) = &end {
        assert_eq!(*code, 4009, "slow consumer close: {code} {reason}");
    }
    let got: Vec<u64> = slow
        .skipped
        .iter()
        .filter(|m| m["topic"] == "room/firehose")
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "slow client got messages out of order"
    );
    assert!(
        (got.len() as u64) < N,
        "the slow client cannot have received all {N}"
    );
    eprintln!("slow client: {} messages before {:?}", got.len(), end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_pings_and_silent_client_is_closed() {
    let server = Server::start(
        r#"
[limits]
heartbeat_interval = "200ms"
heartbeat_timeout = "1s"
"#,
    )
    .await;
    let mut active = server.connect_user("active").await;
    assert_eq!(active.welcome.as_ref().unwrap()["heartbeat_ms"], 200);

    // The server pings every 200 ms.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        match active.next_frame(Duration::from_secs(2)).await {
            Some(Frame::Ping) => pings += 1,
            other => panic!("want a WebSocket ping, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "3 pings took {:?} at a 200 ms interval",
        started.elapsed()
    );

    // Keep the active client reading (tungstenite answers pings while reading).
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let keeper = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return active,
                f = active.next_frame(Duration::from_secs(10)) => match f {
                    Some(Frame::Ping | Frame::Pong) => {}
                    other => panic!("active client: unexpected {other:?}"),
                }
            }
        }
    });

    // The silent client never reads, so never answers pings: closed after about 1 s.
    let silent_started = Instant::now();
    let mut silent = server.connect_user("silent").await;
    server.wait_presence("silent", 1, T).await;
    server
        .wait_presence("silent", 0, Duration::from_secs(6))
        .await;
    let took = silent_started.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "silent client dropped after {took:?}, before heartbeat_timeout"
    );

    // The reading client survived the same period.
    assert_eq!(server.presence("active").await, 1);
    stop_tx.send(()).unwrap();
    let mut active = keeper.await.expect("active reader");
    active.assert_alive().await;

    // The silent socket: a close frame (any code) or a reset.
    let _ = silent.expect_close_or_end(T).await;
}
