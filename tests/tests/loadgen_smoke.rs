//! The load generator's smoke run: a few hundred connections over two gateway processes, direct
//! messages, a fan-out job and deliveries straight to the gateways, through the real path. It
//! checks correctness only (nothing lost, every receipt delivered), never timing: benchmark
//! figures come from `make bench`.
//!
//! The generator starts its dependencies through the harness (`herald_tests::services`) and
//! Herald's binaries from the same profile, so `cargo build --workspace --bins` must have run (as
//! `make test` does).

use std::process::Command;

use serde_json::Value;

#[test]
fn nothing_is_lost_under_a_small_load() -> anyhow::Result<()> {
    for binary in ["herald-gateway", "herald-dispatcher"] {
        herald_tests::bin_path(binary)?;
    }
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("smoke.json");
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--scenario", "smoke", "--scenario-limit-secs", "240", "--out"])
        .arg(&out)
        .output()?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let summary: Value = serde_json::from_slice(&std::fs::read(&out)?)
        .map_err(|e| anyhow::anyhow!("no summary ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"))?;
    let result = &summary["results"][0];
    let figures = &result["figures"];
    anyhow::ensure!(result["ok"] == true, "smoke run failed: {result:#}\nstderr:\n{stderr}");
    anyhow::ensure!(figures["lost"] == 0, "messages lost: {figures:#}");
    anyhow::ensure!(figures["connections"] == 300, "not every connection opened: {figures:#}");
    anyhow::ensure!(figures["receipts_delivered"] == figures["receipts_expected"], "receipts: {figures:#}");
    anyhow::ensure!(run.status.success(), "loadgen exited with {}\nstderr:\n{stderr}", run.status);
    Ok(())
}

/// The cost scenario's windows on the bare server: every user is found on a server by the
/// `?user=` it connected with, each frame sent through `POST /send` is queued and arrives exactly
/// once, and every client's ack is read before the window ends. (Which connection a frame
/// reaches is the server's map; the generator cannot tell one user from another.)
#[test]
fn the_bare_server_delivers_each_frame_it_is_sent_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("cost-limit.json");
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--scenario", "cost", "--system", "limit", "--short", "--scenario-limit-secs", "240"])
        .args(["--cost-rate-1", "200", "--cost-rate-10", "20", "--cost-rate-1000", "1", "--cost-window-secs", "1"])
        .arg("--out")
        .arg(&out)
        .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    let summary: Value = serde_json::from_slice(&std::fs::read(&out)?)
        .map_err(|e| anyhow::anyhow!("no summary ({e}); stderr:\n{stderr}"))?;
    let result = &summary["results"][0];
    anyhow::ensure!(result["ok"] == true, "the limit's cost run failed: {result:#}\nstderr:\n{stderr}");
    let steps = result["figures"]["steps"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(steps.len() == 3, "one step per load: {result:#}");
    for step in steps {
        anyhow::ensure!(step["received"] == step["deliveries"], "not every frame arrived once: {step:#}");
        anyhow::ensure!(step["duplicates"] == 0, "a frame arrived twice: {step:#}");
    }
    Ok(())
}
