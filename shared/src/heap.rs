//! The heap's own account of itself, for binaries whose global allocator is jemalloc (the
//! `jemalloc` feature): what the process has allocated, and what the allocator holds in memory
//! to serve it. Their difference is the allocator's overhead, fragmentation and freed pages not
//! yet returned, which RSS alone cannot tell apart from a leak. And the switch that has freed
//! pages returned on time.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts, Registry};
use tikv_jemalloc_ctl::{epoch, stats};

use crate::metrics::MetricsError;

/// `herald_heap_bytes{kind}`, read from jemalloc whenever it is gathered.
struct HeapGauges {
    bytes: IntGaugeVec,
}

/// How one statistic is read.
type Read = fn() -> tikv_jemalloc_ctl::Result<usize>;

/// Each kind, with the jemalloc statistic behind it.
const KINDS: [(&str, Read); 3] = [
    // Bytes the program holds in live allocations.
    ("allocated", stats::allocated::read),
    // Bytes in pages that hold at least one live allocation: allocated plus what is unused in
    // those pages.
    ("active", stats::active::read),
    // Bytes of physical memory the allocator has mapped and not given back, its metadata and
    // freed pages not yet returned included: its part of the process's RSS.
    ("resident", stats::resident::read),
];

impl Collector for HeapGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.bytes.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // jemalloc's statistics are a snapshot taken when the epoch advances.
        if epoch::advance().is_ok() {
            for (kind, read) in KINDS {
                if let Ok(value) = read() {
                    self.bytes.with_label_values(&[kind]).set(i64::try_from(value).unwrap_or(i64::MAX));
                }
            }
        }
        self.bytes.collect()
    }
}

/// Starts jemalloc's background threads, which return freed pages to the kernel once they have
/// been idle for `dirty_decay_ms` (`.cargo/config.toml`). Without them jemalloc returns pages
/// only while the arena that freed them is busy, and an idle gateway kept ~0.8 KiB of freed
/// pages per connection (docs/BENCHMARKS.md §1). The gateway's choice: in the dispatcher,
/// which frees little that stays idle, the threads' wake-ups cost ~10 % of its CPU per message.
pub fn purge_in_background() -> Result<(), tikv_jemalloc_ctl::Error> {
    tikv_jemalloc_ctl::background_thread::write(true)
}

/// Registers `herald_heap_bytes{kind="allocated"|"active"|"resident"}` in `registry`.
pub fn register(registry: &Registry) -> Result<(), MetricsError> {
    let bytes = IntGaugeVec::new(
        Opts::new("herald_heap_bytes", "The heap as jemalloc counts it: allocated, in active pages, and resident"),
        &["kind"],
    )?;
    registry.register(Box::new(HeapGauges { bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary's allocator is the system's, so jemalloc's figures are its own small
    /// ones; what is checked is that each kind is read and is on the page.
    #[test]
    fn every_kind_is_on_the_page() {
        let registry = Registry::new();
        assert!(register(&registry).is_ok());
        let page = crate::metrics::encode(&registry);
        for (kind, _) in KINDS {
            assert!(page.contains(&format!("herald_heap_bytes{{kind=\"{kind}\"}}")), "{kind} missing from:\n{page}");
        }
    }

    #[test]
    fn background_purging_can_be_switched_on() {
        assert!(purge_in_background().is_ok());
        assert_eq!(tikv_jemalloc_ctl::background_thread::read().ok(), Some(true));
    }
}
