//! Waiting for a condition in a distributed system without guessing a sleep.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Calls `check` every `poll` until it returns `Ok`, and returns that value; after `timeout`,
/// fails with the last error seen.
///
/// One attempt that hangs cannot hold the test past the deadline: it is cut off there.
/// Use it instead of a bare `sleep` whenever a test waits for something to happen elsewhere.
///
/// ```ignore
/// let receipt = eventually(Duration::from_secs(5), Duration::from_millis(50), || async {
///     find_receipt(&db, &id).await?.ok_or("no receipt yet")
/// })
/// .await?;
/// ```
pub async fn eventually<T, E, F, Fut>(timeout: Duration, poll: Duration, mut check: F) -> anyhow::Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    let mut last_error = String::new();
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            // `{:#}` shows an anyhow error's whole chain; plain strings are unaffected.
            Ok(Err(e)) => last_error = format!("{e:#}"),
            // Keep the previous attempt's error: it says more than the cut-off does.
            Err(_) if attempts > 1 => {}
            Err(_) => last_error = "the first attempt was still running at the deadline".to_owned(),
        }
        let now = Instant::now();
        if now >= deadline {
            anyhow::bail!("not within {timeout:?} ({attempts} attempts): {last_error}");
        }
        tokio::time::sleep_until((now + poll).min(deadline)).await;
    }
}
