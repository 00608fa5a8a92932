//! The gateway's HTTP surface: the WebSocket endpoint with its checks before the upgrade, and
//! the health probes. Every refusal is a JSON body with a status that says what to do.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::AuthError;
use crate::registry::AdmitError;
use crate::Gateway;

pub(crate) fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/connect", get(connect))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(gateway)
}

/// Why a connect request was refused before the upgrade.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectRefusal {
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    #[error(transparent)]
    Limit(#[from] AdmitError),
    #[error("this gateway is shutting down; connect to another")]
    Draining,
}

impl ConnectRefusal {
    /// Status, the `error` field of the body, and the metric label.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ConnectRefusal::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized"),
            ConnectRefusal::Limit(AdmitError::UserLimit) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_connections", "user_limit")
            }
            ConnectRefusal::Limit(AdmitError::GatewayFull) => {
                (StatusCode::SERVICE_UNAVAILABLE, "gateway_full", "gateway_full")
            }
            ConnectRefusal::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining", "draining"),
        }
    }
}

impl IntoResponse for ConnectRefusal {
    fn into_response(self) -> Response {
        let (status, error, _) = self.classify();
        tracing::debug!(%status, reason = %self, "connect refused");
        (status, Json(json!({ "error": error, "reason": self.to_string() }))).into_response()
    }
}

async fn connect(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ConnectRefusal> {
    admit(&gateway, &headers, &query, upgrade).inspect_err(|refusal| {
        gateway.sessions.metrics.connect_refused.with_label_values(&[refusal.classify().2]).inc();
    })
}

fn admit(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ConnectRefusal> {
    if gateway.is_draining() {
        return Err(ConnectRefusal::Draining);
    }
    let identity = gateway.auth.authenticate(headers, query.get("token").map(String::as_str))?;
    // Browsers cannot see pings; `heartbeat=frame` asks for a text frame each interval too.
    let frame_heartbeats = query.get("heartbeat").is_some_and(|v| v == "frame");
    let admission = gateway.sessions.registry.admit(&identity.user)?;
    let config = &gateway.config;
    let ctx = Arc::clone(&gateway.sessions);
    let tracker = gateway.session_tasks.clone();
    let shutdown = gateway.close_sessions.clone();
    Ok(upgrade
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .max_write_buffer_size(config.write_buffer_bytes.max(64 * 1024) * 4)
        // Our own limit (config.max_frame_bytes) is checked per frame with a clear close code;
        // this one only protects memory from a client that streams a huge frame.
        .max_message_size(config.max_frame_bytes.saturating_mul(4).max(4096))
        .max_frame_size(config.max_frame_bytes.saturating_mul(4).max(4096))
        .on_upgrade(move |socket| {
            tracker.track_future(crate::session::run(socket, identity, admission, frame_heartbeats, ctx, shutdown))
        }))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> String {
    herald_shared::metrics::encode(&gateway.sessions.metrics.registry)
}

/// 200 when ready, 503 when not; the body says which checks failed either way.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let report = gateway.readiness().await;
    let ready = report.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "checks": report.checks, "failing": report.failing() }))).into_response()
}
