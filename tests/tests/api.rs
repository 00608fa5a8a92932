//! The dispatcher's HTTP API end to end: publishing over HTTP (validated before anything is
//! published, answered after JetStream's ack with the id clients then receive), scoped tokens,
//! bad input, the OpenAPI document against the live routes, and the operator's endpoints (kick,
//! cancel, forget, rejections, status). Real Redis, NATS and nx-27017; one stack per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use herald_proto::{ErrorCode, ServerFrame};
use herald_tests::client::{Frame, TestClient};
use herald_tests::cluster::{Cluster, Options, ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN};
use herald_tests::eventually;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// The next notification that is not a repeat of one in `seen` (delivery is at least once: a
/// replay racing the live route may send a message twice).
async fn next_new(client: &mut TestClient, seen: &mut Vec<String>) -> herald_proto::Notification {
    loop {
        let n = client.next_notification(WAIT).await.expect("a notification");
        if !seen.contains(&n.id.to_string()) {
            seen.push(n.id.to_string());
            return n;
        }
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_answers_with_the_id_and_seq_clients_receive_and_refuses_bad_jobs() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    let d = dispatcher.addr;
    let mut seen = Vec::new();

    // No id, no key: an id is generated, and the notification carries exactly that id and seq.
    let (status, body) = cluster
        .post(d, "/v1/publish", Some(PUBLISH_TOKEN), &json!({"to": ["alice"], "payload": {"t": 1}}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(keys(&body), ["id", "seq"], "the contract's answer: {body}");
    let n = next_new(&mut alice, &mut seen).await;
    assert_eq!((n.id.as_str(), n.seq), (body["id"].as_str().unwrap(), body["seq"].as_u64().unwrap()));
    assert!(n.id.as_str().starts_with("auto-"), "{}", n.id);
    assert_eq!(n.payload.get(), r#"{"t":1}"#);

    // The job's id; a repeat is a duplicate with the same seq.
    let job = json!({"id": "order-1", "to": ["alice"], "payload": {"t": 2}, "ttl_secs": 600});
    let (status, first) = cluster.post(d, "/v1/publish", Some(ADMIN_TOKEN), &job).await.unwrap();
    assert_eq!((status, first["id"].as_str()), (201, Some("order-1")), "{first}");
    let n = next_new(&mut alice, &mut seen).await;
    assert_eq!((n.id.as_str(), n.seq), ("order-1", first["seq"].as_u64().unwrap()));
    let (status, again) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &job).await.unwrap();
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"id": "order-1", "seq": first["seq"], "duplicate": true}));
    cluster.wait_receipt("order-1", "alice", "pending").await.unwrap();
    // Stored: a repeat after JetStream's window would also be answered from the store.
    let (status, stored) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &job).await.unwrap();
    assert_eq!((status, &stored), (200, &again));

    // The same id with other content: refused now, not rejected later.
    let before = cluster.jobs_last_seq().await.unwrap();
    let other = json!({"id": "order-1", "to": ["alice"], "payload": {"t": "other"}});
    let (status, body) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &other).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str(), body["code"].as_str()),
        (400, Some("rejected"), Some("id_conflict")),
        "{body}"
    );

    // Idempotency-Key: the Nats-Msg-Id, and the id of a job without one.
    let c = &cluster;
    let keyed = |key: &'static str| async move {
        let body = serde_json::to_vec(&json!({"to": ["alice"], "payload": {"t": 3}})).unwrap();
        c.request(Method::POST, d, "/v1/publish", Some(PUBLISH_TOKEN), &[("Idempotency-Key", key)], Some(body)).await
    };
    let (status, _, body) = keyed("key-1").await.unwrap();
    assert_eq!((status, body["id"].as_str()), (201, Some("key-1")), "{body}");
    assert_eq!(next_new(&mut alice, &mut seen).await.id, "key-1");
    let (status, _, body) = keyed("key-1").await.unwrap();
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(true)), "{body}");
    let (status, _, body) = keyed("seq-9-9").await.unwrap();
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_id")), "{body}");
    let after_keys = cluster.jobs_last_seq().await.unwrap();

    // Every bad job gets the pipeline's code and reason, and nothing is published.
    let bad: Vec<(&[u8], &str)> = vec![
        (br#"{"to":["alice"],"payload":1,"ttl_secs":0}"#, "invalid_ttl"),
        (br#"{"id":"bad id!","to":["alice"],"payload":1}"#, "invalid_id"),
        (br#"{"to":[],"payload":1}"#, "no_recipients"),
        (br#"{"to":[""],"payload":1}"#, "invalid_recipient"),
        (b"{not json", "malformed"),
        (br#"{"to":["alice"]}"#, "malformed"),
        (b"", "malformed"),
    ];
    for (body, code) in bad {
        let (status, _, answer) = cluster
            .request(Method::POST, d, "/v1/publish", Some(PUBLISH_TOKEN), &[], Some(body.to_vec()))
            .await
            .unwrap();
        assert_eq!(
            (status, answer["error"].as_str(), answer["code"].as_str()),
            (400, Some("rejected"), Some(code)),
            "{answer}"
        );
        assert!(answer["reason"].as_str().is_some_and(|r| !r.is_empty()), "{answer}");
    }
    // A payload over HERALD_MAX_PAYLOAD_BYTES (64 KiB here) but within the body limit.
    let big = json!({"to": ["alice"], "payload": "x".repeat(70 * 1024)});
    let (status, body) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &big).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (400, Some("payload_too_large")), "{body}");
    // A body over HERALD_API_MAX_BODY_BYTES (256 KiB here): 413 with a JSON error.
    let huge = json!({"to": ["alice"], "payload": "x".repeat(300 * 1024)});
    let (status, body) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &huge).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (413, Some("body_too_large")), "{body}");
    assert_eq!(cluster.jobs_last_seq().await.unwrap(), after_keys, "no bad job reached the stream");
    assert_eq!(after_keys, before + 1, "only key-1 was published since the conflict check");

    // Tokens: none or unknown 401, out of scope 403, admin implies publish and read.
    let job = json!({"to": ["alice"], "payload": 1});
    for (token, want) in [(None, 401), (Some("wrong-token-0123456789"), 401), (Some(READ_TOKEN), 403)] {
        let (status, body) = cluster.post(d, "/v1/publish", token, &job).await.unwrap();
        assert_eq!(status, want, "{token:?}: {body}");
        assert!(body["error"].is_string() && body["reason"].is_string(), "{body}");
    }
    let (status, body) = cluster.api(d, "/v1/messages/order-1", Some(PUBLISH_TOKEN)).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = cluster.api(d, "/v1/messages/order-1", Some(READ_TOKEN)).await.unwrap();
    assert_eq!((status, body["message"]["seq"].clone()), (200, first["seq"].clone()), "{body}");
    let (status, body) = cluster.api(d, "/v1/messages/never-published", Some(READ_TOKEN)).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "{body}");

    // CORS: a preflight from the allowed origin is answered; another origin gets no allowance.
    let preflight = |origin: &'static str| async move {
        c.request(
            Method::OPTIONS,
            d,
            "/v1/publish",
            None,
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization,content-type"),
            ],
            None,
        )
        .await
    };
    let (status, headers, _) = preflight("http://127.0.0.1:8080").await.unwrap();
    assert!(status < 300, "{status}");
    assert_eq!(headers.get("access-control-allow-origin").unwrap(), "http://127.0.0.1:8080");
    let (_, headers, _) = preflight("http://evil.example").await.unwrap();
    assert!(headers.get("access-control-allow-origin").is_none(), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_is_all_or_nothing_and_answers_per_job() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bob", true).await.unwrap();
    let d = dispatcher.addr;

    let jobs = json!({"jobs": [
        {"id": "b-1", "to": ["bob"], "payload": 1},
        {"to": ["bob"], "payload": 2},
        {"id": "b-3", "to": ["bob", "carol"], "payload": 3, "ttl_secs": 60},
    ]});
    let (status, body) = cluster.post(d, "/v1/publish/batch", Some(PUBLISH_TOKEN), &jobs).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let mut seen = Vec::new();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_new(&mut bob, &mut seen).await);
    }
    got.sort_by_key(|n| n.seq);
    for (n, r) in got.iter().zip(results) {
        assert_eq!((n.id.as_str(), n.seq), (r["id"].as_str().unwrap(), r["seq"].as_u64().unwrap()), "{body}");
    }
    assert_eq!(results[0]["id"], "b-1");
    assert!(results[1]["id"].as_str().unwrap().starts_with("auto-"));

    // One bad job, or two: nothing is published, and each is named with its code.
    let before = cluster.jobs_last_seq().await.unwrap();
    let mixed = json!({"jobs": [
        {"id": "b-4", "to": ["bob"], "payload": 4},
        {"id": "b 5", "to": ["bob"], "payload": 5},
        {"to": ["bob"], "payload": 6, "ttl_secs": 0},
    ]});
    let (status, body) = cluster.post(d, "/v1/publish/batch", Some(PUBLISH_TOKEN), &mixed).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("rejected")), "{body}");
    let items: Vec<(u64, &str)> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["index"].as_u64().unwrap(), i["code"].as_str().unwrap()))
        .collect();
    assert_eq!(items, [(1, "invalid_id"), (2, "invalid_ttl")], "{body}");
    // A stored id with other content is named as well.
    cluster.wait_receipt("b-1", "bob", "pending").await.unwrap();
    let conflict = json!({"jobs": [{"id": "b-1", "to": ["bob"], "payload": "other"}, {"to": ["bob"], "payload": 7}]});
    let (status, body) = cluster.post(d, "/v1/publish/batch", Some(PUBLISH_TOKEN), &conflict).await.unwrap();
    assert_eq!((status, body["items"][0]["code"].as_str()), (400, Some("id_conflict")), "{body}");
    assert_eq!(cluster.jobs_last_seq().await.unwrap(), before, "a rejected batch publishes nothing");

    // Envelopes that are not a batch.
    let too_many = json!({"jobs": (0..21).map(|i| json!({"to": ["bob"], "payload": i})).collect::<Vec<_>>()});
    for bad in [json!({"jobs": []}), json!([{"to": ["bob"], "payload": 1}]), json!({"job": {}}), too_many] {
        let (status, body) = cluster.post(d, "/v1/publish/batch", Some(PUBLISH_TOKEN), &bad).await.unwrap();
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{body}");
    }

    // Idempotency-Key: job i is <key>-<i>; the same batch again is all duplicates.
    let keyed =
        serde_json::to_vec(&json!({"jobs": [{"to": ["bob"], "payload": 8}, {"to": ["bob"], "payload": 9}]})).unwrap();
    let send = || {
        cluster.request(
            Method::POST,
            d,
            "/v1/publish/batch",
            Some(ADMIN_TOKEN),
            &[("Idempotency-Key", "k")],
            Some(keyed.clone()),
        )
    };
    let (status, _, body) = send().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["results"][0]["id"].as_str(), body["results"][1]["id"].as_str()), (Some("k-0"), Some("k-1")));
    let (status, _, again) = send().await.unwrap();
    assert_eq!(status, 200, "{again}");
    assert!(again["results"].as_array().unwrap().iter().all(|r| r["duplicate"] == true), "{again}");
    let (status, _) = cluster.post(d, "/v1/publish/batch", Some(READ_TOKEN), &jobs).await.unwrap();
    assert_eq!(status, 403);
}

/// The document the dispatcher serves, against the dispatcher itself: every documented operation
/// reaches a handler (never the router's "no such endpoint" or 405). That every route is
/// documented is checked on the route list itself (dispatcher/src/api/mod.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let (status, doc) = cluster.api(dispatcher.addr, "/v1/openapi.json", None).await.unwrap();
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")), "{doc}");
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "no-such-message").replace("{user}", "nobody");
        for method in ["get", "post", "delete", "put", "patch"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = (method == "post").then(|| b"{}".to_vec());
            // Each operation is served on the public listener or the internal one (the document
            // itself on both).
            let mut routed = 0;
            for addr in [dispatcher.addr, dispatcher.internal] {
                let (status, _, answer) =
                    cluster.request(m.clone(), addr, &concrete, Some(ADMIN_TOKEN), &[], body.clone()).await.unwrap();
                assert_ne!(status, 405, "{method} {addr}{path}");
                routed += usize::from(answer["error"] != "no_route");
            }
            assert!(routed >= 1, "{method} {path} is served on neither listener");
        }
    }
    assert!(operations >= 15, "{operations} operations documented");
    // And the check can fail: an undocumented path is not routed.
    let (status, answer) = cluster.api(dispatcher.addr, "/v1/nothing-here", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (404, Some("no_route")));
    let (status, _, _) =
        cluster.request(Method::DELETE, dispatcher.addr, "/v1/publish", Some(ADMIN_TOKEN), &[], None).await.unwrap();
    assert_eq!(status, 405);
}

/// Whatever refuses a request (a handler, an extractor, the router), the answer is JSON with an
/// `error` code and a `reason`; `limit=0` is refused, not read as "none".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_error_is_json_whoever_writes_it() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let (public, internal) = (dispatcher.addr, dispatcher.internal);
    let cases: [(Method, SocketAddr, &str, u16, &str); 9] = [
        (Method::GET, public, "/v1/users/alice/pending?limit=abc", 400, "bad_request"),
        (Method::GET, public, "/v1/users/alice/pending?limit=-1", 400, "bad_request"),
        (Method::GET, public, "/v1/users/alice/pending?limit=0", 400, "bad_request"),
        (Method::GET, public, "/v1/messages/m-1?limit=0", 400, "bad_request"),
        (Method::GET, internal, "/v1/rejections?since_ms=yesterday", 400, "bad_request"),
        (Method::GET, public, "/v1/nothing-here", 404, "no_route"),
        (Method::GET, public, "/metrics", 404, "no_route"),
        (Method::GET, internal, "/v1/nothing-here", 404, "no_route"),
        (Method::DELETE, public, "/v1/publish", 405, "method_not_allowed"),
    ];
    for (method, addr, path, status, code) in cases {
        let (got, headers, answer) =
            cluster.request(method.clone(), addr, path, Some(ADMIN_TOKEN), &[], None).await.unwrap();
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{method} {path}: {answer}");
        assert!(content_type.starts_with("application/json"), "{method} {path}: {content_type}");
        assert!(answer["reason"].as_str().is_some_and(|r| !r.is_empty()), "{method} {path}: {answer}");
    }
    let (_, _, zero) = cluster
        .request(Method::GET, dispatcher.addr, "/v1/users/alice/pending?limit=0", Some(ADMIN_TOKEN), &[], None)
        .await
        .unwrap();
    assert_eq!(zero["reason"], "limit must be between 1 and 10000");
    // A limit over the cap is capped, not refused.
    let (status, answer) =
        cluster.api(dispatcher.addr, "/v1/users/alice/pending?limit=99999", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
}

async fn kicked(client: &mut TestClient) -> (Vec<ErrorCode>, Option<u16>) {
    let mut errors = Vec::new();
    loop {
        match client.next_frame(WAIT).await {
            Frame::Server(ServerFrame::Error { code, .. }) => errors.push(code),
            Frame::Close { code, .. } => return (errors, Some(code)),
            Frame::Error(_) | Frame::Closed | Frame::Timeout => return (errors, None),
            Frame::Server(_) | Frame::Text(_) | Frame::Binary(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_closes_every_connection_of_the_user_only() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let (g1, g2) = (cluster.gateway().await.unwrap(), cluster.gateway().await.unwrap());
    let mut a1 = cluster.connect(g1.addr, "alice").await.unwrap();
    let mut a2 = cluster.connect(g2.addr, "alice").await.unwrap();
    let mut bob = cluster.connect(g1.addr, "bob").await.unwrap();
    // The operator's actions are on the internal listener; queries on the public one.
    let (d, ops) = (dispatcher.addr, dispatcher.internal);
    eventually(WAIT, Duration::from_millis(50), || async {
        let (_, body) =
            cluster.api(d, "/v1/users/alice/presence", Some(READ_TOKEN)).await.map_err(|e| e.to_string())?;
        if body["connections"] == 2 {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await
    .unwrap();
    cluster.wait_presence(d, "bob", true).await.unwrap();

    let (status, body) = cluster.post(ops, "/v1/users/alice/kick", Some(READ_TOKEN), &json!({})).await.unwrap();
    assert_eq!(status, 403, "kicking needs the admin token: {body}");
    let (status, body) = cluster.post(ops, "/v1/users/alice/kick", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["connections"].as_u64()), (202, Some(2)), "{body}");
    assert_eq!(body["gateways"].as_array().map(Vec::len), Some(2), "{body}");
    for client in [&mut a1, &mut a2] {
        assert_eq!(kicked(client).await, (vec![ErrorCode::Kicked], Some(4403)));
    }
    cluster.wait_presence(d, "alice", false).await.unwrap();
    // Bob is untouched and still gets his messages.
    cluster.send("for-bob", &["bob"]).await.unwrap();
    assert_eq!(bob.next_notification(WAIT).await.expect("bob's message").id, "for-bob");

    let (status, body) = cluster.post(ops, "/v1/users/alice/kick", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "not connected any more: {body}");
    let (status, body) = cluster.post(ops, "/v1/users/a%0Ab/kick", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_id")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_message_is_never_sent_again_by_replay_sweep_or_ack() {
    // A short ack timeout, so that the sweep would resend within the test if it ignored cancels.
    let options = Options { ack_timeout: Duration::from_millis(600), ..Options::default() };
    let cluster = Cluster::new(herald_tests::services::Stack::start().await.unwrap(), options).await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    // The operator's actions are on the internal listener; queries on the public one.
    let (d, ops) = (dispatcher.addr, dispatcher.internal);

    // Offline: cancelled before the user connects, so the replay must skip it.
    cluster.send("c-1", &["bob", "carol"]).await.unwrap();
    cluster.send("c-2", &["bob"]).await.unwrap();
    cluster.wait_receipt("c-1", "bob", "pending").await.unwrap();
    cluster.wait_receipt("c-2", "bob", "pending").await.unwrap();
    let (status, body) = cluster.post(ops, "/v1/messages/c-1/cancel", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["cancelled"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(body["counts"], json!({"cancelled": 2}), "{body}");
    let (_, message) = cluster.api(d, "/v1/messages/c-1", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(message["receipts"][0]["state"], "cancelled", "{message}");
    assert!(message["receipts"][0]["cancelled_at_ms"].is_u64(), "{message}");
    let (_, pending) = cluster.api(d, "/v1/users/bob/pending", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(pending["count"], 1, "{pending}");

    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    assert_eq!(bob.next_notification(WAIT).await.expect("c-2").id, "c-2");

    // Online: sent, not acked, cancelled; the ack-timeout sweep must not send it again, and a
    // late ack must not make it delivered.
    cluster.send("c-3", &["bob"]).await.unwrap();
    loop {
        let n = bob.next_notification(WAIT).await.expect("c-3");
        if n.id == "c-3" {
            break;
        }
        assert_eq!(n.id, "c-2", "only c-2 may be resent meanwhile");
    }
    let (status, body) = cluster.post(ops, "/v1/messages/c-3/cancel", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["cancelled"].as_u64()), (200, Some(1)), "{body}");
    // c-2 is resent after the ack timeout (it was not acked); c-1 and c-3 never are.
    let again = bob.notifications_until(3, Duration::from_secs(3)).await;
    assert!(!again.is_empty(), "the sweep resends the uncancelled c-2");
    assert!(again.iter().all(|n| n.id == "c-2"), "{:?}", again.iter().map(|n| n.id.as_str()).collect::<Vec<_>>());
    // One frame acks both; once c-2 reads delivered, the frame has been applied to c-3 too.
    bob.ack(["c-3", "c-2"]).await.unwrap();
    cluster.wait_receipt("c-2", "bob", "delivered").await.unwrap();
    assert_eq!(cluster.receipts("c-3").await.unwrap()["bob"].state.as_str(), "cancelled");

    // Cancelling again cancels nothing; an unknown message is 404; read tokens may not cancel.
    let (status, body) = cluster.post(ops, "/v1/messages/c-3/cancel", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["cancelled"].as_u64()), (200, Some(0)), "{body}");
    let (status, body) = cluster.post(ops, "/v1/messages/nope/cancel", Some(ADMIN_TOKEN), &json!({})).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "{body}");
    let (status, _) = cluster.post(ops, "/v1/messages/c-2/cancel", Some(READ_TOKEN), &json!({})).await.unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_deletes_a_users_receipts_and_messages_to_them_alone() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    // The operator's actions are on the internal listener; queries on the public one.
    let (d, ops) = (dispatcher.addr, dispatcher.internal);
    cluster.send("f-1", &["erin"]).await.unwrap();
    cluster.send("f-2", &["erin", "frank"]).await.unwrap();
    cluster.wait_receipt("f-1", "erin", "pending").await.unwrap();
    cluster.wait_receipt("f-2", "frank", "pending").await.unwrap();

    let (status, _, body) =
        cluster.request(Method::DELETE, ops, "/v1/users/erin", Some(READ_TOKEN), &[], None).await.unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, _, body) =
        cluster.request(Method::DELETE, ops, "/v1/users/erin", Some(ADMIN_TOKEN), &[], None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"user": "erin", "receipts_deleted": 2, "messages_deleted": 1}));
    let (status, _) = cluster.api(d, "/v1/messages/f-1", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(status, 404, "a message to erin alone is gone");
    let receipts = cluster.receipts("f-2").await.unwrap();
    assert_eq!(receipts.keys().collect::<Vec<_>>(), ["frank"], "frank keeps his");
    let (_, pending) = cluster.api(d, "/v1/users/erin/pending", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(pending["count"], 0);
    // Forgetting again (or a user never seen) deletes nothing, and says so.
    let (status, _, body) =
        cluster.request(Method::DELETE, ops, "/v1/users/erin", Some(ADMIN_TOKEN), &[], None).await.unwrap();
    assert_eq!((status, body["receipts_deleted"].as_u64()), (200, Some(0)), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_rejections_tell_an_operator_what_is_going_on() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    // The operator's actions are on the internal listener.
    let ops = dispatcher.internal;

    // A job only NATS could take: rejected asynchronously, then readable through the API.
    cluster.publish(&json!({"id": "late-bad", "to": ["x"], "payload": 1, "ttl_secs": 0})).await.unwrap();
    let entries = eventually(WAIT, Duration::from_millis(100), || async {
        let (status, body) = cluster.api(ops, "/v1/rejections", Some(READ_TOKEN)).await.map_err(|e| e.to_string())?;
        match body["entries"].as_array() {
            Some(entries) if status == 200 && !entries.is_empty() => Ok(entries.clone()),
            _ => Err(format!("{status} {body}")),
        }
    })
    .await
    .unwrap();
    assert_eq!((entries[0]["job_id"].as_str(), entries[0]["code"].as_str()), (Some("late-bad"), Some("invalid_ttl")));
    let (status, body) = cluster.api(ops, "/v1/dead-letters", Some(READ_TOKEN)).await.unwrap();
    assert_eq!((status, body["entries"].clone(), body["truncated"].clone()), (200, json!([]), json!(false)), "{body}");
    // Since a time after it: none.
    let later = entries[0]["rejected_at_ms"].as_u64().unwrap() + 60_000;
    let (_, body) = cluster.api(ops, &format!("/v1/rejections?since_ms={later}"), Some(READ_TOKEN)).await.unwrap();
    assert_eq!(body["entries"], json!([]), "{body}");

    let (status, body) = cluster.api(ops, "/v1/status", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let names = cluster.stack.names();
    assert_eq!(body["streams"]["jobs"]["name"], names.jobs_stream(), "{body}");
    assert_eq!(body["streams"]["jobs"]["consumer"]["name"], "dispatchers", "{body}");
    assert!(body["streams"]["jobs"]["consumer"]["pending"].is_u64(), "{body}");
    assert_eq!(body["streams"]["rejected"]["messages"], 1, "{body}");
    assert_eq!(body["gateways"], json!([gateway.id]), "{body}");
    assert_eq!(body["dependencies"], json!({"mongodb": true, "nats": true, "redis": true}), "{body}");
    assert_eq!(body["errors"], json!([]));
    let (status, _) = cluster.api(ops, "/v1/status", None).await.unwrap();
    assert_eq!(status, 401);
}

/// A store slower than the offered load slows admission instead of failing everything: while
/// more jobs wait in the stream than `HERALD_API_MAX_BACKLOG`, a publish over HTTP is answered
/// 503 `overloaded` with `Retry-After` (a batch as a whole), and once the
/// dispatchers catch up it is admitted again. Nothing admitted before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_over_http_is_refused_while_the_backlog_is_over_its_limit_and_resumes_after() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = herald_tests::cluster::dispatcher_config(&cluster.stack, &cluster.options);
    // One small batch in hand at a time, so that what the store cannot take stays in the stream.
    (config.job_batch, config.job_workers, config.api.max_backlog) = (2, 1, 5);
    let dispatcher = cluster.dispatcher_with(config).await.unwrap();
    let d = dispatcher.addr;
    let job = |n: u32| json!({"id": format!("backlog-{n}"), "to": ["alice"], "payload": {"n": n}});

    let (status, body) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &job(0)).await.unwrap();
    assert_eq!(status, 201, "admitted while nothing waits: {body}");
    cluster.wait_receipt("backlog-0", "alice", "pending").await.unwrap();

    // The store goes away; jobs published on NATS pile up in the stream.
    cluster.stack.mongo_proxy.cut().await;
    for n in 1..=20 {
        cluster.publish(&job(n)).await.unwrap();
    }
    // Probes until one is refused (the backlog is read at most once a second): each has an id
    // of its own, since one admitted before the backlog built up is published.
    let probes = std::sync::atomic::AtomicU32::new(0);
    let refused = eventually(WAIT, Duration::from_millis(100), || async {
        let n = probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = serde_json::to_vec(&json!({"id": format!("probe-{n}"), "to": ["alice"], "payload": {}})).unwrap();
        let (status, headers, answer) =
            cluster.request(Method::POST, d, "/v1/publish", Some(PUBLISH_TOKEN), &[], Some(body)).await?;
        anyhow::ensure!(status == 503, "still admitted: {status} {answer}");
        Ok((headers, answer))
    })
    .await
    .expect("refused once the backlog is over 5");
    let (headers, answer) = refused;
    assert_eq!(answer["error"], "overloaded", "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("limit 5"), "{answer}");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // The batch endpoint refuses as a whole, publishing nothing.
    let before = cluster.jobs_last_seq().await.unwrap();
    let batch = json!({"jobs": [job(101), job(102)]});
    let (status, answer) = cluster.post(d, "/v1/publish/batch", Some(PUBLISH_TOKEN), &batch).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (503, Some("overloaded")), "{answer}");
    assert_eq!(cluster.jobs_last_seq().await.unwrap(), before, "a refused batch publishes nothing");
    // The store is back: the backlog drains and publishing is admitted again.
    cluster.stack.mongo_proxy.restore();
    let (status, answer) = eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
        let (status, answer) = cluster.post(d, "/v1/publish", Some(PUBLISH_TOKEN), &job(100)).await?;
        anyhow::ensure!(status == 201, "not admitted yet: {status} {answer}");
        Ok((status, answer))
    })
    .await
    .expect("admitted once the dispatcher caught up");
    assert_eq!((status, answer["id"].as_str()), (201, Some("backlog-100")));
    for n in (0..=20).chain([100]) {
        cluster.wait_receipt(&format!("backlog-{n}"), "alice", "pending").await.unwrap();
    }
    let text = reqwest::get(format!("http://{}/metrics", dispatcher.internal)).await.unwrap().text().await.unwrap();
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("herald_api_publish_overloaded_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused >= 2, "refusals are counted: {refused}");
}
