//! The gateway's HTTP surface: the WebSocket endpoint with its checks before the upgrade (the
//! public listener), and the health probes and metrics (the internal listener). Every refusal is
//! a JSON body with a status that says what to do.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::AuthError;
use crate::registry::AdmitError;
use crate::websocket::{Limits, Upgrade, MAX_READ_CHUNK};
use crate::Gateway;

/// What clients reach: the WebSocket endpoint and nothing else (404 for any other path).
pub(crate) fn public_router(gateway: Arc<Gateway>) -> Router {
    Router::new().route("/v1/connect", get(connect)).with_state(gateway)
}

/// What only the cluster reaches: probes and metrics.
pub(crate) fn internal_router(gateway: Arc<Gateway>) -> Router {
    Router::new()
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
    #[error("pages from this origin may not connect (HERALD_ALLOWED_ORIGINS)")]
    Origin,
}

impl ConnectRefusal {
    /// Status, the `error` field of the body, and the metric label.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            // The token may be good: this gateway lacks the identity provider's keys for now.
            ConnectRefusal::Unauthorized(e) if e.is_retryable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "keys_unavailable", "keys_unavailable")
            }
            ConnectRefusal::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized"),
            ConnectRefusal::Limit(AdmitError::UserLimit) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_connections", "user_limit")
            }
            ConnectRefusal::Limit(AdmitError::GatewayFull) => {
                (StatusCode::SERVICE_UNAVAILABLE, "gateway_full", "gateway_full")
            }
            ConnectRefusal::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining", "draining"),
            ConnectRefusal::Origin => (StatusCode::FORBIDDEN, "origin_not_allowed", "origin"),
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
    upgrade: Upgrade,
) -> Result<Response, ConnectRefusal> {
    admit(&gateway, &headers, &query, upgrade).await.inspect_err(|refusal| {
        gateway.sessions.shared.metrics.connect_refused.with_label_values(&[refusal.classify().2]).inc();
    })
}

async fn admit(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    upgrade: Upgrade,
) -> Result<Response, ConnectRefusal> {
    if gateway.is_draining() {
        return Err(ConnectRefusal::Draining);
    }
    if !origin_allowed(&gateway.config.allowed_origins, headers.get(header::ORIGIN)) {
        return Err(ConnectRefusal::Origin);
    }
    let identity = gateway.auth.authenticate(headers, query.get("token").map(String::as_str)).await?;
    // Browsers cannot see pings; `heartbeat=frame` asks for a text frame each interval too.
    let frame_heartbeats = query.get("heartbeat").is_some_and(|v| v == "frame");
    let admission = gateway.sessions.registry.admit(&identity.user)?;
    let config = &gateway.config;
    let ctx = Arc::clone(&gateway.sessions);
    let tracker = gateway.session_tasks.clone();
    let opening = Box::new(crate::session::Opening { identity, admission, frame_heartbeats, ctx });
    // The session is a task of its own rather than the rest of the upgrade's task, which would
    // keep the opening's box for as long as it runs.
    Ok(upgrade.on_upgrade(socket_limits(config), move |socket| {
        tracker.spawn(crate::session::run(socket, opening));
    }))
}

/// A socket's limits. Our own limit (`max_frame_bytes`) is checked per frame with a clear close
/// code; the socket's only protects memory from a client that streams a huge frame.
fn socket_limits(config: &herald_shared::config::GatewayConfig) -> Limits {
    let max = u32::try_from(config.max_frame_bytes.saturating_mul(4).max(4096)).unwrap_or(u32::MAX);
    Limits {
        max_message: max,
        read_chunk: config.read_buffer_bytes.clamp(1, MAX_READ_CHUNK) as u16,
        write_buffer: u32::try_from(config.write_buffer_bytes).unwrap_or(u32::MAX),
    }
}

/// Whether a connect with this `Origin` header may go on. Browsers send the origin of the page
/// that opens the WebSocket, and a WebSocket is not subject to CORS: without this check any site
/// a user visits could connect with a token it got hold of. An empty list allows any origin; a
/// request without the header is not from a browser page and is let through. Case-insensitive,
/// like the host names in it.
fn origin_allowed(allowed: &[String], origin: Option<&HeaderValue>) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.as_bytes();
    allowed.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> String {
    herald_shared::metrics::encode(&gateway.sessions.shared.metrics.registry)
}

/// 200 when ready, 503 when not; the body says which checks failed either way.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let report = gateway.readiness().await;
    let ready = report.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "checks": report.checks, "failing": report.failing() }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_may_connect_when_there_is_a_list() {
        let value = |s: &'static str| HeaderValue::from_static(s);
        let any: Vec<String> = Vec::new();
        assert!(origin_allowed(&any, Some(&value("https://evil.example"))), "no list: any origin");
        let list = vec!["https://app.example.com".to_owned(), "http://127.0.0.1:8080".to_owned()];
        assert!(origin_allowed(&list, None), "no Origin: not a browser page");
        assert!(origin_allowed(&list, Some(&value("https://app.example.com"))));
        assert!(origin_allowed(&list, Some(&value("HTTPS://APP.example.com"))));
        assert!(origin_allowed(&list, Some(&value("http://127.0.0.1:8080"))));
        for bad in
            ["https://evil.example", "null", "https://app.example.com.evil.example", "http://app.example.com", ""]
        {
            assert!(!origin_allowed(&list, Some(&value(bad))), "{bad}");
        }
    }
}
