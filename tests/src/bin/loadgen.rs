//! Herald's load generator and benchmark runner. `loadgen run` starts the systems it measures,
//! runs the scenarios and prints and writes a summary; `loadgen worker` is one of its generator
//! processes (started by `run`, driven over stdin). See docs/BENCHMARKS.md.

#[path = "../loadgen/mod.rs"]
mod loadgen;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadgen::cost::{CostOptions, Load};
use loadgen::scenarios::{self, RunConfig, Scenario, System};
use loadgen::soak;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Herald's load generator and benchmark runner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs scenarios against the systems named, prints a table and writes it as JSON.
    Run {
        /// Scenarios to run, in order (repeatable).
        #[arg(long = "scenario", value_enum, required = true)]
        scenarios: Vec<Scenario>,
        /// Systems to measure (repeatable); a scenario runs on those it applies to.
        #[arg(long = "system", value_enum, default_value = "herald")]
        systems: Vec<System>,
        /// The short version of each scenario.
        #[arg(long)]
        short: bool,
        /// Idle connections per server process (two processes) in the idle scenario.
        #[arg(long, default_value_t = 18_000)]
        idle_per_server: usize,
        /// Rounds of the delivery-stage scenario, reported as their median.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Where to write the JSON summary.
        #[arg(long, default_value = "target/bench/summary.json")]
        out: PathBuf,
        /// Longest any one scenario may run before it is stopped, seconds (the soak gets at
        /// least its length plus 10 minutes).
        #[arg(long, default_value_t = 900)]
        scenario_limit_secs: u64,
        /// Length of the soak, minutes (`--short`: 2).
        #[arg(long, default_value_t = 20)]
        soak_minutes: u64,
        /// One-recipient jobs per second in the soak.
        #[arg(long, default_value_t = 100.0)]
        soak_rate: f64,
        #[command(flatten)]
        cost: CostArgs,
    },
    /// One generator process (started by `run`).
    Worker { spec: String },
}

/// The cost scenario's rates: each about the highest at which the store (nx-27017 here) keeps
/// up, so that what is measured is the work per message at the rate the store allows, not a
/// backlog. Herald's CPU per message falls as the rate rises (docs/BENCHMARKS.md §10).
#[derive(clap::Args)]
struct CostArgs {
    /// Jobs per second with one recipient each: at 1,200 nx-27017 ends a window a second behind.
    #[arg(long, default_value_t = 800.0)]
    cost_rate_1: f64,
    /// Jobs per second with 10 recipients each.
    #[arg(long, default_value_t = 100.0)]
    cost_rate_10: f64,
    /// Jobs per second with 1,000 recipients each.
    #[arg(long, default_value_t = 1.0)]
    cost_rate_1000: f64,
    /// Seconds of publishing at each rate (default 20; 6 with --short).
    #[arg(long)]
    cost_window_secs: Option<f64>,
    /// The generator sends the jobs due within this many milliseconds at once, then sleeps: 2
    /// sends a few at a time from ~500/s; 0 sends each at its own time (to the runtime's 1 ms
    /// timer), as many independent publishers would; 20 sends a linger's worth at once.
    #[arg(long, default_value_t = 2)]
    cost_burst_ms: u64,
}

impl CostArgs {
    fn options(&self) -> CostOptions {
        let load = |recipients, jobs_per_s| Load { recipients, jobs_per_s };
        CostOptions {
            loads: vec![load(1, self.cost_rate_1), load(10, self.cost_rate_10), load(1_000, self.cost_rate_1000)],
            window: self.cost_window_secs.map(Duration::from_secs_f64),
            burst: Duration::from_millis(self.cost_burst_ms),
        }
    }
}

fn main() -> anyhow::Result<()> {
    // Workers hold thousands of sockets, and the servers it starts inherit the limit.
    herald_shared::fdlimit::raise_to_hard();
    match Cli::parse().command {
        Command::Worker { spec } => loadgen::worker::main(serde_json::from_str(&spec)?),
        Command::Run {
            scenarios,
            systems,
            short,
            idle_per_server,
            repeats,
            out,
            scenario_limit_secs,
            soak_minutes,
            soak_rate,
            cost,
        } => {
            let logs = out.parent().map(PathBuf::from).unwrap_or_default().join("logs");
            let config = RunConfig {
                short,
                logs,
                idle_per_server,
                repeats: repeats.max(1),
                soak_minutes,
                soak_rate,
                cost: cost.options(),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let ok = runtime.block_on(async {
                let run = run(scenarios, systems, config, out, Duration::from_secs(scenario_limit_secs));
                // On a signal the run is dropped, and with it every process it started.
                tokio::select! {
                    ok = run => ok,
                    () = stop_signal() => {
                        eprintln!("loadgen: stopped by a signal; servers and workers stopped");
                        Ok(false)
                    }
                }
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn run(
    scenario_list: Vec<Scenario>,
    systems: Vec<System>,
    config: RunConfig,
    out: PathBuf,
    limit: Duration,
) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&config.logs)?;
    let mut outcomes = Vec::new();
    for scenario in scenario_list {
        for &system in &systems {
            let applies = system == System::Herald
                || matches!(scenario, Scenario::Idle | Scenario::Gateway)
                || (system == System::Limit && scenario == Scenario::Cost);
            if !applies {
                continue;
            }
            eprintln!("loadgen: {scenario:?} on {system:?}");
            let limit = if scenario == Scenario::Soak { limit.max(soak::run_limit(&config)) } else { limit };
            let outcome = scenarios::run(scenario, system, &config, limit).await;
            eprintln!("{}", scenarios::table(std::slice::from_ref(&outcome)));
            outcomes.push(outcome);
        }
    }
    loadgen::ratios::add_idle_ratios(&mut outcomes);
    loadgen::ratios::add_cost_ratios(&mut outcomes);
    let table = scenarios::table(&outcomes);
    println!("{table}");
    let summary = json!({
        "machine": machine(),
        "short": config.short,
        "results": scenarios::as_json(&outcomes),
    });
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    std::fs::write(out.with_extension("txt"), &table)?;
    eprintln!("loadgen: wrote {} and {}", out.display(), out.with_extension("txt").display());
    Ok(outcomes.iter().all(|o| o.ok))
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo").lines().find(|l| l.starts_with("model name")).map(|l| l.to_owned());
    let mem = read("/proc/meminfo").lines().next().map(|l| l.to_owned());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory": mem,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "load_average": read("/proc/loadavg").trim(),
    })
}
