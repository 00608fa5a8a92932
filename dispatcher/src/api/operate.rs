//! The operator's endpoints: close a user's connections (kick), cancel a message, forget a user,
//! read back rejections and dead letters, and one status of the whole deployment. Each is also a
//! `heraldctl` command.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_nats::jetstream::consumer::pull;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_proto::{GatewayCommand, GatewayId, Kick, MessageId, Rejection, UserId};
use herald_publish::rejections::{self, Source, Start};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, ErrorBody};

/// Rejections or dead letters returned at most per request.
const MAX_ENTRIES: usize = 1_000;
const DEFAULT_ENTRIES: usize = 100;
/// How far back a read of rejections goes when no `since_ms` is given.
const DEFAULT_SINCE_MS: u64 = 3_600_000;

#[derive(Serialize, utoipa::ToSchema)]
pub struct KickAnswer {
    #[schema(value_type = String)]
    user: UserId,
    /// Connections presence held for the user, each now asked to close (4403).
    connections: usize,
    /// The gateways sent a `kick` command.
    #[schema(value_type = Vec<String>)]
    gateways: Vec<GatewayId>,
}

/// Closes every connection of a user, on every gateway presence says holds one.
#[utoipa::path(
    post,
    path = "/v1/users/{user}/kick",
    tag = "operate",
    params(("user" = String, Path, description = "The user id")),
    responses(
        (status = 202, description = "Each gateway holding the user was told to close its connections", body = KickAnswer),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "The user has no connection", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn kick(State(state): State<Arc<ApiState>>, Path(user): Path<String>) -> Result<Response, ApiError> {
    let user = UserId::new(user)?;
    let found = state.presence.lookup(&[&user]).await?;
    let Some(connections) = found.get(&user).filter(|c| !c.is_empty()) else {
        return Err(ApiError::NotFound("connected user"));
    };
    let gateways: BTreeSet<GatewayId> = connections.values().cloned().collect();
    let command = GatewayCommand::Kick(Kick { user: user.clone() });
    for gateway in &gateways {
        if !state.router.publish(gateway, &command).await {
            return Err(ApiError::Nats(format!("the kick for gateway {gateway} was not published")));
        }
    }
    tracing::info!(%user, connections = connections.len(), gateways = gateways.len(), "kick sent");
    let answer =
        KickAnswer { user: user.clone(), connections: connections.len(), gateways: gateways.into_iter().collect() };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CancelAnswer {
    #[schema(value_type = String)]
    id: MessageId,
    /// Receipts this cancel moved from `pending` to `cancelled`.
    cancelled: u64,
    /// Receipts by state, after the cancel.
    counts: BTreeMap<String, u64>,
}

/// Cancels a message: its pending receipts become `cancelled`, and it is never sent again.
#[utoipa::path(
    post,
    path = "/v1/messages/{id}/cancel",
    tag = "operate",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "Cancelled (0 when nothing was pending)", body = CancelAnswer),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such message", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let id = MessageId::new(id).map_err(|_| ApiError::NotFound("message"))?;
    if state.store.message(&id).await?.is_none() {
        return Err(ApiError::NotFound("message"));
    }
    let cancelled = state.store.cancel(&id, state.clock.now_ms()).await?;
    let counts = state.store.receipt_counts(&id).await?.into_iter().collect();
    tracing::info!(message = %id, cancelled, "message cancelled");
    Ok(Json(CancelAnswer { id, cancelled, counts }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ForgetAnswer {
    #[schema(value_type = String)]
    user: UserId,
    /// Every receipt of the user, deleted.
    receipts_deleted: u64,
    /// Of those, the ones that carried a message sent to this user alone (deleted with it).
    messages_deleted: u64,
}

/// Forgets a user: deletes their receipts and the messages sent to them alone.
#[utoipa::path(
    delete,
    path = "/v1/users/{user}",
    tag = "operate",
    params(("user" = String, Path, description = "The user id")),
    responses(
        (status = 200, description = "Deleted (0 when nothing was stored)", body = ForgetAnswer),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn forget(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Result<Json<ForgetAnswer>, ApiError> {
    let user = UserId::new(user)?;
    let (receipts_deleted, messages_deleted) = state.store.forget(&user).await?;
    tracing::info!(%user, receipts_deleted, messages_deleted, "user forgotten");
    Ok(Json(ForgetAnswer { user, receipts_deleted, messages_deleted }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Since {
    /// From this time on (Unix ms); default: the last hour.
    since_ms: Option<u64>,
    /// At most this many, oldest first: 1 to 1000 (more is capped at 1000), default 100.
    limit: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EntriesAnswer {
    since_ms: u64,
    /// Rejections (proto/README.md, "Rejections and dead letters"), oldest first.
    #[schema(value_type = Vec<Object>)]
    entries: Vec<Rejection>,
    /// Whether more were there than `limit`.
    truncated: bool,
}

/// Jobs rejected by validation (`herald.rejected`), from a time on.
#[utoipa::path(
    get,
    path = "/v1/rejections",
    tag = "operate",
    params(Since),
    responses((status = 200, body = EntriesAnswer), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn rejections(
    State(state): State<Arc<ApiState>>,
    Query(since): Query<Since>,
) -> Result<Json<EntriesAnswer>, ApiError> {
    let subject = state.names.rejected_subject();
    read_entries(&state, subject, since).await
}

/// Jobs dead-lettered after failing to be stored (`herald.dead`), from a time on.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "operate",
    params(Since),
    responses((status = 200, body = EntriesAnswer), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    Query(since): Query<Since>,
) -> Result<Json<EntriesAnswer>, ApiError> {
    let subject = state.names.dead_letter_subject();
    read_entries(&state, subject, since).await
}

async fn read_entries(state: &ApiState, subject: String, since: Since) -> Result<Json<EntriesAnswer>, ApiError> {
    let since_ms = since.since_ms.unwrap_or_else(|| state.clock.now_ms().saturating_sub(DEFAULT_SINCE_MS));
    let limit = super::limit(since.limit, DEFAULT_ENTRIES, MAX_ENTRIES)?;
    let source = Source { stream: state.names.rejected_stream(), subject };
    let (entries, truncated) = rejections::read(&state.js, &source, Start::Since(since_ms), limit)
        .await
        .map_err(|e| ApiError::Nats(e.to_string()))?;
    let entries = entries.into_iter().filter_map(|e| e.rejection).collect();
    Ok(Json(EntriesAnswer { since_ms, entries, truncated }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct StreamStatus {
    name: String,
    /// Messages stored (jobs or events not yet taken; rejections kept).
    messages: u64,
    bytes: u64,
    /// The dispatchers' durable consumer, when the stream has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<ConsumerStatus>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConsumerStatus {
    name: String,
    /// Not yet handed to any dispatcher: the lag.
    pending: u64,
    /// Handed to a dispatcher, not yet acked.
    ack_pending: usize,
    /// Handed out more than once.
    redelivered: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct StatusAnswer {
    /// `jobs`, `events` and `rejected`; a stream that could not be read is absent and named in
    /// `errors`.
    streams: BTreeMap<&'static str, StreamStatus>,
    /// Gateways whose liveness key exists.
    gateways: Vec<String>,
    /// Whether each dependency answers (as `/readyz`).
    dependencies: BTreeMap<&'static str, bool>,
    errors: Vec<String>,
}

/// The deployment at a glance: streams and consumer lag, live gateways, dependencies.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operate",
    responses((status = 200, body = StatusAnswer), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn status(State(state): State<Arc<ApiState>>) -> Json<StatusAnswer> {
    let names = &state.names;
    let mut errors = Vec::new();
    let mut streams = BTreeMap::new();
    for (key, stream, consumer) in [
        ("jobs", names.jobs_stream(), Some(names.jobs_consumer())),
        ("events", names.events_stream(), Some(names.events_consumer())),
        ("rejected", names.rejected_stream(), None),
    ] {
        match stream_status(&state, &stream, consumer).await {
            Ok(status) => {
                streams.insert(key, status);
            }
            Err(e) => errors.push(format!("stream {stream}: {e}")),
        }
    }
    let gateways = match state.presence.live_gateways().await {
        Ok(gateways) => gateways.into_iter().map(GatewayId::into_string).collect(),
        Err(e) => {
            errors.push(format!("gateways: {e}"));
            Vec::new()
        }
    };
    let dependencies = super::check_dependencies(&state).await.checks;
    Json(StatusAnswer { streams, gateways, dependencies, errors })
}

async fn stream_status(state: &ApiState, name: &str, consumer: Option<&str>) -> Result<StreamStatus, String> {
    let mut stream = state.js.get_stream(name).await.map_err(|e| e.to_string())?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (messages, bytes) = (info.state.messages, info.state.bytes);
    let consumer = match consumer {
        Some(consumer_name) => match stream.get_consumer::<pull::Config>(consumer_name).await {
            Ok(mut consumer) => {
                let info = consumer.info().await.map_err(|e| e.to_string())?;
                Some(ConsumerStatus {
                    name: consumer_name.to_owned(),
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending,
                    redelivered: info.num_redelivered,
                })
            }
            // No dispatcher has created it yet.
            Err(_) => None,
        },
        None => None,
    };
    Ok(StreamStatus { name: name.to_owned(), messages, bytes, consumer })
}
