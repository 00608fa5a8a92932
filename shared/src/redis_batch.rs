//! Redis commands sent together: one write to the socket for a batch of them.
//!
//! Not a fred `Pipeline`. fred 10 flushes the socket after each command of a pipeline: it
//! flushes whenever no other command is queued behind the one it writes, and a whole pipeline is
//! one entry of its queue. A batch of 20 commands was 20 `writev` calls, each also doing Redis's
//! share of loopback TCP (docs/BENCHMARKS.md §10). Commands issued concurrently are queued behind
//! each other, and fred writes them with one flush at the last (on a Redis Cluster, that flush
//! covers every node's connection).
//!
//! Order: each fred command is queued on its future's first poll (no await comes before it for
//! a command that does not block), and `join_all` polls them first in the order given, so they
//! reach Redis in that order, as a pipeline's did. One write holds when fred's connection task
//! does not run until the last is queued, which one runtime thread guarantees; on more threads
//! it may start earlier and write the batch in a few pieces.

use futures::future::BoxFuture;

/// Sends `commands` (built with `FutureExt::boxed` from the client's command methods) together,
/// in order, and waits for all their replies, each its own result.
pub async fn together<T>(
    commands: impl IntoIterator<Item = BoxFuture<'_, Result<T, fred::error::Error>>>,
) -> Vec<Result<T, fred::error::Error>> {
    futures::future::join_all(commands).await
}

/// [`together`], failing with the first command's error if any failed (as `Pipeline::all`).
pub async fn all<T>(
    commands: impl IntoIterator<Item = BoxFuture<'_, Result<T, fred::error::Error>>>,
) -> Result<Vec<T>, fred::error::Error> {
    together(commands).await.into_iter().collect()
}
