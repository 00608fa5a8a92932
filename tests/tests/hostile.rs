//! Hostile and broken input, end to end: bad tokens, clients poking at other users' messages,
//! malformed and abusive frames, too many connections, jobs that are not jobs, and floods of
//! connections that never authenticate. Each must be refused with the reason proto/README.md
//! promises, and none may hurt anyone else: after each test's abuse a well-behaved client still
//! gets its messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use herald_proto::client::{ErrorCode, ServerFrame};
use herald_proto::{RejectCode, Rejection};
use herald_tests::client::{Frame, TestClient};
use herald_tests::cluster::{gateway_config, ws_url, Cluster, ADMIN_TOKEN, JWT_SECRET};
use herald_tests::flood::{self, Flood};
use herald_tests::tokens::{self, Claims};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

const WAIT: Duration = Duration::from_secs(10);
const ISSUER: &str = "herald-tests-issuer";
const AUDIENCE: &str = "herald-tests-audience";

/// A good token for the gateway configured with [`ISSUER`] and [`AUDIENCE`].
fn good(user: &str) -> String {
    Claims::new(user, Duration::from_secs(3600)).issuer(ISSUER).audience(AUDIENCE).sign(JWT_SECRET)
}

/// Connects with `token` and expects a refusal before the upgrade: status and JSON body.
async fn refused(url: &str, token: &str) -> (u16, Value) {
    match TestClient::connect(url, token).await {
        Ok(_) => (101, Value::Null),
        Err(e) => {
            let status = e.status().unwrap_or(0);
            let body = match &e {
                herald_tests::client::ConnectError::Refused { body, .. } => {
                    serde_json::from_str(body).unwrap_or(Value::String(body.clone()))
                }
                other => Value::String(other.to_string()),
            };
            (status, body)
        }
    }
}

/// Asserts that a connection is refused with 401 and the README's JSON body.
async fn assert_unauthorized(url: &str, what: &str, token: &str) {
    let (status, body) = refused(url, token).await;
    assert_eq!(status, 401, "{what}: accepted or refused for another reason: {body}");
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{what}: no reason in {body}");
}

/// Waits until `user`'s next notification is `id`, acks it, and waits for the receipt.
async fn receives(cluster: &Cluster, client: &mut TestClient, user: &str, id: &str) {
    cluster.send(id, &[user]).await.unwrap();
    let n = client.next_notification(WAIT).await.unwrap_or_else(|| panic!("{user} got no {id}"));
    assert_eq!(n.id, id);
    client.ack([id]).await.unwrap();
    cluster.wait_receipt(id, user, "delivered").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt.issuer = Some(ISSUER.into());
    config.jwt.audience = Some(AUDIENCE.into());
    let gateway = cluster.gateway_with(config).await.unwrap();
    let url = ws_url(gateway.addr);
    let hour = Duration::from_secs(3600);
    let now = herald_shared::now_ms() as i64 / 1000;
    let claims = || Claims::new("mallory", hour).issuer(ISSUER).audience(AUDIENCE);

    let mut expired = claims();
    expired.exp = now - 3600;
    let mut no_exp = serde_json::to_value(claims()).unwrap();
    no_exp.as_object_mut().unwrap().remove("exp");
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &no_exp,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let mut empty_sub = claims();
    empty_sub.sub = String::new();
    let mut long_sub = claims();
    long_sub.sub = "m".repeat(300);
    let mut control_sub = claims();
    control_sub.sub = "mal\u{7}lory".into();
    let cases = [
        ("malformed", "not-a-token".to_owned()),
        ("three garbage segments", "a.b.c".to_owned()),
        ("wrong signature", claims().sign("not-the-gateway-secret-at-all")),
        ("alg none", tokens::alg_none("mallory")),
        ("HS512 instead of HS256", claims().sign_with(jsonwebtoken::Algorithm::HS512, JWT_SECRET)),
        ("expired", expired.sign(JWT_SECRET)),
        ("not yet valid", claims().not_before(now + 3600).sign(JWT_SECRET)),
        ("no exp", no_exp),
        ("wrong issuer", Claims::new("mallory", hour).issuer("someone-else").audience(AUDIENCE).sign(JWT_SECRET)),
        ("wrong audience", Claims::new("mallory", hour).issuer(ISSUER).audience("another-app").sign(JWT_SECRET)),
        ("empty sub", empty_sub.sign(JWT_SECRET)),
        ("sub over 256 bytes", long_sub.sign(JWT_SECRET)),
        ("sub with a control character", control_sub.sign(JWT_SECRET)),
    ];
    for (what, token) in &cases {
        assert_unauthorized(&url, what, token).await;
        // The same token in the query string, as a browser sends it.
        let query = TestClient::connect_with_query_token(&url, token).await;
        assert_eq!(query.err().and_then(|e| e.status()), Some(401), "{what} in the query string");
    }

    // No token at all, an empty one, and an Authorization header that is not a bearer token.
    let bare = url.as_str().into_client_request().unwrap();
    let err = TestClient::connect_request(bare, false).await.err().expect("no token accepted");
    assert_eq!(err.status(), Some(401), "no token: {err}");
    let err = TestClient::connect(&url, "").await.err().expect("empty bearer accepted");
    assert_eq!(err.status(), Some(401), "empty bearer: {err}");
    let mut basic = url.as_str().into_client_request().unwrap();
    basic.headers_mut().insert("authorization", "Basic bWFsbG9yeTpwdw==".parse().unwrap());
    let err = TestClient::connect_request(basic, false).await.err().expect("basic auth accepted");
    assert_eq!(err.status(), Some(401), "basic auth: {err}");

    // A token with the configured issuer and audience is accepted.
    let ok = TestClient::connect(&url, &good("mallory")).await.unwrap();
    assert!(!ok.hello().connection_id.as_str().is_empty());
}

/// proto/README.md: `iss` must equal the configured issuer, `aud` must contain the configured
/// audience. A token that simply leaves them out must not get around either check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_the_configured_issuer_or_audience_are_refused() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt.issuer = Some(ISSUER.into());
    config.jwt.audience = Some(AUDIENCE.into());
    let gateway = cluster.gateway_with(config).await.unwrap();
    let url = ws_url(gateway.addr);
    let hour = Duration::from_secs(3600);
    let no_issuer = Claims::new("mallory", hour).audience(AUDIENCE).sign(JWT_SECRET);
    let no_audience = Claims::new("mallory", hour).issuer(ISSUER).sign(JWT_SECRET);
    let neither = Claims::new("mallory", hour).sign(JWT_SECRET);
    assert_unauthorized(&url, "no iss", &no_issuer).await;
    assert_unauthorized(&url, "no aud", &no_audience).await;
    assert_unauthorized(&url, "neither iss nor aud", &neither).await;
}

/// Whatever ids a client sends, it moves only its own user's receipts, and it never receives
/// another user's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_ack_read_or_receive_another_users_messages() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    let mut mallory = cluster.connect(gateway.addr, "mallory").await.unwrap();
    // Names that look like alice, or like patterns, are other users.
    let mut lookalikes = Vec::new();
    for user in ["Alice", "alice ", "alice*", "*", ".*", "alice:presence", "ali"] {
        lookalikes.push((user, cluster.connect(gateway.addr, user).await.unwrap()));
    }
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    cluster.wait_presence(dispatcher.addr, "mallory", true).await.unwrap();

    let ids: Vec<String> = (0..3).map(|i| format!("alice-secret-{i}")).collect();
    for id in &ids {
        cluster.send(id, &["alice"]).await.unwrap();
    }
    // Two job workers route concurrently: live messages may arrive out of order (clients order
    // by `seq`).
    let mut got: Vec<String> =
        alice.notifications_until(ids.len(), WAIT).await.into_iter().map(|n| n.id.into_string()).collect();
    got.sort();
    assert_eq!(got, ids, "alice gets her own messages");

    // Every way mallory can name alice's messages.
    mallory.ack(ids.iter()).await.unwrap();
    mallory.read(ids.iter()).await.unwrap();
    let probes = [
        json!({"type": "ack", "ids": ids, "user": "alice"}),
        json!({"type": "read", "ids": ids, "user": "alice", "connection_id": alice.hello().connection_id}),
        json!({"type": "ack", "ids": ["ALICE-SECRET-0", "alice-secret-00", "alice-secret"]}),
    ];
    for probe in &probes {
        mallory.send_text(probe.to_string()).await.unwrap();
    }
    // Ids outside the message id grammar (operators, patterns, padding) are malformed frames.
    let malformed = [
        json!({"type": "ack", "ids": ["$ne", "{\"$ne\": null}", ".*", "alice-secret-*", "*"]}),
        json!({"type": "ack", "ids": ["alice-secret-0 ", " alice-secret-0"]}),
    ];
    for probe in &malformed {
        let mut prober = cluster.connect(gateway.addr, "mallory").await.unwrap();
        prober.send_text(probe.to_string()).await.unwrap();
        assert_eq!(ending(&mut prober).await, (vec![ErrorCode::BadFrame], Some(4400)), "{probe}");
    }
    for (_, client) in &mut lookalikes {
        client.ack(ids.iter()).await.unwrap();
        client.read(ids.iter()).await.unwrap();
    }
    // Acks are applied in order: once mallory's own ack has landed, so have the probes.
    receives(&cluster, &mut mallory, "mallory", "mallory-own").await;
    for (i, (user, client)) in lookalikes.iter_mut().enumerate() {
        cluster.send(&format!("own-{i}"), &[user]).await.unwrap();
        let n = client.next_notification(WAIT).await.unwrap_or_else(|| panic!("{user:?} got no message of its own"));
        client.ack([n.id.as_str()]).await.unwrap();
        cluster.wait_receipt(n.id.as_str(), user, "delivered").await.unwrap();
    }
    for id in &ids {
        let receipts = cluster.receipts(id).await.unwrap();
        assert_eq!(receipts.keys().collect::<Vec<_>>(), vec!["alice"], "{id}: one receipt, alice's");
        assert_eq!(receipts["alice"].state.as_str(), "pending", "{id} moved by someone else");
    }

    // Nobody else received alice's messages.
    assert!(mallory.next_notification(Duration::from_millis(300)).await.is_none());
    for (user, client) in &mut lookalikes {
        assert!(client.next_notification(Duration::from_millis(100)).await.is_none(), "{user:?} got something");
    }
    // The query API is not a way in either: a client's token is not the admin token.
    let token = cluster.token("mallory");
    for path in ["/v1/users/alice/pending", "/v1/messages/alice-secret-0", "/v1/users/alice/presence"] {
        let (status, body) = cluster.api(dispatcher.addr, path, Some(&token)).await.unwrap();
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = cluster.api(dispatcher.addr, path, None).await.unwrap();
        assert_eq!(status, 401, "{path} without a token");
    }

    // Alice's own ack still works.
    alice.ack(ids.iter()).await.unwrap();
    for id in &ids {
        cluster.wait_receipt(id, "alice", "delivered").await.unwrap();
    }
    let (status, body) = cluster.api(dispatcher.addr, "/v1/messages/alice-secret-0", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["receipts"].as_array().map(Vec::len), Some(1), "{body}");
}

/// What the client sees after sending something bad: the error frames, then how it ended.
async fn ending(client: &mut TestClient) -> (Vec<ErrorCode>, Option<u16>) {
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

/// Each kind of bad frame ends its connection with the README's error frame and close code, and
/// the gateway carries on for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_end_the_connection_with_the_documented_code_and_hurt_no_one_else() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut bystander = cluster.connect(gateway.addr, "bystander").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bystander", true).await.unwrap();
    let max = bystander.hello().max_frame_bytes;

    let many_ids: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let text_cases: Vec<(&str, String, u16, ErrorCode)> = vec![
        ("not JSON", "hello there".into(), 4400, ErrorCode::BadFrame),
        ("truncated JSON", r#"{"type":"ack","ids":["#.into(), 4400, ErrorCode::BadFrame),
        ("a JSON array", "[1,2,3]".into(), 4400, ErrorCode::BadFrame),
        ("unknown type", r#"{"type":"ping"}"#.into(), 4400, ErrorCode::BadFrame),
        ("no type", r#"{"ids":["a"]}"#.into(), 4400, ErrorCode::BadFrame),
        ("missing ids", r#"{"type":"ack"}"#.into(), 4400, ErrorCode::BadFrame),
        ("ids not a list", r#"{"type":"ack","ids":"a"}"#.into(), 4400, ErrorCode::BadFrame),
        ("ids not strings", r#"{"type":"read","ids":[1,2]}"#.into(), 4400, ErrorCode::BadFrame),
        ("an empty id", r#"{"type":"ack","ids":[""]}"#.into(), 4400, ErrorCode::BadFrame),
        ("an id over 128 bytes", json!({"type":"ack","ids":["i".repeat(129)]}).to_string(), 4400, ErrorCode::BadFrame),
        ("over 1000 ids", json!({"type":"ack","ids":many_ids}).to_string(), 4400, ErrorCode::BadFrame),
        ("a frame over max_frame_bytes", "x".repeat(max + 1), 1009, ErrorCode::FrameTooLarge),
    ];
    let mut outcomes = BTreeMap::new();
    for (i, (what, text, code, error)) in text_cases.into_iter().enumerate() {
        let user = format!("hostile-{i}");
        let mut client = cluster.connect(gateway.addr, &user).await.unwrap();
        client.send_text(text).await.unwrap();
        let (errors, close) = ending(&mut client).await;
        outcomes.insert(what, (errors.clone(), close));
        assert_eq!(close, Some(code), "{what}: closed with {close:?}, errors {errors:?}");
        assert_eq!(errors, vec![error], "{what}: the error frame before the close");
    }
    let mut binary = cluster.connect(gateway.addr, "hostile-binary").await.unwrap();
    binary.send_binary(br#"{"type":"ack","ids":["a"]}"#.to_vec()).await.unwrap();
    let (errors, close) = ending(&mut binary).await;
    assert_eq!((errors, close), (vec![ErrorCode::UnsupportedData], Some(1003)), "binary frame");
    println!("{outcomes:#?}");

    // The gateway is healthy, and the bystander still receives.
    receives(&cluster, &mut bystander, "bystander", "after-the-abuse").await;
    let ready = reqwest::get(format!("http://{}/readyz", gateway.internal)).await.unwrap();
    assert_eq!(ready.status(), 200);
}

/// A frame far over the limit (beyond what the gateway reads into memory at all) still ends
/// with 1009 and the `frame_too_large` error, as the README promises for any frame over
/// `max_frame_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_is_closed_with_1009() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut bystander = cluster.connect(gateway.addr, "bystander").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bystander", true).await.unwrap();
    let mut client = cluster.connect(gateway.addr, "huge").await.unwrap();
    let max = client.hello().max_frame_bytes;
    client.send_text("x".repeat(max * 8)).await.unwrap();
    let (errors, close) = ending(&mut client).await;
    assert_eq!(close, Some(1009), "a frame of {} bytes: closed with {close:?}, errors {errors:?}", max * 8);
    assert_eq!(errors, vec![ErrorCode::FrameTooLarge]);
    receives(&cluster, &mut bystander, "bystander", "after-the-huge-frame").await;
}

/// A client sending frames faster than `client_frames_per_sec` is closed with 4429, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_flood_is_closed_with_4429_and_others_keep_receiving() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.client_frames_per_sec = 5; // bursts of 10
    let gateway = cluster.gateway_with(config).await.unwrap();
    let mut bystander = cluster.connect(gateway.addr, "bystander").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bystander", true).await.unwrap();

    // Within the limit: a burst of 10 valid frames is fine.
    let mut polite = cluster.connect(gateway.addr, "polite").await.unwrap();
    for i in 0..10 {
        polite.ack([format!("m-{i}")]).await.unwrap();
    }
    assert!(matches!(polite.next_frame(Duration::from_millis(500)).await, Frame::Timeout), "polite was closed");

    let mut flooder = cluster.connect(gateway.addr, "flooder").await.unwrap();
    for i in 0..200 {
        if flooder.ack([format!("m-{i}")]).await.is_err() {
            break; // closed under us, as it should be
        }
    }
    let (errors, close) = ending(&mut flooder).await;
    assert_eq!(close, Some(4429), "flood: closed with {close:?}, errors {errors:?}");
    assert_eq!(errors, vec![ErrorCode::RateLimited]);

    receives(&cluster, &mut bystander, "bystander", "after-the-flood").await;
    receives(&cluster, &mut polite, "polite", "polite-still-here").await;
}

/// A client that goes on sending after it broke the limit still learns why, every time: the
/// `rate_limited` error frame and close 4429, and a closing handshake rather than a reset. A
/// gateway that drops the socket right after its close frame, with the client's frames still
/// unread, makes the kernel reset the connection: the client's next send fails with a broken
/// pipe, and a client library that gives up on that (browsers do) reports 1006 and never reads
/// the close frame, nor the error frame before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_sending_past_the_limit_is_told_4429_every_time() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.client_frames_per_sec = 5; // bursts of 10
    let gateway = cluster.gateway_with(config).await.unwrap();
    const TRIES: usize = 20;
    let mut outcomes = Vec::new();
    for attempt in 0..TRIES {
        let mut flooder = cluster.connect(gateway.addr, &format!("flooder-{attempt}")).await.unwrap();
        // 60 frames, one a millisecond, before the client reads anything: the gateway closes
        // after the 11th, and the client sends on for a while before it looks at what came
        // back (well within the gateway's closing handshake of a second).
        flooder.pause_reading();
        let mut reset = None;
        for i in 0..60 {
            match flooder.ack([format!("m-{i}")]).await {
                Ok(()) => {}
                // Refused by the client's own library (it has read the close frame).
                Err(e) if !matches!(e, tungstenite::Error::Io(_)) => break,
                Err(e) => {
                    reset = Some(format!("send {i}: {e}"));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        flooder.resume_reading();
        outcomes.push((ending(&mut flooder).await, reset));
    }
    let told = outcomes
        .iter()
        .filter(|(ending, reset)| *ending == (vec![ErrorCode::RateLimited], Some(4429)) && reset.is_none())
        .count();
    assert_eq!(told, TRIES, "a closing handshake with rate_limited and 4429 in {told} of {TRIES} tries: {outcomes:?}");
}

/// Connection limits per user and per gateway: the next connection is refused with a status
/// and a JSON reason, and a freed place can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_the_next_connection_with_a_reason() {
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.max_connections_per_user = 2;
    config.max_connections = Some(4);
    let gateway = cluster.gateway_with(config).await.unwrap();
    let url = ws_url(gateway.addr);
    let token = |user: &str| cluster.token(user);

    let a1 = TestClient::connect(&url, &token("alice")).await.unwrap();
    let _a2 = TestClient::connect(&url, &token("alice")).await.unwrap();
    let (status, body) = refused(&url, &token("alice")).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("too_many_connections")), "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");

    let _b = TestClient::connect(&url, &token("bob")).await.unwrap();
    let _c = TestClient::connect(&url, &token("carol")).await.unwrap();
    let (status, body) = refused(&url, &token("dave")).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("gateway_full")), "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");

    // A refused attempt holds no place; a closed connection gives its place back.
    a1.close().await.unwrap();
    let again = herald_tests::eventually(WAIT, Duration::from_millis(50), || async {
        TestClient::connect(&url, &token("dave")).await.map_err(|e| e.to_string())
    })
    .await;
    if let Err(e) = again {
        panic!("a freed place can be taken again: {e:#}");
    }
}

/// Jobs that are not valid jobs: each is rejected on `<prefix>.rejected` with its code and a
/// reason, none stops the dispatcher (run as a process, so a crash shows as one), and a valid job
/// published after them all is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_rejected_with_reasons_and_the_worker_carries_on() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher_process().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut rejections = cluster.nats.subscribe(cluster.stack.names().rejected_subject()).await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();

    let many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let big = "x".repeat(64 * 1024 + 1);
    // The nesting limit (proto/README.md): 64 levels pass, 65 do not.
    let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
    let too_deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(&str, Vec<u8>, RejectCode, Option<&str>)> = vec![
        ("not JSON", b"{not json".to_vec(), RejectCode::Malformed, None),
        ("not UTF-8", vec![0xff, 0xfe, b'{', 0x80], RejectCode::Malformed, None),
        ("empty body", Vec::new(), RejectCode::Malformed, None),
        ("null", b"null".to_vec(), RejectCode::Malformed, None),
        ("an array", b"[]".to_vec(), RejectCode::Malformed, None),
        ("to is a string", br#"{"id":"j-to","to":"alice","payload":1}"#.to_vec(), RejectCode::Malformed, Some("j-to")),
        ("to holds numbers", br#"{"to":[1,2],"payload":1}"#.to_vec(), RejectCode::Malformed, None),
        ("no payload", br#"{"id":"j-np","to":["alice"]}"#.to_vec(), RejectCode::Malformed, Some("j-np")),
        ("ttl is a string", br#"{"to":["alice"],"payload":1,"ttl_secs":"1"}"#.to_vec(), RejectCode::Malformed, None),
        ("negative ttl", br#"{"to":["alice"],"payload":1,"ttl_secs":-5}"#.to_vec(), RejectCode::Malformed, None),
        ("id is a number", br#"{"id":7,"to":["alice"],"payload":1}"#.to_vec(), RejectCode::Malformed, None),
        (
            "no recipients",
            br#"{"id":"j-empty","to":[],"payload":1}"#.to_vec(),
            RejectCode::NoRecipients,
            Some("j-empty"),
        ),
        (
            "10001 recipients",
            json!({"id": "j-many", "to": many, "payload": 1}).to_string().into_bytes(),
            RejectCode::TooManyRecipients,
            Some("j-many"),
        ),
        (
            "payload over 64 KiB",
            json!({"id": "j-big", "to": ["alice"], "payload": big}).to_string().into_bytes(),
            RejectCode::PayloadTooLarge,
            Some("j-big"),
        ),
        (
            "payload nested 200 deep",
            format!(r#"{{"id":"j-deep","to":["alice"],"payload":{too_deep}}}"#).into_bytes(),
            RejectCode::Malformed,
            Some("j-deep"),
        ),
        ("empty recipient", br#"{"to":[""],"payload":1}"#.to_vec(), RejectCode::InvalidRecipient, None),
        ("control character", br#"{"to":["al\u0000ice"],"payload":1}"#.to_vec(), RejectCode::InvalidRecipient, None),
        (
            "recipient over 256 bytes",
            json!({"to": ["r".repeat(257)], "payload": 1}).to_string().into_bytes(),
            RejectCode::InvalidRecipient,
            None,
        ),
        (
            "id with a space",
            br#"{"id":"bad id","to":["alice"],"payload":1}"#.to_vec(),
            RejectCode::InvalidId,
            Some("bad id"),
        ),
        (
            "reserved id form",
            br#"{"id":"seq-1","to":["alice"],"payload":1}"#.to_vec(),
            RejectCode::InvalidId,
            Some("seq-1"),
        ),
        ("ttl of 0", br#"{"to":["alice"],"payload":1,"ttl_secs":0}"#.to_vec(), RejectCode::InvalidTtl, None),
        (
            "ttl over the max",
            br#"{"to":["alice"],"payload":1,"ttl_secs":99999999}"#.to_vec(),
            RejectCode::InvalidTtl,
            None,
        ),
    ];
    let mut expected = BTreeMap::new();
    for (what, body, code, job_id) in &cases {
        let seq = cluster.publish_raw(body.clone(), async_nats::HeaderMap::new()).await.unwrap();
        expected.insert(seq, (*what, *code, job_id.map(str::to_owned)));
    }
    // A deeply nested payload is valid JSON: it is delivered, byte for byte.
    let deep_job = format!(r#"{{"id":"deep-1","to":["alice"],"payload":{deep}}}"#);
    cluster.publish_raw(deep_job.into_bytes(), async_nats::HeaderMap::new()).await.unwrap();
    cluster.send("valid-after-the-junk", &["alice"]).await.unwrap();

    let mut seen = BTreeMap::new();
    while seen.len() < expected.len() {
        let msg = tokio::time::timeout(WAIT, rejections.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} rejections: {seen:#?}", seen.len(), expected.len()))
            .unwrap();
        let rejection: Rejection = serde_json::from_slice(&msg.payload).unwrap();
        seen.insert(rejection.stream_seq, rejection);
    }
    for (seq, (what, code, job_id)) in &expected {
        let rejection = &seen[seq];
        assert_eq!(rejection.code, *code, "{what}: {rejection:?}");
        assert_eq!(rejection.job_id, *job_id, "{what}: {rejection:?}");
        assert!(!rejection.reason.is_empty(), "{what}: no reason");
        assert!(rejection.subject.ends_with(".publish.test"), "{what}: {rejection:?}");
    }

    // Two job workers: the two valid jobs may arrive in either order.
    let got = alice.notifications_until(2, WAIT).await;
    let by_id: BTreeMap<&str, &str> = got.iter().map(|n| (n.id.as_str(), n.payload.get())).collect();
    assert_eq!(by_id.get("deep-1"), Some(&deep.as_str()), "the deeply nested payload, byte for byte");
    assert!(by_id.contains_key("valid-after-the-junk"), "the valid job after the junk: {:?}", by_id.keys());
    alice.ack(["deep-1", "valid-after-the-junk"]).await.unwrap();
    cluster.wait_receipt("valid-after-the-junk", "alice", "delivered").await.unwrap();
    let ready = reqwest::get(format!("http://{}/readyz", dispatcher.internal)).await.unwrap();
    assert_eq!(ready.status(), 200, "the dispatcher is still up");
}

// --- unauthenticated exhaustion ---------------------------------------------------------------

/// The open-file limit of a flooded process: small enough that the flood below exhausts it when
/// nothing bounds the connections, as 20,000 sockets exhausted a production-sized limit.
const FLOOD_NOFILE: u64 = 512;
const HEADER_TIMEOUT_MS: u64 = 1000;
/// The flood: idle connections opened this fast, up to this many held at once (each holds a
/// descriptor in the test process too, whose limit is shared by every test).
const FLOOD_PER_SEC: u32 = 1000;
const FLOOD_MAX_OPEN: usize = 1500;
/// A flooding connection still open this long after it connected was never closed by the server.
const HELD_LIMIT: Duration = Duration::from_millis(HEADER_TIMEOUT_MS + 3000);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP limits of a flooded gateway or dispatcher: a 1 s header timeout, 64 places, and no
/// per-address rate (the flood comes from one address; the rate limit has its own test).
const FLOOD_LIMITS: &[(&str, &str)] = &[
    ("HERALD_HTTP_HEADER_TIMEOUT_MS", "1000"),
    ("HERALD_HTTP_IDLE_TIMEOUT_MS", "2000"),
    ("HERALD_HTTP_MAX_CONNECTIONS", "64"),
    ("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "0"),
];

/// Floods `addr` with idle connections and drip-fed heads, and while it lasts probes each of
/// `probes` (address, path, expected status; with `token`) on fresh connections every 100 ms for
/// 2 s: every probe must be answered in time, with its status. `during` runs while the flood is on. Then checks that the server closed
/// every flooding connection within [`HELD_LIMIT`] (under this pressure they give way to
/// newcomers long before their timeout), and that, with the pressure gone, idle connections and
/// drip-fed heads are closed by the header timeout.
async fn flood_and_probe<F: std::future::Future<Output = ()>>(
    addr: SocketAddr,
    probes: &[(SocketAddr, &str, u16)],
    token: Option<&str>,
    during: F,
) {
    let idle = Flood::idle(addr, FLOOD_PER_SEC, FLOOD_MAX_OPEN, HELD_LIMIT);
    let mut drips = tokio::task::JoinSet::new();
    for _ in 0..8 {
        drips.spawn(flood::drip_feed(addr, Duration::from_millis(100), HELD_LIMIT));
    }
    // Under way: more connections than the process could hold descriptors for, had it kept them.
    herald_tests::eventually(Duration::from_secs(10), Duration::from_millis(20), || async {
        let opened = idle.opened();
        if opened as u64 >= FLOOD_NOFILE {
            Ok(())
        } else {
            Err(format!("{opened} flooding connections so far"))
        }
    })
    .await
    .unwrap();

    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for round in 0..20 {
        tick.tick().await;
        for &(at, path, expected) in probes {
            match flood::probe(at, path, None, token, PROBE_TIMEOUT).await {
                Ok((status, latency)) if status == expected => latencies.push(latency),
                Ok((status, _)) => panic!("{at}{path} during the flood (probe {round}): HTTP {status}"),
                Err(e) => panic!("{at}{path} during the flood (probe {round}): {e:#}"),
            }
        }
    }
    during.await;

    while let Some(drip) = drips.join_next().await {
        drip.unwrap().unwrap_or_else(|e| panic!("a drip-fed head during the flood: {e:#}"));
    }
    let stats = idle.stop().await;
    assert_eq!(stats.held_past_limit, 0, "idle connections the server never closed: {stats:?}");
    let (p50, max) = flood::median_and_max(&latencies);
    println!(
        "flood of {addr}: {} idle connections opened ({} connects failed), closed by the server after \
         p50 {:?}, max {:?}; {} probes during it: p50 {p50:?}, max {max:?}",
        stats.opened,
        stats.failed_connects,
        stats.lifetime(0.5),
        stats.lifetime(1.0),
        latencies.len(),
    );

    // No pressure: nothing gives way, and the header timeout closes what sends no whole head.
    let idle = futures::future::join_all((0..32).map(|_| flood::idle_once(addr, HELD_LIMIT)));
    let drips =
        futures::future::join_all((0..8).map(|_| flood::drip_feed(addr, Duration::from_millis(100), HELD_LIMIT)));
    let (idle, drips) = tokio::join!(idle, drips);
    let idle: Vec<Duration> = idle.into_iter().map(|r| r.unwrap()).collect();
    let drips: Vec<Duration> = drips.into_iter().map(|r| r.unwrap()).collect();
    let timeout = Duration::from_millis(HEADER_TIMEOUT_MS);
    for closed_after in idle.iter().chain(&drips) {
        assert!(*closed_after >= timeout - Duration::from_millis(50), "closed before the header timeout");
    }
    let (idle_p50, idle_max) = flood::median_and_max(&idle);
    let (drip_p50, drip_max) = flood::median_and_max(&drips);
    println!(
        "header timeout {timeout:?}: 32 idle connections closed after p50 {idle_p50:?}, max {idle_max:?}; \
         8 drip-fed heads after p50 {drip_p50:?}, max {drip_max:?}"
    );
}

/// Issue 10, item 4: idle sockets and drip-fed headers exhausted the gateway's descriptors; it
/// stopped answering /healthz, legitimate clients timed out, and it never closed those sockets.
/// Now, on a gateway whose open-file limit a flood far exceeds: probes and a new client get in
/// during the flood, a connected client keeps receiving, and every flooding connection is closed
/// after the header timeout (or sooner, to make room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_drip_fed_connections_cannot_exhaust_the_gateway() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut limits = FLOOD_LIMITS.to_vec();
    limits.push(("HERALD_MAX_CONNECTIONS", "200"));
    let gateway = cluster.gateway_process_with(&limits, Some(FLOOD_NOFILE)).await.unwrap();
    let mut before = cluster.connect(gateway.addr, "before").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "before", true).await.unwrap();

    let during = async {
        let mut late = cluster.connect(gateway.addr, "late").await.expect("a client connects during the flood");
        receives(&cluster, &mut late, "late", "during-the-flood").await;
        receives(&cluster, &mut before, "before", "through-the-flood").await;
    };
    // The public port answers (a 404: probes live on the internal one, which the flood does not
    // reach), and so does the internal one.
    let (public, internal) = (gateway.addr, gateway.internal);
    let probes = [
        (public, "/healthz", 404),
        (internal, "/healthz", 200),
        (internal, "/readyz", 200),
        (internal, "/metrics", 200),
    ];
    flood_and_probe(gateway.addr, &probes, None, during).await;

    // Still whole afterwards, and it says what it shed.
    let (status, _) = flood::probe(gateway.internal, "/readyz", None, None, PROBE_TIMEOUT).await.unwrap();
    assert_eq!(status, 200);
    receives(&cluster, &mut before, "before", "after-the-flood").await;
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.internal)).await.unwrap().text().await.unwrap();
    let shed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("herald_http_connections_shed_total") && l.contains(r#"listener="public""#))
        .collect();
    println!("{shed:#?}");
    for reason in ["evicted", "header_timeout"] {
        assert!(shed.iter().any(|l| l.contains(reason)), "nothing shed as {reason}: {shed:?}");
    }
}

/// The same flood on the dispatcher's port: its probes and its query API stay answerable, and
/// it closes every flooding connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_drip_fed_connections_cannot_exhaust_the_dispatcher() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher_process_with(FLOOD_LIMITS, Some(FLOOD_NOFILE)).await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();

    let (public, internal) = (dispatcher.addr, dispatcher.internal);
    let probes = [
        (public, "/v1/users/alice/presence", 200),
        (public, "/v1/openapi.json", 200),
        (internal, "/healthz", 200),
        (internal, "/readyz", 200),
    ];
    let during = receives(&cluster, &mut alice, "alice", "routed-during-the-flood");
    flood_and_probe(dispatcher.addr, &probes, Some(ADMIN_TOKEN), during).await;

    let (status, body) = cluster.api(dispatcher.addr, "/v1/users/alice/presence", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((status, &body["online"]), (200, &json!(true)), "{body}");
    receives(&cluster, &mut alice, "alice", "routed-after-the-flood").await;
}

/// Connections from one address beyond its rate are closed before any HTTP is read; another
/// address still gets in, WebSocket and all, and the first gets in again once its rate allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_the_per_address_rate_are_closed_and_other_addresses_get_in() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    // 5 a second, bursts of 10.
    let gateway = cluster.gateway_process_with(&[("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "5")], None).await.unwrap();
    let (flooder, other): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());

    let started = tokio::time::Instant::now();
    let mut answered = 0;
    let mut closed = Vec::new();
    // Probes of the public port: answered 404 (probes live on the internal port), or closed.
    for _ in 0..40 {
        match flood::probe(gateway.addr, "/healthz", Some(flooder), None, PROBE_TIMEOUT).await {
            Ok((404, _)) => answered += 1,
            Ok((status, _)) => panic!("HTTP {status}"),
            Err(e) => closed.push(e.to_string()),
        }
    }
    let allowed = 10 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    println!(
        "a burst of 40 connects from one address: {answered} answered, {} closed in {:?}",
        closed.len(),
        started.elapsed()
    );
    assert!(answered >= 1 && answered <= allowed, "{answered} of 40 answered; the rate allows {allowed}");
    assert!(closed.iter().all(|e| e.contains("without a response") || e.contains("reset")), "{closed:?}");

    // Another address is not held back by the first: probes, and a client that gets its message.
    let (status, _) = flood::probe(gateway.addr, "/healthz", Some(other), None, PROBE_TIMEOUT).await.unwrap();
    assert_eq!(status, 404);
    let mut bob = TestClient::connect_from(&ws_url(gateway.addr), &cluster.token("bob"), other).await.unwrap();
    cluster.wait_presence(dispatcher.addr, "bob", true).await.unwrap();
    receives(&cluster, &mut bob, "bob", "from-another-address").await;

    // The flooding address is slowed, not banned.
    herald_tests::eventually(Duration::from_secs(5), Duration::from_millis(250), || async {
        flood::probe(gateway.addr, "/healthz", Some(flooder), None, PROBE_TIMEOUT).await
    })
    .await
    .unwrap();
}

/// HERALD_MAX_CONNECTIONS is checked against the open-file limit at start-up: a configured limit
/// that cannot fit stops the gateway with a message saying what to change; an unset one is
/// lowered to fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refuses_to_start_when_its_connections_cannot_fit_the_open_file_limit() {
    let cluster = Cluster::start().await.unwrap();
    let within = Duration::from_secs(10);
    let (status, output) =
        cluster.gateway_process_exit(&[("HERALD_MAX_CONNECTIONS", "5000")], Some(4096), within).await.unwrap();
    assert!(status.is_some_and(|s| !s.success()), "started with 5000 connections and 4096 files: {output}");
    // 4096 - 64 (reserve) - 1024 - 64 (public listener) - 32 - 64 (internal listener).
    for part in ["HERALD_MAX_CONNECTIONS=5000", "open-file limit", "4096", "ulimit -n", "at most 2848"] {
        assert!(output.contains(part), "{part:?} missing from:\n{output}");
    }
    println!("{}", output.lines().find(|l| l.contains("HERALD_MAX_CONNECTIONS")).unwrap_or_default());
    // Not even the HTTP listener's budget fits: the message names that setting instead.
    let (status, output) = cluster.gateway_process_exit(&[], Some(1024), within).await.unwrap();
    assert!(status.is_some_and(|s| !s.success()), "started with 1024 files: {output}");
    assert!(output.contains("HERALD_HTTP_MAX_CONNECTIONS") && output.contains("1024"), "{output}");

    // Unset, the default is lowered to what fits, and the gateway serves.
    let gateway = cluster.gateway_process_with(&[("HERALD_MAX_CONNECTIONS", "")], Some(4096)).await.unwrap();
    let client = cluster.connect(gateway.addr, "fits").await.unwrap();
    assert!(!client.hello().connection_id.as_str().is_empty());
}
