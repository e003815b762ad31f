//! Real JavaScript clients (`tests/node/*.mjs`: `@stomp/stompjs`, `eventsource`, `ws`), run by
//! Node from the integration tests. A script takes its inputs as environment variables and
//! prints one JSON object per line on stdout for the test to read; [`NodeClient`] kills it on
//! drop. The npm packages are installed by the first test that needs them (`npm ci` on the
//! committed lock file, once per test binary), so `cargo test --workspace` stays the one
//! command on a fresh machine.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// `tests/node` of the repository.
pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/node")
}

/// Installs the packages once (`npm ci`), panicking with npm's output when that fails.
fn ensure_installed() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let dir = node_dir();
        let lock = dir.join("package-lock.json");
        let stamp = dir.join("node_modules/.package-lock.json");
        let fresh = match (std::fs::metadata(&lock), std::fs::metadata(&stamp)) {
            (Ok(l), Ok(s)) => match (l.modified(), s.modified()) {
                (Ok(l), Ok(s)) => s >= l,
                _ => false,
            },
            _ => false,
        };
        if fresh {
            return Ok(());
        }
        let out = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("cannot run npm (is Node.js installed?): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "npm ci in {} failed:\n{}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// A running Node script.
pub struct NodeClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
    name: String,
    /// Lines read by [`NodeClient::until`] while looking for another event, oldest first.
    skipped: std::collections::VecDeque<Value>,
}

impl NodeClient {
    /// Runs `tests/node/<script>` with `env`.
    pub fn spawn(script: &str, env: &[(&str, String)]) -> NodeClient {
        ensure_installed();
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(script)
            .current_dir(node_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {script}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        NodeClient {
            child,
            lines: BufReader::new(stdout).lines(),
            stdin,
            name: script.to_owned(),
            skipped: Default::default(),
        }
    }

    /// The script's next stdout line as JSON (panics after `timeout` or at its exit); lines
    /// skipped by [`NodeClient::until`] come first.
    pub async fn next(&mut self, timeout: Duration) -> Value {
        if let Some(v) = self.skipped.pop_front() {
            return v;
        }
        self.read(timeout).await
    }

    async fn read(&mut self, timeout: Duration) -> Value {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{}: no output within {timeout:?}", self.name))
            .unwrap_or_else(|e| panic!("{}: reading stdout: {e}", self.name))
            .unwrap_or_else(|| panic!("{}: exited before printing what was expected", self.name));
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {line}", self.name))
    }

    /// The first line with `"event": <event>`, among those skipped before or read now; the
    /// others are kept, in order, for [`NodeClient::next`] and later calls. Panics after
    /// `timeout`, or at an `error`, `closed` or `script_error` line when that is not what is
    /// awaited.
    pub async fn until(&mut self, event: &str, timeout: Duration) -> Value {
        if let Some(i) = self.skipped.iter().position(|v| v["event"] == event) {
            return self.skipped.remove(i).expect("index in range");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.read(left).await;
            if v["event"] == event {
                return v;
            }
            if matches!(
                v["event"].as_str(),
                Some("error" | "closed" | "script_error")
            ) {
                panic!("{}: {v} while waiting for {event}", self.name);
            }
            self.skipped.push_back(v);
        }
    }

    /// Sends one line (a JSON command) to the script's stdin.
    pub async fn send(&mut self, cmd: &Value) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().expect("stdin open");
        let mut line = cmd.to_string();
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{}: writing stdin: {e}", self.name));
    }

    /// Waits for the script to exit; its exit code.
    pub async fn wait(mut self, timeout: Duration) -> Option<i32> {
        self.stdin = None;
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: did not exit within {timeout:?}", self.name))
            .ok()
            .and_then(|s| s.code())
    }
}
