//! Fixed-rate tick schedule with deadline accounting, as pure arithmetic on clock times.
//!
//! Tick `k` is scheduled at `origin + k * period` and its action is due `budget` later. A tick
//! that finishes after its deadline is missed; when the loop falls so far behind that a tick's
//! deadline has passed before it could start, that tick is skipped and counted missed too.

use std::time::Duration;

/// One tick to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickSlot {
    /// Tick index since the schedule's origin.
    pub index: u64,
    /// Scheduled start.
    pub scheduled: Duration,
    /// The action must be ready by then.
    pub deadline: Duration,
    /// Ticks skipped before this one because their deadline had already passed.
    pub skipped: u64,
}

impl TickSlot {
    /// Whether an action ready at `done` misses this tick's deadline.
    pub fn missed_at(&self, done: Duration) -> bool {
        done > self.deadline
    }
}

/// The schedule of a fixed-rate loop.
#[derive(Debug, Clone)]
pub struct TickScheduler {
    origin: Duration,
    period: Duration,
    budget: Duration,
    next: u64,
}

impl TickScheduler {
    /// Ticks every `period` from `origin`, each due `budget` after its start.
    pub fn new(origin: Duration, period: Duration, budget: Duration) -> Self {
        Self { origin, period, budget, next: 0 }
    }

    fn start_of(&self, k: u64) -> Duration {
        // u128 nanoseconds: no overflow for any reachable tick count.
        self.origin + Duration::from_nanos((self.period.as_nanos() * u128::from(k)) as u64)
    }

    /// Scheduled start of the next tick.
    pub fn next_start(&self) -> Duration {
        self.start_of(self.next)
    }

    /// Starts the next tick at `now`, skipping those whose deadline has passed.
    pub fn begin(&mut self, now: Duration) -> TickSlot {
        let mut k = self.next;
        let mut skipped = 0;
        while self.start_of(k) + self.budget < now {
            k += 1;
            skipped += 1;
        }
        self.next = k + 1;
        let scheduled = self.start_of(k);
        TickSlot { index: k, scheduled, deadline: scheduled + self.budget, skipped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn on_time_late_and_skipped_ticks() {
        let mut s = TickScheduler::new(10 * MS, 50 * MS, 50 * MS);
        assert_eq!(s.next_start(), 10 * MS);
        let t0 = s.begin(10 * MS);
        assert_eq!((t0.index, t0.scheduled, t0.deadline, t0.skipped), (0, 10 * MS, 60 * MS, 0));
        assert!(!t0.missed_at(60 * MS));
        assert!(t0.missed_at(61 * MS));
        // Tick 1 starts 30 ms late (wake-up jitter) but is still within its deadline.
        let t1 = s.begin(90 * MS);
        assert_eq!((t1.index, t1.skipped), (1, 0));
        assert!(!t1.missed_at(100 * MS));
        // A 170 ms stall: ticks 2 (due 160) and 3 (due 210) passed before they could start.
        let t = s.begin(240 * MS);
        assert_eq!((t.index, t.scheduled, t.skipped), (4, 210 * MS, 2));
        assert_eq!(s.next_start(), 260 * MS);
    }
}
