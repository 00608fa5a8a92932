//! JSON log lines that carry the current span's trace and span ids (`trace_id`, `span_id`, W3C
//! hex), so that a line found in the logs leads to its trace, and a trace to its lines. The ids
//! exist while traces are exported (see `telemetry`); without a trace to look up there are none.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's JSON format, with the ids added to each object written inside a span.
pub struct JsonWithTraceIds {
    inner: Format<Json>,
}

impl Default for JsonWithTraceIds {
    fn default() -> Self {
        Self { inner: tracing_subscriber::fmt::format().json() }
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        // The event is dispatched inside its span, so the current span is the event's. tracing
        // lets a formatter reach the subscriber only when it is the global default (as
        // `telemetry::init` makes it); under a scoped one this finds no span and adds no ids.
        let context = tracing::Span::current().context();
        let span = context.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return writer.write_str(&line);
        }
        writer.write_str(&with_ids(&line, &ids.trace_id().to_string(), &ids.span_id().to_string()))
    }
}

/// `line`, one JSON object and a newline, with the two ids as its last fields. A line of another
/// shape is left as it is.
fn with_ids(line: &str, trace_id: &str, span_id: &str) -> String {
    let body = line.trim_end_matches('\n');
    let Some(open) = body.strip_suffix('}') else { return line.to_owned() };
    let comma = if open.trim_end().ends_with('{') { "" } else { "," };
    // Hex ids need no escaping.
    format!("{open}{comma}\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_last_in_the_object() {
        let line = "{\"level\":\"INFO\",\"fields\":{\"message\":\"x\"}}\n";
        assert_eq!(
            with_ids(line, "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
            "{\"level\":\"INFO\",\"fields\":{\"message\":\"x\"},\
             \"trace_id\":\"0af7651916cd43dd8448eb211c80319c\",\"span_id\":\"b7ad6b7169203331\"}\n"
        );
        assert_eq!(with_ids("{}\n", "a", "b"), "{\"trace_id\":\"a\",\"span_id\":\"b\"}\n");
        assert_eq!(with_ids("not json\n", "a", "b"), "not json\n", "left alone");
    }
}
