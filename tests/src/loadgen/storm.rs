//! What bounds a reconnect storm, read from outside the processes: the kernel's listen-queue and
//! SYN-retransmit counters over the connect phase (`/proc/net/netstat`, host-wide), and the CPU
//! seconds each process of the run used during the storm. The storm itself (who connects, what
//! must arrive) is `scenarios::storm_with`.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::{json, Value};

use super::metrics;
use super::scenarios::{round, Outcome};
use super::systems::Herald;

/// The `TcpExt` counters that say whether a connect had to be retried: a SYN or a handshake's
/// last ACK dropped because a listen queue was full (`ListenOverflows`, `ListenDrops`), and SYNs
/// the clients sent again (`TCPSynRetrans`). All host-wide: the kernel keeps no per-socket count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SynCounters {
    pub(crate) listen_overflows: u64,
    pub(crate) listen_drops: u64,
    pub(crate) syn_retrans: u64,
}

impl SynCounters {
    /// The counters now.
    pub(crate) fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
        Self::parse(&text).context("no TcpExt ListenOverflows/ListenDrops/TCPSynRetrans in /proc/net/netstat")
    }

    /// From the text of `/proc/net/netstat`: pairs of lines, names then values, each starting
    /// with its section (`TcpExt:`).
    fn parse(text: &str) -> Option<Self> {
        let tcp_ext = section(text, "TcpExt:")?;
        Some(Self {
            listen_overflows: *tcp_ext.get("ListenOverflows")?,
            listen_drops: *tcp_ext.get("ListenDrops")?,
            syn_retrans: *tcp_ext.get("TCPSynRetrans")?,
        })
    }

    /// The increase since `before` (0 where a counter went down, which only a reboot does).
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self {
            listen_overflows: self.listen_overflows.saturating_sub(before.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            syn_retrans: self.syn_retrans.saturating_sub(before.syn_retrans),
        }
    }

    /// As figures; named `host_` because the counters are the whole machine's.
    pub(crate) fn report(&self, out: &mut Outcome, phase: &str) {
        out.set(&format!("host_listen_overflows_in_{phase}"), self.listen_overflows);
        out.set(&format!("host_listen_drops_in_{phase}"), self.listen_drops);
        out.set(&format!("host_syn_retrans_in_{phase}"), self.syn_retrans);
    }
}

/// The counters of one section of `/proc/net/netstat` (e.g. `TcpExt:`) by name.
fn section(text: &str, prefix: &str) -> Option<BTreeMap<String, u64>> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?[prefix.len()..].split_whitespace();
    let values = lines.next()?[prefix.len()..].split_whitespace();
    Some(names.zip(values).filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?))).collect())
}

/// CPU seconds used so far by each process of a Herald run, by name: each gateway and
/// dispatcher, the store, NATS, Redis, and the generator's workers together (given, as the
/// workers report it themselves). A process not found reads 0.
pub(crate) fn cpu_by_process(h: &Herald, generator_cpu_secs: f64) -> BTreeMap<String, f64> {
    let mut cpu: BTreeMap<String, f64> =
        h.gateways.iter().chain(&h.dispatchers).map(|s| (s.name.clone(), s.cpu_secs())).collect();
    let (store, nats) = h.deps_cpu_secs();
    cpu.insert("store".into(), store);
    cpu.insert("nats".into(), nats);
    let redis = metrics::find_pid(&["redis-server", &format!("127.0.0.1:{}", h.redis_port())]);
    cpu.insert("redis".into(), redis.and_then(metrics::cpu_secs).unwrap_or(0.0));
    cpu.insert("generator".into(), generator_cpu_secs);
    cpu
}

/// The CPU each process used between two readings of [`cpu_by_process`].
pub(crate) fn cpu_used(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(name, a)| (name.clone(), (a - before.get(name).copied().unwrap_or(0.0)).max(0.0))).collect()
}

/// Figures for the CPU used over `secs` of storm: seconds by process, and the busiest process
/// with its share of one core (near 100 % it is what bounds the storm).
pub(crate) fn report_cpu(out: &mut Outcome, used: &BTreeMap<String, f64>, secs: f64) {
    let each: serde_json::Map<String, Value> = used.iter().map(|(n, s)| (n.clone(), json!(round(*s, 2)))).collect();
    out.set("storm_cpu_s_by_process", Value::Object(each));
    out.set("storm_cpu_s_total", round(used.values().sum(), 2));
    if let Some((name, s)) = used.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
        out.set("storm_busiest_process", name.as_str());
        out.set("storm_busiest_process_core_pct", (secs > 0.0).then(|| round(s / secs * 100.0, 0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans TCPOrigDataSent
TcpExt: 0 12 15 7 99
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 3
";

    #[test]
    fn the_syn_counters_are_read_from_the_tcp_ext_section() {
        let c = SynCounters::parse(NETSTAT);
        assert_eq!(c, Some(SynCounters { listen_overflows: 12, listen_drops: 15, syn_retrans: 7 }));
        assert_eq!(SynCounters::parse("IpExt: A\nIpExt: 1\n"), None, "no TcpExt section");
        assert_eq!(SynCounters::parse("TcpExt: ListenDrops\nTcpExt: 1\n"), None, "a counter missing");
    }

    #[test]
    fn deltas_never_go_below_zero() {
        let before = SynCounters { listen_overflows: 10, listen_drops: 10, syn_retrans: 5 };
        let after = SynCounters { listen_overflows: 13, listen_drops: 10, syn_retrans: 4 };
        assert_eq!(after.since(&before), SynCounters { listen_overflows: 3, listen_drops: 0, syn_retrans: 0 });
    }

    #[test]
    fn cpu_used_is_the_increase_per_process() {
        let before = BTreeMap::from([("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]);
        let after = BTreeMap::from([("a".to_owned(), 1.5), ("b".to_owned(), 2.0), ("c".to_owned(), 0.25)]);
        let used = cpu_used(&before, &after);
        assert_eq!(used, BTreeMap::from([("a".to_owned(), 0.5), ("b".to_owned(), 0.0), ("c".to_owned(), 0.25)]));
    }
}
