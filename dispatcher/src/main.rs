//! The dispatcher binary: configuration, telemetry, bind, run until SIGTERM.

use anyhow::Context;
use herald_shared::config::DispatcherConfig;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = herald_shared::telemetry::init("herald-dispatcher");
    let config = DispatcherConfig::load()?;
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let token = CancellationToken::new();
    herald_shared::shutdown::run_until_signal(token.clone(), herald_dispatcher::run(config, listener, token)).await?;
    Ok(())
}
