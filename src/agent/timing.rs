//! Pure timing decisions: when to renew, how long to back off.

use std::time::Duration;

/// Time from `now_ms` until the renewal point: `fraction` of the lifetime
/// `[start_ms, not_after_ms]`, moved by `jitter` (in [-1, 1]) times 10 % of the lifetime, so a
/// fleet started together spreads its renewals. Never negative. Milliseconds, so seconds-scale
/// certificates are timed as precisely as minute-scale ones.
pub fn refresh_in(
    now_ms: i64,
    start_ms: i64,
    not_after_ms: i64,
    fraction: f64,
    jitter: f64,
) -> Duration {
    let life = (not_after_ms - start_ms).max(1) as f64;
    let at =
        start_ms as f64 + life * fraction.clamp(0.05, 0.95) + life * 0.1 * jitter.clamp(-1.0, 1.0);
    Duration::from_millis((at - now_ms as f64).max(0.0) as u64)
}

/// Capped exponential backoff, reset on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    /// The wait before the next attempt (then doubles it).
    pub fn next_wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (self.next * 2).min(self.max);
        w
    }

    /// Back to the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_with_bounded_jitter() {
        let s = |n: u64| Duration::from_secs(n);
        assert_eq!(refresh_in(100_000, 100_000, 400_000, 0.5, 0.0), s(150));
        assert_eq!(refresh_in(100_000, 100_000, 400_000, 0.5, 1.0), s(180));
        assert_eq!(refresh_in(100_000, 100_000, 400_000, 0.5, -1.0), s(120));
        assert_eq!(
            refresh_in(0, 0, 4_000, 0.5, 0.0),
            Duration::from_millis(2_000)
        );
        // Past the renewal point: renew at once.
        assert_eq!(
            refresh_in(500_000, 100_000, 400_000, 0.5, 0.0),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let waits: Vec<u64> = (0..5).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_wait().as_secs(), 1);
    }
}
