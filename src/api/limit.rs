//! [`DenialLimiter`]: a cap on how fast one source may collect refusals.
//!
//! Every refused `Ca.Issue` is an audit event (a durable append), and a refusal needs no
//! credential, so without a cap anyone who can reach the port could fill the audit log at line
//! rate. Each source IP has a token bucket of refusals (`denial_rate` per second, up to
//! `denial_burst`). A source whose bucket is empty gets `RESOURCE_EXHAUSTED` at once, before any
//! CSR is parsed and without an audit event of its own; what was refused that way is counted and
//! written as one summary event per source when [`DenialLimiter::drain`] runs (every second), so
//! the record still shows every request. Successful requests never consume the budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Sources remembered at most; beyond that the fullest buckets are forgotten first.
const MAX_SOURCES: usize = 64 * 1024;

/// Per-source budgets of refusals.
#[derive(Debug)]
pub struct DenialLimiter {
    rate: f64,
    burst: f64,
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused without their own audit event since the last drain.
    suppressed: u64,
}

impl DenialLimiter {
    /// `rate` refusals per second per source, up to `burst` at once. A rate of 0 disables the
    /// limit.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
    }

    /// Whether `source` may be served now; `false` counts one suppressed refusal.
    pub fn admit(&self, source: IpAddr) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut sources = self.lock();
        let Some(b) = sources.get_mut(&source) else {
            return true;
        };
        self.refill(b, now);
        if b.tokens >= 1.0 {
            return true;
        }
        b.suppressed += 1;
        false
    }

    /// Takes one refusal from `source`'s budget.
    pub fn refused(&self, source: IpAddr) {
        if self.rate == 0.0 {
            return;
        }
        let now = Instant::now();
        let mut sources = self.lock();
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            // Forget sources whose bucket has refilled; they carry no state worth keeping.
            let (rate, burst) = (self.rate, self.burst);
            sources.retain(|_, b| {
                b.suppressed > 0
                    || b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = sources.entry(source).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            suppressed: 0,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// The sources that had requests refused without an audit event since the last call, with
    /// how many; also forgets sources whose bucket is full again.
    pub fn drain(&self) -> Vec<(IpAddr, u64)> {
        let now = Instant::now();
        let mut sources = self.lock();
        let mut out = Vec::new();
        let (rate, burst) = (self.rate, self.burst);
        sources.retain(|ip, b| {
            if b.suppressed > 0 {
                out.push((*ip, b.suppressed));
                b.suppressed = 0;
            }
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
        });
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_is_held_to_the_rate() {
        let l = DenialLimiter::new(1, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "192.0.2.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        for _ in 0..3 {
            assert!(l.admit(a));
            l.refused(a);
        }
        assert!(!l.admit(a), "burst used up");
        assert!(!l.admit(a));
        assert!(l.admit(b), "other sources are not affected");
        assert_eq!(l.drain(), vec![(a, 2)]);
        assert_eq!(l.drain(), vec![], "counted once");
        assert!(DenialLimiter::new(0, 1).admit(a), "rate 0: no limit");
    }
}
