//! The test collector itself: a real OTLP/HTTP protobuf export (built with `opentelemetry-proto`,
//! independently of the receiver's parsing) comes back from `OtlpReceiver::spans` field for field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use herald_tests::otlp::{kind, venv_python, Link, OtlpReceiver};

const WAIT: Duration = Duration::from_secs(10);

/// Exports two spans of one trace as two services would: the parent from "herald-gateway" in a
/// plain request, its child from "herald-dispatcher" gzipped. Checks each answer is what an
/// OTLP exporter expects (200, protobuf `ExportTraceServiceResponse`).
///
/// argv: endpoint trace_id parent_span_id child_span_id (hex)
const EXPORT_TWO_SPANS: &str = r#"
import gzip, sys, urllib.request
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

endpoint, trace, parent, child = sys.argv[1:5]

def request(service, span):
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service)))
    rs.scope_spans.add().spans.append(span)
    return req.SerializeToString()

def post(body, gzipped):
    headers = {"Content-Type": "application/x-protobuf"}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    req = urllib.request.Request(endpoint + "/v1/traces", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.status
        assert resp.headers["Content-Type"] == "application/x-protobuf", resp.headers["Content-Type"]
        ExportTraceServiceResponse().ParseFromString(resp.read())

publish = Span(trace_id=bytes.fromhex(trace), span_id=bytes.fromhex(parent), name="publish",
               kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=1_000, end_time_unix_nano=5_000)
publish.attributes.extend([
    KeyValue(key="herald.topic", value=AnyValue(string_value="room.1")),
    KeyValue(key="herald.recipients", value=AnyValue(int_value=3)),
    KeyValue(key="herald.durable", value=AnyValue(bool_value=True)),
    KeyValue(key="herald.ratio", value=AnyValue(double_value=0.5)),
])
deliver = Span(trace_id=bytes.fromhex(trace), span_id=bytes.fromhex(child),
               parent_span_id=bytes.fromhex(parent), name="deliver",
               kind=Span.SPAN_KIND_CONSUMER, start_time_unix_nano=2_000, end_time_unix_nano=4_000)
link = deliver.links.add()
link.trace_id, link.span_id = bytes.fromhex(trace), bytes.fromhex(parent)

post(request("herald-gateway", publish), gzipped=False)
post(request("herald-dispatcher", deliver), gzipped=True)
"#;

fn hex_id(bytes: usize) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..bytes * 2].to_owned()
}

#[tokio::test]
async fn a_parent_and_child_exported_by_two_services_come_back_with_their_links() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (trace, parent, child) = (hex_id(16), hex_id(8), hex_id(8));

    let output = tokio::process::Command::new(venv_python().unwrap())
        .args(["-c", EXPORT_TWO_SPANS, &receiver.endpoint(), &trace, &parent, &child])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "export failed:\n{}", String::from_utf8_lossy(&output.stderr));

    let spans = receiver.wait_for(WAIT, |spans| spans.len() >= 2).await.unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let publish = spans.iter().find(|s| s.name == "publish").unwrap();
    let deliver = spans.iter().find(|s| s.name == "deliver").unwrap();

    assert_eq!(publish.service, "herald-gateway");
    assert_eq!((publish.trace_id.as_str(), publish.span_id.as_str()), (trace.as_str(), parent.as_str()));
    assert!(publish.is_root());
    assert_eq!(publish.kind, kind::SERVER);
    assert_eq!((publish.start_ns, publish.end_ns), (1_000, 5_000));
    assert_eq!(publish.attribute("herald.topic"), Some("room.1"));
    assert_eq!(publish.attribute("herald.recipients"), Some("3"));
    assert_eq!(publish.attribute("herald.durable"), Some("true"));
    assert_eq!(publish.attribute("herald.ratio"), Some("0.5"));
    assert!(publish.links.is_empty());

    // The gzipped request, from the other service: same trace, parent link by id.
    assert_eq!(deliver.service, "herald-dispatcher");
    assert_eq!(deliver.trace_id, trace);
    assert_eq!(deliver.span_id, child);
    assert_eq!(deliver.parent_span_id, publish.span_id);
    assert_eq!(deliver.kind, kind::CONSUMER);
    assert_eq!((deliver.start_ns, deliver.end_ns), (2_000, 4_000));
    assert!(deliver.attributes.is_empty());
    assert_eq!(deliver.links, vec![Link { trace_id: trace.clone(), span_id: parent.clone() }]);
}

/// An exporter also sends metrics and logs to the same endpoint: they must not fail it. A body
/// that is not an export is refused without taking the receiver down or recording anything.
#[tokio::test]
async fn metrics_and_logs_are_accepted_and_junk_is_refused() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, body: &'static [u8]| {
        http.post(format!("{}{path}", receiver.endpoint()))
            .header("Content-Type", "application/x-protobuf")
            .body(body)
            .send()
    };

    for path in ["/v1/metrics", "/v1/logs"] {
        let response = post(path, b"\x0a\x00").await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/x-protobuf", "{path}");
    }
    assert_eq!(post("/v1/traces", b"\xff\xff\xff").await.unwrap().status(), 400);
    assert_eq!(post("/v2/traces", b"").await.unwrap().status(), 404);

    // Still serving; an empty export is valid and holds no span.
    let response = post("/v1/traces", b"").await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty(), "an empty ExportTraceServiceResponse is zero bytes");
    assert!(receiver.spans().is_empty());
}
