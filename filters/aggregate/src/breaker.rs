//! Circuit breakers per backend (Envoy cluster), kept in shared data so that every worker of
//! the VM agrees.
//!
//! Key `tollgate.aggregate.cb.<cluster>`, value `<state> <consecutive failures> <since ms>
//! <lease ms> <probe>` as text, with state `closed`, `open` (since = when it opened) or
//! `half_open` (since = when the probe was let through; lease = when the probe's lease
//! expires); `probe` counts the probes, and identifies the current one. Updates are compare-and-swap with a bounded number of retries; when
//! shared data fails the breaker lets calls through (it never blocks traffic on its own error).
//!
//! A probe holds a lease as long as its call may take (its timeout plus a margin). When its
//! request ends without an outcome (reset by the client, answered before the probe came back),
//! the filter releases the lease at once ([`release`]); if even that is lost (the worker
//! died), the lease expires and the next call becomes the probe. Only the probe's own outcome
//! moves a half-open breaker; late outcomes of calls admitted while it was closed are ignored
//! once it has opened.
//!
//! The key is inserted (closed) when the configuration is loaded ([`init`]): Envoy's CAS guards
//! only an existing key, so two workers recording the first failures of a missing key could
//! both insert and one count would be lost.

use std::time::{Duration, SystemTime};

use tollgate_common::{Host, SharedError};

use crate::config::Breaker;

const RETRIES: usize = 8;
/// A probe's lease: its call's timeout plus this margin.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

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
    lease_ms: u64,
    probe: u64,
}

impl Record {
    fn encode(&self) -> String {
        let s = match self.state {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        };
        format!(
            "{s} {} {} {} {}",
            self.failures, self.since_ms, self.lease_ms, self.probe
        )
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
        let failures = it.next()?.parse().ok()?;
        let since_ms = it.next()?.parse().ok()?;
        // Records written before leases existed have none: it expired long ago.
        let lease_ms = match it.next() {
            Some(l) => l.parse().ok()?,
            None => 0,
        };
        let probe = match it.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        Some(Record {
            state,
            failures,
            since_ms,
            lease_ms,
            probe,
        })
    }
}

const CLOSED: Record = Record {
    state: State::Closed,
    failures: 0,
    since_ms: 0,
    lease_ms: 0,
    probe: 0,
};

/// May a call go to the backend?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes, an ordinary call.
    Allow,
    /// Yes, as the one probe after the cool-down; the value identifies the probe for
    /// [`record`] and [`release`].
    Probe(u64),
    /// No: the breaker is open (or half-open with a probe out).
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

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(ms)
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

/// Insert the (closed) record of `cluster` when it is missing, so that every later write is
/// guarded by a CAS.
pub fn init(host: &mut dyn Host, cluster: &str) {
    let k = key(cluster);
    if let Ok(None) = host.shared_get(&k) {
        let _ = write(host, &k, CLOSED, None);
    }
}

/// Ask the breaker of `cluster` whether a call may go; `lease` is how long a probe may take.
pub fn admit(
    host: &mut dyn Host,
    cluster: &str,
    b: &Breaker,
    lease: Duration,
) -> (Admit, Option<Transition>) {
    let k = key(cluster);
    let now = now_ms(host.now());
    let cool = ms(b.cool_down);
    for _ in 0..RETRIES {
        let Some((r, cas)) = read(host, &k) else {
            return (Admit::Allow, None);
        };
        let waiting = match r.state {
            State::Closed => return (Admit::Allow, None),
            // Open: wait out the cool-down.
            State::Open => now.saturating_sub(r.since_ms) < cool,
            // Half-open: a probe is out until its lease expires.
            State::HalfOpen => now < r.lease_ms,
        };
        if waiting {
            return (Admit::Reject, None);
        }
        let next = Record {
            state: State::HalfOpen,
            failures: r.failures,
            since_ms: now,
            lease_ms: now.saturating_add(ms(lease)),
            probe: r.probe.wrapping_add(1),
        };
        match write(host, &k, next, cas) {
            Some(true) => return (Admit::Probe(next.probe), Some(Transition::HalfOpened)),
            Some(false) => continue,
            None => return (Admit::Allow, None),
        }
    }
    // Lost every race: someone else is moving the breaker; do not add load.
    (Admit::Reject, None)
}

/// Record the outcome of a call to `cluster`; `probe` is what [`admit`] gave a probe.
pub fn record(
    host: &mut dyn Host,
    cluster: &str,
    b: &Breaker,
    success: bool,
    probe: Option<u64>,
) -> Option<Transition> {
    let k = key(cluster);
    let now = now_ms(host.now());
    for _ in 0..RETRIES {
        let (r, cas) = read(host, &k)?;
        let (next, transition) = after_outcome(b, &r, success, probe, now)?;
        match write(host, &k, next, cas)? {
            true => return transition,
            false => continue,
        }
    }
    None
}

/// What an outcome makes of the record `r` at `now` (ms): the record to write and the
/// transition, or `None` when the record stays as it is.
fn after_outcome(
    b: &Breaker,
    r: &Record,
    success: bool,
    probe: Option<u64>,
    now: u64,
) -> Option<(Record, Option<Transition>)> {
    let own_probe = r.state == State::HalfOpen && probe == Some(r.probe);
    // The probe count survives closing, so that an old probe is never taken for a new one.
    let closed = Record {
        probe: r.probe,
        ..CLOSED
    };
    let opened = |failures: u32| Record {
        state: State::Open,
        failures,
        since_ms: now,
        lease_ms: 0,
        probe: r.probe,
    };
    match (success, r.state) {
        (true, State::Closed) if r.failures == 0 => None,
        (true, State::Closed) => Some((closed, None)),
        (false, State::Closed) => {
            let failures = r.failures.saturating_add(1);
            if failures >= b.failures {
                Some((opened(failures), Some(Transition::Opened)))
            } else {
                Some((Record { failures, ..closed }, None))
            }
        }
        (true, State::HalfOpen) if own_probe => Some((closed, Some(Transition::Closed))),
        (false, State::HalfOpen) if own_probe => Some((
            opened(r.failures.saturating_add(1)),
            Some(Transition::Opened),
        )),
        // Outcomes of calls admitted before the breaker opened, or of a probe whose lease
        // was taken over, do not move an open or half-open breaker.
        (_, State::Open | State::HalfOpen) => None,
    }
}

/// The probe `probe` ended without an outcome (its request went away): let the next call
/// probe at once instead of waiting for the lease to expire.
pub fn release(host: &mut dyn Host, cluster: &str, b: &Breaker, probe: u64) {
    let k = key(cluster);
    let now = now_ms(host.now());
    for _ in 0..RETRIES {
        let Some((r, cas)) = read(host, &k) else {
            return;
        };
        if r.state != State::HalfOpen || r.probe != probe {
            return;
        }
        let next = Record {
            state: State::Open,
            failures: r.failures,
            since_ms: now.saturating_sub(ms(b.cool_down)),
            lease_ms: 0,
            probe: r.probe,
        };
        match write(host, &k, next, cas) {
            Some(false) => continue,
            _ => return,
        }
    }
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
    use tollgate_common::mem_host::MemHost;

    const B: Breaker = Breaker {
        failures: 3,
        cool_down: Duration::from_secs(5),
    };

    /// A record, an outcome (success, probe id), and the state, failures and transition after.
    type Case = (
        Record,
        bool,
        Option<u64>,
        Option<(State, u32, Option<Transition>)>,
    );

    #[test]
    fn outcomes_move_the_record_as_the_table_says() {
        let rec = |state, failures, probe| Record {
            state,
            failures,
            since_ms: 1,
            lease_ms: 0,
            probe,
        };
        let t = |r: Option<(Record, Option<Transition>)>| r.map(|(n, t)| (n.state, n.failures, t));
        let cases: &[Case] = &[
            (rec(State::Closed, 0, 0), true, None, None),
            (
                rec(State::Closed, 2, 0),
                true,
                None,
                Some((State::Closed, 0, None)),
            ),
            (
                rec(State::Closed, 1, 0),
                false,
                None,
                Some((State::Closed, 2, None)),
            ),
            (
                rec(State::Closed, 2, 0),
                false,
                None,
                Some((State::Open, 3, Some(Transition::Opened))),
            ),
            (
                rec(State::HalfOpen, 3, 7),
                true,
                Some(7),
                Some((State::Closed, 0, Some(Transition::Closed))),
            ),
            (
                rec(State::HalfOpen, 3, 7),
                false,
                Some(7),
                Some((State::Open, 4, Some(Transition::Opened))),
            ),
            // Another call's outcome (or an old probe's) does not move a half-open breaker.
            (rec(State::HalfOpen, 3, 7), true, Some(6), None),
            (rec(State::HalfOpen, 3, 7), false, None, None),
            (rec(State::Open, 3, 7), true, None, None),
            (rec(State::Open, 3, 7), false, None, None),
        ];
        for (r, success, probe, want) in cases {
            assert_eq!(
                t(after_outcome(&B, r, *success, *probe, 99)),
                *want,
                "{r:?} success={success} probe={probe:?}"
            );
        }
        // A probe's number survives closing; opening records when.
        let (n, _) = after_outcome(&B, &rec(State::HalfOpen, 3, 7), true, Some(7), 99).unwrap();
        assert_eq!(n.probe, 7);
        let (n, _) = after_outcome(&B, &rec(State::Closed, 2, 0), false, None, 99).unwrap();
        assert_eq!(n.since_ms, 99);
    }
    const LEASE: Duration = Duration::from_secs(2);

    fn probe_id(a: (Admit, Option<Transition>)) -> u64 {
        match a {
            (Admit::Probe(id), Some(Transition::HalfOpened)) => id,
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn opens_fails_fast_probes_and_closes_across_workers() {
        let mut w1 = MemHost::new();
        let mut w2 = w1.next_request("GET", "/", &[]);
        init(&mut w1, "users");
        init(&mut w2, "users");
        assert_eq!(admit(&mut w1, "users", &B, LEASE).0, Admit::Allow);
        assert_eq!(record(&mut w1, "users", &B, false, None), None);
        assert_eq!(record(&mut w2, "users", &B, false, None), None);
        // A success resets the count.
        assert_eq!(record(&mut w2, "users", &B, true, None), None);
        for _ in 0..2 {
            assert_eq!(record(&mut w1, "users", &B, false, None), None);
        }
        assert_eq!(
            record(&mut w2, "users", &B, false, None),
            Some(Transition::Opened)
        );
        assert_eq!(state(&w1, "users"), State::Open);
        assert_eq!(admit(&mut w1, "users", &B, LEASE).0, Admit::Reject);
        assert_eq!(admit(&mut w2, "users", &B, LEASE).0, Admit::Reject);
        // A late success of a call admitted before it opened does not close it.
        assert_eq!(record(&mut w1, "users", &B, true, None), None);
        assert_eq!(state(&w1, "users"), State::Open);
        // Other backends are not affected.
        assert_eq!(admit(&mut w2, "orders", &B, LEASE).0, Admit::Allow);
        // After the cool-down exactly one probe goes through.
        w1.advance(Duration::from_secs(6));
        w2.advance(Duration::from_secs(6));
        let p = probe_id(admit(&mut w2, "users", &B, LEASE));
        assert_eq!(admit(&mut w1, "users", &B, LEASE).0, Admit::Reject);
        // Outcomes of other calls do not move a half-open breaker.
        assert_eq!(record(&mut w1, "users", &B, true, None), None);
        assert_eq!(record(&mut w1, "users", &B, false, Some(p + 1)), None);
        assert_eq!(state(&w1, "users"), State::HalfOpen);
        // The probe fails: open again for a cool-down.
        assert_eq!(
            record(&mut w2, "users", &B, false, Some(p)),
            Some(Transition::Opened)
        );
        assert_eq!(admit(&mut w1, "users", &B, LEASE).0, Admit::Reject);
        w1.advance(Duration::from_secs(6));
        w2.advance(Duration::from_secs(6));
        let p = probe_id(admit(&mut w1, "users", &B, LEASE));
        assert_eq!(
            record(&mut w1, "users", &B, true, Some(p)),
            Some(Transition::Closed)
        );
        assert_eq!(admit(&mut w2, "users", &B, LEASE).0, Admit::Allow);
    }

    #[test]
    fn a_vanished_probe_is_released_or_its_lease_expires() {
        let b1 = Breaker { failures: 1, ..B };
        let mut h = MemHost::new();
        init(&mut h, "x");
        assert_eq!(
            record(&mut h, "x", &b1, false, None),
            Some(Transition::Opened)
        );
        h.advance(Duration::from_secs(6));
        // Released by its request's end: the next call probes at once.
        let p = probe_id(admit(&mut h, "x", &b1, LEASE));
        assert_eq!(admit(&mut h, "x", &b1, LEASE).0, Admit::Reject);
        release(&mut h, "x", &b1, p);
        assert_eq!(state(&h, "x"), State::Open);
        let p2 = probe_id(admit(&mut h, "x", &b1, LEASE));
        assert_ne!(p, p2);
        // Releasing an old probe does nothing to the new one.
        release(&mut h, "x", &b1, p);
        assert_eq!(state(&h, "x"), State::HalfOpen);
        // Not released (its worker went away): after the lease (not a cool-down) another probe.
        h.advance(LEASE - Duration::from_millis(1));
        assert_eq!(admit(&mut h, "x", &b1, LEASE).0, Admit::Reject);
        h.advance(Duration::from_millis(1));
        let p3 = probe_id(admit(&mut h, "x", &b1, LEASE));
        // The expired probe's late answer is ignored; the new one decides.
        assert_eq!(record(&mut h, "x", &b1, true, Some(p2)), None);
        assert_eq!(
            record(&mut h, "x", &b1, true, Some(p3)),
            Some(Transition::Closed)
        );
    }

    #[test]
    fn cas_conflicts_are_retried_and_garbage_reads_as_closed() {
        let mut h = MemHost::new();
        h.shared_set("tollgate.aggregate.cb.x", b"garbage", None)
            .unwrap();
        assert_eq!(admit(&mut h, "x", &B, LEASE).0, Admit::Allow);
        h.shared.force_conflicts(2);
        let b1 = Breaker { failures: 1, ..B };
        assert_eq!(
            record(&mut h, "x", &b1, false, None),
            Some(Transition::Opened)
        );
        assert_eq!(state(&h, "x"), State::Open);
        // Records without a lease (older format) still decode.
        h.shared_set("tollgate.aggregate.cb.y", b"half_open 3 1000", None)
            .unwrap();
        assert_eq!(state(&h, "y"), State::HalfOpen);
        assert!(matches!(admit(&mut h, "y", &b1, LEASE).0, Admit::Probe(_)));
    }

    #[test]
    fn init_inserts_closed_once() {
        let mut h = MemHost::new();
        init(&mut h, "x");
        let (v, _) = h.shared_get("tollgate.aggregate.cb.x").unwrap().unwrap();
        assert_eq!(v, b"closed 0 0 0 0");
        let b1 = Breaker { failures: 1, ..B };
        record(&mut h, "x", &b1, false, None);
        init(&mut h, "x");
        assert_eq!(state(&h, "x"), State::Open);
    }
}
