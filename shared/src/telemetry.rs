//! Logging and tracing set-up (one call at the top of each binary), and the W3C trace-context
//! helpers that carry one trace per notification across NATS: publisher → dispatcher → gateway
//! → client ack → dispatcher.
//!
//! Tracing export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP/protobuf;
//! `OTEL_SERVICE_NAME` overrides the service name). Off, spans cost what `tracing` spans cost
//! and no trace context is put on the wire.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, Layer};

/// The W3C header that carries a span's context.
pub const TRACEPARENT: &str = "traceparent";

/// Keeps the trace exporter alive; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing traces failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs filtered by `HERALD_LOG` (default `info`; set
/// `HERALD_LOG_FORMAT=json` for one JSON object per line), and, when configured, the OTLP
/// exporter for Herald's own spans (whatever the log level).
pub fn init(service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json");
    let logs = if json { fmt::layer().json().boxed() } else { fmt::layer().boxed() };
    let (provider, traces) = match otlp_provider(service) {
        Ok(Some(provider)) => {
            let targets = Targets::new().with_target("herald", LevelFilter::INFO);
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).with_filter(targets);
            (Some(provider), Some(layer))
        }
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("trace export disabled: {e}");
            (None, None)
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let installed = tracing_subscriber::registry().with(logs.with_filter(filter)).with(traces).try_init().is_ok();
    if installed {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), tracing = provider.is_some(), "starting");
    }
    Telemetry { provider }
}

fn otlp_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").map_or(true, |v| v.trim().is_empty()) {
        return Ok(None);
    }
    // The exporter reads the endpoint, headers and timeout from the standard variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(service);
    }
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build()))
}

/// Makes `span` a child of the trace context in NATS message headers, if any.
pub fn continue_from_headers(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsHeaders(headers)));
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of a `traceparent` value carried in a message body.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span`, when it belongs to an exported trace (None when export is off).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Puts `span`'s context on outgoing NATS headers.
pub fn inject_into_headers(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    if let Some(traceparent) = traceparent(span) {
        headers.insert(TRACEPARENT, traceparent.as_str());
    }
}

struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}
