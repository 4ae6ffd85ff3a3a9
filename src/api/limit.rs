//! [`DenialLimiter`]: a cap on how fast one source may collect refusals.
//!
//! Every refused call is an audit event (a durable append), and a refusal needs no credential,
//! so without a cap anyone who can reach the port could fill the audit log at line rate. Each
//! source has a token bucket of refusals (`denial_rate` per second, up to `denial_burst`). A
//! source is an IPv4 address or an IPv6 /64 (one host's usual allocation: budgeting single IPv6
//! addresses would give every attacker 2^64 budgets).
//!
//! A call takes one unit of its source's budget *before* it is processed ([`DenialLimiter::reserve`])
//! and gives it back when it succeeds ([`Reservation::release`]); a refused call keeps it spent.
//! So however many calls one source sends at once, at most `denial_burst` of them can be in
//! flight, and at most that many refusals can be audited one by one in a burst. A source whose
//! bucket is empty gets `RESOURCE_EXHAUSTED` at once, before anything is parsed and without an
//! audit event of its own; those are counted and written as one summary event per source when
//! [`DenialLimiter::drain`] runs (every second), so the record still shows every request.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Sources remembered at most. Beyond that, refilled buckets are forgotten first; if every
/// remembered source is still paying off refusals, a new source is refused until one refills.
const MAX_SOURCES: usize = 64 * 1024;

/// Per-source budgets of refusals.
#[derive(Debug)]
pub struct DenialLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<Source, Bucket>,
    /// Requests refused because the table of sources was full, since the last drain.
    overflow: u64,
}

/// The unit a budget is kept for: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source(IpAddr);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused without their own audit event since the last drain.
    suppressed: u64,
}

/// One unit of a source's budget, taken before a call is processed. Dropping it leaves the
/// unit spent (the call was refused, or never finished); [`Reservation::release`] gives it back.
#[derive(Debug)]
#[must_use = "a reservation that is dropped counts as a refusal"]
pub struct Reservation {
    limiter: Option<Arc<DenialLimiter>>,
    source: Source,
}

impl Source {
    /// The budget unit `ip` belongs to: the same unit the connection caps count by
    /// ([`crate::net::source_key`]).
    pub fn of(ip: IpAddr) -> Self {
        Self(crate::net::source_key(ip))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

impl DenialLimiter {
    /// `rate` refusals per second per source, up to `burst` at once. A rate of 0 disables the
    /// limit.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
    }

    fn is_full(&self, b: &Bucket, now: Instant) -> bool {
        b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate >= self.burst
    }

    /// Takes one unit of `ip`'s budget for a call about to be processed; `None` when the budget
    /// is spent (the call must be refused at once; it is counted for the next
    /// [`DenialLimiter::drain`]).
    pub fn reserve(self: &Arc<Self>, ip: IpAddr) -> Option<Reservation> {
        let source = Source::of(ip);
        if self.rate == 0.0 {
            return Some(Reservation {
                limiter: None,
                source,
            });
        }
        let now = Instant::now();
        let mut state = self.lock();
        if state.sources.len() >= MAX_SOURCES && !state.sources.contains_key(&source) {
            state
                .sources
                .retain(|_, b| b.suppressed > 0 || !self.is_full(b, now));
            if state.sources.len() >= MAX_SOURCES {
                state.overflow += 1;
                return None;
            }
        }
        let b = state.sources.entry(source).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            suppressed: 0,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(Reservation {
                limiter: Some(self.clone()),
                source,
            })
        } else {
            b.suppressed += 1;
            None
        }
    }

    fn give_back(&self, source: Source) {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(b) = state.sources.get_mut(&source) else {
            return;
        };
        self.refill(b, now);
        b.tokens = (b.tokens + 1.0).min(self.burst);
        // A full bucket with nothing to report carries no state: keep the table small on the
        // success path.
        if b.suppressed == 0 && b.tokens >= self.burst {
            state.sources.remove(&source);
        }
    }

    /// The sources that had requests refused without an audit event since the last call, with
    /// how many (a `None` source: refused because too many sources were being tracked); also
    /// forgets sources whose bucket is full again.
    pub fn drain(&self) -> Vec<(Option<Source>, u64)> {
        let now = Instant::now();
        let mut state = self.lock();
        let mut out = Vec::new();
        state.sources.retain(|source, b| {
            if b.suppressed > 0 {
                out.push((Some(*source), b.suppressed));
                b.suppressed = 0;
            }
            !self.is_full(b, now)
        });
        out.sort();
        if state.overflow > 0 {
            out.push((None, std::mem::take(&mut state.overflow)));
        }
        out
    }
}

impl Reservation {
    /// The call succeeded: the unit goes back to the source's budget.
    pub fn release(self) {
        if let Some(limiter) = &self.limiter {
            limiter.give_back(self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn a_source_gets_its_burst_then_is_held_to_the_rate() {
        let l = Arc::new(DenialLimiter::new(1, 3));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            drop(l.reserve(a).expect("within the burst"));
        }
        assert!(l.reserve(a).is_none(), "burst used up");
        assert!(l.reserve(a).is_none());
        assert!(l.reserve(b).is_some(), "other sources are not affected");
        assert_eq!(l.drain(), vec![(Some(Source::of(a)), 2)]);
        assert_eq!(l.drain(), vec![], "counted once");
        assert!(Arc::new(DenialLimiter::new(0, 1)).reserve(a).is_some());
    }

    #[test]
    fn concurrent_calls_cannot_exceed_the_budget_and_successes_give_it_back() {
        let l = Arc::new(DenialLimiter::new(1, 3));
        let a = ip("192.0.2.1");
        // Three calls in flight at once: the fourth is refused before it is processed.
        let held: Vec<_> = (0..3).map(|_| l.reserve(a).expect("in budget")).collect();
        assert!(
            l.reserve(a).is_none(),
            "no unit left while three are in flight"
        );
        for r in held {
            r.release();
        }
        for _ in 0..10 {
            l.reserve(a).expect("successes cost nothing").release();
        }
        assert!(
            l.lock().sources.contains_key(&Source::of(a)),
            "the refusal above is still to be reported"
        );
    }

    #[test]
    fn ipv6_sources_share_a_budget_per_64() {
        let l = Arc::new(DenialLimiter::new(1, 2));
        for addr in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"] {
            drop(l.reserve(ip(addr)).expect("within the /64's burst"));
        }
        assert!(l.reserve(ip("2001:db8:1:2:abcd::1")).is_none(), "same /64");
        assert!(l.reserve(ip("2001:db8:1:3::1")).is_some(), "another /64");
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7")),
            Source::of(ip("192.0.2.7")),
            "an IPv4-mapped address is its IPv4 address"
        );
    }
}
