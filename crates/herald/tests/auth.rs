//! Authentication on `/ws`: refused tokens (401 at the handshake), the three credential
//! places, first-frame auth and its timeout, expiry (4010), refresh (and 409 for another
//! user), revocation by jti / user and the disconnect API (4011).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Asserts the handshake with `token` (as bearer and as `?token=`) is refused with a 401 and a
/// JSON `{"code":401,"message":…}` body.
async fn assert_refused(server: &Server, what: &str, token: &str) {
    let via_header = connect(&server.ws_url(), Some(token)).await;
    let via_query = connect(&format!("{}?token={token}", server.ws_url()), None).await;
    for (how, res) in [("header", via_header), ("?token=", via_query)] {
        match res {
            Ok(mut ws) => {
                let f = ws.next_frame(T).await;
                panic!("{what} via {how}: upgrade accepted (first frame {f:?}), want HTTP 401")
            }
            Err(e) => {
                assert_eq!(e.status, 401, "{what} via {how}: {e:?}");
                let body = e.json();
                assert_eq!(body["code"], 401, "{what} via {how}: {body}");
                assert!(
                    body["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{what} via {how}: {body}"
                );
            }
        }
    }
}

/// Required test 2 (handshake part).
#[tokio::test]
async fn bad_tokens_are_refused_at_the_handshake() {
    let server = Server::start("").await;
    let now = now_secs();

    let wrong_sig = jwt_hs256(
        "another-secret-that-is-long-enough!!",
        &claims("u1", 3600, json!({})),
    );
    assert_refused(&server, "wrong signature", &wrong_sig).await;

    // Far past any leeway.
    let expired = server.token("u1", -3600, json!({}));
    assert_refused(&server, "expired", &expired).await;

    let none = jwt_unsigned(&claims("u1", 3600, json!({})));
    assert_refused(&server, "alg:none", &none).await;

    let no_sub = server.token("u1", 3600, json!({"sub": null}));
    assert_refused(&server, "missing sub", &no_sub).await;

    let bad_sub = server.token("a b", 3600, json!({}));
    assert_refused(&server, "sub with a space", &bad_sub).await;

    let slash_sub = server.token("a/b", 3600, json!({}));
    assert_refused(&server, "sub with a slash", &slash_sub).await;

    let no_exp = server.token("u1", 3600, json!({"exp": null}));
    assert_refused(&server, "missing exp", &no_exp).await;

    let future_nbf = server.token("u1", 7200, json!({"nbf": now + 3600}));
    assert_refused(&server, "nbf in the future", &future_nbf).await;

    assert_refused(&server, "garbage", "not-a-jwt").await;

    // HS256 token whose header claims HS512 signed with the same secret: refused unless the
    // server accepts HS512 (it is configured for HS256 only).
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims("u1", 3600, json!({})),
        &jsonwebtoken::EncodingKey::from_secret(server.secret.as_bytes()),
    )
    .unwrap();
    assert_refused(&server, "HS512 when only HS256 is configured", &hs512).await;

    // An unknown client API key via ?api_key=.
    match connect(
        &format!("{}?api_key=nope-{}", server.ws_url(), random_hex(8)),
        None,
    )
    .await
    {
        Ok(_) => panic!("unknown api_key accepted"),
        Err(e) => assert_eq!(e.status, 401, "{e:?}"),
    }

    // The server is fine afterwards and a good token still works, via ?token= too.
    let good = server.token("u1", 3600, json!({}));
    let mut ws = connect(&format!("{}?token={good}", server.ws_url()), None)
        .await
        .expect("good ?token=");
    ws.expect_welcome("u1").await;
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let server = Server::start(
        r#"
[auth]
audience = "herald-tests"
issuer = "https://issuer.herald.test"
"#,
    )
    .await;
    let good = json!({"aud": "herald-tests", "iss": "https://issuer.herald.test"});

    let t = server.token(
        "u1",
        3600,
        json!({"aud": "someone-else", "iss": "https://issuer.herald.test"}),
    );
    assert_refused(&server, "wrong audience", &t).await;
    let t = server.token("u1", 3600, json!({"iss": "https://issuer.herald.test"}));
    assert_refused(&server, "missing audience", &t).await;
    let t = server.token(
        "u1",
        3600,
        json!({"aud": "herald-tests", "iss": "https://evil.test"}),
    );
    assert_refused(&server, "wrong issuer", &t).await;
    let t = server.token("u1", 3600, json!({"aud": "herald-tests"}));
    assert_refused(&server, "missing issuer", &t).await;

    let t = server.token("u1", 3600, good);
    server.connect_token(&t, "u1").await;
}

#[tokio::test]
async fn client_api_keys_are_a_fixed_identity() {
    let key = format!("device-key-{}", random_hex(12));
    let server = Server::start(&format!(
        r#"
[[auth.client_keys]]
key = "{key}"
user = "device-d-9"
claims = {{ org_id = "7" }}
"#
    ))
    .await;

    // Via ?api_key=, via the Authorization header, and via a first frame.
    let mut ws = connect(&format!("{}?api_key={key}", server.ws_url()), None)
        .await
        .expect("?api_key=");
    ws.expect_welcome("device-d-9").await;
    // The key's claims feed the ACL.
    ws.subscribe_ok("org/7/terminals").await;
    assert_eq!(ws.subscribe("org/8/terminals").await["code"], 403);

    let mut ws = connect(&server.ws_url(), Some(&key))
        .await
        .expect("bearer client key");
    ws.expect_welcome("device-d-9").await;

    let mut ws = connect(&server.ws_url(), None).await.expect("upgrade");
    ws.send_json(&json!({"type": "auth", "token": key})).await;
    ws.expect_welcome("device-d-9").await;

    // A server API key is not a client credential.
    let refused = connect(&server.ws_url(), Some(&server.admin_key)).await;
    assert_eq!(
        refused.err().map(|e| e.status),
        Some(401),
        "server API key on /ws"
    );
}

#[tokio::test]
async fn first_frame_auth_good_bad_and_timeout() {
    let server = Server::start(
        r#"
[limits]
auth_timeout = "500ms"
"#,
    )
    .await;

    // Good first-frame auth: no welcome before it, welcome after it.
    let mut ws = connect(&server.ws_url(), None)
        .await
        .expect("upgrade without credential");
    ws.expect_no_message(Duration::from_millis(100)).await;
    let token = server.token("u1", 3600, json!({}));
    ws.send_json(&json!({"type": "auth", "token": token})).await;
    ws.expect_welcome("u1").await;
    ws.subscribe_ok("room/after-auth").await;
    ws.assert_alive().await;

    // Bad first-frame credential → close 4001.
    let mut ws = connect(&server.ws_url(), None).await.expect("upgrade");
    let bad = server.token("u1", -3600, json!({}));
    ws.send_json(&json!({"type": "auth", "token": bad})).await;
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 4001, "bad first-frame token");
    assert!(
        !ws.skipped.iter().any(|f| f["type"] == "welcome"),
        "welcome sent for a bad token: {:?}",
        ws.skipped
    );

    let mut ws = connect(&server.ws_url(), None).await.expect("upgrade");
    ws.send_json(&json!({"type": "auth", "token": "garbage"}))
        .await;
    assert_eq!(
        ws.expect_close(T).await.0,
        4001,
        "garbage first-frame token"
    );

    // No auth frame within auth_timeout → 4001, not much earlier than the timeout.
    let started = Instant::now();
    let mut ws = connect(&server.ws_url(), None).await.expect("upgrade");
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 4001, "auth timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "closed after {took:?}, before auth_timeout (500ms)"
    );
    assert!(
        ws.skipped.is_empty(),
        "frames before the close: {:?}",
        ws.skipped
    );
}

/// Required test 3 (expiry and refresh).
#[tokio::test]
async fn expiring_token_closes_with_4010() {
    let server = Server::start("").await;
    let token = server.token("u1", 2, json!({}));
    let exp = now_secs() + 2;
    let started = Instant::now();
    let mut ws = server.connect_token(&token, "u1").await;
    let (code, _) = ws.expect_close(Duration::from_secs(8)).await;
    assert_eq!(code, 4010, "token expiry");
    // Closed at exp (1 s resolution), not long before.
    assert!(
        now_secs() >= exp - 1 && started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before exp",
        started.elapsed()
    );
}

#[tokio::test]
async fn refresh_keeps_the_connection_and_other_user_refresh_is_409() {
    let server = Server::start("").await;
    let short = claims("u1", 2, json!({}));
    let old_exp = short["exp"].as_i64().unwrap();
    let mut ws = server
        .connect_token(&jwt_hs256(&server.secret, &short), "u1")
        .await;

    // Refresh with another user's token → 409, connection unchanged.
    let other = server.token("u2", 3600, json!({}));
    let r = ws
        .request(json!({"type": "auth", "id": "a1", "token": other}))
        .await;
    assert_eq!(r["code"], 409, "{r}");
    ws.assert_alive().await;

    // Good refresh for the same user.
    let longer = server.token("u1", 3600, json!({}));
    let r = ws
        .request(json!({"type": "auth", "id": "a3", "token": longer}))
        .await;
    assert_eq!(r["code"], 0, "{r}");

    // Stay connected past the old exp (+1 s for resolution): nothing (no close) arrives.
    while now_secs() <= old_exp + 1 {
        ws.expect_no_message(QUIET).await;
    }
    ws.assert_alive().await;
    let (s, b) = server
        .api_post(
            "/api/v1/users/u1/messages",
            &server.publish_key,
            &json!({"event": "still-here", "data": 1, "durable": false}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let m = ws.recv_message("user/u1").await;
    assert_eq!(m["event"], "still-here");

    // A refresh with an expired token is refused (401) and the session goes on.
    let r = ws
        .request(json!({"type": "auth", "id": "a4", "token": server.token("u1", -3600, json!({}))}))
        .await;
    assert_eq!(r["code"], 401, "expired refresh token: {r}");
    ws.assert_alive().await;
}

#[tokio::test]
async fn revocation_by_jti_closes_4011_and_refuses_the_token() {
    let server = Server::start("").await;
    let c = claims("u1", 3600, json!({}));
    let jti = c["jti"].as_str().unwrap().to_owned();
    let token = jwt_hs256(&server.secret, &c);
    let mut ws = server.connect_token(&token, "u1").await;
    // Another connection of the same user with another token is not affected.
    let mut other = server.connect_user("u1").await;

    let (s, b) = server
        .api_post(
            "/api/v1/revocations",
            &server.admin_key,
            &json!({"jti": jti}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["revoked"], true, "{b}");
    assert_eq!(b["disconnected"], 1, "{b}");

    let started = Instant::now();
    let (code, _) = ws.expect_close(Duration::from_secs(3)).await;
    assert_eq!(code, 4011, "revoked jti");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let refused = connect(&server.ws_url(), Some(&token)).await;
    assert_eq!(
        refused.err().map(|e| e.status),
        Some(401),
        "revoked token at handshake"
    );
    other.assert_alive().await;

    // Publish key may not revoke.
    let (s, b) = server
        .api_post(
            "/api/v1/revocations",
            &server.publish_key,
            &json!({"jti": "x"}),
        )
        .await;
    assert_eq!(s, 403, "{b}");
}

#[tokio::test]
async fn revocation_by_user_closes_all_and_later_tokens_work() {
    let server = Server::start("").await;
    let token = server.token("carol", 3600, json!({}));
    let mut t1 = server.connect_token(&token, "carol").await;
    let mut t2 = server.connect_user("carol").await;
    let mut bystander = server.connect_user("dave").await;

    let (s, b) = server
        .api_post(
            "/api/v1/revocations",
            &server.admin_key,
            &json!({"user": "carol"}),
        )
        .await;
    let revoked_at = now_secs();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["revoked"], true, "{b}");
    assert_eq!(b["disconnected"], 2, "{b}");
    for ws in [&mut t1, &mut t2] {
        assert_eq!(ws.expect_close(Duration::from_secs(3)).await.0, 4011);
    }
    bystander.assert_alive().await;

    // Tokens issued at or before the revocation are refused.
    let refused = connect(&server.ws_url(), Some(&token)).await;
    assert_eq!(
        refused.err().map(|e| e.status),
        Some(401),
        "old token after user revocation"
    );

    // A token issued after it (next clock second) works.
    wait_clock_past(revoked_at).await;
    let fresh = server.token("carol", 3600, json!({}));
    let mut ws = server.connect_token(&fresh, "carol").await;
    ws.assert_alive().await;
}

#[tokio::test]
async fn disconnect_api_closes_every_connection_of_the_user_with_4011() {
    let server = Server::start("").await;
    let token = server.token("erin", 3600, json!({}));
    let mut a = server.connect_token(&token, "erin").await;
    let mut b = server.connect_token(&token, "erin").await;
    let mut other = server.connect_user("frank").await;

    let (s, body) = server
        .api_post(
            "/api/v1/users/erin/disconnect",
            &server.admin_key,
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["user"], "erin", "{body}");
    assert_eq!(body["disconnected"], 2, "{body}");
    for ws in [&mut a, &mut b] {
        assert_eq!(ws.expect_close(Duration::from_secs(3)).await.0, 4011);
    }
    other.assert_alive().await;
    server.wait_presence("erin", 0, T).await;

    // A disconnect is not a revocation: the same token may reconnect.
    server.connect_token(&token, "erin").await;

    // Needs the admin scope.
    let (s, body) = server
        .api_post(
            "/api/v1/users/frank/disconnect",
            &server.publish_key,
            &json!({}),
        )
        .await;
    assert_eq!(s, 403, "{body}");
    other.assert_alive().await;
}
