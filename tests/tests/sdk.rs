//! The JS SDK (clients/js) against a real Herald: each case runs the SDK's e2e app in Node (`ws`,
//! token in a header) and in headless Chromium (the browser's WebSocket, token in the query
//! string), publishes through JetStream, breaks what the case is about, and checks what the
//! application was given against the receipts in the store.
//!
//! Needs the SDK built and its packages installed (`make sdk`), `node`, and Debian's chromium
//! (`make deps`); gateways that are killed run as processes (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use herald_tests::cluster::{ws_url, Cluster, JWT_SECRET};
use herald_tests::sdk::{Runtime, SdkApp};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// The app's configuration (clients/js/test/e2e/app.js): the gateways it tries in turn, and the
/// lifetime of each token it mints (seconds; the last one repeats).
fn config(gateways: &[SocketAddr], user: &str, tokens: &[i64], extra: Value) -> Value {
    let mut config = json!({
        "urls": gateways.iter().map(|a| ws_url(*a)).collect::<Vec<_>>(),
        "secret": JWT_SECRET,
        "user": user,
        "tokens": tokens,
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

fn is_state(e: &Value, state: &str) -> bool {
    e["ev"] == "state" && e["state"] == state
}

/// Waits for the `n`th `open` state (1-based) and returns its hello.
async fn nth_open(app: &SdkApp, n: usize) -> Value {
    app.wait_until(&format!("open #{n}"), WAIT, |events| {
        events.iter().filter(|e| is_state(e, "open")).nth(n - 1).map(|e| e["hello"].clone())
    })
    .await
    .unwrap()
}

/// Waits until the application has been given every id in `ids`.
async fn wait_notified(app: &SdkApp, ids: &[String]) {
    let want: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    app.wait_until(&format!("notifications {ids:?}"), WAIT, |events| {
        let got: BTreeSet<&str> =
            events.iter().filter(|e| e["ev"] == "notification").filter_map(|e| e["id"].as_str()).collect();
        want.is_subset(&got).then_some(())
    })
    .await
    .unwrap();
}

/// No id was given to the application twice.
fn assert_no_duplicates(app: &SdkApp) {
    let ids = app.notification_ids();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "the application saw a message twice: {ids:?}");
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:02}")).collect()
}

/// Receive, ack (receipt `delivered`, by this connection), read, and a clean close.
async fn receive_ack_read_close(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut app = SdkApp::start(runtime, &config(&[gateway.addr], "alice", &[3600], json!({}))).await.unwrap();
    let hello = nth_open(&app, 1).await;
    assert_eq!(hello["gateway_id"], gateway.id.as_str());
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();

    let payload = json!({"title": "hi", "n": [1, 2], "nested": {"ok": true}});
    cluster.publish(&json!({"id": "sdk-1", "to": ["alice"], "payload": payload})).await.unwrap();
    let n = app.wait_for("sdk-1", WAIT, |e| e["ev"] == "notification" && e["id"] == "sdk-1").await.unwrap();
    assert_eq!(n["payload"], payload);
    let receipt = cluster.wait_receipt("sdk-1", "alice", "delivered").await.unwrap();
    let by = receipt.delivered_by.expect("delivered_by");
    assert_eq!(by.connection_id.as_str(), hello["connection_id"], "acked by the SDK's connection");

    app.command(&json!({"cmd": "read", "ids": ["sdk-1"]})).await.unwrap();
    cluster.wait_receipt("sdk-1", "alice", "read").await.unwrap();

    let events = app.close().await.unwrap();
    let last = events.iter().rev().find(|e| e["ev"] == "state").unwrap();
    assert_eq!(
        (last["state"].as_str(), last["code"].as_u64(), last["willReconnect"].as_bool()),
        (Some("closed"), Some(1000), Some(false))
    );
    cluster.wait_presence(dispatcher.addr, "alice", false).await.unwrap();
    assert_eq!(app_tokens(&events), vec!["connect"], "one token, one connection");
}

fn app_tokens(events: &[Value]) -> Vec<String> {
    events.iter().filter(|e| e["ev"] == "token").filter_map(|e| e["reason"].as_str().map(str::to_owned)).collect()
}

/// A gateway killed with messages received but not yet acked: the SDK reconnects to the other
/// gateway, is replayed those messages, acks them there and does not show them again.
async fn gateway_killed(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut doomed = cluster.gateway_process().await.unwrap();
    let survivor = cluster.gateway().await.unwrap();
    // Acks wait 3 s: what the doomed gateway delivers is still unacked when it dies.
    let extra = json!({"ackDelayMs": 3000});
    let app = SdkApp::start(runtime, &config(&[doomed.addr, survivor.addr], "frank", &[3600], extra)).await.unwrap();
    let first = nth_open(&app, 1).await;
    cluster.wait_presence(dispatcher.addr, "frank", true).await.unwrap();

    let before = ids("k", 0..10);
    for id in &before {
        cluster.send(id, &["frank"]).await.unwrap();
    }
    wait_notified(&app, &before).await;
    doomed.kill9();
    let after = ids("k", 10..20);
    for id in &after {
        cluster.send(id, &["frank"]).await.unwrap();
    }
    let second = nth_open(&app, 2).await;
    assert_eq!(second["gateway_id"], survivor.id.as_str(), "reconnected to the other gateway");
    assert_ne!(first["gateway_id"], second["gateway_id"]);
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    wait_notified(&app, &all).await;
    for id in &all {
        let receipt = cluster.wait_receipt(id, "frank", "delivered").await.unwrap();
        assert_eq!(receipt.delivered_by.unwrap().gateway_id.as_str(), survivor.id, "{id} acked on the survivor");
    }
    assert_no_duplicates(&app);
    // The replay really did send them again: the SDK, not luck, kept them from the application.
    let copies: BTreeSet<String> =
        app.of("duplicate").iter().filter_map(|e| e["id"].as_str().map(str::to_owned)).collect();
    assert_eq!(copies, before.iter().cloned().collect::<BTreeSet<_>>(), "every unacked message came again");
    assert_eq!(app.notification_ids().len(), 20);
}

/// A refused token (HTTP 401), then a token that expires while connected (4401, in-band refresh
/// turned off): each time the SDK asks for a fresh token, says why, and reconnects.
async fn token_refresh(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    // Expired an hour ago (past any leeway), then valid for 2 s, then for an hour.
    let extra = json!({"refreshTokens": false});
    let app = SdkApp::start(runtime, &config(&[gateway.addr], "grace", &[-3600, 2, 3600], extra)).await.unwrap();
    let refused = app.wait_for("the refusal", WAIT, |e| is_state(e, "closed")).await.unwrap();
    match runtime {
        Runtime::Node => assert_eq!(refused["httpStatus"], 401, "{refused}"),
        // A browser hides the status of a refused upgrade: 1006, before any hello.
        Runtime::Chromium => assert_eq!(refused["code"], 1006, "{refused}"),
    }
    assert_eq!(refused["willReconnect"], true);
    let first = nth_open(&app, 1).await;
    let expired = app.wait_for("the 4401 close", WAIT, |e| is_state(e, "closed") && e["code"] == 4401).await.unwrap();
    assert_eq!(expired["error"], "token_expired");
    let second = nth_open(&app, 2).await;
    assert_ne!(first["connection_id"], second["connection_id"]);
    assert_eq!(app_tokens(&app.events()), vec!["connect", "unauthorized", "expired"]);

    cluster.wait_presence(dispatcher.addr, "grace", true).await.unwrap();
    cluster.send("after-refresh", &["grace"]).await.unwrap();
    wait_notified(&app, &["after-refresh".to_owned()]).await;
    let receipt = cluster.wait_receipt("after-refresh", "grace", "delivered").await.unwrap();
    assert_eq!(receipt.delivered_by.unwrap().connection_id.as_str(), second["connection_id"]);
}

/// A token that expires while connected is replaced in-band (a `refresh` frame) before it does:
/// the connection stays open past the first token's expiry, and keeps receiving.
async fn token_refresh_in_band(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    // Valid for 3 s (less than the SDK's margin: refreshed at once), then for an hour.
    let app = SdkApp::start(runtime, &config(&[gateway.addr], "heidi", &[3, 3600], json!({}))).await.unwrap();
    let hello = nth_open(&app, 1).await;
    assert!(hello["token_expires_at_ms"].as_u64().is_some(), "{hello}");
    app.wait_for("the refresh", WAIT, |e| e["ev"] == "token" && e["reason"] == "refresh").await.unwrap();
    // Past the first token's expiry (and the gateway's 4401, had it come).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!app.events().iter().any(|e| is_state(e, "closed")), "the connection stayed open");
    cluster.wait_presence(dispatcher.addr, "heidi", true).await.unwrap();
    cluster.send("after-in-band-refresh", &["heidi"]).await.unwrap();
    wait_notified(&app, &["after-in-band-refresh".to_owned()]).await;
    let receipt = cluster.wait_receipt("after-in-band-refresh", "heidi", "delivered").await.unwrap();
    assert_eq!(receipt.delivered_by.unwrap().connection_id.as_str(), hello["connection_id"]);
    assert_eq!(app_tokens(&app.events()), vec!["connect", "refresh"]);
    assert_eq!(app.of("error"), Vec::<Value>::new());
}

/// Messages published while the user was offline arrive on connect, oldest first, and are acked.
async fn offline_backlog_in_order(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let backlog = ids("bl", 0..12);
    for id in &backlog {
        cluster.send(id, &["heidi"]).await.unwrap();
    }
    for id in &backlog {
        cluster.wait_receipt(id, "heidi", "pending").await.unwrap();
    }
    let app = SdkApp::start(runtime, &config(&[gateway.addr], "heidi", &[3600], json!({}))).await.unwrap();
    wait_notified(&app, &backlog).await;
    let got = app.of("notification");
    let got_ids: Vec<&str> = got.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(got_ids, backlog.iter().map(String::as_str).collect::<Vec<_>>(), "oldest first");
    let seqs: Vec<u64> = got.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "by seq: {seqs:?}");
    for id in &backlog {
        cluster.wait_receipt(id, "heidi", "delivered").await.unwrap();
    }
    assert_no_duplicates(&app);
}

/// SIGTERM on the gateway: it closes with 1012, and the SDK reconnects within a second (a random
/// delay, no backoff), to the other one.
async fn drain_reconnects_elsewhere(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut draining = cluster.gateway_process().await.unwrap();
    let other = cluster.gateway().await.unwrap();
    let app = SdkApp::start(runtime, &config(&[draining.addr, other.addr], "ivan", &[3600], json!({}))).await.unwrap();
    let first = nth_open(&app, 1).await;
    cluster.wait_presence(dispatcher.addr, "ivan", true).await.unwrap();

    assert!(draining.sigterm(Duration::from_secs(20)).await.unwrap(), "the gateway drains and exits cleanly");
    let closed = app.wait_for("the 1012 close", WAIT, |e| is_state(e, "closed")).await.unwrap();
    assert_eq!(closed["code"].as_u64(), Some(1012), "{closed}");
    let delay = closed["delayMs"].as_f64().unwrap();
    assert!((0.0..1000.0).contains(&delay), "a random delay under a second, not a backoff: {closed}");
    let second = nth_open(&app, 2).await;
    assert_eq!(second["gateway_id"], other.id.as_str());
    assert_ne!(first["gateway_id"], second["gateway_id"]);
    let reopened = app.states("open")[1]["t"].as_u64().unwrap();
    let gap = reopened.saturating_sub(closed["t"].as_u64().unwrap());
    assert!(gap < 2000, "reconnected {gap} ms after the 1012, without backing off");

    cluster.send("after-drain", &["ivan"]).await.unwrap();
    wait_notified(&app, &["after-drain".to_owned()]).await;
    let receipt = cluster.wait_receipt("after-drain", "ivan", "delivered").await.unwrap();
    assert_eq!(receipt.delivered_by.unwrap().gateway_id.as_str(), other.id);
    assert_eq!(app.of("error"), Vec::<Value>::new());
}

/// Topics: the SDK subscribes after each hello, from the last offset it handed out, so a message
/// published while its gateway was dead comes after the reconnect, once, in offset order.
async fn topic_recovered_after_a_gateway_dies(runtime: Runtime) {
    let cluster = Cluster::start().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let mut doomed = cluster.gateway_process().await.unwrap();
    let survivor = cluster.gateway().await.unwrap();
    let extra = json!({ "subscribe": ["news"] });
    let app = SdkApp::start(runtime, &config(&[doomed.addr, survivor.addr], "tina", &[3600], extra)).await.unwrap();
    nth_open(&app, 1).await;
    app.wait_until("subscribed", WAIT, |events| events.iter().any(|e| e["ev"] == "subscribed").then_some(()))
        .await
        .unwrap();
    let publish = |id: &str| json!({ "id": id, "topic": "news", "payload": { "n": id } });
    cluster.publish(&publish("n-1")).await.unwrap();
    app.wait_until("n-1", WAIT, |events| events.iter().any(|e| e["ev"] == "topic" && e["id"] == "n-1").then_some(()))
        .await
        .unwrap();
    doomed.kill9();
    cluster.publish(&publish("n-2")).await.unwrap();
    cluster.publish(&publish("n-3")).await.unwrap();
    nth_open(&app, 2).await;
    let topics = app
        .wait_until("n-2 and n-3", WAIT, |events| {
            let got: Vec<Value> = events.iter().filter(|e| e["ev"] == "topic").cloned().collect();
            (got.len() >= 3).then_some(got)
        })
        .await
        .unwrap();
    let got: Vec<&str> = topics.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(got, ["n-1", "n-2", "n-3"], "each once, in order");
    let answers = app.of("subscribed");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[1]["recovered"], true, "the second subscribe named the last offset: {answers:?}");
    assert_eq!(app.of("error"), Vec::<Value>::new());
}

macro_rules! in_both {
    ($($case:ident),* $(,)?) => {
        mod node {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(herald_tests::sdk::Runtime::Node).await;
                }
            )*
        }
        mod chromium {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(herald_tests::sdk::Runtime::Chromium).await;
                }
            )*
        }
    };
}

in_both!(
    receive_ack_read_close,
    gateway_killed,
    token_refresh,
    token_refresh_in_band,
    offline_backlog_in_order,
    drain_reconnects_elsewhere,
    topic_recovered_after_a_gateway_dies
);

/// The demo page of `make run`, in headless Chromium: connect, publish, see the notification
/// arrive and its receipt turn `delivered`, mark it read. Screenshots: target/sdk-demo*.png.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_publishes_and_follows_the_receipt() {
    use herald_tests::cluster::ADMIN_TOKEN;
    use herald_tests::sdk::{run_script, DemoServer};

    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let g1 = cluster.gateway().await.unwrap();
    let g2 = cluster.gateway().await.unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let heraldctl = herald_tests::bin_path("heraldctl").unwrap();
    let target = heraldctl.parent().and_then(|debug| debug.parent()).unwrap().to_path_buf();
    let gateways = [g1.addr, g2.addr].iter().map(|a| format!("ws://{a}")).collect::<Vec<_>>().join(",");
    let demo = DemoServer::start(
        listen,
        &[
            ("HERALD_DEMO_GATEWAYS", gateways),
            ("HERALD_DEMO_API", format!("http://{}", dispatcher.addr)),
            ("HERALD_JWT_SECRET", JWT_SECRET.to_owned()),
            ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            // For the page's fallback when the dispatcher has no POST /v1/publish.
            ("HERALD_DEMO_HERALDCTL", heraldctl.display().to_string()),
            ("HERALD_NATS_URL", cluster.stack.nats.url()),
            ("HERALD_PREFIX", cluster.stack.prefix.clone()),
        ],
    )
    .await
    .unwrap();

    let env = [
        ("HERALD_DEMO_URL", demo.url.clone()),
        ("HERALD_DEMO_USER", "olivia".to_owned()),
        ("HERALD_DEMO_SCREENSHOTS", target.display().to_string()),
    ];
    let (ok, events) = run_script("test/e2e/demo.js", &env, Duration::from_secs(90)).await.unwrap();
    let transcript = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n  ");
    assert!(ok, "the demo driver failed:\n  {transcript}");
    let done = events.iter().find(|e| e["ev"] == "demo").unwrap_or_else(|| panic!("no result:\n  {transcript}"));
    let id = done["id"].as_str().unwrap();
    // The page publishes with POST /v1/publish, and falls back to the dev server's heraldctl only
    // where the dispatcher has no such route: wherever it has one, the page must have used it.
    let probe = reqwest::Client::new()
        .post(format!("http://{}/v1/publish", dispatcher.addr))
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let via_api = done["published"].as_str().unwrap_or_default().contains("via POST /v1/publish");
    println!("demo: published {} (the dispatcher answers {probe} to POST /v1/publish)", done["published"]);
    assert!(via_api || probe == 404 || probe == 405, "the dispatcher has POST /v1/publish, the page did not use it");
    let receipt = cluster.wait_receipt(id, "olivia", "read").await.unwrap();
    let by = receipt.delivered_by.expect("delivered_by");
    assert!([g1.id.as_str(), g2.id.as_str()].contains(&by.gateway_id.as_str()));
    for shot in ["sdk-demo-delivered.png", "sdk-demo.png"] {
        let meta = std::fs::metadata(target.join(shot)).unwrap_or_else(|e| panic!("{shot}: {e}"));
        assert!(meta.len() > 10_000, "{shot} is {} bytes: a blank page?", meta.len());
    }
    assert!(events.iter().all(|e| e["ev"] != "error"), "{transcript}");
}
