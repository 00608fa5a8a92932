//! Pulling from the dispatchers' durable JetStream consumers: one bounded fetch at a time, each
//! finished before the next, so a dispatcher that stops has nothing fetched and unprocessed
//! (no job waits out the ack wait because its dispatcher shut down). Shared by the job and
//! event pipelines.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long one fetch waits for messages; also the longest a stopping dispatcher keeps pulling.
const FETCH_EXPIRES: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[error("jetstream consumer {consumer} on {stream}: {reason}")]
pub struct ConsumerError {
    stream: String,
    consumer: String,
    reason: String,
}

pub type Consumer = jetstream::consumer::Consumer<pull::Config>;

/// How pulled messages are grouped for their handler.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most messages handed over at once.
    pub max: usize,
    /// How long a group waits for more messages after its first arrived, while another group
    /// is in hand (see [`linger`]). Under load this is what turns a store round trip per
    /// message into one per batch; it is added to each message's latency, so it is kept to
    /// milliseconds.
    pub linger: Duration,
    /// Groups handled at once. More than one lets the next group gather while one is being
    /// stored, without splitting the stream into smaller groups.
    pub concurrency: usize,
    /// Most bytes of messages one fetch brings: with `max`, what a batch can hold in memory
    /// (jobs and events may each be up to NATS's `max_payload`). Raised to twice the server's
    /// `max_payload` when that is larger, because JetStream never delivers a message bigger
    /// than a fetch's byte budget, and such a message would block the consumer.
    pub max_bytes: usize,
}

/// The byte budget of one fetch from a server that accepts messages of up to `max_payload`.
pub fn fetch_bytes(budget: usize, max_payload: usize) -> usize {
    budget.max(max_payload.saturating_mul(2))
}

/// A durable consumer all dispatchers share; created if missing (an existing consumer keeps
/// the settings it was created with).
pub async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
) -> Result<Consumer, ConsumerError> {
    let err = |reason: String| ConsumerError { stream: stream.to_owned(), consumer: name.to_owned(), reason };
    let handle = js.get_stream(stream).await.map_err(|e| err(e.to_string()))?;
    handle
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                // Unbounded redelivery: a store outage must never turn into loss. Poison jobs
                // are bounded by the job pipeline's own attempt count instead.
                max_deliver: -1,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err(e.to_string()))
}

/// Messages in `stream` that no dispatcher has pulled yet from the shared consumer `name` (its
/// lag). None when JetStream does not say.
pub async fn num_pending(js: &jetstream::Context, stream: &str, name: &str, ack_wait: Duration) -> Option<u64> {
    let mut consumer = consumer(js, stream, name, ack_wait).await.ok()?;
    consumer.info().await.ok().map(|info| info.num_pending)
}

/// Fetches messages until `stop` fires, handing them to `handle` in groups (see [`next_group`]:
/// what is queued, and while the store is busy what arrives within `batching.linger`), up to
/// `batching.max`, with up to `batching.concurrency` groups in hand at once, each with how long
/// its messages waited ([`Waits`]). Errors (NATS away, consumer gone) are logged and retried with backoff; the loop
/// ends only when `stop` fires, after everything fetched has been handled.
///
/// Fetching and handling run side by side, joined by a queue with room for one whole fetch: a
/// fetch is read to its end however long `handle` takes. (async-nats ends a fetch that is not
/// read for a few seconds past its expiry and drops what it still buffered; those jobs would
/// wait out the ack wait, 30 s, after every slow batch or store outage.) A new fetch is made only
/// once the queue is empty again, so at most one fetch is held beyond the group in hand.
pub async fn run<F, Fut>(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
    batching: Batching,
    stop: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Message>, Waits) -> Fut,
    Fut: Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel(batching.max);
    let inbox = Inbox { rx, gathering: Vec::new() };
    let fetching = fetch_into(tx, js, stream, name, ack_wait, (batching.max, batching.max_bytes), stop);
    // Groups being handled, read by the gatherer to decide whether to linger.
    let busy = AtomicUsize::new(0);
    let handling = async {
        // A stream, so that a group half gathered survives the select below polling something
        // else (an unfold keeps its pending future).
        let busy = &busy;
        let prompt = Prompt::new(batching.linger, tokio::time::Instant::now());
        let groups = futures::stream::unfold((inbox, prompt), |(mut inbox, mut prompt)| async move {
            let group = next_group(&mut inbox, &batching, busy, &mut prompt, |m: &Message| m.payload.len()).await?;
            let waits = inbox.close_group();
            Some(((group, waits), (inbox, prompt)))
        });
        let mut groups = std::pin::pin!(groups);
        let mut in_hand = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(()) = in_hand.next(), if !in_hand.is_empty() => {}
                group = groups.next(), if in_hand.len() < batching.concurrency.max(1) => match group {
                    Some((group, waits)) => in_hand.push(handle(group, waits)),
                    None => break,
                },
            }
            busy.store(in_hand.len(), Ordering::Relaxed);
        }
        while in_hand.next().await.is_some() {}
    };
    tokio::join!(fetching, handling);
}

/// How long a group waits for more after its first message. While another group is in hand,
/// the store is busy anyway: waiting gathers a bigger batch (fewer round trips per message).
/// With nothing in hand, the store is idle and a linger would only add its whole length to
/// the latency of a low, steady rate (at 100/s, 20 ms for about two messages per batch); the
/// group then takes only what is already queued, if [`Prompt`] allows one more such group.
pub fn linger(configured: Duration, groups_in_hand: usize, prompt: bool) -> Duration {
    if groups_in_hand == 0 && prompt {
        Duration::ZERO
    } else {
        configured
    }
}

/// The groups that may go without a linger: a token bucket refilled at two per linger (100 a
/// second for a 20 ms linger), holding two. Prompt groups cost a store round trip each; this
/// bounds what they add to the store's load whatever the rate, and past that rate every group
/// lingers, as all did before.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// One token's worth of time: half a linger.
    interval: Duration,
    /// When the bucket would next be empty had every token been taken at its earliest (the
    /// generic cell rate algorithm: whole durations, no rounding).
    full_at: tokio::time::Instant,
}

impl Prompt {
    const BURST: u32 = 2;

    pub fn new(linger: Duration, now: tokio::time::Instant) -> Self {
        Self { interval: linger / 2, full_at: now }
    }

    /// Whether a group may go now without lingering; takes a token if so.
    pub fn take(&mut self, now: tokio::time::Instant) -> bool {
        let from = self.full_at.max(now);
        if from - now + self.interval <= self.interval * Self::BURST {
            self.full_at = from + self.interval;
            true
        } else {
            false
        }
    }
}

/// The next group of messages: the first, what is already queued behind it, and what arrives
/// within its [`linger`], up to `max` messages or `max_bytes` (by `len`; the message that
/// crosses it included). None once the fetcher is gone.
async fn next_group<T>(
    rx: &mut Inbox<T>,
    batching: &Batching,
    busy: &AtomicUsize,
    prompt: &mut Prompt,
    len: impl Fn(&T) -> usize,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut bytes = len(&first);
    let mut group = vec![first];
    let full = |group: &Vec<T>, bytes: usize| group.len() >= batching.max || bytes >= batching.max_bytes;
    while !full(&group, bytes) {
        let Some(message) = rx.try_recv() else { break };
        bytes += len(&message);
        group.push(message);
    }
    let in_hand = busy.load(Ordering::Relaxed);
    // A token is taken only when it decides something: with a group in hand this one lingers.
    let prompt = in_hand == 0 && prompt.take(tokio::time::Instant::now());
    let linger = linger(batching.linger, in_hand, prompt);
    // No timer for no linger: tokio rounds a deadline up to its next millisecond, so even a
    // zero sleep would hold the group up to 1 ms and wake the runtime once more to end it.
    if linger.is_zero() {
        return Some(group);
    }
    let linger = tokio::time::sleep(linger);
    tokio::pin!(linger);
    while !full(&group, bytes) {
        tokio::select! {
            _ = &mut linger => break,
            next = rx.recv() => match next {
                Some(message) => {
                    bytes += len(&message);
                    group.push(message);
                }
                None => break,
            },
        }
    }
    Some(group)
}

/// A fetched message in the queue to the handler, with when it was queued.
type Queued<T = Message> = (T, Instant);

/// The handler's end of the queue. It notes when each message of the group being gathered was
/// queued and taken, so that a group's [`Waits`] come from one monotonic clock in this process.
struct Inbox<T = Message> {
    rx: mpsc::Receiver<Queued<T>>,
    /// (queued, taken) of each message taken since the last group was handed over.
    gathering: Vec<(Instant, Instant)>,
}

impl<T> Inbox<T> {
    async fn recv(&mut self) -> Option<T> {
        let (message, queued) = self.rx.recv().await?;
        self.gathering.push((queued, Instant::now()));
        Some(message)
    }

    /// The next message if one is queued now.
    fn try_recv(&mut self) -> Option<T> {
        let (message, queued) = self.rx.try_recv().ok()?;
        self.gathering.push((queued, Instant::now()));
        Some(message)
    }

    /// The waits of the group gathered since the last call; it is handed over now (a group is
    /// only gathered while a handler slot is free).
    fn close_group(&mut self) -> Waits {
        let waits = Waits::of(&self.gathering, Instant::now());
        self.gathering.clear();
        waits
    }
}

/// How long the messages of one group waited before their handler: observations, one per
/// message, for the stage metrics (not paired with the messages).
#[derive(Debug, Default)]
pub struct Waits {
    each: Vec<Waited>,
}

/// How long one message waited before its handler.
#[derive(Debug, Clone, Copy)]
pub struct Waited {
    /// In the queue, while every handler slot was busy (`Batching::concurrency`).
    pub for_handler: Duration,
    /// In its group, from being taken until the group was handed over (`Batching::linger`).
    pub in_linger: Duration,
}

impl Waits {
    /// The waits of messages (queued, taken) in a group handed over at `closed`.
    fn of(gathered: &[(Instant, Instant)], closed: Instant) -> Self {
        let waited = |&(queued, taken): &(Instant, Instant)| Waited {
            for_handler: taken.saturating_duration_since(queued),
            in_linger: closed.saturating_duration_since(taken),
        };
        Self { each: gathered.iter().map(waited).collect() }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Waited> {
        self.each.iter()
    }
}

/// Fetches up to `max` messages at a time into `tx` until `stop` fires; each fetch waits for
/// room for all of it first. Dropping `tx` at the end lets the handler finish.
async fn fetch_into(
    tx: mpsc::Sender<Queued>,
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
    (max, max_bytes): (usize, usize),
    stop: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut cached: Option<Consumer> = None;
    // JetStream not serving this consumer, logged once per outage.
    let outage = herald_shared::outage::Outage::new("nats: pulling");
    while !stop.is_cancelled() {
        let room = tokio::select! {
            room = tx.reserve_many(max) => room,
            _ = stop.cancelled() => return,
        };
        let Ok(mut room) = room else { return };
        let consumer = match cached.take() {
            Some(consumer) => consumer,
            None => match self::consumer(js, stream, name, ack_wait).await {
                Ok(consumer) => consumer,
                Err(e) => {
                    outage.failed(&format_args!("consumer: {e}"));
                    sleep_or_stop(&mut backoff, stop).await;
                    continue;
                }
            },
        };
        let mut pull = match crate::fetch::Pull::start(js, &consumer, max, max_bytes, FETCH_EXPIRES).await {
            Ok(pull) => pull,
            Err(e) => {
                outage.failed(&format_args!("{stream}: {e}"));
                sleep_or_stop(&mut backoff, stop).await;
                continue;
            }
        };
        // The pull is read to its end even when `stop` fires meanwhile (at most FETCH_EXPIRES
        // and the fetch module's graces): what was pulled gets handled, not left to the ack wait.
        let mut broken = false;
        while let Some(message) = pull.next().await {
            match (message, room.next()) {
                (Ok(message), Some(slot)) => slot.send((message, Instant::now())),
                // More than asked for (the server never does this): hand it straight back.
                (Ok(message), None) => {
                    let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
                }
                (Err(e), _) => {
                    if pull.got() == 0 {
                        outage.failed(&format_args!("{stream}: {e}"));
                    }
                    broken = true;
                }
            }
        }
        if broken {
            sleep_or_stop(&mut backoff, stop).await;
        } else {
            outage.answered();
            backoff = Duration::from_millis(100);
            cached = Some(consumer);
        }
    }
}

/// Sleeps for `backoff` (then doubles it, up to 1 s: a retry is one cheap attempt, and work
/// resumes within a second of the dependency's return). Returns false if `stop` fired.
pub(crate) async fn sleep_or_stop(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    let pause = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
    tokio::select! {
        _ = tokio::time::sleep(pause) => true,
        _ = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_lingers_only_while_another_is_in_hand() {
        let configured = Duration::from_millis(20);
        assert_eq!(linger(configured, 0, true), Duration::ZERO);
        assert_eq!(linger(configured, 0, false), configured);
        assert_eq!(linger(configured, 1, true), configured);
        assert_eq!(linger(configured, 2, true), configured);
    }

    #[test]
    fn prompt_groups_are_two_per_linger_with_a_burst_of_two() {
        let start = tokio::time::Instant::now();
        let mut prompt = Prompt::new(Duration::from_millis(20), start);
        assert!(prompt.take(start));
        assert!(prompt.take(start));
        assert!(!prompt.take(start), "the burst is spent");
        assert!(!prompt.take(start + Duration::from_millis(9)));
        assert!(prompt.take(start + Duration::from_millis(10)), "one more every 10 ms");
        assert!(!prompt.take(start + Duration::from_millis(11)));
        // A long pause refills the burst, not more.
        let later = start + Duration::from_secs(60);
        assert!(prompt.take(later) && prompt.take(later) && !prompt.take(later));
        let mut unlimited = Prompt::new(Duration::ZERO, start);
        assert!((0..1_000).all(|_| unlimited.take(start)));
    }

    fn inbox() -> (mpsc::Sender<Queued<Vec<u8>>>, Inbox<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(8);
        (tx, Inbox { rx, gathering: Vec::new() })
    }

    fn prompt() -> Prompt {
        Prompt::new(Duration::from_millis(20), tokio::time::Instant::now())
    }

    fn batching(max: usize, max_bytes: usize) -> Batching {
        Batching { max, linger: Duration::from_millis(20), concurrency: 2, max_bytes }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_store_takes_what_is_queued_without_waiting() {
        let (tx, mut rx) = inbox();
        for n in [1u8, 2, 3] {
            tx.send((vec![n], Instant::now())).await.unwrap();
        }
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            late.send((vec![4], Instant::now())).await.unwrap();
        });
        // Off the millisecond grid, where tokio's timers round a deadline up to the next tick.
        tokio::time::advance(Duration::from_micros(300)).await;
        let started = tokio::time::Instant::now();
        let group =
            next_group(&mut rx, &batching(10, 1 << 20), &AtomicUsize::new(0), &mut prompt(), Vec::len).await.unwrap();
        assert_eq!(group, vec![vec![1], vec![2], vec![3]]);
        assert_eq!(started.elapsed(), Duration::ZERO, "a prompt group waits for no timer");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_store_past_the_prompt_budget_gets_lingering_groups() {
        let (tx, mut rx) = inbox();
        let idle = AtomicUsize::new(0);
        let mut spent = prompt();
        let now = tokio::time::Instant::now();
        assert!(spent.take(now) && spent.take(now));
        tx.send((vec![1], Instant::now())).await.unwrap();
        let started = tokio::time::Instant::now();
        let group = next_group(&mut rx, &batching(10, 1 << 20), &idle, &mut spent, Vec::len).await.unwrap();
        assert_eq!(group, vec![vec![1]]);
        assert_eq!(started.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_store_lets_the_next_group_gather_for_the_linger() {
        let (tx, mut rx) = inbox();
        tx.send((vec![1], Instant::now())).await.unwrap();
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            late.send((vec![2], Instant::now())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            late.send((vec![3], Instant::now())).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        let group =
            next_group(&mut rx, &batching(10, 1 << 20), &AtomicUsize::new(1), &mut prompt(), Vec::len).await.unwrap();
        assert_eq!(group, vec![vec![1], vec![2]]);
        assert_eq!(started.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_stops_at_its_count_or_bytes() {
        let (tx, mut rx) = inbox();
        for n in 0..5u8 {
            tx.send((vec![n; 4], Instant::now())).await.unwrap();
        }
        let busy = AtomicUsize::new(1);
        assert_eq!(next_group(&mut rx, &batching(2, 1 << 20), &busy, &mut prompt(), Vec::len).await.unwrap().len(), 2);
        // 4 + 4 bytes crosses 6: the message that crosses it is included.
        assert_eq!(next_group(&mut rx, &batching(10, 6), &busy, &mut prompt(), Vec::len).await.unwrap().len(), 2);
        drop(tx);
        assert_eq!(next_group(&mut rx, &batching(10, 1 << 20), &busy, &mut prompt(), Vec::len).await.unwrap().len(), 1);
        assert!(next_group(&mut rx, &batching(10, 1 << 20), &busy, &mut prompt(), Vec::len).await.is_none());
    }

    #[test]
    fn a_fetch_always_has_room_for_the_largest_message() {
        assert_eq!(fetch_bytes(8 << 20, 1 << 20), 8 << 20);
        assert_eq!(fetch_bytes(8 << 20, 8 << 20), 16 << 20);
    }

    #[test]
    fn a_message_waits_for_a_handler_until_taken_then_in_the_linger_until_handed_over() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // Queued at 0, taken at 5 (first of its group); queued at 8 and taken at once; handed over at 25.
        let waits = Waits::of(&[(ms(0), ms(5)), (ms(8), ms(8))], ms(25));
        let each: Vec<(u128, u128)> =
            waits.iter().map(|w| (w.for_handler.as_millis(), w.in_linger.as_millis())).collect();
        assert_eq!(each, [(5, 20), (0, 17)]);
    }
}
