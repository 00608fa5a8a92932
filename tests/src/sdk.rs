//! The JS SDK (`clients/js`) as a test subject: runs its end-to-end app (clients/js/test/e2e) in
//! Node or in headless Chromium as a child process, collects what the app reports (one JSON
//! object a line on its stdout) and sends it commands (on its stdin).
//!
//! Owns the child process (killed on drop) and the task that reads its output (ends with it).
//! What to start the app against, and what to assert, is the tests' business.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// Where the app runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Node with the `ws` package: token in a header, pings visible.
    Node,
    /// Debian's chromium, headless, through playwright-core: token in the query string.
    Chromium,
}

impl Runtime {
    fn script(self) -> &'static str {
        match self {
            Runtime::Node => "test/e2e/node.js",
            Runtime::Chromium => "test/e2e/browser.js",
        }
    }
}

/// `clients/js`, from this crate.
pub fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("clients").join("js")
}

/// Fails with the command that fixes it when the SDK is not built or its packages not installed.
pub fn check_sdk_built() -> anyhow::Result<()> {
    let dir = sdk_dir();
    anyhow::ensure!(
        dir.join("dist/index.js").is_file(),
        "{}/dist is missing: build the SDK first (make sdk, or npm --prefix clients/js run build)",
        dir.display()
    );
    anyhow::ensure!(
        dir.join("node_modules/ws").is_dir() && dir.join("node_modules/playwright-core").is_dir(),
        "the SDK's packages are not installed: run make deps (npm ci in clients/js)"
    );
    Ok(())
}

/// A running app, and everything it has reported so far.
pub struct SdkApp {
    pub runtime: Runtime,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<Mutex<Vec<Value>>>,
}

impl SdkApp {
    /// Starts the app with `config` (see clients/js/test/e2e/app.js) and waits until it has
    /// started its client.
    pub async fn start(runtime: Runtime, config: &Value) -> anyhow::Result<Self> {
        check_sdk_built()?;
        let mut command = Command::new("node");
        command
            .arg(runtime.script())
            .current_dir(sdk_dir())
            .env("HERALD_SDK_CONFIG", config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().context("spawning node (is Node.js 20+ installed?)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        // Ends at the child's end of output.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let value =
                    serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "ev": "text", "text": line }));
                sink.lock().unwrap().push(value);
            }
        });
        let app = Self { runtime, child, stdin, events };
        // A browser takes a few seconds to start on a busy machine.
        app.wait_for("the app started", Duration::from_secs(30), |e| e["ev"] == "started").await?;
        Ok(app)
    }

    /// Everything reported so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Reports of one kind (`ev`), in order.
    pub fn of(&self, ev: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["ev"] == ev).collect()
    }

    /// State reports of one state (`connecting`, `open`, `closed`).
    pub fn states(&self, state: &str) -> Vec<Value> {
        self.of("state").into_iter().filter(|e| e["state"] == state).collect()
    }

    /// Ids of the notifications the application was given, in order.
    pub fn notification_ids(&self) -> Vec<String> {
        self.of("notification").iter().filter_map(|e| e["id"].as_str().map(str::to_owned)).collect()
    }

    /// Waits until some report satisfies `predicate`; returns it. Fails with `what` and the
    /// reports so far.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.wait_until(what, timeout, |events| events.iter().find(|e| predicate(e)).cloned()).await
    }

    /// Waits until `check` finds what it wants in the reports so far.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Value]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let result = crate::eventually(timeout, Duration::from_millis(25), || async {
            let events = self.events();
            check(&events).ok_or(what)
        })
        .await;
        result.with_context(|| format!("{:?} app; its reports: {}", self.runtime, self.transcript()))
    }

    /// Sends a command (`{"cmd": "read", "ids": [...]}`, `{"cmd": "close"}`).
    pub async fn command(&mut self, command: &Value) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the app's stdin is closed")?;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// `close()` on the SDK, then waits for the app to exit.
    pub async fn close(mut self) -> anyhow::Result<Vec<Value>> {
        self.command(&serde_json::json!({ "cmd": "close" })).await?;
        self.wait_for("close() to finish", Duration::from_secs(10), |e| e["ev"] == "done" && e["cmd"] == "close")
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await??;
        anyhow::ensure!(status.success(), "the app exited with {status}; reports: {}", self.transcript());
        Ok(self.events())
    }

    /// The reports so far, one a line, for failure messages.
    pub fn transcript(&self) -> String {
        let events = self.events();
        let mut out = String::new();
        for e in events.iter().rev().take(60).rev() {
            out.push_str("\n  ");
            out.push_str(&e.to_string());
        }
        out
    }
}

/// The demo's dev server (clients/js/demo/server.js) as a child process, killed on drop.
pub struct DemoServer {
    pub url: String,
    _child: Child,
}

impl DemoServer {
    /// Starts it on `listen` with `env` (see the top of server.js) and waits until it answers.
    pub async fn start(listen: std::net::SocketAddr, env: &[(&str, String)]) -> anyhow::Result<Self> {
        check_sdk_built()?;
        let child = Command::new("node")
            .arg("demo/server.js")
            .current_dir(sdk_dir())
            .env("HERALD_DEMO_LISTEN", listen.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning node demo/server.js")?;
        let url = format!("http://{listen}/");
        let config = format!("http://{listen}/dev/config");
        crate::eventually(Duration::from_secs(15), Duration::from_millis(50), || async {
            reqwest::get(&config).await.map_err(|e| e.to_string())?.error_for_status().map_err(|e| e.to_string())
        })
        .await?;
        Ok(Self { url, _child: child })
    }
}

/// Runs `node <script>` in clients/js with `env` to its end (at most `timeout`); returns what it
/// reported (one JSON object a line on stdout) and whether it exited 0.
pub async fn run_script(script: &str, env: &[(&str, String)], timeout: Duration) -> anyhow::Result<(bool, Vec<Value>)> {
    check_sdk_built()?;
    let child = Command::new("node")
        .arg(script)
        .current_dir(sdk_dir())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning node {script}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("node {script} did not finish within {timeout:?}"))??;
    let events = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| serde_json::json!({ "ev": "text", "text": line })))
        .collect();
    Ok((output.status.success(), events))
}
