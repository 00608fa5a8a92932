//! Events from gateways: client acks (written to receipts) and "came online" announcements
//! (answered by replaying that user's pending messages to the new connection, oldest first).
//!
//! Events are acknowledged to JetStream only once applied; while the store is unreachable the
//! batch is held and retried, so no ack a client sent is lost.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use herald_proto::{AckRecord, Event, GatewayCommand, Online, UserId};
use herald_shared::naming::Names;
use herald_shared::now_ms;
use tokio_util::sync::CancellationToken;

use crate::acks::{self, AckUpdate};
use crate::metrics::DispatcherMetrics;
use crate::pull::{self, sleep_or_stop};
use crate::routing::{self, Router};
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct EventPipeline {
    pub js: jetstream::Context,
    pub names: Names,
    pub store: Store,
    pub router: Router,
    pub ack_timeout: Duration,
    /// Most pending messages replayed to a connection at once; the rest follow through the
    /// ack-timeout sweep. Kept below a gateway's outbound queue so a replay never overflows it.
    pub replay_page: usize,
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
        pull::run(&self.js, &stream, self.names.events_consumer(), self.ack_wait, self.batching, &stop, |batch| {
            self.process(batch, &stop)
        })
        .await;
    }

    /// Applies one batch: acks first, then replays, each acknowledged to JetStream as soon as it
    /// is applied, so that an ack never waits behind a slow replay query. Neither is ever
    /// dropped for a store error: a transient one is waited out, and a statement the store
    /// refuses for good is dropped alone by the store (see `Store::apply_acks`).
    async fn process(&self, messages: Vec<Message>, stop: &CancellationToken) {
        let mut acks: Vec<AckRecord> = Vec::new();
        let mut onlines: Vec<Online> = Vec::new();
        let (mut ack_messages, mut online_messages) = (Vec::new(), Vec::new());
        for message in messages {
            match serde_json::from_slice::<Event>(&message.payload) {
                Ok(Event::Acks(records)) => {
                    self.metrics.events.with_label_values(&["acks"]).inc();
                    acks.extend(records);
                    ack_messages.push(message);
                }
                Ok(Event::Online(online)) => {
                    self.metrics.events.with_label_values(&["online"]).inc();
                    onlines.push(online);
                    online_messages.push(message);
                }
                Err(e) => {
                    // Only a gateway writes here; this is a bug, and retrying cannot fix it.
                    self.metrics.events.with_label_values(&["invalid"]).inc();
                    tracing::error!(error = %e, subject = %message.subject, "undecodable event dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        if !ack_messages.is_empty() {
            let updates = acks::plan(&acks);
            if !self.until_applied(&ack_messages, stop, || self.apply_acks(&acks, &updates)).await {
                // Shutting down: the online events were not tried; another dispatcher has them now.
                for message in &online_messages {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                return;
            }
        }
        if !online_messages.is_empty() {
            self.until_applied(&online_messages, stop, || self.replay(&onlines)).await;
        }
    }

    /// Runs `apply` until it succeeds, then acknowledges `messages`. Store errors keep the
    /// messages (their ack deadline extended) and retry with backoff; on shutdown they are
    /// handed back. Returns false if it gave up for shutdown.
    async fn until_applied<F, Fut>(&self, messages: &[Message], stop: &CancellationToken, mut apply: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, events = messages.len(), "events not applied; holding them and retrying");
                    for message in messages {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    if !sleep_or_stop(&mut backoff, stop).await {
                        // Shutting down: let another dispatcher have them now.
                        for message in messages {
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                        }
                        return false;
                    }
                }
            }
        }
        for message in messages {
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "event ack failed; it will be applied again (idempotent)");
            }
        }
        true
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

    /// Sends each new connection its user's pending messages: one query for all users of the
    /// batch, one for the payloads, one to push their retry deadlines, and one to make whatever
    /// a page did not carry due for the sweep.
    async fn replay(&self, onlines: &[Online]) -> Result<(), StoreError> {
        let mut users: Vec<&UserId> = onlines.iter().map(|o| &o.user).collect();
        users.sort_unstable();
        users.dedup();
        let now = now_ms();
        let next_retry = now + self.ack_timeout.as_millis() as u64;
        let pending = self.store.pending_for(&users, self.replay_page, now).await?;
        self.store.unpark(&users, next_retry).await?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut sent = Vec::new();
        for online in onlines {
            let mine: Vec<_> = pending.iter().filter(|s| s.user == online.user).collect();
            if mine.is_empty() {
                continue;
            }
            let notifications = mine.iter().map(|s| s.notification.clone()).collect();
            // Split under NATS's payload limit; a command that fails leaves its receipts pending.
            let mut published = 0;
            for command in routing::replay_commands(&online.user, &online.connection_id, notifications) {
                let GatewayCommand::Replay(replay) = &command else { continue };
                let count = replay.notifications.len();
                if !self.router.publish(&online.gateway_id, &command).await {
                    self.metrics.route_failures.inc();
                    break;
                }
                published += count;
            }
            self.metrics.replayed.inc_by(published as u64);
            sent.extend(mine.iter().take(published).map(|s| s.receipt_id.clone()));
        }
        sent.sort_unstable();
        sent.dedup();
        self.store.reschedule(&sent, Some(next_retry)).await
    }
}
