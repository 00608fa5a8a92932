//! Reading presence from Redis: which gateways hold a user's connections right now. Written by
//! gateways (see the gateway's presence module); dispatchers only read it, and prune entries
//! left behind by gateways that died.

use std::collections::{BTreeMap, HashMap, HashSet};

use fred::prelude::*;
use herald_proto::{ConnectionId, GatewayId, UserId};
use herald_shared::naming::Names;

/// One user's live connections: connection id → gateway id.
pub type Connections = BTreeMap<ConnectionId, GatewayId>;

#[derive(Debug, thiserror::Error)]
#[error("presence lookup: {0}")]
pub struct PresenceError(#[from] fred::error::Error);

#[derive(Clone)]
pub struct PresenceReader {
    redis: Client,
    names: Names,
}

impl PresenceReader {
    pub fn new(redis: Client, names: Names) -> Self {
        Self { redis, names }
    }

    /// The live connections of each user, in one pipelined round trip for any number of users.
    /// Users without a live connection are absent from the result. Entries pointing at a
    /// gateway whose liveness lapsed are dropped here and deleted in the background of the
    /// same call (best effort: a failed delete is retried by the next lookup).
    pub async fn lookup(&self, users: &[&UserId], now_ms: u64) -> Result<HashMap<UserId, Connections>, PresenceError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let pipeline = self.redis.pipeline();
        let () = pipeline.zrangebyscore(self.names.gateways_key(), now_ms as f64, "+inf", false, None).await?;
        for user in users {
            let () = pipeline.hgetall(self.names.presence_key(user.as_str())).await?;
        }
        let mut replies = pipeline.all::<Vec<Value>>().await?.into_iter();
        let live: HashSet<String> = match replies.next() {
            Some(v) => v.convert()?,
            None => HashSet::new(),
        };
        let mut found = HashMap::new();
        let mut stale: Vec<(&UserId, String)> = Vec::new();
        for (user, reply) in users.iter().zip(replies) {
            let all: HashMap<String, String> = reply.convert()?;
            let (alive, dead) = split_live(all, &live);
            stale.extend(dead.into_iter().map(|conn| (*user, conn)));
            if !alive.is_empty() {
                found.insert((*user).clone(), alive);
            }
        }
        if !stale.is_empty() {
            self.prune(&stale).await;
        }
        Ok(found)
    }

    async fn prune(&self, stale: &[(&UserId, String)]) {
        let pipeline = self.redis.pipeline();
        for (user, conn) in stale {
            let _: Result<(), _> = pipeline.hdel(self.names.presence_key(user.as_str()), conn.as_str()).await;
        }
        if let Err(e) = pipeline.all::<Vec<Value>>().await {
            tracing::debug!(error = %e, "pruning stale presence failed; the next lookup retries");
        }
    }
}

/// Splits a user's presence hash into live connections and entries to delete: connections on
/// dead gateways, and fields that are not a connection and a gateway id at all.
pub fn split_live(all: HashMap<String, String>, live_gateways: &HashSet<String>) -> (Connections, Vec<String>) {
    let mut alive = Connections::new();
    let mut dead = Vec::new();
    for (conn, gateway) in all {
        match (ConnectionId::new(conn.as_str()), GatewayId::new(gateway.as_str())) {
            (Ok(id), Ok(gateway)) if live_gateways.contains(gateway.as_str()) => {
                alive.insert(id, gateway);
            }
            _ => dead.push(conn),
        }
    }
    (alive, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_on_dead_gateways_are_stale() {
        let live: HashSet<String> = ["g1".to_string()].into();
        let all = HashMap::from([("c1".to_string(), "g1".to_string()), ("c2".to_string(), "g-dead".to_string())]);
        let (alive, dead) = split_live(all, &live);
        assert_eq!(alive.len(), 1);
        assert_eq!(alive[&ConnectionId::new("c1").unwrap()], "g1");
        assert_eq!(dead, vec!["c2".to_string()]);
        let (alive, dead) = split_live(HashMap::from([("not a connection".to_string(), "g1".to_string())]), &live);
        assert!(alive.is_empty() && dead.len() == 1);
    }
}
