//! The periodic sweep: marks expired receipts, and sends again what a connected client was sent
//! but did not ack within the ack timeout (the frame sat in a dead socket's buffer, the command
//! was lost in a NATS outage, the gateway died).
//!
//! Resending is divided into [`PARTITIONS`] by user. Every interval, each dispatcher asks which
//! partitions have receipts due, walks them from a random one and resends those whose lock it
//! takes (a Redis key that expires with the interval, so each partition is swept once per
//! interval by one dispatcher). Each partition's scan is bounded ([`SWEEP_BATCH`]), and while one
//! dispatcher is busy with a partition the others take the rest: resend capacity grows with the
//! number of dispatchers. Expiry is one update, done by whoever takes the expiry lock. No
//! dispatcher is special.
//!
//! A sweep is background work: on a slow store it is done less often ([`crate::duty`]), so
//! that the queries users wait for come first.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use herald_proto::{Notification, UserId};
use herald_shared::naming::Names;
use herald_shared::Clock;
use tokio_util::sync::CancellationToken;

use crate::duty;
use crate::metrics::DispatcherMetrics;
use crate::presence::PresenceReader;
use crate::routing::{self, Router};
use crate::store::{Store, StoreError, LEGACY, PARTITIONS};

/// Receipts looked at per partition and sweep; a backlog takes several sweeps.
const SWEEP_BATCH: usize = 1000;
/// A sweep's share of a dispatcher's time at most (one in this many). A sweep is store scans;
/// on a slow store, sweeps back to back would crowd out the queries a user waits for (a
/// replay, a job's writes), so the next waits until this many times the last one's duration.
pub const SWEEP_SHARE: u32 = 4;

/// Gateway events not yet taken by a dispatcher above which nothing is resent: acks waiting in
/// that queue would make the sweep resend what clients have already acked, adding load to a
/// store that is behind already. Resends resume once the events catch up.
pub const EVENTS_LAG_LIMIT: u64 = 5_000;

pub struct Sweeper {
    pub store: Store,
    pub presence: PresenceReader,
    pub router: Router,
    pub redis: Client,
    pub names: Names,
    pub dispatcher_id: String,
    pub interval: Duration,
    pub ack_timeout: Duration,
    /// How far behind the events pipeline is.
    pub events: EventsLag,
    pub metrics: std::sync::Arc<DispatcherMetrics>,
    /// This host's wall clock, against which retry times and expiries are judged.
    pub clock: Clock,
}

/// Reads the lag of the dispatchers' events consumer.
pub struct EventsLag {
    pub js: async_nats::jetstream::Context,
    pub ack_wait: Duration,
}

impl EventsLag {
    /// Events waiting for a dispatcher; None when JetStream cannot say (the sweep then goes on).
    async fn pending(&self, names: &Names) -> Option<u64> {
        crate::pull::num_pending(&self.js, &names.events_stream(), names.events_consumer(), self.ack_wait).await
    }
}

/// Whether to resend now, given the events waiting: not while acks are this far behind.
pub fn resend_allowed(events_pending: Option<u64>) -> bool {
    events_pending.is_none_or(|n| n <= EVENTS_LAG_LIMIT)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub resent: usize,
    pub parked: usize,
    /// Partitions this dispatcher resent in this interval.
    pub partitions: usize,
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
    /// Sweeps every interval, or less often on a slow store ([`duty::paced`]), until `stop`
    /// fires. A failed sweep is logged and tried again at the next: the sweeper never ends on its
    /// own.
    pub async fn run(self, stop: CancellationToken) {
        // A sweep fails while the store or Redis is away; that is logged once per outage.
        let outage = herald_shared::outage::Outage::new("sweep (mongodb, redis)");
        let (this, outage) = (&self, &outage);
        duty::paced(self.interval, self.interval, SWEEP_SHARE, &stop, move || async move {
            let started = std::time::Instant::now();
            let result = this.sweep_once().await;
            this.metrics.sweep_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(report) => {
                    outage.answered();
                    if report != SweepReport::default() {
                        tracing::debug!(?report, "sweep");
                    }
                }
                Err(e) => outage.failed(&e),
            }
        })
        .await
    }

    /// One interval's share of the sweep: expiry if this dispatcher takes that lock, then every
    /// partition whose lock it takes, from a random one.
    pub async fn sweep_once(&self) -> Result<SweepReport, SweepError> {
        let now = self.clock.now_ms();
        let mut report = SweepReport::default();
        if self.take(self.names.sweep_lock_key()).await? {
            report.expired = self.store.expire(now).await?;
            self.metrics.expired.inc_by(report.expired);
        }
        let lag = self.events.pending(&self.names).await;
        if !resend_allowed(lag) {
            self.metrics.resends_deferred.inc();
            tracing::warn!(events_pending = lag, "acks are behind; resends wait for them to catch up");
            return Ok(report);
        }
        let mut due = self.store.due_partitions(now).await?;
        due.push(LEGACY);
        // From a random place, so that dispatchers ticking together start on different ones.
        let start = rand::random_range(0..due.len());
        due.rotate_left(start);
        for partition in due {
            if !self.take(self.names.resend_lock_key(partition)).await? {
                continue;
            }
            let part = self.resend(partition, now).await?;
            report.resent += part.resent;
            report.parked += part.parked;
            report.partitions += 1;
        }
        Ok(report)
    }

    /// Takes a lock for one interval; it expires by itself. False if another dispatcher holds it.
    async fn take(&self, key: String) -> Result<bool, SweepError> {
        let taken: Option<String> = self
            .redis
            .set(
                key,
                self.dispatcher_id.as_str(),
                Some(Expiration::PX(self.interval.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(taken.is_some())
    }

    /// The whole sweep in one call, every partition, ignoring locks (for tests).
    pub async fn sweep(&self, now: u64) -> Result<SweepReport, SweepError> {
        let mut report = SweepReport { expired: self.store.expire(now).await?, ..Default::default() };
        for partition in walk(0) {
            let part = self.resend(partition, now).await?;
            report.resent += part.resent;
            report.parked += part.parked;
            report.partitions += 1;
        }
        Ok(report)
    }

    /// Resends one partition's receipts whose ack timeout passed.
    async fn resend(&self, partition: u16, now: u64) -> Result<SweepReport, SweepError> {
        let mut report = SweepReport::default();
        let due = self.store.due_for_retry(partition, now, SWEEP_BATCH).await?;
        if due.is_empty() {
            return Ok(report);
        }
        let mut users: Vec<&UserId> = due.iter().map(|r| &r.user).collect();
        users.sort_unstable();
        users.dedup();
        let presence = self.presence.lookup(&users).await?;
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

/// Every partition once (the legacy one included), starting at `start`.
fn walk(start: u16) -> impl Iterator<Item = u16> {
    (0..=LEGACY).map(move |k| (start + k) % (PARTITIONS + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_visits_every_partition_once_from_anywhere() {
        for start in [0, 5, LEGACY] {
            let mut seen: Vec<u16> = walk(start).collect();
            assert_eq!(seen[0], start);
            seen.sort_unstable();
            assert_eq!(seen, (0..=LEGACY).collect::<Vec<_>>());
        }
    }

    #[test]
    fn resends_wait_while_acks_are_behind() {
        assert!(resend_allowed(None) && resend_allowed(Some(0)) && resend_allowed(Some(EVENTS_LAG_LIMIT)));
        assert!(!resend_allowed(Some(EVENTS_LAG_LIMIT + 1)));
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        use crate::store::partition_of;
        let user = |s: &str| UserId::new(s).unwrap();
        assert_eq!(partition_of(&user("alice")), partition_of(&user("alice")));
        let used: HashSet<u16> = (0..200).map(|i| partition_of(&user(&format!("user-{i}")))).collect();
        assert_eq!(used.len(), PARTITIONS as usize, "200 users cover every partition");
        assert!(used.iter().all(|p| *p < PARTITIONS));
    }
}
