//! Required test 10 (CLI): `herald check-config` and `herald token`.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn herald(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run herald")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check(config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config).unwrap();
    herald(&["check-config", path.to_str().unwrap()])
}

#[test]
fn check_config_accepts_the_test_config_and_a_full_one() {
    let keys = Keys::random();
    let out = check(&keys.config(""));
    assert_eq!(
        out.status.code(),
        Some(0),
        "valid config refused:\n{}",
        text(&out)
    );

    let full = keys.config(
        r#"
[server]
node_id = "n1"

[auth]
user_claim = "sub"
audience = "herald-tests"

[limits]
max_message_size = 65536
max_connections_per_user = 3
max_subscriptions_per_connection = 100
subscribes_per_second = 5
client_publishes_per_minute = 50
ingest_per_second = 1000
send_queue = 64
slow_consumer_timeout = "2s"
write_timeout = "3s"
auth_timeout = "5s"
heartbeat_interval = "10s"
heartbeat_timeout = "30s"
max_errors_per_minute = 10

[log]
format = "json"

[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"

[[topics]]
pattern = "admin/**"
subscribe = { roles = ["admin"] }

[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"
"#,
    );
    let out = check(&full);
    assert_eq!(
        out.status.code(),
        Some(0),
        "valid config refused:\n{}\n{full}",
        text(&out)
    );
}

#[test]
fn check_config_names_unknown_keys_and_exits_2() {
    let keys = Keys::random();
    for (extra, key) in [
        ("[server]\nbogus_key = 1\n", "bogus_key"),
        (
            "[limits]\nmax_conections_per_user = 5\n",
            "max_conections_per_user",
        ),
        ("[auth]\njwt_secrett = \"x\"\n", "jwt_secrett"),
        ("[nonsense_section]\na = 1\n", "nonsense_section"),
    ] {
        let out = check(&keys.config(extra));
        assert_eq!(
            out.status.code(),
            Some(2),
            "unknown key {key}:\n{}",
            text(&out)
        );
        assert!(
            text(&out).contains(key),
            "message must name {key}:\n{}",
            text(&out)
        );
    }
}

#[test]
fn check_config_refuses_bad_values() {
    let keys = Keys::random();
    for (extra, needle) in [
        (
            "[limits]\nheartbeat_interval = \"10\"\n",
            "heartbeat_interval",
        ),
        ("[server]\nlisten = \"not an address\"\n", "listen"),
    ] {
        let out = check(&keys.config(extra));
        assert!(!out.status.success(), "{extra} accepted:\n{}", text(&out));
        assert!(
            text(&out).contains(needle),
            "message must name {needle}:\n{}",
            text(&out)
        );
    }
    let out = herald(&["check-config", "/nonexistent/herald.toml"]);
    assert!(!out.status.success(), "missing file accepted");
}

#[tokio::test]
async fn token_command_mints_a_jwt_the_server_accepts() {
    let secret = format!("cli-secret-{}", random_hex(16));
    let out = herald(&["token", "--secret", &secret, "--user", "cli-user"]);
    assert!(out.status.success(), "herald token failed:\n{}", text(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.matches('.').count(), 2, "not a JWT: {token:?}");
    assert!(
        !token.contains(char::is_whitespace),
        "stdout must be just the token: {token:?}"
    );

    let server = Server::builder().secret(&secret).start().await;
    let mut ws = server.connect_token(&token, "cli-user").await;
    ws.assert_alive().await;

    // The same token against a server with another secret is refused.
    let other = Server::start("").await;
    let refused = connect(&other.ws_url(), Some(&token)).await;
    assert_eq!(refused.err().map(|e| e.status), Some(401));
}
