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

/// What a critical task answers to: the token whose cancellation means "stop now, as planned",
/// and the process's own shutdown token, cancelled when the task fails.
#[derive(Debug, Clone)]
pub struct Critical {
    /// Cancelled when the task is expected to end (it may be a child of `process`).
    pub stopping: CancellationToken,
    /// The whole process's shutdown: what `run` and the HTTP server wait on.
    pub process: CancellationToken,
    /// Set when any critical task failed: `run` then returns an error, and `main` exits non-zero.
    pub failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Runs a task that must live as long as the process. If it ends before `critical.stopping` is
/// cancelled (a panic included), that is a failure: it is logged, recorded in `failed`, and the
/// whole process shuts down and exits non-zero (an orchestrator restarts it), because a gateway
/// without its delivery subscription or a dispatcher without its consumer would look healthy
/// while doing nothing. (Cancelling only `stopping`, a child token, left the HTTP server and
/// `/readyz` up over a dead pipeline.)
pub fn spawn_critical<F>(tracker: &tokio_util::task::TaskTracker, name: &'static str, critical: Critical, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    tracker.spawn(async move {
        // A panic counts as an early end, not as a silent death of the task.
        if let Err(panic) = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(task)).await {
            let what = panic.downcast_ref::<&str>().copied().or(panic.downcast_ref::<String>().map(String::as_str));
            tracing::error!(task = name, panic = what.unwrap_or("?"), "critical task panicked");
        }
        if !critical.stopping.is_cancelled() {
            tracing::error!(task = name, "critical task ended unexpectedly; shutting down");
            critical.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            critical.process.cancel();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_critical_task_that_panics_takes_the_process_down_and_a_planned_stop_does_not() {
        let process = CancellationToken::new();
        let stopping = process.child_token();
        let critical = Critical { stopping: stopping.clone(), process: process.clone(), failed: Arc::default() };
        let tracker = tokio_util::task::TaskTracker::new();
        spawn_critical(&tracker, "planned", critical.clone(), {
            let stopping = stopping.clone();
            async move { stopping.cancelled().await }
        });
        spawn_critical(&tracker, "doomed", critical.clone(), async { panic!("injected") });
        tokio::time::timeout(std::time::Duration::from_secs(5), process.cancelled()).await.unwrap();
        assert!(critical.failed.load(Ordering::SeqCst));
        // The parent's cancellation reaches the child: the planned task ends without a failure.
        tracker.close();
        tracker.wait().await;

        let process = CancellationToken::new();
        let stopping = process.child_token();
        let calm =
            Critical { stopping: stopping.clone(), process: process.clone(), failed: Arc::new(AtomicBool::new(false)) };
        let tracker = tokio_util::task::TaskTracker::new();
        spawn_critical(&tracker, "planned", calm.clone(), {
            let stopping = stopping.clone();
            async move { stopping.cancelled().await }
        });
        stopping.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(!process.is_cancelled() && !calm.failed.load(Ordering::SeqCst));
    }
}
