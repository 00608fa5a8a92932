//! A tiny OpenTelemetry collector per test, so a test can assert on the spans Herald exports.
//!
//! Owns the `tests/otlp/receiver.py` process (OTLP over HTTP/protobuf, as `opentelemetry-otlp`
//! sends it; https with a test CA's certificate from [`OtlpReceiver::start_https`]): its start,
//! the spans it recorded, and its removal on drop. The gRPC receiver is `otlp_grpc`'s. Configuring Herald to
//! export there (`OTEL_EXPORTER_OTLP_ENDPOINT` = [`OtlpReceiver::endpoint`]) is left to the test.
//!
//! Needs `.venv` from `scripts/deps.sh` (which installs `opentelemetry-proto`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::eventually;

/// How long the receiver may take to listen: importing protobuf takes a moment on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// What the receiver prints once it accepts connections, followed by its port.
const READY_LINE: &str = "listening on ";

/// One span as the receiver recorded it. Ids are lowercase hex; a root span's `parent_span_id`
/// is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// The `service.name` resource attribute of the exporting process ("" if unset).
    pub service: String,
    /// OTLP `SpanKind`: see [`kind`].
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Every attribute value as a string: `true`/`false`, decimal numbers, hex bytes, JSON for
    /// arrays and maps.
    pub attributes: BTreeMap<String, String>,
    pub links: Vec<Link>,
}

/// A link from a span to another span (e.g. a consumer's span to its producer's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub trace_id: String,
    pub span_id: String,
}

/// Values of [`Span::kind`] (OTLP's `Span.SpanKind`).
pub mod kind {
    pub const UNSPECIFIED: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const SERVER: i32 = 2;
    pub const CLIENT: i32 = 3;
    pub const PRODUCER: i32 = 4;
    pub const CONSUMER: i32 = 5;
}

impl Span {
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running `tests/otlp/receiver.py` on a free port of 127.0.0.1.
///
/// Killed on drop. Its directory (log and `spans.jsonl`) is removed then, unless the test failed:
/// then it is kept and its path printed, with the log's last lines.
pub struct OtlpReceiver {
    port: u16,
    /// Killed and reaped on drop.
    child: Option<Child>,
    /// `None` once kept on a failing test's drop.
    dir: Option<TempDir>,
    /// The receiver's stdout and stderr.
    log: PathBuf,
    spans_file: PathBuf,
}

impl OtlpReceiver {
    /// Starts the receiver and waits until it listens. It picks its own port, so no other process
    /// can take the port between the choice and the bind.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// The receiver serving https with `server` (a certificate from a [`crate::test_ca::TestCa`]),
    /// and, with `client_ca`, requiring a client certificate that CA signed. The endpoint is then
    /// [`Self::https_endpoint`].
    pub async fn start_https(server: &crate::test_ca::CertFiles, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let mut args = vec![
            "--tls-cert".to_owned(),
            server.cert.display().to_string(),
            "--tls-key".to_owned(),
            server.key.display().to_string(),
        ];
        if let Some(ca) = client_ca {
            args.extend(["--tls-client-ca".to_owned(), ca.display().to_string()]);
        }
        Self::start_with(&args).await
    }

    async fn start_with(extra: &[String]) -> anyhow::Result<Self> {
        let python = venv_python()?;
        let script = repo_root().join("tests/otlp/receiver.py");
        let dir = tempfile::Builder::new().prefix("herald-otlp-").tempdir()?;
        let log = dir.path().join("receiver.log");
        let spans_file = dir.path().join("spans.jsonl");
        let log_file = File::create(&log)?;
        let child = Command::new(&python)
            .arg(&script)
            .args(["--port", "0", "--out"])
            .arg(&spans_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Python buffers its output when it is not a terminal.
            .env("PYTHONUNBUFFERED", "1")
            .spawn()
            .with_context(|| format!("spawn {} {}", python.display(), script.display()))?;
        let mut receiver = Self { port: 0, child: Some(child), dir: Some(dir), log, spans_file };
        receiver.port = receiver.wait_listening().await?;
        Ok(receiver)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<u16> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let port = text.lines().find_map(|line| line.strip_prefix(READY_LINE)?.trim().parse::<u16>().ok());
            if let Some(port) = port {
                return Ok(port);
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                anyhow::bail!("otlp receiver exited with {status} before listening; its output:\n{text}");
            }
            if Instant::now() >= deadline {
                anyhow::bail!("otlp receiver not listening within {READY_TIMEOUT:?}; its output:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:<port>`: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `https://localhost:<port>`, for a receiver from [`Self::start_https`] (the test CA's
    /// server certificates name `localhost`).
    pub fn https_endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every span received so far, in the order received.
    ///
    /// # Panics
    /// If the receiver's output cannot be read or holds a line that is not a [`Span`]: a bug in
    /// the receiver, not in what was exported to it.
    pub fn spans(&self) -> Vec<Span> {
        let text = match std::fs::read_to_string(&self.spans_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("read {}: {e}", self.spans_file.display()),
        };
        // A last line without its newline is still being written: it is read next time.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("bad span line {line:?}: {e}")))
            .collect()
    }

    /// Polls [`Self::spans`] until `done` holds for them, and returns them; fails after `timeout`
    /// with the number of spans seen and the last one's name.
    ///
    /// Exporters batch: a span may arrive seconds after it ended unless the exporting process
    /// flushes (on shutdown) or uses a short batch delay.
    pub async fn wait_for<F>(&self, timeout: Duration, done: F) -> anyhow::Result<Vec<Span>>
    where
        F: Fn(&[Span]) -> bool,
    {
        wait_for_spans(timeout, || self.spans(), done).await
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!(
                    "--- otlp receiver on port {}: spans and log in {} (kept), last log lines:\n{}",
                    self.port,
                    path.display(),
                    tail.join("\n")
                );
            }
        }
    }
}

/// The repository's `.venv/bin/python` (made by `scripts/deps.sh`), which has
/// `opentelemetry-proto`.
pub fn venv_python() -> anyhow::Result<PathBuf> {
    let python = repo_root().join(".venv/bin/python");
    anyhow::ensure!(python.is_file(), "{} not found: run scripts/deps.sh", python.display());
    Ok(python)
}

/// The workspace root: the parent of this crate, as `services` finds `.venv`.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf()
}

/// Polls `spans` until `done` holds for them, and returns them; fails after `timeout` with the
/// number of spans seen and the last one's name. For either receiver (HTTP here, gRPC in
/// [`crate::otlp_grpc`]).
pub(crate) async fn wait_for_spans<S, F>(timeout: Duration, spans: S, done: F) -> anyhow::Result<Vec<Span>>
where
    S: Fn() -> Vec<Span>,
    F: Fn(&[Span]) -> bool,
{
    eventually(timeout, Duration::from_millis(50), || async {
        let spans = spans();
        if done(&spans) {
            Ok(spans)
        } else {
            Err(format!(
                "condition not met by {} spans (last: {:?})",
                spans.len(),
                spans.last().map(|s| format!("{}/{}", s.service, s.name))
            ))
        }
    })
    .await
}
