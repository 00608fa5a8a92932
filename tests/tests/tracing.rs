//! One trace per notification: the publisher's `traceparent` is continued through the
//! dispatcher (job, store, presence, route), the gateway (deliver, ack) and back into the
//! dispatcher (receipt), with every span's parent the span before it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use herald_tests::cluster::{Cluster, Options};
use herald_tests::otlp::{OtlpReceiver, Span};
use herald_tests::services::Stack;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_is_one_trace_from_publisher_to_receipt() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let options = Options { otlp_endpoint: Some(receiver.endpoint()), ..Options::default() };
    let cluster = Cluster::new(Stack::start().await.unwrap(), options).await.unwrap();
    let _dispatcher = cluster.dispatcher_process().await.unwrap();
    let gateway = cluster.gateway_process().await.unwrap();
    let mut client = cluster.connect(gateway.addr, "tara").await.unwrap();
    cluster.wait_presence(_dispatcher.addr, "tara", true).await.unwrap();

    // The publisher's own span.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let publisher_span = "00f067aa0ba902b7";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "traced-1");
    headers.insert("traceparent", format!("00-{trace_id}-{publisher_span}-01").as_str());
    let job = json!({"id": "traced-1", "to": ["tara"], "payload": {"hello": "trace"}});
    cluster.publish_raw(serde_json::to_vec(&job).unwrap(), headers).await.unwrap();
    let n = client.next_notification(Duration::from_secs(10)).await.expect("notification");
    client.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("traced-1", "tara", "delivered").await.unwrap();

    let expected = [
        "herald.job",
        "herald.store",
        "herald.presence",
        "herald.route",
        "herald.deliver",
        "herald.ack",
        "herald.receipt",
    ];
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            expected.iter().all(|name| spans.iter().any(|s| s.trace_id == trace_id && s.name == *name))
        })
        .await
        .unwrap();
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let by_name: HashMap<&str, &Span> = ours.iter().map(|s| (s.name.as_str(), *s)).collect();
    let parent_of = |name: &str| by_name[name].parent_span_id.as_str();
    let id_of = |name: &str| by_name[name].span_id.as_str();

    assert_eq!(parent_of("herald.job"), publisher_span, "the dispatcher continues the publisher's span");
    for step in ["herald.store", "herald.presence", "herald.route"] {
        assert_eq!(parent_of(step), id_of("herald.job"), "{step} is a child of the job");
    }
    assert_eq!(parent_of("herald.deliver"), id_of("herald.route"), "the gateway continues the route span");
    assert_eq!(parent_of("herald.ack"), id_of("herald.deliver"));
    assert_eq!(parent_of("herald.receipt"), id_of("herald.ack"), "the receipt write closes the trace");
    for (name, service) in [
        ("herald.job", "herald-dispatcher"),
        ("herald.deliver", "herald-gateway"),
        ("herald.ack", "herald-gateway"),
        ("herald.receipt", "herald-dispatcher"),
    ] {
        assert_eq!(by_name[name].service, service, "{name}");
    }
    // Print the tree for the record.
    for name in expected {
        let s = by_name[name];
        println!("{:<16} {:<18} span {} parent {}", s.name, s.service, s.span_id, s.parent_span_id);
    }
}
