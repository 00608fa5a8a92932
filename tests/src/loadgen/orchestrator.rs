//! The generator's worker processes, seen from the orchestrator: how connections are spread over
//! processes and source addresses, and the line protocol that drives and reads them.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::protocol::Flavor;
use super::report::{Totals, WorkerReport};
use super::worker::WorkerSpec;

/// Connections per worker process: well under the 20,000 open files a process may hold, and
/// small enough that several single-threaded workers share the load.
pub(crate) const SLOTS_PER_WORKER: usize = 9_000;
/// Connections per source address: an address gives ~28k ephemeral ports.
const SLOTS_PER_SOURCE: usize = 4_500;

/// Who connects where: `groups[i]` is (the URLs a slot rotates over, how many users).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) flavor: Flavor,
    pub(crate) groups: Vec<(Vec<String>, usize)>,
    pub(crate) jwt_secret: Option<String>,
    pub(crate) ack: bool,
    pub(crate) user_prefix: String,
    pub(crate) connect_concurrency: usize,
    /// Subscribe every connection to this topic (Herald only).
    pub(crate) topic: Option<String>,
}

/// One worker process.
struct WorkerProcess {
    spec: WorkerSpec,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// All the worker processes of a run; killed when dropped.
pub(crate) struct Workers {
    workers: Vec<WorkerProcess>,
}

impl Workers {
    /// Starts the worker processes for `plan` (no connection opened yet). Users are numbered
    /// from 0 across groups in order, so the orchestrator knows who is where.
    pub(crate) fn spawn(plan: &Plan) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut workers = Vec::new();
        let mut first_user = 0;
        for (urls, users) in &plan.groups {
            let mut left = *users;
            while left > 0 {
                let slots = left.min(SLOTS_PER_WORKER);
                let index = workers.len();
                // Addresses 127.<1+index>.<n>.1: a range of its own for each worker.
                let sources = slots.div_ceil(SLOTS_PER_SOURCE).max(1);
                let source_ips = (0..sources).map(|n| Ipv4Addr::new(127, 1 + index as u8, n as u8, 1)).collect();
                let spec = WorkerSpec {
                    worker: index,
                    flavor: plan.flavor,
                    urls: urls.clone(),
                    user_prefix: plan.user_prefix.clone(),
                    first_user,
                    slots,
                    source_ips,
                    jwt_secret: plan.jwt_secret.clone(),
                    ack: plan.ack,
                    connect_concurrency: plan.connect_concurrency,
                    topic: plan.topic.clone(),
                };
                let mut child = Command::new(&exe)
                    .arg("worker")
                    .arg(serde_json::to_string(&spec)?)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .context("spawning a worker")?;
                let stdin = child.stdin.take().context("worker stdin")?;
                let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
                workers.push(WorkerProcess { spec, child, stdin, stdout });
                first_user += slots;
                left -= slots;
            }
        }
        Ok(Self { workers })
    }

    async fn send_all(&mut self, line: &str) -> anyhow::Result<()> {
        for w in &mut self.workers {
            w.stdin.write_all(format!("{line}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// Opens connections until `fraction` (0..=1) of every worker's slots are active.
    pub(crate) async fn activate(&mut self, fraction: f64) -> anyhow::Result<()> {
        for w in &mut self.workers {
            let n = (w.spec.slots as f64 * fraction).round() as usize;
            w.stdin.write_all(format!("active {n}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// From now on every new connection attempt (a reconnect, a retry) picks its URL at random
    /// by `weights` (URL, weight; a URL not named gets 0), as a load balancer picks a backend;
    /// connections open now stay where they are. All weights 0: back to going round the URLs.
    pub(crate) async fn route(&mut self, weights: &[(String, f64)]) -> anyhow::Result<()> {
        for w in &mut self.workers {
            let line = route_line(&w.spec.urls, weights);
            w.stdin.write_all(format!("{line}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// Users `first..first + count` (numbered as in [`Self::spawn`]) close their connections and
    /// stay offline for `away`, then connect again, as clients that go offline and come back.
    pub(crate) async fn away(&mut self, first: usize, count: usize, away: Duration) -> anyhow::Result<()> {
        let spans: Vec<(usize, usize)> = self.workers.iter().map(|w| (w.spec.first_user, w.spec.slots)).collect();
        for (index, local_first, n) in local_ranges(&spans, first, count) {
            let w = &mut self.workers[index];
            w.stdin.write_all(format!("away {local_first} {n} {}\n", away.as_millis()).as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// Slots that `activate(fraction)` opens, over all workers.
    pub(crate) fn slots_at(&self, fraction: f64) -> u64 {
        self.workers.iter().map(|w| (w.spec.slots as f64 * fraction).round() as u64).sum()
    }

    /// Starts a new measurement window: latency histograms and receive times cleared.
    pub(crate) async fn reset(&mut self) -> anyhow::Result<()> {
        self.send_all("reset").await
    }

    pub(crate) async fn reports(&mut self) -> anyhow::Result<Vec<WorkerReport>> {
        self.send_all("report").await?;
        let mut reports = Vec::new();
        for w in &mut self.workers {
            let line = tokio::time::timeout(Duration::from_secs(30), w.stdout.next_line())
                .await
                .context("worker did not report within 30 s")??
                .context("worker exited")?;
            reports.push(serde_json::from_str(&line)?);
        }
        Ok(reports)
    }

    pub(crate) async fn totals(&mut self) -> anyhow::Result<Totals> {
        Ok(Totals::of(&self.reports().await?))
    }

    /// Polls until `done(totals)` or `timeout`; returns the last totals and whether it was done.
    pub(crate) async fn wait_for(
        &mut self,
        timeout: Duration,
        poll: Duration,
        mut done: impl FnMut(&Totals) -> bool,
    ) -> anyhow::Result<(Totals, bool)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let totals = self.totals().await?;
            if done(&totals) {
                return Ok((totals, true));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((totals, false));
            }
            tokio::time::sleep(poll).await;
        }
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.send_all("quit").await;
        for w in &mut self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
        }
    }
}

/// The `route` command for a worker whose URLs are `urls`, in its own order.
fn route_line(urls: &[String], weights: &[(String, f64)]) -> String {
    let of = |url: &String| weights.iter().find(|(u, _)| u == url).map_or(0.0, |(_, w)| *w);
    urls.iter().fold("route".to_owned(), |line, url| format!("{line} {}", of(url)))
}

/// Where users `first..first + count` are: (worker, its first slot of them, how many), for
/// workers holding `spans` (their first user, their slots).
fn local_ranges(spans: &[(usize, usize)], first: usize, count: usize) -> Vec<(usize, usize, usize)> {
    let end = first + count;
    spans
        .iter()
        .enumerate()
        .filter_map(|(index, &(start, slots))| {
            let (from, to) = (first.max(start), end.min(start + slots));
            (from < to).then(|| (index, from - start, to - from))
        })
        .collect()
}

/// Users `first..first + count` of a plan, named as the workers name them.
pub(crate) fn user_names(prefix: &str, first: usize, count: usize) -> Vec<String> {
    (first..first + count).map(|i| format!("{prefix}{i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_of_users_is_split_over_the_workers_that_hold_them() {
        let spans = [(0, 600), (600, 600), (1_200, 100)];
        assert_eq!(local_ranges(&spans, 10, 5), vec![(0, 10, 5)]);
        assert_eq!(local_ranges(&spans, 550, 100), vec![(0, 550, 50), (1, 0, 50)]);
        assert_eq!(local_ranges(&spans, 1_150, 200), vec![(1, 550, 50), (2, 0, 100)], "clipped at the end");
        assert!(local_ranges(&spans, 2_000, 10).is_empty());
    }

    #[test]
    fn a_route_names_weights_in_each_worker_s_own_url_order() {
        let urls = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let weights = vec![("b".to_owned(), 0.25), ("c".to_owned(), 0.75)];
        assert_eq!(route_line(&urls(&["a", "b", "c"]), &weights), "route 0 0.25 0.75");
        assert_eq!(route_line(&urls(&["c", "a", "b"]), &weights), "route 0.75 0 0.25");
    }
}
