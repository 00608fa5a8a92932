//! Routing: which gateway gets which notification for which users, and sending it there.
//!
//! A notification travels once per gateway with the list of its users on that gateway, never
//! once per recipient. Commands are split to stay under NATS's payload limit. Routing is best
//! effort by design: the receipt is already pending in the store, so a lost command only delays
//! delivery until the ack timeout or the next connection.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use herald_proto::{ConnectionId, GatewayCommand, GatewayId, Notification, Routed, UserId};
use herald_shared::naming::Names;

use crate::presence::Connections;

/// Target size of one gateway command; NATS's default limit is 1 MiB.
const MAX_COMMAND_BYTES: usize = 768 * 1024;

/// What routing found for a set of recipients.
#[derive(Debug, Default)]
pub struct Plan {
    /// Per gateway, the notifications and the users on that gateway they are for.
    pub by_gateway: BTreeMap<GatewayId, Vec<Routed>>,
    /// Recipients with at least one live connection.
    pub online: usize,
    /// Recipients with none: their receipts wait for them to connect.
    pub offline: Vec<UserId>,
}

/// One notification to route: its recipients, and the trace context to hand the gateway.
pub struct Item<'a> {
    pub notification: &'a Notification,
    pub users: &'a [UserId],
    pub traceparent: Option<&'a str>,
}

/// Decides where each notification goes, given live presence.
pub fn plan<'a>(items: impl IntoIterator<Item = Item<'a>>, presence: &HashMap<UserId, Connections>) -> Plan {
    let mut out = Plan::default();
    for Item { notification, users, traceparent } in items {
        let mut per_gateway: BTreeMap<&GatewayId, Vec<UserId>> = BTreeMap::new();
        for user in users {
            match presence.get(user) {
                Some(conns) if !conns.is_empty() => {
                    out.online += 1;
                    let mut gateways: Vec<&GatewayId> = conns.values().collect();
                    gateways.sort_unstable();
                    gateways.dedup();
                    for gateway in gateways {
                        per_gateway.entry(gateway).or_default().push(user.clone());
                    }
                }
                _ => out.offline.push(user.clone()),
            }
        }
        for (gateway, users) in per_gateway {
            out.by_gateway.entry(gateway.clone()).or_default().push(Routed {
                users,
                notification: notification.clone(),
                traceparent: traceparent.map(str::to_owned),
                resend: false,
            });
        }
    }
    out
}

/// Splits one gateway's deliveries into commands under [`MAX_COMMAND_BYTES`], splitting a
/// single notification's user list when that alone is too big.
pub fn commands(routed: Vec<Routed>) -> Vec<GatewayCommand> {
    let mut out = Vec::new();
    let mut current: Vec<Routed> = Vec::new();
    let mut size = 0;
    for item in routed {
        let base = notification_bytes(&item.notification);
        let mut users = item.users;
        while !users.is_empty() {
            let mut take = 0;
            let mut bytes = base;
            while take < users.len() && (take == 0 || bytes + users[take].as_str().len() + 3 <= MAX_COMMAND_BYTES) {
                bytes += users[take].as_str().len() + 3;
                take += 1;
            }
            if !current.is_empty() && size + bytes > MAX_COMMAND_BYTES {
                out.push(GatewayCommand::Deliver(std::mem::take(&mut current)));
                size = 0;
            }
            let rest = users.split_off(take);
            current.push(Routed {
                users,
                notification: item.notification.clone(),
                traceparent: item.traceparent.clone(),
                resend: item.resend,
            });
            size += bytes;
            users = rest;
        }
    }
    if !current.is_empty() {
        out.push(GatewayCommand::Deliver(current));
    }
    out
}

/// What one notification adds to a command, near enough: its payload and id, and the JSON
/// around them (the other fields, the keys, the user list's share).
pub fn notification_bytes(notification: &Notification) -> usize {
    notification.payload.get().len() + notification.id.as_str().len() + 160
}

/// Most bytes of notifications one replay page carries: a page is one command.
pub const MAX_PAGE_BYTES: usize = MAX_COMMAND_BYTES;

/// One page of a connection's replay, as the command that carries it.
pub fn replay_command(
    user: &UserId,
    connection_id: &ConnectionId,
    notifications: Vec<Notification>,
    more_after_seq: Option<u64>,
) -> GatewayCommand {
    GatewayCommand::Replay(herald_proto::Replay {
        user: user.clone(),
        connection_id: connection_id.clone(),
        notifications,
        more_after_seq,
    })
}

/// Publishes gateway commands on core NATS.
#[derive(Clone)]
pub struct Router {
    nats: async_nats::Client,
    names: Names,
}

impl Router {
    pub fn new(nats: async_nats::Client, names: Names) -> Self {
        Self { nats, names }
    }

    /// Sends a plan's deliveries; returns the number of commands that could not be handed to
    /// NATS (their receipts stay pending and are retried by the sweeper).
    pub async fn send(&self, plan: Plan) -> usize {
        let mut failed = 0;
        for (gateway, routed) in plan.by_gateway {
            for command in commands(routed) {
                if !self.publish(&gateway, &command).await {
                    failed += 1;
                }
            }
        }
        failed
    }

    pub async fn publish(&self, gateway: &GatewayId, command: &GatewayCommand) -> bool {
        let body = match serde_json::to_vec(command) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(error = %e, "gateway command not serializable");
                return false;
            }
        };
        match self.nats.publish(self.names.gateway_subject(gateway.as_str()), body).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, %gateway, "gateway command not published; receipts stay pending");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::MessageId;
    use serde_json::value::RawValue;

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    fn notification(id: &str, payload_len: usize) -> Notification {
        Notification {
            id: MessageId::new(id).unwrap(),
            seq: 1,
            payload: RawValue::from_string(format!("\"{}\"", "x".repeat(payload_len))).unwrap(),
            published_at_ms: 0,
            expires_at_ms: u64::MAX,
        }
    }

    fn conns(pairs: &[(&str, &str)]) -> Connections {
        pairs.iter().map(|(c, g)| (ConnectionId::new(*c).unwrap(), GatewayId::new(*g).unwrap())).collect()
    }

    #[test]
    fn one_command_per_gateway_lists_its_users_once() {
        let presence = HashMap::from([
            (user("alice"), conns(&[("a1", "g1"), ("a2", "g1"), ("a3", "g2")])),
            (user("bob"), conns(&[("b1", "g1")])),
        ]);
        let n = notification("m1", 3);
        let users = vec![user("alice"), user("bob"), user("carol")];
        let plan = plan([Item { notification: &n, users: &users, traceparent: None }], &presence);
        let (g1, g2) = (GatewayId::new("g1").unwrap(), GatewayId::new("g2").unwrap());
        assert_eq!(plan.online, 2);
        assert_eq!(plan.offline, vec![user("carol")]);
        assert_eq!(plan.by_gateway[&g1].len(), 1);
        assert_eq!(plan.by_gateway[&g1][0].users, vec![user("alice"), user("bob")]);
        assert_eq!(plan.by_gateway[&g2][0].users, vec![user("alice")]);
    }

    #[test]
    fn big_fan_outs_are_split_under_the_limit_without_losing_a_user() {
        let users: Vec<UserId> = (0..60_000).map(|i| user(&format!("user-{i:08}"))).collect();
        let routed = vec![Routed {
            users: users.clone(),
            notification: notification("m", 60_000),
            traceparent: None,
            resend: true,
        }];
        let commands = commands(routed);
        assert!(commands.len() > 1);
        let mut seen = Vec::new();
        for command in &commands {
            assert!(serde_json::to_vec(command).unwrap().len() <= 1024 * 1024);
            let GatewayCommand::Deliver(items) = command else { panic!("deliver expected") };
            for item in items {
                assert!(item.resend, "every part of a resend is marked as one");
                seen.extend(item.users.iter().cloned());
            }
        }
        assert_eq!(seen, users);
    }

    #[test]
    fn many_small_notifications_share_a_command() {
        let routed: Vec<Routed> = (0..100)
            .map(|i| Routed {
                users: vec![user("u")],
                notification: notification(&format!("m{i}"), 10),
                traceparent: None,
                resend: false,
            })
            .collect();
        assert_eq!(commands(routed).len(), 1);
    }
}
