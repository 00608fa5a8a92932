//! Tests of the harness itself: the servers really start, serve, stop and come back as promised,
//! the proxy really cuts, the client speaks the protocol, tokens are good or bad as named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use fred::prelude::*;
use herald_proto::client::{ClientFrame, Hello, Notification, ServerFrame};
use herald_tests::client::{Frame, TestClient};
use herald_tests::proxy::TcpProxy;
use herald_tests::services::{Mongo, Nats, Redis, Stack};
use herald_tests::{bin_path, eventually, init_test_logging, tokens, unique_name};
use jsonwebtoken::errors::ErrorKind;
use mongodb::bson::{doc, Document};

const SECRET: &str = "harness-secret-0123456789";
const POLL: Duration = Duration::from_millis(50);

#[tokio::test]
async fn stack_starts_all_three_and_names_are_unique() {
    init_test_logging();
    let started = Instant::now();
    let stack = Stack::start().await.unwrap();
    eprintln!("Stack::start took {:?}", started.elapsed());

    let other = unique_name("t");
    assert_ne!(stack.prefix, other);
    assert!(herald_shared::config::is_token(&stack.prefix), "{}", stack.prefix);
    let config = stack.common_config();
    assert_eq!(config.redis_url, stack.redis.url());
    assert_eq!(config.nats_url, stack.nats.url());
    assert!(stack.names().jobs_stream().starts_with("T_"));

    // Herald's own connection code accepts every URL the stack hands out.
    herald_shared::connect::redis(&stack.redis.url()).await.unwrap();
    herald_shared::connect::nats(&stack.nats.url(), &Default::default(), "harness").await.unwrap();
    let db = herald_shared::connect::mongo(&stack.mongo_uri(), &stack.database).await.unwrap();
    db.collection::<Document>("c").insert_one(doc! { "through": "proxy" }).await.unwrap();
    let direct = mongodb::Client::with_uri_str(stack.mongo.uri()).await.unwrap();
    let found = direct.database(&stack.database).collection::<Document>("c").find_one(doc! {}).await.unwrap();
    assert_eq!(found.unwrap().get_str("through").unwrap(), "proxy");
}

#[tokio::test]
async fn redis_serves_and_comes_back_empty_after_restart() {
    init_test_logging();
    let mut redis = Redis::start().await.unwrap();
    let client = herald_shared::connect::redis(&redis.url()).await.unwrap();
    let () = client.set("k", "v", None, None, false).await.unwrap();
    assert_eq!(client.get::<Option<String>, _>("k").await.unwrap().as_deref(), Some("v"));

    redis.stop().await;
    assert!(client.get::<Option<String>, _>("k").await.is_err(), "redis is stopped");
    redis.restart().await.unwrap();

    // The same client reconnects to the same URL, and finds nothing.
    let value = eventually(Duration::from_secs(10), POLL, || async { client.get::<Option<String>, _>("k").await })
        .await
        .unwrap();
    assert_eq!(value, None);
}

#[tokio::test]
async fn nats_keeps_jetstream_messages_across_restarts() {
    init_test_logging();
    let mut nats = Nats::start().await.unwrap();
    let client = herald_shared::connect::nats(&nats.url(), &Default::default(), "harness").await.unwrap();
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "H_JOBS".into(),
        subjects: vec!["h.publish.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("h.publish.a", "one".into()).await.unwrap().await.unwrap();

    nats.stop().await;
    nats.restart().await.unwrap();
    let count = |js: jetstream::Context| async move {
        let mut stream = js.get_stream("H_JOBS").await.map_err(|e| e.to_string())?;
        Ok::<_, String>(stream.info().await.map_err(|e| e.to_string())?.state.messages)
    };
    let after_stop = eventually(Duration::from_secs(10), POLL, || count(js.clone())).await.unwrap();
    assert_eq!(after_stop, 1);

    // A crash loses nothing that was acknowledged either.
    js.publish("h.publish.b", "two".into()).await.unwrap().await.unwrap();
    nats.stop_hard().await;
    nats.restart().await.unwrap();
    let after_crash = eventually(Duration::from_secs(10), POLL, || count(js.clone())).await.unwrap();
    assert_eq!(after_crash, 2);

    // And both can be consumed.
    let stream = js.get_stream("H_JOBS").await.unwrap();
    let consumer = stream
        .get_or_create_consumer(
            "c",
            jetstream::consumer::pull::Config { durable_name: Some("c".into()), ..Default::default() },
        )
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(2).expires(Duration::from_secs(2)).messages().await.unwrap();
    let mut payloads = Vec::new();
    while let Some(message) = futures::StreamExt::next(&mut batch).await {
        let message = message.unwrap();
        payloads.push(String::from_utf8(message.payload.to_vec()).unwrap());
        message.ack().await.unwrap();
    }
    assert_eq!(payloads, ["one", "two"]);
}

#[tokio::test]
async fn mongo_inserts_and_finds() {
    init_test_logging();
    let mongo = Mongo::start().await.unwrap();
    let db = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap().database(&unique_name("t"));
    let receipts = db.collection::<Document>("receipts");
    receipts.insert_one(doc! { "_id": "m1:alice", "state": "pending" }).await.unwrap();
    receipts.insert_one(doc! { "_id": "m2:alice", "state": "read" }).await.unwrap();
    let found = receipts.find_one(doc! { "state": "read" }).await.unwrap().unwrap();
    assert_eq!(found.get_str("_id").unwrap(), "m2:alice");
}

/// A Mongo client reaching the server through `proxy`, giving up on server selection in 1 s.
async fn client_via(mongo: &Mongo, proxy: &TcpProxy) -> mongodb::Database {
    let uri = format!("{}&serverSelectionTimeoutMS=1000", mongo.uri_via(proxy.addr()));
    mongodb::Client::with_uri_str(&uri).await.unwrap().database("admin")
}

async fn ping(db: &mongodb::Database) -> Result<(), String> {
    db.run_command(doc! { "ping": 1 }).await.map(drop).map_err(|e| e.to_string())
}

#[tokio::test]
async fn proxy_cut_makes_mongo_fail_fast_and_restore_brings_it_back() {
    init_test_logging();
    let mongo = Mongo::start().await.unwrap();
    let proxy = TcpProxy::start(mongo.host_port().unwrap()).await.unwrap();
    let db = client_via(&mongo, &proxy).await;
    ping(&db).await.unwrap();
    assert!(proxy.live_connections() > 0);

    proxy.cut().await;
    assert_eq!(proxy.live_connections(), 0);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), ping(&db)).await;
    assert!(matches!(outcome, Ok(Err(_))), "ping through a cut proxy: {outcome:?}");
    eprintln!("ping failed {:?} after the cut", started.elapsed());

    proxy.restore();
    eventually(Duration::from_secs(10), POLL, || ping(&db)).await.unwrap();
}

#[tokio::test]
async fn proxy_blackhole_hangs_mongo_until_restored() {
    init_test_logging();
    let mongo = Mongo::start().await.unwrap();
    let proxy = TcpProxy::start(mongo.host_port().unwrap()).await.unwrap();
    let db = client_via(&mongo, &proxy).await;
    ping(&db).await.unwrap();

    proxy.blackhole();
    // On a pooled connection nothing comes back and nothing fails: only a caller's own timeout
    // ends the wait (the Rust driver has no socket timeout).
    let outcome = tokio::time::timeout(Duration::from_secs(2), ping(&db)).await;
    assert!(outcome.is_err() || matches!(outcome, Ok(Err(_))), "ping through a blackhole: {outcome:?}");

    proxy.restore();
    eventually(Duration::from_secs(10), POLL, || ping(&db)).await.unwrap();
}

#[tokio::test]
async fn eventually_returns_the_first_success() {
    let mut calls = 0;
    let value = eventually(Duration::from_secs(5), Duration::from_millis(1), || {
        calls += 1;
        let n = calls;
        async move {
            if n < 3 {
                Err(format!("only {n}"))
            } else {
                Ok(n)
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(value, 3);
}

#[tokio::test]
async fn eventually_fails_with_the_last_error_at_the_deadline() {
    let started = Instant::now();
    let err =
        eventually(Duration::from_millis(200), Duration::from_millis(20), || async { Err::<(), _>("still wrong") })
            .await
            .unwrap_err();
    assert!(err.to_string().contains("still wrong"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // An attempt that never finishes is cut off at the deadline too.
    let started = Instant::now();
    let err = eventually(Duration::from_millis(200), Duration::from_millis(20), || async {
        std::future::pending::<Result<(), String>>().await
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("still running"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn tokens_are_good_or_bad_as_named() {
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    let check = |token: &str| {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.set_issuer(&["herald-tests"]);
        validation.set_audience(&["herald"]);
        decode::<Claims>(token, &DecodingKey::from_secret(SECRET.as_bytes()).unwrap(), &validation)
            .map(|t| t.claims.sub)
            .map_err(|e| e.into_kind())
    };
    let good = |user| tokens::Claims::new(user, Duration::from_secs(60)).issuer("herald-tests").audience("herald");

    assert_eq!(check(&good("alice").sign(SECRET)), Ok("alice".to_owned()));
    assert_eq!(check(&tokens::expired(SECRET, "a")), Err(ErrorKind::ExpiredSignature));
    assert_eq!(check(&tokens::wrong_signature("a")), Err(ErrorKind::InvalidSignature));
    assert_eq!(check(&tokens::not_yet_valid(SECRET, "a")), Err(ErrorKind::ImmatureSignature));
    assert_eq!(check(&tokens::wrong_algorithm(SECRET, "a")), Err(ErrorKind::InvalidAlgorithm));
    assert!(check(&tokens::alg_none("a")).is_err());
    assert_eq!(check(&good("a").issuer("someone-else").sign(SECRET)), Err(ErrorKind::InvalidIssuer));
    assert_eq!(check(&good("a").audience("someone-else").sign(SECRET)), Err(ErrorKind::InvalidAudience));
    // A plain minted token carries no issuer or audience.
    let mut plain = Validation::new(Algorithm::HS256);
    plain.validate_nbf = true;
    let minted = tokens::mint(SECRET, "bob", Duration::from_secs(60));
    let decoded = decode::<Claims>(&minted, &DecodingKey::from_secret(SECRET.as_bytes()).unwrap(), &plain).unwrap();
    assert_eq!(decoded.claims.sub, "bob");
}

#[test]
fn bin_path_explains_a_missing_binary() {
    let err = bin_path("herald-no-such-binary").unwrap_err().to_string();
    assert!(err.contains("cargo build --workspace --bins"), "{err}");
}

// --- TestClient against a tiny gateway stand-in --------------------------------------------------

mod echo {
    //! Speaks just enough of the gateway's side: checks the bearer or query token, says hello,
    //! pings, answers an `ack` with one notification per id, and closes with 4000 on `bye`.
    use std::net::SocketAddr;
    use std::time::Duration;

    use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
    use axum::extract::Query;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use serde_json::value::RawValue;

    use super::*;

    pub(super) async fn start() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/ws", get(upgrade));
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, server)
    }

    #[derive(serde::Deserialize)]
    struct TokenQuery {
        token: Option<String>,
    }

    async fn upgrade(headers: HeaderMap, Query(query): Query<TokenQuery>, ws: WebSocketUpgrade) -> Response {
        let bearer =
            headers.get("authorization").and_then(|v| v.to_str().ok()).map(|v| v.trim_start_matches("Bearer "));
        if bearer.or(query.token.as_deref()) != Some("good") {
            return (StatusCode::UNAUTHORIZED, r#"{"error":"bad token"}"#).into_response();
        }
        ws.on_upgrade(session)
    }

    fn text(frame: &ServerFrame) -> Message {
        Message::Text(serde_json::to_string(frame).unwrap().into())
    }

    async fn session(mut socket: WebSocket) {
        let hello = Hello {
            connection_id: herald_proto::ConnectionId::new("c1").unwrap(),
            gateway_id: herald_proto::GatewayId::new("gw-echo").unwrap(),
            heartbeat_interval_ms: 50,
            max_frame_bytes: 1024,
            token_expires_at_ms: u64::MAX,
        };
        socket.send(text(&ServerFrame::Hello(hello))).await.unwrap();
        let mut ping = tokio::time::interval(Duration::from_millis(50));
        loop {
            let message = tokio::select! {
                _ = ping.tick() => {
                    if socket.send(Message::Ping(Default::default())).await.is_err() { return; }
                    continue;
                }
                message = socket.recv() => match message { Some(Ok(m)) => m, _ => return },
            };
            let Message::Text(raw) = message else {
                continue;
            };
            if raw.as_str() == "bye" {
                let close = CloseFrame { code: 4000, reason: "bye".into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                return;
            }
            let Ok(ClientFrame::Ack { ids }) = serde_json::from_str(&raw) else {
                socket.send(Message::Text(format!("unknown: {}", raw.as_str()).into())).await.unwrap();
                continue;
            };
            for (seq, id) in ids.into_iter().enumerate() {
                let n = Notification {
                    id,
                    seq: seq as u64 + 1,
                    payload: RawValue::from_string(r#"{"hi":1}"#.into()).unwrap(),
                    published_at_ms: 0,
                    expires_at_ms: u64::MAX,
                };
                socket.send(text(&ServerFrame::Notification(n))).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn test_client_speaks_the_protocol() {
    init_test_logging();
    let (addr, _server) = echo::start().await;
    let url = format!("ws://{addr}/ws");

    let refused = TestClient::connect(&url, "bad").await.err().unwrap();
    assert_eq!(refused.status(), Some(401));
    assert!(refused.to_string().contains("bad token"), "{refused}");

    let mut client = TestClient::connect(&url, "good").await.unwrap();
    assert_eq!(client.hello().gateway_id, "gw-echo");
    assert!(client.next_notification(Duration::from_millis(100)).await.is_none());

    client.ack(["a", "b", "c"]).await.unwrap();
    let got = client.notifications_until(3, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(got[0].payload.get(), r#"{"hi":1}"#);

    // Idle in the test, the client still reads: pings arrive (and get answered).
    eventually(Duration::from_secs(5), POLL, || async {
        if client.pings_received() >= 2 {
            Ok(())
        } else {
            Err("no pings yet")
        }
    })
    .await
    .unwrap();

    client.send_text("not json").await.unwrap();
    match client.next_frame(Duration::from_secs(5)).await {
        Frame::Text(t) => assert_eq!(t, "unknown: not json"),
        other => panic!("{other:?}"),
    }
    client.send_text("bye").await.unwrap();
    match client.next_frame(Duration::from_secs(5)).await {
        Frame::Close { code, reason } => assert_eq!((code, reason.as_str()), (4000, "bye")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(client.next_frame(Duration::from_secs(5)).await, Frame::Closed));

    let query_client = TestClient::connect_with_query_token(&url, "good").await.unwrap();
    query_client.close().await.unwrap();
}

#[tokio::test]
async fn paused_client_reads_nothing_until_resumed() {
    init_test_logging();
    let (addr, _server) = echo::start().await;
    let mut client = TestClient::connect_paused(&format!("ws://{addr}/ws"), "good").await.unwrap();
    client.ack(["x"]).await.unwrap();
    assert!(matches!(client.next_frame(Duration::from_millis(300)).await, Frame::Timeout));
    assert_eq!(client.pings_received(), 0);
    client.resume_reading();
    let n = client.next_notification(Duration::from_secs(5)).await.unwrap();
    assert_eq!(n.id, "x");
}
