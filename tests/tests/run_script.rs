//! `make run` (scripts/run.sh) as an operator uses it, on ports of its own: it stops every process
//! it started however it is ended (Ctrl-C through a pipe, a closed terminal, a kill -9 of the
//! script itself), and a process that dies meanwhile is reported and started again while the rest
//! keeps running. A leftover redis, nats-server or nx-27017 would make the next `make run` fail on
//! a taken port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_tests::bin_path;
use herald_tests::services::free_port;

/// Up to this long for everything to start (nx-27017, a dispatcher waiting for its streams).
const STARTUP: Duration = Duration::from_secs(120);
/// Up to this long for everything to stop: Herald drains first (each phase is bounded by 15 s in
/// the script), then the dependencies; the guard waits 10 s before it kills.
const SHUTDOWN: Duration = Duration::from_secs(45);

/// One whole system at a time: three at once would only slow each other's start on two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

fn alive(pid: u32) -> bool {
    Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn signal(target: &str, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), "--", target]).status().unwrap();
    assert!(status.success(), "kill -{signal} {target}");
}

fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One `make run` on free ports, with its data in a directory of its own.
struct Run {
    dir: tempfile::TempDir,
    /// Every port it serves: redis, nats, mongo, the dispatcher, two gateways, the demo page, then
    /// the internal listeners of the dispatcher and the two gateways.
    ports: Vec<u16>,
    env: Vec<(&'static str, String)>,
}

impl Run {
    fn new() -> Self {
        let [redis, nats, mongo, dispatcher, gw1, gw2, demo, dispatcher_internal, gw1_internal, gw2_internal] =
            std::array::from_fn(|_| free_port().unwrap());
        let target = bin_path("herald-gateway").unwrap().parent().map(Path::to_path_buf).unwrap();
        let env = vec![
            ("HERALD_JWT_SECRET", "run-test-secret-0123456789".to_owned()),
            ("HERALD_ADMIN_TOKEN", "run-test-admin-token-0123456789".to_owned()),
            ("HERALD_REDIS_URL", format!("redis://127.0.0.1:{redis}")),
            ("HERALD_NATS_URL", format!("nats://127.0.0.1:{nats}")),
            ("HERALD_MONGODB_URI", format!("mongodb://127.0.0.1:{mongo}")),
            ("HERALD_RUN_DISPATCHER", format!("127.0.0.1:{dispatcher}")),
            ("HERALD_RUN_GATEWAYS", format!("127.0.0.1:{gw1},127.0.0.1:{gw2}")),
            ("HERALD_RUN_DEMO", format!("127.0.0.1:{demo}")),
            ("HERALD_RUN_DISPATCHER_INTERNAL", format!("127.0.0.1:{dispatcher_internal}")),
            ("HERALD_RUN_GATEWAYS_INTERNAL", format!("127.0.0.1:{gw1_internal},127.0.0.1:{gw2_internal}")),
            ("HERALD_RUN_SKIP_BUILD", "1".to_owned()),
            ("HERALD_RUN_TARGET", target.display().to_string()),
        ];
        let internal = [dispatcher_internal, gw1_internal, gw2_internal];
        let ports = [vec![redis, nats, mongo, dispatcher, gw1, gw2, demo], internal.to_vec()].concat();
        Self { dir: tempfile::tempdir().unwrap(), ports, env }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out.txt")
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.out()).unwrap_or_default()
    }

    /// Starts `shell` (a bash command line that runs the script, `$OUT` naming the output file)
    /// as the leader of a session of its own, as a terminal's shell would start `make run`.
    fn spawn(&self, shell: &str) -> Child {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut command = Command::new("setsid");
        command
            .args(["bash", "-c", shell])
            .current_dir(root)
            .env_remove("MONGODB_URI")
            .env("HERALD_RUN_DATA", self.data())
            .env("OUT", self.out())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command.spawn().unwrap()
    }

    /// Waits for the script to say it is running; fails at once if `leader` has exited.
    fn wait_running(&self, leader: &mut Child) {
        wait_until(STARTUP, "make run says it is running", || {
            if let Ok(Some(status)) = leader.try_wait() {
                panic!("make run exited ({status}) before it was running: {}", self.output());
            }
            self.output().contains("Herald is running")
        });
        for port in &self.ports {
            assert!(answers(*port), "port {port} does not answer: {}", self.output());
        }
    }

    /// The processes the script lists as running, by name.
    fn pids(&self) -> Vec<(String, u32)> {
        let list = std::fs::read_to_string(self.data().join("run.pids")).unwrap_or_default();
        list.lines()
            .filter_map(|line| {
                let (name, pid) = line.split_once(' ')?;
                Some((name.to_owned(), pid.parse().ok()?))
            })
            .collect()
    }

    fn pid_of(&self, name: &str) -> Option<u32> {
        self.pids().into_iter().find(|(n, _)| n == name).map(|(_, pid)| pid)
    }

    /// Everything it started has stopped: no process left, no port held.
    fn assert_all_stopped(&self, pids: &[(String, u32)], how: &str) {
        wait_until(SHUTDOWN, &format!("every process stopped after {how}"), || {
            pids.iter().all(|(_, pid)| !alive(*pid)) && self.ports.iter().all(|p| !answers(*p))
        });
    }
}

impl Drop for Run {
    /// A failed test leaves nothing running either.
    fn drop(&mut self) {
        for (_, pid) in self.pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

/// `make run | tee log`, then Ctrl-C (SIGINT to the whole foreground process group, tee included);
/// before that, a gateway killed by hand is reported and started again, and the rest stays up.
#[test]
fn ctrl_c_through_a_pipe_stops_everything_and_a_dead_gateway_is_restarted_meanwhile() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = Run::new();
    let mut leader = run.spawn(r#"scripts/run.sh 2>&1 | tee "$OUT""#);
    run.wait_running(&mut leader);
    let started = run.pids();
    let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["redis", "nats", "mongo", "dispatcher", "gateway-1", "gateway-2", "demo"]);

    let gateway = run.pid_of("gateway-1").unwrap();
    signal(&gateway.to_string(), "KILL");
    wait_until(Duration::from_secs(30), "gateway-1 started again", || {
        run.pid_of("gateway-1").is_some_and(|pid| pid != gateway) && answers(run.ports[4])
    });
    let output = run.output();
    assert!(output.contains("gateway-1 exited (status 137"), "{output}");
    assert!(output.contains("starting it again"), "{output}");
    for (name, pid) in started.iter().filter(|(n, _)| n != "gateway-1") {
        assert!(alive(*pid), "{name} went down with the gateway");
    }

    let running = run.pids();
    signal(&format!("-{}", leader.id()), "INT");
    run.assert_all_stopped(&running, "Ctrl-C through a pipe");
    let _ = leader.wait();
}

/// The terminal closes (its emulator is killed): SIGHUP, and every later write to it fails.
#[test]
fn a_closed_terminal_stops_everything() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = Run::new();
    // `script` runs the script on a pseudo-terminal of its own and copies what it writes to $OUT;
    // killing `script` closes the terminal under it.
    let mut terminal = run.spawn(r#"exec script --quiet --flush --command scripts/run.sh "$OUT""#);
    run.wait_running(&mut terminal);
    let running = run.pids();
    signal(&terminal.id().to_string(), "KILL");
    run.assert_all_stopped(&running, "the terminal closed");
    let _ = terminal.wait();
}

/// The script itself is killed outright and cannot clean up: its guard does.
#[test]
fn a_killed_script_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = Run::new();
    let mut script = run.spawn(r#"exec scripts/run.sh >"$OUT" 2>&1"#);
    run.wait_running(&mut script);
    let running = run.pids();
    signal(&script.id().to_string(), "KILL");
    run.assert_all_stopped(&running, "kill -9 of the script");
    let _ = script.wait();
}
