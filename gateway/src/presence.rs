//! This gateway's presence in Redis, and the "came online" announcements that trigger replay.
//!
//! One task owns all of it. Sessions hand it registrations and removals through a queue; it
//! applies them in batches (one pipelined round trip per batch), then announces each new
//! connection on the events stream. Liveness is one sorted-set entry per gateway, refreshed every
//! third of the TTL, so steady-state Redis load does not grow with the number of connections.
//!
//! If Redis loses our entry (a restart, an eviction) the next heartbeat notices (ZADD reports a
//! new member) and the task re-registers and re-announces every local connection, so messages
//! published meanwhile reach still-connected clients without them reconnecting. Failed batches
//! are kept and retried on the next tick.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fred::prelude::*;
use herald_proto::{ConnectionId, Event, GatewayId, Online, UserId};
use herald_shared::naming::Names;
use herald_shared::Clock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::registry::{Connection, Registry};

/// Largest number of queued operations applied in one round trip.
const BATCH: usize = 1024;

pub(crate) enum PresenceOp {
    Register(Arc<Connection>),
    Unregister { user: UserId, connection_id: ConnectionId },
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
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PresenceError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

impl PresenceTask {
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
        };
        (task, PresenceHandle { tx })
    }

    /// Marks this gateway alive. Returns true when Redis did not know it: either this is the
    /// first heartbeat, or Redis lost its data and every connection must be registered again.
    pub(crate) async fn heartbeat(&self) -> Result<bool, PresenceError> {
        let lapse_at = self.clock.now_ms() + self.ttl.as_millis() as u64;
        let zadd = self.redis.zadd::<i64, _, _>(
            self.names.gateways_key(),
            None,
            None,
            false,
            false,
            (lapse_at as f64, self.gateway_id.as_str()),
        );
        let added = self.metrics.dependencies.time("redis", "heartbeat", zadd).await?;
        Ok(added == 1)
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
                        Ok(true) => self.resync(),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "presence heartbeat failed"),
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

    /// Queues every local connection for registration and announcement again.
    fn resync(&mut self) {
        let conns = self.registry.all();
        if !conns.is_empty() {
            self.metrics.presence_resyncs.inc();
            tracing::warn!(connections = conns.len(), "redis lost this gateway's presence; registering again");
        }
        self.unapplied.extend(conns.into_iter().map(PresenceOp::Register));
    }

    async fn flush(&mut self) {
        if !self.unapplied.is_empty() {
            match self.apply(&self.unapplied).await {
                Ok(()) => {
                    for op in self.unapplied.drain(..) {
                        if let PresenceOp::Register(conn) = op {
                            self.unannounced.push(conn);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, pending = self.unapplied.len(), "presence update failed; retrying");
                    return;
                }
            }
        }
        if !self.unannounced.is_empty() {
            let conns = std::mem::take(&mut self.unannounced);
            self.unannounced = self.announce(conns).await;
        }
    }

    async fn apply(&self, ops: &[PresenceOp]) -> Result<(), PresenceError> {
        let pipeline = self.redis.pipeline();
        for op in ops {
            match op {
                PresenceOp::Register(conn) => {
                    let () = pipeline
                        .hset(self.names.presence_key(conn.user.as_str()), (conn.id.as_str(), self.gateway_id.as_str()))
                        .await?;
                }
                PresenceOp::Unregister { user, connection_id } => {
                    let () = pipeline.hdel(self.names.presence_key(user.as_str()), connection_id.as_str()).await?;
                }
            }
        }
        self.metrics.dependencies.time("redis", "presence_update", pipeline.all::<Vec<Value>>()).await?;
        Ok(())
    }

    /// Publishes an online event per connection still open; returns those that failed.
    async fn announce(&self, conns: Vec<Arc<Connection>>) -> Vec<Arc<Connection>> {
        let subject = self.names.online_events_subject(self.gateway_id.as_str());
        let mut acks = Vec::with_capacity(conns.len());
        let mut failed = Vec::new();
        for conn in conns {
            if conn.kicked().is_cancelled() || self.registry.connection(&conn.user, &conn.id).is_none() {
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
                    tracing::warn!(error = %e, "online event not published; retrying");
                    failed.push(conn);
                }
            }
        }
        for (conn, ack) in acks {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "online event not acknowledged; retrying");
                failed.push(conn);
            }
        }
        failed
    }

    /// Drain: applies the last removals, then removes whatever is still registered and the
    /// gateway's own liveness entry, so dispatchers stop routing here at once.
    async fn withdraw(&mut self) -> Result<(), PresenceError> {
        let leftovers: Vec<PresenceOp> = self
            .registry
            .all()
            .into_iter()
            .map(|c| PresenceOp::Unregister { user: c.user.clone(), connection_id: c.id.clone() })
            .collect();
        self.unapplied.retain(|op| matches!(op, PresenceOp::Unregister { .. }));
        self.unapplied.extend(leftovers);
        self.apply(&self.unapplied).await?;
        let _: i64 = self.redis.zrem(self.names.gateways_key(), self.gateway_id.as_str()).await?;
        Ok(())
    }
}
