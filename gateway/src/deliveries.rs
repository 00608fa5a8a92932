//! Commands from dispatchers on this gateway's own subject: notifications to hand to local
//! sockets. Each notification is serialized once and shared by every connection it goes to.
//!
//! Nothing here can lose a message: a notification that finds no connection, an expired one that
//! is skipped, or a command that cannot be decoded all leave their receipts pending in the store.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use herald_proto::{close, GatewayCommand, Notification, ServerFrame};
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::registry::{Outbound, Registry, Sent};
use crate::replay::PageEnd;

/// Reads the subscription until shutdown (or until NATS closes it for good).
pub(crate) async fn run(
    mut sub: async_nats::Subscriber,
    registry: Arc<Registry>,
    metrics: Arc<GatewayMetrics>,
    clock: herald_shared::Clock,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = sub.next() => match msg {
                Some(msg) => {
                    let outcome = handle(&msg.payload, &registry, clock.now_ms());
                    metrics.commands_received.with_label_values(&[outcome.kind]).inc();
                    metrics.notifications_expired.inc_by(outcome.expired as u64);
                }
                None => break,
            },
        }
    }
}

/// What happened to one command: how many frames reached a connection's queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) kind: &'static str,
    pub(crate) queued: usize,
    pub(crate) expired: usize,
}

pub(crate) fn handle(payload: &[u8], registry: &Registry, now_ms: u64) -> Outcome {
    let mut outcome = Outcome { kind: "invalid", ..Outcome::default() };
    let command = match serde_json::from_slice::<GatewayCommand>(payload) {
        Ok(command) => command,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable gateway command dropped; its receipts stay pending");
            return outcome;
        }
    };
    match command {
        GatewayCommand::Deliver(items) => {
            outcome.kind = "deliver";
            for routed in items {
                let span = tracing::info_span!("herald.deliver", users = routed.users.len());
                herald_shared::telemetry::continue_from(&span, routed.traceparent.as_deref());
                let _entered = span.enter();
                let trace = routed.traceparent.as_ref().and_then(|_| herald_shared::telemetry::traceparent(&span));
                let path = if routed.resend { Path::Resend } else { Path::Deliver };
                let Some(frame) = frame(routed.notification, path, trace, now_ms, &mut outcome) else { continue };
                outcome.queued += registry.deliver_to_users(&routed.users, &frame);
            }
        }
        GatewayCommand::Replay(replay) => {
            outcome.kind = "replay";
            let Some(conn) = registry.connection(&replay.user, &replay.connection_id) else {
                return outcome;
            };
            let mut len = 0;
            for notification in replay.notifications {
                let Some(frame) = frame(notification, Path::Replay, None, now_ms, &mut outcome) else { continue };
                if !conn.offer(frame) {
                    // A full queue closed the connection as a slow consumer: its replay ends here,
                    // and the rest stays pending for its next connection.
                    outcome.queued += len;
                    return outcome;
                }
                len += 1;
            }
            outcome.queued += len;
            // Behind the page's frames: the session asks for the next page once it takes this.
            conn.end_page(PageEnd { more_after_seq: replay.more_after_seq, len });
        }
        GatewayCommand::Kick(kick) => {
            outcome.kind = "kick";
            let closed = registry.close_user(&kick.user, close::KICKED);
            tracing::info!(user = %kick.user, connections = closed, "kicked by an operator");
        }
    }
    outcome
}

/// How a notification came to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Routed when it was published.
    Deliver,
    /// Sent again by the ack-timeout sweep.
    Resend,
    /// In a connection's replay of pending messages.
    Replay,
}

/// The text frame for a notification, or None if it expired (never deliver past the TTL).
fn frame(
    notification: Notification,
    path: Path,
    traceparent: Option<String>,
    now_ms: u64,
    outcome: &mut Outcome,
) -> Option<Outbound> {
    if notification.expires_at_ms <= now_ms {
        outcome.expired += 1;
        return None;
    }
    let sent = Sent {
        id: notification.id.as_str().into(),
        published_at_ms: notification.published_at_ms,
        expires_at_ms: notification.expires_at_ms,
        replay: path == Path::Replay,
        resend: path == Path::Resend,
        traceparent: traceparent.map(Into::into),
        topic: None,
    };
    match serde_json::to_string(&ServerFrame::Notification(notification)) {
        Ok(text) => Some(Outbound::Frame { frame: Utf8Bytes::from(text), sent: Some(Arc::new(sent)) }),
        Err(e) => {
            tracing::warn!(error = %e, "notification not serializable; left pending");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Connection;
    use herald_proto::{Replay, Routed};
    use serde_json::value::RawValue;

    fn notification(id: &str, expires_at_ms: u64) -> Notification {
        Notification {
            id: herald_proto::MessageId::new(id).unwrap(),
            seq: 1,
            payload: RawValue::from_string(r#"{"k":1}"#.into()).unwrap(),
            published_at_ms: 1,
            expires_at_ms,
        }
    }

    #[test]
    fn deliver_and_replay_reach_the_right_sockets_and_skip_expired() {
        let registry = Registry::new(10, 10);
        let user = |u: &str| herald_proto::UserId::new(u).unwrap();
        let conn_id = |c: &str| herald_proto::ConnectionId::new(c).unwrap();
        let conn = Arc::new(Connection::new(conn_id("c1"), user("alice"), 8));
        registry.insert(Arc::clone(&conn));
        let deliver = GatewayCommand::Deliver(vec![
            Routed {
                users: vec![user("alice"), user("bob")],
                notification: notification("m1", 2_000),
                traceparent: None,
                resend: false,
            },
            Routed {
                users: vec![user("alice")],
                notification: notification("old", 500),
                traceparent: None,
                resend: false,
            },
        ]);
        let out = handle(&serde_json::to_vec(&deliver).unwrap(), &registry, 1_000);
        assert_eq!(out, Outcome { kind: "deliver", queued: 1, expired: 1 });
        let queued = conn.outbox.try_pop().unwrap();
        let text = queued.text().unwrap();
        assert!(text.contains(r#""type":"notification""#) && text.contains(r#""payload":{"k":1}"#));

        let replay = GatewayCommand::Replay(Replay {
            user: user("alice"),
            connection_id: conn_id("c1"),
            notifications: vec![notification("m2", 2_000), notification("m3", 2_000), notification("old", 500)],
            more_after_seq: Some(3),
        });
        assert_eq!(handle(&serde_json::to_vec(&replay).unwrap(), &registry, 1_000).queued, 2);
        assert!(conn.outbox.try_pop().unwrap().text().unwrap().contains("m2"));
        assert!(conn.outbox.try_pop().unwrap().text().unwrap().contains("m3"));
        assert!(
            matches!(conn.outbox.try_pop(), Some(Outbound::PageEnd(PageEnd { more_after_seq: Some(3), len: 2 }))),
            "the page's end, behind its frames"
        );
        let wrong_conn = GatewayCommand::Replay(Replay {
            user: user("alice"),
            connection_id: conn_id("nope"),
            notifications: vec![notification("m4", 2_000)],
            more_after_seq: None,
        });
        assert_eq!(handle(&serde_json::to_vec(&wrong_conn).unwrap(), &registry, 1_000).queued, 0);
        assert_eq!(handle(b"{not json", &registry, 1_000), Outcome { kind: "invalid", ..Outcome::default() });
    }

    #[test]
    fn a_kick_closes_every_connection_of_that_user_only() {
        let registry = Registry::new(10, 10);
        let user = |u: &str| herald_proto::UserId::new(u).unwrap();
        let conn =
            |c: &str, u: &str| Arc::new(Connection::new(herald_proto::ConnectionId::new(c).unwrap(), user(u), 8));
        let (a1, a2, b1) = (conn("a1", "alice"), conn("a2", "alice"), conn("b1", "bob"));
        for c in [&a1, &a2, &b1] {
            registry.insert(Arc::clone(c));
        }
        let kick = GatewayCommand::Kick(herald_proto::Kick { user: user("alice") });
        assert_eq!(handle(&serde_json::to_vec(&kick).unwrap(), &registry, 1_000).kind, "kick");
        for c in [&a1, &a2] {
            assert_eq!(c.kicked(), Some(close::KICKED));
        }
        assert_eq!(b1.kicked(), None, "bob stays");
        let nobody = GatewayCommand::Kick(herald_proto::Kick { user: user("carol") });
        assert_eq!(handle(&serde_json::to_vec(&nobody).unwrap(), &registry, 1_000).kind, "kick");
    }
}
