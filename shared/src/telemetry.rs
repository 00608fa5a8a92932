//! Logging and tracing set-up (one call at the top of each binary), and the W3C trace-context
//! helpers that carry one trace per notification across NATS: publisher → dispatcher → gateway
//! → client ack → dispatcher.
//!
//! Tracing export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP/protobuf,
//! or gRPC with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`; https with the system's roots or
//! `OTEL_EXPORTER_OTLP_CERTIFICATE`, and a client certificate from
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`;
//! `OTEL_SERVICE_NAME` overrides the service name). Off, spans cost what `tracing` spans cost
//! and no trace context is put on the wire. On, JSON logs name each line's trace and span
//! (`log_json`).

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

use crate::tls::{ClientTls, TlsError, OTLP_TLS};

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

/// How logs are written: `HERALD_LOG`, a filter such as `info` or `warn,herald_gateway=debug`
/// (default `info`), and `HERALD_LOG_FORMAT`, `text` (the default) or `json` (one object a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub filter: String,
    pub json: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { filter: "info".to_owned(), json: false }
    }
}

impl LogSettings {
    /// The settings these variables give, each invalid one replaced by its default and named in
    /// the problems returned (which the configuration reports with the rest of its errors).
    pub fn read(filter: Option<&str>, format: Option<&str>) -> (Self, Vec<String>) {
        let mut settings = Self::default();
        let mut problems = Vec::new();
        if let Some(f) = filter.map(str::trim).filter(|f| !f.is_empty()) {
            match EnvFilter::builder().with_regex(false).parse(f) {
                Ok(_) => settings.filter = f.to_owned(),
                Err(e) => {
                    problems.push(format!("HERALD_LOG: {e} (a filter such as `info` or `warn,herald_gateway=debug`)"))
                }
            }
        }
        match format.map(str::trim).unwrap_or("") {
            "" | "text" => {}
            "json" => settings.json = true,
            other => problems.push(format!("HERALD_LOG_FORMAT: `{other}` is neither `text` nor `json`")),
        }
        (settings, problems)
    }

    fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        Self::read(var("HERALD_LOG").as_deref(), var("HERALD_LOG_FORMAT").as_deref()).0
    }
}

/// Installs the global subscriber: logs as [`LogSettings`] says (colours only on a terminal,
/// never with `NO_COLOR` set), and, when configured, the OTLP exporter for Herald's own spans
/// (whatever the log level).
pub fn init(service: &'static str) -> Telemetry {
    use std::io::IsTerminal as _;
    let settings = LogSettings::from_env();
    // fred warns on every reconnect attempt and on the connection Herald closes at shutdown;
    // Herald reports Redis outages itself (outage.rs). A filter that names fred wins.
    let directives = if settings.filter.contains("fred") {
        settings.filter.clone()
    } else {
        format!("{},fred=error", settings.filter)
    };
    let filter = EnvFilter::builder().with_regex(false).parse_lossy(&directives);
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = if settings.json {
        fmt::layer().json().event_format(crate::log_json::JsonWithTraceIds::default()).boxed()
    } else {
        fmt::layer().with_ansi(ansi).boxed()
    };
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

/// Reports why the process cannot run, as one log line (one JSON object with
/// `HERALD_LOG_FORMAT=json`) rather than a multi-line debug dump, then exits with status 1.
/// `telemetry` is flushed first.
pub fn exit_on_error(telemetry: Telemetry, error: &(dyn std::error::Error + 'static)) -> ! {
    tracing::error!(error = %one_line(error), "cannot run");
    drop(telemetry);
    std::process::exit(1)
}

/// An error and its causes on one line: "redis at redis://…: Connection refused (os error 111)".
/// A cause whose text its parent already shows is left out.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

/// How spans are sent to the collector: `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`, the specification's default.
    #[default]
    HttpProtobuf,
    /// `grpc`.
    Grpc,
}

/// The OTLP exporter's transport, from the standard variables. The exporter itself reads the
/// endpoint, headers and timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpSettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; unset, nothing is exported.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE` (CA), `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and
    /// `OTEL_EXPORTER_OTLP_CLIENT_KEY` (mutual TLS).
    pub tls: ClientTls,
}

/// Why the exporter could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP http client: {0}")]
    Client(String),
}

impl OtlpSettings {
    /// The settings `var` gives, and a line for each variable that is wrong (unreadable or
    /// non-PEM files included), which the configuration reports with the rest of its errors.
    pub fn read(mut var: impl FnMut(&str) -> Option<String>) -> (Self, Vec<String>) {
        let mut env = crate::config::Env::from_pairs(
            [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), var(name)?.trim().to_owned()))),
        );
        let endpoint = env.optional("OTEL_EXPORTER_OTLP_ENDPOINT");
        let protocol = match env.string("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").as_str() {
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            "grpc" => OtlpProtocol::Grpc,
            other => {
                env.invalid(format!("OTEL_EXPORTER_OTLP_PROTOCOL: `{other}` is neither `http/protobuf` nor `grpc`"));
                OtlpProtocol::HttpProtobuf
            }
        };
        let tls = crate::config::client_tls(&mut env, &OTLP_TLS);
        let problems = env.finish(()).err().map(|e| e.0).unwrap_or_default();
        (Self { endpoint, protocol, tls }, problems)
    }
}

fn otlp_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, OtlpError> {
    let (settings, problems) = OtlpSettings::read(|name| std::env::var(name).ok());
    if !problems.is_empty() {
        return Err(OtlpError::Settings(problems.join("; ")));
    }
    let Some(endpoint) = settings.endpoint else { return Ok(None) };
    let exporter = match settings.protocol {
        OtlpProtocol::HttpProtobuf => {
            use opentelemetry_otlp::WithHttpConfig as _;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(http_client(&settings.tls)?)
                .build()?
        }
        OtlpProtocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig as _;
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            // Plain http:// stays plain; files set for it are checked but have nothing to do.
            if endpoint.starts_with("https://") {
                builder.with_tls_config(tonic_tls(&settings.tls)?).build()?
            } else {
                builder.build()?
            }
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(service);
    }
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build()))
}

/// Longest an export may take, as the specification's default `OTEL_EXPORTER_OTLP_TIMEOUT`.
const OTLP_HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The blocking HTTP client of the http/protobuf exporter, with `tls` on ring (reqwest's own
/// rustls set-up would bring aws-lc-rs). Built on a thread of its own: reqwest's blocking
/// client starts a runtime, which cannot be done from within the services' one.
fn http_client(tls: &ClientTls) -> Result<reqwest_otlp::blocking::Client, OtlpError> {
    let rustls = tls.rustls_config(&OTLP_TLS)?;
    std::thread::spawn(move || {
        reqwest_otlp::blocking::Client::builder().timeout(OTLP_HTTP_TIMEOUT).tls_backend_preconfigured(rustls).build()
    })
    .join()
    .map_err(|_| OtlpError::Client("building it panicked".to_owned()))?
    .map_err(|e| OtlpError::Client(e.to_string()))
}

/// The gRPC exporter's TLS: the CA file, else the system's roots; the client certificate.
fn tonic_tls(tls: &ClientTls) -> Result<tonic::transport::ClientTlsConfig, OtlpError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_file {
        Some(path) => config.ca_certificate(Certificate::from_pem(crate::tls::read(path, OTLP_TLS.ca)?)),
        None => config.with_native_roots(),
    };
    if let Some(client) = &tls.client {
        let cert = crate::tls::read(&client.cert, OTLP_TLS.cert)?;
        let key = crate::tls::read(&client.key, OTLP_TLS.key)?;
        config = config.identity(Identity::from_pem(cert, key));
    }
    Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_settings_default_and_name_what_is_wrong() {
        assert_eq!(LogSettings::read(None, None), (LogSettings::default(), vec![]));
        let (json, problems) = LogSettings::read(Some("warn,herald_gateway=debug"), Some("json"));
        assert_eq!((json.filter.as_str(), json.json, problems.len()), ("warn,herald_gateway=debug", true, 0));
        let (fallback, problems) = LogSettings::read(Some("herald=[oops"), Some("yaml"));
        assert_eq!(fallback, LogSettings::default(), "each invalid setting falls back to its default");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("HERALD_LOG: "), "{problems:?}");
        assert_eq!(problems[1], "HERALD_LOG_FORMAT: `yaml` is neither `text` nor `json`");
    }

    #[test]
    fn an_error_and_its_causes_fit_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("redis at redis://127.0.0.1:1")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection\nrefused"));
        assert_eq!(one_line(&error), "redis at redis://127.0.0.1:1: connection refused");
    }
}
