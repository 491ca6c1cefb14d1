//! Request handling of the ratelimit filter.
//!
//! For each request: find the route rule, build the client key of each of its limits, then
//! decide in two phases when several limits apply: first look at every limit without taking
//! anything; only if every enforced limit would admit the request take the units from each
//! (each take is itself a read-decide-CAS on shared data, so it is exact across workers). A
//! refused request takes nothing. With one limit the take is the only phase.

use std::borrow::{Borrow, Cow};
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::UNIX_EPOCH;
use tollgate_common::fast_hash::FastMap;

use tollgate_common::metrics::Metrics;
use tollgate_common::route::RequestInfo;
use tollgate_common::{
    ConfigError, Decision, GrpcResponse, HeaderReads, Host, HttpFilter, MapKind, MetricKind,
    Problem, RootFilter,
};

use crate::algo::{evaluate, Outcome, Params};
use crate::client::{self, Client, KeyContext, KeySpec};
use crate::config::{
    AppliesTo, Compiled, Consistency, FailureMode, HeaderMode, Limit, LimitMetric, Route,
};
use crate::table::StoreError;
use tollgate_common::decimal::push_u64;

/// Problem type of 429 answers (draft-ietf-httpapi-ratelimit-headers-10).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
/// Its title in the draft.
pub const QUOTA_EXCEEDED_TITLE: &str =
    "Request cannot be satisfied as assigned quota has been exceeded";
/// Response header naming the shadow limits that would have refused the request.
pub const SHADOW_HEADER: &str = "x-tollgate-ratelimit-shadow";

/// Per-VM state: the compiled configuration and metrics, and the lease refills in flight.
pub struct RateLimitRoot {
    context_id: u32,
    shared: Rc<Worker>,
    /// Lease refills this root sent, by token.
    inflight: FastMap<u32, global::Inflight>,
}

/// What every request of a VM shares.
pub struct Worker {
    /// The compiled configuration.
    pub config: Compiled,
    /// The filter's metrics (gauges set at load).
    pub metrics: Metrics,
    /// Ids of the counters, defined at load: a request increments by id (no name lookup).
    ids: Ids,
    /// Lease refills asked for by requests, sent by the root on its next tick.
    refills: RefCell<Vec<global::Refill>>,
    /// The root's tick runs (it runs only while refills wait to be sent).
    ticking: Cell<bool>,
    /// Failures of the rate limit service: when one was last logged (µs), and how many were
    /// not logged since.
    failure_log: Cell<(u64, u64)>,
}

/// Counter ids: the totals (indexed by [`Total`]) and each limit's (by [`LimitMetric`]).
#[derive(Debug, Default)]
struct Ids {
    totals: [Option<u32>; 9],
    limits: Vec<[Option<u32>; 9]>,
}

/// A total counter (index into [`TOTALS`]).
#[derive(Debug, Clone, Copy)]
enum Total {
    Skipped = 0,
    Allowed = 1,
    Limited = 2,
    ShadowLimited = 3,
    Failures = 4,
    CasExhausted = 5,
    Evictions = 6,
    RlsCalls = 7,
    RlsFailures = 8,
}

impl Ids {
    fn define(host: &mut dyn Host, metrics: &Metrics, config: &Compiled) -> Ids {
        let mut define = |name: &str| {
            host.define_metric(MetricKind::Counter, &metrics.full_name(name))
                .ok()
        };
        Ids {
            totals: TOTALS.map(&mut define),
            limits: config
                .limits
                .iter()
                .map(|l| {
                    let n = &l.metric_names;
                    std::array::from_fn(|i| n.get(i).and_then(|m| define(m)))
                })
                .collect(),
        }
    }

    fn count(&self, host: &mut dyn Host, total: Total) {
        if let Some(Some(id)) = self.totals.get(total as usize) {
            host.increment_metric(*id, 1);
        }
    }

    fn count_limit(&self, host: &mut dyn Host, limit: usize, m: LimitMetric) {
        self.add_limit(host, limit, m, 1);
    }

    fn add_limit(&self, host: &mut dyn Host, limit: usize, m: LimitMetric, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Some(id)) = self.limits.get(limit).and_then(|ids| ids.get(m as usize)) {
            host.increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// A request counts in exactly one of the outcome counters (`skipped`, `allowed`, `limited`),
/// or, refused 503 by a `deny` failure mode, in `failures`: there is no `requests` counter.
const TOTALS: [&str; 9] = [
    "skipped",
    "allowed",
    "limited",
    "shadow_limited",
    "failures",
    "cas_exhausted",
    "evictions",
    "rls_calls",
    "rls_failures",
];

impl RootFilter for RateLimitRoot {
    type Filter = RateLimitFilter;
    const NAME: &'static str = "ratelimit";
    // The rate limit headers are added to the response headers; no body is read; nothing to
    // do when a request ends (no `proxy_on_done`: one entry fewer per request).
    const HOOKS: tollgate_common::filter::Hooks = tollgate_common::filter::Hooks {
        response_headers: true,
        ..tollgate_common::filter::Hooks::NONE
    };

    fn new(context_id: u32) -> Self {
        RateLimitRoot {
            context_id,
            shared: Rc::new(Worker {
                config: Compiled::default(),
                metrics: Metrics::new("ratelimit"),
                ids: Ids::default(),
                refills: RefCell::new(Vec::new()),
                ticking: Cell::new(false),
                failure_log: Cell::new((0, 0)),
            }),
            inflight: FastMap::default(),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config = Compiled::parse(configuration)?;
        let metrics = Metrics::new("ratelimit");
        let ids = Ids::define(host, &metrics, &config);
        let mut keys = 0u64;
        let mut bound = 0usize;
        for limit in &config.limits {
            if limit.global.is_some_and(|g| g.mode == Consistency::Exact) {
                // Decided by the service for each request: no table.
                continue;
            }
            // Every bucket exists before traffic, so that every update is guarded by a CAS.
            if let Err(e) = limit.table.allocate(host) {
                log::warn!(
                    "[{}] limit `{}`: could not allocate its table ({e}); buckets are created on first use",
                    self.context_id,
                    limit.name
                );
            }
            keys += u64::from(limit.table.buckets()) + 1;
            bound += limit.table.bytes_bound();
        }
        metrics.gauge_set(host, "shared_keys", keys);
        metrics.gauge_set(host, "shared_bytes_bound", bound as u64);
        log::info!(
            "[{}] {} limits, {} routes; counters in {keys} shared-data keys, at most {bound} bytes",
            self.context_id,
            config.limits.len(),
            config.routes.0.len()
        );
        // Refills in flight belong to the previous configuration (its limits' indexes).
        self.inflight.clear();
        if self.shared.ticking.get() {
            host.set_tick_period(std::time::Duration::ZERO);
        }
        self.shared = Rc::new(Worker {
            config,
            metrics,
            ids,
            refills: RefCell::new(Vec::new()),
            ticking: Cell::new(false),
            failure_log: Cell::new((0, 0)),
        });
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        self.send_refills(host);
        // Idle until a request asks for a refill (a refill answered "fewer left" asks again).
        if self.shared.refills.borrow().is_empty() && self.shared.ticking.replace(false) {
            host.set_tick_period(std::time::Duration::ZERO);
        }
    }

    fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, response: GrpcResponse) {
        self.refilled(host, token, &response);
    }

    fn request_header_reads(&self) -> HeaderReads {
        self.shared.config.request_header_reads()
    }

    fn create_filter(&self, context_id: u32) -> RateLimitFilter {
        RateLimitFilter {
            context_id,
            shared: self.shared.clone(),
            admitted: Vec::new(),
            replied: false,
            paused: None,
        }
    }
}

/// Per-request state.
pub struct RateLimitFilter {
    context_id: u32,
    shared: Rc<Worker>,
    /// The verdicts of an admitted request: its rate limit fields are written on its
    /// response, from them (nothing is formatted before the response comes).
    admitted: Vec<Verdict>,
    /// This filter answered the request itself.
    replied: bool,
    /// Waiting for the rate limit service.
    paused: Option<global::Paused>,
}

/// One limit to check for this request.
struct Check {
    limit: usize,
    /// Hash of the client key.
    key: u64,
    /// Which parameters (see [`Limit::plan_index`]).
    plan: usize,
    params: Params,
    /// Decided by the rate limit service.
    global: bool,
    /// A global limit's key values, in the order of its key sources (the descriptor's entries
    /// are built from them only when the service is called): read with the key for an `exact`
    /// limit (always called); for a `leased` one only when the request calls or asks for a
    /// refill (a request served from its lease hashes its key like a local limit).
    entries: Option<Vec<String>>,
}

/// One decision pass over a request's limits: whose keys, when, at what cost.
struct Pass<'a> {
    /// What the keys are built from (to rebuild one with its label for a warning).
    key: KeyContext<'a>,
    /// Now, in µs since the epoch.
    now: u64,
    /// Units the request costs.
    cost: u64,
}

/// What one limit said.
struct Verdict {
    limit: usize,
    plan: usize,
    params: Params,
    outcome: Outcome,
    /// Its remaining units and reset are known (a global limit whose service did not say them
    /// is left out of the rate limit fields of admitted requests).
    reported: bool,
}

fn now_us(host: &dyn Host) -> u64 {
    host.now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl RateLimitFilter {
    fn limit(&self, id: usize) -> Option<&Limit> {
        self.shared.config.limits.get(id)
    }

    /// Decide `check` at `now`; `take`: consume the units when admitted. A first refusal in
    /// a period also writes the warning mark, and the worker that wrote it logs the warning.
    fn run(
        &self,
        host: &mut dyn Host,
        check: &Check,
        pass: &Pass<'_>,
        take: bool,
    ) -> Result<Outcome, StoreError> {
        let (now, cost) = (pass.now, pass.cost);
        let Some(limit) = self.limit(check.limit) else {
            return Err(StoreError::CasExhausted);
        };
        let slot = limit.table.slot(check.key);
        let params = check.params;
        let updated = limit.table.update(host, slot, now, |state| {
            let o = evaluate(&params, state, now, cost);
            let write = if (o.admitted && take) || (!o.admitted && o.warn) {
                o.next
            } else {
                None
            };
            (write, o)
        })?;
        let ids = &self.shared.ids;
        if updated.evicted {
            ids.count(host, Total::Evictions);
            ids.count_limit(host, check.limit, LimitMetric::Evicted);
        }
        let o = updated.value;
        if !o.admitted && o.warn && log::log_enabled!(log::Level::Warn) {
            // The label (safe to log) is built only here: once per key and period.
            let label = client::build(host, &pass.key, KeySpec::from(limit))
                .map(|k| k.label)
                .unwrap_or_default();
            log::warn!(
                "[{}] rate limit `{}` crossed by {}: {} per {}s{}",
                self.context_id,
                limit.name,
                label,
                params.quota,
                params.window_secs(),
                if limit.shadow {
                    " (shadow: not enforced)"
                } else {
                    ""
                }
            );
        }
        Ok(o)
    }

    /// The counters could not be used: count it and apply the failure mode.
    fn failure(&mut self, host: &mut dyn Host, check: &Check, e: &StoreError) -> Option<Decision> {
        let shared = self.shared.clone();
        let limit = shared.config.limits.get(check.limit);
        let name = limit.map_or("?", |l| l.name.as_str());
        let ids = &shared.ids;
        ids.count(host, Total::Failures);
        if *e == StoreError::CasExhausted {
            ids.count(host, Total::CasExhausted);
            ids.count_limit(host, check.limit, LimitMetric::CasExhausted);
        }
        let mode = self.shared.config.failure_mode;
        log::warn!(
            "[{}] limit `{name}`: counters not updated: {e}; failure mode `{}`",
            self.context_id,
            if mode == FailureMode::Allow {
                "allow"
            } else {
                "deny"
            }
        );
        (mode == FailureMode::Deny).then(|| {
            self.replied = true;
            Decision::Respond(
                Problem::new(503)
                    .detail("rate limit counters are unavailable")
                    .into_reply()
                    .with_header("retry-after", "1"),
            )
        })
    }

    /// Run every check (taking units when `take`), applying the failure mode to store errors;
    /// `Err` is the answer when a check fails closed or an enforced limit refuses.
    fn judge(
        &mut self,
        host: &mut dyn Host,
        checks: &[Check],
        pass: &Pass<'_>,
        take: bool,
    ) -> Result<Vec<Verdict>, Decision> {
        let mut verdicts = Vec::with_capacity(checks.len());
        for check in checks {
            match self.run(host, check, pass, take) {
                Ok(outcome) => verdicts.push(Verdict {
                    limit: check.limit,
                    plan: check.plan,
                    params: check.params,
                    outcome,
                    reported: true,
                }),
                Err(e) => {
                    if let Some(d) = self.failure(host, check, &e) {
                        return Err(d);
                    }
                }
            }
        }
        if verdicts
            .iter()
            .any(|v| !v.outcome.admitted && self.enforced(v))
        {
            return Err(self.refuse(host, &verdicts, &pass.key.req.path));
        }
        Ok(verdicts)
    }

    /// Decide local limits in two phases: with several, first whether every enforced limit
    /// would admit (nothing taken); then take the units from each (read, decide, CAS-write).
    fn decide(
        &mut self,
        host: &mut dyn Host,
        checks: &[Check],
        pass: &Pass<'_>,
    ) -> Result<Vec<Verdict>, Decision> {
        if checks.len() > 1 {
            self.judge(host, checks, pass, false)?;
        }
        self.judge(host, checks, pass, true)
    }

    fn enforced(&self, v: &Verdict) -> bool {
        self.limit(v.limit).is_some_and(|l| !l.shadow)
    }

    /// Rate limit headers for these verdicts (enforced limits only).
    fn rate_headers(&self, verdicts: &[&Verdict]) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        self.reported_fields(verdicts, |name, value| out.push((name, value.to_string())));
        out
    }

    /// The rate limit fields of `verdicts`, those whose numbers are known, each given to
    /// `field` (name, value).
    fn reported_fields<V: Borrow<Verdict>>(
        &self,
        verdicts: &[V],
        field: impl FnMut(&'static str, &str),
    ) {
        if verdicts.iter().all(|v| v.borrow().reported) {
            self.fields(verdicts, field);
        } else {
            let reported: Vec<&Verdict> = verdicts
                .iter()
                .map(Borrow::borrow)
                .filter(|v| v.reported)
                .collect();
            self.fields(&reported, field);
        }
    }

    /// The rate limit fields of `verdicts` in the configured mode: `RateLimit-Policy` and
    /// `RateLimit`, then the legacy `X-RateLimit-*`.
    fn fields<V: Borrow<Verdict>>(
        &self,
        verdicts: &[V],
        mut field: impl FnMut(&'static str, &str),
    ) {
        if verdicts.is_empty() {
            return;
        }
        let mode: HeaderMode = self.shared.config.headers;
        if mode.draft() {
            let (policy, state) = self.draft_fields(verdicts);
            field("ratelimit-policy", &policy);
            field("ratelimit", &state);
        }
        if mode.legacy() {
            for (name, value) in legacy_fields(verdicts) {
                field(name, &value);
            }
        }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers), written
    /// without `format!`: the items of the policy were written at load (one limit's is used as
    /// it is, not copied), and the numbers of the state are appended digit by digit.
    fn draft_fields<V: Borrow<Verdict>>(&self, verdicts: &[V]) -> (Cow<'_, str>, String) {
        let mut state = String::with_capacity(40 * verdicts.len());
        if let [v] = verdicts {
            let v = v.borrow();
            if let Some((limit, item)) = self
                .limit(v.limit)
                .and_then(|l| l.policies.get(v.plan).map(|item| (l, item)))
            {
                push_state(&mut state, limit, v);
                return (Cow::Borrowed(item.as_str()), state);
            }
        }
        let mut policy = String::with_capacity(40 * verdicts.len());
        for (i, v) in verdicts.iter().map(Borrow::borrow).enumerate() {
            let Some(limit) = self.limit(v.limit) else {
                continue;
            };
            if i > 0 {
                policy.push_str(", ");
                state.push_str(", ");
            }
            match limit.policies.get(v.plan) {
                Some(item) => policy.push_str(item),
                None => {
                    let _ = write!(
                        policy,
                        "\"{}\";q={};w={}",
                        limit.name,
                        v.params.quota,
                        v.params.window_secs()
                    );
                }
            }
            push_state(&mut state, limit, v);
        }
        (Cow::Owned(policy), state)
    }

    fn shadow_header(&self, verdicts: &[Verdict]) -> Option<(&'static str, String)> {
        let names: Vec<&str> = verdicts
            .iter()
            .filter(|v| !v.outcome.admitted && !self.enforced(v))
            .filter_map(|v| self.limit(v.limit).map(|l| l.name.as_str()))
            .collect();
        (!names.is_empty()).then(|| (SHADOW_HEADER, names.join(", ")))
    }

    /// Count the final verdicts: the request's outcome (`allowed` or `limited`, one increment
    /// for an admitted request), then each refusing limit's `limited` or `shadow_limited`.
    fn count(&self, host: &mut dyn Host, verdicts: &[Verdict], refused: bool) {
        let ids = &self.shared.ids;
        ids.count(
            host,
            if refused {
                Total::Limited
            } else {
                Total::Allowed
            },
        );
        let mut shadow = false;
        for v in verdicts {
            let Some(limit) = self.limit(v.limit) else {
                continue;
            };
            let metric = match (v.outcome.admitted, limit.shadow) {
                (false, true) => {
                    shadow = true;
                    LimitMetric::ShadowLimited
                }
                (false, false) => LimitMetric::Limited,
                (true, _) => continue,
            };
            ids.count_limit(host, v.limit, metric);
        }
        if shadow {
            ids.count(host, Total::ShadowLimited);
        }
    }

    fn refuse(&mut self, host: &mut dyn Host, verdicts: &[Verdict], path: &str) -> Decision {
        self.count(host, verdicts, true);
        let refusing: Vec<&Verdict> = verdicts
            .iter()
            .filter(|v| !v.outcome.admitted && self.enforced(v))
            .collect();
        let retry = refusing
            .iter()
            .map(|v| v.outcome.reset_secs())
            .max()
            .unwrap_or(1)
            .max(1);
        let names: Vec<&str> = refusing
            .iter()
            .filter_map(|v| self.limit(v.limit).map(|l| l.name.as_str()))
            .collect();
        // `limit `<name>` allows <quota> per <window>s; retry in <retry>s`, without `format!`.
        let mut detail = String::with_capacity(80);
        if let Some(v) = refusing.first() {
            detail.push_str("limit `");
            detail.push_str(names.first().copied().unwrap_or(""));
            detail.push_str("` allows ");
            push_u64(&mut detail, v.params.quota);
            detail.push_str(" per ");
            push_u64(&mut detail, v.params.window_secs());
            detail.push_str("s; retry in ");
            push_u64(&mut detail, retry);
            detail.push('s');
        }
        let mut retry_after = String::with_capacity(20);
        push_u64(&mut retry_after, retry);
        let mut reply = Problem::new(429)
            .typed(QUOTA_EXCEEDED, QUOTA_EXCEEDED_TITLE)
            .detail(detail)
            .instance(path)
            .extension("violated-policies", names)
            .into_reply()
            .with_header("retry-after", retry_after);
        for (k, v) in self.rate_headers(&refusing) {
            reply = reply.with_header(k, v);
        }
        if let Some((k, v)) = self.shadow_header(verdicts) {
            reply = reply.with_header(k, v);
        }
        self.replied = true;
        Decision::Respond(reply)
    }

    fn admit(&mut self, host: &mut dyn Host, verdicts: Vec<Verdict>) -> Decision {
        self.count(host, &verdicts, false);
        self.admitted = verdicts;
        Decision::Continue
    }

    /// Write the rate limit fields of an admitted request on its response (enforced limits),
    /// then the shadow limits that would have refused it.
    fn write_fields(&self, host: &mut dyn Host, verdicts: &[Verdict]) {
        let mut set = |name: &str, value: &str| {
            host.set_header(MapKind::ResponseHeaders, name, value);
        };
        if verdicts.iter().all(|v| self.enforced(v)) {
            self.reported_fields(verdicts, &mut set);
        } else {
            let enforced: Vec<&Verdict> = verdicts.iter().filter(|v| self.enforced(v)).collect();
            self.reported_fields(&enforced, &mut set);
        }
        if let Some((name, value)) = self.shadow_header(verdicts) {
            set(name, &value);
        }
    }
}

/// The `RateLimit` item of a verdict: `"<name>";r=<remaining>;t=<reset>`.
fn push_state(state: &mut String, limit: &Limit, v: &Verdict) {
    state.push_str(&limit.state_prefix);
    push_u64(state, v.outcome.remaining);
    state.push_str(";t=");
    push_u64(state, v.outcome.reset_secs());
}

/// `X-RateLimit-*` of the most restrictive limit: least remaining, then the latest reset.
fn legacy_fields<V: Borrow<Verdict>>(verdicts: &[V]) -> Vec<(&'static str, String)> {
    let Some(v) = verdicts.iter().map(Borrow::borrow).min_by_key(|v| {
        (
            v.outcome.remaining,
            std::cmp::Reverse(v.outcome.reset_secs()),
        )
    }) else {
        return Vec::new();
    };
    vec![
        ("x-ratelimit-limit", v.params.quota.to_string()),
        ("x-ratelimit-remaining", v.outcome.remaining.to_string()),
        ("x-ratelimit-reset", v.outcome.reset_secs().to_string()),
    ]
}

/// The route rule of this request; `None` (counted in `skipped`): no route, or a disabled one.
/// Reads only what the routes match on (each read is a host call).
fn route_of<'c>(host: &mut dyn Host, shared: &'c Worker) -> Option<(&'c Route, RequestInfo)> {
    let config = &shared.config;
    if config.routes.0.is_empty() {
        shared.ids.count(host, Total::Skipped);
        return None;
    }
    let method = if config.needs_method {
        host.method()
    } else {
        String::new()
    };
    let authority = if config.needs_host {
        host.authority()
    } else {
        String::new()
    };
    let req = RequestInfo::from_parts(method, authority, host.path());
    let route = config.routes.find(&req).map(|(route, _)| route);
    match route {
        Some(route) if !route.disabled => Some((route, req)),
        _ => {
            shared.ids.count(host, Total::Skipped);
            None
        }
    }
}

/// The check of limit `id` for this request: `None` when it does not apply to this client or
/// a key source it skips on is missing.
fn check_of(host: &dyn Host, ctx: &KeyContext<'_>, id: usize) -> Option<Check> {
    let limit = ctx.config.limits.get(id)?;
    let applies = match limit.applies_to {
        AppliesTo::All => true,
        AppliesTo::Anonymous => ctx.client.consumer.is_none(),
        AppliesTo::Identified => ctx.client.consumer.is_some(),
    };
    if !applies {
        return None;
    }
    let spec = KeySpec::from(limit);
    let (key, entries) = if limit.global.is_some_and(|g| g.mode == Consistency::Exact) {
        // The key's values once: hashed, and the descriptor entries of the call.
        let values = client::values(host, ctx, spec)?;
        let key = client::hash_values(&limit.name, &values);
        (key, Some(client::owned(values)))
    } else {
        (client::hash(host, ctx, spec)?, None)
    };
    let plan = limit.plan_index(ctx.client.plan.as_deref());
    Some(Check {
        limit: id,
        key,
        plan,
        params: *limit.params_at(plan),
        global: limit.global.is_some(),
        entries,
    })
}

/// A route's checks split into global ones (decided by the service) and local ones.
fn split_global(checks: Vec<Check>) -> (Vec<Check>, Vec<Check>) {
    if checks.iter().all(|c| c.global) {
        (checks, Vec::new())
    } else {
        checks.into_iter().partition(|c| c.global)
    }
}

impl HttpFilter for RateLimitFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        let shared = self.shared.clone();
        let config = &shared.config;
        let Some((route, req)) = route_of(host, &shared) else {
            return Decision::Continue;
        };
        let client = if route.uses_client {
            Client::read(host, config)
        } else {
            Client::default()
        };
        let key = KeyContext::new(config, &client, &req, &route.name);
        let checks: Vec<Check> = route
            .limits
            .iter()
            .filter_map(|&id| check_of(host, &key, id))
            .collect();
        if checks.is_empty() {
            shared.ids.count(host, Total::Skipped);
            return Decision::Continue;
        }
        if route.has_global {
            let (globals, local) = split_global(checks);
            // The route by its index: its name is read from the configuration when needed.
            let index = config
                .routes
                .0
                .iter()
                .position(|r| std::ptr::eq(r, route))
                .unwrap_or(usize::MAX);
            let waiting = global::Request {
                local,
                client,
                req,
                route: index,
                cost: route.cost,
            };
            return self.start_global(host, waiting, globals);
        }
        let pass = Pass {
            key,
            now: now_us(host),
            cost: route.cost,
        };
        match self.decide(host, &checks, &pass) {
            Ok(verdicts) => self.admit(host, verdicts),
            Err(d) => d,
        }
    }

    fn on_grpc_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: GrpcResponse,
    ) -> Decision {
        self.answered(host, token, &response)
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        if !self.replied {
            let verdicts = std::mem::take(&mut self.admitted);
            self.write_fields(host, &verdicts);
        }
        Decision::Continue
    }
}

#[path = "global.rs"]
mod global;

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
