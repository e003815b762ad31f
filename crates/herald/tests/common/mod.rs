//! Harness for the integration tests: starts the real `herald` binary on port 0 and talks to
//! it over real sockets (raw tokio-tungstenite for WebSocket, reqwest for HTTP).
//!
//! Layout:
//! - [`Server`] / [`ServerBuilder`]: writes a config into a tempdir, spawns `herald serve`,
//!   waits for `listening on http://…`, kills the process on drop (and prints its stderr when
//!   the test is panicking).
//! - [`Ws`]: one WebSocket client with `recv_json`, `request`, `expect_close`,
//!   `expect_no_message`; [`connect`] / [`connect_with`] return [`HandshakeFailure`] when the
//!   server refuses the upgrade.
//! - JWT helpers ([`jwt_hs256`], [`jwt_unsigned`]), HTTP helpers on [`Server`], and
//!   [`eventually`] to poll for a condition with a deadline (never sleep to synchronise).
#![allow(dead_code)]

pub mod node;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::{self, Message};

/// Default wait for something that should happen promptly on localhost.
pub const T: Duration = Duration::from_secs(5);
/// Longest fixed wait allowed, and only to assert that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// `n` random bytes as lowercase hex (from the OS, no rand crate needed).
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().fold(String::with_capacity(n * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits (polling every 20 ms) until the wall-clock second is strictly greater than `secs`.
/// Used where the server compares 1-second-resolution timestamps (`iat`).
pub async fn wait_clock_past(secs: i64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while now_secs() <= secs {
        assert!(Instant::now() < deadline, "clock did not pass {secs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` every 20 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `topic=…&topic=…`, each topic percent-encoded (the `/sse` and `/api/v1/poll` queries).
pub fn topics_query(topics: &[&str]) -> String {
    topics
        .iter()
        .map(|t| format!("topic={}", encode_segment(t)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes `s` as one URL path segment (`device/d-9` → `device%2Fd-9`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

/// Signs `claims` with HS256.
pub fn jwt_hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// An `alg: none` token (header and claims, empty signature).
pub fn jwt_unsigned(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Standard claims `{sub, iat: now, exp: now + ttl, jti}` with `extra` merged over them; a
/// `null` in `extra` removes that claim (e.g. `{"sub": null}`).
pub fn claims(user: &str, ttl_secs: i64, extra: Value) -> Value {
    let now = now_secs();
    let mut c = json!({
        "sub": user,
        "iat": now,
        "exp": now + ttl_secs,
        "jti": format!("j-{}", random_hex(8)),
    });
    if let Value::Object(extra) = extra {
        let obj = c.as_object_mut().unwrap();
        for (k, v) in extra {
            if v.is_null() {
                obj.remove(&k);
            } else {
                obj.insert(k, v);
            }
        }
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The credentials a test server is configured with.
#[derive(Clone, Debug)]
pub struct Keys {
    pub secret: String,
    pub admin_key: String,
    pub publish_key: String,
}

impl Keys {
    pub fn random() -> Keys {
        Keys {
            secret: format!("test-secret-{}", random_hex(20)),
            admin_key: format!("adm-{}", random_hex(12)),
            publish_key: format!("pub-{}", random_hex(12)),
        }
    }

    /// The full config file: the base (server, auth, two API keys) merged with `extra`.
    ///
    /// `extra` is TOML. A plain table that the base also has (`[server]`, `[auth]`) is merged
    /// into it key by key (a key given in `extra` replaces the base's); every other table
    /// (`[limits]`, `[log]`, `[[topics]]`, `[[auth.client_keys]]`…) is appended as written.
    pub fn config(&self, extra: &str) -> String {
        let mut sections: Vec<(String, Vec<String>)> = vec![
            (
                "[server]".into(),
                vec![
                    r#"listen = "127.0.0.1:0""#.into(),
                    r#"shutdown_grace = "1s""#.into(),
                ],
            ),
            (
                "[auth]".into(),
                vec![format!("jwt_secret = {:?}", self.secret)],
            ),
            (
                "[[auth.api_keys]]".into(),
                vec![
                    format!("key = {:?}", self.admin_key),
                    r#"scopes = ["publish", "admin"]"#.into(),
                ],
            ),
            (
                "[[auth.api_keys]]".into(),
                vec![
                    format!("key = {:?}", self.publish_key),
                    r#"scopes = ["publish"]"#.into(),
                ],
            ),
        ];
        let base_len = sections.len();
        let mut current: Option<usize> = None;
        for line in extra.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                let plain = !t.starts_with("[[");
                let existing = sections[..base_len]
                    .iter()
                    .position(|(h, _)| plain && h == t);
                current = Some(existing.unwrap_or_else(|| {
                    sections.push((t.to_owned(), Vec::new()));
                    sections.len() - 1
                }));
                continue;
            }
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let idx = current
                .unwrap_or_else(|| panic!("extra TOML must start with a [section]: {line:?}"));
            let body = &mut sections[idx].1;
            let key = t.split('=').next().unwrap().trim().to_owned();
            if idx < base_len
                && let Some(old) = body
                    .iter_mut()
                    .find(|l| l.split('=').next().unwrap().trim() == key)
            {
                *old = t.to_owned();
                continue;
            }
            body.push(t.to_owned());
        }
        let mut out = String::new();
        for (header, body) in sections {
            out.push_str(&header);
            out.push('\n');
            for l in body {
                out.push_str(&l);
                out.push('\n');
            }
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

pub struct ServerBuilder {
    extra: String,
    env: Vec<(String, String)>,
    keys: Keys,
}

impl ServerBuilder {
    /// Extra TOML merged into the base config (see [`Keys::config`]).
    pub fn toml(mut self, extra: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(extra);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn secret(mut self, secret: &str) -> Self {
        self.keys.secret = secret.into();
        self
    }

    /// Shares credentials between servers (e.g. the nodes of a cluster).
    pub fn keys(mut self, keys: &Keys) -> Self {
        self.keys = keys.clone();
        self
    }

    pub async fn start(self) -> Server {
        let config = self.keys.config(&self.extra);
        Server::spawn(config, self.keys, self.env).await
    }
}

impl Server {
    /// Spawns `herald serve` with exactly `config` and waits for its `listening on` line.
    async fn spawn(config: String, keys: Keys, env: Vec<(String, String)>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("herald.toml");
        std::fs::write(&config_path, &config).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env_remove("RUST_LOG");
        // Environment overrides config: keep the developer's HERALD_* out of the tests.
        for (k, _) in std::env::vars() {
            if k.starts_with("HERALD_") {
                cmd.env_remove(k);
            }
        }
        // For debugging a test: HERALD_TEST_LOG=herald_cluster=debug,info is the servers' RUST_LOG.
        if let Ok(filter) = std::env::var("HERALD_TEST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = child.stdout.take().unwrap();
        let pid = child.id();

        let stdout_buf = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        {
            let buf = stdout_buf.clone();
            // Keeps draining stdout for the life of the process so it never blocks on a pipe.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    buf.lock().unwrap().push_str(&line);
                    buf.lock().unwrap().push('\n');
                    if let Some(addr) = parse_listening(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                }
            });
        }

        let mut server = Server {
            addr: "127.0.0.1:0".parse().unwrap(),
            admin_key: keys.admin_key.clone(),
            publish_key: keys.publish_key.clone(),
            secret: keys.secret.clone(),
            keys,
            env,
            pid,
            config_path,
            config_text: config,
            stderr_path,
            child: Some(child),
            stdout: stdout_buf,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
            _dir: dir,
        };
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(addr)) => server.addr = addr,
            Ok(Err(_)) => panic!(
                "herald exited before printing `listening on`\nconfig:\n{}\nstdout:\n{}\nstderr:\n{}",
                server.config_text,
                server.stdout_text(),
                server.stderr_text()
            ),
            Err(_) => panic!(
                "herald did not print `listening on` within 20 s\nstdout:\n{}\nstderr:\n{}",
                server.stdout_text(),
                server.stderr_text()
            ),
        }
        server
    }
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let url = rest.split_whitespace().next()?;
    let hostport = url.strip_prefix("http://")?.trim_end_matches('/');
    hostport.parse().ok()
}

pub struct Server {
    pub addr: SocketAddr,
    pub admin_key: String,
    pub publish_key: String,
    pub secret: String,
    pub keys: Keys,
    env: Vec<(String, String)>,
    pub pid: u32,
    pub config_path: PathBuf,
    pub config_text: String,
    pub stderr_path: PathBuf,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr_text();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "---- herald (pid {}) on {} ----\nconfig:\n{}\nstdout:\n{}\nstderr (last {} lines):\n{}\n---- end herald ----",
                self.pid,
                self.addr,
                self.config_text,
                self.stdout_text(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

impl Server {
    /// A server with the base config plus `extra_toml`.
    pub async fn start(extra_toml: &str) -> Server {
        Server::builder().toml(extra_toml).start().await
    }

    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            extra: String::new(),
            env: Vec::new(),
            keys: Keys::random(),
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid);
    }

    /// Waits for the process to exit (polling), panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("process already reaped");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "herald did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then reaps the process.
    pub async fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(T).await;
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_some(),
            None => true,
        }
    }

    /// Starts the same configuration again on the same address (after the process exited:
    /// SIGKILL, or SIGTERM and [`Server::wait_exit`]). A running process is killed first.
    pub async fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let pinned = format!("listen = \"{}\"", self.addr);
        let config = self
            .config_text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("listen =") {
                    pinned.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let next = Server::spawn(config, self.keys.clone(), self.env.clone()).await;
        assert_eq!(next.addr, self.addr, "restarted on another address");
        // The old value only holds the exited process's files now.
        drop(std::mem::replace(self, next));
    }

    /// `GET /readyz` answered 200 (false when it answers otherwise or not at all).
    pub async fn is_ready(&self) -> bool {
        let url = format!("{}/readyz", self.http_url());
        matches!(self.http.get(&url).send().await, Ok(r) if r.status().as_u16() == 200)
    }

    // --- tokens -------------------------------------------------------------------------------

    /// HS256 token for `user` signed with this server's secret: `{sub, iat, exp = now + ttl,
    /// jti}` with `extra_claims` merged over (a `null` removes a claim).
    pub fn token(&self, user: &str, ttl_secs: i64, extra_claims: Value) -> String {
        jwt_hs256(&self.secret, &claims(user, ttl_secs, extra_claims))
    }

    // --- WebSocket ----------------------------------------------------------------------------

    /// Connects as `user` (1 h token in the Authorization header) and reads the welcome.
    pub async fn connect_user(&self, user: &str) -> Ws {
        self.connect_user_with(user, json!({})).await
    }

    pub async fn connect_user_with(&self, user: &str, extra_claims: Value) -> Ws {
        let token = self.token(user, 3600, extra_claims);
        self.connect_token(&token, user).await
    }

    /// Connects with `token` as bearer and asserts the first frame is a welcome for `user`.
    pub async fn connect_token(&self, token: &str, user: &str) -> Ws {
        let mut ws = connect(&self.ws_url(), Some(token))
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e:?}"));
        ws.expect_welcome(user).await;
        ws
    }

    // --- HTTP ---------------------------------------------------------------------------------

    /// Raw HTTP request; returns status and body text.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<(Vec<u8>, &str)>,
    ) -> (u16, String) {
        let url = format!("{}{}", self.http_url(), path);
        let mut req = self.http.request(method.parse().expect("method"), &url);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some((bytes, content_type)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, text)
    }

    /// POST JSON with `Authorization: Bearer key`; the body parsed as JSON (or a JSON string
    /// holding the raw text when it is not JSON).
    pub async fn api_post(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        let (s, t) = self
            .http(
                "POST",
                path,
                Some(key),
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await;
        (s, parse_body(&t))
    }

    pub async fn api_get(&self, path: &str, key: &str) -> (u16, Value) {
        let (s, t) = self.http("GET", path, Some(key), None).await;
        (s, parse_body(&t))
    }

    /// GET without credentials.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.http("GET", path, None, None).await
    }

    /// Publishes through the API with the publish key; asserts 200 and returns the id.
    pub async fn publish(&self, topic: &str, event: &str, data: Value) -> String {
        let (s, b) = self
            .api_post(
                "/api/v1/publish",
                &self.publish_key,
                &json!({"topic": topic, "event": event, "data": data}),
            )
            .await;
        assert_eq!(s, 200, "publish to {topic}: {b}");
        b["id"]
            .as_str()
            .unwrap_or_else(|| panic!("publish answer without id: {b}"))
            .to_owned()
    }

    /// `connections` from `GET /api/v1/users/{user}/presence`.
    pub async fn presence(&self, user: &str) -> u64 {
        let (s, b) = self
            .api_get(
                &format!("/api/v1/users/{}/presence", encode_segment(user)),
                &self.publish_key,
            )
            .await;
        assert_eq!(s, 200, "presence of {user}: {b}");
        b["connections"]
            .as_u64()
            .unwrap_or_else(|| panic!("presence without connections: {b}"))
    }

    pub async fn wait_presence(&self, user: &str, n: u64, timeout: Duration) {
        eventually(
            timeout,
            &format!("presence of {user} == {n}"),
            || async move { self.presence(user).await == n },
        )
        .await;
    }

    /// `subscribers` from `GET /api/v1/topics/{topic}/subscribers`.
    pub async fn subscribers(&self, topic: &str) -> u64 {
        let (s, b) = self
            .api_get(
                &format!("/api/v1/topics/{}/subscribers", encode_segment(topic)),
                &self.publish_key,
            )
            .await;
        assert_eq!(s, 200, "subscribers of {topic}: {b}");
        b["subscribers"]
            .as_u64()
            .unwrap_or_else(|| panic!("answer without subscribers: {b}"))
    }

    pub async fn wait_subscribers(&self, topic: &str, n: u64) {
        eventually(
            T,
            &format!("subscribers of {topic} == {n}"),
            || async move { self.subscribers(topic).await == n },
        )
        .await;
    }

    /// `GET /ws/stats` with the admin key.
    pub async fn stats(&self) -> Value {
        let (s, b) = self.api_get("/ws/stats", &self.admin_key).await;
        assert_eq!(s, 200, "/ws/stats: {b}");
        b
    }

    pub async fn metrics(&self) -> String {
        let (s, text) = self.get("/metrics").await;
        assert_eq!(s, 200, "/metrics: {text}");
        text
    }
}

fn parse_body(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Sum of the samples of metric `name` whose labels include every `(label, value)` in
/// `labels`; `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_str) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| label_str.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

/// Why a WebSocket handshake did not succeed: the HTTP status and body of the refusal, or
/// status 0 with the I/O error text when there was no HTTP answer at all.
#[derive(Debug)]
pub struct HandshakeFailure {
    pub status: u16,
    pub body: String,
}

impl HandshakeFailure {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {:?}", self.body))
    }
}

#[derive(Default)]
pub struct ConnectOpts<'a> {
    pub bearer: Option<&'a str>,
    pub subprotocol: Option<&'a str>,
    /// SO_RCVBUF for the client socket (set before connecting).
    pub recv_buffer: Option<u32>,
    /// TCP_MAXSEG for the client socket (keeps the server's send buffer small on loopback).
    pub max_segment: Option<u32>,
}

pub async fn connect(url: &str, bearer: Option<&str>) -> Result<Ws, HandshakeFailure> {
    connect_with(
        url,
        ConnectOpts {
            bearer,
            ..Default::default()
        },
    )
    .await
}

pub async fn connect_with(url: &str, opts: ConnectOpts<'_>) -> Result<Ws, HandshakeFailure> {
    let io_fail = |e: String| HandshakeFailure { status: 0, body: e };
    let authority = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("bad ws url {url}"));
    let addr: SocketAddr = authority.parse().expect("ws url must use ip:port");

    let mut request = url.into_client_request().expect("ws request");
    if let Some(b) = opts.bearer {
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {b}")).unwrap(),
        );
    }
    if let Some(p) = opts.subprotocol {
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).unwrap(),
        );
    }

    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(n) = opts.recv_buffer {
        socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    if let Some(mss) = opts.max_segment {
        use std::os::fd::AsRawFd;
        let v: libc::c_int = mss as libc::c_int;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let stream = tokio::time::timeout(T, socket.connect(addr))
        .await
        .map_err(|_| io_fail("tcp connect timed out".into()))?
        .map_err(|e| io_fail(format!("tcp connect: {e}")))?;
    let _ = stream.set_nodelay(true);

    let (stream, response) =
        match tokio::time::timeout(T, tokio_tungstenite::client_async(request, stream)).await {
            Err(_) => return Err(io_fail("websocket handshake timed out".into())),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(HandshakeFailure { status, body });
            }
            Ok(Err(e)) => return Err(io_fail(format!("handshake: {e}"))),
            Ok(Ok(x)) => x,
        };
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(Ws {
        stream,
        protocol,
        welcome: None,
        backlog: VecDeque::new(),
        skipped: Vec::new(),
        next_id: 0,
    })
}

/// One frame as seen by a test.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    /// A text frame that is not JSON (e.g. the bare `pong`).
    Text(String),
    Binary(Vec<u8>),
    Ping,
    Pong,
    /// Close frame: code and reason (`None` when the frame had no code).
    Close(Option<(u16, String)>),
    /// The stream ended without a close frame (EOF or an error such as a reset).
    Ended(String),
}

pub struct Ws {
    pub stream: WebSocketStream<TcpStream>,
    /// The `Sec-WebSocket-Protocol` the server chose, if any.
    pub protocol: Option<String>,
    /// The welcome frame, once read by [`Ws::expect_welcome`].
    pub welcome: Option<Value>,
    /// Frames read while waiting for something else (e.g. by [`Ws::request`]); returned first
    /// by [`Ws::recv_json`].
    backlog: VecDeque<Value>,
    /// Data frames skipped by [`Ws::expect_close`].
    pub skipped: Vec<Value>,
    next_id: u64,
}

impl Ws {
    /// A fresh request id (`"r1"`, `"r2"`…).
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Next frame from the wire, `None` on timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let msg = tokio::time::timeout(timeout, self.stream.next())
            .await
            .ok()?;
        Some(match msg {
            None => Frame::Ended("end of stream".into()),
            Some(Err(e)) => Frame::Ended(e.to_string()),
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Value>(t.as_str()) {
                Ok(v) if v.is_object() => Frame::Json(v),
                _ => Frame::Text(t.as_str().to_owned()),
            },
            Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
            Some(Ok(Message::Ping(_))) => Frame::Ping,
            Some(Ok(Message::Pong(_))) => Frame::Pong,
            Some(Ok(Message::Close(c))) => {
                Frame::Close(c.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())))
            }
            Some(Ok(Message::Frame(_))) => Frame::Ended("raw frame".into()),
        })
    }

    /// Next JSON frame from the wire (not the backlog), skipping Ping/Pong.
    async fn recv_wire(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                None => panic!("no JSON frame within {timeout:?}"),
                Some(Frame::Ping | Frame::Pong) => continue,
                Some(Frame::Json(v)) => return v,
                Some(other) => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// Next JSON object (backlog first), skipping WebSocket Ping/Pong; panics on anything else
    /// or on timeout.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.recv_wire(timeout).await
    }

    /// Next JSON frame, asserted to be a `message` on `topic`.
    pub async fn recv_message(&mut self, topic: &str) -> Value {
        let m = self.recv_json(T).await;
        assert_eq!(
            m["type"], "message",
            "expected a message on {topic}, got {m}"
        );
        assert_eq!(m["topic"], topic, "expected a message on {topic}, got {m}");
        m
    }

    /// Reads the welcome and checks its user id.
    pub async fn expect_welcome(&mut self, user: &str) -> Value {
        let w = self.recv_json(T).await;
        assert_eq!(w["type"], "welcome", "expected welcome, got {w}");
        assert_eq!(w["user_id"], user, "welcome for the wrong user: {w}");
        self.welcome = Some(w.clone());
        w
    }

    /// Next non-JSON text frame (e.g. `pong` for a bare `ping`).
    pub async fn recv_text(&mut self, timeout: Duration) -> String {
        assert!(self.backlog.is_empty(), "unread frames: {:?}", self.backlog);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                None => panic!("no text frame within {timeout:?}"),
                Some(Frame::Ping | Frame::Pong) => continue,
                Some(Frame::Text(t)) => return t,
                Some(other) => panic!("expected a bare text frame, got {other:?}"),
            }
        }
    }

    /// Waits for the close frame, skipping (and keeping in `skipped`) data frames; panics if
    /// the stream ends without one or on timeout. Returns (code, reason).
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        match self.expect_close_or_end(timeout).await {
            Ok(c) => c,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }

    /// Like [`Ws::expect_close`] but a stream that ends without a close frame (reset, EOF) is
    /// `Err(description)` instead of a panic.
    pub async fn expect_close_or_end(
        &mut self,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        self.skipped.extend(self.backlog.drain(..));
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                None => panic!(
                    "no close within {timeout:?} (skipped {} frames, last: {:?})",
                    self.skipped.len(),
                    self.skipped.last()
                ),
                Some(Frame::Json(v)) => self.skipped.push(v),
                Some(Frame::Text(t)) => self.skipped.push(Value::String(t)),
                Some(Frame::Binary(_) | Frame::Ping | Frame::Pong) => continue,
                Some(Frame::Close(c)) => return Ok(c.unwrap_or((1005, String::new()))),
                Some(Frame::Ended(e)) => return Err(e),
            }
        }
    }

    /// Asserts that nothing but Ping/Pong arrives for `d` (at most [`QUIET`]); the only fixed
    /// wait in the suite.
    pub async fn expect_no_message(&mut self, d: Duration) {
        assert!(d <= QUIET, "expect_no_message waits at most {QUIET:?}");
        assert!(
            self.backlog.is_empty(),
            "unexpected frames: {:?}",
            self.backlog
        );
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next_frame(left).await {
                None => return,
                Some(Frame::Ping | Frame::Pong) => continue,
                Some(f) => panic!("expected no message, got {f:?}"),
            }
        }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        tokio::time::timeout(T, self.stream.send(Message::text(s.to_owned())))
            .await
            .expect("send timed out")
            .expect("send text");
    }

    /// Sends a text frame, returning the error instead of panicking (for floods where the
    /// server may close mid-way).
    pub async fn try_send_text(&mut self, s: String) -> Result<(), String> {
        match tokio::time::timeout(T, self.stream.send(Message::text(s))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        tokio::time::timeout(T, self.stream.send(Message::binary(b)))
            .await
            .expect("send timed out")
            .expect("send binary");
    }

    /// Sends `req` (which must have an `id`) and waits for the reply with that id; other frames
    /// read meanwhile go to the backlog (see [`Ws::request_with_others`] to get them).
    pub async fn request(&mut self, req: Value) -> Value {
        let (reply, others) = self.request_with_others(req).await;
        self.backlog.extend(others);
        reply
    }

    /// Sends `req` and returns the reply with its id plus the other frames that arrived first.
    pub async fn request_with_others(&mut self, req: Value) -> (Value, Vec<Value>) {
        let id = req["id"].clone();
        assert!(!id.is_null(), "request without id: {req}");
        self.send_json(&req).await;
        let mut others = Vec::new();
        loop {
            let v = self.recv_wire(T).await;
            if v["type"] == "reply" && v["id"] == id {
                return (v, others);
            }
            others.push(v);
        }
    }

    /// Subscribes to `topic` and returns the reply.
    pub async fn subscribe(&mut self, topic: &str) -> Value {
        let id = self.next_id();
        self.request(json!({"type": "subscribe", "id": id, "topic": topic}))
            .await
    }

    /// Subscribes and asserts code 0.
    pub async fn subscribe_ok(&mut self, topic: &str) {
        let r = self.subscribe(topic).await;
        assert_eq!(r["code"], 0, "subscribe {topic}: {r}");
    }

    pub async fn unsubscribe_ok(&mut self, topic: &str) {
        let id = self.next_id();
        let r = self
            .request(json!({"type": "unsubscribe", "id": id, "topic": topic}))
            .await;
        assert_eq!(r["code"], 0, "unsubscribe {topic}: {r}");
    }

    pub async fn join_room_ok(&mut self, room: &str) {
        let id = self.next_id();
        let r = self
            .request(json!({"type": "join_room", "id": id, "room": room}))
            .await;
        assert_eq!(r["code"], 0, "join_room {room}: {r}");
    }

    /// Client publish; returns the reply.
    pub async fn publish(&mut self, topic: &str, event: &str, data: Value) -> Value {
        let id = self.next_id();
        self.request(
            json!({"type": "publish", "id": id, "topic": topic, "event": event, "data": data}),
        )
        .await
    }

    /// Sends `{"type":"ping"}` and waits for `{"type":"pong"}` (other frames go to the
    /// backlog): proves the connection is alive and the server still reads it.
    pub async fn assert_alive(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        loop {
            let v = self.recv_wire(T).await;
            if v["type"] == "pong" {
                return;
            }
            self.backlog.push_back(v);
        }
    }

    /// Frames read but not yet consumed.
    pub fn take_backlog(&mut self) -> Vec<Value> {
        self.backlog.drain(..).collect()
    }

    /// Sends a normal close and waits briefly for the server's answer.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A fresh schema in the local PostgreSQL database `test`, dropped with the value: a store
/// several servers can share (`url`).
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

fn psql(sql: &str) {
    let status = Command::new("psql")
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
        .status();
    assert!(status.is_ok_and(|s| s.success()), "psql: {sql}");
}

impl PgSchema {
    pub fn new() -> PgSchema {
        let name = format!("herald_t_{}", random_hex(12));
        psql(&format!("CREATE SCHEMA {name}"));
        let url = format!("postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{name}");
        PgSchema { name, url }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}
