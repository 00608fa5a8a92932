//! The query API: "did Alice get message X?", a user's pending messages, a user's presence.
//! Plus health probes. Everything under `/v1` needs the admin bearer token.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use herald_proto::{GatewayId, MessageId, UserId};
use herald_shared::readiness;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::presence::PresenceReader;
use crate::receipt::ReceiptState;
use crate::store::{DeliveredBy, ReceiptDoc, Store, StoreError};

/// Receipts or messages returned at most per request.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1_000;

pub struct ApiState {
    pub metrics: Arc<crate::metrics::DispatcherMetrics>,
    pub admin_token: String,
    pub store: Store,
    pub presence: PresenceReader,
    pub redis: fred::clients::Client,
    pub js: async_nats::jetstream::Context,
    /// The last round of dependency checks, shared by `/readyz` requests.
    pub checks: readiness::Checks,
    /// This host's wall clock, for judging expiry in answers.
    pub clock: herald_shared::Clock,
}

pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/v1/messages/{id}", get(message))
        .route("/v1/users/{user}/pending", get(pending))
        .route("/v1/users/{user}/presence", get(presence))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_admin));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Presence(#[from] crate::presence::PresenceError),
    #[error("{0}")]
    BadId(#[from] herald_proto::InvalidId),
    #[error("stored {0} is not valid JSON")]
    Corrupt(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match &self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_id"),
            ApiError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            ApiError::Store(e) if e.is_transient() => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            ApiError::Presence(_) => (StatusCode::SERVICE_UNAVAILABLE, "presence_unavailable"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "query failed");
        }
        let reason = match &self {
            // Details of internal failures stay in the log.
            ApiError::Store(_) | ApiError::Presence(_) | ApiError::Corrupt(_) => {
                "a dependency failed; see the dispatcher's log".to_owned()
            }
            other => other.to_string(),
        };
        (status, Json(json!({ "error": error, "reason": reason }))).into_response()
    }
}

async fn require_admin(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) => Ok(next.run(request).await),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Compares without revealing, through timing, how much of the token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

impl Limit {
    fn get(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
    }
}

#[derive(Serialize)]
struct ReceiptView {
    user: UserId,
    message_id: MessageId,
    state: ReceiptState,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_by: Option<DeliveredBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired_at_ms: Option<i64>,
}

impl ReceiptView {
    fn new(r: ReceiptDoc, now: u64) -> Self {
        let expires_at = u64::try_from(r.expires_at.timestamp_millis()).unwrap_or(0);
        Self {
            user: r.user,
            message_id: r.message_id,
            state: r.state.effective(expires_at, now),
            delivered_at_ms: r.delivered_at_ms,
            delivered_by: r.delivered_by,
            read_at_ms: r.read_at_ms,
            expired_at_ms: r.expired_at_ms,
        }
    }
}

// Answers are typed structs, never `serde_json::Value`: a payload goes out as the raw JSON it
// was published as, however deeply it nests or whatever escapes it holds, without being parsed.

#[derive(Serialize)]
struct MessageAnswer {
    message: MessageView,
    counts: BTreeMap<String, u64>,
    receipts: Vec<ReceiptView>,
    truncated: bool,
}

#[derive(Serialize)]
struct MessageView {
    id: MessageId,
    seq: i64,
    payload: Box<RawValue>,
    published_at_ms: i64,
    expires_at_ms: i64,
    recipients: i64,
}

#[derive(Serialize)]
struct PendingAnswer {
    user: UserId,
    count: usize,
    pending: Vec<herald_proto::Notification>,
}

async fn message(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<MessageAnswer>, ApiError> {
    // No message has an id outside the grammar: such a path is simply not found.
    let id = MessageId::new(id).map_err(|_| ApiError::NotFound("message"))?;
    let message = state.store.message(&id).await?.ok_or(ApiError::NotFound("message"))?;
    let limit = limit.get();
    let receipts = state.store.receipts_of(&id, limit).await?;
    let mut counts = state.store.receipt_counts(&id).await?;
    let now = state.clock.now_ms();
    // Pending receipts past expiry count as expired even before the sweeper marks them.
    if message.expires_at.timestamp_millis() as u64 <= now {
        if let Some(pending) = counts.remove(ReceiptState::Pending.as_str()) {
            *counts.entry(ReceiptState::Expired.as_str().into()).or_default() += pending;
        }
    }
    let truncated = receipts.len() as i64 >= limit as i64 && (receipts.len() as i64) < message.recipients;
    // Stored by this service from a validated job, so it is JSON; a document that is not
    // (edited by hand) is a store error, not a panic.
    let payload = RawValue::from_string(message.payload).map_err(|_| ApiError::Corrupt("message payload"))?;
    Ok(Json(MessageAnswer {
        message: MessageView {
            id: message.id,
            seq: message.seq,
            payload,
            published_at_ms: message.published_at.timestamp_millis(),
            expires_at_ms: message.expires_at.timestamp_millis(),
            recipients: message.recipients,
        },
        counts: counts.into_iter().collect(),
        receipts: receipts.into_iter().map(|r| ReceiptView::new(r, now)).collect(),
        truncated,
    }))
}

async fn pending(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<PendingAnswer>, ApiError> {
    let user = UserId::new(user).map_err(ApiError::BadId)?;
    let pending = state.store.pending_for(&[&user], limit.get(), state.clock.now_ms()).await?;
    let pending: Vec<_> = pending.into_iter().map(|s| s.notification).collect();
    Ok(Json(PendingAnswer { user, count: pending.len(), pending }))
}

async fn presence(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = UserId::new(user).map_err(ApiError::BadId)?;
    let found = state.presence.lookup(&[&user]).await?;
    let mut gateways: BTreeMap<GatewayId, usize> = BTreeMap::new();
    let mut connections = 0;
    if let Some(conns) = found.get(&user) {
        for gateway in conns.values() {
            *gateways.entry(gateway.clone()).or_default() += 1;
            connections += 1;
        }
    }
    Ok(Json(json!({
        "user": user,
        "online": connections > 0,
        "connections": connections,
        "gateways": gateways,
    })))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> String {
    herald_shared::metrics::encode(&state.metrics.registry)
}

/// 200 when MongoDB, Redis and NATS each answer within the readiness deadline, else 503; the
/// body says which checks failed either way.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let report = state
        .checks
        .report(|| async {
            let (mongodb, redis, nats) = tokio::join!(
                readiness::answers(state.store.ping()),
                readiness::redis(&state.redis),
                readiness::nats(&state.js),
            );
            readiness::Report::new([("mongodb", mongodb), ("redis", redis), ("nats", nats)])
        })
        .await;
    let ready = report.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "checks": report.checks, "failing": report.failing() }))).into_response()
}
