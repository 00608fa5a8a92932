//! The query API: "did Alice get message X?", a user's pending messages, a user's presence.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use herald_proto::{GatewayId, MessageId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ApiError, ApiState, ErrorBody};
use crate::receipt::ReceiptState;
use crate::store::{DeliveredBy, ReceiptDoc};

/// Receipts or messages returned at most per request.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Limit {
    /// At most this many: 1 to 10000 (more is capped at 10000), default 1000.
    limit: Option<usize>,
}

impl Limit {
    fn get(&self) -> Result<usize, ApiError> {
        super::limit(self.limit, DEFAULT_LIMIT, MAX_LIMIT)
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReceiptView {
    #[schema(value_type = String)]
    user: UserId,
    #[schema(value_type = String)]
    message_id: MessageId,
    /// `pending`, `expired`, `delivered`, `read` or `cancelled`.
    #[schema(value_type = String)]
    state: ReceiptState,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    delivered_by: Option<DeliveredBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancelled_at_ms: Option<i64>,
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
            cancelled_at_ms: r.cancelled_at_ms,
        }
    }
}

// Answers are typed structs, never `serde_json::Value`: a payload goes out as the raw JSON it
// was published as, however deeply it nests or whatever escapes it holds, without being parsed.

#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageAnswer {
    message: MessageView,
    counts: BTreeMap<String, u64>,
    receipts: Vec<ReceiptView>,
    truncated: bool,
    /// A topic message's aggregate receipt, in place of `receipts` (which is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    topic_receipt: Option<TopicReceiptView>,
}

/// What is known of who got a topic message: counts, never a list of users.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TopicReceiptView {
    /// Connections that acked it (each connection once, on the gateway it was on).
    acked_connections: i64,
    /// Users that acked it, counted by each gateway per report (about a second): a user acking
    /// on two gateways, or on two connections a report apart, counts twice. An upper bound.
    acked_users: i64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageView {
    #[schema(value_type = String)]
    id: MessageId,
    seq: i64,
    /// The publisher's JSON, as published.
    #[schema(value_type = Object)]
    payload: Box<RawValue>,
    published_at_ms: i64,
    expires_at_ms: i64,
    recipients: i64,
    /// A topic message's topic; `seq` is then its offset (0 until it is on the topics stream).
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PendingAnswer {
    #[schema(value_type = String)]
    user: UserId,
    count: usize,
    /// Notifications as a client receives them, oldest first.
    #[schema(value_type = Vec<Object>)]
    pending: Vec<herald_proto::Notification>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PresenceAnswer {
    #[schema(value_type = String)]
    user: UserId,
    online: bool,
    connections: usize,
    /// Connections per gateway id.
    #[schema(value_type = BTreeMap<String, usize>)]
    gateways: BTreeMap<GatewayId, usize>,
}

/// A message, its receipt counts by state, and its receipts by user.
#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    tag = "query",
    params(("id" = String, Path, description = "The message id"), Limit),
    responses(
        (status = 200, description = "The message and its receipts", body = MessageAnswer),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such message", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn message(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<MessageAnswer>, ApiError> {
    let limit = limit.get()?;
    // No message has an id outside the grammar: such a path is simply not found.
    let id = MessageId::new(id).map_err(|_| ApiError::NotFound("message"))?;
    let Some(message) = state.store.message(&id).await? else {
        let topic = state.store.topic_message(&id).await?.ok_or(ApiError::NotFound("message"))?;
        return topic_message(topic);
    };
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
            topic: None,
        },
        counts: counts.into_iter().collect(),
        receipts: receipts.into_iter().map(|r| ReceiptView::new(r, now)).collect(),
        truncated,
        topic_receipt: None,
    }))
}

/// A topic message and its aggregate receipt, in the shape of a message's answer.
fn topic_message(doc: crate::store::TopicMessageDoc) -> Result<Json<MessageAnswer>, ApiError> {
    let payload = RawValue::from_string(doc.payload).map_err(|_| ApiError::Corrupt("message payload"))?;
    Ok(Json(MessageAnswer {
        message: MessageView {
            id: doc.id,
            seq: doc.offset.unwrap_or(0),
            payload,
            published_at_ms: doc.published_at.timestamp_millis(),
            expires_at_ms: doc.expires_at.timestamp_millis(),
            recipients: 0,
            topic: Some(doc.topic.into_string()),
        },
        counts: BTreeMap::new(),
        receipts: Vec::new(),
        truncated: false,
        topic_receipt: Some(TopicReceiptView {
            acked_connections: doc.acked_connections,
            acked_users: doc.acked_users,
        }),
    }))
}

/// A user's pending, unexpired messages, oldest first.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/pending",
    tag = "query",
    params(("user" = String, Path, description = "The user id"), Limit),
    responses(
        (status = 200, body = PendingAnswer),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pending(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<PendingAnswer>, ApiError> {
    let user = UserId::new(user).map_err(ApiError::BadId)?;
    let pending = state.store.pending_for(&[&user], limit.get()?, state.clock.now_ms()).await?;
    let pending: Vec<_> = pending.into_iter().map(|s| s.notification).collect();
    Ok(Json(PendingAnswer { user, count: pending.len(), pending }))
}

/// Whether a user is online, and on which gateways.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/presence",
    tag = "query",
    params(("user" = String, Path, description = "The user id")),
    responses(
        (status = 200, body = PresenceAnswer),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn presence(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Result<Json<PresenceAnswer>, ApiError> {
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
    Ok(Json(PresenceAnswer { user, online: connections > 0, connections, gateways }))
}
