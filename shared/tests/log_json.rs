//! JSON log lines carry the trace and span ids of the span they were written in. A test binary of
//! its own: the formatter reaches the subscriber only as the process's global default.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use herald_shared::log_json::JsonWithTraceIds;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_line_inside_a_traced_span_names_its_trace_and_span() {
    let lines = Lines::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let writer = lines.clone();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))).with(
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(JsonWithTraceIds::default())
                .with_writer(move || writer.clone()),
        );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    tracing::info!("outside any span");
    let span = tracing::info_span!("herald.job");
    let ids = {
        let _entered = span.enter();
        tracing::info!(seq = 7, "inside");
        span.context().span().span_context().clone()
    };
    let (trace_id, span_id) = (ids.trace_id().to_string(), ids.span_id().to_string());

    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let logged: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(logged.len(), 2, "{text}");
    assert!(logged[0].get("trace_id").is_none() && logged[0].get("span_id").is_none(), "{text}");
    assert_eq!(logged[1]["fields"]["message"], "inside");
    assert_eq!(logged[1]["fields"]["seq"], 7);
    assert_eq!(logged[1]["span"]["name"], "herald.job", "the formatter's own fields stay: {text}");
    assert_eq!(logged[1]["trace_id"], trace_id.as_str(), "{text}");
    assert_eq!(logged[1]["span_id"], span_id.as_str(), "{text}");
    assert_eq!((trace_id.len(), span_id.len()), (32, 16));
    assert_ne!(trace_id, "0".repeat(32));
}
