//! What the servers cost and do, read from outside them: resident memory and CPU time from
//! `/proc`, Redis commands from `INFO commandstats`, and counters a Herald process publishes on
//! its `/metrics` (read as any Prometheus scraper would). Nothing here changes what is measured.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resident set size of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set size of a process (`VmHWM`), KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time a process has used, seconds.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_secs(&stat)
}

/// Fields 14 and 15 of `/proc/<pid>/stat` (utime, stime) in clock ticks, which are 1/100 s on
/// Linux on every architecture this runs on (`getconf CLK_TCK`).
fn parse_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The process whose command line contains every one of `needles` (e.g. a dependency the harness
/// started on a known port), if exactly one does.
pub(crate) fn find_pid(needles: &[&str]) -> Option<u32> {
    let mut found = std::fs::read_dir("/proc").ok()?.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        needles.iter().all(|n| cmdline.contains(n)).then_some(pid)
    });
    let pid = found.next()?;
    found.next().is_none().then_some(pid)
}

/// Calls of every Redis command since start (from `INFO commandstats`), minus `INFO` itself, so
/// that measuring does not show up in what is measured.
pub(crate) async fn redis_commands(port: u16) -> anyhow::Result<u64> {
    Ok(redis_commandstats(port).await?.iter().filter(|(name, _)| name.as_str() != "info").map(|(_, n)| n).sum())
}

pub(crate) async fn redis_commandstats(port: u16) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"INFO commandstats\r\n").await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    // A bulk string: `$<len>\r\n<text>\r\n`.
    loop {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "redis closed the connection mid-reply");
        reply.extend_from_slice(&buf[..n]);
        if let Some(end) = reply.iter().position(|&b| b == b'\n') {
            let len: usize = std::str::from_utf8(&reply[1..end])?.trim().parse()?;
            if reply.len() >= end + 1 + len {
                return Ok(parse_commandstats(std::str::from_utf8(&reply[end + 1..end + 1 + len])?));
            }
        }
    }
}

/// The value of the unlabelled counter (or integer gauge) `name` on the Prometheus text page at
/// `http://addr/metrics`.
pub(crate) async fn prometheus_counter(http: &reqwest::Client, addr: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let text = prometheus_page(http, addr).await?;
    counter_value(&text, name).with_context(|| format!("{name} not on http://{addr}/metrics"))
}

/// The Prometheus text page at `http://addr/metrics`.
pub(crate) async fn prometheus_page(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<String> {
    Ok(http.get(format!("http://{addr}/metrics")).send().await?.error_for_status()?.text().await?)
}

/// The sample line `<name> <value>` of a Prometheus text page (comments and other metrics,
/// including those whose name merely starts with `name`, skipped). A labelled series is named
/// with its labels as the page writes them: `name{label="value",...}`.
pub(crate) fn counter_value(text: &str, name: &str) -> Option<u64> {
    // Counters are integers, but the format allows `1e+06`.
    sample_value(text, name).map(|v| v as u64)
}

/// As [`counter_value`], for a sample that is not a whole number (e.g. a histogram's `_sum`).
pub(crate) fn sample_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        if metric != name {
            return None;
        }
        value.trim().parse::<f64>().ok()
    })
}

/// The cumulative buckets (upper bound `le`, count) of the histogram series `name{labels}` on a
/// Prometheus text page, in the page's order (rising `le`, `+Inf` last). `labels` is how the
/// page writes the series' other labels, e.g. `stage="linger"`, or empty.
pub(crate) fn histogram_buckets(text: &str, name: &str, labels: &str) -> Vec<(f64, u64)> {
    let prefix = match labels {
        "" => format!("{name}_bucket{{le=\""),
        labels => format!("{name}_bucket{{{labels},le=\""),
    };
    text.lines()
        .filter_map(|line| {
            let (le, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The `q` quantile (0..=1) of what a Prometheus histogram observed between two scrapes of it,
/// `before` and `after` (as [`histogram_buckets`] reads them), interpolated linearly within the
/// bucket it falls in, as PromQL's `histogram_quantile` does; in the `+Inf` bucket, the highest
/// finite bound. None if nothing was observed in between, or the scrapes do not match (the
/// process restarted or the buckets differ).
pub(crate) fn quantile_between(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let same_buckets =
        before.is_empty() || (before.len() == after.len() && before.iter().zip(after).all(|(b, a)| b.0 == a.0));
    if !same_buckets {
        return None;
    }
    let observed: Vec<(f64, u64)> = after
        .iter()
        .enumerate()
        .map(|(i, &(le, count))| (le, count.checked_sub(before.get(i).map_or(0, |b| b.1))))
        .map(|(le, delta)| delta.map(|d| (le, d)))
        .collect::<Option<_>>()?;
    let total = observed.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, count) in &observed {
        if count as f64 >= rank && count > below {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below as f64) / (count - below) as f64);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_commandstats_parse() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_cpu_secs(stat), Some(3.0));
        let info =
            "# Commandstats\r\ncmdstat_zadd:calls=12,usec=40,usec_per_call=3.3\r\ncmdstat_info:calls=3,usec=1\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats.get("zadd"), Some(&12));
        assert_eq!(stats.get("info"), Some(&3));
        assert!(rss_kib(std::process::id()).unwrap_or(0) > 0);
        assert!(cpu_secs(std::process::id()).is_some());
    }

    #[test]
    fn a_counter_is_read_by_its_exact_name() {
        let page = "# HELP herald_dispatcher_resent_total Notifications sent again\n\
                    # TYPE herald_dispatcher_resent_total counter\n\
                    herald_dispatcher_resent_total_extra 7\n\
                    herald_dispatcher_resent_total 1234\n\
                    herald_dispatcher_big_total 1e+06\n";
        assert_eq!(counter_value(page, "herald_dispatcher_resent_total"), Some(1234));
        assert_eq!(counter_value(page, "herald_dispatcher_big_total"), Some(1_000_000));
        assert_eq!(counter_value(page, "herald_dispatcher_missing_total"), None);
        let labelled = "herald_dependency_seconds_count{dependency=\"mongodb\",op=\"pending_receipts\"} 42\n\
                        herald_dependency_seconds_count{dependency=\"mongodb\",op=\"pending_keys\"} 7\n";
        assert_eq!(
            counter_value(labelled, r#"herald_dependency_seconds_count{dependency="mongodb",op="pending_receipts"}"#),
            Some(42)
        );
        assert_eq!(sample_value("herald_x_seconds_sum 0.25\n", "herald_x_seconds_sum"), Some(0.25));
    }

    #[test]
    fn a_quantile_is_read_from_the_difference_of_two_scrapes() {
        let page = |counts: [u64; 4]| {
            format!(
                "# TYPE s histogram\n\
                 s_bucket{{stage=\"linger\",le=\"0.01\"}} {}\n\
                 s_bucket{{stage=\"linger\",le=\"0.02\"}} {}\n\
                 s_bucket{{stage=\"linger\",le=\"0.05\"}} {}\n\
                 s_bucket{{stage=\"linger\",le=\"+Inf\"}} {}\n\
                 s_bucket{{stage=\"store\",le=\"0.01\"}} 999\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = histogram_buckets(&page([10, 10, 10, 10]), "s", r#"stage="linger""#);
        assert_eq!(before, [(0.01, 10), (0.02, 10), (0.05, 10), (f64::INFINITY, 10)]);
        // In between: 50 observations up to 10 ms, 40 in (10, 20] ms, 9 in (20, 50] ms, 1 above.
        let after = histogram_buckets(&page([60, 100, 109, 110]), "s", r#"stage="linger""#);
        let q = |q| quantile_between(&before, &after, q).map(|s| (s * 1e6).round() / 1e3);
        assert_eq!(q(0.5), Some(10.0));
        assert_eq!(q(0.7), Some(15.0));
        assert_eq!(q(0.99), Some(50.0));
        assert_eq!(q(1.0), Some(50.0));
        assert_eq!(quantile_between(&before, &before, 0.5), None);
        assert_eq!(quantile_between(&after, &before, 0.5), None);
        // A process's first scrape: everything it observed since start.
        let since_start = quantile_between(&[], &after, 0.6).map(|s| (s * 1e6).round() / 1e3);
        assert_eq!(since_start, Some(11.5));
    }
}
