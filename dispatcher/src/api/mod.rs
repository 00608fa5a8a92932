//! The dispatcher's HTTP API: publishing (`/v1/publish…`), the query API ("did Alice get
//! message X?", a user's pending messages and presence), the operator's actions (kick, cancel,
//! forget, rejections, status), health probes and metrics. Routes, their scopes, their listener
//! and their OpenAPI description are listed once, in [`routes`]; the document is served at
//! `/v1/openapi.json` on both listeners. The public listener serves publishing and the query
//! API (what backends call with scoped tokens); the internal one, which only the cluster
//! reaches, serves the operator's actions, probes and metrics. What each route does is in [`publish`], [`query`] and [`operate`]; who
//! may call it, in [`auth`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use herald_shared::naming::Names;
use herald_shared::readiness;
use serde::Serialize;
use serde_json::json;
use utoipa::OpenApi;

use crate::presence::PresenceReader;
use crate::store::{Store, StoreError};

pub mod auth;
pub mod operate;
pub mod publish;
pub mod query;

use auth::Scope;

pub struct ApiState {
    pub metrics: Arc<crate::metrics::DispatcherMetrics>,
    pub tokens: auth::Tokens,
    pub store: Store,
    pub presence: PresenceReader,
    pub redis: fred::clients::Client,
    pub js: async_nats::jetstream::Context,
    /// Validates and publishes jobs to this deployment's jobs stream.
    pub publisher: herald_publish::Publisher,
    /// Sends `kick` commands to gateways.
    pub router: crate::routing::Router,
    pub names: Names,
    /// Most jobs in one batch publish.
    pub max_batch: usize,
    /// Largest request body (the router's limit), for the error that says so.
    pub max_body_bytes: usize,
    /// Refuses new jobs while the jobs stream's backlog is over its limit.
    pub backlog: crate::admission::Backlog,
    /// The last round of dependency checks, shared by `/readyz` and `/v1/status` requests.
    pub checks: readiness::Checks,
    /// The process's shutdown token (owned by `run`'s caller): once cancelled, `/readyz` says
    /// not ready while the public listener drains.
    pub stopping: tokio_util::sync::CancellationToken,
    /// This host's wall clock, for judging expiry in answers.
    pub clock: herald_shared::Clock,
}

/// Which listener serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// What the ingress exposes: publishing and the query API.
    Public,
    /// What only the cluster reaches: the operator's actions, probes and metrics.
    Internal,
    /// Both (the OpenAPI document).
    Both,
}

impl Listener {
    fn serves(self, on: Listener) -> bool {
        self == Listener::Both || self == on
    }
}

/// One route: method, path, the scope a token needs (None: no token), the listener that serves
/// it, and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub scope: Option<Scope>,
    pub listener: Listener,
    handler: MethodRouter<Arc<ApiState>>,
}

fn route(
    method: Method,
    path: &'static str,
    scope: Option<Scope>,
    listener: Listener,
    handler: MethodRouter<Arc<ApiState>>,
) -> Route {
    Route { method, path, scope, listener, handler }
}

/// Every route of the API. The router is built from this list and nothing else, and a test
/// checks it against the OpenAPI document ([`ApiDoc`]) both ways.
pub fn routes() -> Vec<Route> {
    use Listener::{Both, Internal as In, Public as Pub};
    use Method as M;
    let (p, r, a) = (Some(Scope::Publish), Some(Scope::Read), Some(Scope::Admin));
    vec![
        route(M::POST, "/v1/publish", p, Pub, post(publish::publish)),
        route(M::POST, "/v1/publish/batch", p, Pub, post(publish::publish_batch)),
        route(M::GET, "/v1/messages/{id}", r, Pub, get(query::message)),
        route(M::POST, "/v1/messages/{id}/cancel", a, In, post(operate::cancel)),
        route(M::GET, "/v1/users/{user}/pending", r, Pub, get(query::pending)),
        route(M::GET, "/v1/users/{user}/presence", r, Pub, get(query::presence)),
        route(M::POST, "/v1/users/{user}/kick", a, In, post(operate::kick)),
        route(M::DELETE, "/v1/users/{user}", a, In, delete(operate::forget)),
        route(M::GET, "/v1/rejections", r, In, get(operate::rejections)),
        route(M::GET, "/v1/dead-letters", r, In, get(operate::dead_letters)),
        route(M::GET, "/v1/status", r, In, get(operate::status)),
        route(M::GET, "/v1/openapi.json", None, Both, get(openapi)),
        route(M::GET, "/healthz", None, In, get(healthz)),
        route(M::GET, "/readyz", None, In, get(ready)),
        route(M::GET, "/metrics", None, In, get(metrics)),
    ]
}

/// The router of one listener: the [`routes`] it serves, each behind its scope's check, a JSON
/// 404 for any other path (the other listener's routes too), a body limit of `max_body_bytes`,
/// and CORS for `cors_origins` when there are any.
pub fn router(state: Arc<ApiState>, on: Listener, max_body_bytes: usize, cors_origins: &[String]) -> Router {
    let mut router = Router::new();
    for Route { path, scope, handler, .. } in routes().into_iter().filter(|r| r.listener.serves(on)) {
        let handler = match scope {
            Some(scope) => {
                handler.route_layer(middleware::from_fn_with_state((Arc::clone(&state), scope), auth::authorize))
            }
            None => handler,
        };
        // Two methods on one path merge into one entry (axum panics on a path given twice).
        router = router.route(path, handler);
    }
    let router = router
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::map_response(json_errors))
        .with_state(state);
    match cors(cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Every error the API answers is JSON (`{"error": code, "reason": text}`), whoever produced it.
/// The handlers' own errors are already ([`ApiError`]); this catches the rest, which axum writes as
/// plain text: a query string or a path segment an extractor refuses (`?limit=abc`), a body of
/// the wrong type. Their headers are kept.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are one line; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let reason = text.ok().filter(|t| !t.is_empty()).unwrap_or_else(|| status.to_string());
    let mut json = (status, Json(json!({ "error": error_code(status), "reason": reason }))).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            json.headers_mut().append(name.clone(), value.clone());
        }
    }
    json
}

/// The `error` code of a response axum wrote itself, by its status.
fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "no_route",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal_error",
        _ => "bad_request",
    }
}

/// The `limit` of a listing: `default` when not given, at most `max`; 0 is refused, since an
/// empty page answers nothing (and a caller who sends it has a bug worth hearing about).
pub(crate) fn limit(requested: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(default),
        Some(0) => Err(ApiError::BadRequest(format!("limit must be between 1 and {max}"))),
        Some(n) => Ok(n.min(max)),
    }
}

/// CORS for browsers on the given origins only: preflights are answered before any token is
/// checked (a browser sends none with them); the actual request still needs its token.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("traceparent"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald dispatcher API",
        description = "Publish jobs over HTTP, ask what happened to them, and operate Herald. \
            Bearer tokens: admin (every scope), publish, read. The job and its rejection codes are \
            described in proto/README.md. The publish and query routes are served on the public \
            port (HERALD_DISPATCHER_LISTEN); the operate and health routes only on the internal \
            port (HERALD_DISPATCHER_INTERNAL_LISTEN), which only the cluster reaches."
    ),
    paths(
        publish::publish,
        publish::publish_batch,
        query::message,
        operate::cancel,
        query::pending,
        query::presence,
        operate::kick,
        operate::forget,
        operate::rejections,
        operate::dead_letters,
        operate::status,
        openapi,
        healthz,
        ready,
        metrics,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "publish", description = "Publishing jobs"),
        (name = "query", description = "What happened to messages and users"),
        (name = "operate", description = "An operator's actions"),
        (name = "health", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The error body every failure answers with.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A short code: `unauthorized`, `forbidden`, `not_found`, `bad_id`, `body_too_large`,
    /// `bad_request`, `nats_unavailable`, `store_unavailable`, `presence_unavailable`, ...
    error: String,
    /// A sentence for a human.
    reason: String,
}

/// A job refused by validation: the code and reason the pipeline would have rejected it with.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RejectedBody {
    /// Always `rejected`.
    error: String,
    /// The rejection code of proto/README.md: `malformed`, `invalid_id`, `invalid_ttl`,
    /// `id_conflict`, ...
    code: String,
    reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong token")]
    Unauthorized,
    #[error("this token's scope does not include {}", .0.as_str())]
    Forbidden(Scope),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("no such endpoint")]
    NoRoute,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Presence(#[from] crate::presence::PresenceError),
    #[error("{0}")]
    BadId(#[from] herald_proto::InvalidId),
    #[error("stored {0} is not valid JSON")]
    Corrupt(&'static str),
    /// A job refused by validation: 400 with the rejection's code.
    #[error("{}", .0.reason)]
    Rejected(herald_publish::validate::Invalid),
    #[error("the body is larger than the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    /// NATS did not take a job, a stream is missing, or JetStream did not answer.
    #[error("{0}")]
    Nats(String),
    /// More jobs wait in the stream than `HERALD_API_MAX_BACKLOG`: 503 with `Retry-After`.
    #[error("{backlog} jobs wait for the dispatchers (limit {limit}); retry later")]
    Overloaded { backlog: u64, limit: u64 },
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_id"),
            ApiError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            ApiError::Store(e) if e.is_transient() => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            ApiError::Presence(_) => (StatusCode::SERVICE_UNAVAILABLE, "presence_unavailable"),
            ApiError::Rejected(_) => (StatusCode::BAD_REQUEST, "rejected"),
            ApiError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Nats(_) => (StatusCode::SERVICE_UNAVAILABLE, "nats_unavailable"),
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        }
    }

    /// What the caller is told: internal failures say only where to look.
    fn reason(&self) -> String {
        match self {
            ApiError::Store(_) | ApiError::Presence(_) | ApiError::Corrupt(_) => {
                "a dependency failed; see the dispatcher's log".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = self.status_and_code();
        // Refusals under overload are counted (herald_api_publish_overloaded_total), not logged
        // one by one.
        if status.is_server_error() && !matches!(self, ApiError::Overloaded { .. }) {
            tracing::warn!(error = %self, "request failed");
        }
        let body = match &self {
            ApiError::Rejected(invalid) => json!({
                "error": error,
                "code": herald_publish::code_str(invalid.code),
                "reason": invalid.reason,
            }),
            other => json!({ "error": error, "reason": other.reason() }),
        };
        if matches!(self, ApiError::Overloaded { .. }) {
            let retry_after = [(axum::http::header::RETRY_AFTER, crate::admission::RETRY_AFTER_SECS.to_string())];
            return (status, retry_after, Json(body)).into_response();
        }
        (status, Json(body)).into_response()
    }
}

/// Prometheus metrics, as text.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<Arc<ApiState>>) -> String {
    state.metrics.store_slow.set(i64::from(state.store.pace().is_slow()));
    herald_shared::metrics::encode(&state.metrics.registry)
}

/// Alive: answers without calling anything.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health", responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
async fn openapi() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => ApiError::BadRequest(format!("the OpenAPI document does not serialize: {e}")).into_response(),
    }
}

/// 200 when MongoDB, Redis and NATS each answer within the readiness deadline, else 503; the
/// body says which checks failed either way.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, description = "Ready", body = Object), (status = 503, description = "A dependency is failing", body = Object))
)]
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let report = check_dependencies(&state).await.with("accepting", !state.stopping.is_cancelled());
    let ready = report.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // A slow store is reported, not failed: every dispatcher shares the store, and taking them
    // all out of rotation at once helps no one (and a busy store may never look fast again).
    let store_slow = state.store.pace().is_slow();
    let body =
        json!({ "ready": ready, "checks": report.checks, "failing": report.failing(), "store_slow": store_slow });
    (status, Json(body)).into_response()
}

/// Whether MongoDB, Redis and NATS answer, from the shared round of checks.
async fn check_dependencies(state: &ApiState) -> readiness::Report {
    state
        .checks
        .report(|| async {
            let (mongodb, redis, nats) = tokio::join!(
                readiness::answers(state.store.ping()),
                readiness::redis(&state.redis),
                readiness::nats(&state.js),
            );
            readiness::Report::new([("mongodb", mongodb), ("redis", redis), ("nats", nats)])
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// (method, path) of every operation in the OpenAPI document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "put", "post", "delete", "patch"] {
                if item.get(method).is_some() {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_path_is_routed() {
        let routed: BTreeSet<(String, String)> =
            routes().iter().map(|r| (r.method.to_string(), r.path.to_owned())).collect();
        assert_eq!(routed.len(), routes().len(), "a route is listed twice");
        let documented = documented();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(undocumented.is_empty(), "routes missing from the OpenAPI document: {undocumented:?}");
        assert!(unrouted.is_empty(), "documented but not routed: {unrouted:?}");
    }

    #[test]
    fn operators_actions_and_probes_are_internal_and_publish_and_query_public() {
        for route in routes() {
            let tag = documented_tag(route.path, route.method.as_str());
            let expected = match (route.path, tag.as_str()) {
                ("/v1/openapi.json", _) => Listener::Both,
                (_, "publish" | "query") => Listener::Public,
                (_, "operate" | "health") => Listener::Internal,
                (path, tag) => panic!("{path}: tag {tag} has no listener"),
            };
            assert_eq!(route.listener, expected, "{} {}", route.method, route.path);
        }
    }

    fn documented_tag(path: &str, method: &str) -> String {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        doc["paths"][path][method.to_lowercase()]["tags"][0].as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn a_limit_defaults_is_capped_and_is_never_zero() {
        assert_eq!(limit(None, 100, 1000).unwrap(), 100);
        assert_eq!(limit(Some(7), 100, 1000).unwrap(), 7);
        assert_eq!(limit(Some(5000), 100, 1000).unwrap(), 1000);
        let zero = limit(Some(0), 100, 1000).unwrap_err();
        assert_eq!(zero.status_and_code(), (StatusCode::BAD_REQUEST, "bad_request"));
        assert_eq!(zero.to_string(), "limit must be between 1 and 1000");
    }

    #[test]
    fn errors_axum_writes_get_a_code_by_status() {
        assert_eq!(error_code(StatusCode::BAD_REQUEST), "bad_request");
        assert_eq!(error_code(StatusCode::UNPROCESSABLE_ENTITY), "bad_request");
        assert_eq!(error_code(StatusCode::NOT_FOUND), "no_route");
        assert_eq!(error_code(StatusCode::PAYLOAD_TOO_LARGE), "body_too_large");
        assert_eq!(error_code(StatusCode::BAD_GATEWAY), "internal_error");
    }

    #[test]
    fn the_document_says_which_routes_need_a_token() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object(), "{}", doc["components"]);
        for route in routes() {
            let operation = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
            let secured = operation.get("security").is_some();
            assert_eq!(secured, route.scope.is_some(), "{} {}: security {}", route.method, route.path, operation);
        }
    }
}
