//! `herald publish` (server HTTP API) and `herald subscribe` (a terminal WebSocket client).

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use herald_client::{Client, ClientError, Event, PublishRequest, Publisher};
use herald_server::config::parse_duration;
use serde_json::{Value, json};

/// `eprintln!` without the panic when stderr is gone.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Server API key with scope `publish` or `admin`.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    api_key: String,
    #[arg(long)]
    topic: String,
    /// The event name subscribers see.
    #[arg(long, default_value = "message")]
    event: String,
    /// The payload, as JSON.
    #[arg(long, default_value = "{}", value_parser = parse_json)]
    data: Value,
    /// Idempotency key; the server generates one when absent.
    #[arg(long)]
    id: Option<String>,
    /// Store before answering, deliver until acked (user topics).
    #[arg(long)]
    durable: bool,
    /// How long a durable message is kept, e.g. 7d.
    #[arg(long, value_parser = checked_duration)]
    ttl: Option<String>,
    #[arg(long)]
    partition: Option<String>,
    #[arg(long)]
    trace_id: Option<String>,
}

#[derive(clap::Args)]
pub struct SubscribeArgs {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// JWT or client API key.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    token: String,
    /// Topics to subscribe to.
    #[arg(required = true, value_name = "TOPIC")]
    topics: Vec<String>,
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let mut req = PublishRequest::new(args.topic, args.event, args.data);
    req.id = args.id;
    req.durable = args.durable.then_some(true);
    req.ttl = args.ttl;
    req.partition = args.partition;
    req.trace_id = args.trace_id;
    let publisher = Publisher::new(&args.url, &args.api_key);
    let response = publisher
        .publish(&req)
        .await
        .with_context(|| format!("publish to {} failed", args.url))?;
    let mut out = json!({ "id": response.id });
    if let Some(seq) = response.seq {
        out["seq"] = json!(seq);
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Prints every message as a JSON line on stdout and acks durable ones; notices go to stderr.
/// Ends when the server closes (exit 0 for a normal close, 1 otherwise) or on Ctrl-C.
pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(&args.url, &args.token)
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    let reply = client
        .subscribe(&topics)
        .await
        .context("subscribe failed")?;
    if !reply.is_ok() {
        bail!("subscribe refused: {} {}", reply.code, reply.message);
    }
    note!(
        "subscribed to {} as {}",
        topics.join(", "),
        client.welcome().user_id
    );

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            next = client.next_event() => next,
            _ = &mut ctrl_c => {
                let _ = client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
        };
        match next {
            Ok(Event::Message(msg)) => {
                let line = serde_json::to_string(&msg).context("cannot encode a message")?;
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // Stdout is gone (`| head`): nothing left to do.
                    return Ok(ExitCode::SUCCESS);
                }
                drop(out);
                if msg.ack {
                    match client.ack(std::slice::from_ref(&msg.id)).await {
                        Ok(reply) if reply.is_ok() => {}
                        Ok(reply) => {
                            note!("ack {} refused: {} {}", msg.id, reply.code, reply.message);
                        }
                        Err(e) => return Err(e).context("ack failed"),
                    }
                }
            }
            Ok(Event::Error { code, message }) => note!("server error {code}: {message}"),
            Ok(Event::Reconnect { reason, after_ms }) => {
                note!("server asks to reconnect after {after_ms} ms: {reason}");
            }
            Ok(Event::Closed { code, reason }) => return Ok(closed(code, &reason)),
            Ok(Event::Pong | Event::CommandReply(_) | Event::Other(_)) => {}
            // Idle is fine; the server's heartbeat keeps the connection alive.
            Err(ClientError::Timeout) => {}
            Err(ClientError::Protocol(e)) => note!("unreadable frame: {e}"),
            Err(ClientError::ClosedWith { code, reason }) => {
                return Ok(closed(Some(code), &reason));
            }
            Err(ClientError::Closed) => return Ok(closed(None, "")),
            Err(e) => return Err(e).context("connection failed"),
        }
    }
}

fn closed(code: Option<u16>, reason: &str) -> ExitCode {
    match code {
        Some(code) => note!("connection closed: {code} {reason}"),
        None => note!("connection closed without a close code"),
    }
    match code {
        Some(1000 | 1001) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn parse_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

fn checked_duration(s: &str) -> Result<String, String> {
    parse_duration(s)
        .map(|_| s.trim().to_owned())
        .map_err(|e| e.to_string())
}
