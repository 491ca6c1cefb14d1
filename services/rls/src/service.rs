//! `ShouldRateLimit`: the request's descriptors become Limitador's `descriptors` (a list of maps
//! of their entries), its `domain` the namespace, `hits_addend` the units. The limits of the
//! namespace whose conditions hold apply; each gives one counter (per value of its variables), and
//! the call takes `hits_addend` from all of them or, if one has no room, from none
//! ([`Store::check_and_increment`], atomic).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use limitador::counter::Counter;
use limitador::limit::Context;
use tollgate_rls_proto::{
    Code, DescriptorStatus, RateLimit, RateLimitRequest, RateLimitResponse, Unit,
};

use crate::limits::LimitDef;
use crate::store::{CounterRef, CounterState, Store};

/// Why a call could not be decided (answered with gRPC `UNAVAILABLE`).
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The storage failed (Redis down, a script error, ...).
    Storage(String),
    /// The storage did not answer within the timeout.
    Timeout,
    /// The storage is known to be down (its last calls failed): answered at once, without
    /// waiting for it ([`Breaker`]).
    FastFail,
}

/// The rate limit service: limits by namespace, and the counters.
pub struct RateLimitService {
    store: Store,
    limits: HashMap<String, Vec<LimitDef>>,
    timeout: Duration,
    failures: FailureLog,
    breaker: Breaker,
}

impl RateLimitService {
    /// A service deciding `limits` with counters in `store`; a storage call longer than
    /// `timeout` fails.
    pub fn new(store: Store, limits: Vec<LimitDef>, timeout: Duration) -> Self {
        let mut by_ns: HashMap<String, Vec<LimitDef>> = HashMap::new();
        for l in limits {
            by_ns
                .entry(l.limit.namespace().as_ref().to_string())
                .or_default()
                .push(l);
        }
        RateLimitService {
            store,
            limits: by_ns,
            timeout,
            failures: FailureLog::new(Duration::from_secs(10)),
            breaker: Breaker::default(),
        }
    }

    /// Decide one request.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, Failure> {
        let values: Vec<HashMap<String, String>> = req
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_string(), values);
        let counters = self.counters(&req.domain, &ctx);
        if counters.is_empty() {
            return Ok(answer(req, true, &[]));
        }
        let refs: Vec<CounterRef> = counters.iter().map(|(r, _)| r.clone()).collect();
        let delta = u64::from(req.hits_addend.max(1));
        if !self.breaker.admit(Instant::now()) {
            self.failures.record("storage down, failing fast");
            return Err(Failure::FastFail);
        }
        let decided =
            tokio::time::timeout(self.timeout, self.store.check_and_increment(&refs, delta)).await;
        let outcome = match decided {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                self.breaker.failed(Instant::now());
                self.failures.record(&e);
                return Err(Failure::Storage(e));
            }
            Err(_) => {
                self.breaker.failed(Instant::now());
                self.failures.record("storage timed out");
                return Err(Failure::Timeout);
            }
        };
        self.breaker.succeeded();
        let seen: Vec<Seen> = counters
            .iter()
            .zip(&outcome.states)
            .map(|((r, name), st)| Seen {
                max: r.max,
                window: r.window,
                name: name.clone(),
                state: *st,
            })
            .collect();
        Ok(answer(req, outcome.admitted, &seen))
    }

    /// The counters of the limits of `namespace` that apply: their conditions hold and their
    /// variables are in the descriptors. A condition that cannot be evaluated does not hold.
    fn counters(&self, namespace: &str, ctx: &Context) -> Vec<(CounterRef, String)> {
        let Some(limits) = self.limits.get(namespace) else {
            return Vec::new();
        };
        limits
            .iter()
            .filter(|l| l.predicates.iter().all(|p| p.test(ctx).unwrap_or(false)))
            .filter_map(|l| {
                let counter = Counter::new(l.limit.clone(), ctx).ok().flatten()?;
                let vars = serde_json::to_string(counter.set_variables()).ok()?;
                Some((
                    CounterRef {
                        key: format!("tollgate-rls:{}:{vars}", l.id),
                        max: l.limit.max_value(),
                        window: Duration::from_secs(l.limit.seconds()),
                    },
                    l.limit.name().unwrap_or_default().to_string(),
                ))
            })
            .collect()
    }
}

/// A counter as the call left it.
struct Seen {
    max: u64,
    window: Duration,
    name: String,
    state: CounterState,
}

/// The answer: the overall code, and for each descriptor the most restrictive counter of the
/// call (fewest units left): its limit, the units left, the time until its window ends. No
/// counter (no limit applies): OK, with no `current_limit`.
fn answer(req: &RateLimitRequest, admitted: bool, counters: &[Seen]) -> RateLimitResponse {
    let code = if admitted { Code::Ok } else { Code::OverLimit } as i32;
    let left = |c: &Seen| c.max.saturating_sub(c.state.used);
    let status = match counters.iter().min_by_key(|c| left(c)) {
        Some(c) => DescriptorStatus {
            code,
            current_limit: Some(RateLimit {
                requests_per_unit: u32::try_from(c.max).unwrap_or(u32::MAX),
                unit: unit_of(c.window) as i32,
                name: c.name.clone(),
            }),
            limit_remaining: u32::try_from(left(c)).unwrap_or(u32::MAX),
            duration_until_reset: Some(tollgate_rls_proto::Duration::from_millis(
                u64::try_from(c.state.resets_in.as_millis()).unwrap_or(u64::MAX),
            )),
        },
        None => DescriptorStatus {
            code,
            current_limit: None,
            limit_remaining: 0,
            duration_until_reset: None,
        },
    };
    RateLimitResponse {
        overall_code: code,
        statuses: vec![status; req.descriptors.len()],
        response_headers_to_add: Vec::new(),
        request_headers_to_add: Vec::new(),
    }
}

fn unit_of(window: Duration) -> Unit {
    match window.as_secs() {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    }
}

/// Storage failures are logged once per interval with a count, never once per call.
struct FailureLog {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    since: AtomicU64,
}

/// Storage calls that failed in a row before the service fails fast.
pub const TRIP_AFTER: u32 = 3;
/// While failing fast, one call per this interval tries the storage (a probe); the first that
/// succeeds ends the outage.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

/// Fails fast while the storage is down: after [`TRIP_AFTER`] storage calls failed in a row
/// (an error or the timeout), calls are answered `UNAVAILABLE` at once instead of each waiting
/// for the storage's timeout, except one call per [`PROBE_EVERY`], which tries the storage; the
/// first success closes the breaker. A single failure (a blip) changes nothing. While the
/// storage answers, a call reads one atomic counter (no lock).
#[derive(Debug, Default)]
pub struct Breaker {
    failures_in_a_row: AtomicU32,
    /// While tripped: when the next probe may go (set by the failure that trips it).
    next_probe: Mutex<Option<Instant>>,
}

impl Breaker {
    /// May a call at `now` try the storage?
    pub fn admit(&self, now: Instant) -> bool {
        if self.failures_in_a_row.load(Ordering::Relaxed) < TRIP_AFTER {
            return true;
        }
        let Ok(mut next) = self.next_probe.lock() else {
            return true;
        };
        match *next {
            Some(t) if now < t => false,
            _ => {
                *next = Some(now + PROBE_EVERY);
                true
            }
        }
    }

    /// A storage call failed at `now`.
    pub fn failed(&self, now: Instant) {
        let before = self
            .failures_in_a_row
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        if before.saturating_add(1) >= TRIP_AFTER {
            if let Ok(mut next) = self.next_probe.lock() {
                *next = Some(now + PROBE_EVERY);
            }
        }
    }

    /// A storage call succeeded (a write only when failures were counted: the next trip sets
    /// its own probe time).
    pub fn succeeded(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
    }
}

impl FailureLog {
    fn new(interval: Duration) -> Self {
        FailureLog {
            interval,
            last: Mutex::new(None),
            since: AtomicU64::new(0),
        }
    }

    fn record(&self, what: &str) {
        let n = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            return;
        }
        *last = Some(now);
        self.since.store(0, Ordering::Relaxed);
        eprintln!(
            "tollgate-rls: storage failure ({n} since the last report): {what}; answering UNAVAILABLE"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_rls_proto::{Entry, RateLimitDescriptor};

    fn service(yaml: &str) -> RateLimitService {
        let limits = crate::limits::parse(yaml).unwrap();
        RateLimitService::new(Store::memory(), limits, Duration::from_secs(1))
    }

    fn request(limit: &str, consumer: &str, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "limit".into(),
                        value: limit.into(),
                    },
                    Entry {
                        key: "consumer".into(),
                        value: consumer.into(),
                    },
                ],
            }],
            hits_addend: hits,
        }
    }

    const LIMITS: &str = "- namespace: tollgate\n  name: a\n  max_value: 5\n  seconds: 60\n  \
        conditions: [\"descriptors[0].limit == 'a'\"]\n  variables: [\"descriptors[0].consumer\"]\n";

    #[tokio::test]
    async fn counts_per_variable_and_reports_the_tightest_counter() {
        let s = service(LIMITS);
        let r = s
            .should_rate_limit(&request("a", "alice", 3))
            .await
            .unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        let st = &r.statuses[0];
        assert_eq!(st.limit_remaining, 2);
        assert_eq!(
            st.current_limit.as_ref().map(|l| l.unit),
            Some(Unit::Minute as i32)
        );
        assert!(st.duration_until_reset.is_some());
        // 3 more do not fit in the 2 left: refused, nothing taken
        let r = s
            .should_rate_limit(&request("a", "alice", 3))
            .await
            .unwrap();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let r = s
            .should_rate_limit(&request("a", "alice", 2))
            .await
            .unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        // another consumer has its own counter
        let r = s.should_rate_limit(&request("a", "bob", 0)).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 4);
    }

    #[test]
    fn the_breaker_fails_fast_after_failures_in_a_row_and_probes() {
        let b = Breaker::default();
        let t0 = Instant::now();
        // a blip, then a success: nothing changes
        b.failed(t0);
        b.succeeded();
        for i in 0..TRIP_AFTER {
            assert!(b.admit(t0), "call {i} before the trip tries the storage");
            b.failed(t0);
        }
        assert!(!b.admit(t0), "tripped: fail fast");
        assert!(!b.admit(t0 + PROBE_EVERY / 2));
        let t1 = t0 + PROBE_EVERY;
        assert!(b.admit(t1), "one probe per interval");
        assert!(!b.admit(t1), "only one");
        b.failed(t1);
        assert!(!b.admit(t1 + PROBE_EVERY / 2));
        let t2 = t1 + PROBE_EVERY;
        assert!(b.admit(t2));
        b.succeeded();
        assert!(b.admit(t2) && b.admit(t2), "closed again");
    }

    #[tokio::test]
    async fn no_matching_limit_is_ok_without_a_current_limit() {
        let s = service(LIMITS);
        for domain in ["tollgate", "other"] {
            let mut req = request("b", "alice", 1);
            req.domain = domain.into();
            let r = s.should_rate_limit(&req).await.unwrap();
            assert_eq!(r.overall_code, Code::Ok as i32);
            assert_eq!(r.statuses.len(), 1);
            assert!(r.statuses[0].current_limit.is_none());
        }
    }
}
