//! Plumbing shared by the gateway and the dispatcher; no business logic lives here.

pub mod backoff;
pub mod config;
pub mod connect;
pub mod fdlimit;
pub mod metrics;
pub mod naming;
pub mod readiness;
pub mod serve;
pub mod shutdown;
pub mod streams;
pub mod telemetry;

/// Milliseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// This process's wall clock, in Unix milliseconds: the system clock, moved by an offset that
/// only tests set, to play a host whose clock is wrong. Several such hosts share one test
/// process, so the offset belongs to each gateway's or dispatcher's config, not to the process.
///
/// Wall-clock time is for timestamps on the wire and for judging message expiry. No decision
/// compares one host's reading with another host's: liveness is Redis key expiry, and the
/// local timers (heartbeats, retries, deadlines) run on tokio's monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    offset_ms: i64,
}

impl Clock {
    /// The system clock as it is.
    pub const fn system() -> Self {
        Self { offset_ms: 0 }
    }

    /// The system clock, `offset_ms` ahead (negative: behind).
    pub const fn skewed(offset_ms: i64) -> Self {
        Self { offset_ms }
    }

    pub fn now_ms(&self) -> u64 {
        now_ms().saturating_add_signed(self.offset_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_offset_from_the_system_clock() {
        let (before, ahead, behind, after) =
            (now_ms(), Clock::skewed(60_000).now_ms(), Clock::skewed(-60_000).now_ms(), now_ms());
        assert!(ahead >= before + 60_000 && ahead <= after + 60_000);
        assert!(behind + 60_000 >= before && behind + 60_000 <= after);
        assert_eq!(Clock::skewed(-i64::MAX).now_ms(), 0, "saturates instead of wrapping");
    }
}
