//! The HTTP layer under `/ws`: a client that connects and never completes a request is dropped
//! after `limits.handshake_timeout`, and the server keeps serving others.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn silent_and_partial_handshakes_are_dropped_after_the_timeout() {
    let server = Server::start(
        r#"
[limits]
handshake_timeout = "500ms"
"#,
    )
    .await;

    // One socket sends nothing, one sends half a request line and stops (slowloris).
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut partial = TcpStream::connect(server.addr).await.expect("connect");
    partial
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    for sock in [&mut silent, &mut partial] {
        let mut buf = [0u8; 1024];
        // The server closes the socket (EOF, possibly after a 408 response) or resets it.
        let deadline = Duration::from_secs(5);
        loop {
            match tokio::time::timeout(deadline, sock.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("socket still open after {deadline:?}"),
            }
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "closed after {took:?}, before the timeout"
    );

    // Everyone else is unaffected.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
    let mut ws = server.connect_user("alice").await;
    ws.assert_alive().await;
}
