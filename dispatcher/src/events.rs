//! Events from gateways: client acks (written to receipts), and "came online" and "next page"
//! requests (answered by [`crate::replay`] with a page of that user's pending messages, oldest
//! first).
//!
//! Events are acknowledged to JetStream only once applied; while the store is unreachable the
//! batch is held and retried, so no ack a client sent is lost.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use herald_proto::{AckRecord, Event, TopicAckCount};
use herald_shared::naming::Names;
use tokio_util::sync::CancellationToken;

use crate::acks::{self, AckUpdate};
use crate::metrics::DispatcherMetrics;
use crate::pull::{self, sleep_or_stop};
use crate::replay::{Replayer, Request};
use crate::store::{Store, StoreError};

/// The store refusing events, logged once per outage (the task retries every batch).
static STORE_OUTAGE: herald_shared::outage::Outage = herald_shared::outage::Outage::new("mongodb: events");

#[derive(Clone)]
pub struct EventPipeline {
    pub js: jetstream::Context,
    pub names: Names,
    pub store: Store,
    /// Answers `online` and `more` events with replay pages.
    pub replayer: Replayer,
    /// Events applied together: one receipt-update round trip per batch.
    pub batching: pull::Batching,
    /// As for jobs: what a crashed dispatcher delays its unapplied events by.
    pub ack_wait: Duration,
    pub metrics: std::sync::Arc<DispatcherMetrics>,
}

impl EventPipeline {
    /// Pulls and applies events until `stop` fires; the batch in hand is finished first.
    pub async fn run(self, stop: CancellationToken) {
        let stream = self.names.events_stream();
        pull::run(
            &self.js,
            &stream,
            self.names.events_consumer(),
            self.ack_wait,
            self.batching,
            &stop,
            |batch, _waits| self.process(batch, &stop),
        )
        .await;
    }

    /// Applies one batch: its acks and its page requests side by side, each acknowledged to
    /// JetStream as soon as it is applied, so that neither waits behind the other (a storm of
    /// acks on a slow store must not hold up the next page of a replay, nor a slow replay query
    /// the acks). A page may then carry a receipt whose ack is being applied; it went to the
    /// connection that acked it, which leaves the repeat out. Neither is ever dropped for a
    /// store error: a transient one is waited out, and a statement the store refuses for good
    /// is dropped alone by the store (see `Store::apply_acks`).
    async fn process(&self, messages: Vec<Message>, stop: &CancellationToken) {
        let mut acks: Vec<AckRecord> = Vec::new();
        let mut pages: Vec<Request> = Vec::new();
        let mut topic_acks: Vec<TopicAckCount> = Vec::new();
        let (mut ack_messages, mut page_messages, mut topic_messages) = (Vec::new(), Vec::new(), Vec::new());
        for message in messages {
            match serde_json::from_slice::<Event>(&message.payload) {
                Ok(Event::Acks(records)) => {
                    self.metrics.events.with_label_values(&["acks"]).inc();
                    acks.extend(records);
                    ack_messages.push(message);
                }
                Ok(Event::Online(online)) => {
                    self.metrics.events.with_label_values(&["online"]).inc();
                    pages.push(online.into());
                    page_messages.push(message);
                }
                Ok(Event::More(more)) => {
                    self.metrics.events.with_label_values(&["more"]).inc();
                    pages.push(more.into());
                    page_messages.push(message);
                }
                Ok(Event::TopicAcks(counts)) => {
                    self.metrics.events.with_label_values(&["topic_acks"]).inc();
                    topic_acks.extend(counts);
                    topic_messages.push(message);
                }
                Err(e) => {
                    // Only a gateway writes here; this is a bug, and retrying cannot fix it.
                    self.metrics.events.with_label_values(&["invalid"]).inc();
                    tracing::error!(error = %e, subject = %message.subject, "undecodable event dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        let apply_acks = async {
            if !ack_messages.is_empty() {
                let updates = acks::plan(&acks);
                self.until_applied(&ack_messages, stop, || self.apply_acks(&acks, &updates)).await;
            }
        };
        let answer_pages = async {
            if !page_messages.is_empty() {
                self.until_applied(&page_messages, stop, || self.replayer.answer(&pages)).await;
            }
        };
        let count_topic_acks = async {
            if !topic_messages.is_empty() {
                self.until_applied(&topic_messages, stop, || self.apply_topic_acks(&topic_acks)).await;
            }
        };
        tokio::join!(apply_acks, answer_pages, count_topic_acks);
    }

    /// Runs `apply` until it succeeds, then acknowledges `messages`. Store errors keep the
    /// messages (their ack deadline extended) and retry with backoff; on shutdown they are
    /// handed back.
    async fn until_applied<F, Fut>(&self, messages: &[Message], stop: &CancellationToken, mut apply: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply().await {
                Ok(()) => {
                    STORE_OUTAGE.answered();
                    break;
                }
                Err(e) => {
                    STORE_OUTAGE.failed(&format_args!("{e} (holding {} events)", messages.len()));
                    for message in messages {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    if !sleep_or_stop(&mut backoff, stop).await {
                        // Shutting down: let another dispatcher have them now.
                        for message in messages {
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                        }
                        return;
                    }
                }
            }
        }
        for message in messages {
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "event ack failed; it will be applied again (idempotent)");
            }
        }
    }

    /// Adds the gateways' counts of topic acks to the messages' aggregate receipts.
    async fn apply_topic_acks(&self, counts: &[TopicAckCount]) -> Result<(), StoreError> {
        let modified = self.store.apply_topic_acks(counts).await?;
        self.metrics.receipt_writes.with_label_values(&["topic_ack"]).inc_by(modified);
        Ok(())
    }

    async fn apply_acks(&self, records: &[AckRecord], updates: &[AckUpdate]) -> Result<(), StoreError> {
        // A span per traced ack, open while its receipt is written: the last hop of the
        // notification's trace.
        let _spans: Vec<tracing::Span> = records
            .iter()
            .filter(|a| a.traceparent.is_some())
            .map(|a| {
                let span = tracing::info_span!("herald.receipt", ids = a.ids.len());
                herald_shared::telemetry::continue_from(&span, a.traceparent.as_deref());
                span
            })
            .collect();
        let outcome = self.store.apply_acks(updates).await?;
        self.metrics.receipt_writes.with_label_values(&["ack"]).inc_by(outcome.modified);
        self.metrics.acks_refused.inc_by(outcome.dropped);
        self.metrics.store_batch_size.with_label_values(&["ack"]).observe(records.len() as f64);
        tracing::debug!(records = records.len(), changed = outcome.modified, dropped = outcome.dropped, "acks applied");
        Ok(())
    }
}
