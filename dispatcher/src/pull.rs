//! Pulling from the dispatchers' durable JetStream consumers: one bounded fetch at a time, each
//! finished before the next, so a dispatcher that stops has nothing fetched and unprocessed
//! (no job waits out the ack wait because its dispatcher shut down). Shared by the job and
//! event pipelines.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, Message};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// How long one fetch waits for messages; also the longest a stopping dispatcher keeps pulling.
const FETCH_EXPIRES: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[error("jetstream consumer {consumer} on {stream}: {reason}")]
pub struct ConsumerError {
    stream: String,
    consumer: String,
    reason: String,
}

pub type Consumer = jetstream::consumer::Consumer<pull::Config>;

/// A durable consumer all dispatchers share; created if missing (an existing consumer keeps
/// the settings it was created with).
pub async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
) -> Result<Consumer, ConsumerError> {
    let err = |reason: String| ConsumerError { stream: stream.to_owned(), consumer: name.to_owned(), reason };
    let handle = js.get_stream(stream).await.map_err(|e| err(e.to_string()))?;
    handle
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                // Unbounded redelivery: a store outage must never turn into loss. Poison jobs
                // are bounded by the job pipeline's own attempt count instead.
                max_deliver: -1,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err(e.to_string()))
}

/// Fetches batches of up to `batch` messages until `stop` fires, handing each group of
/// messages that arrived together to `handle`. Errors (NATS away, consumer gone) are logged
/// and retried with backoff; the loop ends only when `stop` fires.
pub async fn run<F, Fut>(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
    batch: usize,
    stop: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Message>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    let mut cached: Option<Consumer> = None;
    while !stop.is_cancelled() {
        let consumer = match cached.take() {
            Some(consumer) => consumer,
            None => match self::consumer(js, stream, name, ack_wait).await {
                Ok(consumer) => consumer,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer unavailable; retrying");
                    sleep_or_stop(&mut backoff, stop).await;
                    continue;
                }
            },
        };
        let fetch = consumer.batch().max_messages(batch).expires(FETCH_EXPIRES).messages().await;
        let mut chunks = match fetch {
            Ok(messages) => messages.ready_chunks(batch),
            Err(e) => {
                tracing::warn!(error = %e, stream, "cannot pull; retrying");
                sleep_or_stop(&mut backoff, stop).await;
                continue;
            }
        };
        // The fetch is finished even when `stop` fires meanwhile (at most FETCH_EXPIRES):
        // what was pulled gets processed, not left to the ack wait.
        let mut broken = false;
        while let Some(chunk) = chunks.next().await {
            let total = chunk.len();
            let messages: Vec<Message> = chunk
                .into_iter()
                .filter_map(|m| m.map_err(|e| tracing::warn!(error = %e, stream, "pulling")).ok())
                .collect();
            broken |= messages.len() < total;
            if !messages.is_empty() {
                handle(messages).await;
            }
        }
        if broken {
            sleep_or_stop(&mut backoff, stop).await;
        } else {
            backoff = Duration::from_millis(100);
            cached = Some(consumer);
        }
    }
}

/// Sleeps for `backoff` (then doubles it, up to 1 s: a retry is one cheap attempt, and work
/// resumes within a second of the dependency's return). Returns false if `stop` fired.
pub(crate) async fn sleep_or_stop(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    let pause = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
    tokio::select! {
        _ = tokio::time::sleep(pause) => true,
        _ = stop.cancelled() => false,
    }
}
