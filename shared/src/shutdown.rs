//! Turning SIGTERM / Ctrl-C into a cancellation that the services' `run` functions obey.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Drives `service` to completion, cancelling `token` when a signal arrives so the service can
/// shut down in order. The service, not this function, decides how long that takes.
pub async fn run_until_signal<F: Future>(token: CancellationToken, service: F) -> F::Output {
    tokio::pin!(service);
    tokio::select! {
        output = &mut service => return output,
        _ = signal() => tracing::info!("shutdown signal received"),
    }
    token.cancel();
    service.await
}
