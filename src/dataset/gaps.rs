//! Messages lost before they reach a live recorder (dropped by the middleware or a full
//! subscription queue), counted from the header stamps of a stream with a nominal rate: a gap of
//! `k` periods between consecutive stamps means `k - 1` missing messages, and the messages due
//! between the last stamp and the end of an episode are missing from it.

/// Gap counter of one stream.
#[derive(Debug, Clone)]
pub struct GapCounter {
    period_ns: f64,
    last_ns: Option<i64>,
}

impl GapCounter {
    /// A counter for a stream published at `rate_hz`.
    pub fn new(rate_hz: f64) -> Self {
        Self { period_ns: 1e9 / rate_hz, last_ns: None }
    }

    /// Messages missing before the one stamped `stamp_ns` (0 for the first, for stamps that go
    /// back in time, and for gaps shorter than 1.5 periods, which are jitter).
    pub fn observe(&mut self, stamp_ns: i64) -> u64 {
        let missing = match self.last_ns {
            Some(last) if stamp_ns > last => {
                (((stamp_ns - last) as f64 / self.period_ns).round() as u64).saturating_sub(1)
            }
            _ => 0,
        };
        if self.last_ns.is_none_or(|last| stamp_ns > last) {
            self.last_ns = Some(stamp_ns);
        }
        missing
    }

    /// Forgets the last stamp (a new episode starts counting afresh).
    pub fn reset(&mut self) {
        self.last_ns = None;
    }
}

/// Messages of a stream at `rate_hz` due after the one stamped `last_ns` and before `end_ns`:
/// those a stopped episode lacks when the stream went silent or its messages were still in flight.
/// A message due within 1 % of a period of the end is not counted (a stream whose next message
/// is due exactly at the end lacks none).
pub fn due_before_end(rate_hz: f64, last_ns: i64, end_ns: i64) -> u64 {
    let periods = (end_ns.saturating_sub(last_ns)) as f64 * rate_hz / 1e9;
    (periods - 0.01).floor().max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_whole_missing_periods_and_ignore_jitter() {
        let mut g = GapCounter::new(10.0);
        assert_eq!(g.observe(1_000_000_000), 0);
        assert_eq!(g.observe(1_100_000_000), 0);
        // 140 ms: jitter, not a loss.
        assert_eq!(g.observe(1_240_000_000), 0);
        // 400 ms after: 3 missing (at +100, +200, +300 ms).
        assert_eq!(g.observe(1_640_000_000), 3);
        // A stamp going back in time is not a gap and does not move the reference.
        assert_eq!(g.observe(1_500_000_000), 0);
        assert_eq!(g.observe(1_740_000_000), 0);
        g.reset();
        assert_eq!(g.observe(9_000_000_000), 0);
    }

    #[test]
    fn the_tail_counts_messages_due_before_the_end() {
        // 10 Hz, last stamp at 1.0 s: messages due at 1.1 .. 1.4 s precede an end at 1.45 s.
        assert_eq!(due_before_end(10.0, 1_000_000_000, 1_450_000_000), 4);
        // The next message due exactly at the end (or rounded a nanosecond before) is not missing.
        assert_eq!(due_before_end(10.0, 1_000_000_000, 1_100_000_000), 0);
        assert_eq!(due_before_end(650.0, 0, 1_538_462), 0);
        // Due 7 ms before the end: missing.
        assert_eq!(due_before_end(10.0, 1_000_000_000, 1_107_000_000), 1);
        // An end before the last stamp.
        assert_eq!(due_before_end(10.0, 2_000_000_000, 1_000_000_000), 0);
    }
}
