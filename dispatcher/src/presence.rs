//! Reading presence from Redis: which gateways hold a user's connections right now. Written by
//! gateways (see the gateway's presence module); dispatchers only read it, and prune entries
//! left behind by gateways that died.
//!
//! A gateway is alive while its liveness key (`Names::gateway_key`) exists: the gateway sets it
//! with a Redis expiry, so the decision runs on Redis's clock and never compares this host's
//! clock with a gateway's.
//!
//! Every command here touches one key, or keys of one slot (`herald_shared::slots`), so all of
//! it runs on a Redis Cluster as on a single server. The prune of a dead gateway's entries is
//! therefore not one script over the gateway's key and its users' hashes (which a cluster would
//! refuse: they live on different nodes) but three steps: read the entry (the lookup), find the
//! gateway's key still gone after that read, then delete the entry only if it still holds the
//! value read ([`DELETE_IF_UNCHANGED`], one key). A gateway that came back writes its entries
//! again with a new generation in the value before its key could be seen gone after that write
//! (see the gateway's presence module), so the compare fails on every entry it rewrote.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fred::prelude::*;
use futures::FutureExt as _;
use herald_proto::{ConnectionId, GatewayId, UserId};
use herald_shared::naming::{self, Names};
use herald_shared::{redis_batch, slots};

/// One user's live connections: connection id → gateway id.
pub type Connections = BTreeMap<ConnectionId, GatewayId>;

/// Most gateway ids remembered between lookups (see [`PresenceReader::lookup`]). Far above any
/// fleet; it only bounds what garbage in Redis could make a dispatcher hold.
const MAX_KNOWN_GATEWAYS: usize = 4096;

/// Deletes field ARGV[1] of hash KEYS[1] only if it still holds ARGV[2], the value a lookup
/// read: an entry written again since (by a gateway that came back) is kept. One key, so it runs
/// on whichever cluster node holds the hash.
const DELETE_IF_UNCHANGED: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
";

/// An entry a lookup found that should not be there: a connection on a gateway whose liveness
/// key was gone, or a field that is not presence at all (no gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub field: String,
    /// The value as read, which the delete compares against.
    pub entry: String,
    pub gateway: Option<GatewayId>,
}

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
        let pattern = self.names.gateway_key("*");
        // A SCAN sees one node's keys: on a cluster, every master is scanned.
        let mut keys = if self.redis.is_clustered() {
            self.redis.scan_cluster_buffered(pattern, Some(100), None).boxed()
        } else {
            self.redis.scan_buffered(pattern, Some(100), None).boxed()
        };
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
        let known_keys = self.liveness_keys(&known);
        let known_groups = slots::groups(&known_keys, self.redis.is_clustered(), MAX_KNOWN_GATEWAYS);
        let liveness = known_groups.iter().map(|group| {
            let keys: Vec<String> = group.iter().map(|&i| known_keys[i].clone()).collect();
            self.redis.mget::<Value, _>(keys).boxed()
        });
        let hashes =
            users.iter().map(|user| self.redis.hgetall::<Value, _>(self.names.presence_key(user.as_str())).boxed());
        let replies: Vec<Result<Value, fred::error::Error>> = redis_batch::together(liveness.chain(hashes)).await;
        // A round trip that failed (Redis away, slow, loading) fails its commands: the caller
        // waits and asks again. What no retry changes stays local to its key (below).
        if let Some(e) = replies.iter().find_map(|r| r.as_ref().err().filter(|e| is_transient(e))) {
            return Err(PresenceError(e.clone()));
        }
        let expected = users.len() + known_groups.len();
        if replies.len() != expected {
            let e = fred::error::Error::new(fred::error::ErrorKind::Protocol, "pipeline answered short");
            return Err(PresenceError(e));
        }
        let mut replies = replies.into_iter();
        let mut alive: HashMap<GatewayId, bool> = HashMap::new();
        for group in &known_groups {
            // A group that failed leaves its gateways unseen: asked again below.
            let held: Vec<Option<String>> = match replies.next() {
                Some(Ok(value)) => value.convert()?,
                _ => Vec::new(),
            };
            alive.extend(group.iter().map(|&i| known[i].clone()).zip(held.iter().map(Option::is_some)));
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
            .filter_map(|entry| entry_gateway(entry))
            .filter(|gateway| !alive.contains_key(gateway))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unseen.is_empty() {
            let held = self.alive(&unseen).await?;
            alive.extend(unseen.into_iter().zip(held));
        }
        let live: HashSet<String> =
            alive.iter().filter(|(_, alive)| **alive).map(|(gateway, _)| gateway.as_str().to_owned()).collect();
        self.remember(&alive);

        let mut found = HashMap::new();
        let mut stale: Vec<(&UserId, Stale)> = Vec::new();
        for (user, all) in users.iter().zip(hashes) {
            let (connections, dead) = split_live(all, &live);
            stale.extend(dead.into_iter().map(|entry| (*user, entry)));
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

    /// Whether each gateway's liveness key exists now: one round trip, an `MGET` per slot.
    async fn alive(&self, gateways: &[GatewayId]) -> Result<Vec<bool>, PresenceError> {
        if gateways.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.liveness_keys(gateways);
        let groups = slots::groups(&keys, self.redis.is_clustered(), MAX_KNOWN_GATEWAYS);
        let commands = groups.iter().map(|group| {
            let group_keys: Vec<String> = group.iter().map(|&i| keys[i].clone()).collect();
            self.redis.mget::<Value, _>(group_keys).boxed()
        });
        let replies: Vec<Value> = redis_batch::all(commands).await?;
        let mut alive = vec![false; gateways.len()];
        for (group, reply) in groups.iter().zip(replies) {
            let held: Vec<Option<String>> = reply.convert()?;
            for (&i, held) in group.iter().zip(held) {
                alive[i] = held.is_some();
            }
        }
        Ok(alive)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeSet<GatewayId>> {
        // Every critical section is one set operation that cannot panic halfway.
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, alive: &HashMap<GatewayId, bool>) {
        remember(&mut self.known(), alive);
    }

    /// Deletes entries of gateways still dead now, after the lookup read them, and fields that
    /// are not presence at all; each only if it still holds the value read (see the module
    /// docs). The commands go out together ([`redis_batch`]).
    pub async fn prune(&self, stale: &[(&UserId, Stale)]) {
        let gateways: Vec<GatewayId> =
            stale.iter().filter_map(|(_, s)| s.gateway.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let alive_now: HashSet<GatewayId> = match self.alive(&gateways).await {
            Ok(alive) => gateways.into_iter().zip(alive).filter(|(_, alive)| *alive).map(|(g, _)| g).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "pruning stale presence failed; the next lookup retries");
                return;
            }
        };
        let deletes = to_prune(stale, &alive_now).into_iter().map(|(user, entry)| {
            let key = self.names.presence_key(user.as_str());
            self.redis
                .eval::<i64, _, _, _>(DELETE_IF_UNCHANGED, key, vec![entry.field.as_str(), entry.entry.as_str()])
                .boxed()
        });
        if let Err(e) = redis_batch::all(deletes).await {
            tracing::debug!(error = %e, "pruning stale presence failed; the next lookup retries");
        }
    }
}

/// The stale entries to delete: fields that are not presence, and entries of gateways not alive
/// on the check made after the entries were read. A gateway back by then keeps its entries (its
/// next lookup reads them live).
pub fn to_prune<'a, U>(stale: &'a [(U, Stale)], alive_now: &HashSet<GatewayId>) -> Vec<(&'a U, &'a Stale)> {
    stale
        .iter()
        .filter(|(_, entry)| entry.gateway.as_ref().is_none_or(|gateway| !alive_now.contains(gateway)))
        .map(|(user, entry)| (user, entry))
        .collect()
}

/// The gateway a presence entry names, if it is one.
fn entry_gateway(entry: &str) -> Option<GatewayId> {
    naming::presence_entry_gateway(entry).and_then(|gateway| GatewayId::new(gateway).ok())
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

/// Splits a user's presence hash (connection id → entry) into live connections and entries to
/// delete: connections on dead gateways (with the gateway), and fields that are not a
/// connection and a gateway at all (without one).
pub fn split_live(all: HashMap<String, String>, live_gateways: &HashSet<String>) -> (Connections, Vec<Stale>) {
    let mut alive = Connections::new();
    let mut dead = Vec::new();
    for (field, entry) in all {
        match (ConnectionId::new(field.as_str()), entry_gateway(&entry)) {
            (Ok(id), Some(gateway)) if live_gateways.contains(gateway.as_str()) => {
                alive.insert(id, gateway);
            }
            (Ok(_), Some(gateway)) => dead.push(Stale { field, entry, gateway: Some(gateway) }),
            _ => dead.push(Stale { field, entry, gateway: None }),
        }
    }
    (alive, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stale(field: &str, entry: &str, gateway: Option<&str>) -> Stale {
        Stale { field: field.into(), entry: entry.into(), gateway: gateway.map(|g| GatewayId::new(g).unwrap()) }
    }

    #[test]
    fn connections_on_dead_gateways_are_stale() {
        let live: HashSet<String> = ["g1".to_string()].into();
        let all = HashMap::from([
            ("c1".to_string(), "g1/4".to_string()),
            ("c2".to_string(), "g-dead/1".to_string()),
            ("c3".to_string(), "g1".to_string()),
        ]);
        let (alive, dead) = split_live(all, &live);
        assert_eq!(alive.len(), 2);
        assert_eq!(alive[&ConnectionId::new("c1").unwrap()], "g1");
        assert_eq!(alive[&ConnectionId::new("c3").unwrap()], "g1", "an entry of an older gateway, without generation");
        assert_eq!(dead, vec![stale("c2", "g-dead/1", Some("g-dead"))]);
        let garbage = HashMap::from([
            ("not a connection".to_string(), "g1/1".to_string()),
            ("c4".to_string(), "g1/not-a-generation".to_string()),
        ]);
        let (alive, mut dead) = split_live(garbage, &live);
        assert!(alive.is_empty());
        dead.sort_by(|a, b| a.field.cmp(&b.field));
        assert_eq!(dead, vec![stale("c4", "g1/not-a-generation", None), stale("not a connection", "g1/1", None)]);
    }

    /// Entries are pruned only for gateways still dead on the check after the read; garbage
    /// always (still compared with the value read).
    #[test]
    fn a_gateway_back_by_the_second_check_keeps_its_entries() {
        let entries = vec![
            ("u1", stale("c1", "g-back/1", Some("g-back"))),
            ("u2", stale("c2", "g-dead/7", Some("g-dead"))),
            ("u3", stale("junk", "x", None)),
        ];
        let alive_now = HashSet::from([GatewayId::new("g-back").unwrap()]);
        let pruned: Vec<&str> = to_prune(&entries, &alive_now).into_iter().map(|(_, s)| s.field.as_str()).collect();
        assert_eq!(pruned, vec!["c2", "junk"]);
    }

    /// The race a prune must lose, step by step on a model of one hash: the dispatcher reads
    /// the entry and then finds the key gone; the gateway comes back, finds its key gone and
    /// writes everything again with a new generation; the dispatcher's delete lands last.
    #[test]
    fn a_prune_decided_before_a_gateway_came_back_does_not_delete_its_rewrite() {
        let mut hash: HashMap<String, String> = HashMap::from([("c1".into(), naming::presence_entry("g", 1))]);
        // Dispatcher: the lookup reads the entry, the check after it finds g's key gone.
        let (_, dead) = split_live(hash.clone(), &HashSet::new());
        let decided = to_prune(&[("u", dead[0].clone())], &HashSet::new()).into_iter().next().unwrap().1.clone();
        // Gateway: its SET ... GET answered nothing, so it bumps its generation and rewrites.
        hash.insert("c1".into(), naming::presence_entry("g", 2));
        // Dispatcher: DELETE_IF_UNCHANGED, modelled.
        if hash.get(&decided.field) == Some(&decided.entry) {
            hash.remove(&decided.field);
        }
        assert_eq!(hash.get("c1").map(String::as_str), Some("g/2"), "the reviving gateway's entry survives");
        // Without the rewrite the same delete goes through: the entry was a dead gateway's.
        let mut untouched = HashMap::from([("c1".to_string(), naming::presence_entry("g", 1))]);
        if untouched.get(&decided.field) == Some(&decided.entry) {
            untouched.remove(&decided.field);
        }
        assert!(untouched.is_empty());
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
