//! What sessions tell the dispatchers: client acknowledgements, and requests for the next page
//! of a connection's replay. Sessions queue them; one task batches the acks onto the durable
//! events stream and retries every message until JetStream has it, so an ack (or a page request)
//! is never lost while no dispatcher runs.

use std::time::Duration;

use async_nats::jetstream;
use std::collections::{HashMap, HashSet};

use herald_proto::{AckRecord, Event, GatewayId, MessageId, More, TopicAckCount, TopicName, UserId};
use herald_shared::naming::Names;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;

/// Records per stream message at most; also bounded by [`MAX_BATCH_BYTES`].
const BATCH: usize = 1024;
/// Stays well under NATS's default 1 MiB payload limit.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Capacity of the sessions' queue: a NATS outage of several seconds at full rate fits in it.
pub(crate) const QUEUE: usize = 65_536;

/// One thing a session has to tell the dispatchers.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// What one ack or read frame acknowledged.
    Ack(AckRecord),
    /// A connection wants the next page of its replay.
    More(More),
    /// First acks of topic messages by one connection of `user`: counted, not recorded.
    TopicAcks { user: UserId, acks: Vec<(MessageId, TopicName)> },
}

pub(crate) struct AckPublisher {
    js: jetstream::Context,
    ack_subject: String,
    more_subject: String,
    topic_ack_subject: String,
    gateway_id: GatewayId,
    rx: mpsc::Receiver<Outgoing>,
    metrics: std::sync::Arc<GatewayMetrics>,
    /// The events stream not taking what this gateway publishes, logged once per outage.
    outage: herald_shared::outage::Outage,
}

impl AckPublisher {
    pub(crate) fn new(
        js: jetstream::Context,
        names: &Names,
        gateway_id: &GatewayId,
        metrics: std::sync::Arc<GatewayMetrics>,
    ) -> (Self, mpsc::Sender<Outgoing>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let ack_subject = names.ack_events_subject(gateway_id.as_str());
        let more_subject = names.more_events_subject(gateway_id.as_str());
        let topic_ack_subject = names.topic_ack_events_subject(gateway_id.as_str());
        let outage = herald_shared::outage::Outage::new("nats: events stream (acks)");
        let gateway_id = gateway_id.clone();
        (Self { js, ack_subject, more_subject, topic_ack_subject, gateway_id, rx, metrics, outage }, tx)
    }

    /// Publishes until `stop` fires, then publishes what is still queued, giving up on a message
    /// only if `deadline` passes during shutdown (those acks are re-earned: the messages stay
    /// pending and are delivered and acked again).
    pub(crate) async fn run(mut self, stop: CancellationToken, drain_grace: Duration) {
        let mut queued = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                biased;
                n = self.rx.recv_many(&mut queued, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    self.publish(&mut queued, &stop, None).await;
                }
                _ = stop.cancelled() => break,
            }
        }
        let deadline = tokio::time::Instant::now() + drain_grace;
        while let Ok(item) = self.rx.try_recv() {
            queued.push(item);
        }
        self.publish(&mut queued, &stop, Some(deadline)).await;
    }

    /// Acks first, batched; then the page requests, one message each (a dispatcher answers
    /// each with a page, and a page should not carry what these acks delivered).
    async fn publish(
        &self,
        queued: &mut Vec<Outgoing>,
        stop: &CancellationToken,
        deadline: Option<tokio::time::Instant>,
    ) {
        let mut records = Vec::new();
        let mut mores = Vec::new();
        let mut topic_acks = Vec::new();
        for item in queued.drain(..) {
            match item {
                Outgoing::Ack(record) => records.push(record),
                Outgoing::More(more) => mores.push(more),
                Outgoing::TopicAcks { user, acks } => topic_acks.extend(acks.into_iter().map(|a| (user.clone(), a))),
            }
        }
        // Counted per message over what this batch holds: one report, however many acks.
        let counts = count_topic_acks(topic_acks, &self.gateway_id, herald_shared::now_ms());
        for chunk in counts.chunks(TOPIC_COUNTS_PER_EVENT) {
            let Ok(body) = serde_json::to_vec(&Event::TopicAcks(chunk.to_vec())) else { continue };
            if !self.deliver(&self.topic_ack_subject, "publish_topic_acks", body, stop, deadline).await {
                tracing::warn!("drain deadline passed with topic ack counts unpublished; the counts are short");
                return;
            }
        }
        for chunk in chunks(records) {
            self.metrics.ack_batch_size.observe(chunk.len() as f64);
            let Ok(body) = serde_json::to_vec(&Event::Acks(chunk)) else { continue };
            if !self.deliver(&self.ack_subject, "publish_acks", body, stop, deadline).await {
                tracing::error!("drain deadline passed with acks unpublished; their messages stay pending");
                return;
            }
        }
        for more in mores {
            let Ok(body) = serde_json::to_vec(&Event::More(more)) else { continue };
            if !self.deliver(&self.more_subject, "publish_more", body, stop, deadline).await {
                return;
            }
        }
    }

    /// Publishes one message, retrying with backoff until JetStream has it; false if `deadline`
    /// passed first.
    async fn deliver(
        &self,
        subject: &str,
        op: &'static str,
        body: Vec<u8>,
        stop: &CancellationToken,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.send(subject, op, body.clone()).await {
                Ok(()) => {
                    self.outage.answered();
                    return true;
                }
                Err(e) => self.outage.failed(&e),
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return false;
            }
            let pause = tokio::time::sleep(backoff);
            if deadline.is_none() {
                // While running, a shutdown request ends the pause early so the final flush
                // (with its deadline) takes over.
                tokio::select! { _ = pause => {}, _ = stop.cancelled() => {} }
            } else {
                pause.await;
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn send(&self, subject: &str, op: &'static str, body: Vec<u8>) -> Result<(), String> {
        let publish = async {
            let ack = self.js.publish(subject.to_owned(), body.into()).await.map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        };
        self.metrics.dependencies.time("nats", op, publish).await
    }
}

/// Topic ack counts per stream message: each is under 400 bytes, so this stays far below
/// [`MAX_BATCH_BYTES`].
const TOPIC_COUNTS_PER_EVENT: usize = 1024;

/// One count per topic message acked in a batch: how many acks (one per connection: a session
/// passes on only a connection's first ack of a message), and how many distinct users.
fn count_topic_acks(
    acks: Vec<(UserId, (MessageId, TopicName))>,
    gateway_id: &GatewayId,
    at_ms: u64,
) -> Vec<TopicAckCount> {
    let mut by_message: HashMap<MessageId, (TopicName, u64, HashSet<UserId>)> = HashMap::new();
    for (user, (id, topic)) in acks {
        let entry = by_message.entry(id).or_insert_with(|| (topic, 0, HashSet::new()));
        entry.1 += 1;
        entry.2.insert(user);
    }
    let mut counts: Vec<TopicAckCount> = by_message
        .into_iter()
        .map(|(id, (topic, connections, users))| TopicAckCount {
            id,
            topic,
            gateway_id: gateway_id.clone(),
            connections,
            users: users.len() as u64,
            at_ms,
        })
        .collect();
    counts.sort_by(|a, b| a.id.cmp(&b.id));
    counts
}

/// Splits records into stream messages under [`MAX_BATCH_BYTES`].
fn chunks(records: Vec<AckRecord>) -> Vec<Vec<AckRecord>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for record in records {
        let estimate = 160
            + record.user.as_str().len()
            + record.ids.iter().chain(&record.read_unsent).map(|id| id.as_str().len() + 3).sum::<usize>();
        if !current.is_empty() && size + estimate > MAX_BATCH_BYTES {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += estimate;
        current.push(record);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::AckKind;

    #[test]
    fn topic_acks_are_counted_by_connection_and_distinct_user() {
        let user = |u: &str| herald_proto::UserId::new(u).unwrap();
        let ack = |u: &str, id: &str| (user(u), (MessageId::new(id).unwrap(), TopicName::new("news").unwrap()));
        let gw = GatewayId::new("g").unwrap();
        // alice on two connections, bob on one, for m1; bob for m2.
        let counts =
            count_topic_acks(vec![ack("alice", "m1"), ack("alice", "m1"), ack("bob", "m1"), ack("bob", "m2")], &gw, 5);
        let got: Vec<(&str, u64, u64)> = counts.iter().map(|c| (c.id.as_str(), c.connections, c.users)).collect();
        assert_eq!(got, [("m1", 3, 2), ("m2", 1, 1)]);
        assert!(count_topic_acks(Vec::new(), &gw, 5).is_empty());
    }

    #[test]
    fn big_batches_are_split_under_the_payload_limit() {
        let record = |n: usize| AckRecord {
            user: herald_proto::UserId::new("u").unwrap(),
            connection_id: herald_proto::ConnectionId::new("c").unwrap(),
            gateway_id: herald_proto::GatewayId::new("g").unwrap(),
            kind: AckKind::Delivered,
            ids: (0..n).map(|i| herald_proto::MessageId::new(format!("{i:0>100}")).unwrap()).collect(),
            read_unsent: Vec::new(),
            at_ms: 1,
            traceparent: None,
        };
        let parts = chunks((0..20).map(|_| record(1000)).collect());
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(serde_json::to_vec(&Event::Acks(part.clone())).unwrap().len() <= 1024 * 1024);
        }
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 20);
    }
}
