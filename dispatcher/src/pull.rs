//! Pulling from the dispatchers' durable JetStream consumers, on demand: a group's first message
//! by a long poll, made only while a handler is free; then, after the group's [`linger`], what
//! queued meanwhile by one request that brings only what is there. While a group lingers no
//! request is open, so its messages wait at the server and come in one read, not one read and
//! one wake-up each (with a request left open, each message came on its own as it was
//! published, about a third of the dispatcher's CPU per job at 600/s: docs/BENCHMARKS.md §10).
//! What no handler is free for stays in the stream, where another dispatcher may take it.
//! Requests are made one at a time, each read to its end, so a dispatcher that stops has
//! nothing fetched and unprocessed. Shared by the job and event pipelines.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::fetch::{FetchError, Puller};

/// How long a wait for a group's first message lasts; also the longest a stopping dispatcher
/// keeps pulling.
const FIRST_WAIT: Duration = Duration::from_millis(500);

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
    /// Most bytes of messages one group holds: with `max`, what a batch can hold in memory
    /// (jobs and events may each be up to NATS's `max_payload`). Raised to twice the server's
    /// `max_payload` when that is larger (see [`fetch_bytes`]).
    pub max_bytes: usize,
}

/// The byte budget of one group from a server that accepts messages of up to `max_payload`:
/// JetStream never delivers a message bigger than a request's byte budget, and such a message
/// would block the consumer.
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

/// Pulls messages in groups until `stop` fires and hands each to `handle` with how long its
/// messages waited ([`Waits`]): up to `batching.max` messages and `batching.max_bytes`, with
/// up to `batching.concurrency` groups in hand at once (see the module's doc, and [`plan`] for
/// when a group lingers). Errors (NATS away, consumer gone) are logged and retried with
/// backoff; the loop ends only when `stop` fires, after every group pulled has been handled.
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
    // One permit a group in hand: the puller takes one before it pulls a group.
    let slots = Semaphore::new(batching.concurrency.max(1));
    // A group is sent only with its permit, so this never holds more than the handlers.
    let (tx, mut rx) = mpsc::channel(1);
    let source = Source { js, stream, name, ack_wait };
    let pulling = pull_groups(tx, &source, &batching, &slots, stop);
    let handling = async {
        let mut in_hand = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(()) = in_hand.next(), if !in_hand.is_empty() => {}
                group = rx.recv() => match group {
                    Some(Group { messages, waits, slot }) => {
                        let handled = handle(messages, waits);
                        in_hand.push(async move {
                            handled.await;
                            drop(slot);
                        });
                    }
                    None => break,
                },
            }
        }
        while in_hand.next().await.is_some() {}
    };
    tokio::join!(pulling, handling);
}

/// A consumer to pull from.
struct Source<'a> {
    js: &'a jetstream::Context,
    stream: &'a str,
    name: &'a str,
    ack_wait: Duration,
}

/// A group pulled, on its way to a handler with the permit it was pulled under.
struct Group<'s> {
    messages: Vec<Message>,
    waits: Waits,
    slot: SemaphorePermit<'s>,
}

/// What to do once a group's first message is in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// How long to let more queue at the server before asking for them.
    pub linger: Duration,
    /// Whether to ask for what queued (else the group is the first message alone).
    pub pull_rest: bool,
}

/// The plan for a group whose first message said `waiting` more were in the stream behind it
/// (its `num_pending`), with `groups_in_hand` others being handled and `prompt` a token of
/// [`Prompt`] taken for it. A full group already waiting is pulled at once. Otherwise the group
/// lingers as [`linger`] says, and asks for the rest if it lingered or knows some are there.
pub fn plan(batching: &Batching, groups_in_hand: usize, prompt: bool, waiting: u64) -> Plan {
    let room = batching.max.saturating_sub(1) as u64;
    if room == 0 {
        return Plan { linger: Duration::ZERO, pull_rest: false };
    }
    if waiting >= room {
        return Plan { linger: Duration::ZERO, pull_rest: true };
    }
    let linger = linger(batching.linger, groups_in_hand, prompt);
    Plan { linger, pull_rest: !linger.is_zero() || waiting > 0 }
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

/// How long the messages of one group were held in this dispatcher before their handler, from
/// when each came until the group was handed over: observations, one per message, for the
/// stage metrics (not paired with the messages). The first message's is the group's linger;
/// the others waited out most of theirs at the server, where no clock of this process sees it.
#[derive(Debug, Default)]
pub struct Waits {
    each: Vec<Duration>,
}

impl Waits {
    /// The waits of messages that came at `came`, in a group handed over at `closed`.
    fn of(came: &[tokio::time::Instant], closed: tokio::time::Instant) -> Self {
        Self { each: came.iter().map(|&came| closed.saturating_duration_since(came)).collect() }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Duration> {
        self.each.iter()
    }
}

/// Pulls groups into `tx` until `stop` fires, each under a permit of `slots`. Dropping `tx` at
/// the end lets the handler finish.
async fn pull_groups<'s>(
    tx: mpsc::Sender<Group<'s>>,
    source: &Source<'_>,
    batching: &Batching,
    slots: &'s Semaphore,
    stop: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut ready: Option<(Consumer, Puller)> = None;
    // JetStream not serving this consumer, logged once per outage.
    let outage = herald_shared::outage::Outage::new("nats: pulling");
    let mut prompt = Prompt::new(batching.linger, tokio::time::Instant::now());
    let stream = source.stream;
    while !stop.is_cancelled() {
        let slot = tokio::select! {
            slot = slots.acquire() => slot,
            _ = stop.cancelled() => return,
        };
        let Ok(slot) = slot else { return };
        let (consumer, mut puller) = match ready.take() {
            Some(ready) => ready,
            None => match connect(source).await {
                Ok(ready) => ready,
                Err(e) => {
                    outage.failed(&format_args!("{stream}: {e}"));
                    sleep_or_stop(&mut backoff, stop).await;
                    continue;
                }
            },
        };
        // The wait for the first message is read to its end even when `stop` fires meanwhile
        // (at most FIRST_WAIT and the fetch module's graces): what was pulled gets handled.
        let first = match first_message(&mut puller, &consumer).await {
            Ok(first) => first,
            Err(e) => {
                outage.failed(&format_args!("{stream}: {e}"));
                sleep_or_stop(&mut backoff, stop).await;
                continue;
            }
        };
        outage.answered();
        backoff = Duration::from_millis(100);
        let Some(first) = first else {
            ready = Some((consumer, puller));
            continue;
        };
        // What the stream holds behind it, as the server counted when it sent it.
        let waiting = first.info().map_or(0, |info| info.pending);
        let mut gathering = Gathering::new(first, tokio::time::Instant::now());
        // Groups being handled besides the one this permit is for.
        let in_hand = batching.concurrency.max(1).saturating_sub(slots.available_permits() + 1);
        // A token is taken only when it decides something: with a group in hand this one lingers.
        let prompt = in_hand == 0 && prompt.take(tokio::time::Instant::now());
        let plan = plan(batching, in_hand, prompt, waiting);
        if !plan.linger.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(plan.linger) => {}
                _ = stop.cancelled() => {}
            }
        }
        let mut broken = false;
        let bytes_left = batching.max_bytes.saturating_sub(gathering.bytes);
        if plan.pull_rest && bytes_left > 0 && !stop.is_cancelled() {
            let room = batching.max.saturating_sub(1);
            if let Err(e) = take_rest(&mut puller, &consumer, &mut gathering, room, bytes_left).await {
                // What came before the error is handled with the group.
                outage.failed(&format_args!("{stream}: {e}"));
                broken = true;
            }
        }
        let (messages, waits) = gathering.close();
        if tx.send(Group { messages, waits, slot }).await.is_err() {
            return;
        }
        if broken {
            sleep_or_stop(&mut backoff, stop).await;
        } else {
            ready = Some((consumer, puller));
        }
    }
}

/// Why a consumer could not be made ready to pull from.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("inbox: {0}")]
    Inbox(#[from] FetchError),
}

/// The consumer, looked up (or created), and a puller for it.
async fn connect(source: &Source<'_>) -> Result<(Consumer, Puller), ConnectError> {
    let consumer = consumer(source.js, source.stream, source.name, source.ack_wait).await?;
    let puller = Puller::new(source.js).await?;
    Ok((consumer, puller))
}

/// A group's first message: a long poll of [`FIRST_WAIT`] for one. None if none came.
async fn first_message(puller: &mut Puller, consumer: &Consumer) -> Result<Option<Message>, FetchError> {
    // No byte limit: one message is at most the server's `max_payload`, and with a limit the
    // server closes a request whose count is used up with a status, one more read.
    let mut pull = puller.pull(consumer, 1, 0, Some(FIRST_WAIT)).await?;
    let mut first = None;
    while let Some(message) = pull.next().await {
        let message = message?;
        first = Some(message);
    }
    Ok(first)
}

/// What queued behind a group's first message, into `gathering`: one request that brings only
/// what is there now, up to `room` messages and `bytes_left`.
async fn take_rest(
    puller: &mut Puller,
    consumer: &Consumer,
    gathering: &mut Gathering,
    room: usize,
    bytes_left: usize,
) -> Result<(), FetchError> {
    let mut rest = puller.pull(consumer, room, bytes_left, None).await?;
    while let Some(message) = rest.next().await {
        gathering.push(message?);
    }
    Ok(())
}

/// The messages of the group being pulled, with when each came.
struct Gathering {
    messages: Vec<Message>,
    came: Vec<tokio::time::Instant>,
    bytes: usize,
}

impl Gathering {
    fn new(first: Message, came: tokio::time::Instant) -> Self {
        let bytes = first.payload.len();
        Self { messages: vec![first], came: vec![came], bytes }
    }

    fn push(&mut self, message: Message) {
        self.bytes += message.payload.len();
        self.messages.push(message);
        self.came.push(tokio::time::Instant::now());
    }

    /// The group, handed over now, and how long each of its messages was held for it.
    fn close(self) -> (Vec<Message>, Waits) {
        let waits = Waits::of(&self.came, tokio::time::Instant::now());
        (self.messages, waits)
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

    fn batching(max: usize) -> Batching {
        Batching { max, linger: Duration::from_millis(20), concurrency: 2, max_bytes: 1 << 20 }
    }

    #[test]
    fn an_idle_store_hands_the_first_message_over_at_once_with_what_is_known_to_wait() {
        let go = Duration::ZERO;
        // Nothing behind it: no second request.
        assert_eq!(plan(&batching(256), 0, true, 0), Plan { linger: go, pull_rest: false });
        // Some queued behind it: taken at once, as an idle store wants.
        assert_eq!(plan(&batching(256), 0, true, 7), Plan { linger: go, pull_rest: true });
    }

    #[test]
    fn a_busy_store_or_a_spent_prompt_budget_lets_the_group_gather_at_the_server() {
        let linger = Duration::from_millis(20);
        assert_eq!(plan(&batching(256), 1, false, 0), Plan { linger, pull_rest: true });
        assert_eq!(plan(&batching(256), 1, false, 100), Plan { linger, pull_rest: true });
        assert_eq!(plan(&batching(256), 0, false, 0), Plan { linger, pull_rest: true }, "prompt budget spent");
    }

    #[test]
    fn a_full_group_already_waiting_is_pulled_without_lingering() {
        let go = Plan { linger: Duration::ZERO, pull_rest: true };
        assert_eq!(plan(&batching(256), 1, false, 255), go);
        assert_eq!(plan(&batching(256), 2, false, 90_000), go);
        // A group of one is its first message.
        assert_eq!(plan(&batching(1), 1, false, 90_000), Plan { linger: Duration::ZERO, pull_rest: false });
    }

    #[test]
    fn a_fetch_always_has_room_for_the_largest_message() {
        assert_eq!(fetch_bytes(8 << 20, 1 << 20), 8 << 20);
        assert_eq!(fetch_bytes(8 << 20, 8 << 20), 16 << 20);
    }

    #[test]
    fn a_message_is_held_from_when_it_came_until_its_group_is_handed_over() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // The first came at 0, the rest at 21 after the linger; handed over at 22.
        let waits = Waits::of(&[ms(0), ms(21), ms(21)], ms(22));
        let each: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(each, [22, 1, 1]);
    }
}
