//! The HTTP server API (SPEC §4), the health and metrics endpoints, and the demo page.
//!
//! Every error is JSON `{"code":…,"message":…}` with the matching HTTP status, produced by
//! [`ApiError`] from the one core error type. Bodies are read with an explicit size limit
//! (`limits.max_message_size`, 413 beyond) and parsed with precise messages (400).

// Handlers return `Result<Response, Response>`: both sides are ready HTTP answers.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_core::bus::{BusError, ControlEvent, NodeEvent};
use herald_core::error::{Error, Origin};
use herald_core::message::{now_ms, now_secs};
use herald_core::store::InboxStatus;
use herald_core::topic::Topic;
use herald_proto::json;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::auth::{ApiAuthError, RevocationRequest, Scope, bearer_token};
use crate::publish::{self as publishing, PublishRequest, check_token};
use crate::state::AppState;

/// Messages in one batch publish, at most.
const MAX_BATCH: usize = 1000;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(crate::ws::handler))
        .route("/sse", get(crate::sse::handler))
        .route("/api/v1/poll", get(crate::poll::handler))
        .route("/api/v1/ack", post(crate::poll::ack))
        .route(
            "/api/v1/telemetry/datas/current/ws",
            get(crate::telemetry::current_handler),
        )
        .route(
            "/api/v1/telemetry/datas/current/keys/ws",
            get(crate::telemetry::keys_handler),
        )
        .route("/stomp", get(crate::stomp::handler))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/publish/batch", post(publish_batch))
        .route("/api/v1/broadcast", post(broadcast))
        .route(
            "/api/v1/users/{user}/messages",
            post(user_message).get(user_inbox),
        )
        .route("/api/v1/rooms/{room}/messages", post(room_message))
        .route("/api/v1/users/{user}/presence", get(user_presence))
        .route("/api/v1/presence", get(presence))
        .route("/api/v1/topics/{topic}/subscribers", get(topic_subscribers))
        .route("/api/v1/users/{user}/disconnect", post(disconnect_user))
        .route("/api/v1/revocations", post(revoke))
        .route("/api/v1/replies", post(reply))
        .route("/ws/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/demo", get(demo))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The OpenAPI 3.1 description of this API (`src/openapi.json`, checked by the tests).
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Every error answer is JSON `{code, message}`: rejections produced by extractors (bad
/// query string, bad path encoding) come as plain text and are rewritten here.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let text = match axum::body::to_bytes(res.into_body(), 4096).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    json_error(status, &message)
}

/// A JSON error response.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({ "code": status.as_u16(), "message": message })),
    )
        .into_response()
}

/// The core error as an HTTP response: the status is [`Error::code`].
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.0.origin() {
            Origin::Client => tracing::debug!(error = %self.0, "api request refused"),
            Origin::Backend => tracing::warn!(error = %self.0, "api request failed"),
            Origin::Internal => tracing::error!(error = %self.0, "api request failed"),
        }
        let status =
            StatusCode::from_u16(self.0.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_error(status, &self.0.to_string())
    }
}

type ApiResult = Result<Response, Response>;

fn authorize(state: &AppState, headers: &HeaderMap, scope: Scope) -> Result<(), Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    state
        .auth
        .authorize_api(bearer, scope)
        .map(|_| ())
        .map_err(|e| {
            state.metrics.error(if e == ApiAuthError::Forbidden {
                "forbidden"
            } else {
                "unauthenticated"
            });
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let message = match e {
                ApiAuthError::Missing => "missing API key (Authorization: Bearer <key>)".to_owned(),
                ApiAuthError::Unknown => "unknown API key".to_owned(),
                ApiAuthError::Forbidden => format!("API key lacks the `{}` scope", scope.as_str()),
            };
            json_error(status, &message)
        })
}

/// Read and parse a JSON body of at most `limit` bytes.
async fn read_json<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    limit: usize,
) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        state.metrics.error("too_large");
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        state.metrics.error("bad_request");
        json_error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}"))
    })
}

fn err(state: &AppState, e: Error) -> Response {
    state.metrics.error(e.kind());
    ApiError(e).into_response()
}

/// `{event, data, id?, durable?, trace_id?}` for broadcast, room and user messages.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct EventReq {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    durable: Option<bool>,
    #[serde(default)]
    trace_id: Option<String>,
}

impl EventReq {
    fn into_publish(self, topic: String) -> PublishRequest {
        PublishRequest {
            topic,
            event: self.event,
            data: self.data,
            id: self.id,
            durable: self.durable,
            ttl: None,
            partition: None,
            trace_id: self.trace_id,
        }
    }
}

fn ingest_allowed(state: &AppState, n: usize) -> Result<(), Response> {
    if state.limiters.ingest(u32::try_from(n).unwrap_or(u32::MAX)) {
        Ok(())
    } else {
        Err(err(state, Error::RateLimited("node ingest rate exceeded")))
    }
}

fn body_limit(state: &AppState) -> usize {
    // The data may be max_message_size; leave room for the other fields.
    state.config.limits.max_message_size + 4096
}

async fn publish(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let req: PublishRequest = read_json(&state, body, body_limit(&state)).await?;
    ingest_allowed(&state, 1)?;
    let p = publishing::publish(&state, req, None)
        .await
        .map_err(|e| err(&state, e))?;
    Ok(Json(p.to_json(false)).into_response())
}

async fn publish_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        // Each entry parsed on its own (a bad one fails alone), straight into its request:
        // no intermediate `Value` tree.
        messages: Vec<Box<RawValue>>,
    }
    let limit = body_limit(&state).saturating_mul(8).max(1 << 20);
    let batch: Batch = read_json(&state, body, limit).await?;
    if batch.messages.len() > MAX_BATCH {
        return Err(err(
            &state,
            Error::BadRequest(format!("at most {MAX_BATCH} messages per batch")),
        ));
    }
    ingest_allowed(&state, batch.messages.len())?;
    // Validate all, store the durable ones together (one group commit rather than one per
    // entry), then deliver in batch order.
    let mut prepared: Vec<Result<publishing::Prepared, Error>> = batch
        .messages
        .iter()
        .map(|m| {
            serde_json::from_str::<PublishRequest>(m.get())
                .map_err(|e| Error::BadRequest(format!("invalid message: {e}")))
                .and_then(|req| publishing::prepare(&state, req, None))
        })
        .collect();
    let stored = futures_util::future::join_all(prepared.iter_mut().map(|p| async {
        match p {
            Ok(p) => publishing::store(&state, p).await,
            Err(_) => Ok(None),
        }
    }))
    .await;
    let mut results = Vec::with_capacity(prepared.len());
    for (p, stored) in prepared.into_iter().zip(stored) {
        let r = match (p, stored) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(_), Ok(Some(duplicate))) => Ok(duplicate),
            (Ok(p), Ok(None)) => publishing::deliver(&state, p, None).await,
        };
        results.push(match r {
            Ok(p) => p.to_json(false),
            Err(e) => {
                state.metrics.error(e.kind());
                json!({ "code": e.code(), "message": e.to_string() })
            }
        });
    }
    Ok(Json(json!({ "results": results })).into_response())
}

async fn broadcast(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let req: EventReq = read_json(&state, body, body_limit(&state)).await?;
    ingest_allowed(&state, 1)?;
    let p = publishing::publish(&state, req.into_publish("broadcast".to_owned()), None)
        .await
        .map_err(|e| err(&state, e))?;
    Ok(Json(p.to_json(false)).into_response())
}

async fn room_message(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let req: EventReq = read_json(&state, body, body_limit(&state)).await?;
    let topic = Topic::room(&room).map_err(|e| err(&state, e.into()))?;
    ingest_allowed(&state, 1)?;
    let p = publishing::publish(&state, req.into_publish(topic.as_str().to_owned()), None)
        .await
        .map_err(|e| err(&state, e))?;
    Ok(Json(p.to_json(false)).into_response())
}

async fn user_message(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let mut req: EventReq = read_json(&state, body, body_limit(&state)).await?;
    let topic = Topic::user(&user).map_err(|e| err(&state, e.into()))?;
    // User messages are durable unless the publisher says otherwise.
    req.durable = Some(req.durable.unwrap_or(true));
    ingest_allowed(&state, 1)?;
    let p = publishing::publish(&state, req.into_publish(topic.as_str().to_owned()), None)
        .await
        .map_err(|e| err(&state, e))?;
    Ok(Json(p.to_json(true)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn user_inbox(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    Query(q): Query<InboxQuery>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Scope::Admin)?;
    // Same rule as everywhere a user id is taken: it must be a topic segment.
    Topic::user(&user).map_err(|e| err(&state, e.into()))?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(InboxStatus::parse(s).ok_or_else(|| {
            err(
                &state,
                Error::BadRequest(format!(
                    "unknown status {s:?} (pending, sent, acked, failed)"
                )),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let records = state
        .store
        .list(&user, status, limit)
        .await
        .map_err(|e| err(&state, e.into()))?;
    Ok(Json(json!({ "user": user, "messages": records })).into_response())
}

async fn user_presence(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let n = state
        .presence
        .user_connections(&user)
        .await
        .map_err(|e| err(&state, e.into()))?;
    Ok(Json(json!({ "user": user, "online": n > 0, "connections": n })).into_response())
}

async fn presence(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers, Scope::Admin)?;
    let mut users = state
        .presence
        .online()
        .await
        .map_err(|e| err(&state, e.into()))?;
    users.sort();
    let connections: u64 = users.iter().map(|(_, n)| n).sum();
    let list: Vec<Value> = users
        .iter()
        .map(|(u, n)| json!({ "user": u, "connections": n }))
        .collect();
    Ok(
        Json(json!({ "online_users": users.len(), "connections": connections, "users": list }))
            .into_response(),
    )
}

async fn topic_subscribers(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let topic = Topic::parse(&topic).map_err(|e| err(&state, e.into()))?;
    let n = state
        .presence
        .topic_subscribers(&topic)
        .await
        .map_err(|e| err(&state, e.into()))?;
    Ok(Json(json!({ "topic": topic.as_str(), "subscribers": n })).into_response())
}

async fn disconnect_user(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Scope::Admin)?;
    let n = state
        .presence
        .user_connections(&user)
        .await
        .map_err(|e| err(&state, e.into()))?;
    state
        .bus
        .control(ControlEvent::DisconnectUser { user: user.clone() })
        .await
        .map_err(|e| err(&state, e.into()))?;
    Ok(Json(json!({ "user": user, "disconnected": n })).into_response())
}

/// `POST /api/v1/replies`: a service's reply to an upstream command (SPEC §7).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ReplyReq {
    command: String,
    trace_id: String,
    user: ReplyUser,
    #[serde(default)]
    conn_id: Option<String>,
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// The command's `user` as forwarded; its claims may come back and are ignored.
#[derive(Deserialize, Debug)]
struct ReplyUser {
    id: String,
}

/// The reply goes to the connection named by `conn_id` (`c-{node}-{n}`, from the welcome),
/// on whichever node holds it — through that node's own bus channel — or, without `conn_id`,
/// to every connection of the user. `{"delivered": true}` means it was handed to the node
/// (or nodes); a connection that closed meanwhile does not get it.
async fn reply(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> ApiResult {
    authorize(&state, &headers, Scope::Publish)?;
    let req: ReplyReq = read_json(&state, body, body_limit(&state)).await?;
    check_token("command", &req.command).map_err(|e| err(&state, e))?;
    check_token("trace_id", &req.trace_id).map_err(|e| err(&state, e))?;
    if !(0..=999).contains(&req.code) {
        return Err(err(
            &state,
            Error::BadRequest("`code` must be 0 to 999".into()),
        ));
    }
    let message = req
        .message
        .as_deref()
        .unwrap_or(if req.code == 0 { "success" } else { "" });
    let frame = json::encode_command_reply(
        &req.command,
        &req.trace_id,
        req.code,
        message,
        req.data.as_deref(),
    );
    match &req.conn_id {
        Some(conn_id) => {
            let (node, conn) = parse_conn_id(conn_id).ok_or_else(|| {
                err(
                    &state,
                    Error::BadRequest(format!(
                        "`conn_id` {conn_id:?} is not a connection id (c-<node>-<n>, from the welcome)"
                    )),
                )
            })?;
            let sent = state
                .bus
                .send_to_node(node, NodeEvent::ToConnection { conn, frame })
                .await;
            match sent {
                Ok(()) => {}
                Err(BusError::UnknownNode(_)) => {
                    return Err(err(
                        &state,
                        Error::NotFound(format!("no node holds connection {conn_id}")),
                    ));
                }
                Err(e) => return Err(err(&state, e.into())),
            }
        }
        None => state
            .bus
            .control(ControlEvent::ToUser {
                user: req.user.id.clone(),
                frame,
            })
            .await
            .map_err(|e| err(&state, e.into()))?,
    }
    Ok(Json(json!({ "delivered": true })).into_response())
}

/// `c-{node}-{n}` → (node, n). Node ids may contain `-`: the number follows the last one.
fn parse_conn_id(s: &str) -> Option<(&str, u64)> {
    let rest = s.strip_prefix("c-")?;
    let (node, n) = rest.rsplit_once('-')?;
    if node.is_empty() {
        return None;
    }
    Some((node, n.parse().ok()?))
}

async fn revoke(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> ApiResult {
    authorize(&state, &headers, Scope::Admin)?;
    let req: RevocationRequest = read_json(&state, body, 64 * 1024).await?;
    let r = req
        .into_revocation(now_secs())
        .map_err(|m| err(&state, Error::BadRequest(m)))?;
    // Count the local connections it closes (the bus applies it on every node).
    let mut disconnected = 0usize;
    state.hub.for_each_connection(|c| {
        let s = c.session.lock();
        let by_jti = r.jti.is_some() && s.jti == r.jti;
        let by_user =
            r.user.as_deref() == Some(&*c.user) && s.issued_at.is_none_or(|iat| iat <= r.at);
        disconnected += usize::from(by_jti || by_user);
    });
    // `until` is set here, so every node (and one started later) ends it at the same time.
    let ttl = state.config.auth.revocation_ttl.as_secs();
    let event = ControlEvent::Revoke {
        jti: r.jti,
        user: r.user,
        at: r.at,
        until: Some(r.until.unwrap_or(r.at.saturating_add(ttl))),
    };
    state
        .bus
        .control(event)
        .await
        .map_err(|e| err(&state, e.into()))?;
    Ok(Json(json!({ "revoked": true, "disconnected": disconnected })).into_response())
}

async fn stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers, Scope::Admin)?;
    let s = state.hub.stats();
    Ok(Json(json!({
        "node_id": &*state.node_id,
        "total_clients": s.connections,
        "online_users": s.online_users,
        "total_rooms": s.rooms,
        "total_topics": s.topics,
        "subscriptions": s.subscriptions,
        "max_connections_per_user": s.max_connections_per_user,
        "mean_connections_per_user": s.mean_connections_per_user,
        "queued_frames": s.queued,
        "uptime_secs": state.started.elapsed().as_secs(),
        "draining": state.is_draining(),
        "time": now_ms(),
    }))
    .into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let store_up = state.store.ping().await.is_ok();
    let body = state.metrics.render(
        &state.hub.stats(),
        state.inbox.len(),
        state.bus.healthy(),
        store_up,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let bus = state.bus.healthy();
    let store = state.store.ping().await.is_ok();
    let draining = state.is_draining();
    let ready = bus && store && !draining;
    let body = json!({
        "status": if ready { "ready" } else if draining { "draining" } else { "not_ready" },
        "bus": if bus { "ok" } else { "down" },
        "store": if store { "ok" } else { "down" },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn demo() -> Html<&'static str> {
    Html(include_str!("demo.html"))
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such endpoint")
}
