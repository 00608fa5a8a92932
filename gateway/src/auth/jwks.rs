//! The identity provider's JWKS: the cached keys, and the one task that fetches them (at start,
//! periodically, and when a token names an unknown `kid`, at a bounded rate). A failed fetch
//! keeps the keys already held. Which key verifies a token is `keys.rs`'s business.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use reqwest::Url;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::VerifyKey;

/// A fetch that takes longer is abandoned (and counts as failed).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body read; a larger one is a failed fetch. Real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys in a JWKS; one with more is a failed fetch. Real ones hold two or three.
pub const MAX_JWKS_KEYS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("request: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {0}")]
    Status(reqwest::StatusCode),
    #[error("body larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("{0} keys, more than {MAX_JWKS_KEYS}")]
    TooManyKeys(usize),
    #[error("no usable signing key")]
    NoUsableKey,
}

/// The cached keys, shared by every connect request, and the gate on fetches they may ask for.
pub(crate) struct Jwks {
    /// Replaced whole by each successful fetch; readers clone the `Arc` and let go at once.
    keys: RwLock<Arc<[VerifyKey]>>,
    /// Whether a fetch has ever succeeded.
    loaded: AtomicBool,
    gate: Mutex<Gate>,
    min_refetch: Duration,
    /// Asks the refresher for a fetch. Capacity 1: only a request that won the gate sends, and
    /// the gate lets no other win until that fetch is over, so the channel is never full.
    requests: mpsc::Sender<()>,
    /// The number of the last fetch that ended (well or not); the refresher sends, waiting
    /// requests watch.
    finished: watch::Sender<u64>,
}

/// When fetches started, and whether one is under way.
#[derive(Debug, Default)]
struct Gate {
    last_started: Option<Instant>,
    in_flight: bool,
    /// Fetches started so far; the number of the latest.
    started: u64,
}

/// What a token with an unknown `kid` may do about the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refetch {
    /// Start a fetch and wait for it.
    Start,
    /// A fetch is under way: wait for it.
    Join,
    /// A fetch started less than the minimum interval ago: no fetch; the token is refused.
    Refuse,
}

/// The rate limit on fetches: a new one no sooner than `min_interval` after the last started,
/// whatever the number of tokens asking. So random `kid`s cost the identity provider at most one
/// request per interval.
pub(crate) fn refetch_decision(
    now: Instant,
    last_started: Option<Instant>,
    in_flight: bool,
    min_interval: Duration,
) -> Refetch {
    if in_flight {
        Refetch::Join
    } else if last_started.is_none_or(|last| now.saturating_duration_since(last) >= min_interval) {
        Refetch::Start
    } else {
        Refetch::Refuse
    }
}

/// When to fetch again after a success: the provider's `max-age` when it gives one, within
/// [`min_interval`, `refresh`].
pub(crate) fn next_refresh(max_age: Option<Duration>, refresh: Duration, min_interval: Duration) -> Duration {
    max_age.unwrap_or(refresh).min(refresh).max(min_interval)
}

/// `max-age` of a `Cache-Control` header (`no-store`/`no-cache` read as 0: fetch as often as
/// allowed).
pub(crate) fn max_age(cache_control: Option<&str>) -> Option<Duration> {
    let mut age = None;
    for directive in cache_control?.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            age = secs.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    age
}

impl Jwks {
    /// The cache, empty, and the task that fills it. The caller owns the task.
    pub(crate) fn new(
        url: Url,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<(Arc<Self>, Refresher), reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            // The configured URL is the JWKS: a redirect could lead anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (requests, requested) = mpsc::channel(1);
        let jwks = Arc::new(Self {
            keys: RwLock::new(Arc::from(Vec::new())),
            loaded: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            min_refetch,
            requests,
            finished: watch::Sender::new(0),
        });
        let refresher = Refresher { jwks: Arc::clone(&jwks), requested, client, url, refresh };
        Ok((jwks, refresher))
    }

    pub(crate) fn keys(&self) -> Arc<[VerifyKey]> {
        Arc::clone(&self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // The gate's fields are consistent after any panic; carry on with them.
        self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// For a token naming an unknown `kid`: fetch again if the rate limit allows (or join the
    /// fetch under way) and wait for it. True when a fetch ended meanwhile: look again.
    pub(crate) async fn refetch(&self) -> bool {
        let mut finished = self.finished.subscribe();
        let target = {
            let mut gate = self.gate();
            match refetch_decision(Instant::now(), gate.last_started, gate.in_flight, self.min_refetch) {
                Refetch::Refuse => return false,
                Refetch::Join => gate.started,
                Refetch::Start => {
                    if self.requests.try_send(()).is_err() {
                        // The refresher is gone (shutting down): nothing will fetch.
                        return false;
                    }
                    gate.begin(Instant::now())
                }
            }
        };
        let wait = FETCH_TIMEOUT + Duration::from_secs(1);
        let ended = matches!(tokio::time::timeout(wait, finished.wait_for(|&n| n >= target)).await, Ok(Ok(_)));
        ended
    }
}

impl Gate {
    fn begin(&mut self, now: Instant) -> u64 {
        self.in_flight = true;
        self.last_started = Some(now);
        self.started += 1;
        self.started
    }
}

/// The task that fetches the JWKS; see [`Refresher::run`].
pub struct Refresher {
    jwks: Arc<Jwks>,
    /// Fetches asked for by connect requests (see [`Jwks::requests`]).
    requested: mpsc::Receiver<()>,
    client: reqwest::Client,
    url: Url,
    refresh: Duration,
}

impl Refresher {
    /// Fetches at once, then every `refresh` (or the provider's `max-age`, within bounds) and when
    /// asked, until `stop`. A failed fetch keeps the keys and is tried again after a backoff that
    /// starts at the minimum interval and doubles up to `refresh`. Errors never end it. Each
    /// fetch is counted in `fetches` by result (`ok`, `error`).
    pub async fn run(mut self, stop: CancellationToken, fetches: prometheus::IntCounterVec) {
        let min = self.jwks.min_refetch;
        let mut next = Instant::now();
        let mut backoff = herald_shared::backoff::Backoff::new(min, self.refresh);
        // An identity provider that fails again and again is logged once, and once it is back.
        let outage = herald_shared::outage::Outage::new("identity provider (JWKS)");
        loop {
            let number = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                // Already counted by the request that won the gate.
                Some(()) = self.requested.recv() => Some(self.jwks.gate().started),
                _ = tokio::time::sleep_until(next) => {
                    let mut gate = self.jwks.gate();
                    // In flight: a requested fetch is queued, and the loop takes it next.
                    if gate.in_flight { None } else { Some(gate.begin(Instant::now())) }
                }
            };
            let Some(number) = number else { continue };
            let fetched = tokio::select! {
                _ = stop.cancelled() => return,
                fetched = fetch(&self.client, &self.url) => fetched,
            };
            fetches.with_label_values(&[if fetched.is_ok() { "ok" } else { "error" }]).inc();
            match fetched {
                Ok((keys, age)) => {
                    tracing::debug!(keys = keys.len(), url = %self.url, "JWKS fetched");
                    *self.jwks.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::from(keys);
                    self.jwks.loaded.store(true, Ordering::Release);
                    next = Instant::now() + next_refresh(age, self.refresh, min);
                    backoff.succeeded();
                    outage.answered();
                }
                Err(e) => {
                    let retry_in = backoff.failed();
                    outage.failed(&e);
                    tracing::debug!(url = %self.url, kept = self.jwks.keys().len(), ?retry_in, "JWKS fetch failed; keeping the keys held");
                    next = Instant::now() + retry_in;
                }
            }
            self.jwks.gate().in_flight = false;
            self.jwks.finished.send_replace(number);
        }
    }
}

/// One fetch: the usable signing keys and the response's `max-age`. Keys that cannot be used
/// (encryption keys, unknown types) are left out; a set with none left is a failure.
async fn fetch(client: &reqwest::Client, url: &Url) -> Result<(Vec<VerifyKey>, Option<Duration>), FetchError> {
    #[derive(serde::Deserialize)]
    struct Set {
        // Parsed one by one below: one odd key must not make the set unreadable.
        keys: Vec<serde_json::Value>,
    }
    let mut response = client.get(url.clone()).header(ACCEPT, "application/json").send().await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let age = max_age(response.headers().get(CACHE_CONTROL).and_then(|v| v.to_str().ok()));
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let set: Set = serde_json::from_slice(&body)?;
    if set.keys.len() > MAX_JWKS_KEYS {
        return Err(FetchError::TooManyKeys(set.keys.len()));
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for value in set.keys {
        let kid = value.get("kid").and_then(|k| k.as_str()).unwrap_or("").to_owned();
        match serde_json::from_value::<Jwk>(value).map_err(|_| "malformed").and_then(|jwk| VerifyKey::from_jwk(&jwk)) {
            Ok(key) => keys.push(key),
            Err(reason) => tracing::debug!(kid, reason, "JWKS key left out"),
        }
    }
    if keys.is_empty() {
        return Err(FetchError::NoUsableKey);
    }
    Ok((keys, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kids_cause_at_most_one_fetch_per_interval() {
        let t0 = Instant::now();
        let min = Duration::from_secs(10);
        assert_eq!(refetch_decision(t0, None, false, min), Refetch::Start, "never fetched");
        assert_eq!(refetch_decision(t0, Some(t0), true, min), Refetch::Join, "one under way");
        assert_eq!(refetch_decision(t0 + Duration::from_secs(3), Some(t0), false, min), Refetch::Refuse);
        assert_eq!(refetch_decision(t0 + min, Some(t0), false, min), Refetch::Start);

        // A flood: a thousand tokens over 25 s, each with a random kid, start three fetches.
        let mut gate = Gate::default();
        let mut starts = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(25 * i);
            if refetch_decision(now, gate.last_started, gate.in_flight, min) == Refetch::Start {
                gate.begin(now);
                gate.in_flight = false;
                starts += 1;
            }
        }
        assert_eq!(starts, 3);
    }

    #[test]
    fn refresh_follows_max_age_within_bounds() {
        let (refresh, min) = (Duration::from_secs(300), Duration::from_secs(10));
        assert_eq!(next_refresh(None, refresh, min), refresh);
        assert_eq!(next_refresh(Some(Duration::from_secs(60)), refresh, min), Duration::from_secs(60));
        assert_eq!(next_refresh(Some(Duration::from_secs(86_400)), refresh, min), refresh);
        assert_eq!(next_refresh(Some(Duration::ZERO), refresh, min), min);

        assert_eq!(max_age(Some("public, max-age=3600, must-revalidate")), Some(Duration::from_secs(3600)));
        assert_eq!(max_age(Some("Max-Age=\"60\"")), Some(Duration::from_secs(60)));
        assert_eq!(max_age(Some("no-store")), Some(Duration::ZERO));
        assert_eq!(max_age(Some("max-age=lots")), None);
        assert_eq!(max_age(Some("public")), None);
        assert_eq!(max_age(None), None);
    }
}
