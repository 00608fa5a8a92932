//! An OTLP/gRPC trace receiver in this test process (tonic, over TLS from a test CA), for tests
//! that prove Herald exports over gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`). Records spans as
//! the HTTP receiver of [`crate::otlp`] does, in the same [`Span`] form.
//!
//! Owns its server task (aborted on drop) and the spans it recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::otlp::{Link, Span};
use crate::test_ca::CertFiles;

/// A gRPC OTLP receiver on a free port of 127.0.0.1.
pub struct GrpcReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// The tonic server; aborted on drop.
    server: JoinHandle<()>,
}

#[derive(Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = span_records(request.into_inner());
        self.spans.lock().map_err(|_| tonic::Status::internal("poisoned"))?.extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl GrpcReceiver {
    /// Serves gRPC over TLS with `server`; with `client_ca`, only to clients presenting a
    /// certificate that CA signed.
    pub async fn start_tls(server: &CertFiles, client_ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let identity = Identity::from_pem(std::fs::read(&server.cert)?, std::fs::read(&server.key)?);
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(std::fs::read(ca)?));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let router =
            Server::builder().tls_config(tls)?.add_service(TraceServiceServer::new(Collector { spans: spans.clone() }));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                eprintln!("otlp grpc receiver stopped: {e}");
            }
        });
        Ok(Self { addr, spans, server })
    }

    /// `https://localhost:<port>`: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Every span received so far, in the order received.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Polls [`Self::spans`] until `done` holds for them, and returns them.
    pub async fn wait_for<F>(&self, timeout: Duration, done: F) -> anyhow::Result<Vec<Span>>
    where
        F: Fn(&[Span]) -> bool,
    {
        crate::otlp::wait_for_spans(timeout, || self.spans(), done).await
    }
}

impl Drop for GrpcReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The spans of one export, as the HTTP receiver writes them.
fn span_records(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .map(|kv| value_string(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(Span {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name,
                service: service.clone(),
                kind: span.kind,
                start_ns: span.start_time_unix_nano,
                end_ns: span.end_time_unix_nano,
                attributes: attributes(&span.attributes),
                links: span
                    .links
                    .iter()
                    .map(|l| Link { trace_id: hex(&l.trace_id), span_id: hex(&l.span_id) })
                    .collect(),
            });
        }
    }
    out
}

fn attributes(list: &[KeyValue]) -> std::collections::BTreeMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), value_string(kv.value.as_ref()))).collect()
}

/// A value as the HTTP receiver spells it (`tests/otlp/receiver.py`).
fn value_string(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(other) => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
