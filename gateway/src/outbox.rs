//! A connection's outbound queue: bounded, never blocking the sender, and costing nothing while
//! empty. A tokio mpsc channel allocates a 32-slot block up front, for every connection, idle
//! or not; at tens of thousands of idle connections per gateway that block is a fifth of the
//! memory budget. Here the buffer grows with use, and the owner gives it back from time to time
//! ([`Outbox::shrink_if_empty`], at each heartbeat): not after every drained burst, which under
//! a steady stream of bursts reallocated the buffer each time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The consumer fell behind by `capacity` items.
    Full,
    /// The consumer is gone.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Outbox<T> {
    queue: Mutex<VecDeque<T>>,
    ready: Notify,
    capacity: usize,
    closed: AtomicBool,
}

impl<T> Outbox<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), ready: Notify::new(), capacity, closed: AtomicBool::new(false) }
    }

    /// Items the queue holds at most (before [`Self::push_past_capacity`]).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn push(&self, item: T) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let was_empty = {
            let mut queue = self.lock();
            if queue.len() >= self.capacity {
                return Err(PushError::Full);
            }
            queue.push_back(item);
            queue.len() == 1
        };
        // The consumer waits only after finding the queue empty (under the lock), so only a
        // push into an empty queue needs to wake it; during a burst the pushes skip it.
        // `notify_one` stores a permit when the consumer is not waiting yet: no wake-up is lost.
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Pushes even past the capacity (not past a close): for the few markers whose number the
    /// caller bounds by other means.
    pub(crate) fn push_past_capacity(&self, item: T) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let was_empty = {
            let mut queue = self.lock();
            queue.push_back(item);
            queue.len() == 1
        };
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    pub(crate) fn try_pop(&self) -> Option<T> {
        self.lock().pop_front()
    }

    /// Frees the buffer, if the queue is empty now. Every connection's queue has held its
    /// first replay page's end, so without this every idle connection would keep a few slots.
    pub(crate) fn shrink_if_empty(&self) {
        let mut queue = self.lock();
        if queue.is_empty() && queue.capacity() > 0 {
            *queue = VecDeque::new();
        }
    }

    /// Waits for a push into the empty queue or a [`Self::wake`] since the last wait. The
    /// caller checks what it waits for before waiting: a wake-up given while nobody waited is
    /// kept for the next wait, so none is lost, and a spare one only costs a check.
    pub(crate) async fn changed(&self) {
        self.ready.notified().await;
    }

    /// Wakes the consumer for something other than an item (its connection was kicked): one
    /// `Notify` serves both, so a connection holds a single waiter.
    pub(crate) fn wake(&self) {
        self.ready.notify_one();
    }

    /// Refuses further pushes; the consumer calls it when it stops reading.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock().clear();
    }

    // Every critical section is a single VecDeque operation, so a poisoned lock (a panic
    // elsewhere while holding it) still guards a consistent queue.
    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a consumer does (the session's is [`crate::registry::Connection::next`]).
    async fn pop<T>(outbox: &Outbox<T>) -> T {
        loop {
            if let Some(item) = outbox.try_pop() {
                return item;
            }
            outbox.changed().await;
        }
    }

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let outbox = Outbox::new(2);
        assert_eq!(outbox.push(1), Ok(()));
        assert_eq!(outbox.push(2), Ok(()));
        assert_eq!(outbox.push(3), Err(PushError::Full));
        assert_eq!(outbox.push_past_capacity(30), Ok(()), "a marker goes in all the same");
        assert_eq!(pop(&outbox).await, 1);
        assert_eq!(outbox.try_pop(), Some(2));
        assert_eq!(outbox.try_pop(), Some(30));
        assert_eq!(outbox.try_pop(), None);
        outbox.close();
        assert_eq!(outbox.push(4), Err(PushError::Closed));
        assert_eq!(outbox.push_past_capacity(40), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_a_burst_is_given_back() {
        let outbox = std::sync::Arc::new(Outbox::new(1000));
        let consumer = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            async move { pop(&outbox).await }
        });
        tokio::task::yield_now().await;
        outbox.push(7).unwrap();
        assert_eq!(consumer.await.unwrap(), 7);
        for i in 0..500 {
            outbox.push(i).unwrap();
        }
        outbox.shrink_if_empty();
        assert!(outbox.lock().capacity() >= 500, "not shrunk while items wait");
        while outbox.try_pop().is_some() {}
        outbox.shrink_if_empty();
        assert_eq!(outbox.lock().capacity(), 0, "an empty queue holds no buffer");
    }

    /// Only a push into an empty queue wakes the consumer; one that drains a burst and waits
    /// again must still be woken by the next push.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_across_bursts() {
        let outbox = std::sync::Arc::new(Outbox::new(100_000));
        let consumer = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            async move {
                let mut sum = 0u64;
                for _ in 0..20_000 {
                    sum += pop(&outbox).await;
                }
                sum
            }
        });
        for burst in 0..200u64 {
            for i in 0..100 {
                outbox.push(burst * 100 + i).unwrap();
            }
            tokio::task::yield_now().await;
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), consumer).await;
        assert_eq!(got.expect("consumer stalled: a wake-up was lost").unwrap(), (0..20_000u64).sum::<u64>());
    }
}
