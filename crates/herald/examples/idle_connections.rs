//! Quick idle-connection footprint check (the full load generator lives in `bench/`).
//!
//! Opens N authenticated JSON v1 connections (one user each, one explicit subscription each),
//! waits until all are welcomed and subscribed, then prints the server's RSS (from
//! `/proc/<pid>/status`) before and after. Usage:
//!
//! ```sh
//! cargo run --release -p herald --example idle_connections -- <ws url> <jwt secret> <server pid> <n>
//! ```

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use herald_server::auth::{dev_claims, mint_hs256};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: idle_connections <ws url> <jwt secret> <server pid> <n>"
    );
    let (url, secret, pid, n): (String, String, u32, usize) = (
        args[1].clone(),
        args[2].clone(),
        args[3].parse()?,
        args[4].parse()?,
    );
    let before = rss_kib(pid);
    let start = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n.max(1));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..n {
        let claims = dev_claims(
            &format!("u{i}"),
            Duration::from_secs(3600),
            Default::default(),
        );
        let token = mint_hs256(&secret, &claims)?;
        let url = format!("{url}?token={token}");
        let tx = ready_tx.clone();
        let sem = sem.clone();
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
                return;
            };
            let _ = ws.next().await; // welcome
            let sub = format!(r#"{{"type":"subscribe","id":1,"topic":"device/d{i}/telemetry"}}"#);
            if ws.send(Message::text(sub)).await.is_err() {
                return;
            }
            let _ = ws.next().await; // reply
            drop(permit);
            let _ = tx.send(()).await;
            // Hold the connection idle; answering pings happens inside next().
            while let Some(Ok(_)) = ws.next().await {}
        });
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < n {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    println!(
        "connections={ready}/{n} connect_secs={:.2} rss_before_kib={before} rss_after_kib={after} per_connection_kib={:.2}",
        elapsed.as_secs_f64(),
        (after.saturating_sub(before)) as f64 / ready.max(1) as f64
    );
    Ok(())
}
