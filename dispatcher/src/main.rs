//! The dispatcher binary: configuration, telemetry, bind, run until SIGTERM. Whatever stops it
//! from running is logged as one line, and the exit status is 1.

use herald_shared::config::DispatcherConfig;
use tokio_util::sync::CancellationToken;

// jemalloc, as the gateway (see there): fewer bytes held per byte used, and allocation is the
// dispatcher's most frequent call.
#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
// Benchmark builds only: counts allocations for /metrics (herald_allocations_total), on the
// system allocator (stats_alloc can wrap only that one on stable Rust).
#[cfg(feature = "alloc-count")]
herald_shared::count_allocations!();

fn main() {
    // The configuration is read first: it says how many threads the runtime gets. What is wrong
    // with it is reported once telemetry is up, as every other reason not to run.
    let config = DispatcherConfig::load();
    let threads = config.as_ref().map_or(1, |c| c.worker_threads);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        let telemetry = herald_shared::telemetry::init("herald-dispatcher");
        if let Err(e) = run(config).await {
            herald_shared::telemetry::exit_on_error(telemetry, e.as_ref());
        }
    });
}

async fn run(config: Result<DispatcherConfig, herald_shared::config::ConfigError>) -> anyhow::Result<()> {
    let config = config?;
    let listeners = herald_shared::serve::Listeners::bind(
        config.listen,
        config.internal_listen,
        config.common.http.listen_backlog,
    )?;
    let token = CancellationToken::new();
    herald_shared::shutdown::run_until_signal(token.clone(), herald_dispatcher::run(config, listeners, token)).await?;
    Ok(())
}
