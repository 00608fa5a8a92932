//! One pull request to a JetStream consumer, read to its true end: every message the server
//! delivered for it, whatever order its closing status and its messages arrive in.
//!
//! async-nats's `Batch` ends at the first status it sees. But when a request's message count is
//! used up while bytes remain, the server closes it with `409 Batch Completed`, and on a
//! replicated stream that status can overtake the messages it completes (they wait for the
//! replicas' quorum; the status does not). The batch then ended with nothing, its messages were
//! dropped with its subscription, and they came back only after the ack wait. Under a backlog
//! every pull is full, so every pull did the same: in the chaos run (seed 1, a 3-node cluster
//! after node kills) a dispatcher's jobs pipeline pulled nothing for minutes. Here a closing
//! status says how many messages the request still owes (`Nats-Pending-Messages`), and the
//! read waits for those, for a bounded time. What decides is [`on_status`], a pure rule.
//!
//! Every request of a consumer's [`Puller`] replies to one standing subscription, so a message
//! that comes even later than that is not dropped: the next pull reads it and hands it out.
//! Statuses carry their request's own reply subject, so a late one is told apart and ignored;
//! messages carry the subject they were published on, so they are not, and need not be.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::BatchConfig};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

use crate::pull::Consumer;

/// How long messages a closing status says were delivered may take to follow it.
pub const OWED_GRACE: Duration = Duration::from_secs(2);
/// Past the request's expiry, how long to wait for the server's closing status.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);

/// Why a pull ended without all it was owed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("pull request not sent: {0}")]
    Request(String),
    /// The consumer's leader changed, or it was deleted: look the consumer up again.
    #[error("consumer gone: {0}")]
    ConsumerGone(String),
    #[error("pull refused: {0}")]
    Refused(String),
}

/// What a status message means for a pull that asked for `asked` messages and got `got`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Not about the request's end (an idle heartbeat): read on.
    ReadOn,
    /// The request is over, and `delivered` messages were sent for it in all: read until that
    /// many have come (at most [`OWED_GRACE`]), then stop.
    Closed { delivered: usize },
    /// The request failed; nothing more will come for it.
    Failed(FetchError),
}

/// The rule for a status message: `pending` is its `Nats-Pending-Messages` header, what the
/// request had left undelivered when the server closed it.
pub fn on_status(code: u16, description: &str, pending: Option<usize>, asked: usize) -> Next {
    let delivered = |pending: Option<usize>| asked.saturating_sub(pending.unwrap_or(asked));
    match (code, description) {
        (100, _) => Next::ReadOn,
        // No messages now (a no-wait request), or the request expired: what was delivered,
        // was delivered before it.
        (404 | 408, _) => Next::Closed { delivered: delivered(pending) },
        // The count used up with bytes left: every message asked for was delivered, and may
        // still be on its way behind this status.
        (409, "Batch Completed") => Next::Closed { delivered: delivered(pending.or(Some(0))) },
        // The next message larger than the bytes left: what was delivered before it.
        (409, "Message Size Exceeds MaxBytes") => Next::Closed { delivered: delivered(pending) },
        (409, "Leadership Change") | (409, "Consumer Deleted") => {
            Next::Failed(FetchError::ConsumerGone(description.to_owned()))
        }
        (_, other) => Next::Failed(FetchError::Refused(format!("{code} {other}"))),
    }
}

/// A consumer's pulls, made one at a time over one standing subscription to `<inbox>.*`, each
/// request replying to `<inbox>.<n>`. A subscription per pull cost a subscribe and an
/// unsubscribe, two more writes to NATS, for every request; pulling on demand (see
/// `crate::pull`) makes two requests a group.
pub struct Puller {
    subscriber: Subscriber,
    prefix: String,
    sent: u64,
    context: jetstream::Context,
}

impl Puller {
    pub async fn new(js: &jetstream::Context) -> Result<Self, FetchError> {
        let client = js.client();
        let prefix = client.new_inbox();
        let subscriber =
            client.subscribe(format!("{prefix}.*")).await.map_err(|e| FetchError::Request(e.to_string()))?;
        Ok(Self { subscriber, prefix, sent: 0, context: js.clone() })
    }

    /// Asks `consumer` for up to `max` messages and `max_bytes` (0: no byte limit). With
    /// `wait`, the request waits that long for them (a long poll); without, it brings only what
    /// is queued now.
    pub async fn pull(
        &mut self,
        consumer: &Consumer,
        max: usize,
        max_bytes: usize,
        wait: Option<Duration>,
    ) -> Result<Pull<'_>, FetchError> {
        let reply = self.next_reply();
        let config =
            BatchConfig { batch: max, max_bytes, expires: wait, no_wait: wait.is_none(), ..BatchConfig::default() };
        consumer.request_batch(config, reply.clone().into()).await.map_err(|e| FetchError::Request(e.to_string()))?;
        Ok(self.read(reply, max, wait))
    }

    /// The reply subject for the next request.
    pub fn next_reply(&mut self) -> String {
        self.sent += 1;
        format!("{}.{}", self.prefix, self.sent)
    }

    /// Reads a request sent for up to `asked` messages with `reply` as its reply subject
    /// (from [`Self::next_reply`]), waiting at most `wait` (none: a request that does not wait).
    pub fn read(&mut self, reply: String, asked: usize, wait: Option<Duration>) -> Pull<'_> {
        let deadline = Instant::now() + wait.unwrap_or(Duration::ZERO) + EXPIRY_GRACE;
        Pull {
            subscriber: &mut self.subscriber,
            context: self.context.clone(),
            reply,
            asked,
            got: 0,
            owed: None,
            deadline,
            done: false,
        }
    }
}

/// One pull request in flight, read message by message from its [`Puller`]'s subscription.
/// A message that an earlier request owed and that came after it was given up on (past
/// [`OWED_GRACE`]) is handed out by the pull it arrives in: every message pulled gets handled.
/// Only statuses are told apart by request, by their subject.
pub struct Pull<'a> {
    subscriber: &'a mut Subscriber,
    context: jetstream::Context,
    reply: String,
    asked: usize,
    got: usize,
    /// Set by a closing status: messages owed, and until when they may come.
    owed: Option<(usize, Instant)>,
    /// When to stop waiting for the server's closing status.
    deadline: Instant,
    done: bool,
}

impl Pull<'_> {
    /// The next message of this pull; None once it is over (all asked for came, the server
    /// closed it and what it owed came, or the waiting ran out). An error ends it too.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, FetchError>> {
        loop {
            if self.done || self.got >= self.asked || self.owed.is_some_and(|(owed, _)| self.got >= owed) {
                self.done = true;
                return None;
            }
            let until = self.owed.map_or(self.deadline, |(_, until)| until.min(self.deadline));
            let message = match tokio::time::timeout_at(until, self.subscriber.next()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => {
                    self.done = true;
                    return None;
                }
            };
            let Some(status) = message.status.filter(|s| *s != StatusCode::OK) else {
                self.got += 1;
                return Some(Ok(jetstream::Message { message, context: self.context.clone() }));
            };
            // An earlier request's late status says nothing about this one.
            if message.subject.as_str() != self.reply {
                continue;
            }
            let pending = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Pending-Messages"))
                .and_then(|v| v.as_str().parse().ok());
            let description = message.description.as_deref().unwrap_or("");
            match on_status(status.as_u16(), description, pending, self.asked) {
                Next::ReadOn => {}
                Next::Closed { delivered } => self.owed = Some((delivered, Instant::now() + OWED_GRACE)),
                Next::Failed(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_completed_before_its_messages_still_owes_all_of_them() {
        // The count used up: nothing pending, all 256 were delivered, whenever they arrive.
        assert_eq!(on_status(409, "Batch Completed", Some(0), 256), Next::Closed { delivered: 256 });
        assert_eq!(on_status(409, "Batch Completed", None, 256), Next::Closed { delivered: 256 });
    }

    #[test]
    fn an_expired_or_byte_limited_request_owes_what_it_delivered() {
        assert_eq!(on_status(408, "Request Timeout", Some(250), 256), Next::Closed { delivered: 6 });
        assert_eq!(on_status(409, "Message Size Exceeds MaxBytes", Some(200), 256), Next::Closed { delivered: 56 });
        // Without the header, nothing is known to be owed.
        assert_eq!(on_status(408, "Request Timeout", None, 256), Next::Closed { delivered: 0 });
        assert_eq!(on_status(404, "No Messages", None, 256), Next::Closed { delivered: 0 });
    }

    #[test]
    fn heartbeats_are_read_past_and_a_gone_consumer_fails_the_pull() {
        assert_eq!(on_status(100, "Idle Heartbeat", None, 10), Next::ReadOn);
        assert!(matches!(on_status(409, "Leadership Change", None, 10), Next::Failed(FetchError::ConsumerGone(_))));
        assert!(matches!(on_status(409, "Consumer Deleted", None, 10), Next::Failed(FetchError::ConsumerGone(_))));
        assert!(matches!(on_status(409, "Exceeded MaxWaiting", None, 10), Next::Failed(FetchError::Refused(_))));
    }
}
