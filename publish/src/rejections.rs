//! Reading back what the dispatchers refused: rejections and dead letters, kept in the rejected
//! stream for a week. An ordered consumer (ephemeral, nothing to clean up) reads one subject of
//! it from a point in time, either up to what is there now ([`read`]) or on and on ([`follow`]).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::{Stream, StreamExt, TryStreamExt};
use herald_proto::Rejection;

/// Where to read: the rejected stream and one of its subjects (rejections or dead letters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub stream: String,
    pub subject: String,
}

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first entry stored at or after this time (Unix ms).
    Since(u64),
    /// Only entries stored from now on.
    New,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("reading {subject}: {message}")]
    Consumer { subject: String, message: String },
}

/// One entry of the stream, decoded when it is a rejection.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stream_seq: u64,
    /// When it was stored (Unix ms).
    pub stored_at_ms: u64,
    /// None when the entry is not a rejection (not written by a dispatcher).
    pub rejection: Option<Rejection>,
}

/// How long [`read`] waits for the next entry before it takes the stream as read to its end.
const IDLE: Duration = Duration::from_secs(2);

async fn entries(
    js: &jetstream::Context,
    source: &Source,
    start: Start,
) -> Result<(impl Stream<Item = Result<(Entry, u64), ReadError>>, u64), ReadError> {
    let stream_error =
        |e: &dyn std::fmt::Display| ReadError::Stream { stream: source.stream.clone(), message: e.to_string() };
    let consumer_error =
        |e: &dyn std::fmt::Display| ReadError::Consumer { subject: source.subject.clone(), message: e.to_string() };
    let stream = js.get_stream(&source.stream).await.map_err(|e| stream_error(&e))?;
    let deliver_policy = match start {
        Start::New => DeliverPolicy::New,
        Start::Since(ms) => {
            let start_time =
                async_nats::datetime::from_nanos(i128::from(ms) * 1_000_000).map_err(|e| stream_error(&e))?;
            DeliverPolicy::ByStartTime { start_time }
        }
    };
    let config = OrderedConfig { filter_subject: source.subject.clone(), deliver_policy, ..Default::default() };
    let mut consumer = stream.create_consumer(config).await.map_err(|e| consumer_error(&e))?;
    let waiting = consumer.info().await.map_err(|e| consumer_error(&e))?.num_pending;
    let messages = consumer.messages().await.map_err(|e| consumer_error(&e))?;
    let subject = source.subject.clone();
    let entries = messages
        .map_err(move |e| ReadError::Consumer { subject: subject.clone(), message: e.to_string() })
        .map_ok(|message| {
            let (stream_seq, stored_at_ms, pending) = match message.info() {
                Ok(info) => {
                    let ms = info.published.unix_timestamp_nanos() / 1_000_000;
                    (info.stream_sequence, u64::try_from(ms).unwrap_or(0), info.pending)
                }
                Err(_) => (0, 0, 0),
            };
            let rejection = serde_json::from_slice(&message.payload).ok();
            (Entry { stream_seq, stored_at_ms, rejection }, pending)
        });
    Ok((entries, waiting))
}

/// Up to `limit` entries from `start`, oldest first, and whether more were there.
pub async fn read(
    js: &jetstream::Context,
    source: &Source,
    start: Start,
    limit: usize,
) -> Result<(Vec<Entry>, bool), ReadError> {
    let (entries, waiting) = entries(js, source, start).await?;
    if waiting == 0 || limit == 0 {
        return Ok((Vec::new(), waiting > 0));
    }
    futures::pin_mut!(entries);
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(IDLE, entries.next()).await {
            // Nothing more arrived: what was there has been read (entries may have aged out).
            Err(_) | Ok(None) => return Ok((out, false)),
            Ok(Some(entry)) => {
                let (entry, pending) = entry?;
                out.push(entry);
                if pending == 0 {
                    return Ok((out, false));
                }
                if out.len() >= limit {
                    return Ok((out, true));
                }
            }
        }
    }
}

/// Every entry from `start` on, as it comes; the stream ends only on an error.
pub async fn follow(
    js: &jetstream::Context,
    source: &Source,
    start: Start,
) -> Result<impl Stream<Item = Result<Entry, ReadError>>, ReadError> {
    let (entries, _) = entries(js, source, start).await?;
    Ok(entries.map_ok(|(entry, _)| entry))
}
