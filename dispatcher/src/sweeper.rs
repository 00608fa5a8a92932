//! The periodic sweep: marks expired receipts, and sends again what a connected client was sent
//! but did not ack within the ack timeout (the frame sat in a dead socket's buffer, the command
//! was lost in a NATS outage, the gateway died). One dispatcher sweeps per interval, chosen by a
//! Redis lock that any of them can take; no dispatcher is special.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use herald_proto::{Notification, UserId};
use herald_shared::naming::Names;
use herald_shared::now_ms;
use tokio_util::sync::CancellationToken;

use crate::metrics::DispatcherMetrics;
use crate::presence::PresenceReader;
use crate::routing::{self, Router};
use crate::store::{Store, StoreError};

/// Receipts looked at per sweep; a backlog takes several sweeps.
const SWEEP_BATCH: usize = 1000;

pub struct Sweeper {
    pub store: Store,
    pub presence: PresenceReader,
    pub router: Router,
    pub redis: Client,
    pub names: Names,
    pub dispatcher_id: String,
    pub interval: Duration,
    pub ack_timeout: Duration,
    pub metrics: std::sync::Arc<DispatcherMetrics>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub resent: usize,
    pub parked: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Presence(#[from] crate::presence::PresenceError),
    #[error("sweep lock: {0}")]
    Lock(#[from] fred::error::Error),
}

impl Sweeper {
    /// Sweeps every interval until `stop` fires. A failed sweep is logged and tried again at the
    /// next interval: the sweeper never ends on its own.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.sweep_if_leader().await {
                Ok(Some(report)) if report != SweepReport::default() => tracing::debug!(?report, "sweep"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweep failed; retrying next interval"),
            }
        }
    }

    /// Takes the sweep lock for one interval (it expires by itself), then sweeps.
    pub async fn sweep_if_leader(&self) -> Result<Option<SweepReport>, SweepError> {
        let taken: Option<String> = self
            .redis
            .set(
                self.names.sweep_lock_key(),
                self.dispatcher_id.as_str(),
                Some(Expiration::PX(self.interval.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if taken.is_none() {
            return Ok(None);
        }
        self.sweep(now_ms()).await.map(Some)
    }

    pub async fn sweep(&self, now: u64) -> Result<SweepReport, SweepError> {
        let mut report = SweepReport { expired: self.store.expire(now).await?, ..Default::default() };
        self.metrics.expired.inc_by(report.expired);
        let due = self.store.due_for_retry(now, SWEEP_BATCH).await?;
        if due.is_empty() {
            return Ok(report);
        }
        let mut users: Vec<&UserId> = due.iter().map(|r| &r.user).collect();
        users.sort_unstable();
        users.dedup();
        let presence = self.presence.lookup(&users, now).await?;
        let (online, offline): (Vec<_>, Vec<_>) = due.into_iter().partition(|r| presence.contains_key(&r.user));

        // Offline users get theirs when they connect; stop looking at them until then.
        let parked: Vec<_> = offline.iter().map(|r| r.id.clone()).collect();
        self.store.reschedule(&parked, None).await?;
        report.parked = parked.len();

        let sendable = self.store.with_payloads(online).await?;
        // One item per message, with all its due recipients: a fan-out resends as one command
        // per gateway, as on first delivery.
        let mut items: BTreeMap<&str, (&Notification, Vec<UserId>)> = BTreeMap::new();
        for s in &sendable {
            items
                .entry(s.notification.id.as_str())
                .or_insert_with(|| (&s.notification, Vec::new()))
                .1
                .push(s.user.clone());
        }
        let mut plan = routing::plan(
            items.values().map(|(n, u)| routing::Item { notification: n, users: u, traceparent: None }),
            &presence,
        );
        // Marked, so that gateways write them again to connections that were sent them already.
        for routed in plan.by_gateway.values_mut().flatten() {
            routed.resend = true;
        }
        let failed = self.router.send(plan).await;
        self.metrics.route_failures.inc_by(failed as u64);
        let resent: HashSet<_> = sendable.iter().map(|s| s.receipt_id.clone()).collect();
        let resent: Vec<_> = resent.into_iter().collect();
        self.store.reschedule(&resent, Some(now + self.ack_timeout.as_millis() as u64)).await?;
        report.resent = resent.len();
        self.metrics.resent.inc_by(resent.len() as u64);
        Ok(report)
    }
}
