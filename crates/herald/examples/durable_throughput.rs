//! Quick durable-publish throughput check (the full S6 scenario lives in `bench/`): C
//! concurrent HTTP publishers send N durable user messages through `POST
//! /api/v1/users/{user}/messages`; each 200 means the message was committed to the store.
//! Prints messages per second. Usage:
//!
//! ```sh
//! cargo run --release -p herald --example durable_throughput -- <http url> <api key> <n> <concurrency>
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: durable_throughput <http url> <api key> <n> <concurrency>"
    );
    let (url, key, n, c): (String, String, usize, usize) = (
        args[1].clone(),
        args[2].clone(),
        args[3].parse()?,
        args[4].parse()?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (url, key, next, failures) = (url.clone(), key.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = client
                    .post(format!("{url}/api/v1/users/u{}/messages", i % 1000))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({"event": "n", "data": {"i": i}}))
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status().is_success()) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "messages={n} failed={failed} concurrency={c} secs={secs:.2} durable_per_sec={:.0}",
        (n - failed) as f64 / secs
    );
    Ok(())
}
