//! A seeded, randomized fault run: Herald as processes (3 gateways, 2 dispatchers) on real Redis,
//! a 3-node NATS JetStream cluster with Herald's streams on 3 replicas, and nx-27017 behind the
//! harness's proxy; a fleet of clients that follow proto/README.md (some slow readers, some
//! flapping, some offline for a long spell, some users with two devices on different gateways);
//! publishers that retry with the same id, of jobs with and without `id`, with one or several
//! recipients, and with a short TTL; and a nemesis that, at times drawn from the seed, alone and
//! overlapping, kills (-9), terminates, freezes and thaws any gateway or dispatcher, kills any
//! NATS node (the stream leader included) or restarts them all, restarts Redis empty or flushes
//! it, cuts the store off or slows it, stalls some clients' networks, and steps the wall clock
//! of one gateway or dispatcher (libfaketime) by 20 s.
//!
//! Afterwards the system heals and a checker holds what was published against the store and
//! the clients' own logs (`fleet::Tally`): every job reached every recipient's client, and its
//! receipt is `delivered` or `read`, or `expired` only where the TTL passed while no client of
//! the user was connected; no receipt is delivered that no client of its user acked; nothing
//! came after its expiry, to a user it was not addressed to, or with another payload.
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
use herald_tests::fleet::{self, Behaviour, Fleet, Publisher, Stream, Tally};
use herald_tests::services::Stack;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const GATEWAYS: usize = 3;
const DISPATCHERS: usize = 2;
const NATS_NODES: usize = 3;
const USERS: usize = 60;
/// The last users: offline for the whole run, connected only at the end.
const OFFLINE: usize = 10;
/// The first users: slow readers, then flapping ones, then users with a second device.
const SLOW: usize = 5;
const FLAPPING: usize = 5;
const TWO_DEVICES: usize = 10;
/// Clients whose network a stall freezes.
const STALLED: usize = 4;
/// Jobs per second, per publisher (four of them).
const RATE: u32 = 20;
/// The short TTL: longer than the longest outage the nemesis can cause, so that only a user
/// without a connection lets a message expire. A fault lasts up to 5 s, but JetStream can take
/// far longer to elect leaders again: seed 3 restarted the whole NATS cluster and then killed two
/// nodes in turn while it recovered, and the streams had no leader for 50 s; with a 30 s TTL,
/// 694 messages expired in JetStream while their users were connected.
const SHORT_TTL_SECS: u64 = 90;
/// How far a clock step moves a service's wall clock.
const CLOCK_STEP_SECS: i64 = 20;
const SETTLE: Duration = Duration::from_secs(120);

/// A Herald process the nemesis acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Gateway(usize),
    Dispatcher(usize),
}

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
    KillNatsNode(usize),
    /// Kills whichever node leads the jobs stream at that moment.
    KillNatsLeader,
    CutStore,
    /// Every store reply held back 300 ms.
    SlowStore,
    /// Freezes the networks of [`STALLED`] clients, chosen by this number.
    StallClients(u64),
    /// Steps a service's wall clock [`CLOCK_STEP_SECS`] ahead (or behind), and back at the end.
    StepClock(Service, bool),
}

impl Fault {
    /// Any fault, with its target, drawn from `rng`.
    fn draw(rng: &mut StdRng) -> Self {
        let g = rng.random_range(0..GATEWAYS);
        let d = rng.random_range(0..DISPATCHERS);
        let n = rng.random_range(0..NATS_NODES);
        match rng.random_range(0..16) {
            0 => Fault::KillGateway(g),
            1 => Fault::TermGateway(g),
            2 => Fault::FreezeGateway(g),
            3 => Fault::KillDispatcher(d),
            4 => Fault::TermDispatcher(d),
            5 => Fault::FreezeDispatcher(d),
            6 => Fault::RestartRedis,
            7 => Fault::FlushRedis,
            8 => Fault::RestartNats,
            9 => Fault::KillNatsNode(n),
            10 => Fault::KillNatsLeader,
            11 => Fault::CutStore,
            12 => Fault::SlowStore,
            13 => Fault::StallClients(rng.random()),
            14 => Fault::StepClock(Service::Gateway(g), rng.random()),
            _ => Fault::StepClock(Service::Dispatcher(d), rng.random()),
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
            Fault::RestartNats => "nats restart (all nodes)",
            Fault::KillNatsNode(_) => "nats node kill -9",
            Fault::KillNatsLeader => "nats stream leader kill -9",
            Fault::CutStore => "store cut off",
            Fault::SlowStore => "store slowed",
            Fault::StallClients(_) => "client networks stalled",
            Fault::StepClock(Service::Gateway(_), _) => "gateway clock step",
            Fault::StepClock(Service::Dispatcher(_), _) => "dispatcher clock step",
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
    /// The users a stall may pick (the connected ones).
    online: Vec<String>,
    /// Each process's libfaketime offset file, by service; it outlives restarts.
    clocks: Clocks,
    /// The users each open stall froze.
    stalls: Stalls,
    /// The NATS node the leader kill took down, to bring back.
    leader_killed: Option<usize>,
    nats_down: [bool; NATS_NODES],
}

/// The wall clocks the nemesis can step: each Herald process runs under libfaketime and reads
/// its offset from a file of its own (re-read every second). Monotonic time is left alone.
struct Clocks {
    dir: tempfile::TempDir,
    library: std::path::PathBuf,
}

impl Clocks {
    fn new() -> Self {
        let library = std::env::var_os("HERALD_TEST_LIBFAKETIME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into());
        assert!(
            library.exists(),
            "{} is missing: `make deps` installs Debian's libfaketime (or set HERALD_TEST_LIBFAKETIME)",
            library.display()
        );
        let clocks = Self { dir: tempfile::tempdir().unwrap(), library };
        for i in 0..GATEWAYS {
            clocks.set(Service::Gateway(i), 0);
        }
        for i in 0..DISPATCHERS {
            clocks.set(Service::Dispatcher(i), 0);
        }
        clocks
    }

    fn file(&self, service: Service) -> std::path::PathBuf {
        match service {
            Service::Gateway(i) => self.dir.path().join(format!("gateway-{i}")),
            Service::Dispatcher(i) => self.dir.path().join(format!("dispatcher-{i}")),
        }
    }

    fn set(&self, service: Service, offset_secs: i64) {
        std::fs::write(self.file(service), format!("{offset_secs:+}\n")).unwrap();
    }

    /// The environment that puts a process under its clock file.
    fn env(&self, service: Service) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), self.file(service).display().to_string()),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }
}

/// How long a restarted process may take to become ready: longer than JetStream may stay
/// without leaders after overlapping NATS faults (50 s seen), during which start-up waits.
const START_WITHIN: Duration = Duration::from_secs(180);

impl System {
    async fn start_gateway(&self, i: usize) -> Process {
        let env = self.clocks.env(Service::Gateway(i));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        until_started("gateway", || self.cluster.gateway_process_with(&env, None)).await
    }

    async fn start_dispatcher(&self, i: usize) -> Process {
        let env = self.clocks.env(Service::Dispatcher(i));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        until_started("dispatcher", || self.cluster.dispatcher_process_with(&env, None)).await
    }
}

impl System {
    /// Starts a service's process again without waiting for it (as an orchestrator would): it
    /// may wait a long time for its dependencies, and the heals that would bring them back must
    /// not wait behind it.
    fn respawn(&self, service: Service) -> Process {
        let env = self.clocks.env(service);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let binary = match service {
            Service::Gateway(_) => "herald-gateway",
            Service::Dispatcher(_) => "herald-dispatcher",
        };
        self.cluster.spawn_process(binary, &env).unwrap()
    }

    /// Restarts every process that exited by itself (one that gave up waiting for a dependency
    /// at start-up), as an orchestrator restarts a crashed pod. Frozen ones are left alone.
    fn supervise(&mut self) {
        for i in 0..GATEWAYS {
            if self.gateways[i].as_mut().is_some_and(|p| p.exited()) {
                self.gateways[i] = Some(self.respawn(Service::Gateway(i)));
                self.fleet.set_gateways(self.gateway_addrs());
            }
        }
        for i in 0..DISPATCHERS {
            if self.dispatchers[i].as_mut().is_some_and(|p| p.exited()) {
                self.dispatchers[i] = Some(self.respawn(Service::Dispatcher(i)));
            }
        }
    }

    /// Once every fault is healed: until every process is up and ready.
    async fn wait_all_ready(&mut self) {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            self.supervise();
            let addrs: Vec<_> = self.gateways.iter().chain(&self.dispatchers).flatten().map(|p| p.internal).collect();
            let mut ready = true;
            for addr in addrs {
                ready &= self.cluster.wait_ready(addr).await.is_ok();
            }
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                let mut why = Vec::new();
                for addr in self.gateways.iter().chain(&self.dispatchers).flatten().map(|p| p.internal) {
                    let body = match reqwest::get(format!("http://{addr}/readyz")).await {
                        Ok(r) => r.text().await.unwrap_or_default(),
                        Err(e) => format!("{e}"),
                    };
                    why.push(format!("{addr}: {body}"));
                }
                panic!("processes not ready within {START_WITHIN:?} of the last heal: {why:#?}");
            }
        }
    }
}

/// Starts a process again and again (each try waits 20 s for `/readyz`) until one is ready.
async fn until_started<F, Fut>(what: &str, start: F) -> Process
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Process>>,
{
    let deadline = Instant::now() + START_WITHIN;
    loop {
        match start().await {
            Ok(process) => return process,
            Err(e) if Instant::now() < deadline => println!("chaos: {what} not ready yet, starting again: {e:#}"),
            Err(e) => panic!("{what} not ready within {START_WITHIN:?}: {e:#}"),
        }
    }
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
            Fault::KillNatsNode(i) => self.kill_nats_node(i).await,
            Fault::KillNatsLeader => {
                let stream = self.cluster.stack.names().jobs_stream();
                match self.cluster.stack.nats.stream_leader(&stream).await {
                    Some(leader) if self.kill_nats_node(leader).await => {
                        self.leader_killed = Some(leader);
                        true
                    }
                    _ => false,
                }
            }
            Fault::CutStore => {
                self.cluster.stack.mongo_proxy.cut().await;
                true
            }
            Fault::SlowStore => {
                self.cluster.stack.mongo_proxy.delay_replies(Duration::from_millis(300));
                true
            }
            Fault::StallClients(pick) => {
                let mut rng = StdRng::seed_from_u64(pick);
                let users: Vec<String> =
                    (0..STALLED).map(|_| self.online[rng.random_range(0..self.online.len())].clone()).collect();
                self.fleet.stall(&users, Duration::from_secs(3600));
                self.stalls.open(pick, users);
                true
            }
            Fault::StepClock(service, ahead) => {
                self.clocks.set(service, if ahead { CLOCK_STEP_SECS } else { -CLOCK_STEP_SECS });
                true
            }
        }
    }

    async fn kill_nats_node(&mut self, i: usize) -> bool {
        if self.nats_down[i] {
            return false;
        }
        self.cluster.stack.nats.kill_node(i).await;
        self.nats_down[i] = true;
        true
    }

    async fn restart_nats_node(&mut self, i: usize) {
        if self.nats_down[i] {
            self.cluster.stack.nats.restart_node(i).await.unwrap();
            self.nats_down[i] = false;
        }
    }

    /// Undoes a fault: restarts what is down, thaws what is frozen, restores what was cut.
    async fn heal(&mut self, fault: Fault) {
        match fault {
            Fault::KillGateway(i) | Fault::TermGateway(i) => {
                if self.gateways[i].is_none() {
                    self.gateways[i] = Some(self.respawn(Service::Gateway(i)));
                    self.fleet.set_gateways(self.gateway_addrs());
                }
            }
            Fault::KillDispatcher(i) | Fault::TermDispatcher(i) => {
                if self.dispatchers[i].is_none() {
                    self.dispatchers[i] = Some(self.respawn(Service::Dispatcher(i)));
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
            Fault::RestartNats => {
                self.cluster.stack.nats.restart().await.unwrap();
                self.nats_down = [false; NATS_NODES];
            }
            Fault::KillNatsNode(i) => self.restart_nats_node(i).await,
            Fault::KillNatsLeader => {
                if let Some(i) = self.leader_killed.take() {
                    self.restart_nats_node(i).await;
                }
            }
            Fault::CutStore => self.cluster.stack.mongo_proxy.restore(),
            Fault::SlowStore => self.cluster.stack.mongo_proxy.delay_replies(Duration::ZERO),
            Fault::StallClients(pick) => {
                let users = self.stalls.close(pick);
                self.fleet.stall(&users, Duration::ZERO);
            }
            Fault::StepClock(service, _) => self.clocks.set(service, 0),
        }
    }
}

/// The stalls in force, each with the users it froze. Stalls overlap, and may pick the same user:
/// a heal lifts only the users no other open stall holds. (Finding 7: with one list for the latest
/// stall, two overlapping stalls left the first one's users frozen for the rest of the run, and
/// their messages undelivered.)
#[derive(Debug, Default)]
struct Stalls(Vec<(u64, Vec<String>)>);

impl Stalls {
    fn open(&mut self, pick: u64, users: Vec<String>) {
        self.0.push((pick, users));
    }

    /// Ends the stall `pick`; returns the users to lift.
    fn close(&mut self, pick: u64) -> Vec<String> {
        let Some(at) = self.0.iter().position(|(p, _)| *p == pick) else { return Vec::new() };
        let (_, users) = self.0.remove(at);
        users.into_iter().filter(|u| !self.0.iter().any(|(_, held)| held.contains(u))).collect()
    }
}

#[test]
fn overlapping_stalls_each_lift_their_own_users() {
    let names = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
    for first_healed in [1, 2] {
        let mut stalls = Stalls::default();
        stalls.open(1, names(&["a", "b"]));
        stalls.open(2, names(&["b", "c"]));
        let second_healed = 3 - first_healed;
        let mut lifted = stalls.close(first_healed);
        assert!(!lifted.contains(&"b".to_owned()), "b is still held by the other stall");
        lifted.extend(stalls.close(second_healed));
        lifted.sort();
        assert_eq!(lifted, names(&["a", "b", "c"]), "every user is lifted once both stalls end");
        assert!(stalls.close(first_healed).is_empty(), "a stall ends once");
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
    let cluster = Cluster::new(Stack::start_with_nats_nodes(NATS_NODES).await.unwrap(), options).await.unwrap();
    let users = fleet::users("chaos", USERS);
    let (online, offline) = users.split_at(USERS - OFFLINE);
    let mut system = System {
        cluster,
        gateways: Vec::new(),
        dispatchers: Vec::new(),
        fleet: Fleet::new(Vec::new()),
        online: online.to_vec(),
        clocks: Clocks::new(),
        stalls: Stalls::default(),
        leader_killed: None,
        nats_down: [false; NATS_NODES],
    };
    for i in 0..GATEWAYS {
        let gateway = system.start_gateway(i).await;
        system.gateways.push(Some(gateway));
    }
    for i in 0..DISPATCHERS {
        let dispatcher = system.start_dispatcher(i).await;
        system.dispatchers.push(Some(dispatcher));
    }
    system.fleet.set_gateways(system.gateway_addrs());
    let (slow, rest) = online.split_at(SLOW);
    let (flapping, plain) = rest.split_at(FLAPPING);
    let within = Duration::from_secs(60);
    let fleet = &system.fleet;
    fleet
        .connect_as(slow, Behaviour { read_delay: Some(Duration::from_millis(30)), ..Behaviour::default() }, within)
        .await
        .unwrap();
    fleet
        .connect_as(flapping, Behaviour { flap_within: Some(Duration::from_secs(8)), ..Behaviour::default() }, within)
        .await
        .unwrap();
    fleet.connect(plain, within).await.unwrap();
    // A second device each, on the next gateway along.
    fleet.connect(&plain[..TWO_DEVICES], within).await.unwrap();

    let count = RATE as usize * seconds as usize;
    let publish = |run: &str, recipients_per_job, ttl_secs, with_ids| Stream {
        run: run.to_owned(),
        users: users.clone(),
        recipients_per_job,
        count,
        rate: RATE,
        ttl_secs,
        with_ids,
    };
    let nats_url = system.cluster.stack.nats.url();
    let names = system.cluster.stack.names();
    let publishers = [
        Publisher::start(&nats_url, names.publish_subject("chaos-1"), publish("chaos1", 1, None, true)).await.unwrap(),
        Publisher::start(&nats_url, names.publish_subject("chaos-3"), publish("chaos3", 3, None, true)).await.unwrap(),
        Publisher::start(&nats_url, names.publish_subject("chaos-noid"), publish("noid", 2, None, false))
            .await
            .unwrap(),
        Publisher::start(&nats_url, names.publish_subject("chaos-ttl"), publish("ttl", 1, Some(SHORT_TTL_SECS), true))
            .await
            .unwrap(),
    ];

    // The nemesis: each episode applied at its time and healed when it ends; they overlap.
    let start = Instant::now();
    let mut open: Vec<(Instant, Fault)> = Vec::new();
    let mut injected: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    // When each applied fault was healed, for its time to heal.
    let mut heals: Vec<(Fault, Instant)> = Vec::new();
    for episode in &episodes {
        loop {
            open.sort_by_key(|(until, _)| *until);
            let next_heal = open.first().map(|(until, _)| *until);
            match next_heal {
                Some(until) if until <= start + episode.at => {
                    tokio::time::sleep_until(until).await;
                    let (_, fault) = open.remove(0);
                    system.heal(fault).await;
                    heals.push((fault, Instant::now()));
                }
                _ => break,
            }
        }
        tokio::time::sleep_until(start + episode.at).await;
        system.supervise();
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
        heals.push((fault, Instant::now()));
    }
    let healed = Instant::now();
    system.wait_all_ready().await;

    // The checker: everything published reached every recipient, once the system has healed.
    let mut jobs = Vec::new();
    for publisher in &publishers {
        jobs.extend(publisher.finish(SETTLE).await.unwrap());
    }
    let offline: BTreeSet<String> = offline.iter().cloned().collect();
    let db = system.cluster.db.clone();
    let fail = |what: &str, e: anyhow::Error| -> ! {
        panic!("seed {seed}: {what}: {e:#}\nschedule:\n{}", Schedule(&episodes))
    };
    let recovery = match fleet::wait_delivered_or_expired(&db, &mut jobs, &offline, healed, SETTLE).await {
        Ok(recovery) => recovery,
        Err(e) => {
            explain_pending(&db, &system.fleet, &offline).await;
            fail("not all delivered", e)
        }
    };
    let late: Vec<String> = offline.iter().cloned().collect();
    system.fleet.connect(&late, Duration::from_secs(60)).await.unwrap();
    fleet::wait_delivered_or_expired(&db, &mut jobs, &BTreeSet::new(), Instant::now(), SETTLE)
        .await
        .unwrap_or_else(|e| fail("offline users' backlog", e));
    let tally = Tally::take(&format!("chaos seed {seed}"), &db, &jobs, &system.fleet, &BTreeSet::new(), recovery)
        .await
        .unwrap();
    println!("chaos: faults injected by kind: {injected:?}");
    let delivered_at = fleet::delivered_at(&db).await.unwrap();
    for (fault, at) in &heals {
        let heal = fleet::time_to_heal(&jobs, &delivered_at, &offline, *at);
        println!(
            "chaos: heal {:<28} +{:>6.1}s: {:.1} s",
            fault.kind(),
            (*at - start).as_secs_f64(),
            heal.as_secs_f64()
        );
    }
    println!("chaos: {tally}");
    println!(
        "chaos table row: | {seed} | {seconds} | {} | {} | {} | {} | {} | {} | {:.1} s |",
        injected.values().sum::<usize>(),
        tally.jobs,
        tally.receipts,
        tally.expired_offline,
        tally.violations(),
        tally.duplicates,
        recovery.as_secs_f64()
    );
    assert!(
        tally.violations() == 0,
        "seed {seed}: {tally}\nexamples: {:#?}\nschedule:\n{}",
        tally.examples,
        Schedule(&episodes)
    );
}

/// For a run that did not heal: what the store and the clients say of a few receipts still
/// `pending` for users who were online, so that the failure can be understood from its output.
async fn explain_pending(db: &mongodb::Database, fleet: &Fleet, offline: &BTreeSet<String>) {
    use futures::TryStreamExt;
    use herald_shared::naming::collections;
    use mongodb::bson::{doc, Document};
    let Ok(cursor) = db.collection::<Document>(collections::RECEIPTS).find(doc! { "state": "pending" }).await else {
        return;
    };
    let Ok(pending) = cursor.try_collect::<Vec<Document>>().await else { return };
    let logs = fleet.logs();
    let now_ms = herald_shared::now_ms() as i64;
    let now = Instant::now();
    let stuck: Vec<&Document> =
        pending.iter().filter(|d| d.get_str("user").is_ok_and(|u| !offline.contains(u))).take(8).collect();
    println!("chaos: {} receipts pending, of users online: {}", pending.len(), stuck.len());
    for d in stuck {
        let (id, user) = (d.get_str("message_id").unwrap_or("?"), d.get_str("user").unwrap_or("?"));
        let retry = d.get_i64("next_retry_at_ms").ok().map(|t| (t - now_ms) as f64 / 1000.0);
        let log = logs.get(user);
        let spans: Vec<String> = log
            .map(|l| {
                l.connected
                    .iter()
                    .map(|(s, e)| {
                        let ago = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
                        format!("{:.1}..{:?}", ago(*s), e.map(ago))
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "chaos: pending {id}/{user}: next retry in {retry:?} s, seq {:?}; client received it {:?} times, acked it: {:?}; closes {:?}; connections (s ago) {spans:?}",
            d.get_i64("seq").ok(),
            log.map(|l| l.received.get(id).copied().unwrap_or(0)),
            log.map(|l| l.acked.contains(id)),
            log.map(|l| l.closes.clone()),
        );
    }
}
