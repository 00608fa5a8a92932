//! Exponential backoff with jitter, for retrying a dependency that is not there yet.

use std::time::Duration;

/// Pauses that double from `first` up to `max`, each drawn between half and all of the current
/// step, so that processes started together (a deploy, a fleet restarted with its Redis) do not
/// retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { step: first.min(max), max }
    }

    /// The next pause to take.
    pub fn next_pause(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_stay_within_half_and_all_of_each_step() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for step in [100, 200, 350, 350] {
            let pause = backoff.next_pause();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for a step of {step:?}");
        }
    }
}
