//! Logging set-up: one call at the top of each binary.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. The filter comes from `HERALD_LOG` (default `info`); set
/// `HERALD_LOG_FORMAT=json` for one JSON object per line.
pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = fmt().with_env_filter(filter).with_target(true);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}
