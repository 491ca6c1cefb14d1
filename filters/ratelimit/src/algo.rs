//! The rate limiting algorithms, pure: a state, parameters, the time and a cost in, an outcome
//! out. Times are microseconds since the Unix epoch.
//!
//! - GCRA (generic cell rate algorithm): `quota` units per `window` with a bucket of `burst`
//!   units. The state is one number, the theoretical arrival time (TAT). Equivalent to a token
//!   bucket refilled at `quota / window` holding at most `burst` tokens.
//! - Fixed window: at most `quota` units per window aligned on the Unix epoch (a `1d` window
//!   starts at 00:00 UTC). The state is the end of the current window and its count.

use serde::Deserialize;

/// Microseconds per second.
pub const MICROS: u64 = 1_000_000;

/// Which algorithm a limit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Token bucket with rate and burst, as GCRA (the default).
    #[default]
    Gcra,
    /// A count per window aligned on the epoch, for quotas such as 10,000 a day.
    FixedWindow,
}

/// The compiled parameters of a limit (for one plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Algorithm.
    pub algorithm: Algorithm,
    /// Units per window.
    pub quota: u64,
    /// Window in microseconds (a whole number of seconds).
    pub window_us: u64,
    /// GCRA bucket size in units (equal to `quota` unless configured).
    pub burst: u64,
}

impl Params {
    /// GCRA: microseconds between two units at the steady rate (at least 1).
    pub fn interval_us(&self) -> u64 {
        (self.window_us / self.quota.max(1)).max(1)
    }
    /// The most units one request may cost and still be admitted on a full bucket/window.
    pub fn capacity(&self) -> u64 {
        match self.algorithm {
            Algorithm::Gcra => self.burst,
            Algorithm::FixedWindow => self.quota,
        }
    }
    /// The window in whole seconds (the `w` of `RateLimit-Policy`).
    pub fn window_secs(&self) -> u64 {
        self.window_us / MICROS
    }
}

/// The state of one key, stored in a slot of the shared table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// GCRA: the theoretical arrival time. Fixed window: the end of the counted window.
    /// In both cases the key carries no information once `a <= now` (it is idle).
    pub a: u64,
    /// Fixed window: units admitted in the window ending at `a`. Unused by GCRA.
    pub n: u64,
    /// Until when a "limit crossed" warning was already logged for this key.
    pub warn_until: u64,
}

impl State {
    /// True when the state is equivalent to a fresh one at `now` (so it may be reused for
    /// another key without changing any answer).
    pub fn idle(&self, now: u64) -> bool {
        self.a <= now
    }
}

/// The answer of an algorithm for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The request fits.
    pub admitted: bool,
    /// The state to store: the new state when admitted; when refused, the old state with the
    /// warning mark moved when `warn` is set; `None` when nothing changes.
    pub next: Option<State>,
    /// Units left after this request (admitted), or now (refused).
    pub remaining: u64,
    /// Microseconds until the draft's `t`: refused, until this request would fit (so
    /// `Retry-After` is never earlier); admitted, until the quota is whole again.
    pub reset_us: u64,
    /// Refused, and no warning was logged for this key in the current period yet.
    pub warn: bool,
}

impl Outcome {
    /// `reset_us` in whole seconds, rounded up (the draft's `t`, and `Retry-After`).
    pub fn reset_secs(&self) -> u64 {
        self.reset_us.div_ceil(MICROS)
    }
}

/// Decide one request of `cost` units at `now` against `state`.
pub fn evaluate(p: &Params, state: State, now: u64, cost: u64) -> Outcome {
    match p.algorithm {
        Algorithm::Gcra => gcra(p, state, now, cost),
        Algorithm::FixedWindow => fixed_window(p, state, now, cost),
    }
}

fn gcra(p: &Params, s: State, now: u64, cost: u64) -> Outcome {
    let t = p.interval_us();
    let tau = p.burst.saturating_mul(t);
    let tat = s.a.max(now);
    let new_tat = tat.saturating_add(cost.saturating_mul(t));
    let limit = now.saturating_add(tau);
    if new_tat <= limit {
        return Outcome {
            admitted: true,
            next: Some(State { a: new_tat, ..s }),
            remaining: (limit - new_tat) / t,
            reset_us: new_tat - now,
            warn: false,
        };
    }
    let warn = now >= s.warn_until;
    Outcome {
        admitted: false,
        next: warn.then_some(State {
            warn_until: now.saturating_add(p.window_us),
            ..s
        }),
        remaining: limit.saturating_sub(tat) / t,
        reset_us: new_tat - limit,
        warn,
    }
}

fn fixed_window(p: &Params, s: State, now: u64, cost: u64) -> Outcome {
    let w = p.window_us.max(1);
    let end = (now - now % w).saturating_add(w);
    let count = if s.a == end { s.n } else { 0 };
    let after = count.saturating_add(cost);
    if after <= p.quota {
        return Outcome {
            admitted: true,
            next: Some(State {
                a: end,
                n: after,
                warn_until: s.warn_until,
            }),
            remaining: p.quota - after,
            reset_us: end - now,
            warn: false,
        };
    }
    let warn = now >= s.warn_until;
    Outcome {
        admitted: false,
        next: warn.then_some(State {
            a: end,
            n: count,
            warn_until: end,
        }),
        remaining: p.quota.saturating_sub(count),
        reset_us: end - now,
        warn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_767_225_600 * MICROS; // 2026-01-01T00:00:00Z, a day boundary

    fn gcra_p(quota: u64, window_s: u64, burst: u64) -> Params {
        Params {
            algorithm: Algorithm::Gcra,
            quota,
            window_us: window_s * MICROS,
            burst,
        }
    }

    fn fixed_p(quota: u64, window_s: u64) -> Params {
        Params {
            algorithm: Algorithm::FixedWindow,
            quota,
            window_us: window_s * MICROS,
            burst: quota,
        }
    }

    /// A simulated client: applies admitted states, like the shared table does.
    struct Sim {
        p: Params,
        s: State,
        now: u64,
    }

    impl Sim {
        fn new(p: Params) -> Self {
            Sim {
                p,
                s: State::default(),
                now: T0,
            }
        }
        fn hit(&mut self, cost: u64) -> Outcome {
            let o = evaluate(&self.p, self.s, self.now, cost);
            if let Some(n) = o.next {
                self.s = n;
            }
            o
        }
        fn advance_ms(&mut self, ms: u64) {
            self.now += ms * 1000;
        }
        fn admitted_of(&mut self, n: usize) -> usize {
            (0..n).filter(|_| self.hit(1).admitted).count()
        }
    }

    #[test]
    fn gcra_burst_then_steady_refill() {
        // 10 per second, burst 5.
        let mut s = Sim::new(gcra_p(10, 1, 5));
        let remaining: Vec<u64> = (0..5).map(|_| s.hit(1).remaining).collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
        let refused = s.hit(1);
        assert!(!refused.admitted);
        assert_eq!(refused.remaining, 0);
        // the next unit comes 100ms later: t rounds up to 1s
        assert_eq!(refused.reset_us, 100_000);
        assert_eq!(refused.reset_secs(), 1);
        // 250ms later: two units back
        s.advance_ms(250);
        assert_eq!(s.admitted_of(5), 2);
        // at the steady rate (one every 100ms) everything passes
        for _ in 0..50 {
            s.advance_ms(100);
            assert!(s.hit(1).admitted);
        }
        // after a long pause the bucket is full again, never more than the burst
        s.advance_ms(60_000);
        assert_eq!(s.admitted_of(20), 5);
    }

    #[test]
    fn gcra_admits_exactly_the_rate_over_time() {
        // 100 per minute, burst 100, requests every 10ms for 10 minutes: 100 + 10 * 100
        let mut s = Sim::new(gcra_p(100, 60, 100));
        let mut admitted = 0;
        for _ in 0..60_000 {
            if s.hit(1).admitted {
                admitted += 1;
            }
            s.advance_ms(10);
        }
        assert!((1099..=1101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn gcra_cost_and_retry_after_is_when_it_fits() {
        // 6 per minute (one per 10s), burst 6; cost 5
        let mut s = Sim::new(gcra_p(6, 60, 6));
        let o = s.hit(5);
        assert!(o.admitted && o.remaining == 1);
        let o = s.hit(5);
        assert!(!o.admitted);
        assert_eq!(o.remaining, 1);
        // 4 more units needed: 40s
        assert_eq!(o.reset_us, 40 * MICROS);
        s.advance_ms(39_999);
        assert!(!s.hit(5).admitted);
        s.advance_ms(1);
        assert!(s.hit(5).admitted);
    }

    #[test]
    fn retry_after_is_never_early() {
        // For many parameter sets: a refused request retried exactly t (rounded up) later fits.
        for (q, w, b, cost) in [
            (10, 1, 10, 1),
            (3, 1, 1, 1),
            (7, 60, 3, 2),
            (100, 3600, 5, 5),
        ] {
            let mut s = Sim::new(gcra_p(q, w, b));
            while s.hit(cost).admitted {}
            let o = s.hit(cost);
            assert!(!o.admitted);
            s.now += o.reset_secs() * MICROS;
            assert!(s.hit(cost).admitted, "{q}/{w}s burst {b} cost {cost}");
        }
        for (q, w, cost) in [(10, 1, 1), (5, 60, 2), (1000, 86400, 7)] {
            let mut s = Sim::new(fixed_p(q, w));
            s.advance_ms(333);
            while s.hit(cost).admitted {}
            let o = s.hit(cost);
            s.now += o.reset_secs() * MICROS;
            assert!(s.hit(cost).admitted, "{q}/{w}s cost {cost}");
        }
    }

    #[test]
    fn fixed_window_counts_per_aligned_window() {
        let mut s = Sim::new(fixed_p(3, 10));
        s.advance_ms(4_000);
        let o: Vec<(bool, u64, u64)> = (0..4)
            .map(|_| {
                let o = s.hit(1);
                (o.admitted, o.remaining, o.reset_secs())
            })
            .collect();
        assert_eq!(
            o,
            vec![(true, 2, 6), (true, 1, 6), (true, 0, 6), (false, 0, 6)]
        );
        // still the same window 5.9s later
        s.advance_ms(5_900);
        assert!(!s.hit(1).admitted);
        // the next window starts at 10s
        s.advance_ms(100);
        assert_eq!(s.admitted_of(5), 3);
        // a cost larger than what is left is refused, and does not count
        s.advance_ms(10_000);
        assert!(s.hit(2).admitted);
        assert!(!s.hit(2).admitted);
        assert!(s.hit(1).admitted);
    }

    #[test]
    fn warning_once_per_key_and_period() {
        let mut s = Sim::new(gcra_p(1, 10, 1));
        assert!(s.hit(1).admitted);
        let warns: Vec<bool> = (0..5).map(|_| s.hit(1).warn).collect();
        assert_eq!(warns, vec![true, false, false, false, false]);
        s.advance_ms(10_000);
        assert!(s.hit(1).admitted);
        assert!(s.hit(1).warn, "a new period warns again");

        let mut f = Sim::new(fixed_p(1, 60));
        assert!(f.hit(1).admitted);
        assert!(f.hit(1).warn);
        assert!(!f.hit(1).warn);
        f.advance_ms(60_000);
        assert!(f.hit(1).admitted);
        assert!(f.hit(1).warn);
    }

    #[test]
    fn refusals_do_not_consume() {
        let mut s = Sim::new(gcra_p(2, 2, 2));
        assert_eq!(s.admitted_of(10), 2);
        s.advance_ms(1_000);
        assert_eq!(s.admitted_of(10), 1);
    }

    #[test]
    fn idle_states_carry_nothing() {
        let p = gcra_p(10, 1, 10);
        let mut s = Sim::new(p);
        s.hit(3);
        assert!(!s.s.idle(s.now));
        s.advance_ms(300);
        assert!(s.s.idle(s.now));
        // an idle state answers like a fresh one
        assert_eq!(
            evaluate(&p, s.s, s.now, 1).remaining,
            evaluate(&p, State::default(), s.now, 1).remaining
        );
    }
}
