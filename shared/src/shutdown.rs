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

/// Runs a task that must live as long as the process. If it ends before `shutdown` is
/// cancelled, that is a failure: it is logged, counted in `failed`, and the whole process is
/// asked to shut down (an orchestrator restarts it), because a gateway without its delivery
/// subscription or a dispatcher without its consumer would look healthy while doing nothing.
pub fn spawn_critical<F>(
    tracker: &tokio_util::task::TaskTracker,
    name: &'static str,
    shutdown: CancellationToken,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    tracker.spawn(async move {
        // A panic counts as an early end, not as a silent death of the task.
        if let Err(panic) = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(task)).await {
            let what = panic.downcast_ref::<&str>().copied().or(panic.downcast_ref::<String>().map(String::as_str));
            tracing::error!(task = name, panic = what.unwrap_or("?"), "critical task panicked");
        }
        if !shutdown.is_cancelled() {
            tracing::error!(task = name, "critical task ended unexpectedly; shutting down");
            failed.store(true, std::sync::atomic::Ordering::SeqCst);
            shutdown.cancel();
        }
    });
}
