//! A seeded, randomized fault run (issue 12, first part): Herald as processes (3 gateways, 2
//! dispatchers) on real Redis, NATS JetStream and nx-27017 behind the harness's proxy; a fleet of
//! clients that follow proto/README.md and publishers that retry with the same id; and a nemesis
//! that, at times drawn from the seed, kills (-9), terminates, freezes and thaws any gateway or
//! dispatcher, restarts Redis empty or flushes it, restarts NATS, and cuts the store off, alone
//! and overlapping. Afterwards the system heals and a checker holds what was published against
//! the store and the clients' own logs: every job reached every recipient's client and its
//! receipt is delivered; nothing came late, twice to the wrong user, or to anyone else.
//!
//! `make test` runs a short run with a fixed seed. `make chaos SEED=<n> MINUTES=<m>` runs any
//! (`HERALD_CHAOS_SEED`, `HERALD_CHAOS_SECONDS`). A failure prints the seed and the schedule, so
//! the same run can be replayed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt;
use std::process::Command;
use std::time::Duration;

use herald_tests::cluster::{Cluster, Options, Process};
use herald_tests::fleet::{self, Fleet, Publisher, Stream, Tally};
use herald_tests::services::Stack;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const GATEWAYS: usize = 3;
const DISPATCHERS: usize = 2;
const USERS: usize = 60;
const OFFLINE: usize = 10;
/// Jobs per second, per publisher (one with one recipient a job, one with three).
const RATE: u32 = 40;
const SETTLE: Duration = Duration::from_secs(120);

/// One thing the nemesis does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillGateway(usize),
    TermGateway(usize),
    FreezeGateway(usize),
    KillDispatcher(usize),
    TermDispatcher(usize),
    FreezeDispatcher(usize),
    RestartRedis,
    FlushRedis,
    RestartNats,
    CutStore,
}

impl Fault {
    /// Any fault, with its target, drawn from `rng`.
    fn draw(rng: &mut StdRng) -> Self {
        let g = rng.random_range(0..GATEWAYS);
        let d = rng.random_range(0..DISPATCHERS);
        match rng.random_range(0..10) {
            0 => Fault::KillGateway(g),
            1 => Fault::TermGateway(g),
            2 => Fault::FreezeGateway(g),
            3 => Fault::KillDispatcher(d),
            4 => Fault::TermDispatcher(d),
            5 => Fault::FreezeDispatcher(d),
            6 => Fault::RestartRedis,
            7 => Fault::FlushRedis,
            8 => Fault::RestartNats,
            _ => Fault::CutStore,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Fault::KillGateway(_) => "gateway kill -9",
            Fault::TermGateway(_) => "gateway SIGTERM",
            Fault::FreezeGateway(_) => "gateway SIGSTOP",
            Fault::KillDispatcher(_) => "dispatcher kill -9",
            Fault::TermDispatcher(_) => "dispatcher SIGTERM",
            Fault::FreezeDispatcher(_) => "dispatcher SIGSTOP",
            Fault::RestartRedis => "redis restart (empty)",
            Fault::FlushRedis => "redis FLUSHALL",
            Fault::RestartNats => "nats restart",
            Fault::CutStore => "store cut off",
        }
    }
}

/// A fault at an offset into the run, healed `lasts` later.
#[derive(Debug, Clone, Copy)]
struct Episode {
    at: Duration,
    lasts: Duration,
    fault: Fault,
}

/// The whole schedule, from the seed alone: about one episode every `seconds / 8`, each lasting
/// 1 to 5 s, so that some overlap.
fn schedule(seed: u64, seconds: u64) -> Vec<Episode> {
    let mut rng = StdRng::seed_from_u64(seed);
    let count = (seconds / 4).max(2);
    let mut episodes: Vec<Episode> = (0..count)
        .map(|_| Episode {
            at: Duration::from_millis(rng.random_range(1_000..seconds * 800)),
            lasts: Duration::from_millis(rng.random_range(1_000..5_000)),
            fault: Fault::draw(&mut rng),
        })
        .collect();
    episodes.sort_by_key(|e| e.at);
    episodes
}

struct Schedule<'a>(&'a [Episode]);

impl fmt::Display for Schedule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in self.0 {
            writeln!(
                f,
                "  t+{:>6.1}s  {:<24} for {:.1}s  {:?}",
                e.at.as_secs_f64(),
                e.fault.kind(),
                e.lasts.as_secs_f64(),
                e.fault
            )?;
        }
        Ok(())
    }
}

/// What the nemesis acts on: the processes, each up, frozen or down.
struct System {
    cluster: Cluster,
    gateways: Vec<Option<Process>>,
    dispatchers: Vec<Option<Process>>,
    fleet: Fleet,
}

impl System {
    fn gateway_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.gateways.iter().flatten().map(|p| p.addr).collect()
    }

    /// Applies a fault; returns whether it did anything (a target already down is skipped).
    async fn apply(&mut self, fault: Fault) -> bool {
        match fault {
            Fault::KillGateway(i) => self.gateways[i].take().map(|mut p| p.kill9()).is_some(),
            Fault::TermGateway(i) => match self.gateways[i].take() {
                Some(mut p) => {
                    let _ = p.sigterm(Duration::from_secs(15)).await;
                    true
                }
                None => false,
            },
            Fault::KillDispatcher(i) => self.dispatchers[i].take().map(|mut p| p.kill9()).is_some(),
            Fault::TermDispatcher(i) => match self.dispatchers[i].take() {
                Some(mut p) => {
                    let _ = p.sigterm(Duration::from_secs(15)).await;
                    true
                }
                None => false,
            },
            Fault::FreezeGateway(i) => self.gateways[i].as_ref().map(|p| signal(p.pid(), "STOP")).is_some(),
            Fault::FreezeDispatcher(i) => self.dispatchers[i].as_ref().map(|p| signal(p.pid(), "STOP")).is_some(),
            Fault::RestartRedis => {
                self.cluster.stack.redis.restart().await.unwrap();
                true
            }
            Fault::FlushRedis => {
                use fred::prelude::*;
                let redis = self.cluster.redis().await.unwrap();
                let _: () = redis.flushall(false).await.unwrap();
                true
            }
            Fault::RestartNats => {
                self.cluster.stack.nats.stop().await;
                true
            }
            Fault::CutStore => {
                self.cluster.stack.mongo_proxy.cut().await;
                true
            }
        }
    }

    /// Undoes a fault: restarts what is down, thaws what is frozen, restores what was cut.
    async fn heal(&mut self, fault: Fault) {
        match fault {
            Fault::KillGateway(i) | Fault::TermGateway(i) => {
                if self.gateways[i].is_none() {
                    self.gateways[i] = Some(self.cluster.gateway_process().await.unwrap());
                    self.fleet.set_gateways(self.gateway_addrs());
                }
            }
            Fault::KillDispatcher(i) | Fault::TermDispatcher(i) => {
                if self.dispatchers[i].is_none() {
                    self.dispatchers[i] = Some(self.cluster.dispatcher_process().await.unwrap());
                }
            }
            Fault::FreezeGateway(i) => {
                if let Some(p) = &self.gateways[i] {
                    signal(p.pid(), "CONT");
                }
            }
            Fault::FreezeDispatcher(i) => {
                if let Some(p) = &self.dispatchers[i] {
                    signal(p.pid(), "CONT");
                }
            }
            Fault::RestartRedis | Fault::FlushRedis => {}
            Fault::RestartNats => self.cluster.stack.nats.restart().await.unwrap(),
            Fault::CutStore => self.cluster.stack.mongo_proxy.restore(),
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_fault_schedule_loses_nothing() {
    let seed = env_u64("HERALD_CHAOS_SEED", 1);
    let seconds = env_u64("HERALD_CHAOS_SECONDS", 40);
    let episodes = schedule(seed, seconds);
    println!("chaos: seed {seed}, {seconds} s, schedule:\n{}", Schedule(&episodes));

    // Resends after 10 s heal what the nemesis breaks between a delivery and its ack; a dead
    // dispatcher's jobs go to the other after 5 s.
    let options =
        Options { ack_timeout: Duration::from_secs(10), ack_wait: Duration::from_secs(5), ..Options::default() };
    let cluster = Cluster::new(Stack::start().await.unwrap(), options).await.unwrap();
    let mut gateways = Vec::new();
    for _ in 0..GATEWAYS {
        gateways.push(Some(cluster.gateway_process().await.unwrap()));
    }
    let mut dispatchers = Vec::new();
    for _ in 0..DISPATCHERS {
        dispatchers.push(Some(cluster.dispatcher_process().await.unwrap()));
    }
    let addrs: Vec<_> = gateways.iter().flatten().map(|p: &Process| p.addr).collect();
    let users = fleet::users("chaos", USERS);
    let (online, offline) = users.split_at(USERS - OFFLINE);
    let fleet = Fleet::new(addrs);
    fleet.connect(online, Duration::from_secs(60)).await.unwrap();
    let mut system = System { cluster, gateways, dispatchers, fleet };

    let count = RATE as usize * seconds as usize;
    let publish = |run: &str, recipients_per_job| Stream {
        run: run.to_owned(),
        users: users.clone(),
        recipients_per_job,
        count,
        rate: RATE,
        ttl_secs: None,
    };
    let nats_url = system.cluster.stack.nats.url();
    let names = system.cluster.stack.names();
    let single = Publisher::start(&nats_url, names.publish_subject("chaos-1"), publish("chaos1", 1)).await.unwrap();
    let fan_out = Publisher::start(&nats_url, names.publish_subject("chaos-3"), publish("chaos3", 3)).await.unwrap();

    // The nemesis: each episode applied at its time and healed when it ends; they overlap.
    let start = Instant::now();
    let mut open: Vec<(Instant, Fault)> = Vec::new();
    let mut injected: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for episode in &episodes {
        loop {
            open.sort_by_key(|(until, _)| *until);
            let next_heal = open.first().map(|(until, _)| *until);
            match next_heal {
                Some(until) if until <= start + episode.at => {
                    tokio::time::sleep_until(until).await;
                    let (_, fault) = open.remove(0);
                    system.heal(fault).await;
                }
                _ => break,
            }
        }
        tokio::time::sleep_until(start + episode.at).await;
        if open.iter().any(|(_, f)| *f == episode.fault) {
            continue;
        }
        if system.apply(episode.fault).await {
            *injected.entry(episode.fault.kind()).or_default() += 1;
            open.push((Instant::now() + episode.lasts, episode.fault));
        }
    }
    open.sort_by_key(|(until, _)| *until);
    for (until, fault) in open {
        tokio::time::sleep_until(until).await;
        system.heal(fault).await;
    }
    let healed = Instant::now();

    // The checker: everything published reached every recipient, once the system has healed.
    let mut jobs = single.finish(SETTLE).await.unwrap();
    jobs.extend(fan_out.finish(SETTLE).await.unwrap());
    let offline: BTreeSet<String> = offline.iter().cloned().collect();
    let db = &system.cluster.db;
    let recovery = fleet::wait_delivered(db, &jobs, &offline, healed, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: not all delivered: {e:#}\nschedule:\n{}", Schedule(&episodes)));
    let late: Vec<String> = offline.iter().cloned().collect();
    system.fleet.connect(&late, Duration::from_secs(60)).await.unwrap();
    fleet::wait_delivered(db, &jobs, &BTreeSet::new(), Instant::now(), SETTLE)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: offline users' backlog: {e:#}\nschedule:\n{}", Schedule(&episodes)));
    let tally =
        Tally::take(&format!("chaos seed {seed}"), db, &jobs, &system.fleet, &BTreeSet::new(), recovery).await.unwrap();
    println!("chaos: faults injected by kind: {injected:?}");
    println!("chaos: {tally}");
    println!(
        "chaos table row: | {seed} | {seconds} | {} | {} | {} | {} | {} | {:.1} s |",
        injected.values().sum::<usize>(),
        tally.jobs,
        tally.receipts,
        tally.lost + tally.late + tally.misrouted,
        tally.duplicates,
        recovery.as_secs_f64()
    );
    assert!(
        tally.lost == 0 && tally.late == 0 && tally.misrouted == 0,
        "seed {seed}: {tally}\nexamples: {:#?}\nschedule:\n{}",
        tally.examples,
        Schedule(&episodes)
    );
}
