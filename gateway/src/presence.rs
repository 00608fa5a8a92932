//! This gateway's presence in Redis, and the "came online" announcements that trigger replay.
//!
//! One task owns all of it. Sessions hand it registrations and removals through a queue; it
//! applies them in batches (one round trip, and one write, per batch), then announces each new
//! connection on the events stream. Failed batches are kept and retried on the next tick.
//!
//! Liveness is one key per gateway (`Names::gateway_key`), set with a Redis expiry of the
//! presence TTL every third of it and with every batch. Dispatchers route to a gateway while its
//! key exists: the expiry runs on Redis's clock, so no decision compares this host's clock with
//! another's.
//!
//! Presence heals itself. Redis can lose part of it while this gateway and its clients are fine:
//! everything (a restart or a flush), one user's hash (an eviction, a delete), the latest writes
//! (a replica promoted without them), or our entries because our key lapsed while we were
//! stalled (dispatchers prune entries of gateways whose key is gone). Each heartbeat checks, in
//! its one round trip:
//! - the liveness key's value, the number of presence batches this gateway wrote: gone or
//!   different, Redis lost some of our writes, and every connection is written again;
//! - `EXISTS` over the hashes of all our users, [`CHECK_CHUNK`] keys per command (on a Redis
//!   Cluster, keys of one slot per command: `herald_shared::slots`): a count short of the number
//!   asked means a hash is gone, and that group's connections are written again.
//!
//! Each entry's value is our id and a generation (`naming::presence_entry`), bumped whenever we
//! write every connection again. A dispatcher prunes a dead gateway's entry only if it still
//! holds the value read before the dispatcher found our key gone, so an entry we wrote again
//! after coming back is never deleted by a prune decided before: a prune that lands first is
//! undone by our rewrite (and the connection announced, `HSET` adding the field), one that lands
//! later finds another value. Every write of our key reads what it held (`SET ... GET`), so a
//! lapse is always seen, and the rewrite after it always follows a write that made the key exist.
//!
//! A connection written again is announced (so its pending and parked messages are replayed)
//! only if Redis did not have it, which `HSET` says by adding the field.
//!
//! Bound: a connection Redis loses is back within one heartbeat interval (a third of the TTL,
//! 3.3 s by default) plus a round trip, while Redis answers; the docs state two intervals, for
//! margin. Cost: one `SET` per heartbeat and one `EXISTS` per 1,000 users here, whatever the
//! message rate (3.3 commands/s for 10,000 idle users at the default TTL). Not detected: a field
//! deleted by hand from a hash that also holds other connections; nothing in Herald deletes
//! that way (dispatchers prune only a dead gateway's entries, and only while its key is gone).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fred::prelude::*;
use fred::types::Expiration;
use futures::FutureExt as _;
use herald_proto::{ConnectionId, Event, GatewayId, Online, UserId};
use herald_shared::naming::{self, Names};
use herald_shared::outage::Outage;
use herald_shared::Clock;
use herald_shared::{redis_batch, slots};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::registry::{Connection, Registry};

/// Largest number of queued operations taken from the queue at once.
const BATCH: usize = 1024;
/// Keys per `EXISTS` of the heartbeat's check: what one command costs Redis stays small.
const CHECK_CHUNK: usize = 1000;

/// One user's registered connections here.
type UserConnections = (UserId, Vec<Arc<Connection>>);

pub(crate) enum PresenceOp {
    /// A new connection: written, then announced.
    Register(Arc<Connection>),
    /// A registered connection Redis may have lost: written again, and announced only if Redis
    /// did not have it.
    Reassert(Arc<Connection>),
    Unregister {
        user: UserId,
        connection_id: ConnectionId,
    },
}

/// The sessions' side of the presence queue.
#[derive(Clone)]
pub(crate) struct PresenceHandle {
    tx: mpsc::Sender<PresenceOp>,
}

impl PresenceHandle {
    /// Queues a registration; waits when the queue is full (a connect storm), which slows
    /// accepting instead of losing a registration.
    pub(crate) async fn register(&self, conn: Arc<Connection>) {
        let _ = self.tx.send(PresenceOp::Register(conn)).await;
    }

    pub(crate) async fn unregister(&self, conn: &Connection) {
        let op = PresenceOp::Unregister { user: conn.user.clone(), connection_id: conn.id.clone() };
        let _ = self.tx.send(op).await;
    }
}

#[cfg(test)]
impl PresenceHandle {
    /// A handle with no presence task behind it: what it is told goes nowhere.
    pub(crate) fn detached() -> Self {
        Self { tx: mpsc::channel(1).0 }
    }
}

pub(crate) struct PresenceTask {
    redis: Client,
    js: jetstream::Context,
    names: Names,
    gateway_id: GatewayId,
    registry: Arc<Registry>,
    ttl: Duration,
    clock: Clock,
    metrics: Arc<GatewayMetrics>,
    rx: mpsc::Receiver<PresenceOp>,
    /// Operations not yet applied in Redis, in the order they were queued.
    unapplied: Vec<PresenceOp>,
    /// Registered connections whose online event is not yet on the stream.
    unannounced: Vec<Arc<Connection>>,
    /// Presence batches sent to Redis: what our liveness key should hold.
    written: u64,
    /// Written into every entry with our id; bumped before each rewrite of every connection, so
    /// a rewrite never holds a value a dispatcher read before (see the module docs).
    generation: u64,
    /// Redis may have lost some of our writes (a failed or unconfirmed batch, a key that was
    /// gone or behind): every registered connection is written again after the next heartbeat.
    suspect: bool,
    /// Redis and the events stream failing, each logged once per outage.
    redis_outage: Outage,
    nats_outage: Outage,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PresenceError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// What this gateway's liveness key held, against the number of batches the gateway wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Everything we wrote is there.
    Intact,
    /// The key was gone: Redis lost our data, or we were away past the TTL and dispatchers
    /// pruned our entries.
    KeyGone,
    /// The key held another count: Redis lost our latest writes (a replica promoted without
    /// them).
    Behind,
}

fn check_writes(held: Option<&str>, written: u64) -> Writes {
    match held {
        None => Writes::KeyGone,
        Some(held) if held.parse::<u64>().ok() == Some(written) => Writes::Intact,
        Some(_) => Writes::Behind,
    }
}

/// Which chunks of the heartbeat's check lost a hash: fewer keys found than asked for.
fn short_chunks(asked: &[usize], found: &[i64]) -> Vec<usize> {
    asked
        .iter()
        .zip(found)
        .enumerate()
        .filter(|(_, (asked, found))| (**found as usize) < **asked)
        .map(|(i, _)| i)
        .collect()
}

impl PresenceTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        redis: Client,
        js: jetstream::Context,
        names: Names,
        gateway_id: GatewayId,
        registry: Arc<Registry>,
        ttl: Duration,
        clock: Clock,
        metrics: Arc<GatewayMetrics>,
    ) -> (Self, PresenceHandle) {
        let (tx, rx) = mpsc::channel(8192);
        let task = Self {
            redis,
            js,
            names,
            gateway_id,
            registry,
            ttl,
            clock,
            metrics,
            rx,
            unapplied: Vec::new(),
            unannounced: Vec::new(),
            written: 0,
            generation: 0,
            suspect: false,
            redis_outage: Outage::new("redis: presence"),
            nats_outage: Outage::new("nats: events stream (online)"),
        };
        (task, PresenceHandle { tx })
    }

    fn liveness(&self) -> Expiration {
        Expiration::PX(self.ttl.as_millis().try_into().unwrap_or(i64::MAX))
    }

    /// Marks this gateway alive for one TTL and checks that Redis still holds its presence;
    /// queues whatever must be written again.
    pub(crate) async fn heartbeat(&mut self) -> Result<(), PresenceError> {
        let mut users: BTreeMap<UserId, Vec<Arc<Connection>>> = BTreeMap::new();
        for conn in self.registry.all() {
            if conn.is_registered() && conn.kicked().is_none() {
                users.entry(conn.user.clone()).or_default().push(conn);
            }
        }
        let users: Vec<UserConnections> = users.into_iter().collect();
        let keys: Vec<String> = users.iter().map(|(user, _)| self.names.presence_key(user.as_str())).collect();
        let groups = slots::groups(&keys, self.redis.is_clustered(), CHECK_CHUNK);

        let key = self.names.gateway_key(self.gateway_id.as_str());
        let liveness = self.redis.set::<Value, _, _>(key, self.written.to_string(), Some(self.liveness()), None, true);
        let checks = groups.iter().map(|group| {
            let group_keys: Vec<String> = group.iter().map(|&i| keys[i].clone()).collect();
            self.redis.exists::<Value, _>(group_keys).boxed()
        });
        let commands = std::iter::once(liveness.boxed()).chain(checks);
        let replies = self.metrics.dependencies.time("redis", "heartbeat", redis_batch::all(commands)).await;
        let replies = replies.inspect_err(|_| self.suspect = true)?;
        let mut replies = replies.into_iter();
        let held: Option<String> = replies.next().map(Value::convert::<Option<String>>).transpose()?.flatten();
        let found: Vec<i64> = replies.map(Value::convert).collect::<Result<_, _>>()?;

        let writes = check_writes(held.as_deref(), self.written);
        self.suspect |= writes != Writes::Intact;
        let again: Vec<Arc<Connection>> = if self.suspect {
            // After this heartbeat's SET made our key exist: see the module docs.
            self.generation += 1;
            users.iter().flat_map(|(_, conns)| conns.iter().cloned()).collect()
        } else {
            let asked: Vec<usize> = groups.iter().map(Vec::len).collect();
            short_chunks(&asked, &found)
                .into_iter()
                .flat_map(|g| groups[g].iter().flat_map(|&i| users[i].1.iter().cloned()))
                .collect()
        };
        if !again.is_empty() {
            self.metrics.presence_resyncs.inc();
            tracing::warn!(
                connections = again.len(),
                liveness_key = ?writes,
                "redis may have lost presence of this gateway's connections; writing them again"
            );
        }
        self.suspect = false;
        // A re-write still queued from an earlier heartbeat (Redis failing since) is replaced,
        // not repeated. Connections that closed meanwhile are not in the registry any more, so
        // none is written again after its removal.
        self.unapplied.retain(|op| !matches!(op, PresenceOp::Reassert(_)));
        self.unapplied.extend(again.into_iter().map(PresenceOp::Reassert));
        Ok(())
    }

    /// Runs until `stop` is cancelled, then removes this gateway's presence. Sessions must have
    /// ended (and queued their removals) before `stop` fires.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.unapplied.append(&mut batch);
                    self.flush().await;
                }
                _ = tick.tick() => {
                    match self.heartbeat().await {
                        Ok(()) => self.redis_outage.answered(),
                        Err(e) => self.redis_outage.failed(&e),
                    }
                    self.flush().await;
                }
            }
        }
        while let Ok(op) = self.rx.try_recv() {
            self.unapplied.push(op);
        }
        if let Err(e) = self.withdraw().await {
            tracing::warn!(error = %e, "could not remove presence; it lapses with the gateway's TTL");
        }
    }

    async fn flush(&mut self) {
        if !self.unapplied.is_empty() {
            let ops = std::mem::take(&mut self.unapplied);
            match self.apply(&ops).await {
                Ok(announce) => {
                    self.redis_outage.answered();
                    self.unannounced.extend(announce);
                }
                Err(e) => {
                    self.redis_outage.failed(&e);
                    self.unapplied = ops;
                    return;
                }
            }
        }
        if !self.unannounced.is_empty() {
            let conns = std::mem::take(&mut self.unannounced);
            self.unannounced = self.announce(conns).await;
        }
    }

    /// Writes `ops` and our liveness key (with the new count of batches) in one round trip.
    /// Returns the connections to announce: new ones, and re-written ones Redis did not have.
    async fn apply(&mut self, ops: &[PresenceOp]) -> Result<Vec<Arc<Connection>>, PresenceError> {
        let entry = naming::presence_entry(self.gateway_id.as_str(), self.generation);
        let writes = ops.iter().map(|op| match op {
            PresenceOp::Register(conn) | PresenceOp::Reassert(conn) => self
                .redis
                .hset::<Value, _, _>(self.names.presence_key(conn.user.as_str()), (conn.id.as_str(), entry.as_str()))
                .boxed(),
            PresenceOp::Unregister { user, connection_id } => {
                self.redis.hdel::<Value, _, _>(self.names.presence_key(user.as_str()), connection_id.as_str()).boxed()
            }
        });
        let before = self.written;
        let written = before + 1;
        let key = self.names.gateway_key(self.gateway_id.as_str());
        // Last, after the entries (the commands keep their order): see the module docs.
        let liveness = self.redis.set::<Value, _, _>(key, written.to_string(), Some(self.liveness()), None, true);
        let commands: Vec<_> = writes.chain(std::iter::once(liveness.boxed())).collect();
        self.written = written;
        // Failed or unanswered, the batch may have landed in part: check everything next time.
        let replies = self.metrics.dependencies.time("redis", "presence_update", redis_batch::all(commands)).await;
        let mut replies = replies.inspect_err(|_| self.suspect = true)?.into_iter();

        let mut announce = Vec::new();
        let mut healed = 0;
        for (op, reply) in ops.iter().zip(replies.by_ref()) {
            match op {
                PresenceOp::Register(conn) => {
                    conn.mark_registered();
                    announce.push(Arc::clone(conn));
                }
                PresenceOp::Reassert(conn) if reply.as_i64() == Some(1) => {
                    healed += 1;
                    announce.push(Arc::clone(conn));
                }
                PresenceOp::Reassert(_) | PresenceOp::Unregister { .. } => {}
            }
        }
        let held: Option<String> = replies.next().map(Value::convert::<Option<String>>).transpose()?.flatten();
        if check_writes(held.as_deref(), before) != Writes::Intact {
            // Lost before this batch: the next heartbeat writes every connection again.
            self.suspect = true;
        }
        if healed > 0 {
            self.metrics.presence_healed.inc_by(healed);
            tracing::warn!(connections = healed, "registered again connections that Redis had lost; announcing them");
        }
        Ok(announce)
    }

    /// Publishes an online event per connection still open; returns those that failed.
    async fn announce(&self, conns: Vec<Arc<Connection>>) -> Vec<Arc<Connection>> {
        let subject = self.names.online_events_subject(self.gateway_id.as_str());
        let mut acks = Vec::with_capacity(conns.len());
        let mut failed = Vec::new();
        for conn in conns {
            if conn.kicked().is_some() || self.registry.connection(&conn.user, &conn.id).is_none() {
                continue;
            }
            let event = Event::Online(Online {
                user: conn.user.clone(),
                connection_id: conn.id.clone(),
                gateway_id: self.gateway_id.clone(),
                at_ms: self.clock.now_ms(),
            });
            let Ok(body) = serde_json::to_vec(&event) else { continue };
            match self.js.publish(subject.clone(), body.into()).await {
                Ok(ack) => acks.push((conn, ack)),
                Err(e) => {
                    self.nats_outage.failed(&e);
                    failed.push(conn);
                }
            }
        }
        // Only an acknowledged event says the stream answers again (an empty round says nothing).
        let mut acknowledged = false;
        for (conn, ack) in acks {
            match ack.await {
                Ok(_) => acknowledged = true,
                Err(e) => {
                    self.nats_outage.failed(&e);
                    failed.push(conn);
                }
            }
        }
        if acknowledged && failed.is_empty() {
            self.nats_outage.answered();
        }
        failed
    }

    /// Drain: applies the last removals, then removes whatever is still registered and the
    /// gateway's liveness key, so dispatchers stop routing here at once.
    async fn withdraw(&mut self) -> Result<(), PresenceError> {
        let leftovers = self.registry.all().into_iter().map(|c| (c.user.clone(), c.id.clone()));
        let removals = self.unapplied.iter().filter_map(|op| match op {
            PresenceOp::Unregister { user, connection_id } => Some((user.clone(), connection_id.clone())),
            PresenceOp::Register(_) | PresenceOp::Reassert(_) => None,
        });
        let removals: Vec<(UserId, ConnectionId)> = removals.chain(leftovers).collect();
        let deletes = removals.iter().map(|(user, connection_id)| {
            self.redis.hdel::<Value, _, _>(self.names.presence_key(user.as_str()), connection_id.as_str()).boxed()
        });
        let gone = self.redis.del::<Value, _>(self.names.gateway_key(self.gateway_id.as_str())).boxed();
        redis_batch::all(deletes.chain(std::iter::once(gone))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_liveness_key_says_whether_redis_kept_every_write() {
        assert_eq!(check_writes(Some("7"), 7), Writes::Intact);
        assert_eq!(check_writes(None, 7), Writes::KeyGone);
        assert_eq!(check_writes(Some("5"), 7), Writes::Behind, "a replica promoted without the last writes");
        assert_eq!(check_writes(Some("junk"), 7), Writes::Behind);
        assert_eq!(check_writes(None, 0), Writes::KeyGone, "the first heartbeat finds no key");
    }

    #[test]
    fn a_chunk_with_fewer_hashes_than_users_lost_one() {
        assert_eq!(short_chunks(&[1000, 1000, 3], &[1000, 999, 3]), vec![1]);
        assert!(short_chunks(&[2], &[2]).is_empty());
        assert!(short_chunks(&[], &[]).is_empty());
    }
}
