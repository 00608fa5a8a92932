//! Topic subscriptions on this gateway: the index of which local connections subscribe to which
//! topic, the one reader of the topics stream that fans each topic message out to them, and
//! the recovery of what a re-subscribing client missed. What a connection may subscribe to (its
//! token's claim, its cap) is the session machine's decision; the socket writes, the outbox's.
//!
//! Every gateway reads every topic message once, through one ordered consumer starting at
//! "new", and serializes it once for all its subscribers. A subscriber's place in a topic is
//! its last offset: a message at or below it is not queued again, which is what lets a
//! recovery and the live stream meet without duplicates. While a recovery runs, the live
//! messages of that topic are held for that subscription and queued after the recovered ones.
//! Nothing here is durable: a topic message is at most once per connection while connected;
//! recovery within the stream's retention is what makes up for a reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use herald_proto::{close, ConnectionId, ServerFrame, TopicName, TopicNotification, TopicPublication};
use herald_shared::backoff::Backoff;
use herald_shared::naming::Names;
use herald_shared::outage::Outage;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::registry::{Connection, Outbound, Sent};

/// How long one recovery's round trips to JetStream may take in all; past it the subscription
/// goes live with `recovered: false`.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// One connection's subscription to one topic.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) conn: Arc<Connection>,
    state: Mutex<SubState>,
}

#[derive(Debug, Default)]
struct SubState {
    /// The highest offset queued for the connection: nothing at or below it is queued again.
    last_offset: u64,
    /// Some while a recovery runs: the live messages that came meanwhile, in offset order.
    /// Bounded by the connection's queue: more than it holds closes it as a slow consumer.
    held: Option<Vec<(u64, Outbound)>>,
}

impl Subscription {
    fn state(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live message: queued, held while recovering, or left out if already queued.
    fn offer(&self, offset: u64, frame: &Outbound) -> bool {
        let mut state = self.state();
        if offset <= state.last_offset {
            return false;
        }
        let capacity = self.conn.outbox.capacity();
        if let Some(held) = state.held.as_mut() {
            if held.len() >= capacity {
                self.conn.close_with(close::SLOW_CONSUMER);
                return false;
            }
            held.push((offset, frame.clone()));
            return true;
        }
        state.last_offset = offset;
        self.conn.offer(frame.clone())
    }

    /// Ends a recovery: the `subscribed` answer, the recovered messages, then the live ones held
    /// meanwhile that the recovery did not already bring, in that order and under the lock that
    /// live messages take, so none slips in between.
    pub(crate) fn finish_recovery(&self, answer: Outbound, recovered: Vec<(u64, Outbound)>) {
        let mut state = self.state();
        let held = state.held.take().unwrap_or_default();
        if !self.conn.offer(answer) {
            return;
        }
        for (offset, frame) in recovered.into_iter().chain(held) {
            if offset <= state.last_offset {
                continue;
            }
            state.last_offset = offset;
            if !self.conn.offer(frame) {
                return;
            }
        }
    }
}

/// Which local connections subscribe to each topic.
#[derive(Debug, Default)]
pub(crate) struct TopicIndex {
    by_topic: RwLock<HashMap<TopicName, Vec<Arc<Subscription>>>>,
}

impl TopicIndex {
    /// Adds a subscription; `recovering`: hold its live messages until [`Subscription::finish_recovery`].
    /// The session answers a subscription that does not recover before it adds it.
    pub(crate) fn subscribe(&self, conn: &Arc<Connection>, topic: &TopicName, recovering: bool) -> Arc<Subscription> {
        let state = SubState { last_offset: 0, held: recovering.then(Vec::new) };
        let sub = Arc::new(Subscription { conn: Arc::clone(conn), state: Mutex::new(state) });
        self.write().entry(topic.clone()).or_default().push(Arc::clone(&sub));
        sub
    }

    pub(crate) fn unsubscribe(&self, connection: &ConnectionId, topic: &TopicName) {
        let mut map = self.write();
        if let Some(subs) = map.get_mut(topic) {
            subs.retain(|s| s.conn.id != *connection);
            if subs.is_empty() {
                map.remove(topic);
            }
        }
    }

    /// Hands a topic message to every subscriber of its topic here; returns how many took it.
    pub(crate) fn fan_out(&self, topic: &TopicName, offset: u64, frame: &Outbound) -> usize {
        let map = self.read();
        map.get(topic).map_or(0, |subs| subs.iter().filter(|s| s.offer(offset, frame)).count())
    }

    #[cfg(test)]
    pub(crate) fn subscribers(&self, topic: &TopicName) -> usize {
        self.read().get(topic).map_or(0, Vec::len)
    }

    // Each critical section is one panic-free map operation: a poisoned lock's map is whole.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TopicName, Vec<Arc<Subscription>>>> {
        self.by_topic.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TopicName, Vec<Arc<Subscription>>>> {
        self.by_topic.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A topic message as queued for a socket: serialized once, shared by every subscriber. None if
/// it expired (never deliver past the TTL) or cannot be serialized.
pub(crate) fn frame(publication: TopicPublication, offset: u64, now_ms: u64) -> Option<Outbound> {
    if publication.expires_at_ms <= now_ms {
        return None;
    }
    let sent = Sent {
        id: publication.id.as_str().into(),
        published_at_ms: publication.published_at_ms,
        expires_at_ms: publication.expires_at_ms,
        replay: false,
        resend: false,
        traceparent: None,
        topic: Some(publication.topic.clone()),
    };
    let text = serde_json::to_string(&ServerFrame::TopicMessage(TopicNotification::new(publication, offset))).ok()?;
    Some(Outbound::Frame { frame: Utf8Bytes::from(text), sent: Some(Arc::new(sent)) })
}

/// A control frame (an answer to `subscribe` or `unsubscribe`) for a connection's queue.
pub(crate) fn answer(frame: &ServerFrame) -> Option<Outbound> {
    serde_json::to_string(frame).ok().map(|text| Outbound::Frame { frame: Utf8Bytes::from(text), sent: None })
}

/// The one reader of the topics stream on this gateway, and what it hands messages to.
pub(crate) struct Reader {
    pub(crate) js: jetstream::Context,
    pub(crate) names: Names,
    pub(crate) index: Arc<TopicIndex>,
    pub(crate) metrics: Arc<GatewayMetrics>,
    /// Fleet time: what a topic message's expiry is judged by.
    pub(crate) clock: herald_shared::Clock,
}

impl Reader {
    /// Reads the topics stream from "new" and fans every message out, until `stop`. A broken
    /// consumer is made again from the offset after the last one read, with backoff, so a NATS
    /// outage delays topic messages rather than dropping them (within the stream's retention).
    /// Ends only with `stop`: critical, since a gateway that stopped reading would silently
    /// stop delivering topics.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut next: Option<u64> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let outage = Outage::new("nats: topics stream");
        loop {
            let deliver_policy = match next {
                None => consumer::DeliverPolicy::New,
                Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                e = self.read_from(deliver_policy, &mut next, &mut backoff, &outage) => outage.failed(&e),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    /// One ordered consumer's life: returns why it ended. `next` follows the offsets read.
    async fn read_from(
        &self,
        deliver_policy: consumer::DeliverPolicy,
        next: &mut Option<u64>,
        backoff: &mut Backoff,
        outage: &Outage,
    ) -> String {
        let stream = match self.js.get_stream(self.names.topics_stream()).await {
            Ok(stream) => stream,
            Err(e) => return e.to_string(),
        };
        let config = consumer::pull::OrderedConfig { deliver_policy, ..Default::default() };
        let consumer = match stream.create_consumer(config).await {
            Ok(consumer) => consumer,
            Err(e) => return e.to_string(),
        };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return e.to_string(),
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => return e.to_string(),
            };
            backoff.succeeded();
            outage.answered();
            let Ok(info) = message.info() else { continue };
            let offset = info.stream_sequence;
            *next = Some(offset + 1);
            let publication = match serde_json::from_slice::<TopicPublication>(&message.payload) {
                Ok(p) => p,
                Err(e) => {
                    // Only dispatchers write here: a bug, not a client's doing.
                    tracing::warn!(error = %e, offset, "undecodable topic message skipped");
                    continue;
                }
            };
            let topic = publication.topic.clone();
            let Some(frame) = frame(publication, offset, self.clock.now_ms()) else {
                self.metrics.notifications_expired.inc();
                continue;
            };
            let queued = self.index.fan_out(&topic, offset, &frame);
            self.metrics.topic_messages.inc();
            self.metrics.topic_fan_out.inc_by(queued as u64);
        }
        "the consumer's messages ended".into()
    }
}

/// What a recovery found: the topic's messages after `since`, oldest first, and whether they
/// are all of them.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) messages: Vec<(u64, TopicPublication)>,
    pub(crate) complete: bool,
}

/// Caps of one recovery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecoveryLimits {
    pub(crate) max_msgs: usize,
    pub(crate) max_bytes: usize,
}

/// Whether a recovery from `since` can be complete, given the stream's first and last
/// sequences now: not if messages after `since` have left the stream (`first > since + 1`), and
/// not for an offset the stream never gave (`since > last`: another stream, since re-created).
pub(crate) fn recoverable(since: u64, first: u64, last: u64) -> bool {
    since <= last && first <= since.saturating_add(1)
}

/// The messages of `topic` after `since`, from the topics stream: one ephemeral consumer
/// filtered to the topic's subject, one bounded fetch. Never the store, never per message.
pub(crate) async fn recover(
    js: &jetstream::Context,
    names: &Names,
    topic: &TopicName,
    since: u64,
    limits: RecoveryLimits,
) -> Result<Recovered, String> {
    let work = async {
        let mut stream = js.get_stream(names.topics_stream()).await.map_err(|e| e.to_string())?;
        let state = stream.info().await.map_err(|e| e.to_string())?.state.clone();
        let mut complete = recoverable(since, state.first_sequence, state.last_sequence);
        if since >= state.last_sequence {
            return Ok(Recovered { messages: Vec::new(), complete });
        }
        let config = consumer::pull::Config {
            filter_subject: names.topic_subject(topic),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: since + 1 },
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| e.to_string())?;
        let pending = consumer.cached_info().num_pending;
        let name = consumer.cached_info().name.clone();
        let mut batch = consumer
            .fetch()
            .max_messages(limits.max_msgs)
            .max_bytes(limits.max_bytes)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let Ok(info) = message.info() else { continue };
            let offset = info.stream_sequence;
            if let Ok(publication) = serde_json::from_slice::<TopicPublication>(&message.payload) {
                messages.push((offset, publication));
            }
        }
        // Fewer than were there when it began: a cap (count or bytes) cut it short.
        complete &= messages.len() as u64 >= pending;
        // Best effort: the inactive threshold removes it anyway.
        let _ = stream.delete_consumer(&name).await;
        Ok(Recovered { messages, complete })
    };
    tokio::time::timeout(RECOVERY_TIMEOUT, work).await.unwrap_or_else(|_| Err("timed out".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::UserId;
    use serde_json::value::RawValue;

    fn topic(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn publication(id: &str, t: &str) -> TopicPublication {
        TopicPublication {
            id: herald_proto::MessageId::new(id).unwrap(),
            topic: topic(t),
            payload: RawValue::from_string("{}".into()).unwrap(),
            published_at_ms: 1,
            expires_at_ms: 10_000,
        }
    }

    fn conn(id: &str) -> Arc<Connection> {
        Arc::new(Connection::new(ConnectionId::new(id).unwrap(), UserId::new("u").unwrap(), 8))
    }

    fn texts(conn: &Connection) -> Vec<String> {
        std::iter::from_fn(|| conn.outbox.try_pop()).filter_map(|o| o.text().map(str::to_owned)).collect()
    }

    #[test]
    fn a_message_reaches_the_subscribers_of_its_topic_only_and_once() {
        let index = TopicIndex::default();
        let (a, b) = (conn("a"), conn("b"));
        index.subscribe(&a, &topic("news"), false);
        index.subscribe(&b, &topic("sports"), false);
        let news = frame(publication("m1", "news"), 5, 0).unwrap();
        assert_eq!(index.fan_out(&topic("news"), 5, &news), 1);
        assert_eq!(index.fan_out(&topic("news"), 5, &news), 0, "the same offset again is left out");
        assert_eq!(texts(&a).len(), 1);
        assert!(texts(&b).is_empty());
        index.unsubscribe(&a.id, &topic("news"));
        assert_eq!(index.fan_out(&topic("news"), 6, &frame(publication("m2", "news"), 6, 0).unwrap()), 0);
        assert_eq!(index.subscribers(&topic("news")), 0);
        assert!(frame(publication("old", "news"), 7, 10_000).is_none(), "expired");
    }

    #[test]
    fn a_recovery_comes_before_the_live_messages_held_meanwhile_without_repeats() {
        let index = TopicIndex::default();
        let a = conn("a");
        let sub = index.subscribe(&a, &topic("news"), true);
        // Live messages during the recovery: 7 is also in what the recovery found.
        for offset in [7, 9] {
            index.fan_out(
                &topic("news"),
                offset,
                &frame(publication(&format!("m{offset}"), "news"), offset, 0).unwrap(),
            );
        }
        assert!(texts(&a).is_empty(), "held while recovering");
        let recovered: Vec<_> =
            [4, 7].iter().map(|&o| (o, frame(publication(&format!("m{o}"), "news"), o, 0).unwrap())).collect();
        let subscribed = ServerFrame::Subscribed { topic: topic("news"), recovered: Some(true) };
        sub.finish_recovery(answer(&subscribed).unwrap(), recovered);
        let got = texts(&a);
        assert!(got[0].contains(r#""type":"subscribed""#), "{got:?}");
        let offsets: Vec<&str> = got[1..]
            .iter()
            .map(|t| {
                if t.contains("\"m4\"") {
                    "4"
                } else if t.contains("\"m7\"") {
                    "7"
                } else {
                    "9"
                }
            })
            .collect();
        assert_eq!(offsets, ["4", "7", "9"]);
        index.fan_out(&topic("news"), 9, &frame(publication("m9", "news"), 9, 0).unwrap());
        assert!(texts(&a).is_empty(), "9 was queued already");
    }

    #[test]
    fn recovery_is_complete_only_from_an_offset_the_stream_still_follows() {
        assert!(recoverable(10, 1, 20));
        assert!(recoverable(10, 11, 20), "the next message is the first kept");
        assert!(!recoverable(10, 12, 20), "11 is gone");
        assert!(recoverable(20, 12, 20), "nothing missed");
        assert!(!recoverable(25, 1, 20), "an offset this stream never gave");
        assert!(recoverable(0, 1, 0), "an empty stream, from the start");
    }
}
