//! Rolling restart (benchmark 9): a rolling restart of the gateways, as Kubernetes does one. Each
//! gateway in turn is sent SIGTERM (it drains: its sessions close with 1012, spread over
//! `HERALD_DRAIN_SPREAD_MS`), exits, and is replaced by a new process on the same address, ready
//! before the next one goes. Direct messages are published throughout; nothing may be lost. The
//! gateways' and the dispatcher's counters are sampled from outside (sampler.rs) for the connect
//! storm on the surviving gateways and the replay queries at the store. The roll is run with the
//! spread, then on a fresh system without it, so that the report shows the storm the spread
//! avoids, within one run.
//!
//! Where a balancer sends a draining gateway's clients is a plain function with tests; the
//! processes are the orchestrator's.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::metrics;
use super::orchestrator::{user_names, Workers};
use super::report::Totals;
use super::sampler::{Sampler, Samples, SAMPLE_EVERY};
use super::scenarios::{connect, publish_paced, round, Outcome, Pace, Recipients, RunConfig, Scenario, Sut, System};
use super::systems::{Herald, HeraldOptions};

const GATEWAYS: usize = 3;
/// The gateway's defaults (`HERALD_DRAIN_GRACE_MS`, and a spread of 4/5 of it), set explicitly
/// so that the run does not change when they do. The Kubernetes manifests use 20 s / 16 s.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
const DRAIN_SPREAD: Duration = Duration::from_secs(8);
/// What the kubelet adds to the grace before it sends SIGKILL, roughly: a gateway that has not
/// exited by then failed its drain.
const EXIT_SLACK: Duration = Duration::from_secs(5);
/// Direct messages per second, throughout (as the `loss` scenario).
const RATE: f64 = 200.0;
/// Publishing and sampling before the first drain and after the last step.
const QUIET: Duration = Duration::from_secs(2);
/// How long one step (drain, exit, replacement ready, every client back) may take beyond the grace.
const STEP_SLACK: Duration = Duration::from_secs(60);

const OPEN: &str = "herald_gateway_connections_open";
const REPLAYED: &str = "herald_dispatcher_replayed_total";
const RESTART_CLOSE: u16 = 1012;

pub(crate) async fn rollout(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Rollout, System::Herald);
    let per_gateway = if config.short { 1_000 } else { 10_000 };
    out.set("gateways", GATEWAYS as u64);
    out.set("connections", (GATEWAYS * per_gateway) as u64);
    out.set("drain_grace_ms", DRAIN_GRACE.as_millis() as u64);
    out.set("publish_rate_per_s", RATE);
    out.set("sample_every_ms", SAMPLE_EVERY.as_millis() as u64);
    let spread = roll_once(per_gateway, DRAIN_SPREAD, "spread", config).await?;
    spread.report(&mut out, "spread");
    let unspread = roll_once(per_gateway, Duration::ZERO, "no_spread", config).await?;
    unspread.report(&mut out, "no_spread");
    // How much larger the storm is without the spread, within this run.
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round(a / b, 2)),
        _ => None,
    };
    out.set(
        "no_spread_to_spread_peak_connects_per_gateway",
        ratio(unspread.peak_connects_one_gateway(), spread.peak_connects_one_gateway()),
    );
    out.set(
        "no_spread_to_spread_peak_connects_fleet",
        ratio(unspread.peak_connects_fleet(), spread.peak_connects_fleet()),
    );
    out.set(
        "no_spread_to_spread_peak_replay_queries",
        ratio(unspread.peak_replay_queries(), spread.peak_replay_queries()),
    );
    out.set("no_spread_to_spread_peak_replay_query_s", ratio(unspread.peak_replay_busy(), spread.peak_replay_busy()));
    out.set("no_spread_to_spread_peak_store_round_trips", ratio(unspread.peak_store(), spread.peak_store()));
    Ok(out)
}

/// One gateway's turn in the roll, times from its SIGTERM.
struct Step {
    /// Sessions it held when told to stop.
    held: u64,
    /// Until the process exited.
    drain_s: Option<f64>,
    /// Until its replacement answered `/readyz`.
    ready_s: Option<f64>,
    /// Until every client was connected again (all of its sessions closed and reconnected).
    reconnected_s: Option<f64>,
    /// It had not exited at the end of its grace (plus [`EXIT_SLACK`]) and was killed.
    killed: bool,
}

/// One roll of every gateway on a fresh system.
struct Roll {
    spread: Duration,
    steps: Vec<Step>,
    samples: Samples,
    published: u64,
    /// From the last publish until every message was received (None: not within 120 s).
    all_received_s: Option<f64>,
    totals: Totals,
    replayed: u64,
}

/// One roll on a fresh system whose servers log to `logs/rollout-<label>/`.
async fn roll_once(per_gateway: usize, spread: Duration, label: &str, config: &RunConfig) -> anyhow::Result<Roll> {
    let config = &RunConfig { logs: config.logs.join(format!("rollout-{label}")), ..config.clone() };
    std::fs::create_dir_all(&config.logs)?;
    let ms = |d: Duration| d.as_millis().to_string();
    let options = HeraldOptions {
        gateway_env: vec![("HERALD_DRAIN_GRACE_MS", ms(DRAIN_GRACE)), ("HERALD_DRAIN_SPREAD_MS", ms(spread))],
        ..HeraldOptions::default()
    };
    let sut = Sut::start(System::Herald, GATEWAYS, options, config).await?;
    let mut workers = Workers::spawn(&sut.plan_round_the_servers(per_gateway, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(180)).await?;
    let Sut::Herald(mut h) = sut else { anyhow::bail!("not herald") };
    let total = (GATEWAYS * per_gateway) as u64;
    let users = user_names("u", 0, GATEWAYS * per_gateway);
    // Let the replays (of nothing) of the first connects settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let dispatcher = h.dispatchers[0].internal;
    let replayed_before = metrics::prometheus_counter(&http, dispatcher, REPLAYED).await?;
    let sampler = Sampler {
        http: http.clone(),
        gateways: h.gateways.iter().map(|g| g.internal).collect(),
        dispatcher,
        store: h.store_proxy.counter(),
    };
    let (js, subject) = (h.js.clone(), h.stack.names().publish_subject("bench"));
    // Cancelled when the roll ends, however it ends: publishing and sampling stop with it.
    let stop = CancellationToken::new();
    let rolling = async {
        tokio::time::sleep(QUIET).await;
        let steps = roll(&mut h, &mut workers, total, &http).await;
        if steps.is_ok() {
            tokio::time::sleep(QUIET).await;
        }
        stop.cancel();
        steps
    };
    let (steps, published, samples) = tokio::join!(
        rolling,
        publish_paced(&js, &subject, Recipients::one_each(&users), 0, u64::MAX, Pace::steady(RATE), &stop),
        sampler.run(&stop)
    );
    let steps = steps?;
    let (published, _) = published?;
    let last_publish = Instant::now();
    let (totals, all_in) =
        workers.wait_for(Duration::from_secs(120), Duration::from_millis(250), |t| t.unique >= published).await?;
    let all_received_s = all_in.then(|| last_publish.elapsed().as_secs_f64());
    let replayed = metrics::prometheus_counter(&http, dispatcher, REPLAYED).await?.saturating_sub(replayed_before);
    workers.quit().await;
    Ok(Roll { spread, steps, samples, published, all_received_s, totals, replayed })
}

/// Restarts every gateway in turn: where its clients will go, SIGTERM, then watch until it has
/// exited, its replacement is ready and every client is connected again.
async fn roll(h: &mut Herald, workers: &mut Workers, total: u64, http: &reqwest::Client) -> anyhow::Result<Vec<Step>> {
    let urls = h.urls();
    let mut steps = Vec::new();
    for i in 0..h.gateways.len() {
        let mut open = Vec::new();
        for g in &h.gateways {
            open.push(metrics::prometheus_counter(http, g.internal, OPEN).await?);
        }
        let takers: Vec<Option<u64>> = open.iter().enumerate().map(|(g, n)| (g != i).then_some(*n)).collect();
        let shares = least_connections(&takers, open[i]);
        workers.route(&urls.iter().cloned().zip(shares).collect::<Vec<_>>()).await?;
        let closes_before = restart_closes(&workers.totals().await?);
        let start = Instant::now();
        h.gateways[i].terminate()?;
        let mut step = Step { held: open[i], drain_s: None, ready_s: None, reconnected_s: None, killed: false };
        loop {
            let since = start.elapsed();
            if step.drain_s.is_none() {
                if !h.gateways[i].is_running() {
                    step.drain_s = Some(since.as_secs_f64());
                    h.replace_gateway(i, 1)?;
                } else if since > DRAIN_GRACE + EXIT_SLACK {
                    // What the kubelet does at the end of the termination grace period.
                    h.gateways[i].kill9();
                    step.killed = true;
                }
            } else if step.ready_s.is_none() {
                let replacement = &mut h.gateways[i];
                anyhow::ensure!(replacement.is_running(), "{} exited during start-up; see its log", replacement.name);
                if replacement.answers(http, "/readyz").await {
                    step.ready_s = Some(start.elapsed().as_secs_f64());
                }
            }
            if step.reconnected_s.is_none() {
                let totals = workers.totals().await?;
                let closed = restart_closes(&totals).saturating_sub(closes_before);
                // Once it has exited, none of its sessions is left to close.
                if totals.connected >= total && (closed >= step.held || step.drain_s.is_some()) {
                    step.reconnected_s = Some(start.elapsed().as_secs_f64());
                }
            }
            if step.ready_s.is_some() && step.reconnected_s.is_some() {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < DRAIN_GRACE + STEP_SLACK,
                "gateway {i}: not replaced with every client back within {:?} (exited after {:?} s, ready after {:?} s)",
                DRAIN_GRACE + STEP_SLACK,
                step.drain_s,
                step.ready_s
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "loadgen: rollout: gateway {i} ({} sessions) exited after {:.2} s, replacement ready after {:.2} s, \
             every client back after {:.2} s",
            step.held,
            step.drain_s.unwrap_or_default(),
            step.ready_s.unwrap_or_default(),
            step.reconnected_s.unwrap_or_default()
        );
        steps.push(step);
    }
    Ok(steps)
}

fn restart_closes(totals: &Totals) -> u64 {
    totals.closes.get(&RESTART_CLOSE).copied().unwrap_or(0)
}

/// How a least-connections balancer (HAProxy's `leastconn`, the choice for long sessions such as
/// WebSockets) shares out `incoming` new connections over gateways holding `open[g]` (None: takes
/// none, e.g. the draining one): each goes to the one holding fewest, so the emptiest fill up to
/// the next, and so on. Returns each gateway's share, 0..=1; with nothing incoming, equal shares.
///
/// A balancer that picks at random would leave the gateway a roll does not touch until last with
/// 22,500 of 30,000 connections, past the 20,000 open files a process may hold here.
fn least_connections(open: &[Option<u64>], incoming: u64) -> Vec<f64> {
    let mut loads: Vec<u64> = open.iter().flatten().copied().collect();
    if loads.is_empty() {
        return vec![0.0; open.len()];
    }
    if incoming == 0 {
        let each = 1.0 / loads.len() as f64;
        return open.iter().map(|o| if o.is_some() { each } else { 0.0 }).collect();
    }
    loads.sort_unstable();
    // The level every taker below it is filled up to: the k emptiest share `incoming` so that they
    // end level, at or below the next one.
    let mut level = 0.0;
    let mut below = 0.0;
    for (k, load) in loads.iter().enumerate() {
        below += *load as f64;
        level = (incoming as f64 + below) / (k + 1) as f64;
        if loads.get(k + 1).is_none_or(|next| level <= *next as f64) {
            break;
        }
    }
    open.iter().map(|o| o.map_or(0.0, |load| (level - load as f64).max(0.0) / incoming as f64)).collect()
}

impl Roll {
    fn peak_connects_one_gateway(&self) -> Option<f64> {
        self.samples.peak_each_gateway().into_iter().flatten().reduce(f64::max)
    }

    fn peak_connects_fleet(&self) -> Option<f64> {
        self.samples.peak_fleet()
    }

    fn peak_replay_queries(&self) -> Option<f64> {
        self.samples.peak_of(&self.samples.replay_queries)
    }

    fn peak_store(&self) -> Option<f64> {
        self.samples.peak_of(&self.samples.store)
    }

    /// Seconds the store spent answering replay queries per second of the run, at its peak.
    fn peak_replay_busy(&self) -> Option<f64> {
        self.samples.peak_of(&self.samples.replay_query_us).map(|us| us / 1e6)
    }

    fn report(&self, out: &mut Outcome, p: &str) {
        let r0 = |x: Option<f64>| x.map(|x| round(x, 0));
        let r2 = |x: Option<f64>| x.map(|x| round(x, 2));
        let each = |f: fn(&Step) -> Option<f64>| json!(self.steps.iter().map(|s| r2(f(s))).collect::<Vec<_>>());
        out.set(&format!("{p}_drain_spread_ms"), self.spread.as_millis() as u64);
        out.set(&format!("{p}_sessions_drained_each"), json!(self.steps.iter().map(|s| s.held).collect::<Vec<_>>()));
        out.set(&format!("{p}_drain_s_each"), each(|s| s.drain_s));
        out.set(&format!("{p}_replacement_ready_s_each"), each(|s| s.ready_s));
        out.set(&format!("{p}_all_reconnected_s_each"), each(|s| s.reconnected_s));
        out.set(&format!("{p}_peak_connects_per_s_one_gateway"), r0(self.peak_connects_one_gateway()));
        out.set(
            &format!("{p}_peak_connects_per_s_each"),
            json!(self.samples.peak_each_gateway().into_iter().map(r0).collect::<Vec<_>>()),
        );
        out.set(&format!("{p}_peak_connects_per_s_fleet"), r0(self.peak_connects_fleet()));
        out.set(&format!("{p}_peak_replay_queries_per_s"), r0(self.peak_replay_queries()));
        let queries = Samples::total_of(&self.samples.replay_queries);
        out.set(&format!("{p}_replay_queries"), queries);
        // The dispatcher asks for the replays of a batch of connects in one query: in a storm the
        // queries grow larger rather than more numerous, which their time shows.
        out.set(&format!("{p}_peak_replay_query_s_per_s"), self.peak_replay_busy().map(|x| round(x, 3)));
        let busy_ms = Samples::total_of(&self.samples.replay_query_us) as f64 / 1000.0;
        out.set(&format!("{p}_replay_query_mean_ms"), (queries > 0).then(|| round(busy_ms / queries as f64, 1)));
        out.set(&format!("{p}_replayed_notifications"), self.replayed);
        out.set(&format!("{p}_peak_store_round_trips_per_s"), r0(self.peak_store()));
        out.set(&format!("{p}_store_round_trips"), Samples::total_of(&self.samples.store));
        let lost = self.published.saturating_sub(self.totals.unique);
        out.set(&format!("{p}_published"), self.published);
        out.set(&format!("{p}_received_unique"), self.totals.unique);
        out.set(&format!("{p}_lost"), lost);
        out.set(&format!("{p}_duplicates"), self.totals.duplicates);
        out.set(&format!("{p}_out_of_order"), self.totals.out_of_order);
        out.set(&format!("{p}_all_received_after_last_publish_s"), r2(self.all_received_s));
        out.set(&format!("{p}_closes"), json!(self.totals.closes));
        out.set(&format!("{p}_refused"), json!(self.totals.refused));
        out.set(&format!("{p}_connect_failures"), self.totals.connect_failures);
        if lost > 0 {
            out.fail(format!(
                "{p}: {lost} of {} messages not received within 120 s of the last publish",
                self.published
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            if step.killed {
                out.fail(format!("{p}: gateway {i} had not exited {EXIT_SLACK:?} after its drain grace; killed"));
            }
        }
        if self.replayed == 0 {
            out.notes.push(format!(
                "{p}: no notification was replayed: no message found its user between drain and reconnect"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_connections_fills_the_emptiest_first() {
        // The first drain: its 10,000 go half and half to the two others.
        assert_eq!(least_connections(&[None, Some(10_000), Some(10_000)], 10_000), vec![0.0, 0.5, 0.5]);
        // The second: the fresh replacement takes all 15,000, and ends level with the third.
        assert_eq!(least_connections(&[Some(0), None, Some(15_000)], 15_000), vec![1.0, 0.0, 0.0]);
        // More than levels them: the rest shared evenly.
        assert_eq!(least_connections(&[Some(0), None, Some(15_000)], 20_000), vec![0.875, 0.0, 0.125]);
    }

    #[test]
    fn least_connections_with_nothing_incoming_or_no_taker() {
        assert_eq!(least_connections(&[Some(5), None, Some(9)], 0), vec![0.5, 0.0, 0.5]);
        assert_eq!(least_connections(&[None, None], 10), vec![0.0, 0.0]);
    }
}
