//! The NATS source and command target against a real NATS: the shared server on
//! 127.0.0.1:4222 (or `HERALD_TEST_NATS_URL`), every test on its own random subjects, and
//! for the restart test a private `nats-server` on a free port.

#![cfg(feature = "nats")]

mod recording;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_ingest::command::{Envelope, Target, Upstream, UpstreamError, User};
use herald_ingest::config::NatsSource;
use herald_ingest::nats::{NatsIngest, NatsUpstream, StartError};
use herald_ingest::{Rejected, Submitted};
use recording::{Recorder, counter, install_metrics, until};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

fn shared_url() -> String {
    std::env::var("HERALD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A random subject root, `t<ulid>`.
fn root() -> String {
    format!("t{}", ulid::Ulid::new().to_string().to_lowercase())
}

fn source(url: &str, subjects: &[String], group: &str) -> NatsSource {
    NatsSource {
        url: url.to_owned(),
        subjects: subjects.to_vec(),
        queue_group: group.to_owned(),
    }
}

async fn start(
    cfg: NatsSource,
    recorder: Arc<Recorder>,
) -> Result<(Arc<NatsIngest>, CancellationToken)> {
    let shutdown = CancellationToken::new();
    let ingest = NatsIngest::start(cfg, recorder, shutdown.clone())
        .await
        .context("start the nats source")?;
    Ok((ingest, shutdown))
}

async fn client(url: &str) -> Result<async_nats::Client> {
    Ok(async_nats::connect(url).await?)
}

async fn publish(c: &async_nats::Client, subject: &str, body: &Value) -> Result<()> {
    c.publish(subject.to_owned(), Bytes::from(body.to_string()))
        .await?;
    Ok(())
}

/// A NATS request; the reply parsed as JSON.
async fn request(c: &async_nats::Client, subject: &str, body: impl Into<Bytes>) -> Result<Value> {
    let reply = tokio::time::timeout(WAIT, c.request(subject.to_owned(), body.into())).await??;
    Ok(serde_json::from_slice(&reply.payload)?)
}

fn outcome(source: &str, outcome: &str) -> u64 {
    counter(
        "herald_ingest_messages_total",
        &[("source", source), ("outcome", outcome)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_submitted_and_malformed_ones_are_counted() -> Result<()> {
    install_metrics();
    let r = root();
    let recorder = Recorder::new();
    let subjects = vec![format!("{r}.events.>"), format!("{r}.users")];
    let (ingest, shutdown) = start(source(&shared_url(), &subjects, "g"), recorder.clone()).await?;
    assert!(ingest.healthy());
    let c = client(&shared_url()).await?;

    let publish_request =
        json!({"topic":"room/a","event":"chat","data":{"text":"hi"},"trace_id":"t-1"});
    publish(&c, &format!("{r}.events.chat"), &publish_request).await?;
    c.publish(format!("{r}.events.chat"), Bytes::from_static(b"{not json"))
        .await?;
    publish(
        &c,
        &format!("{r}.events.chat"),
        &json!({"event":"no topic"}),
    )
    .await?;
    publish(
        &c,
        &format!("{r}.users"),
        &json!({"user":"42","event":"notification","data":{"title":"shipped"},"id":"m-1"}),
    )
    .await?;

    // Subjects are consumed by separate tasks: no order between them.
    recorder
        .wait("both messages", WAIT, |calls| calls.len() == 2)
        .await;
    let mut calls = recorder.calls();
    calls.sort_by(|a, b| a.source.cmp(&b.source));
    assert_eq!(calls[0].source, format!("nats:{r}.events.>"));
    assert_eq!(calls[0].body, publish_request);
    assert_eq!(calls[1].source, format!("nats:{r}.users"));
    assert_eq!(
        calls[1].body,
        json!({"topic":"user/42","durable":true,"event":"notification",
               "data":{"title":"shipped"},"id":"m-1"})
    );
    let events = format!("nats:{r}.events.>");
    let users = format!("nats:{r}.users");
    // Counted right after the submit returns.
    until("the outcomes to be counted", WAIT, || {
        outcome(&events, "rejected") == 2
            && outcome(&events, "accepted") == 1
            && outcome(&users, "accepted") == 1
    })
    .await;
    shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_group_takes_each_message_once() -> Result<()> {
    let r = root();
    let subjects = vec![format!("{r}.in")];
    let a = Recorder::new();
    let b = Recorder::new();
    let (_ia, sa) = start(source(&shared_url(), &subjects, "herald"), a.clone()).await?;
    let (_ib, sb) = start(source(&shared_url(), &subjects, "herald"), b.clone()).await?;
    let c = client(&shared_url()).await?;
    const N: i64 = 100;
    for i in 0..N {
        publish(
            &c,
            &format!("{r}.in"),
            &json!({"topic":"room/q","data":{"i":i}}),
        )
        .await?;
    }
    // A second group (another deployment) gets every message too.
    let other = Recorder::new();
    let (_io, so) = start(source(&shared_url(), &subjects, "other"), other.clone()).await?;
    for i in N..N + 10 {
        publish(
            &c,
            &format!("{r}.in"),
            &json!({"topic":"room/q","data":{"i":i}}),
        )
        .await?;
    }
    let total = |a: &Recorder, b: &Recorder| a.calls().len() + b.calls().len();
    until("every message", WAIT, || total(&a, &b) == (N + 10) as usize).await;
    other
        .wait("the second group's messages", WAIT, |calls| {
            calls.len() == 10
        })
        .await;
    let mut seen: Vec<i64> = a
        .calls()
        .iter()
        .chain(b.calls().iter())
        .filter_map(|c| c.body["data"]["i"].as_i64())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..N + 10).collect::<Vec<_>>(), "each message once");
    eprintln!(
        "queue group split: a {}, b {}",
        a.calls().len(),
        b.calls().len()
    );
    assert!(!a.calls().is_empty() && !b.calls().is_empty());
    for s in [sa, sb, so] {
        s.cancel();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_a_reply() -> Result<()> {
    install_metrics();
    let r = root();
    let recorder = Recorder::answering(|body| match body["event"].as_str() {
        Some("refuse") => Some(Err(Rejected::Invalid("forbidden: room/x".into()))),
        Some("down") => Some(Err(Rejected::Unavailable("the store is down".into()))),
        Some("again") => Some(Ok(Submitted {
            id: "m-dup".into(),
            duplicate: true,
            stored: false,
        })),
        _ => None,
    });
    let subjects = vec![format!("{r}.pub")];
    let (_i, shutdown) = start(source(&shared_url(), &subjects, "g"), recorder.clone()).await?;
    let c = client(&shared_url()).await?;
    let s = format!("{r}.pub");

    let published = request(&c, &s, r#"{"topic":"room/a","event":"e","id":"m-1"}"#).await?;
    assert_eq!(published, json!({"id":"m-1","status":"published"}));
    let pending = request(&c, &s, r#"{"user":"42","event":"n","id":"m-2"}"#).await?;
    assert_eq!(pending, json!({"id":"m-2","status":"pending"}));
    let duplicate = request(&c, &s, r#"{"topic":"room/a","event":"again"}"#).await?;
    assert_eq!(duplicate, json!({"id":"m-dup","status":"duplicate"}));
    let malformed = request(&c, &s, "{").await?;
    assert_eq!(malformed["code"], 400);
    assert!(
        malformed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not JSON")
    );
    let refused = request(&c, &s, r#"{"topic":"room/x","event":"refuse"}"#).await?;
    assert_eq!(refused, json!({"code":400,"message":"forbidden: room/x"}));
    let down = request(&c, &s, r#"{"topic":"room/a","event":"down"}"#).await?;
    assert_eq!(down, json!({"code":503,"message":"the store is down"}));
    // Fire-and-forget while down: counted, nothing to answer.
    publish(&c, &s, &json!({"topic":"room/a","event":"down"})).await?;
    let src = format!("nats:{s}");
    until("the second unavailable", WAIT, || {
        outcome(&src, "unavailable") == 2
    })
    .await;
    assert_eq!(outcome(&src, "accepted"), 2);
    assert_eq!(outcome(&src, "duplicate"), 1);
    assert_eq!(outcome(&src, "rejected"), 2);
    shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_a_nats_restart() -> Result<()> {
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = Server::start(port).await?;
    let recorder = Recorder::new();
    let subjects = vec!["in.>".to_owned()];
    let (ingest, shutdown) = start(source(&url, &subjects, "g"), recorder.clone()).await?;
    let c = client(&url).await?;
    publish(&c, "in.x", &json!({"topic":"room/a","event":"before"})).await?;
    recorder.wait_marker("before", 1, WAIT).await;

    server.kill();
    until("the source to notice the outage", WAIT, || {
        !ingest.healthy()
    })
    .await;
    let _server = Server::start(port).await?;
    until("the source to reconnect", WAIT, || ingest.healthy()).await;
    // The publisher's client reconnects too; a request answered by the source proves the
    // subscription is back.
    let reply = request(&c, "in.y", r#"{"topic":"room/a","event":"after"}"#).await?;
    assert_eq!(reply["status"], "published");
    recorder.wait_marker("after", 1, WAIT).await;
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn start_fails_fast() -> Result<()> {
    let port = free_port()?;
    let started = Instant::now();
    let cfg = source(
        &format!("nats://user:secret@127.0.0.1:{port}"),
        &["x".to_owned()],
        "g",
    );
    match NatsIngest::start(cfg, Recorder::new(), CancellationToken::new()).await {
        Err(StartError::Connect { url, .. }) => assert!(!url.contains("secret"), "{url}"),
        Err(e) => bail!("wrong error: {e}"),
        Ok(_) => bail!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    let cfg = source(&shared_url(), &[], "g");
    assert!(matches!(
        NatsIngest::start(cfg, Recorder::new(), CancellationToken::new()).await,
        Err(StartError::NoSubjects)
    ));
    let cfg = source(&shared_url(), &["a b".to_owned()], "g");
    assert!(matches!(
        NatsIngest::start(cfg, Recorder::new(), CancellationToken::new()).await,
        Err(StartError::Subscribe { .. })
    ));
    Ok(())
}

// ---- the command target ----

fn envelope(trace_id: &str) -> Result<Bytes> {
    let claims = serde_json::Map::from_iter([("role".to_owned(), json!("admin"))]);
    let data = RawValue::from_string(r#"{"x":1}"#.into())?;
    Ok(Envelope {
        command: "CALL",
        trace_id,
        user: User {
            id: "42",
            claims: &claims,
        },
        conn_id: "c-n1-7",
        node_id: "n1",
        data: &data,
    }
    .to_bytes())
}

/// A service on `subject`: answers each request with what `answer` makes of the envelope
/// and the `X-Trace-Id` header, after `delay`.
async fn service(
    subject: &str,
    delay: Duration,
    answer: impl Fn(Value, Option<String>) -> Bytes + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let c = client(&shared_url()).await?;
    let mut sub = c.subscribe(subject.to_owned()).await?;
    c.flush().await?;
    // A round trip, so the server has the subscription before the test sends.
    let _ = c.request(c.new_inbox(), Bytes::new()).await;
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let envelope: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
            let header = m
                .headers
                .as_ref()
                .and_then(|h| h.get("X-Trace-Id"))
                .map(|v| v.as_str().to_owned());
            let body = answer(envelope, header);
            tokio::time::sleep(delay).await;
            if let Some(reply) = m.reply {
                let _ = c.publish(reply, body).await;
            }
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_round_trip_keeps_the_trace_id() -> Result<()> {
    let subject = format!("{}.calls", root());
    let worker = service(&subject, Duration::ZERO, |env, header| {
        Bytes::from(
            json!({"code":0,"message":"success",
                   "data":{"trace_id":env["trace_id"],"header":header,"user":env["user"],
                           "command":env["command"],"echo":env["data"]}})
            .to_string(),
        )
    })
    .await?;
    let upstream = NatsUpstream::connect(&shared_url()).await?;
    let target = Target::parse(&format!("nats:{subject}")).map_err(anyhow::Error::msg)?;
    let reply = upstream
        .call(&target, envelope("t-42")?, "t-42", Duration::from_secs(2))
        .await?;
    assert_eq!(reply.code, 0);
    assert_eq!(reply.message.as_deref(), Some("success"));
    let data: Value = serde_json::from_str(reply.data.as_deref().map_or("null", RawValue::get))?;
    assert_eq!(
        data,
        json!({"trace_id":"t-42","header":"t-42","user":{"id":"42","role":"admin"},
               "command":"CALL","echo":{"x":1}})
    );
    worker.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors() -> Result<()> {
    let upstream = NatsUpstream::connect(&shared_url()).await?;
    let r = root();

    // Nobody listens: "no responders", at once.
    let target = Target::parse(&format!("nats:{r}.nobody")).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let e = upstream
        .call(&target, envelope("t-1")?, "t-1", Duration::from_secs(3))
        .await
        .err();
    assert_eq!(
        e,
        Some(UpstreamError::Unavailable(format!(
            "no service listens on {r}.nobody"
        )))
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Too slow: a timeout after the command's timeout.
    let slow = service(&format!("{r}.slow"), Duration::from_secs(2), |_, _| {
        Bytes::from_static(br#"{"code":0}"#)
    })
    .await?;
    let target = Target::parse(&format!("nats:{r}.slow")).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let e = upstream
        .call(&target, envelope("t-2")?, "t-2", Duration::from_millis(300))
        .await
        .err();
    assert_eq!(e, Some(UpstreamError::Timeout(Duration::from_millis(300))));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(1),
        "{took:?}"
    );

    // Not a reply: 502; an empty reply: answered later (202).
    let bad = service(&format!("{r}.bad"), Duration::ZERO, |env, _| {
        if env["data"]["x"] == 1 && env["trace_id"] == "empty" {
            Bytes::new()
        } else {
            Bytes::from_static(b"<html>oops</html>")
        }
    })
    .await?;
    let target = Target::parse(&format!("nats:{r}.bad")).map_err(anyhow::Error::msg)?;
    let e = upstream
        .call(&target, envelope("t-3")?, "t-3", Duration::from_secs(2))
        .await
        .err();
    assert!(matches!(e, Some(UpstreamError::BadReply(_))), "{e:?}");
    let later = upstream
        .call(&target, envelope("empty")?, "empty", Duration::from_secs(2))
        .await?;
    assert_eq!(later.code, herald_ingest::http::REPLY_LATER);

    // Not a NATS target.
    let http = Target::parse("http://127.0.0.1:1/x").map_err(anyhow::Error::msg)?;
    assert!(matches!(
        upstream
            .call(&http, envelope("t-4")?, "t-4", Duration::from_secs(1))
            .await,
        Err(UpstreamError::Unavailable(_))
    ));
    slow.abort();
    bad.abort();
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private nats-server (killed on drop).
struct Server {
    child: Child,
}

impl Server {
    async fn start(port: u16) -> Result<Self> {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("nats-server")?;
        let server = Self { child };
        let deadline = Instant::now() + WAIT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("nats-server on {port} did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
