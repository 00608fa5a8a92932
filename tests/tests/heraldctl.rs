//! `heraldctl` end to end: the real binary (`target/debug/heraldctl`, built by
//! `cargo build --workspace --bins`) against a real stack. It validates before publishing, never
//! creates a stream, follows receipts, and drives each operator endpoint, in text and in JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use herald_tests::bin_path;
use herald_tests::cluster::{Cluster, InProcess, ADMIN_TOKEN, JWT_SECRET, READ_TOKEN};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);

/// heraldctl with the stack's NATS, prefix, the dispatcher's API (public and internal) and the
/// admin token.
fn ctl(cluster: &Cluster, dispatcher: &InProcess) -> Command {
    let (api, admin) = (dispatcher.addr, dispatcher.internal);
    let mut command = Command::new(bin_path("heraldctl").unwrap());
    command
        .env_clear()
        .env("HERALD_NATS_URL", cluster.stack.nats.url())
        .env("HERALD_PREFIX", cluster.stack.names().prefix())
        .env("HERALD_API_URL", format!("http://{api}"))
        .env("HERALD_ADMIN_URL", format!("http://{admin}"))
        .env("HERALD_API_TOKEN", ADMIN_TOKEN)
        .env("HERALD_MAX_TTL_SECS", "86400")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(mut command: Command, args: &[&str]) -> Run {
    let out = tokio::time::timeout(WAIT, command.args(args).output()).await.expect("heraldctl finishes").unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The next notification that is not a repeat of one in `seen` (delivery is at least once).
async fn next_new(client: &mut herald_tests::client::TestClient, seen: &mut Vec<String>) -> herald_proto::Notification {
    loop {
        let n = client.next_notification(WAIT).await.expect("a notification");
        if !seen.contains(&n.id.to_string()) {
            seen.push(n.id.to_string());
            return n;
        }
    }
}

fn json_line(text: &str) -> Value {
    serde_json::from_str(text.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_validates_first_never_creates_streams_and_follows_receipts() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let d = dispatcher.addr;
    let before = cluster.jobs_last_seq().await.unwrap();

    // Bad jobs fail with the rejection code, and nothing reaches the stream.
    for (args, code) in [
        (vec!["publish", "--to", "alice", "{}", "--ttl", "0"], "invalid_ttl"),
        (vec!["publish", "--to", "alice", "{}", "--id", "bad id!"], "invalid_id"),
        (vec!["publish", "--to", "alice", "{}", "--ttl", "86401"], "invalid_ttl"),
    ] {
        let out = run(ctl(&cluster, &dispatcher), &args).await;
        assert!(!out.ok, "{args:?}: {}", out.stdout);
        assert!(out.stderr.contains(code) && out.stderr.contains("nothing was published"), "{args:?}: {}", out.stderr);
    }
    let out = run(ctl(&cluster, &dispatcher), &["publish", "--to", "alice", "{not json"]).await;
    assert!(!out.ok && out.stderr.contains("not valid JSON"), "{}", out.stderr);
    assert_eq!(cluster.jobs_last_seq().await.unwrap(), before);

    // A prefix with no streams is an error, and no stream appears.
    let out = run(ctl(&cluster, &dispatcher), &["--prefix", "nope", "publish", "--to", "alice", "{}"]).await;
    assert!(!out.ok && out.stderr.contains("NOPE_JOBS does not exist"), "{}", out.stderr);
    assert!(cluster.js.get_stream("NOPE_JOBS").await.is_err(), "heraldctl created a stream");

    // The payload from stdin, then --wait follows the receipts until alice acks.
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(d, "alice", true).await.unwrap();
    let mut seen = Vec::new();
    let mut child = ctl(&cluster, &dispatcher)
        .args(["publish", "--to", "alice", "-", "--id", "ctl-1", "--wait", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(br#"{"title": "from stdin"}"#).await.unwrap();
    drop(stdin);
    let n = next_new(&mut alice, &mut seen).await;
    assert_eq!((n.id.as_str(), n.payload.get()), ("ctl-1", r#"{"title": "from stdin"}"#));
    alice.ack(["ctl-1"]).await.unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(&format!("id=ctl-1 stream={} seq=", cluster.stack.names().jobs_stream())), "{stdout}");
    assert!(stdout.contains("duplicate=false") && stdout.contains("alice: delivered"), "{stdout}");

    // From a file, in JSON; the same id again is a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(&file, "{\"title\": \"from a file\"}\n").unwrap();
    let path = file.to_str().unwrap();
    let out =
        run(ctl(&cluster, &dispatcher), &["--json", "publish", "--to", "alice", "--file", path, "--id", "ctl-2"]).await;
    assert!(out.ok, "{}", out.stderr);
    let first = json_line(&out.stdout);
    assert_eq!((first["id"].as_str(), first["duplicate"].as_bool()), (Some("ctl-2"), Some(false)), "{first}");
    assert_eq!(next_new(&mut alice, &mut seen).await.payload.get(), r#"{"title": "from a file"}"#);
    let out =
        run(ctl(&cluster, &dispatcher), &["--json", "publish", "--to", "alice", "--file", path, "--id", "ctl-2"]).await;
    assert_eq!(json_line(&out.stdout)["duplicate"], true, "{}", out.stdout);
    assert_eq!(json_line(&out.stdout)["seq"], first["seq"]);

    // Without --id: the id it prints is the one the client gets.
    let out = run(ctl(&cluster, &dispatcher), &["--json", "publish", "--to", "alice", "--payload", "7"]).await;
    let answer = json_line(&out.stdout);
    let n = next_new(&mut alice, &mut seen).await;
    assert_eq!((n.id.as_str(), n.seq), (answer["id"].as_str().unwrap(), answer["seq"].as_u64().unwrap()));

    // --wait that times out says who is still pending.
    let out =
        run(ctl(&cluster, &dispatcher), &["publish", "--to", "nobody-online", "1", "--id", "ctl-3", "--wait", "1"])
            .await;
    assert!(!out.ok && out.stderr.contains("still pending") && out.stderr.contains("nobody-online"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_answer_in_text_and_json_and_fail_clearly() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let d = dispatcher.addr;
    let _carol = cluster.connect(gateway.addr, "carol").await.unwrap();
    cluster.wait_presence(d, "carol", true).await.unwrap();
    cluster.send("op-1", &["dave", "erin"]).await.unwrap();
    cluster.send("op-2", &["dave"]).await.unwrap();
    cluster.wait_receipt("op-1", "erin", "pending").await.unwrap();
    cluster.wait_receipt("op-2", "dave", "pending").await.unwrap();

    let out = run(ctl(&cluster, &dispatcher), &["message", "op-1"]).await;
    assert!(
        out.ok && out.stdout.starts_with("message op-1 seq=") && out.stdout.contains("receipts: pending 2"),
        "{}",
        out.stdout
    );
    let out = run(ctl(&cluster, &dispatcher), &["--json", "message", "op-1"]).await;
    assert_eq!(json_line(&out.stdout)["message"]["recipients"], 2);
    let out = run(ctl(&cluster, &dispatcher), &["pending", "dave"]).await;
    assert!(out.ok && out.stdout.starts_with("dave: 2 pending") && out.stdout.contains("op-2"), "{}", out.stdout);
    let out = run(ctl(&cluster, &dispatcher), &["presence", "carol"]).await;
    assert!(out.ok && out.stdout.starts_with("carol: online, 1 connections"), "{}", out.stdout);
    let out = run(ctl(&cluster, &dispatcher), &["presence", "dave"]).await;
    assert_eq!(out.stdout, "dave: offline\n");
    let out = run(ctl(&cluster, &dispatcher), &["status"]).await;
    assert!(out.ok && out.stdout.contains(&gateway.id) && out.stdout.contains("mongodb ok"), "{}", out.stdout);
    let out = run(ctl(&cluster, &dispatcher), &["--json", "status"]).await;
    assert_eq!(json_line(&out.stdout)["gateways"], json!([gateway.id]));

    // Cancel, forget, kick: each changes what the API then says.
    let out = run(ctl(&cluster, &dispatcher), &["cancel", "op-2"]).await;
    assert!(out.ok && out.stdout.contains("cancelled op-2: 1 pending receipts cancelled"), "{}", out.stdout);
    assert_eq!(cluster.receipts("op-2").await.unwrap()["dave"].state.as_str(), "cancelled");
    let out = run(ctl(&cluster, &dispatcher), &["--json", "forget", "erin"]).await;
    assert_eq!(json_line(&out.stdout), json!({"user": "erin", "receipts_deleted": 1, "messages_deleted": 0}));
    assert!(!cluster.receipts("op-1").await.unwrap().contains_key("erin"));
    let out = run(ctl(&cluster, &dispatcher), &["kick", "carol"]).await;
    assert!(out.ok && out.stdout.contains("kicked carol: 1 connections"), "{}", out.stdout);
    cluster.wait_presence(d, "carol", false).await.unwrap();

    // Errors name the API's answer and exit non-zero.
    let out = run(ctl(&cluster, &dispatcher), &["message", "no-such"]).await;
    assert!(!out.ok && out.stderr.contains("404 not_found"), "{}", out.stderr);
    let out = run(ctl(&cluster, &dispatcher), &["kick", "carol"]).await;
    assert!(!out.ok && out.stderr.contains("404 not_found"), "{}", out.stderr);
    let out = run(ctl(&cluster, &dispatcher), &["--token", "wrong-token-0123456789", "status"]).await;
    assert!(!out.ok && out.stderr.contains("401 unauthorized"), "{}", out.stderr);
    let out = run(ctl(&cluster, &dispatcher), &["--token", READ_TOKEN, "cancel", "op-1"]).await;
    assert!(!out.ok && out.stderr.contains("403 forbidden"), "{}", out.stderr);
    let mut no_token = ctl(&cluster, &dispatcher);
    no_token.env_remove("HERALD_API_TOKEN");
    let out = run(no_token, &["status"]).await;
    assert!(!out.ok && out.stderr.contains("no API token"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_and_dead_letters_since_a_time_or_followed() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();

    // A follower started first sees a rejection as it happens.
    let mut follower = ctl(&cluster, &dispatcher)
        .args(["--json", "rejections", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    // The follower's consumer exists once it is connected; publish until it has seen one.
    let seen = tokio::time::timeout(WAIT, async {
        let mut n = 0;
        loop {
            n += 1;
            cluster
                .publish(&json!({"id": format!("bad-{n}"), "to": ["x"], "payload": 1, "ttl_secs": 0}))
                .await
                .unwrap();
            if let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
                return line;
            }
        }
    })
    .await
    .expect("the follower prints a rejection");
    let seen: Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(seen["code"], "invalid_ttl", "{seen}");
    assert!(seen["job_id"].as_str().unwrap().starts_with("bad-"));
    follower.kill().await.unwrap();

    // Since an hour ago, in text: every one of them, oldest first.
    let out = run(ctl(&cluster, &dispatcher), &["rejections", "--since", "1h"]).await;
    assert!(out.ok, "{}", out.stderr);
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains("id=bad-1 code=invalid_ttl") && first.contains("ttl_secs must be at least 1"),
        "{}",
        out.stdout
    );
    // A limit says so; a time after them shows none.
    let out = run(ctl(&cluster, &dispatcher), &["rejections", "--since", "1h", "--limit", "1"]).await;
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    let future =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 60_000).to_string();
    let out = run(ctl(&cluster, &dispatcher), &["rejections", "--since", &future]).await;
    assert!(out.ok && out.stdout.is_empty() && out.stderr.contains("none"), "{} {}", out.stdout, out.stderr);
    let out = run(ctl(&cluster, &dispatcher), &["dead-letters"]).await;
    assert!(out.ok && out.stdout.is_empty(), "{}", out.stdout);
    let out = run(ctl(&cluster, &dispatcher), &["rejections", "--since", "5x"]).await;
    assert!(!out.ok && out.stderr.contains("--since"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_minted_for_the_gateway() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut command = Command::new(bin_path("heraldctl").unwrap());
    command.env_clear().env("HERALD_JWT_SECRET", JWT_SECRET);
    let out = run(command, &["token", "--user", "zoe"]).await;
    assert!(out.ok, "{}", out.stderr);
    let client =
        herald_tests::client::TestClient::connect(&herald_tests::cluster::ws_url(gateway.addr), out.stdout.trim())
            .await;
    assert!(client.is_ok(), "the gateway takes heraldctl's token");
}
