//! Pure mappings from what brokers carry to publish requests (the JSON body of
//! `POST /api/v1/publish`).
//!
//! - A broker message (AMQP, NATS) is a publish request `{topic, event, data, …}` as is, or a
//!   **user message** `{user, event, data, id?, durable?, trace_id?}` — the body of
//!   `POST /api/v1/users/{user}/messages` plus `user` — which becomes a publish to
//!   `user/{user}`, durable unless `durable:false` ([`normalize_body`]).
//! - Seed 002's and seed 001's Redis channels: see [`redis_channel`] (written with the Redis
//!   source).

use serde_json::{Map, Value};

/// The publish request a broker message stands for. Errors say what is wrong (the message is
/// then dead-lettered).
pub fn normalize_body(body: &[u8]) -> Result<Vec<u8>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Value::Object(mut m) = v else {
        return Err("the body must be a JSON object (a publish request or a user message)".into());
    };
    match (m.contains_key("topic"), m.remove("user")) {
        (true, None) => Ok(body.to_vec()),
        (true, Some(_)) => Err("give `topic` or `user`, not both".into()),
        (false, Some(Value::String(user))) => {
            let mut out = Map::new();
            out.insert("topic".into(), Value::String(format!("user/{user}")));
            if !m.contains_key("durable") {
                out.insert("durable".into(), Value::Bool(true));
            }
            out.extend(m);
            serde_json::to_vec(&Value::Object(out)).map_err(|e| e.to_string())
        }
        (false, Some(_)) => Err("`user` must be a string".into()),
        (false, None) => Err("the body needs `topic` (a publish request) or `user` (a user message)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm(v: Value) -> Result<Value, String> {
        normalize_body(&serde_json::to_vec(&v).unwrap())
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn publish_requests_pass_and_user_messages_become_durable_publishes() {
        let p = json!({"topic":"room/a","event":"e","data":1});
        assert_eq!(norm(p.clone()).unwrap(), p);
        assert_eq!(
            norm(json!({"user":"42","event":"n","data":{"a":1},"id":"m-1"})).unwrap(),
            json!({"topic":"user/42","durable":true,"event":"n","data":{"a":1},"id":"m-1"})
        );
        assert_eq!(
            norm(json!({"user":"42","durable":false}))
                .unwrap()["durable"],
            false
        );
        assert!(norm(json!({"user":"42","topic":"x"})).unwrap_err().contains("not both"));
        assert!(norm(json!({"user":42})).unwrap_err().contains("string"));
        assert!(norm(json!({"event":"e"})).unwrap_err().contains("needs `topic`"));
        assert!(norm(json!([1])).unwrap_err().contains("JSON object"));
        assert!(normalize_body(b"{").unwrap_err().contains("not JSON"));
    }
}
