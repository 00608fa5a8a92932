//! Herald on a Redis Cluster and behind a Redis Sentinel: presence's pruning and healing on a
//! cluster, where no command or script may touch keys of two slots, and a fleet configured with
//! a `redis-sentinel://` URL. (The whole of e2e.rs runs on a cluster too.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;
use herald_dispatcher::presence::{split_live, PresenceReader};
use herald_proto::{GatewayId, UserId};
use herald_shared::naming::{presence_entry, presence_entry_gateway, Names};
use herald_tests::cluster::{Cluster, Options};
use herald_tests::services::{RedisCluster, Stack};
use herald_tests::{eventually, unique_name};

const WAIT: Duration = Duration::from_secs(10);

/// A lookup on a three-master cluster: users' hashes on every node, gateways' liveness keys on
/// several. Entries of a gateway whose key is gone are pruned (each hash on its own node, by
/// the one-key compare-and-delete); live ones, and those an older gateway wrote without a
/// generation, are returned and kept. The SCAN of live gateways covers every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_on_a_cluster_prunes_a_dead_gateways_entries_and_keeps_live_ones() {
    let cluster = RedisCluster::start(3).await.unwrap();
    let redis = herald_shared::connect::redis(&cluster.url()).await.unwrap();
    assert!(redis.is_clustered());
    let names = Names::new(&unique_name("t"));
    let live: Vec<String> = (0..6).map(|i| format!("gw-live-{i}")).collect();
    for gateway in &live {
        let () = redis.set(names.gateway_key(gateway), "1", Some(Expiration::PX(60_000)), None, false).await.unwrap();
    }
    let users: Vec<UserId> = (0..60).map(|i| UserId::new(format!("user-{i}")).unwrap()).collect();
    for (i, user) in users.iter().enumerate() {
        let key = names.presence_key(user.as_str());
        let on = &live[i % live.len()];
        // Every fifth entry as a gateway wrote it before entries carried a generation.
        let entry = if i % 5 == 0 { on.clone() } else { presence_entry(on, 1) };
        let () = redis.hset(&key, (format!("c-live-{i}"), entry)).await.unwrap();
        let () = redis.hset(&key, (format!("c-dead-{i}"), presence_entry("gw-dead", 1))).await.unwrap();
    }

    let reader = PresenceReader::new(redis.clone(), names.clone());
    let asked: Vec<&UserId> = users.iter().collect();
    // Twice: the second lookup asks about the gateways it now knows in its first round trip.
    for _ in 0..2 {
        let found = reader.lookup(&asked).await.unwrap();
        assert_eq!(found.len(), users.len());
        for (i, user) in users.iter().enumerate() {
            let gateways: Vec<&str> = found[user].values().map(GatewayId::as_str).collect();
            assert_eq!(gateways, vec![live[i % live.len()].as_str()], "{user}");
        }
    }
    for (i, user) in users.iter().enumerate() {
        let hash: HashMap<String, String> = redis.hgetall(names.presence_key(user.as_str())).await.unwrap();
        assert_eq!(hash.keys().cloned().collect::<Vec<_>>(), vec![format!("c-live-{i}")], "dead entry pruned");
    }
    let listed: BTreeSet<String> =
        reader.live_gateways().await.unwrap().into_iter().map(|g| g.as_str().to_owned()).collect();
    assert_eq!(listed, live.iter().cloned().collect(), "every master scanned");
    let slots: HashSet<u16> = live.iter().map(|g| fred::util::redis_keyslot(names.gateway_key(g).as_bytes())).collect();
    assert!(slots.len() > 1, "the liveness keys span slots, so the MGETs were split");
}

/// The race a cluster-safe prune must lose. A dispatcher reads a gateway's entry and finds the
/// gateway's key gone; the gateway (real, on the cluster) comes back, sees its key gone and
/// writes its connections again; the dispatcher's delete lands after that, at a moment the key
/// is gone once more (the worst case: only the compare on the value protects the entry). The
/// entry stays, and the user keeps getting messages. Then the heartbeat's per-slot `EXISTS`
/// finds a hash deleted behind its back and writes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_back_before_a_prune_lands_keeps_its_entries_on_a_cluster() {
    let options = Options { presence_ttl: Duration::from_secs(3), ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(cluster.connect(gateway.addr, &format!("other-{i}")).await.unwrap());
    }
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    let redis = cluster.redis().await.unwrap();
    let names = cluster.stack.names();
    let (alice_key, liveness) = (names.presence_key("alice"), names.gateway_key(&gateway.id));
    let connection = alice.hello().connection_id.as_str().to_owned();

    // The dispatcher's read, and its finding: the gateway's key is gone.
    let read: HashMap<String, String> = redis.hgetall(&alice_key).await.unwrap();
    let before = read[&connection].clone();
    assert_eq!(presence_entry_gateway(&before), Some(gateway.id.as_str()));
    let (_, stale) = split_live(read, &HashSet::new());
    let _: i64 = redis.del(&liveness).await.unwrap();

    // The gateway comes back: its heartbeat finds the key gone and writes everything again.
    let rewritten = eventually(WAIT, Duration::from_millis(20), || async {
        let now: Option<String> = redis.hget(&alice_key, &connection).await.map_err(|e| e.to_string())?;
        now.filter(|now| *now != before).ok_or_else(|| format!("not rewritten yet: {before}"))
    })
    .await
    .unwrap();
    assert_eq!(presence_entry_gateway(&rewritten), Some(gateway.id.as_str()));

    // The dispatcher's delete lands now, its second check finding the key gone again.
    let _: i64 = redis.del(&liveness).await.unwrap();
    let reader = PresenceReader::new(redis.clone(), names.clone());
    let alice_id = UserId::new("alice").unwrap();
    let decided: Vec<(&UserId, _)> = stale.into_iter().map(|s| (&alice_id, s)).collect();
    assert_eq!(decided.len(), 1);
    reader.prune(&decided).await;
    let kept: Option<String> = redis.hget(&alice_key, &connection).await.unwrap();
    assert!(kept.is_some(), "the prune decided before the gateway came back deleted its rewrite");

    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    cluster.send("after-revival", &["alice"]).await.unwrap();
    assert_eq!(alice.next_notification(WAIT).await.expect("routed").id, "after-revival");
    alice.ack(["after-revival"]).await.unwrap();
    cluster.wait_receipt("after-revival", "alice", "delivered").await.unwrap();

    // A hash lost on its own node: the heartbeat's check (EXISTS per slot) notices it.
    let lost = names.presence_key("other-3");
    let deleted: i64 = redis.del(&lost).await.unwrap();
    assert_eq!(deleted, 1);
    eventually(WAIT, Duration::from_millis(20), || async {
        let back: i64 = redis.exists(&lost).await.map_err(|e| e.to_string())?;
        if back == 1 {
            Ok(())
        } else {
            Err("other-3's presence not written again yet".to_owned())
        }
    })
    .await
    .unwrap();
    drop(others);
}

/// A fleet given `redis-sentinel://` finds the master through the Sentinel and delivers end to
/// end: presence written by the gateway, read by the dispatcher, the receipt delivered on ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_a_sentinel_delivers_end_to_end() {
    let stack = Stack::start_behind_sentinel().await.unwrap();
    assert!(stack.common_config().redis_url.starts_with("redis-sentinel://"), "{}", stack.redis_url());
    let cluster = Cluster::new(stack, Options::default()).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    cluster.send("via-sentinel", &["alice"]).await.unwrap();
    assert_eq!(alice.next_notification(WAIT).await.expect("notification").id, "via-sentinel");
    alice.ack(["via-sentinel"]).await.unwrap();
    let receipt = cluster.wait_receipt("via-sentinel", "alice", "delivered").await.unwrap();
    assert_eq!(receipt.delivered_by.expect("delivered_by").gateway_id, gateway.id);
    // The presence is on the master the Sentinel named.
    let master = herald_shared::connect::redis(&cluster.stack.redis.url()).await.unwrap();
    let exists: i64 = master.exists(cluster.stack.names().presence_key("alice")).await.unwrap();
    assert_eq!(exists, 1);
}
