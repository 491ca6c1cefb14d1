//! Leases of a `leased` global limit: units taken from the rate limit service ahead of need,
//! kept per client key in the limit's shared-data table (so every worker of an Envoy uses
//! them), and admitted locally.
//!
//! A lease of `k` units is one `ShouldRateLimit` call with `hits_addend = k`: the service counts
//! the `k` units at once, so the fleet never admits more than the service's quota in one of its
//! windows, as long as a lease ends with the window it was counted in. The service says when
//! that is (`duration_until_reset`); the lease is valid until `sent + duration_until_reset`
//! (`sent` is when the call left, so the lease ends no later than the service's window). Units
//! still unused then are lost (counted in `lease_unused_units`): leases under-admit by at most
//! the units outstanding when a window ends. A service that does not say when its window ends
//! gets leases valid for `min(window, 1s)`, which may then be admitted in its next window:
//! the worst case over-admission is those leases (counted in `over_admission_bound`).
//!
//! A slot's state (three u64 of [`State`]) holds one lease:
//! - `a`: until when the lease (or the exhausted mark) holds, in µs since the epoch; a slot is
//!   idle (reusable) after it;
//! - `n`: units left (bits 0-31), the lease size to ask for next (bits 32-55), exhausted
//!   (bit 56: the service refused; requests are refused locally until `a`);
//! - `warn_until`: until when a refill is in flight (ms, bits 32-63, wrapping) and when the
//!   last lease was granted (ms, bits 0-31, wrapping).

use crate::algo::State;
use crate::table::{Slot, StoreError, Table};

/// How long a lease lives when the service does not say when its window ends, at most.
pub const UNKNOWN_RESET_US: u64 = 1_000_000;
/// A lease should last about this long: shorter, the next is twice as large; lasting more
/// than [`SHRINK_AFTER`] times this, half.
pub const TARGET_MS: u32 = 200;
/// See [`TARGET_MS`].
pub const SHRINK_AFTER: u32 = 8;
/// After a failed refill, no other is asked for during this time (the lease drains, then
/// requests call the service themselves and meet the failure mode).
pub const FAILURE_BACKOFF_MS: u32 = 1000;

const EXHAUSTED: u64 = 1 << 56;
const SIZE_MASK: u64 = (1 << 24) - 1;

/// One lease, unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    /// Valid until (µs since the epoch).
    pub until: u64,
    /// Units left.
    pub units: u64,
    /// Units to ask for next (0: not yet known).
    pub size: u64,
    /// The service refused: refuse locally until `until`.
    pub exhausted: bool,
    /// A refill is in flight until this time (ms, wrapping).
    pub pending_until_ms: u32,
    /// When the last lease was granted (ms, wrapping).
    pub granted_ms: u32,
}

impl Lease {
    fn unpack(s: State) -> Lease {
        Lease {
            until: s.a,
            units: s.n & 0xffff_ffff,
            size: (s.n >> 32) & SIZE_MASK,
            exhausted: s.n & EXHAUSTED != 0,
            pending_until_ms: (s.warn_until >> 32) as u32,
            granted_ms: s.warn_until as u32,
        }
    }

    fn pack(&self) -> State {
        State {
            a: self.until,
            n: self.units.min(0xffff_ffff)
                | (self.size.min(SIZE_MASK) << 32)
                | if self.exhausted { EXHAUSTED } else { 0 },
            warn_until: (u64::from(self.pending_until_ms) << 32) | u64::from(self.granted_ms),
        }
    }

    fn pending(&self, now_ms: u32) -> bool {
        // In flight while `pending_until` is ahead of now (within half the wrapping range).
        let ahead = self.pending_until_ms.wrapping_sub(now_ms);
        ahead != 0 && ahead < u32::MAX / 2
    }
}

/// Milliseconds since the epoch, wrapping at 2^32 (about 49 days).
pub fn ms(now_us: u64) -> u32 {
    (now_us / 1000) as u32
}

/// What a request may do with a leased limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted from the lease.
    Admit {
        /// Units left in this Envoy's lease.
        left: u64,
        /// µs until the lease ends.
        reset_us: u64,
    },
    /// The service refused this window: refused without a call.
    Refuse {
        /// µs until the window ends.
        reset_us: u64,
    },
    /// No lease to take from: the request asks the service itself.
    Call,
}

/// The answer of [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// What the request may do.
    pub verdict: Verdict,
    /// Ask the root for a lease of this many units (this request marked the refill in flight).
    pub refill: Option<u64>,
    /// Units of an ended lease found unused.
    pub unused: u64,
}

/// Parameters of a leased limit for [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Largest lease.
    pub lease_max: u64,
    /// How long a refill may be in flight before another may be asked for (the call's timeout
    /// plus a margin), ms.
    pub pending_ms: u32,
}

/// A request of `cost` units at `now` (µs) against the lease of `slot`.
pub fn take(
    table: &Table,
    host: &mut dyn tollgate_common::Host,
    slot: Slot,
    now: u64,
    cost: u64,
    sizing: Sizing,
) -> Result<Take, StoreError> {
    let updated = table.update(host, slot, now, |state| decide(state, now, cost, sizing))?;
    Ok(updated.value)
}

/// [`take`]'s decision, pure: the state to write (if any) and the answer.
pub fn decide(state: State, now: u64, cost: u64, sizing: Sizing) -> (Option<State>, Take) {
    let now_ms = ms(now);
    let mut lease = Lease::unpack(state);
    let mut unused = 0;
    let mut changed = false;
    if lease.until <= now {
        // Ended: what was left is lost; the size learnt is kept.
        if !lease.exhausted {
            unused = lease.units;
        }
        if lease.units > 0 || lease.exhausted {
            changed = true;
        }
        lease.units = 0;
        lease.exhausted = false;
    }
    let verdict = if lease.units >= cost {
        lease.units -= cost;
        changed = true;
        Verdict::Admit {
            left: lease.units,
            reset_us: lease.until.saturating_sub(now),
        }
    } else if lease.exhausted {
        Verdict::Refuse {
            reset_us: lease.until.saturating_sub(now),
        }
    } else {
        Verdict::Call
    };
    // Refill when the lease runs low (or is empty and the window not refused), once.
    let low = lease.units < (lease.size / 2).max(cost);
    let refill = if low && !lease.exhausted && !lease.pending(now_ms) {
        lease.size = next_size(&lease, now_ms, cost, sizing.lease_max);
        lease.pending_until_ms = now_ms.wrapping_add(sizing.pending_ms).max(1);
        changed = true;
        Some(lease.size)
    } else {
        None
    };
    let write = changed.then(|| lease.pack());
    (
        write,
        Take {
            verdict,
            refill,
            unused,
        },
    )
}

/// The size of the next lease: the first is a quarter of the largest; then twice the last when
/// it lasted less than [`TARGET_MS`] until it ran low, half when it lasted more than
/// [`SHRINK_AFTER`] times that; never less than one request's cost nor more than `lease_max`
/// (unless one request costs more).
fn next_size(lease: &Lease, now_ms: u32, cost: u64, lease_max: u64) -> u64 {
    let size = if lease.size == 0 {
        lease_max.div_ceil(4)
    } else {
        let lasted = now_ms.wrapping_sub(lease.granted_ms);
        if lasted < TARGET_MS {
            lease.size.saturating_mul(2)
        } else if lasted > TARGET_MS.saturating_mul(SHRINK_AFTER) {
            lease.size / 2
        } else {
            lease.size
        }
    };
    size.min(lease_max).max(cost).max(1)
}

/// What the service answered to a refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refilled {
    /// `units` granted; the window ends `reset_us` after the call was sent, if the service said.
    Granted {
        /// Units granted.
        units: u64,
        /// µs from sending the call to the end of the service's window.
        reset_us: Option<u64>,
    },
    /// Refused for this window (ends `reset_us` after sending, if said).
    Exhausted {
        /// µs from sending to the end of the window.
        reset_us: Option<u64>,
    },
    /// The call failed: no refill for a while.
    Failed,
}

/// Apply a refill's answer at `now` to the lease of `slot`; `sent` is when the call left,
/// `window_us` the limit's window. Returns the units of an ended lease found unused.
pub fn apply(
    table: &Table,
    host: &mut dyn tollgate_common::Host,
    slot: Slot,
    now: u64,
    sent: u64,
    window_us: u64,
    answer: Refilled,
) -> Result<u64, StoreError> {
    let updated = table.update(host, slot, now, |state| {
        let (lease, unused) = applied(state, now, sent, window_us, answer);
        (Some(lease.pack()), unused)
    })?;
    Ok(updated.value)
}

/// [`apply`]'s new lease, pure, with the units found unused.
pub fn applied(
    state: State,
    now: u64,
    sent: u64,
    window_us: u64,
    answer: Refilled,
) -> (Lease, u64) {
    let now_ms = ms(now);
    let mut lease = Lease::unpack(state);
    let mut unused = 0;
    let ended = lease.until <= now;
    let until_of =
        |reset: Option<u64>| sent.saturating_add(reset.unwrap_or(window_us.min(UNKNOWN_RESET_US)));
    match answer {
        Refilled::Granted { units, reset_us } => {
            let until = until_of(reset_us);
            // Another window than the lease's (it ended, or the service started a new
            // one): the old units are dropped, they were counted in a window that is over.
            let same_window = !ended && until < lease.until.saturating_add(window_us / 2);
            if same_window && !lease.exhausted {
                lease.units = lease.units.saturating_add(units);
                lease.until = lease.until.min(until);
            } else {
                if !lease.exhausted {
                    unused = lease.units;
                }
                lease.units = units;
                lease.until = until;
            }
            lease.exhausted = false;
            lease.granted_ms = now_ms;
            lease.pending_until_ms = 0;
        }
        Refilled::Exhausted { reset_us } => {
            if ended {
                lease.units = 0;
            }
            lease.exhausted = true;
            lease.until = until_of(reset_us).max(if ended { 0 } else { lease.until });
            lease.pending_until_ms = 0;
        }
        Refilled::Failed => {
            lease.pending_until_ms = now_ms.wrapping_add(FAILURE_BACKOFF_MS).max(1);
        }
    }
    (lease, unused)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const T0: u64 = 1_767_225_600 * S;
    const SIZING: Sizing = Sizing {
        lease_max: 40,
        pending_ms: 300,
    };

    fn take_at(state: &mut State, now: u64, cost: u64) -> Take {
        let (write, t) = decide(*state, now, cost, SIZING);
        if let Some(w) = write {
            *state = w;
        }
        t
    }

    fn apply_at(state: &mut State, now: u64, sent: u64, answer: Refilled) -> u64 {
        let (lease, unused) = applied(*state, now, sent, 60 * S, answer);
        *state = lease.pack();
        unused
    }

    #[test]
    fn packing_round_trips() {
        let l = Lease {
            until: T0 + 5,
            units: 123,
            size: 4567,
            exhausted: true,
            pending_until_ms: 99,
            granted_ms: u32::MAX,
        };
        assert_eq!(Lease::unpack(l.pack()), l);
    }

    #[test]
    fn a_cold_key_calls_and_asks_for_one_refill() {
        let mut s = State::default();
        let t = take_at(&mut s, T0, 1);
        assert_eq!(t.verdict, Verdict::Call);
        assert_eq!(t.refill, Some(10), "a quarter of lease_max");
        // a second request while the refill is in flight: calls too, no second refill
        let t = take_at(&mut s, T0 + 1000, 1);
        assert_eq!((t.verdict, t.refill), (Verdict::Call, None));
        // the lease arrives: 10 units until the window's end
        apply_at(
            &mut s,
            T0 + 2000,
            T0,
            Refilled::Granted {
                units: 10,
                reset_us: Some(30 * S),
            },
        );
        let t = take_at(&mut s, T0 + 3000, 1);
        assert_eq!(
            t.verdict,
            Verdict::Admit {
                left: 9,
                reset_us: 30 * S - 3000
            }
        );
        assert_eq!(t.refill, None);
    }

    #[test]
    fn refills_at_half_and_grows_when_leases_go_fast() {
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(
            &mut s,
            T0 + 1000,
            T0,
            Refilled::Granted {
                units: 10,
                reset_us: Some(30 * S),
            },
        );
        let mut refills = Vec::new();
        for i in 0..6 {
            let t = take_at(&mut s, T0 + 2000 + i * 1000, 1);
            assert!(matches!(t.verdict, Verdict::Admit { .. }));
            refills.extend(t.refill);
        }
        // 10 -> 4 left after 6: the refill was asked once, at 4 < 5, twice as large (fast)
        assert_eq!(refills, vec![20]);
        apply_at(
            &mut s,
            T0 + 9000,
            T0 + 8000,
            Refilled::Granted {
                units: 20,
                reset_us: Some(30 * S - 8000),
            },
        );
        let l = Lease::unpack(s);
        assert_eq!((l.units, l.size), (24, 20));
        assert!(l.until <= T0 + 30 * S, "never past the service's window");
    }

    #[test]
    fn slow_traffic_shrinks_the_lease_and_it_never_exceeds_lease_max() {
        let mut l = Lease {
            size: 40,
            granted_ms: ms(T0),
            ..Lease::default()
        };
        assert_eq!(next_size(&l, ms(T0 + 10 * S), 1, 40), 20);
        l.size = 30;
        assert_eq!(next_size(&l, ms(T0 + 1000), 1, 40), 40);
        assert_eq!(
            next_size(&l, ms(T0 + 1000), 50, 40),
            50,
            "a request's cost fits"
        );
    }

    #[test]
    fn an_exhausted_window_refuses_locally_until_it_ends() {
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(
            &mut s,
            T0 + 1000,
            T0,
            Refilled::Exhausted {
                reset_us: Some(5 * S),
            },
        );
        let t = take_at(&mut s, T0 + 2 * S, 1);
        assert_eq!(t.verdict, Verdict::Refuse { reset_us: 3 * S });
        assert_eq!(t.refill, None, "no refill asked while refused");
        // the window ended: a call again, and a refill
        let t = take_at(&mut s, T0 + 5 * S, 1);
        assert_eq!(t.verdict, Verdict::Call);
        assert!(t.refill.is_some());
    }

    #[test]
    fn ended_leases_count_their_unused_units_and_a_new_window_drops_old_units() {
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(
            &mut s,
            T0 + 1000,
            T0,
            Refilled::Granted {
                units: 10,
                reset_us: Some(S),
            },
        );
        let t = take_at(&mut s, T0 + 2 * S, 1);
        assert_eq!(t.unused, 10);
        assert_eq!(t.verdict, Verdict::Call);
        // granted in a later window while units of an earlier one remain: replaced
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(
            &mut s,
            T0 + 1000,
            T0,
            Refilled::Granted {
                units: 10,
                reset_us: Some(S),
            },
        );
        let unused = apply_at(
            &mut s,
            T0 + 2000,
            T0 + 1500,
            Refilled::Granted {
                units: 7,
                reset_us: Some(60 * S),
            },
        );
        assert_eq!(unused, 10);
        assert_eq!(Lease::unpack(s).units, 7);
    }

    #[test]
    fn unknown_window_ends_bound_the_lease_to_a_second_and_failures_back_off() {
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(
            &mut s,
            T0 + 1000,
            T0,
            Refilled::Granted {
                units: 10,
                reset_us: None,
            },
        );
        assert_eq!(Lease::unpack(s).until, T0 + S);
        // a failed refill: no new refill asked for a second
        let mut s = State::default();
        take_at(&mut s, T0, 1);
        apply_at(&mut s, T0 + 1000, T0, Refilled::Failed);
        let t = take_at(&mut s, T0 + 500_000, 1);
        assert_eq!((t.verdict, t.refill), (Verdict::Call, None));
        let t = take_at(&mut s, T0 + 1_100_000, 1);
        assert!(t.refill.is_some());
    }
}
