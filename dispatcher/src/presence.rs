//! Reading presence from Redis: which gateways hold a user's connections right now. Written by
//! gateways (see the gateway's presence module); dispatchers only read it, and prune entries
//! left behind by gateways that died.
//!
//! A gateway is alive while its liveness key (`Names::gateway_key`) exists: the gateway sets it
//! with a Redis expiry, so the decision runs on Redis's clock and never compares this host's
//! clock with a gateway's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fred::prelude::*;
use herald_proto::{ConnectionId, GatewayId, UserId};
use herald_shared::naming::Names;

/// One user's live connections: connection id → gateway id.
pub type Connections = BTreeMap<ConnectionId, GatewayId>;

/// Most gateway ids remembered between lookups (see [`PresenceReader::lookup`]). Far above any
/// fleet; it only bounds what garbage in Redis could make a dispatcher hold.
const MAX_KNOWN_GATEWAYS: usize = 4096;

/// Deletes a dead gateway's entries from users' hashes, atomically with the check that it is
/// still dead: a gateway that came back meanwhile (and wrote its connections again) keeps them.
/// KEYS[1] is the gateway's liveness key, KEYS[2..] the hashes; ARGV[i] is the field of KEYS[i+1].
const PRUNE_DEAD_GATEWAY: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local pruned = 0
for i = 2, #KEYS do pruned = pruned + redis.call('HDEL', KEYS[i], ARGV[i - 1]) end
return pruned
";

#[derive(Debug, thiserror::Error)]
#[error("presence lookup: {0}")]
pub struct PresenceError(#[from] fred::error::Error);

#[derive(Clone)]
pub struct PresenceReader {
    redis: Client,
    names: Names,
    /// Gateways seen alive by recent lookups, shared by this dispatcher's clones: each lookup
    /// asks about them in the same round trip as the users' hashes. Holds ids only, never an
    /// answer: liveness is read afresh every time.
    known: Arc<Mutex<BTreeSet<GatewayId>>>,
}

impl PresenceReader {
    pub fn new(redis: Client, names: Names) -> Self {
        Self { redis, names, known: Arc::default() }
    }

    /// The gateways whose liveness key exists, by id: one SCAN of the liveness keys (never
    /// KEYS, which would block Redis), for an operator's status.
    pub async fn live_gateways(&self) -> Result<Vec<GatewayId>, PresenceError> {
        use futures::StreamExt as _;
        let prefix = self.names.gateway_key("");
        let mut keys = self.redis.scan_buffered(self.names.gateway_key("*"), Some(100), None);
        let mut out = BTreeSet::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(id) = key.as_str().and_then(|k| k.strip_prefix(prefix.as_str())) {
                if let Ok(id) = GatewayId::new(id) {
                    out.insert(id);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The live connections of each user. Users without a live connection are absent from the
    /// result. Entries pointing at a gateway whose liveness key is gone are dropped here and
    /// deleted before returning (best effort: a failed delete is retried by the next lookup).
    ///
    /// One pipelined round trip for any number of users: the hashes, and the liveness keys of
    /// the gateways recent lookups saw. A gateway not seen before costs one more round trip, the
    /// first time.
    pub async fn lookup(&self, users: &[&UserId]) -> Result<HashMap<UserId, Connections>, PresenceError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let known: Vec<GatewayId> = self.known().iter().cloned().collect();
        let pipeline = self.redis.pipeline();
        if !known.is_empty() {
            let () = pipeline.mget(self.liveness_keys(&known)).await?;
        }
        for user in users {
            let () = pipeline.hgetall(self.names.presence_key(user.as_str())).await?;
        }
        let replies: Vec<Result<Value, fred::error::Error>> = pipeline.try_all().await;
        // A round trip that failed (Redis away, slow, loading) fails its commands: the caller
        // waits and asks again. What no retry changes stays local to its key (below).
        if let Some(e) = replies.iter().find_map(|r| r.as_ref().err().filter(|e| is_transient(e))) {
            return Err(PresenceError(e.clone()));
        }
        let expected = users.len() + usize::from(!known.is_empty());
        if replies.len() != expected {
            let e = fred::error::Error::new(fred::error::ErrorKind::Protocol, "pipeline answered short");
            return Err(PresenceError(e));
        }
        let mut replies = replies.into_iter();
        let mut alive: HashMap<GatewayId, bool> = HashMap::new();
        if !known.is_empty() {
            let held: Vec<Option<String>> = match replies.next() {
                Some(Ok(value)) => value.convert()?,
                _ => Vec::new(),
            };
            alive.extend(known.iter().cloned().zip(held.iter().map(Option::is_some)));
        }
        // A key that is not a presence hash (WRONGTYPE, written by something else) reads as no
        // connection: one bad key must not hold every batch that names its user.
        let hashes: Vec<HashMap<String, String>> = users
            .iter()
            .zip(replies)
            .map(|(user, reply)| match reply.and_then(Value::convert) {
                Ok(hash) => hash,
                Err(e) => {
                    tracing::warn!(%user, error = %e, "presence key is not a presence hash; reading it as offline");
                    HashMap::new()
                }
            })
            .collect();

        let unseen: Vec<GatewayId> = hashes
            .iter()
            .flat_map(|hash| hash.values())
            .filter_map(|gateway| GatewayId::new(gateway.as_str()).ok())
            .filter(|gateway| !alive.contains_key(gateway))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unseen.is_empty() {
            let held: Vec<Option<String>> = self.redis.mget(self.liveness_keys(&unseen)).await?;
            alive.extend(unseen.into_iter().zip(held.iter().map(Option::is_some)));
        }
        let live: HashSet<String> =
            alive.iter().filter(|(_, alive)| **alive).map(|(gateway, _)| gateway.as_str().to_owned()).collect();
        self.remember(&alive);

        let mut found = HashMap::new();
        let mut stale: Vec<(&UserId, String, Option<GatewayId>)> = Vec::new();
        for (user, all) in users.iter().zip(hashes) {
            let (connections, dead) = split_live(all, &live);
            stale.extend(dead.into_iter().map(|(conn, gateway)| (*user, conn, gateway)));
            if !connections.is_empty() {
                found.insert((*user).clone(), connections);
            }
        }
        if !stale.is_empty() {
            self.prune(&stale).await;
        }
        Ok(found)
    }

    fn liveness_keys(&self, gateways: &[GatewayId]) -> Vec<String> {
        gateways.iter().map(|g| self.names.gateway_key(g.as_str())).collect()
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeSet<GatewayId>> {
        // Every critical section is one set operation that cannot panic halfway.
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, alive: &HashMap<GatewayId, bool>) {
        remember(&mut self.known(), alive);
    }

    /// Deletes entries of dead gateways (only while each is still dead, see
    /// [`PRUNE_DEAD_GATEWAY`]) and fields that are not presence at all. The commands go out
    /// together (the client pipelines concurrent commands on its connection).
    async fn prune(&self, stale: &[(&UserId, String, Option<GatewayId>)]) {
        let mut by_gateway: BTreeMap<&GatewayId, (Vec<String>, Vec<&str>)> = BTreeMap::new();
        let mut garbage: Vec<(String, &str)> = Vec::new();
        for (user, conn, gateway) in stale {
            let key = self.names.presence_key(user.as_str());
            match gateway {
                Some(gateway) => {
                    let (keys, fields) = by_gateway.entry(gateway).or_default();
                    keys.push(key);
                    fields.push(conn.as_str());
                }
                None => garbage.push((key, conn.as_str())),
            }
        }
        let scripts = by_gateway.into_iter().map(|(gateway, (hashes, fields))| {
            let keys: Vec<String> = std::iter::once(self.names.gateway_key(gateway.as_str())).chain(hashes).collect();
            self.redis.eval::<i64, _, _, _>(PRUNE_DEAD_GATEWAY, keys, fields)
        });
        let deletes = garbage.into_iter().map(|(key, field)| self.redis.hdel::<i64, _, _>(key, field));
        let (scripts, deletes) = futures::join!(futures::future::join_all(scripts), futures::future::join_all(deletes));
        if let Some(e) = scripts.into_iter().chain(deletes).find_map(Result::err) {
            tracing::debug!(error = %e, "pruning stale presence failed; the next lookup retries");
        }
    }
}

/// Whether asking again can help: Redis away, slow, loading or failing over. Not a key holding
/// another type (WRONGTYPE), a command Redis refuses, or a reply that cannot be read.
fn is_transient(e: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    !matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::InvalidCommand | ErrorKind::Parse)
}

/// Keeps the gateways a lookup found alive, up to [`MAX_KNOWN_GATEWAYS`], and forgets those it
/// found dead.
fn remember(known: &mut BTreeSet<GatewayId>, alive: &HashMap<GatewayId, bool>) {
    for (gateway, alive) in alive {
        if !*alive {
            known.remove(gateway);
        } else if known.len() < MAX_KNOWN_GATEWAYS {
            known.insert(gateway.clone());
        }
    }
}

/// Splits a user's presence hash into live connections and entries to delete: connections on
/// dead gateways (with the gateway), and fields that are not a connection and a gateway id at
/// all (without one).
pub fn split_live(
    all: HashMap<String, String>,
    live_gateways: &HashSet<String>,
) -> (Connections, Vec<(String, Option<GatewayId>)>) {
    let mut alive = Connections::new();
    let mut dead = Vec::new();
    for (conn, gateway) in all {
        match (ConnectionId::new(conn.as_str()), GatewayId::new(gateway.as_str())) {
            (Ok(id), Ok(gateway)) if live_gateways.contains(gateway.as_str()) => {
                alive.insert(id, gateway);
            }
            (Ok(_), Ok(gateway)) => dead.push((conn, Some(gateway))),
            _ => dead.push((conn, None)),
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
        assert_eq!(dead, vec![("c2".to_string(), Some(GatewayId::new("g-dead").unwrap()))]);
        let (alive, dead) = split_live(HashMap::from([("not a connection".to_string(), "g1".to_string())]), &live);
        assert!(alive.is_empty());
        assert_eq!(dead, vec![("not a connection".to_string(), None)], "garbage is deleted without a condition");
    }

    #[test]
    fn lookups_remember_live_gateways_and_forget_dead_ones() {
        let g = |id: &str| GatewayId::new(id).unwrap();
        let mut known = BTreeSet::from([g("a"), g("b")]);
        remember(&mut known, &HashMap::from([(g("a"), false), (g("c"), true)]));
        assert_eq!(known, BTreeSet::from([g("b"), g("c")]));
        let mut full: BTreeSet<GatewayId> = (0..MAX_KNOWN_GATEWAYS).map(|i| g(&format!("g{i}"))).collect();
        remember(&mut full, &HashMap::from([(g("new"), true)]));
        assert_eq!(full.len(), MAX_KNOWN_GATEWAYS, "bounded");
    }
}
