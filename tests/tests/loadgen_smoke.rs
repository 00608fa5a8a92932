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
