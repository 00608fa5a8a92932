//! End-to-end: publish → dispatcher → store → gateway → client → ack → receipt, on a real Redis
//! Cluster (three masters: every presence command must be cluster-safe), NATS JetStream and a
//! Mongo-compatible server. One stack per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use herald_tests::client::TestClient;
use herald_tests::cluster::{ws_url, Cluster, Options, ADMIN_TOKEN};
use herald_tests::services::Stack;
use herald_tests::{eventually, tokens};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_message_is_delivered_only_once_acked() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "m-1");
    let job = br#"{"id":"m-1","to":["alice"],"payload":{"title": "hi", "n": [1.50, 2]}}"#;
    cluster.publish_raw(job.to_vec(), headers).await.unwrap();
    let n = alice.next_notification(WAIT).await.expect("notification");
    assert_eq!(n.id, "m-1");
    assert_eq!(n.payload.get(), r#"{"title": "hi", "n": [1.50, 2]}"#, "the publisher's JSON, byte for byte");
    // Received but not acked: the receipt must still say pending.
    assert_eq!(cluster.receipts("m-1").await.unwrap()["alice"].state.as_str(), "pending");

    alice.ack(["m-1"]).await.unwrap();
    let receipt = cluster.wait_receipt("m-1", "alice", "delivered").await.unwrap();
    let by = receipt.delivered_by.expect("delivered_by");
    assert_eq!(by.connection_id, alice.hello().connection_id);
    assert_eq!(by.gateway_id, gateway.id);

    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/m-1", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipts"][0]["state"], "delivered");
    assert_eq!(body["counts"]["delivered"], 1);
    // A one-recipient message is carried by its receipt; the API reads it from there.
    assert_eq!(body["message"]["recipients"], 1);
    assert_eq!(body["message"]["payload"], serde_json::json!({"title": "hi", "n": [1.50, 2]}));
    assert_eq!(body["message"]["payload"]["title"], "hi");

    alice.read(["m-1"]).await.unwrap();
    cluster.wait_receipt("m-1", "alice", "read").await.unwrap();

    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/m-1", Some("wrong")).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    let (status, _) = cluster.api(dispatcher.addr, "/v1/users/alice/pending", None).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = cluster.api(dispatcher.addr, "/v1/messages/nope", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_arrive_in_order_on_connect_and_wait_for_acks() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let ids: Vec<String> = (0..5).map(|i| format!("off-{i}")).collect();
    for id in &ids {
        cluster.send(id, &["bob"]).await.unwrap();
    }
    for id in &ids {
        cluster.wait_receipt(id, "bob", "pending").await.unwrap();
    }
    let (status, body) = cluster.api(dispatcher.addr, "/v1/users/bob/pending", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((status, body["count"].as_u64()), (200, Some(5)));

    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    let got = bob.notifications_until(5, WAIT).await;
    let got_ids: Vec<&str> = got.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>(), "all, oldest first");
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    for id in &ids {
        assert_eq!(cluster.receipts(id).await.unwrap()["bob"].state.as_str(), "pending", "not acked yet");
    }
    bob.ack(ids.iter()).await.unwrap();
    for id in &ids {
        cluster.wait_receipt(id, "bob", "delivered").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_on_every_gateway_gets_the_message() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let d1 = cluster.dispatcher().await.unwrap();
    let _d2 = cluster.dispatcher().await.unwrap();
    let g1 = cluster.gateway().await.unwrap();
    let g2 = cluster.gateway().await.unwrap();
    let mut phone = cluster.connect(g1.addr, "carol").await.unwrap();
    let mut laptop = cluster.connect(g2.addr, "carol").await.unwrap();
    eventually(WAIT, Duration::from_millis(25), || async {
        let (_, body) =
            cluster.api(d1.addr, "/v1/users/carol/presence", Some(ADMIN_TOKEN)).await.map_err(|e| e.to_string())?;
        if body["connections"] == 2 {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await
    .unwrap();

    cluster.send("multi-1", &["carol"]).await.unwrap();
    assert_eq!(phone.next_notification(WAIT).await.expect("phone").id, "multi-1");
    assert_eq!(laptop.next_notification(WAIT).await.expect("laptop").id, "multi-1");
    laptop.ack(["multi-1"]).await.unwrap();
    let receipt = cluster.wait_receipt("multi-1", "carol", "delivered").await.unwrap();
    assert_eq!(receipt.delivered_by.unwrap().gateway_id, g2.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_larger_than_one_insert_reaches_recipients_in_every_part() {
    const RECIPIENTS: usize = 10_000;
    const { assert!(RECIPIENTS > herald_dispatcher::store::RECEIPTS_PER_INSERT, "the job must need more than one insert") };
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    // One recipient in the first insert, one in the last; the rest are offline.
    let (first, last) = ("fan-0".to_owned(), format!("fan-{}", RECIPIENTS - 1));
    let mut early = cluster.connect(gateway.addr, &first).await.unwrap();
    let mut late = cluster.connect(gateway.addr, &last).await.unwrap();
    cluster.wait_presence(dispatcher.addr, &first, true).await.unwrap();
    cluster.wait_presence(dispatcher.addr, &last, true).await.unwrap();

    // Store calls that wrote receipts, from the dispatcher's own metrics.
    let inserts = || async {
        let text = reqwest::get(format!("http://{}/metrics", dispatcher.internal)).await.unwrap().text().await.unwrap();
        let series = r#"herald_dependency_seconds_count{dependency="mongodb",op="insert_receipts"} "#;
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    let inserts_before = inserts().await;
    let to: Vec<String> = (0..RECIPIENTS).map(|i| format!("fan-{i}")).collect();
    cluster.publish(&json!({ "id": "big-1", "to": to, "payload": {} })).await.unwrap();
    for client in [&mut early, &mut late] {
        assert_eq!(client.next_notification(WAIT).await.expect("notification").id, "big-1");
        client.ack(["big-1"]).await.unwrap();
    }
    cluster.wait_receipt("big-1", &first, "delivered").await.unwrap();
    cluster.wait_receipt("big-1", &last, "delivered").await.unwrap();
    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/big-1", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["counts"]["delivered"], 2, "{}", body["counts"]);
    assert_eq!(body["counts"]["pending"], RECIPIENTS - 2, "every recipient has its receipt: {}", body["counts"]);
    assert!(inserts().await - inserts_before >= 2.0, "the receipts were written in more than one call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_stays_pending_and_comes_back_on_reconnect() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut dave = cluster.connect(gateway.addr, "dave").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "dave", true).await.unwrap();
    cluster.send("noack-1", &["dave"]).await.unwrap();
    assert_eq!(dave.next_notification(WAIT).await.expect("first delivery").id, "noack-1");
    drop(dave); // vanishes without acking
    cluster.wait_presence(dispatcher.addr, "dave", false).await.unwrap();
    assert_eq!(cluster.receipts("noack-1").await.unwrap()["dave"].state.as_str(), "pending");

    let mut dave = cluster.connect(gateway.addr, "dave").await.unwrap();
    assert_eq!(dave.next_notification(WAIT).await.expect("redelivery").id, "noack-1");
    dave.ack(["noack-1"]).await.unwrap();
    cluster.wait_receipt("noack-1", "dave", "delivered").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_is_sent_again_after_the_ack_timeout() {
    let options = Options { ack_timeout: Duration::from_millis(800), ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut erin = cluster.connect(gateway.addr, "erin").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "erin", true).await.unwrap();
    cluster.send("retry-1", &["erin"]).await.unwrap();
    assert_eq!(erin.next_notification(WAIT).await.expect("first").id, "retry-1");
    assert_eq!(erin.next_notification(WAIT).await.expect("sent again while connected").id, "retry-1");
    erin.ack(["retry-1"]).await.unwrap();
    cluster.wait_receipt("retry-1", "erin", "delivered").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_the_same_id_twice_yields_one_message_and_one_receipt_each() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let job = json!({"id": "dup-1", "to": ["u1", "u2"], "payload": {"v": 1}});
    cluster.publish(&job).await.unwrap();
    cluster.publish(&job).await.unwrap(); // dropped by JetStream (Nats-Msg-Id)
                                          // Past JetStream's window: no header, so only the store's unique keys can catch it.
    cluster.publish_raw(serde_json::to_vec(&job).unwrap(), async_nats::HeaderMap::new()).await.unwrap();
    cluster.send("after-dup", &["u1"]).await.unwrap();
    cluster.wait_receipt("after-dup", "u1", "pending").await.unwrap();

    let messages = cluster.db.collection::<mongodb::bson::Document>("messages");
    assert_eq!(messages.count_documents(mongodb::bson::doc! {"_id": "dup-1"}).await.unwrap(), 1);
    let receipts = cluster.receipts("dup-1").await.unwrap();
    assert_eq!(receipts.keys().cloned().collect::<Vec<_>>(), vec!["u1", "u2"]);
    let all = cluster.db.collection::<mongodb::bson::Document>("receipts");
    assert_eq!(all.count_documents(mongodb::bson::doc! {"message_id": "dup-1"}).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_the_upgrade_and_leave_no_presence() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let url = ws_url(gateway.addr);
    let secret = herald_tests::cluster::JWT_SECRET;
    let bad = [
        ("wrong signature", tokens::wrong_signature("mallory")),
        ("expired", tokens::expired(secret, "mallory")),
        ("not yet valid", tokens::not_yet_valid(secret, "mallory")),
        ("alg none", tokens::alg_none("mallory")),
        ("garbage", "not-a-token".to_owned()),
    ];
    for (what, token) in bad {
        let err = TestClient::connect(&url, &token).await.err().unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(err.status(), Some(401), "{what}: {err}");
        let err = TestClient::connect_with_query_token(&url, &token).await.err().expect("query token accepted");
        assert_eq!(err.status(), Some(401), "{what} in query: {err}");
    }
    let no_token = tungstenite_request(&url);
    let err = TestClient::connect_request(no_token, false).await.err().expect("no token accepted");
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("unauthorized"), "{err}");

    let redis = Builder::from_config(Config::from_url(&cluster.stack.redis_url()).unwrap()).build().unwrap();
    redis.init().await.unwrap();
    let key = cluster.stack.names().presence_key("mallory");
    let exists: i64 = redis.exists(key).await.unwrap();
    assert_eq!(exists, 0, "a refused client must leave no presence");

    // And a good token in the query works, as browsers need.
    let ok = TestClient::connect_with_query_token(&url, &cluster.token("mallory")).await.unwrap();
    assert!(!ok.hello().connection_id.as_str().is_empty());
}

fn tungstenite_request(url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    url.into_client_request().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_nothing_its_users_reconnect_elsewhere() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let _d2 = cluster.dispatcher().await.unwrap();
    let mut doomed = cluster.gateway_process().await.unwrap();
    let survivor = cluster.gateway().await.unwrap();
    let mut frank = cluster.connect(doomed.addr, "frank").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "frank", true).await.unwrap();

    let mut seen = BTreeSet::new();
    for i in 0..20 {
        cluster.send(&format!("k-{i:02}"), &["frank"]).await.unwrap();
    }
    // Some arrive (unacked: the frames may sit in buffers), then the gateway dies mid-stream.
    if let Some(n) = frank.next_notification(WAIT).await {
        seen.insert(n.id);
    }
    doomed.kill9();
    for i in 20..40 {
        cluster.send(&format!("k-{i:02}"), &["frank"]).await.unwrap();
    }
    drop(frank);
    let mut frank = cluster.connect(survivor.addr, "frank").await.unwrap();
    let mut acked = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked.len() < 40 && tokio::time::Instant::now() < deadline {
        if let Some(n) = frank.next_notification(Duration::from_millis(200)).await {
            frank.ack([n.id.as_str()]).await.unwrap();
            acked.insert(n.id);
        }
    }
    assert_eq!(acked.len(), 40, "every message reaches the survivor; seen before the kill: {seen:?}");
    for i in 0..40 {
        cluster.wait_receipt(&format!("k-{i:02}"), "frank", "delivered").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_is_never_delivered_and_reads_expired() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    cluster.publish(&json!({"id": "ttl-1", "to": ["gina"], "payload": 1, "ttl_secs": 1})).await.unwrap();
    cluster.send("ttl-keep", &["gina"]).await.unwrap();
    cluster.wait_receipt("ttl-1", "gina", "expired").await.unwrap();

    let mut gina = cluster.connect(gateway.addr, "gina").await.unwrap();
    let n = gina.next_notification(WAIT).await.expect("the unexpired one");
    assert_eq!(n.id, "ttl-keep");
    gina.ack(["ttl-keep"]).await.unwrap();
    cluster.wait_receipt("ttl-keep", "gina", "delivered").await.unwrap();
    // The expired message was pending longer than the live one and would have come first.
    assert!(gina.next_notification(Duration::from_millis(300)).await.is_none());
    let (_, body) = cluster.api(dispatcher.addr, "/v1/messages/ttl-1", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(body["receipts"][0]["state"], "expired");
    assert_eq!(cluster.receipts("ttl-1").await.unwrap()["gina"].state.as_str(), "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_jobs_are_rejected_with_a_reason_and_the_queue_moves_on() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut rejections = cluster.nats.subscribe(cluster.stack.names().rejected_subject()).await.unwrap();
    let mut hana = cluster.connect(gateway.addr, "hana").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "hana", true).await.unwrap();

    cluster.publish_raw(b"{not json".to_vec(), async_nats::HeaderMap::new()).await.unwrap();
    let big = "x".repeat(70 * 1024);
    cluster.publish(&json!({"id": "big-1", "to": ["hana"], "payload": big})).await.unwrap();
    cluster.send("fine-1", &["hana"]).await.unwrap();

    let mut codes = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut rejections)).await.unwrap().unwrap();
        let rejection: herald_proto::Rejection = serde_json::from_slice(&msg.payload).unwrap();
        assert!(!rejection.reason.is_empty());
        codes.push((rejection.code, rejection.job_id));
    }
    codes.sort_by_key(|(code, _)| format!("{code:?}"));
    assert_eq!(
        codes,
        vec![
            (herald_proto::RejectCode::Malformed, None),
            (herald_proto::RejectCode::PayloadTooLarge, Some("big-1".to_owned())),
        ]
    );
    assert_eq!(hana.next_notification(WAIT).await.expect("valid job after the bad ones").id, "fine-1");
    assert!(cluster.receipts("big-1").await.unwrap().is_empty());
}

/// Publish and connect at the same moment, 200 times: a connected client that acks everything
/// must end with nothing pending. The ack timeout is a minute, so only the write-then-lookup and
/// register-then-replay ordering can make this pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publish_and_connect_never_strands_a_message() {
    let cluster = Arc::new(Cluster::start_on_redis_cluster().await.unwrap());
    let _d1 = cluster.dispatcher().await.unwrap();
    let _d2 = cluster.dispatcher().await.unwrap();
    let g1 = cluster.gateway().await.unwrap();
    let g2 = cluster.gateway().await.unwrap();
    const N: usize = 200;
    let mut clients = tokio::task::JoinSet::new();
    for round in 0..N / 20 {
        let mut batch = Vec::new();
        for i in round * 20..(round + 1) * 20 {
            let cluster = Arc::clone(&cluster);
            let addr = if i % 2 == 0 { g1.addr } else { g2.addr };
            batch.push(tokio::spawn(async move {
                let user = format!("race-{i}");
                let id = format!("r-{i}");
                let to = [user.as_str()];
                // Spread the publish from 40 ms before to 40 ms after the connect, so the
                // rounds sweep across every interleaving of the two paths.
                let offset = Duration::from_millis((i as u64 * 7919) % 41 * 2);
                let (publish_delay, connect_delay) =
                    if i % 2 == 0 { (offset, Duration::ZERO) } else { (Duration::ZERO, offset) };
                let publish = async {
                    tokio::time::sleep(publish_delay).await;
                    cluster.send(&id, &to).await
                };
                let connect = async {
                    tokio::time::sleep(connect_delay).await;
                    cluster.connect(addr, &user).await
                };
                let (sent, client) = tokio::join!(publish, connect);
                sent.unwrap();
                client.unwrap()
            }));
        }
        for task in batch {
            let mut client = task.await.unwrap();
            clients.spawn(async move {
                // Ack everything, forever (until the test ends).
                loop {
                    if let Some(n) = client.next_notification(Duration::from_secs(3600)).await {
                        let _ = client.ack([n.id.as_str()]).await;
                    }
                }
            });
        }
    }
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async {
        let delivered = cluster.receipts_in("delivered").await.map_err(|e| e.to_string())?;
        let pending = cluster.receipts_in("pending").await.map_err(|e| e.to_string())?;
        if delivered.len() == N && pending.is_empty() {
            Ok(())
        } else {
            Err(format!("{} delivered, pending: {:?}", delivered.len(), &pending[..pending.len().min(10)]))
        }
    })
    .await
    .unwrap();
    clients.abort_all();
}

/// A message published as its recipient connects reaches the connection both ways, routed live
/// (presence already lists the connection) and in the replay (its receipt was already stored):
/// the gateway must write it once. Each round: a message pending before the connect (`pre-N`,
/// which only the replay brings), then `race-N` published at the moment of connecting, then,
/// once both paths have been taken, a sentinel. One dispatcher, so every command reaches the
/// gateway in the order it was published: by the sentinel, any second copy would have arrived.
/// The ack timeout is a minute: nothing here is a resend (that one is
/// `an_unacked_message_is_sent_again_after_the_ack_timeout`).
///
/// Whether a round races is up to the scheduler: about one round in six did here. Rounds go on
/// until two have raced (at most `MAX_ROUNDS`), rather than a fixed twelve: a CI run at
/// `1a787af` raced in none of those and failed for want of a race (about one run in seven at
/// that rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_as_its_recipient_connects_arrives_once() {
    let cluster = Cluster::start_on_redis_cluster().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    /// Publish offsets swept per cycle of rounds.
    const ROUNDS: u64 = 12;
    const MAX_ROUNDS: u64 = 8 * ROUNDS;
    let mut both_paths = 0;
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        if both_paths >= 2 {
            break;
        }
        rounds += 1;
        let user = format!("hasty-{round}");
        let (pre, race, sentinel) = (format!("pre-{round}"), format!("race-{round}"), format!("sentinel-{round}"));
        cluster.send(&pre, &[user.as_str()]).await.unwrap();
        cluster.wait_jobs_handled().await.unwrap();
        let repeated_before = repeated(gateway.internal).await;
        // From 10 ms before the connect starts to 20 ms after: hello, presence and the online
        // event all fall in that span.
        let offset = Duration::from_millis((round % ROUNDS) * 30 / ROUNDS);
        let publish = async {
            tokio::time::sleep(offset).await;
            cluster.send(&race, &[user.as_str()]).await
        };
        let connect = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            cluster.connect(gateway.addr, &user).await
        };
        let (sent, client) = tokio::join!(publish, connect);
        sent.unwrap();
        let mut client = client.unwrap();
        let mut got: Vec<String> = Vec::new();
        let seen = |id: &str, got: &[String]| got.iter().any(|g| g == id);
        while !seen(&pre, &got) || !seen(&race, &got) {
            got.push(client.next_notification(WAIT).await.expect("pre and race").id.into_string());
        }
        cluster.wait_jobs_handled().await.unwrap();
        cluster.send(&sentinel, &[user.as_str()]).await.unwrap();
        while !seen(&sentinel, &got) {
            got.push(client.next_notification(WAIT).await.expect("the sentinel").id.into_string());
        }
        let copies = got.iter().filter(|id| **id == race).count();
        assert_eq!(copies, 1, "round {round}: {race} arrived {copies} times; received {got:?}");
        assert_eq!(got.iter().filter(|id| **id == pre).count(), 1, "round {round}: {got:?}");
        both_paths += (repeated(gateway.internal).await - repeated_before) as u64;
    }
    println!("{both_paths} of {rounds} rounds sent the message both ways; the gateway wrote it once");
    assert!(both_paths > 0, "no round raced: the test did not exercise the two paths");
}

/// `herald_gateway_notifications_repeated_total` of the gateway whose internal listener is `addr`.
async fn repeated(addr: std::net::SocketAddr) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    let series = "herald_gateway_notifications_repeated_total ";
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

/// A backlog of ten replay pages (1,000 pending, pages of 100) arrives whole, oldest first and
/// once each, page after page as the client reads and acks. The ack timeout is two minutes and
/// the wait one: only the paging can deliver past the first page (it used to leave the rest to
/// the ack-timeout sweep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_many_pages_arrives_whole_and_in_order_without_the_ack_timeout() {
    let options = Options { ack_timeout: Duration::from_secs(120), replay_page: 100, ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    const N: usize = 1000;
    let ids: Vec<String> = (0..N).map(|i| format!("page-{i:04}")).collect();
    for id in &ids {
        cluster.send(id, &["ursula"]).await.unwrap();
    }
    eventually(WAIT, Duration::from_millis(100), || async {
        let pending = cluster.receipts_in("pending").await.map_err(|e| e.to_string())?;
        if pending.len() == N {
            Ok(())
        } else {
            Err(format!("{} of {N} stored", pending.len()))
        }
    })
    .await
    .unwrap();

    let connected_at = tokio::time::Instant::now();
    let mut ursula = cluster.connect(gateway.addr, "ursula").await.unwrap();
    let deadline = connected_at + Duration::from_secs(60);
    let mut got = Vec::with_capacity(N);
    let mut unacked = Vec::new();
    while got.len() < N {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(n) = ursula.next_notification(left).await else { break };
        unacked.push(n.id.to_string());
        got.push(n);
        // Acks in batches, as a real client sends them.
        if unacked.len() == 50 || got.len() == N {
            ursula.ack(unacked.drain(..)).await.unwrap();
        }
    }
    println!("{} of {N} in {:.2} s from the connect", got.len(), connected_at.elapsed().as_secs_f64());
    let got_ids: Vec<&str> = got.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(got.len(), N, "{} of {N} within a minute; the last: {:?}", got.len(), got_ids.last());
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>(), "all, once each, oldest first");
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "in seq order");
    eventually(WAIT, Duration::from_millis(100), || async {
        let delivered = cluster.receipts_in("delivered").await.map_err(|e| e.to_string())?;
        if delivered.len() == N {
            Ok(())
        } else {
            Err(format!("{} of {N} delivered", delivered.len()))
        }
    })
    .await
    .unwrap();
}

/// The store round trips of a storm of replays: ten users with backlogs of two pages connect
/// together, and their page requests are answered a round at a time, one query for the first
/// pages of the round and one for the further pages, not one query per request (before: 1 for
/// the first pages, one more for each user the shared query crowded out, and one per further
/// page; at least 11 here). On a store that answers one query at a time (nx-27017), the queries
/// of one round queued behind each other, and a backlog took seconds per page (chaos seed 1:
/// 370 messages over 10 s, their last ones expiring under their connected users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_replays_costs_the_store_a_query_or_two_a_round_not_one_per_page() {
    const USERS: usize = 10;
    const EACH: usize = 300;
    let options = Options { ack_timeout: Duration::from_secs(120), ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let mut config = herald_tests::cluster::dispatcher_config(&cluster.stack, &cluster.options);
    // Events gathered for half a second: the users' requests of each round come in one batch.
    config.event_linger = Duration::from_millis(500);
    let dispatcher = cluster.dispatcher_with(config).await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let users: Vec<String> = (0..USERS).map(|u| format!("storm-{u}")).collect();
    // Interleaved, so that the users' backlogs share the seq range as they would in real life.
    for i in 0..EACH {
        for user in &users {
            cluster.send(&format!("{user}-{i:03}"), &[user.as_str()]).await.unwrap();
        }
    }
    eventually(Duration::from_secs(60), Duration::from_millis(200), || async {
        let pending = cluster.receipts_in("pending").await.map_err(|e| e.to_string())?;
        if pending.len() == USERS * EACH {
            Ok(())
        } else {
            Err(format!("{} of {} stored", pending.len(), USERS * EACH))
        }
    })
    .await
    .unwrap();
    let queries = || async {
        let text = reqwest::get(format!("http://{}/metrics", dispatcher.internal)).await?.text().await?;
        let line = r#"herald_dependency_seconds_count{dependency="mongodb",op="pending_receipts"} "#;
        Ok::<u64, anyhow::Error>(text.lines().find_map(|l| l.strip_prefix(line)?.parse().ok()).unwrap_or(0))
    };
    let before = queries().await.unwrap();

    let mut clients = Vec::new();
    for user in &users {
        clients.push(cluster.connect(gateway.addr, user).await.unwrap());
    }
    let reads = clients.into_iter().zip(&users).map(|(mut client, user)| async move {
        let mut got = Vec::with_capacity(EACH);
        let mut unacked = Vec::new();
        while got.len() < EACH {
            let Some(n) = client.next_notification(Duration::from_secs(60)).await else { break };
            if got.contains(&n.id.to_string()) {
                continue;
            }
            unacked.push(n.id.to_string());
            got.push(n.id.to_string());
            if unacked.len() == 100 || got.len() == EACH {
                client.ack(unacked.drain(..)).await.unwrap();
            }
        }
        let want: Vec<String> = (0..EACH).map(|i| format!("{user}-{i:03}")).collect();
        assert_eq!(got, want, "{user}: all of its backlog, oldest first");
        client
    });
    let _clients = futures::future::join_all(reads).await;
    let used = queries().await.unwrap() - before;
    println!("{USERS} users x {EACH} pending (pages of 256): {used} replay queries");
    // Two rounds at the least (first pages, then the rest), a third for pages a full shared
    // query cut short; one query each, and one more for any user a round's query crowded out.
    assert!(used <= 8, "{used} replay queries for {USERS} users' two pages each");
}

/// More pending messages than one replay page, for two users, with a short ack timeout (so
/// resends mix in): nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_a_replay_page_is_delivered_in_full() {
    let options = Options { ack_timeout: Duration::from_millis(500), ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    const N: usize = 300;
    for i in 0..N {
        cluster.send(&format!("bl-{i:03}"), &["ivan", "judy"]).await.unwrap();
    }
    eventually(WAIT, Duration::from_millis(100), || async {
        let pending = cluster.receipts_in("pending").await.map_err(|e| e.to_string())?;
        if pending.len() == 2 * N {
            Ok(())
        } else {
            Err(format!("{} stored", pending.len()))
        }
    })
    .await
    .unwrap();
    // Let the sweeper park them as offline (no retry time) before the users connect.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, body) =
        cluster.api(dispatcher.addr, "/v1/users/ivan/pending?limit=10000", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(body["count"], N);

    for user in ["ivan", "judy"] {
        let mut client = cluster.connect(gateway.addr, user).await.unwrap();
        let mut got = HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < N && tokio::time::Instant::now() < deadline {
            if let Some(n) = client.next_notification(Duration::from_millis(500)).await {
                client.ack([n.id.as_str()]).await.unwrap();
                got.insert(n.id);
            }
        }
        assert_eq!(got.len(), N, "{user} got every message of the backlog");
    }
    eventually(WAIT, Duration::from_millis(100), || async {
        let pending = cluster.receipts_in("pending").await.map_err(|e| e.to_string())?;
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("{} still pending", pending.len()))
        }
    })
    .await
    .unwrap();
}

/// Resending is divided among dispatchers by partition (issue 11 item 9): while another
/// dispatcher holds a partition's lock, that partition's receipts are not resent here, and every
/// other partition's are; once the lock goes, they are resent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_divided_among_dispatchers_by_partition() {
    use herald_dispatcher::store::partition_of;
    use herald_proto::UserId;
    let options = Options { ack_timeout: Duration::from_millis(500), ..Options::default() };
    let cluster = Cluster::new(Stack::start_on_redis_cluster().await.unwrap(), options).await.unwrap();
    let held_user = "held-user";
    let held = partition_of(&UserId::new(held_user).unwrap());
    let free_user = (0..)
        .map(|i| format!("free-user-{i}"))
        .find(|u| partition_of(&UserId::new(u.as_str()).unwrap()) != held)
        .unwrap();
    // Another dispatcher, as far as this one can tell, sweeps the held partition.
    let redis = cluster.redis().await.unwrap();
    let lock = cluster.stack.names().resend_lock_key(held);
    let _: () = redis.set(&lock, "another-dispatcher", Some(Expiration::PX(120_000)), None, false).await.unwrap();

    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut held_client = cluster.connect(gateway.addr, held_user).await.unwrap();
    let mut free_client = cluster.connect(gateway.addr, &free_user).await.unwrap();
    cluster.wait_presence(dispatcher.addr, held_user, true).await.unwrap();
    cluster.wait_presence(dispatcher.addr, &free_user, true).await.unwrap();
    cluster.send("to-held", &[held_user]).await.unwrap();
    cluster.send("to-free", &[&free_user]).await.unwrap();
    assert_eq!(held_client.next_notification(WAIT).await.map(|n| n.id.into_string()).as_deref(), Some("to-held"));
    // Neither acks. The free partition is resent, again and again.
    for _ in 0..3 {
        let n = free_client.next_notification(WAIT).await.expect("a resend");
        assert_eq!(n.id, "to-free");
    }
    // Three resends of the free partition took three ack timeouts: the held one would have had
    // as many by now. (At most one more copy may have come: a replay that raced the first
    // delivery right after connecting.)
    let mut copies = 0;
    while held_client.next_notification(Duration::from_millis(100)).await.is_some() {
        copies += 1;
    }
    assert!(copies <= 1, "a held partition is not resent: {copies} more copies");
    let _: i64 = redis.del(&lock).await.unwrap();
    let n = held_client.next_notification(WAIT).await.expect("resent once its lock is free");
    assert_eq!(n.id, "to-held");
}

/// A client that asks for `heartbeat=frame` (what a browser, blind to pings, needs to tell a dead
/// connection from an idle one) gets a `heartbeat` text frame each interval; one that does not
/// ask gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_frames_come_each_interval_only_to_clients_that_ask() {
    use herald_proto::client::ServerFrame;
    use herald_tests::client::Frame;

    let interval = Duration::from_millis(300);
    let cluster = Cluster::new(
        Stack::start_on_redis_cluster().await.unwrap(),
        Options { heartbeat_interval: interval, ..Options::default() },
    )
    .await
    .unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let token = cluster.token("beats");
    let url = format!("{}?heartbeat=frame", ws_url(gateway.addr));
    let mut asking = TestClient::connect(&url, &token).await.unwrap();
    let mut plain = TestClient::connect(&ws_url(gateway.addr), &cluster.token("quiet")).await.unwrap();
    let count_beats =
        |frames: Vec<Frame>| frames.iter().filter(|f| matches!(f, Frame::Server(ServerFrame::Heartbeat))).count();
    let (mut got_asking, mut got_plain) = (Vec::new(), Vec::new());
    let until = tokio::time::Instant::now() + interval * 5;
    while tokio::time::Instant::now() < until {
        got_asking.push(asking.next_frame(Duration::from_millis(50)).await);
        got_plain.push(plain.next_frame(Duration::from_millis(50)).await);
    }
    let (beats, quiet) = (count_beats(got_asking), count_beats(got_plain));
    assert!(beats >= 3, "{beats} heartbeat frames in five intervals");
    assert_eq!(quiet, 0, "a client that did not ask got heartbeat frames");
}

/// Everything stored for a message (its document or the receipt carrying it, every receipt,
/// the claim on its id) is purged `HERALD_RETENTION_DAYS` after the message expires, as the
/// dispatcher that stored it was configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_are_kept_for_the_configured_retention_past_their_expiry() {
    use futures::TryStreamExt as _;
    use herald_shared::naming::collections;
    use mongodb::bson::{doc, Document};

    let cluster = Cluster::new(Stack::start().await.unwrap(), Options::default()).await.unwrap();
    let mut config = herald_tests::cluster::dispatcher_config(&cluster.stack, &cluster.options);
    let retention = Duration::from_secs(2 * 86_400);
    config.retention = retention;
    let _dispatcher = cluster.dispatcher_with(config).await.unwrap();
    cluster.publish(&json!({"id": "solo", "to": ["ann"], "ttl_secs": 60, "payload": {}})).await.unwrap();
    cluster.publish(&json!({"id": "pair", "to": ["ann", "ben"], "ttl_secs": 90, "payload": {}})).await.unwrap();
    cluster.wait_jobs_handled().await.unwrap();

    let ids = vec!["solo", "pair"];
    let receipts = cluster.db.collection::<Document>(collections::RECEIPTS);
    let messages = cluster.db.collection::<Document>(collections::MESSAGES);
    let mut stored: Vec<Document> = receipts
        .find(doc! { "$or": [ { "message_id": { "$in": &ids } }, { "_id": { "$in": &ids } } ] })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    stored.extend(messages.find(doc! { "_id": { "$in": &ids } }).await.unwrap().try_collect::<Vec<_>>().await.unwrap());
    // Receipts of solo (1) and pair (2), the two claims, pair's message document.
    assert_eq!(stored.len(), 6, "{stored:?}");
    let expiry = |id: &str| {
        let receipt = stored.iter().find(|d| d.get_str("message_id") == Ok(id)).expect("a receipt");
        receipt.get_datetime("expires_at").unwrap().timestamp_millis()
    };
    for document in &stored {
        let id = document.get_str("message_id").or_else(|_| document.get_str("_id")).unwrap();
        let purge_at = document.get_datetime("purge_at").unwrap().timestamp_millis();
        assert_eq!(purge_at - expiry(id), retention.as_millis() as i64, "{document:?}");
    }
}
