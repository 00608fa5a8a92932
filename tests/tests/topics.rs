//! Topics end to end: subscribe by the token's claim, broadcast to every subscriber on every
//! gateway, recovery by offset, aggregate receipts, and what a hostile client cannot do. Real
//! Redis, NATS JetStream and a Mongo-compatible server; one stack per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use herald_proto::{close, ServerFrame, TopicNotification, TopicRefusal, TopicRequest};
use herald_tests::client::{Frame, TestClient};
use herald_tests::cluster::{dispatcher_config, gateway_config, Cluster, Options, ADMIN_TOKEN};
use herald_tests::eventually;
use herald_tests::services::Stack;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);
/// How long a client waits to be sure that nothing more comes.
const QUIET: Duration = Duration::from_millis(300);

async fn subscribe(client: &mut TestClient, topic: &str, since: Option<u64>) -> ServerFrame {
    let mut frame = json!({ "type": "subscribe", "topic": topic });
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    client.send_text(frame.to_string()).await.unwrap();
    answer(client).await
}

async fn unsubscribe(client: &mut TestClient, topic: &str) -> ServerFrame {
    client.send_text(json!({ "type": "unsubscribe", "topic": topic }).to_string()).await.unwrap();
    answer(client).await
}

/// The next frame, which must be an answer to a topic frame.
async fn answer(client: &mut TestClient) -> ServerFrame {
    match client.next_frame(WAIT).await {
        Frame::Server(f @ (ServerFrame::Subscribed { .. } | ServerFrame::Unsubscribed { .. })) => f,
        Frame::Server(f @ ServerFrame::TopicRefused { .. }) => f,
        other => panic!("expected an answer to a topic frame, got {other:?}"),
    }
}

fn recovered(frame: &ServerFrame) -> Option<bool> {
    match frame {
        ServerFrame::Subscribed { recovered, .. } => *recovered,
        other => panic!("expected subscribed, got {other:?}"),
    }
}

fn refusal(frame: &ServerFrame) -> (TopicRequest, TopicRefusal) {
    match frame {
        ServerFrame::TopicRefused { request, reason, .. } => (*request, *reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The next topic message, or None if none comes within `timeout`. Panics on anything else.
async fn topic_message(client: &mut TestClient, timeout: Duration) -> Option<TopicNotification> {
    match client.next_frame(timeout).await {
        Frame::Server(ServerFrame::TopicMessage(m)) => Some(m),
        Frame::Timeout => None,
        other => panic!("expected a topic message, got {other:?}"),
    }
}

async fn publish_topic(cluster: &Cluster, id: &str, topic: &str) {
    cluster.publish(&json!({ "id": id, "topic": topic, "payload": { "n": id } })).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_answered_by_the_claim_and_refused_with_a_reason() {
    let options = Options {
        topics: herald_shared::config::GatewayTopics { max_per_connection: 3, ..Default::default() },
        ..Options::default()
    };
    let cluster = Cluster::new(Stack::start().await.unwrap(), options).await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice =
        cluster.connect_topics(gateway.addr, "alice", &["news", "sports.*", "bad pattern", "*"]).await.unwrap();

    assert_eq!(recovered(&subscribe(&mut alice, "news", None).await), None);
    let refused = |frame: ServerFrame| refusal(&frame);
    assert_eq!(
        refused(subscribe(&mut alice, "news", None).await),
        (TopicRequest::Subscribe, TopicRefusal::AlreadySubscribed)
    );
    // Outside the claim: another topic, the prefix itself, and what the bad entries might mean.
    for topic in ["weather", "sports", "bad pattern", "anything"] {
        let (_, reason) = refused(subscribe(&mut alice, topic, None).await);
        assert!(matches!(reason, TopicRefusal::NotAllowed | TopicRefusal::InvalidTopic), "{topic}: {reason:?}");
    }
    assert_eq!(refused(subscribe(&mut alice, "weather", None).await).1, TopicRefusal::NotAllowed);
    for topic in ["", "a..b", "news.*", "news.>", &"x".repeat(200)] {
        assert_eq!(refused(subscribe(&mut alice, topic, None).await).1, TopicRefusal::InvalidTopic, "{topic:?}");
    }
    // The cap: 3 per connection.
    assert_eq!(recovered(&subscribe(&mut alice, "sports.f1", None).await), None);
    assert_eq!(recovered(&subscribe(&mut alice, "sports.golf", None).await), None);
    assert_eq!(refused(subscribe(&mut alice, "sports.chess", None).await).1, TopicRefusal::TooManySubscriptions);
    assert!(matches!(unsubscribe(&mut alice, "sports.golf").await, ServerFrame::Unsubscribed { .. }));
    assert_eq!(
        refused(unsubscribe(&mut alice, "sports.golf").await),
        (TopicRequest::Unsubscribe, TopicRefusal::NotSubscribed)
    );
    assert_eq!(recovered(&subscribe(&mut alice, "sports.chess", None).await), None, "room again");

    // A token without the claim may subscribe to nothing.
    let mut bob = cluster.connect(gateway.addr, "bob").await.unwrap();
    assert_eq!(refused(subscribe(&mut bob, "news", None).await).1, TopicRefusal::NotAllowed);
    // Refusals leave the connection open and working.
    publish_topic(&cluster, "n-1", "news").await;
    assert_eq!(topic_message(&mut alice, WAIT).await.expect("news").id, "n-1");
    assert!(topic_message(&mut bob, QUIET).await.is_none(), "bob was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_subscribe_closes_with_4400_and_loses_nothing() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    cluster.send("direct-1", &["alice"]).await.unwrap();
    assert_eq!(alice.next_notification(WAIT).await.expect("notification").id, "direct-1");

    alice.send_text(r#"{"type":"subscribe","topic":["news"]}"#).await.unwrap();
    match alice.next_frame(WAIT).await {
        Frame::Server(ServerFrame::Error { code, .. }) => assert_eq!(code, herald_proto::ErrorCode::BadFrame),
        other => panic!("expected the bad_frame error, got {other:?}"),
    }
    assert!(matches!(alice.next_frame(WAIT).await, Frame::Close { code: close::BAD_FRAME, .. }));
    // What it was sent and did not ack is still pending, and comes again.
    assert_eq!(cluster.receipts("direct-1").await.unwrap()["alice"].state.as_str(), "pending");
    let mut again = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(again.next_notification(WAIT).await.expect("replayed").id, "direct-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_message_reaches_its_subscribers_on_both_gateways_and_no_one_else() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let g1 = cluster.gateway().await.unwrap();
    let g2 = cluster.gateway().await.unwrap();
    let claim = ["news", "sports.*"];
    let mut a = cluster.connect_topics(g1.addr, "alice", &claim).await.unwrap();
    let mut b = cluster.connect_topics(g2.addr, "bob", &claim).await.unwrap();
    let mut b2 = cluster.connect_topics(g2.addr, "bob", &claim).await.unwrap();
    let mut c = cluster.connect_topics(g2.addr, "carol", &claim).await.unwrap();
    let mut d = cluster.connect_topics(g1.addr, "dave", &claim).await.unwrap();
    for client in [&mut a, &mut b, &mut b2, &mut d] {
        assert_eq!(recovered(&subscribe(client, "news", None).await), None);
    }
    for client in [&mut c, &mut d] {
        assert_eq!(recovered(&subscribe(client, "sports.x", None).await), None);
    }
    assert!(matches!(unsubscribe(&mut d, "news").await, ServerFrame::Unsubscribed { .. }));

    publish_topic(&cluster, "t-1", "news").await;
    let mut offset = 0;
    for client in [&mut a, &mut b, &mut b2] {
        let m = topic_message(client, WAIT).await.expect("news");
        assert_eq!((m.id.as_str(), m.topic.as_str(), m.payload.get()), ("t-1", "news", r#"{"n":"t-1"}"#));
        offset = m.offset;
    }
    // Later on the same stream: c and d see the sentinel first, so they got nothing before it.
    publish_topic(&cluster, "t-2", "sports.x").await;
    for client in [&mut c, &mut d] {
        let m = topic_message(client, WAIT).await.expect("sports.x");
        assert_eq!(m.id, "t-2");
        assert!(m.offset > offset);
    }
    assert!(topic_message(&mut a, QUIET).await.is_none(), "a is not subscribed to sports.x");

    // Aggregate receipt: three connections of two users acked; repeats and strangers count nothing.
    a.ack(["t-1"]).await.unwrap();
    a.ack(["t-1"]).await.unwrap();
    b.ack(["t-1"]).await.unwrap();
    b2.read(["t-1"]).await.unwrap();
    c.ack(["t-1"]).await.unwrap();
    let receipt = eventually(WAIT, Duration::from_millis(50), || async {
        let (status, body) =
            cluster.api(dispatcher.addr, "/v1/messages/t-1", Some(ADMIN_TOKEN)).await.map_err(|e| e.to_string())?;
        match (status, body["topic_receipt"]["acked_connections"].as_i64()) {
            (200, Some(3)) => Ok(body),
            _ => Err(body.to_string()),
        }
    })
    .await
    .unwrap();
    assert_eq!(receipt["message"]["topic"], "news");
    assert_eq!(receipt["message"]["seq"], offset);
    // bob's two connections on one gateway acked in one report or two: 2 or 3 users.
    let users = receipt["topic_receipt"]["acked_users"].as_i64().unwrap();
    assert!((2..=3).contains(&users), "{receipt}");
    assert_eq!(receipt["receipts"], json!([]), "no document per user");
    tokio::time::sleep(QUIET).await;
    let (_, body) = cluster.api(dispatcher.addr, "/v1/messages/t-1", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(body["topic_receipt"]["acked_connections"], 3, "c's ack of a message it was not sent does not count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_since_recovers_what_it_missed_in_order_then_goes_live() {
    let cluster = Cluster::start().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect_topics(gateway.addr, "alice", &["news", "other"]).await.unwrap();
    subscribe(&mut alice, "news", None).await;
    publish_topic(&cluster, "r-1", "news").await;
    let first = topic_message(&mut alice, WAIT).await.expect("r-1");
    drop(alice);

    // Missed while away, with another topic's messages in between (gaps in the offsets).
    for (id, topic) in [("r-2", "news"), ("x-1", "other"), ("r-3", "news"), ("x-2", "other"), ("r-4", "news")] {
        publish_topic(&cluster, id, topic).await;
    }
    cluster.wait_jobs_handled().await.unwrap();
    let mut again = cluster.connect_topics(gateway.addr, "alice", &["news", "other"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut again, "news", Some(first.offset)).await), Some(true));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(topic_message(&mut again, WAIT).await.expect("recovered"));
    }
    let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["r-2", "r-3", "r-4"]);
    assert!(got.windows(2).all(|w| w[0].offset < w[1].offset));
    publish_topic(&cluster, "r-5", "news").await;
    assert_eq!(topic_message(&mut again, WAIT).await.expect("live").id, "r-5");
    assert!(topic_message(&mut again, QUIET).await.is_none(), "nothing twice");

    // Subscribing from the latest offset recovers nothing, and says so truly.
    let last =
        cluster.js.get_stream(cluster.stack.names().topics_stream()).await.unwrap().cached_info().state.last_sequence;
    let mut third = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut third, "news", Some(last)).await), Some(true));
    assert!(topic_message(&mut third, QUIET).await.is_none());
    // An offset this stream never gave: not recovered.
    let mut fourth = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut fourth, "news", Some(last + 1000)).await), Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_older_than_the_retention_or_past_the_cap_is_not_recovered() {
    let stack = Stack::start().await.unwrap();
    let options = Options {
        topics: herald_shared::config::GatewayTopics { recovery_max_msgs: 2, ..Default::default() },
        ..Options::default()
    };
    let cluster = Cluster::new(stack, options).await.unwrap();
    let retention = herald_shared::config::TopicRetention { max_msgs: 4, ..Default::default() };
    let mut dispatcher = dispatcher_config(&cluster.stack, &cluster.options);
    dispatcher.common.topics = retention;
    let _dispatcher = cluster.dispatcher_with(dispatcher).await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.common.topics = retention;
    let gateway = cluster.gateway_with(config).await.unwrap();

    let mut alice = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    subscribe(&mut alice, "news", None).await;
    publish_topic(&cluster, "o-1", "news").await;
    let first = topic_message(&mut alice, WAIT).await.expect("o-1");
    drop(alice);
    for i in 2..=7 {
        publish_topic(&cluster, &format!("o-{i}"), "news").await;
    }
    cluster.wait_jobs_handled().await.unwrap();

    // The stream keeps 4 (o-4..o-7): o-2 and o-3 are gone. The cap brings 2 of the 4.
    let mut again = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut again, "news", Some(first.offset)).await), Some(false));
    let got: Vec<String> = [topic_message(&mut again, WAIT).await, topic_message(&mut again, WAIT).await]
        .into_iter()
        .map(|m| m.expect("what is left").id.into_string())
        .collect();
    assert_eq!(got, ["o-4", "o-5"], "the oldest still kept, up to the cap");
    assert!(topic_message(&mut again, QUIET).await.is_none());

    // From o-5 on, 2 are missed (o-6, o-7): within the cap and the retention.
    let o5 =
        cluster.js.get_stream(cluster.stack.names().topics_stream()).await.unwrap().cached_info().state.last_sequence
            - 2;
    let mut third = cluster.connect_topics(gateway.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut third, "news", Some(o5)).await), Some(true));
    assert_eq!(topic_message(&mut third, WAIT).await.unwrap().id, "o-6");
    assert_eq!(topic_message(&mut third, WAIT).await.unwrap().id, "o-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_jobs_are_validated_and_cannot_address_both() {
    let cluster = Cluster::start().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let stream = cluster.stack.names().topics_stream();
    cluster.publish(&json!({"id": "bad-1", "topic": "a..b", "payload": {}})).await.unwrap();
    cluster.publish(&json!({"id": "bad-2", "topic": "news", "to": ["alice"], "payload": {}})).await.unwrap();
    cluster.publish(&json!({"id": "ok-1", "topic": "news", "payload": {}})).await.unwrap();
    // The same job again (after the jobs stream's duplicate window, say): published once.
    cluster
        .publish_raw(br#"{"id":"ok-1","topic":"news","payload":{}}"#.to_vec(), async_nats::HeaderMap::new())
        .await
        .unwrap();
    cluster.wait_jobs_handled().await.unwrap();
    let state = cluster.js.get_stream(&stream).await.unwrap().cached_info().state.clone();
    assert_eq!(state.messages, 1, "only ok-1, once: {state:?}");
    let rejected =
        cluster.js.get_stream(cluster.stack.names().rejected_stream()).await.unwrap().cached_info().state.messages;
    assert_eq!(rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_and_restarted_does_not_break_delivery_elsewhere() {
    let cluster = Cluster::start().await.unwrap();
    let _dispatcher = cluster.dispatcher().await.unwrap();
    let mut doomed = cluster.gateway_process().await.unwrap();
    let survivor = cluster.gateway().await.unwrap();
    let mut a = cluster.connect_topics(doomed.addr, "alice", &["news"]).await.unwrap();
    let mut b = cluster.connect_topics(survivor.addr, "bob", &["news"]).await.unwrap();
    subscribe(&mut a, "news", None).await;
    subscribe(&mut b, "news", None).await;
    publish_topic(&cluster, "k-1", "news").await;
    let last_seen = topic_message(&mut a, WAIT).await.expect("k-1 on the doomed gateway").offset;
    assert_eq!(topic_message(&mut b, WAIT).await.expect("k-1").id, "k-1");

    doomed.kill9();
    publish_topic(&cluster, "k-2", "news").await;
    assert_eq!(topic_message(&mut b, WAIT).await.expect("k-2 while the other is dead").id, "k-2");

    // alice reconnects to a restarted gateway and recovers what she missed.
    let restarted = cluster.gateway_process().await.unwrap();
    let mut a = cluster.connect_topics(restarted.addr, "alice", &["news"]).await.unwrap();
    assert_eq!(recovered(&subscribe(&mut a, "news", Some(last_seen)).await), Some(true));
    assert_eq!(topic_message(&mut a, WAIT).await.expect("recovered k-2").id, "k-2");
    publish_topic(&cluster, "k-3", "news").await;
    assert_eq!(topic_message(&mut a, WAIT).await.expect("k-3 live").id, "k-3");
    assert_eq!(topic_message(&mut b, WAIT).await.expect("k-3").id, "k-3");
}
