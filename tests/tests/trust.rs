//! Trust by construction (issue 10): the attacks an outside review made on 8991444, each as the
//! attacker made it, end to end on real Redis, NATS and the store. Every test here failed on that
//! commit: forged receipts through a separator, reused server-assigned ids, an id reused for
//! another job, an ack flood, payloads that crashed the query API, token arithmetic, and acks
//! of messages a connection was never sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use herald_proto::{close, RejectCode, Rejection};
use herald_tests::client::{Frame, TestClient};
use herald_tests::cluster::{gateway_config, ws_url, Cluster, ADMIN_TOKEN, JWT_SECRET};
use herald_tests::tokens::Claims;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// How the connection ended: the close code, if a close frame came.
async fn close_code(client: &mut TestClient) -> Option<u16> {
    loop {
        match client.next_frame(WAIT).await {
            Frame::Close { code, .. } => return Some(code),
            Frame::Error(_) | Frame::Closed | Frame::Timeout => return None,
            _ => {}
        }
    }
}

/// Item 1: `alice` acks `m1/org` and so named the receipt `m1/org/alice`, which is `org/alice`'s.
/// A message id cannot hold `/` now, so the frame is malformed (4400) and the receipt untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_cannot_name_another_users_receipt_through_a_separator() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();

    // The victim is offline: the message waits for them.
    cluster.send("m1", &["org/alice"]).await.unwrap();
    cluster.wait_receipt("m1", "org/alice", "pending").await.unwrap();
    alice.ack(["m1/org"]).await.unwrap();
    assert_eq!(close_code(&mut alice).await, Some(close::BAD_FRAME), "a separator in an id is a bad frame");

    // A well-formed id of someone else's message counts for nothing either.
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    alice.ack(["m1"]).await.unwrap();
    alice.read(["m1"]).await.unwrap();
    // Once alice's own ack has been applied, hers before it have too (one gateway, in order).
    cluster.send("alice-own", &["alice"]).await.unwrap();
    let n = alice.next_notification(WAIT).await.expect("alice gets her own message");
    alice.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("alice-own", "alice", "delivered").await.unwrap();
    let receipts = cluster.receipts("m1").await.unwrap();
    assert_eq!(receipts["org/alice"].state.as_str(), "pending", "the victim's receipt is untouched");

    let mut victim = cluster.connect(gateway.addr, "org/alice").await.unwrap();
    let n = victim.next_notification(WAIT).await.expect("the victim still gets the message");
    assert_eq!(n.id, "m1");
}

/// Item 2: the jobs stream is re-created, its sequences start at 1 again, and a job without an
/// id gets the id the first stream's job had. It was taken for a redelivery: never stored, and
/// its recipient got nothing. Now the assigned id names the stream's timestamp as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_jobs_stream_never_reuses_a_message_id() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bob", true).await.unwrap();

    let first = json!({"to": ["bob"], "payload": {"n": "first"}});
    assert_eq!(cluster.publish(&first).await.unwrap(), 1);
    let n1 = bob.next_notification(WAIT).await.expect("the first job");
    bob.ack([n1.id.as_str()]).await.unwrap();
    cluster.wait_receipt(n1.id.as_str(), "bob", "delivered").await.unwrap();

    let names = cluster.stack.names();
    cluster.js.delete_stream(names.jobs_stream()).await.unwrap();
    herald_shared::streams::ensure(&cluster.js, &names, 1, &Default::default()).await.unwrap();
    let second = json!({"to": ["bob"], "payload": {"n": "second"}});
    assert_eq!(cluster.publish(&second).await.unwrap(), 1, "the new stream starts at 1 again");

    let n2 = bob.next_notification(Duration::from_secs(30)).await.expect("the second job is delivered");
    assert_ne!(n2.id, n1.id, "a new message gets a new id");
    assert_eq!(n2.payload.get(), r#"{"n":"second"}"#);
    bob.ack([n2.id.as_str()]).await.unwrap();
    cluster.wait_receipt(n2.id.as_str(), "bob", "delivered").await.unwrap();
}

/// Item 2: a publisher reuses an `id` for another job. It is rejected as `id_conflict`; the
/// stored message and its receipts stay as they were; the new recipient gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_reused_for_another_job_is_rejected_as_id_conflict() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut rejections = cluster.nats.subscribe(cluster.stack.names().rejected_subject()).await.unwrap();
    let mut carol = cluster.connect(gateway.addr, "carol").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "carol", true).await.unwrap();

    // Published without `Nats-Msg-Id`, as after JetStream's 2-minute dedupe window: each of
    // these reaches the dispatcher.
    let publish =
        |job: serde_json::Value| cluster.publish_raw(job.to_string().into_bytes(), async_nats::HeaderMap::new());
    publish(json!({"id": "order-1", "to": ["bob"], "payload": {"v": 1}})).await.unwrap();
    cluster.wait_receipt("order-1", "bob", "pending").await.unwrap();
    // The same job again (a publisher's retry): the same message, no rejection.
    publish(json!({"id": "order-1", "to": ["bob"], "payload": {"v": 1}})).await.unwrap();
    // Another job under that id, for another user, and then one for several.
    let conflicting = publish(json!({"id": "order-1", "to": ["carol"], "payload": {"v": 2}})).await.unwrap();
    let fan_out = publish(json!({"id": "order-1", "to": ["bob", "carol", "dave"], "payload": {"v": 3}})).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(WAIT, rejections.next()).await.expect("rejections").unwrap();
        let rejection: Rejection = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(rejection.code, RejectCode::IdConflict, "{rejection:?}");
        assert_eq!(rejection.job_id.as_deref(), Some("order-1"));
        seen.push(rejection.stream_seq);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![conflicting, fan_out], "exactly the two different jobs are refused");

    let receipts = cluster.receipts("order-1").await.unwrap();
    assert_eq!(receipts.keys().collect::<Vec<_>>(), vec!["bob"], "nothing of the conflicting jobs is kept");
    cluster.send("carol-own", &["carol"]).await.unwrap();
    let n = carol.next_notification(WAIT).await.expect("carol's own message");
    assert_eq!(n.id, "carol-own", "carol never got the conflicting job");
    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/order-1", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["message"]["payload"], json!({"v": 1}), "the stored message is the first: {body}");
}

/// Item 3: connections of one user flood acks. Past its id budget a connection is closed with
/// 4429, and another user's ack in the same moments is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_flood_is_closed_with_4429_and_takes_no_one_elses_acks() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.client_ack_ids_per_sec = 2000;
    let gateway = cluster.gateway_with(config).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut flooders = Vec::new();
    for _ in 0..5 {
        flooders.push(cluster.connect(gateway.addr, "mallory").await.unwrap());
    }
    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bob", true).await.unwrap();
    cluster.send("bob-1", &["bob"]).await.unwrap();
    let n = bob.next_notification(WAIT).await.expect("bob's message");

    let ids: Vec<String> = (0..1000).map(|i| format!("flood-{i:04}")).collect();
    for flooder in &mut flooders {
        for _ in 0..10 {
            if flooder.ack(&ids).await.is_err() {
                break;
            }
        }
    }
    bob.ack([n.id.as_str()]).await.unwrap();
    for flooder in &mut flooders {
        assert_eq!(close_code(flooder).await, Some(close::RATE_LIMITED), "10,000 ids at once is over the budget");
    }
    cluster.wait_receipt("bob-1", "bob", "delivered").await.unwrap();
}

/// Item 5: payloads the query API could not render (a lone surrogate escape) are passed through
/// as raw JSON by both reads; too deep a payload is refused at validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_returns_any_stored_payload_as_it_was_published() {
    let cluster = Cluster::start().await.unwrap();
    let _gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let surrogate = r#"{"s":"\ud800"}"#;
    let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
    for (id, payload) in [("lone-surrogate", surrogate), ("deep-64", deep.as_str())] {
        let body = format!(r#"{{"id":"{id}","to":["erin"],"payload":{payload}}}"#);
        cluster.publish_raw(body.into_bytes(), async_nats::HeaderMap::new()).await.unwrap();
        cluster.wait_receipt(id, "erin", "pending").await.unwrap();
    }
    let http = reqwest::Client::new();
    let get = |path: String| http.get(format!("http://{}{path}", dispatcher.addr)).bearer_auth(ADMIN_TOKEN).send();
    let message = get("/v1/messages/lone-surrogate".into()).await.expect("the API answers").text().await.unwrap();
    assert!(message.contains(surrogate), "the payload byte for byte: {message}");
    let pending = get("/v1/users/erin/pending".into()).await.expect("the API answers");
    assert_eq!(pending.status(), 200);
    let pending = pending.text().await.unwrap();
    assert!(pending.contains(surrogate) && pending.contains(&deep), "{pending}");
}

/// Item 6: a token whose `exp` overflowed `exp * 1000` killed its session after `hello`, and the
/// dead session stayed in the registry and in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_huge_exp_works_and_its_session_leaves_presence() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut claims = Claims::new("frank", Duration::from_secs(60));
    claims.exp = 18_500_000_000_000_000;
    let url = ws_url(gateway.addr);
    let mut frank = TestClient::connect(&url, &claims.sign(JWT_SECRET)).await.unwrap();
    cluster.wait_presence(dispatcher.addr, "frank", true).await.unwrap();
    cluster.send("frank-1", &["frank"]).await.unwrap();
    let n = frank.next_notification(WAIT).await.expect("the session is alive");
    frank.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("frank-1", "frank", "delivered").await.unwrap();
    frank.close().await.unwrap();
    cluster.wait_presence(dispatcher.addr, "frank", false).await.unwrap();
}

/// Item 7: an ack or read counts only for a notification that connection was sent. An expired
/// message never sent stays expired; a read sent before the replay does not hide the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_what_a_connection_was_sent_can_become_delivered_or_read() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    cluster.publish(&json!({"id": "short", "to": ["gina"], "payload": 1, "ttl_secs": 1})).await.unwrap();
    cluster.publish(&json!({"id": "later", "to": ["gina"], "payload": 2})).await.unwrap();
    cluster.wait_receipt("later", "gina", "pending").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // let "short" expire: the scenario, not a wait for a result

    let mut gina = cluster.connect(gateway.addr, "gina").await.unwrap();
    // Before any replay can arrive: an ack of the expired message, a read of the pending one.
    gina.ack(["short"]).await.unwrap();
    gina.read(["later"]).await.unwrap();
    let n = gina.next_notification(WAIT).await.expect("the pending message is still replayed");
    assert_eq!(n.id, "later");
    gina.ack(["later"]).await.unwrap();
    // `read` if the replay won the race with the read frame (the read then counts: the message
    // was sent on this connection first); `delivered` otherwise.
    herald_tests::eventually(WAIT, Duration::from_millis(50), || async {
        let state = cluster.receipts("later").await.map_err(|e| e.to_string())?["gina"].state;
        if matches!(state.as_str(), "delivered" | "read") {
            Ok(())
        } else {
            Err(format!("later/gina is {state:?}"))
        }
    })
    .await
    .unwrap();
    let short = &cluster.receipts("short").await.unwrap()["gina"];
    assert!(matches!(short.state.as_str(), "pending" | "expired"), "never sent, never delivered: {:?}", short.state);
    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/short", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((status, body["receipts"][0]["state"].as_str()), (200, Some("expired")), "{body}");
}

/// Events in the flood below: 100 of about 900 KB, 4 million ids of one user.
const FLOOD_EVENTS: usize = 100;

/// Item 3, the dispatcher's side: a flood of acks straight on the events stream, as a gateway
/// that passed every frame on would send it. On 8991444 each batch became one 21 MB update the store refused, and every event in
/// the batch, other users' acks included, was dropped; memory grew to about 1 GB. Now fetches are
/// bounded by bytes, ids are deduplicated per user, statements are packed by count and bytes, and
/// the acks of another user in the same moments are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_flood_on_the_events_stream_keeps_dispatcher_memory_bounded() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut first = cluster.dispatcher_process().await.unwrap();
    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    cluster.wait_presence(first.addr, "bob", true).await.unwrap();
    cluster.send("bob-during-flood", &["bob"]).await.unwrap();
    let n = bob.next_notification(WAIT).await.expect("bob's message");
    // The flood and bob's ack wait in the stream together, as a burst does while dispatchers
    // are busy: the next dispatcher pulls them in the same batches.
    first.kill9();
    let ids: Vec<String> = (0..1000).map(|i| format!("flood-message-{i:06}")).collect();
    let record = json!({
        "user": "mallory", "connection_id": "c0", "gateway_id": "gw-flood",
        "kind": "read", "ids": ids, "at_ms": 1,
    });
    let event = serde_json::to_vec(&json!({ "acks": vec![record; 40] })).unwrap();
    assert!(event.len() > 800 * 1024 && event.len() < 1024 * 1024, "{} bytes", event.len());
    let subject = cluster.stack.names().ack_events_subject("gw-flood");
    for i in 0..FLOOD_EVENTS {
        cluster.js.publish(subject.clone(), event.clone().into()).await.unwrap().await.unwrap();
        if i == FLOOD_EVENTS / 2 {
            bob.ack([n.id.as_str()]).await.unwrap();
        }
    }

    let dispatcher = cluster.dispatcher_process().await.unwrap();
    let before = dispatcher.rss_kib().unwrap();
    let mut peak = before;
    let applied = async {
        loop {
            peak = peak.max(dispatcher.rss_kib().unwrap());
            let receipts = cluster.receipts("bob-during-flood").await.unwrap();
            if receipts["bob"].state.as_str() == "delivered" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), applied).await.expect("bob's ack is applied despite the flood");
    println!("dispatcher RSS: {before} KiB at start, {peak} KiB at the peak of the flood");
    assert!(peak < 256 * 1024, "dispatcher RSS reached {peak} KiB under the flood (from {before} KiB)");
}
