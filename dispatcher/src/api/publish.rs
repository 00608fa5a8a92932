//! `POST /v1/publish` and `POST /v1/publish/batch`: a job over HTTP instead of JetStream. The
//! body is validated by the pipeline's own validator before anything is published, published on
//! the jobs stream with its `Nats-Msg-Id`, and answered only once JetStream has stored it (or
//! dropped it as a duplicate). What the pipeline does with it then is what it does with any job.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_proto::{MessageId, RejectCode};
use herald_publish::validate::Invalid;
use herald_publish::{Prepared, PublishError, Published};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::{ApiError, ApiState, ErrorBody, RejectedBody};

/// The request header whose value becomes the job's `Nats-Msg-Id` (and, for a job without
/// `id`, its message id).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A publish job (proto/README.md, "Publishing"). For the OpenAPI document only: the body is
/// validated from its bytes by the pipeline's validator, never decoded through this type.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Job {
    /// Recipient user ids: the `sub` of their tokens. 1 to 10000, each 1 to 256 bytes.
    to: Vec<String>,
    /// Any JSON value; clients receive these exact bytes.
    payload: serde_json::Value,
    /// The message id and idempotency key: 1-128 of `[A-Za-z0-9._:-]`, not starting `seq-`.
    id: Option<String>,
    /// 1 to 2592000; the dispatcher's default (86400) when absent.
    ttl_secs: Option<u64>,
}

/// `{"jobs": [job, ...]}`, for the OpenAPI document only.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct JobBatch {
    jobs: Vec<Job>,
}

/// What JetStream answered for one job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublishAnswer {
    /// The message id: the job's `id`, else the `Idempotency-Key`, else one generated (`auto-…`).
    id: String,
    /// The job's sequence in the jobs stream: the notification's `seq`.
    seq: u64,
    /// Present (true) when this publish repeated one already stored: nothing new was published.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl From<&Published> for PublishAnswer {
    fn from(p: &Published) -> Self {
        Self { id: p.id.to_string(), seq: p.seq, duplicate: p.duplicate }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchAnswer {
    /// One answer per job, in order.
    results: Vec<PublishAnswer>,
}

/// Validates and publishes one job.
#[utoipa::path(
    post,
    path = "/v1/publish",
    tag = "publish",
    request_body(content = Job, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Becomes the job's Nats-Msg-Id (else the job's id does), and the message id of a job without one"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, continued through Herald"),
    ),
    responses(
        (status = 201, description = "Stored by JetStream", body = PublishAnswer),
        (status = 200, description = "A duplicate of a job already published (`duplicate`: true)", body = PublishAnswer),
        (status = 400, description = "Rejected: the code the pipeline would reject it with", body = RejectedBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, description = "Body over HERALD_API_MAX_BODY_BYTES", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`: NATS or JetStream did not take it; `overloaded`: more jobs wait than HERALD_API_MAX_BACKLOG (with Retry-After). Retry with the same id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn publish(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(&state, e))?;
    let key = idempotency_key(&headers)?;
    let prepared = state.publisher.prepare(&body, key).map_err(ApiError::Rejected)?;
    let mut known = stored_as(&state, std::slice::from_ref(&prepared)).await;
    let published = match known.remove(prepared.id()) {
        Some(Stored::Other) => return Err(ApiError::Rejected(conflict(prepared.id()))),
        Some(Stored::Same(seq)) => Published {
            id: prepared.id().clone(),
            seq,
            stream: state.publisher.destination().stream.clone(),
            duplicate: true,
        },
        None => {
            admit(&state).await?;
            let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
            state.publisher.send(&prepared, traceparent).await.map_err(nats_error)?
        }
    };
    let status = if published.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(PublishAnswer::from(&published))).into_response())
}

/// Refuses new work while the dispatchers are behind (see [`crate::admission`]). Asked only for
/// jobs that would add work: one the store already holds is answered as a duplicate.
async fn admit(state: &ApiState) -> Result<(), ApiError> {
    state.backlog.check().await.map_err(|backlog| {
        state.metrics.publish_overloaded.inc();
        ApiError::Overloaded { backlog, limit: state.backlog.max_backlog }
    })
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    jobs: Vec<&'a RawValue>,
}

/// Validates up to HERALD_API_MAX_BATCH jobs, and publishes them all only if every one is
/// valid.
#[utoipa::path(
    post,
    path = "/v1/publish/batch",
    tag = "publish",
    request_body(content = JobBatch, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Job i gets `<key>-<i>` as its Nats-Msg-Id (and as its message id if it has no id)"),
    ),
    responses(
        (status = 201, description = "Every job stored by JetStream (some may be duplicates)", body = BatchAnswer),
        (status = 200, description = "Every job was a duplicate", body = BatchAnswer),
        (status = 400, description = "`rejected` with `items` (index, code, reason); nothing was published. Or `bad_request`: not a batch, empty, or too many jobs", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, description = "Some jobs not taken by NATS; `results` says which (those with `error`). Or `overloaded` (with Retry-After): nothing was published", body = Object),
    ),
    security(("bearer" = []))
)]
pub async fn publish_batch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(&state, e))?;
    let key = idempotency_key(&headers)?;
    let batch: BatchBody<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("not a batch of jobs ({{\"jobs\": [job, ...]}}): {e}")))?;
    if batch.jobs.is_empty() || batch.jobs.len() > state.max_batch {
        return Err(ApiError::BadRequest(format!(
            "{} jobs; a batch holds 1 to {} (HERALD_API_MAX_BATCH)",
            batch.jobs.len(),
            state.max_batch
        )));
    }
    let mut prepared = Vec::with_capacity(batch.jobs.len());
    let mut rejected = Vec::new();
    for (index, job) in batch.jobs.iter().enumerate() {
        let item_key = key.map(|k| format!("{k}-{index}"));
        match state.publisher.prepare(job.get().as_bytes(), item_key.as_deref()) {
            Ok(p) => prepared.push(p),
            Err(invalid) => rejected.push((index, invalid)),
        }
    }
    let known = if rejected.is_empty() { stored_as(&state, &prepared).await } else { HashMap::new() };
    for (index, p) in prepared.iter().enumerate() {
        if matches!(known.get(p.id()), Some(Stored::Other)) {
            rejected.push((index, conflict(p.id())));
        }
    }
    if !rejected.is_empty() {
        return Ok(batch_rejected(batch.jobs.len(), rejected));
    }

    let to_send: Vec<Prepared> = prepared.iter().filter(|p| !known.contains_key(p.id())).cloned().collect();
    if !to_send.is_empty() {
        admit(&state).await?;
    }
    let mut sent = state.publisher.send_all(&to_send).await.into_iter();
    let stream = &state.publisher.destination().stream;
    let outcomes: Vec<Result<Published, PublishError>> = prepared
        .iter()
        .map(|p| match known.get(p.id()) {
            Some(Stored::Same(seq)) => {
                Ok(Published { id: p.id().clone(), seq: *seq, stream: stream.clone(), duplicate: true })
            }
            _ => sent.next().unwrap_or_else(|| {
                Err(PublishError::NoStream { stream: format!("{stream} (no answer for this job)") })
            }),
        })
        .collect();
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    if failed > 0 {
        let results: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| match o {
                Ok(p) => json!(PublishAnswer::from(p)),
                Err(e) => json!({ "error": "nats_unavailable", "reason": e.to_string() }),
            })
            .collect();
        let reason =
            format!("{failed} of {} jobs were not published; publish them again with the same ids", results.len());
        tracing::warn!(failed, "batch publish partly failed");
        let body = json!({ "error": "nats_unavailable", "reason": reason, "results": results });
        return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
    }
    let results: Vec<PublishAnswer> = outcomes.iter().flatten().map(PublishAnswer::from).collect();
    let status = if results.iter().all(|r| r.duplicate) { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(BatchAnswer { results })).into_response())
}

/// A 400 naming each rejected job of a batch.
fn batch_rejected(total: usize, mut rejected: Vec<(usize, Invalid)>) -> Response {
    rejected.sort_by_key(|(index, _)| *index);
    let items: Vec<serde_json::Value> = rejected
        .iter()
        .map(|(index, invalid)| {
            json!({ "index": index, "code": herald_publish::code_str(invalid.code), "reason": invalid.reason })
        })
        .collect();
    let reason = format!("{} of {total} jobs were rejected; none was published", items.len());
    (StatusCode::BAD_REQUEST, Json(json!({ "error": "rejected", "reason": reason, "items": items }))).into_response()
}

/// The `Idempotency-Key` header, if given.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| {
            ApiError::Rejected(Invalid {
                job_id: None,
                code: RejectCode::InvalidId,
                reason: "the idempotency key is not a message id".into(),
            })
        }),
    }
}

fn body_error(state: &ApiState, rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(state.max_body_bytes)
    } else {
        ApiError::BadRequest(format!("the body could not be read: {rejection}"))
    }
}

fn nats_error(e: PublishError) -> ApiError {
    match e {
        PublishError::Rejected(invalid) => ApiError::Rejected(invalid),
        other => ApiError::Nats(other.to_string()),
    }
}

fn conflict(id: &MessageId) -> Invalid {
    Invalid {
        job_id: Some(id.to_string()),
        code: RejectCode::IdConflict,
        reason: format!("id {id} belongs to a stored message with other content (payload, recipients or ttl_secs)"),
    }
}

/// What the store already holds under a job's id.
enum Stored {
    /// The same job, stored as the message with this sequence.
    Same(u64),
    /// A message with other content: the job would be rejected as `id_conflict`.
    Other,
}

/// The jobs whose id a stored message holds already. Asked before publishing, so that reusing
/// an id for other content is refused now, not rejected later on `herald.rejected` (or, within
/// JetStream's duplicate window, dropped as a duplicate of the other content); and so that a
/// job stored before is answered as the duplicate it is, with its message's sequence. When the
/// store does not answer, nothing is known: the jobs are published, and the pipeline decides.
async fn stored_as(state: &ApiState, prepared: &[Prepared]) -> HashMap<MessageId, Stored> {
    let mut known = HashMap::new();
    for p in prepared {
        let digest = match state.store.claim_digest(p.id()).await {
            Ok(Some(digest)) => digest,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "id claims unknown; publishing, the pipeline decides");
                return HashMap::new();
            }
        };
        if digest != p.job.digest {
            known.insert(p.id().clone(), Stored::Other);
        } else if let Ok(Some(message)) = state.store.message(p.id()).await {
            known.insert(p.id().clone(), Stored::Same(u64::try_from(message.seq).unwrap_or(0)));
        }
    }
    known
}
