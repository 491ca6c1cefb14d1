//! Global limits: decided by a rate limit service (Envoy's RLS protocol over gRPC) for the whole
//! fleet of Envoys.
//!
//! A request whose route has global limits: its local limits are first only looked at (a
//! request they refuse costs no call); then each `leased` limit takes from its lease in shared
//! data (no network wait while the lease lasts), and each `exact` limit (or a leased one with
//! no lease) is asked with one `ShouldRateLimit` call, the request paused until every answer
//! is in; then the local limits take their units. Refills of leases are asked for by requests
//! (the one that finds its lease running low) and sent by the worker's root on its next tick:
//! a call a request starts would die with the request, the root's live on.

use std::time::Duration;

use tollgate_common::{GrpcCall, GrpcResponse, Host, Problem};

use super::{
    now_us, Check, Decision, Outcome, Pass, RateLimitFilter, RateLimitRoot, Total, Verdict, Worker,
};
use crate::client::{self, Client, KeyContext, KeySpec};
use crate::config::{Compiled, Consistency, FailureMode, Limit, LimitMetric};
use crate::lease::{self, Refilled, Sizing};
use crate::rls::{self, Answer, Failure, RLS_METHOD, RLS_SERVICE};
use crate::table::{Slot, StoreError};
use tollgate_common::route::RequestInfo;

/// How soon a root sends the lease refills requests asked for: the tick a request that queues
/// the first refill starts, stopped by the tick that leaves none queued (an idle root never
/// wakes).
pub const REFILL_TICK: Duration = Duration::from_millis(20);
/// Failures of the service are logged at most once per this interval (per worker), with the
/// number of failures since the last line.
pub const FAILURE_LOG_INTERVAL_US: u64 = 10_000_000;

/// A lease refill asked for by a request, sent by the root.
#[derive(Debug, Clone)]
pub struct Refill {
    limit: usize,
    slot: Slot,
    /// The key's values (see [`Check`]).
    values: Vec<String>,
    size: u64,
}

/// A refill the root sent.
#[derive(Debug, Clone)]
pub struct Inflight {
    refill: Refill,
    /// When it was sent (µs).
    sent: u64,
}

/// What a request with global limits carries until it is decided.
pub struct Request {
    /// Its local limits (taken after the global ones admitted it).
    pub local: Vec<Check>,
    /// Consumer and plan.
    pub client: Client,
    /// Method, host, path, query.
    pub req: RequestInfo,
    /// Its route: index into the configuration's routes (the `route` key source is its name).
    pub route: usize,
    /// Units it costs.
    pub cost: u64,
}

impl Request {
    /// What its limit keys are built from.
    fn key<'a>(&'a self, config: &'a Compiled) -> KeyContext<'a> {
        let route_name = config
            .routes
            .0
            .get(self.route)
            .map_or("", |r| r.name.as_str());
        KeyContext::new(config, &self.client, &self.req, route_name)
    }

    /// A decision pass over its limits at `now`.
    fn pass<'a>(&'a self, config: &'a Compiled, now: u64) -> Pass<'a> {
        Pass {
            key: self.key(config),
            now,
            cost: self.cost,
        }
    }
}

/// The descriptor entries of `check` (a `leased` limit's are read only when first needed: a
/// call or a refill).
fn entries<'c>(
    host: &dyn Host,
    check: &'c mut Check,
    limit: &Limit,
    key: &KeyContext<'_>,
) -> &'c [String] {
    check
        .entries
        .get_or_insert_with(|| {
            client::values(host, key, KeySpec::from(limit))
                .map(client::owned)
                .unwrap_or_default()
        })
        .as_slice()
}

/// A request waiting for the service.
pub struct Paused {
    request: Request,
    /// Verdicts of the global limits so far.
    verdicts: Vec<Verdict>,
    /// Calls in flight.
    waiting: Vec<Waiting>,
    /// A global limit failed closed.
    deny: bool,
}

struct Waiting {
    token: u32,
    check: Check,
    sent: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The verdict of a global limit: `remaining` and `reset` as the service or the lease said.
fn verdict(
    limit: &Limit,
    check: &Check,
    admitted: bool,
    remaining: Option<u64>,
    reset_us: Option<u64>,
) -> Verdict {
    let params = limit.params;
    Verdict {
        limit: check.limit,
        plan: 0,
        params,
        outcome: Outcome {
            admitted,
            next: None,
            remaining: remaining.unwrap_or(0),
            // Refused without a reset time: retry after a window at most.
            reset_us: reset_us.unwrap_or(if admitted { 0 } else { params.window_us }),
            warn: false,
        },
        reported: !admitted || (remaining.is_some() && reset_us.is_some()),
    }
}

impl Worker {
    /// Queue a refill for the root's next tick, starting the tick when it is idle (the timer is
    /// the root's, whichever context asks).
    fn ask_refill(&self, host: &mut dyn Host, refill: Refill) {
        self.refills.borrow_mut().push(refill);
        if !self.ticking.replace(true) {
            host.set_tick_period(REFILL_TICK);
        }
    }

    /// Count a failure of the service for `limit` and log it, at most once per interval.
    fn service_failed(
        &self,
        host: &mut dyn Host,
        context_id: u32,
        limit: usize,
        what: &str,
        now: u64,
    ) {
        self.ids.count(host, Total::RlsFailures);
        self.ids.count(host, Total::Failures);
        self.ids.count_limit(host, limit, LimitMetric::RlsFailures);
        let (last, quiet) = self.failure_log.get();
        if last != 0 && now.saturating_sub(last) < FAILURE_LOG_INTERVAL_US {
            self.failure_log.set((last, quiet + 1));
            return;
        }
        self.failure_log.set((now, 0));
        let Some(l) = self.config.limits.get(limit) else {
            return;
        };
        let mode = match l.global.map(|g| g.failure_mode) {
            Some(FailureMode::Deny) => "deny",
            _ => "allow",
        };
        log::warn!(
            "[{context_id}] rate limit service (cluster `{}`): limit `{}`: {what}; failure mode `{mode}` ({quiet} more failures since the last report)",
            self.config.service.cluster,
            l.name
        );
    }

    /// Start a `ShouldRateLimit` call of `hits` units for `limit`'s descriptor with the key's
    /// `values`.
    fn call(
        &self,
        host: &mut dyn Host,
        limit: usize,
        values: &[String],
        hits: u64,
    ) -> Result<u32, Failure> {
        let (Some(l), Some(g)) = (
            self.config.limits.get(limit),
            self.config.limits.get(limit).and_then(|l| l.global),
        ) else {
            return Err(Failure::Dispatch);
        };
        let entries: Vec<(String, String)> = l
            .key
            .iter()
            .zip(values)
            .map(|(source, v)| (rls::entry_key(source), rls::entry_value(source, v.clone())))
            .collect();
        let message = rls::request(&self.config.service.domain, &l.name, &entries, hits);
        self.ids.count(host, Total::RlsCalls);
        self.ids.count_limit(host, limit, LimitMetric::RlsCalls);
        host.grpc_call(&GrpcCall {
            cluster: &self.config.service.cluster,
            service: RLS_SERVICE,
            method: RLS_METHOD,
            metadata: Vec::new(),
            message: &message,
            timeout: g.timeout,
        })
        .map_err(|_| Failure::Dispatch)
    }
}

impl RateLimitFilter {
    /// Decide a request with global limits (see the module's documentation).
    pub(super) fn start_global(
        &mut self,
        host: &mut dyn Host,
        request: Request,
        globals: Vec<Check>,
    ) -> Decision {
        let now = now_us(host);
        let shared = self.shared.clone();
        let config = &shared.config;
        if !request.local.is_empty() {
            if let Err(d) = self.judge(host, &request.local, &request.pass(config, now), false) {
                return d;
            }
        }
        let cost = request.cost;
        let mut verdicts = Vec::with_capacity(globals.len());
        let mut deny = false;
        let mut calls = Vec::new();
        for mut check in globals {
            let Some(limit) = config.limits.get(check.limit) else {
                continue;
            };
            let leased = limit.global.is_some_and(|g| g.mode == Consistency::Leased);
            if !leased {
                calls.push(check);
                continue;
            }
            let key = request.key(config);
            match self.take_lease(host, limit, &mut check, &key, now, cost) {
                Ok(Some(v)) => verdicts.push(v),
                Ok(None) => {
                    entries(host, &mut check, limit, &key);
                    calls.push(check);
                }
                Err(e) => {
                    // Shared data, not the service: counted as the local limits' failures.
                    let ids = &shared.ids;
                    ids.count(host, Total::Failures);
                    if e == StoreError::CasExhausted {
                        ids.count(host, Total::CasExhausted);
                        ids.count_limit(host, check.limit, LimitMetric::CasExhausted);
                    }
                    log::warn!(
                        "[{}] limit `{}`: lease not updated: {e}",
                        self.context_id,
                        limit.name
                    );
                    deny |= limit
                        .global
                        .is_some_and(|g| g.failure_mode == FailureMode::Deny);
                }
            }
        }
        let mut paused = Paused {
            request,
            verdicts,
            waiting: Vec::new(),
            deny,
        };
        if !paused.deny && !self.refused(&paused.verdicts) {
            for check in calls {
                match shared.call(
                    host,
                    check.limit,
                    check.entries.as_deref().unwrap_or(&[]),
                    cost,
                ) {
                    Ok(token) => paused.waiting.push(Waiting {
                        token,
                        check,
                        sent: now,
                    }),
                    Err(f) => self.failed(host, &mut paused, check.limit, &f.to_string(), now),
                }
            }
        }
        if paused.waiting.is_empty() {
            return self.finish(host, paused);
        }
        self.paused = Some(paused);
        Decision::Pause
    }

    /// Take from the lease: a verdict, or `None` when the request must call the service.
    fn take_lease(
        &self,
        host: &mut dyn Host,
        limit: &Limit,
        check: &mut Check,
        key: &KeyContext<'_>,
        now: u64,
        cost: u64,
    ) -> Result<Option<Verdict>, StoreError> {
        let Some(g) = limit.global else {
            return Ok(None);
        };
        let slot = limit.table.slot(check.key);
        let pending_ms = micros(g.timeout + REFILL_TICK * 2) / 1000;
        let sizing = Sizing {
            lease_max: g.lease_max,
            pending_ms: u32::try_from(pending_ms).unwrap_or(u32::MAX),
        };
        let t = lease::take(&limit.table, host, slot, now, cost, sizing)?;
        let ids = &self.shared.ids;
        ids.add_limit(host, check.limit, LimitMetric::LeaseUnused, t.unused);
        if let Some(size) = t.refill {
            let values = entries(host, check, limit, key).to_vec();
            self.shared.ask_refill(
                host,
                Refill {
                    limit: check.limit,
                    slot,
                    values,
                    size,
                },
            );
        }
        Ok(match t.verdict {
            lease::Verdict::Admit { left, reset_us } => {
                Some(verdict(limit, check, true, Some(left), Some(reset_us)))
            }
            lease::Verdict::Refuse { reset_us } => {
                Some(verdict(limit, check, false, Some(0), Some(reset_us)))
            }
            lease::Verdict::Call => None,
        })
    }

    /// A global limit could not be decided: count, log (once per interval), and fail open
    /// (the limit is left out) or closed.
    fn failed(&self, host: &mut dyn Host, paused: &mut Paused, limit: usize, what: &str, now: u64) {
        self.shared
            .service_failed(host, self.context_id, limit, what, now);
        let deny = self
            .limit(limit)
            .and_then(|l| l.global)
            .is_some_and(|g| g.failure_mode == FailureMode::Deny);
        paused.deny |= deny;
    }

    fn refused(&self, verdicts: &[Verdict]) -> bool {
        verdicts
            .iter()
            .any(|v| !v.outcome.admitted && self.enforced(v))
    }

    /// An answer of the service to this request.
    pub(super) fn answered(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: &GrpcResponse,
    ) -> Decision {
        let Some(mut paused) = self.paused.take() else {
            return Decision::Continue;
        };
        let Some(i) = paused.waiting.iter().position(|w| w.token == token) else {
            self.paused = Some(paused);
            return Decision::Pause;
        };
        let w = paused.waiting.swap_remove(i);
        let now = now_us(host);
        let shared = self.shared.clone();
        let Some(limit) = shared.config.limits.get(w.check.limit) else {
            return self.resume(host, paused);
        };
        match rls::answer(response) {
            Answer::Ok { remaining, reset } => {
                let reset_us = reset.map(micros);
                paused
                    .verdicts
                    .push(verdict(limit, &w.check, true, remaining, reset_us));
            }
            Answer::OverLimit { remaining, reset } => {
                let reset_us = reset.map(micros);
                if limit.global.is_some_and(|g| g.mode == Consistency::Leased) {
                    // Later requests of this key are refused locally until the window ends.
                    let slot = limit.table.slot(w.check.key);
                    let window = limit.params.window_us;
                    let exhausted = Refilled::Exhausted { reset_us };
                    let _ = lease::apply(&limit.table, host, slot, now, w.sent, window, exhausted);
                }
                paused
                    .verdicts
                    .push(verdict(limit, &w.check, false, remaining, reset_us));
            }
            Answer::Failed(f) => self.failed(host, &mut paused, w.check.limit, &f.to_string(), now),
        }
        self.resume(host, paused)
    }

    fn resume(&mut self, host: &mut dyn Host, paused: Paused) -> Decision {
        if !paused.waiting.is_empty() {
            self.paused = Some(paused);
            return Decision::Pause;
        }
        self.finish(host, paused)
    }

    /// Every global limit is decided: refuse, or take the local limits' units and admit.
    fn finish(&mut self, host: &mut dyn Host, paused: Paused) -> Decision {
        let Paused {
            request,
            mut verdicts,
            deny,
            ..
        } = paused;
        if deny {
            self.replied = true;
            return Decision::Respond(
                Problem::new(503)
                    .detail("the rate limit service is unavailable")
                    .into_reply()
                    .with_header("retry-after", "1"),
            );
        }
        if self.refused(&verdicts) {
            return self.refuse(host, &verdicts, &request.req.path);
        }
        if !request.local.is_empty() {
            let shared = self.shared.clone();
            let pass = request.pass(&shared.config, now_us(host));
            match self.decide(host, &request.local, &pass) {
                Ok(v) => verdicts.extend(v),
                Err(d) => return d,
            }
            // The rate limit fields in the configuration's order of limits.
            verdicts.sort_by_key(|v| v.limit);
        }
        self.admit(host, verdicts)
    }
}

impl RateLimitRoot {
    /// Send the refills requests asked for since the last tick.
    pub(super) fn send_refills(&mut self, host: &mut dyn Host) {
        let refills = std::mem::take(&mut *self.shared.refills.borrow_mut());
        if refills.is_empty() {
            return;
        }
        let now = now_us(host);
        let shared = self.shared.clone();
        for refill in refills {
            match shared.call(host, refill.limit, &refill.values, refill.size) {
                Ok(token) => {
                    self.inflight.insert(token, Inflight { refill, sent: now });
                }
                Err(f) => self.refill_answer(host, &refill, now, now, Err(f)),
            }
        }
    }

    /// The service answered a refill.
    pub(super) fn refilled(&mut self, host: &mut dyn Host, token: u32, response: &GrpcResponse) {
        let Some(inflight) = self.inflight.remove(&token) else {
            return;
        };
        let now = now_us(host);
        let answer = match rls::answer(response) {
            Answer::Failed(f) => Err(f),
            a => Ok(a),
        };
        self.refill_answer(host, &inflight.refill, inflight.sent, now, answer);
    }

    fn refill_answer(
        &mut self,
        host: &mut dyn Host,
        refill: &Refill,
        sent: u64,
        now: u64,
        answer: Result<Answer, Failure>,
    ) {
        let shared = self.shared.clone();
        let Some(limit) = shared.config.limits.get(refill.limit) else {
            return;
        };
        let ids = &shared.ids;
        let applied = match answer {
            Ok(Answer::Ok { reset, .. }) => {
                ids.count_limit(host, refill.limit, LimitMetric::LeaseRefills);
                if reset.is_none() {
                    ids.add_limit(
                        host,
                        refill.limit,
                        LimitMetric::OverAdmissionBound,
                        refill.size,
                    );
                }
                Refilled::Granted {
                    units: refill.size,
                    reset_us: reset.map(micros),
                }
            }
            Ok(Answer::OverLimit {
                remaining: Some(left),
                ..
            }) if left >= 1 && left < refill.size => {
                // Fewer units left than asked for: ask for what is left (next tick).
                shared.ask_refill(
                    host,
                    Refill {
                        size: left,
                        ..refill.clone()
                    },
                );
                return;
            }
            Ok(Answer::OverLimit { reset, .. }) => Refilled::Exhausted {
                reset_us: reset.map(micros),
            },
            Ok(Answer::Failed(f)) | Err(f) => {
                shared.service_failed(host, self.context_id, refill.limit, &f.to_string(), now);
                Refilled::Failed
            }
        };
        let window = limit.params.window_us;
        match lease::apply(&limit.table, host, refill.slot, now, sent, window, applied) {
            Ok(unused) => ids.add_limit(host, refill.limit, LimitMetric::LeaseUnused, unused),
            Err(e) => {
                shared.service_failed(host, self.context_id, refill.limit, &e.to_string(), now)
            }
        }
    }
}
