//! What sessions tell the dispatchers: client acknowledgements, and requests for the next page
//! of a connection's replay. Sessions queue them; one task batches the acks onto the durable
//! events stream and retries every message until JetStream has it, so an ack (or a page request)
//! is never lost while no dispatcher runs.
//!
//! Acks are gathered for up to a linger before they go ([`gather`]): each stream message costs
//! this gateway a publish and its reply, NATS a stored message, and a dispatcher a delivery, an
//! ack and a share of a store round trip, whatever it carries. An ack is not on a notification's
//! path (the client has it already), so the linger delays only the receipt's `delivered`, which
//! the dispatcher's own event linger delays anyway. A page request does not wait: a replay
//! waits on it.

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
    /// How long the first ack of a batch waits for others (`HERALD_ACK_LINGER_MS`).
    linger: Duration,
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
        linger: Duration,
        metrics: std::sync::Arc<GatewayMetrics>,
    ) -> (Self, mpsc::Sender<Outgoing>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let ack_subject = names.ack_events_subject(gateway_id.as_str());
        let more_subject = names.more_events_subject(gateway_id.as_str());
        let topic_ack_subject = names.topic_ack_events_subject(gateway_id.as_str());
        let outage = herald_shared::outage::Outage::new("nats: events stream (acks)");
        let gateway_id = gateway_id.clone();
        (Self { js, linger, ack_subject, more_subject, topic_ack_subject, gateway_id, rx, metrics, outage }, tx)
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
                    gather(&mut self.rx, &mut queued, self.linger, &stop).await;
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

/// Adds to `queued` what arrives within `linger`, until a batch is full, a page request is
/// queued, `stop` fires or the sessions are gone; returns at once if any of that is already so.
/// What is gathered goes out together, in the order queued.
async fn gather(
    rx: &mut mpsc::Receiver<Outgoing>,
    queued: &mut Vec<Outgoing>,
    linger: Duration,
    stop: &CancellationToken,
) {
    if linger.is_zero() {
        return;
    }
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    let mut checked = 0;
    loop {
        if ready(&queued[checked..], queued.len()) {
            return;
        }
        checked = queued.len();
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = &mut deadline => return,
            n = rx.recv_many(queued, BATCH - queued.len()) => if n == 0 { return },
        }
    }
}

/// Whether a batch of `len` items, the last of them `newest`, should go without waiting for
/// more: it is full, or it holds a page request, which a replay is waiting on.
fn ready(newest: &[Outgoing], len: usize) -> bool {
    len >= BATCH || newest.iter().any(|item| matches!(item, Outgoing::More(_)))
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

    fn ack(n: usize) -> Outgoing {
        Outgoing::Ack(AckRecord {
            user: herald_proto::UserId::new("u").unwrap(),
            connection_id: herald_proto::ConnectionId::new("c").unwrap(),
            gateway_id: GatewayId::new("g").unwrap(),
            kind: AckKind::Delivered,
            ids: vec![MessageId::new(format!("m{n}")).unwrap()],
            read_unsent: Vec::new(),
            at_ms: 1,
            traceparent: None,
        })
    }

    fn more() -> Outgoing {
        Outgoing::More(More {
            user: herald_proto::UserId::new("u").unwrap(),
            connection_id: herald_proto::ConnectionId::new("c").unwrap(),
            gateway_id: GatewayId::new("g").unwrap(),
            after_seq: 7,
            at_ms: 1,
        })
    }

    /// The first ack of a batch, as `run` has it when it gathers.
    async fn first(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<Outgoing> {
        let mut queued = Vec::new();
        rx.recv_many(&mut queued, BATCH).await;
        queued
    }

    /// Guards each gather against hanging: a stop condition missed would wait for an hour.
    const HANG: Duration = Duration::from_secs(30);
    const HOUR: Duration = Duration::from_secs(3600);

    fn described(queued: &[Outgoing]) -> Vec<String> {
        queued
            .iter()
            .map(|item| match item {
                Outgoing::Ack(record) => record.ids[0].to_string(),
                Outgoing::More(more) => format!("more>{}", more.after_seq),
                Outgoing::TopicAcks { .. } => "topic".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn acks_gather_until_a_page_request_which_goes_at_once_behind_them() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tx.send(ack(1)).await.unwrap();
        let mut queued = first(&mut rx).await;
        let sender = tokio::spawn(async move {
            tx.send(ack(2)).await.unwrap();
            tx.send(more()).await.unwrap();
            tx
        });
        tokio::time::timeout(HANG, gather(&mut rx, &mut queued, HOUR, &CancellationToken::new())).await.unwrap();
        let _tx = sender.await.unwrap();
        assert_eq!(described(&queued), ["m1", "m2", "more>7"]);
    }

    #[tokio::test]
    async fn a_gather_stops_at_a_full_batch_and_leaves_the_rest_queued() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        for n in 0..BATCH + 5 {
            tx.send(ack(n)).await.unwrap();
        }
        let mut queued = vec![];
        rx.recv_many(&mut queued, 1).await;
        tokio::time::timeout(HANG, gather(&mut rx, &mut queued, HOUR, &CancellationToken::new())).await.unwrap();
        assert_eq!(queued.len(), BATCH);
        assert_eq!(rx.len(), 5, "the rest waits for the next batch");
    }

    #[tokio::test]
    async fn a_gather_ends_with_its_linger_a_stop_or_the_sessions_gone() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tx.send(ack(1)).await.unwrap();
        let mut queued = first(&mut rx).await;
        let linger = Duration::from_millis(20);
        tokio::time::timeout(HANG, gather(&mut rx, &mut queued, linger, &CancellationToken::new())).await.unwrap();
        assert_eq!(described(&queued), ["m1"], "the linger passed with nothing more");

        let stop = CancellationToken::new();
        stop.cancel();
        tokio::time::timeout(HANG, gather(&mut rx, &mut queued, HOUR, &stop)).await.unwrap();
        drop(tx);
        tokio::time::timeout(HANG, gather(&mut rx, &mut queued, HOUR, &CancellationToken::new())).await.unwrap();
        assert_eq!(described(&queued), ["m1"]);
    }

    #[tokio::test]
    async fn no_linger_sends_what_was_taken() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tx.send(ack(1)).await.unwrap();
        let mut queued = vec![];
        rx.recv_many(&mut queued, 1).await;
        tx.send(ack(2)).await.unwrap();
        gather(&mut rx, &mut queued, Duration::ZERO, &CancellationToken::new()).await;
        assert_eq!(described(&queued), ["m1"], "m2 goes in the next batch");
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
