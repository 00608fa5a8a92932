//! The gateway binary: configuration, telemetry, bind, run until SIGTERM. Whatever stops it
//! from running is logged as one line, and the exit status is 1.

use herald_shared::config::GatewayConfig;
use tokio_util::sync::CancellationToken;

// jemalloc, not glibc's malloc: with an arena per thread, glibc's fragmentation held 10.9 KiB
// of RSS per idle connection where jemalloc holds 6.2 (docs/BENCHMARKS.md, scenario 1).
#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
// Benchmark builds only: counts allocations for /metrics (herald_allocations_total), on the
// system allocator (stats_alloc can wrap only that one on stable Rust).
#[cfg(feature = "alloc-count")]
herald_shared::count_allocations!();

#[tokio::main]
async fn main() {
    let telemetry = herald_shared::telemetry::init("herald-gateway");
    if let Err(e) = run().await {
        herald_shared::telemetry::exit_on_error(telemetry, e.as_ref());
    }
}

async fn run() -> anyhow::Result<()> {
    let config = GatewayConfig::load()?;
    // What a connect allocates and frees goes back to the kernel within 250 ms rather than
    // staying in RSS while its connection idles (herald_shared::heap).
    #[cfg(not(feature = "alloc-count"))]
    if let Err(e) = herald_shared::heap::purge_in_background() {
        tracing::warn!(error = %e, "jemalloc's background threads did not start; freed pages are returned later");
    }
    let listeners = herald_shared::serve::Listeners::bind(
        config.listen,
        config.internal_listen,
        config.common.http.listen_backlog,
    )?;
    let token = CancellationToken::new();
    herald_shared::shutdown::run_until_signal(token.clone(), herald_gateway::run(config, listeners, token)).await?;
    Ok(())
}
