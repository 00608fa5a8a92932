//! Counting the process's heap allocations, for the benchmark builds only (the `alloc-count`
//! feature): a global allocator that wraps the system's and adds to a few atomics per call
//! (`stats_alloc`), and the Prometheus counters that read those at each scrape. A binary installs
//! it with one line, `herald_shared::count_allocations!();`; production builds leave it out.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, Registry};

pub use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

use crate::metrics::MetricsError;

/// Installs the counting allocator as the binary's global allocator.
#[macro_export]
macro_rules! count_allocations {
    () => {
        #[global_allocator]
        static COUNTING_ALLOCATOR: &$crate::alloc_count::StatsAlloc<::std::alloc::System> =
            &$crate::alloc_count::INSTRUMENTED_SYSTEM;
    };
}

/// `herald_allocations_total` and `herald_allocated_bytes_total`, brought up to the allocator's
/// counts whenever they are gathered. They read 0 in a process that did not install it.
struct AllocationCounters {
    allocations: IntCounter,
    bytes: IntCounter,
    /// Held while catching up, so that two scrapes at once do not both add the same difference.
    catching_up: Mutex<()>,
}

impl Collector for AllocationCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.allocations.desc().into_iter().chain(self.bytes.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = INSTRUMENTED_SYSTEM.stats();
        if let Ok(_held) = self.catching_up.lock() {
            // A realloc is counted as an allocation: it may move the block, as a new one does.
            catch_up(&self.allocations, (stats.allocations + stats.reallocations) as u64);
            catch_up(&self.bytes, stats.bytes_allocated as u64);
        }
        self.allocations.collect().into_iter().chain(self.bytes.collect()).collect()
    }
}

/// Raises `counter` to `total` (counters only go up).
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Registers the allocation counters in `registry`.
pub fn register(registry: &Registry) -> Result<(), MetricsError> {
    let counters = AllocationCounters {
        allocations: IntCounter::new(
            "herald_allocations_total",
            "Heap allocations (alloc and realloc calls) since start; benchmark builds only",
        )?,
        bytes: IntCounter::new(
            "herald_allocated_bytes_total",
            "Bytes of heap allocated since start; benchmark builds only",
        )?,
        catching_up: Mutex::new(()),
    };
    registry.register(Box::new(counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_catch_up_and_never_go_down() {
        let counter = IntCounter::new("c_total", "c").unwrap_or_else(|e| panic!("{e}"));
        catch_up(&counter, 10);
        catch_up(&counter, 25);
        assert_eq!(counter.get(), 25);
        catch_up(&counter, 3);
        assert_eq!(counter.get(), 25);
    }

    #[test]
    fn both_counters_are_on_the_page() {
        let registry = Registry::new();
        assert!(register(&registry).is_ok());
        let page = crate::metrics::encode(&registry);
        assert!(page.contains("herald_allocations_total "), "{page}");
        assert!(page.contains("herald_allocated_bytes_total "), "{page}");
    }
}
