//! Circuit breakers per backend (Envoy cluster), kept in shared data so that every worker of
//! the VM agrees.
//!
//! Key `tollgate.aggregate.cb.<cluster>`, value `<state> <consecutive failures> <since ms>` as
//! text, with state `closed`, `open` (since = when it opened) or `half_open` (since = when the
//! probe was let through). Updates are compare-and-swap with a bounded number of retries; when
//! shared data fails the breaker lets calls through (it never blocks traffic on its own error).

use std::time::SystemTime;

use tollgate_common::{Host, SharedError};

use crate::config::Breaker;

const RETRIES: usize = 8;

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through.
    Closed,
    /// Calls fail fast.
    Open,
    /// One probe is in flight.
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    state: State,
    failures: u32,
    since_ms: u64,
}

impl Record {
    fn encode(&self) -> String {
        let s = match self.state {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        };
        format!("{s} {} {}", self.failures, self.since_ms)
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut it = text.split(' ');
        let state = match it.next()? {
            "closed" => State::Closed,
            "open" => State::Open,
            "half_open" => State::HalfOpen,
            _ => return None,
        };
        Some(Record {
            state,
            failures: it.next()?.parse().ok()?,
            since_ms: it.next()?.parse().ok()?,
        })
    }
}

const CLOSED: Record = Record {
    state: State::Closed,
    failures: 0,
    since_ms: 0,
};

/// May a call go to the backend?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes (`probe`: this call is the one probe after the cool-down).
    Allow {
        /// This call is the probe.
        probe: bool,
    },
    /// No: the breaker is open.
    Reject,
}

/// A state change, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed or half-open to open.
    Opened,
    /// Open to half-open (a probe goes through).
    HalfOpened,
    /// Back to closed.
    Closed,
}

fn key(cluster: &str) -> String {
    format!("tollgate.aggregate.cb.{cluster}")
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn read(host: &dyn Host, k: &str) -> Option<(Record, Option<u32>)> {
    match host.shared_get(k) {
        Ok(Some((v, cas))) => Some((Record::decode(&v).unwrap_or(CLOSED), Some(cas))),
        Ok(None) => Some((CLOSED, None)),
        Err(e) => {
            log::warn!("aggregate: circuit breaker {k}: {e}; letting calls through");
            None
        }
    }
}

/// Write with CAS; true when written, false on a CAS mismatch (read again), None on failure.
fn write(host: &mut dyn Host, k: &str, r: Record, cas: Option<u32>) -> Option<bool> {
    match host.shared_set(k, r.encode().as_bytes(), cas) {
        Ok(()) => Some(true),
        Err(SharedError::CasMismatch) => Some(false),
        Err(SharedError::Host(e)) => {
            log::warn!("aggregate: circuit breaker {k}: {e}");
            None
        }
    }
}

/// Ask the breaker of `cluster` whether a call may go.
pub fn admit(host: &mut dyn Host, cluster: &str, b: &Breaker) -> (Admit, Option<Transition>) {
    let k = key(cluster);
    let now = now_ms(host.now());
    let cool = u64::try_from(b.cool_down.as_millis()).unwrap_or(u64::MAX);
    for _ in 0..RETRIES {
        let Some((r, cas)) = read(host, &k) else {
            return (Admit::Allow { probe: false }, None);
        };
        match r.state {
            State::Closed => return (Admit::Allow { probe: false }, None),
            State::Open | State::HalfOpen => {
                // Open: wait out the cool-down. Half-open: a probe is out; if it has not come
                // back within a cool-down (its request vanished), let another probe go.
                if now.saturating_sub(r.since_ms) < cool {
                    return (Admit::Reject, None);
                }
                let next = Record {
                    state: State::HalfOpen,
                    failures: r.failures,
                    since_ms: now,
                };
                match write(host, &k, next, cas) {
                    Some(true) => {
                        return (Admit::Allow { probe: true }, Some(Transition::HalfOpened))
                    }
                    Some(false) => continue,
                    None => return (Admit::Allow { probe: false }, None),
                }
            }
        }
    }
    // Lost every race: someone else is moving the breaker; do not add load.
    (Admit::Reject, None)
}

/// Record the outcome of a call to `cluster`.
pub fn record(
    host: &mut dyn Host,
    cluster: &str,
    b: &Breaker,
    success: bool,
) -> Option<Transition> {
    let k = key(cluster);
    let now = now_ms(host.now());
    for _ in 0..RETRIES {
        let (r, cas) = read(host, &k)?;
        let (next, transition) = match (success, r.state) {
            (true, State::Closed) if r.failures == 0 => return None,
            (true, State::Closed) => (CLOSED, None),
            (true, _) => (CLOSED, Some(Transition::Closed)),
            (false, State::Closed) => {
                let failures = r.failures.saturating_add(1);
                if failures >= b.failures {
                    (
                        Record {
                            state: State::Open,
                            failures,
                            since_ms: now,
                        },
                        Some(Transition::Opened),
                    )
                } else {
                    (Record { failures, ..CLOSED }, None)
                }
            }
            (false, State::HalfOpen) => (
                Record {
                    state: State::Open,
                    failures: r.failures.saturating_add(1),
                    since_ms: now,
                },
                Some(Transition::Opened),
            ),
            // A call admitted before the breaker opened failed too: it stays open.
            (false, State::Open) => return None,
        };
        match write(host, &k, next, cas)? {
            true => return transition,
            false => continue,
        }
    }
    None
}

/// The current state (for tests and logs).
pub fn state(host: &dyn Host, cluster: &str) -> State {
    read(host, &key(cluster))
        .map(|(r, _)| r.state)
        .unwrap_or(State::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tollgate_common::mem_host::MemHost;

    const B: Breaker = Breaker {
        failures: 3,
        cool_down: Duration::from_secs(5),
    };

    #[test]
    fn opens_fails_fast_probes_and_closes_across_workers() {
        let mut w1 = MemHost::new();
        let mut w2 = w1.next_request("GET", "/", &[]);
        assert_eq!(admit(&mut w1, "users", &B).0, Admit::Allow { probe: false });
        assert_eq!(record(&mut w1, "users", &B, false), None);
        assert_eq!(record(&mut w2, "users", &B, false), None);
        // A success resets the count.
        assert_eq!(record(&mut w2, "users", &B, true), None);
        for _ in 0..2 {
            assert_eq!(record(&mut w1, "users", &B, false), None);
        }
        assert_eq!(
            record(&mut w2, "users", &B, false),
            Some(Transition::Opened)
        );
        assert_eq!(state(&w1, "users"), State::Open);
        assert_eq!(admit(&mut w1, "users", &B).0, Admit::Reject);
        assert_eq!(admit(&mut w2, "users", &B).0, Admit::Reject);
        // Other backends are not affected.
        assert_eq!(
            admit(&mut w2, "orders", &B).0,
            Admit::Allow { probe: false }
        );
        // After the cool-down exactly one probe goes through.
        w1.advance(Duration::from_secs(6));
        w2.advance(Duration::from_secs(6));
        assert_eq!(
            admit(&mut w2, "users", &B),
            (Admit::Allow { probe: true }, Some(Transition::HalfOpened))
        );
        assert_eq!(admit(&mut w1, "users", &B).0, Admit::Reject);
        // The probe fails: open again for a cool-down.
        assert_eq!(
            record(&mut w2, "users", &B, false),
            Some(Transition::Opened)
        );
        assert_eq!(admit(&mut w1, "users", &B).0, Admit::Reject);
        w1.advance(Duration::from_secs(6));
        w2.advance(Duration::from_secs(6));
        assert_eq!(admit(&mut w1, "users", &B).0, Admit::Allow { probe: true });
        assert_eq!(record(&mut w1, "users", &B, true), Some(Transition::Closed));
        assert_eq!(admit(&mut w2, "users", &B).0, Admit::Allow { probe: false });
    }

    #[test]
    fn cas_conflicts_are_retried_and_garbage_reads_as_closed() {
        let mut h = MemHost::new();
        h.shared_set("tollgate.aggregate.cb.x", b"garbage", None)
            .unwrap();
        assert_eq!(admit(&mut h, "x", &B).0, Admit::Allow { probe: false });
        h.shared.force_conflicts(2);
        let b1 = Breaker { failures: 1, ..B };
        assert_eq!(record(&mut h, "x", &b1, false), Some(Transition::Opened));
        assert_eq!(state(&h, "x"), State::Open);
    }
}
