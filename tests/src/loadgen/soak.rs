//! The soak: a steady rate of one-recipient durable jobs to 1,200 connected users on 2 gateways
//! and 1 dispatcher for 20 minutes or more (2 short), while ~5 % of the users flap and a group of
//! 100 goes offline for a long absence and comes back. Sampled every 30 s (memory, CPU, latency,
//! the store's receipts); at the end nothing may be lost and every receipt must read
//! `delivered`, and the figures say whether memory or latency drift over time.
//!
//! A window's publish → receive latency counts every message received in it, replays included:
//! the absent group's replay shows as that window's p99 (about the absence). The absence ends
//! at half the run, in the middle third, so it moves neither the first- and last-third p99 nor
//! (much) the least-squares slope.
//!
//! The load is published by `scenarios::publish_paced`; the users are the generator's workers,
//! told to go offline with `Workers::away`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use mongodb::bson::doc;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::orchestrator::{user_names, Workers};
use super::report::Latency;
use super::scenarios::{
    connect, count_receipts, publish_paced, round, Outcome, Pace, Recipients, RunConfig, Scenario, Sut, System,
};
use super::systems::{Herald, HeraldOptions};

const USERS: usize = 1_200;
const GATEWAYS: usize = 2;
/// One sample of the servers per window.
const WINDOW: Duration = Duration::from_secs(30);
/// Users 0..60 flap (5 %).
const FLAPPERS: Range<usize> = 0..60;
/// How often a flapping user drops its connection: uniformly within this, seconds.
const FLAP_EVERY_S: (f64, f64) = (30.0, 60.0);
/// How long it stays offline when it does, seconds: a network blip, then the client's reconnect.
const FLAP_OFFLINE_S: (f64, f64) = (0.5, 3.0);
/// The last 100 users go offline for a long absence.
const ABSENT: Range<usize> = (USERS - 100)..USERS;
/// Memory grows while caches and buffers fill; the slope is taken over the samples after this.
const WARM_UP: Duration = Duration::from_secs(180);
/// How long the end waits for the last messages and receipts.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// What a soak run does, from the command line.
#[derive(Debug, Clone)]
struct SoakLoad {
    duration: Duration,
    rate: f64,
    /// The long absence: from when (since the load started), for how long.
    absence_at: Duration,
    absence: Duration,
}

impl SoakLoad {
    fn of(config: &RunConfig) -> Self {
        let duration = Duration::from_secs(if config.short { 120 } else { config.soak_minutes.max(1) * 60 });
        let absence = Duration::from_secs(if config.short { 30 } else { 300 }).min(duration / 2);
        // Back at half the run, whatever its length (see the module's note on latency).
        let absence_at = (duration / 2).saturating_sub(absence);
        Self { duration, rate: config.soak_rate.max(1.0), absence_at, absence }
    }

    fn messages(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()) as u64
    }

    /// The memory slope skips the warm-up, or the first quarter of a run too short to have one
    /// (the short run), so that there are samples to fit.
    fn warm_up(&self) -> Duration {
        WARM_UP.min(self.duration / 4)
    }
}

/// How long a soak may take before it is stopped: its load, plus start, connect and drain.
pub(crate) fn run_limit(config: &RunConfig) -> Duration {
    SoakLoad::of(config).duration + Duration::from_secs(600)
}

/// One 30 s window.
#[derive(Debug, Clone)]
struct Window {
    /// End of the window, seconds since the load started.
    at_s: f64,
    /// Resident memory of each gateway and dispatcher, KiB, at the end of the window.
    rss_kib: BTreeMap<String, u64>,
    /// Share of a core each used over the window, %.
    cpu_pct: BTreeMap<String, f64>,
    latency: Latency,
    received: u64,
    connected: u64,
    receipts_pending: u64,
    receipts_delivered: u64,
}

impl Window {
    fn as_json(&self) -> Value {
        let mib: BTreeMap<&String, f64> = self.rss_kib.iter().map(|(n, k)| (n, round(*k as f64 / 1024.0, 1))).collect();
        let cpu: BTreeMap<&String, f64> = self.cpu_pct.iter().map(|(n, p)| (n, round(*p, 1))).collect();
        json!({
            "t_s": round(self.at_s, 0),
            "rss_mib": mib,
            "cpu_pct": cpu,
            "p50_ms": round(self.latency.p50_ms, 1),
            "p99_ms": round(self.latency.p99_ms, 1),
            "received": self.received,
            "connected": self.connected,
            "receipts_pending": self.receipts_pending,
            // Two counts a moment apart: a receipt acked between them is in both.
            "receipts_in_store": self.receipts_pending + self.receipts_delivered,
        })
    }
}

pub(crate) async fn soak(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Soak, System::Herald);
    let load = SoakLoad::of(config);
    let options = HeraldOptions { gateways: GATEWAYS, dispatchers: 1, ..HeraldOptions::default() };
    let sut = Sut::start(System::Herald, GATEWAYS, options, config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(USERS / GATEWAYS, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    // Let the online announcements of the connect settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    workers.reset().await?;

    let users = user_names("u", 0, USERS);
    let subject = h.stack.names().publish_subject("bench");
    let stop = CancellationToken::new();
    let publishing = publish_paced(
        &h.js,
        &subject,
        Recipients::one_each(&users),
        0,
        load.messages(),
        Pace::steady(load.rate),
        &stop,
    );
    let driving = async {
        let driven = drive(&mut workers, h, &load).await;
        // A run that cannot be driven stops publishing too, rather than going on for minutes.
        if driven.is_err() {
            stop.cancel();
        }
        driven
    };
    let (published, driven) = tokio::join!(publishing, driving);
    let (published, publish_s) = published?;
    let driven = driven?;

    let drain_start = Instant::now();
    let (totals, all_in) = workers.wait_for(DRAIN_LIMIT, Duration::from_secs(1), |t| t.unique >= published).await?;
    let delivered = wait_delivered(h, published).await?;
    out.set("duration_min", round(load.duration.as_secs_f64() / 60.0, 1));
    out.set("rate_per_s", load.rate);
    out.set("publish_took_s", round(publish_s, 1));
    out.set("users", USERS as u64);
    out.set("gateways", GATEWAYS as u64);
    out.set("flapping_users", FLAPPERS.len() as u64);
    out.set("flaps", driven.flaps);
    // Flaps and the absent group's closes, as the workers counted them.
    out.set("closed_by_generator", totals.aways);
    out.set("absent_users", ABSENT.len() as u64);
    out.set("absence_s", load.absence.as_secs());
    out.set("sent_to_absent_while_away", sent_to(&load.absence_range_k(), USERS, &ABSENT));
    out.set("published", published);
    out.set("received_unique", totals.unique);
    out.set("lost", published.saturating_sub(totals.unique));
    out.set("duplicates", totals.duplicates);
    out.set("out_of_order", totals.out_of_order);
    out.set("drain_s", round(drain_start.elapsed().as_secs_f64(), 1));
    out.set("receipts_delivered", delivered);
    out.set("closes", json!(totals.closes));
    report_trends(&mut out, &driven.windows, load.warm_up());
    out.set("windows", Value::Array(driven.windows.iter().map(Window::as_json).collect()));
    if !all_in {
        out.fail(format!("{} messages not received {DRAIN_LIMIT:?} after the load", published - totals.unique));
    }
    if delivered < published {
        out.fail(format!("{} receipts not delivered", published - delivered));
    }
    workers.quit().await;
    Ok(out)
}

impl SoakLoad {
    /// The indexes of the messages published during the long absence (the publisher keeps to
    /// its schedule, so index k goes out at k / rate seconds).
    fn absence_range_k(&self) -> Range<u64> {
        let k_at = |d: Duration| (d.as_secs_f64() * self.rate).ceil() as u64;
        k_at(self.absence_at)..k_at(self.absence_at + self.absence)
    }
}

/// Messages among `ks` whose recipient (round robin over `users_n` users) is in `group`.
fn sent_to(ks: &Range<u64>, users_n: usize, group: &Range<usize>) -> u64 {
    ks.clone().filter(|k| group.contains(&((*k as usize) % users_n))).count() as u64
}

/// What happened while the load ran.
struct Driven {
    windows: Vec<Window>,
    flaps: u64,
}

/// For the duration of the load: flaps the flapping users, sends the absent group away and lets
/// it come back, and samples a window every [`WINDOW`].
async fn drive(workers: &mut Workers, h: &Herald, load: &SoakLoad) -> anyhow::Result<Driven> {
    let start = Instant::now();
    let mut flap_at: Vec<Instant> = FLAPPERS.map(|_| start + uniform_secs((0.0, FLAP_EVERY_S.1))).collect();
    let mut absent_sent = false;
    let mut flaps = 0;
    let mut windows = Vec::new();
    let mut window_start = (start, cpu_by_process(h));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < load.duration {
        tick.tick().await;
        let now = Instant::now();
        for (user, at) in FLAPPERS.zip(flap_at.iter_mut()) {
            if now >= *at {
                workers.away(user, 1, uniform_secs(FLAP_OFFLINE_S)).await?;
                *at = now + uniform_secs(FLAP_EVERY_S);
                flaps += 1;
            }
        }
        if !absent_sent && start.elapsed() >= load.absence_at {
            workers.away(ABSENT.start, ABSENT.len(), load.absence).await?;
            absent_sent = true;
        }
        // On fixed boundaries, so that sampling time does not make the windows drift.
        if now >= start + WINDOW * (windows.len() as u32 + 1) {
            windows.push(sample_window(workers, h, start, &window_start).await?);
            window_start = (Instant::now(), cpu_by_process(h));
        }
    }
    // The end of the load cut the last window short: kept if it holds half a window or more.
    if window_start.0.elapsed() >= WINDOW / 2 {
        windows.push(sample_window(workers, h, start, &window_start).await?);
    }
    Ok(Driven { windows, flaps })
}

/// Closes the window that began at `began` (its time and CPU readings) and opens the next.
async fn sample_window(
    workers: &mut Workers,
    h: &Herald,
    start: Instant,
    began: &(Instant, BTreeMap<String, f64>),
) -> anyhow::Result<Window> {
    let totals = workers.totals().await?;
    workers.reset().await?;
    let secs = began.0.elapsed().as_secs_f64();
    let cpu_pct = cpu_by_process(h)
        .into_iter()
        .map(|(n, c)| {
            let used = c - began.1.get(&n).copied().unwrap_or(0.0);
            (n, used / secs * 100.0)
        })
        .collect();
    let window = Window {
        at_s: start.elapsed().as_secs_f64(),
        rss_kib: h.gateways.iter().chain(&h.dispatchers).map(|s| (s.name.clone(), s.rss_kib())).collect(),
        cpu_pct,
        latency: Latency::of(totals.publish_to_rx.as_ref()),
        received: totals.unique,
        connected: totals.connected,
        receipts_pending: count_receipts(&h.db, doc! { "state": "pending" }).await?,
        receipts_delivered: count_receipts(&h.db, doc! { "state": "delivered" }).await?,
    };
    eprintln!("loadgen: soak window {}", window.as_json());
    Ok(window)
}

/// CPU seconds used so far by each gateway and dispatcher.
fn cpu_by_process(h: &Herald) -> BTreeMap<String, f64> {
    h.gateways.iter().chain(&h.dispatchers).map(|s| (s.name.clone(), s.cpu_secs())).collect()
}

fn uniform_secs((low, high): (f64, f64)) -> Duration {
    Duration::from_secs_f64(low + (high - low) * rand::random::<f64>())
}

/// Waits until `want` receipts read `delivered`, at most [`DRAIN_LIMIT`]; returns how many do.
async fn wait_delivered(h: &Herald, want: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let delivered = count_receipts(&h.db, doc! { "state": "delivered" }).await?;
        if delivered >= want || Instant::now() >= deadline {
            return Ok(delivered);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The drift figures: each process's RSS slope after the warm-up, and the latency trend.
fn report_trends(out: &mut Outcome, windows: &[Window], warm_up: Duration) {
    let names: Vec<&String> = windows.first().map(|w| w.rss_kib.keys().collect()).unwrap_or_default();
    let slopes: BTreeMap<&String, Option<f64>> = names
        .into_iter()
        .map(|name| {
            let points: Vec<(f64, f64)> = windows
                .iter()
                .filter(|w| w.at_s >= warm_up.as_secs_f64())
                .filter_map(|w| Some((w.at_s / 60.0, *w.rss_kib.get(name)? as f64)))
                .collect();
            (name, slope(&points).map(|s| round(s, 1)))
        })
        .collect();
    out.set("rss_slope_after_warm_up_kib_per_min", json!(slopes));
    out.set("rss_slope_warm_up_s", warm_up.as_secs());
    let p99s: Vec<f64> = windows.iter().map(|w| w.latency.p99_ms).collect();
    let (first, last) = first_and_last_third(&p99s);
    out.set("p99_ms_first_third", first.map(|x| round(x, 1)));
    out.set("p99_ms_last_third", last.map(|x| round(x, 1)));
    let points: Vec<(f64, f64)> = windows.iter().map(|w| (w.at_s / 60.0, w.latency.p99_ms)).collect();
    out.set("p99_slope_ms_per_min", slope(&points).map(|s| round(s, 2)));
}

/// The least-squares slope of `y` over `x`; None with fewer than two distinct `x`.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (points.len() >= 2 && sxx > 0.0).then(|| sxy / sxx)
}

/// The median of the first third of `xs` and of the last third (at least one value each); None
/// when there is nothing.
fn first_and_last_third(xs: &[f64]) -> (Option<f64>, Option<f64>) {
    if xs.is_empty() {
        return (None, None);
    }
    let third = (xs.len() / 3).max(1);
    (median(&xs[..third]), median(&xs[xs.len() - third..]))
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_the_least_squares_fit() {
        // 100 KiB a minute plus noise that cancels out.
        let points = [(3.0, 1_000.0), (4.0, 1_110.0), (5.0, 1_190.0), (6.0, 1_300.0)];
        let s = slope(&points).unwrap_or(f64::NAN);
        assert!((s - 98.0).abs() < 1e-9, "{s}");
        assert_eq!(slope(&[(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)]), Some(0.0), "flat");
        assert_eq!(slope(&[(1.0, 5.0)]), None, "one point");
        assert_eq!(slope(&[]), None);
        assert_eq!(slope(&[(2.0, 1.0), (2.0, 9.0)]), None, "no spread in time");
    }

    #[test]
    fn thirds_are_medians_of_the_first_and_last_windows() {
        let xs = [10.0, 12.0, 11.0, 50.0, 20.0, 30.0, 25.0];
        // Thirds of two: the medians of [10, 12] and [30, 25] (the upper of two).
        assert_eq!(first_and_last_third(&xs), (Some(12.0), Some(30.0)));
        assert_eq!(first_and_last_third(&[7.0, 9.0]), (Some(7.0), Some(9.0)), "one each when short");
        assert_eq!(first_and_last_third(&[]), (None, None));
    }

    #[test]
    fn messages_to_a_group_are_counted_by_their_round_robin_recipient() {
        // 10 users, group 8..10: of k in 0..25, those with k % 10 in {8, 9}: 8, 9, 18, 19.
        assert_eq!(sent_to(&(0..25), 10, &(8..10)), 4);
        assert_eq!(sent_to(&(0..0), 10, &(8..10)), 0);
    }

    #[test]
    fn the_short_soak_is_two_minutes_with_a_30_s_absence() {
        let config = RunConfig {
            short: true,
            logs: std::path::PathBuf::new(),
            idle_per_server: 1,
            repeats: 1,
            soak_minutes: 20,
            soak_rate: 100.0,
            cost: super::super::cost::CostOptions { loads: Vec::new(), window: None, burst: super::Pace::BURST },
        };
        let load = SoakLoad::of(&config);
        assert_eq!(
            (load.duration, load.absence, load.absence_at),
            (Duration::from_secs(120), Duration::from_secs(30), Duration::from_secs(30))
        );
        assert_eq!(load.messages(), 12_000);
        assert_eq!(load.absence_range_k(), 3_000..6_000);
        let full = SoakLoad::of(&RunConfig { short: false, ..config });
        assert_eq!(
            (full.duration, full.absence, full.warm_up()),
            (Duration::from_secs(1_200), Duration::from_secs(300), WARM_UP)
        );
    }
}
