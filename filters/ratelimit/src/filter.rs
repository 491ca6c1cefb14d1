//! Request handling of the ratelimit filter.
//!
//! For each request: find the route rule, build the client key of each of its limits, then
//! decide in two phases when several limits apply: first look at every limit without taking
//! anything; only if every enforced limit would admit the request take the units from each
//! (each take is itself a read-decide-CAS on shared data, so it is exact across workers). A
//! refused request takes nothing. With one limit the take is the only phase.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use tollgate_common::metrics::Metrics;
use tollgate_common::route::RequestInfo;
use tollgate_common::{ConfigError, Decision, Host, HttpFilter, MapKind, Problem, RootFilter};

use crate::algo::{evaluate, Outcome, Params};
use crate::config::{AppliesTo, Config, FailureMode, HeaderMode, Limit, LimitMetric};
use crate::keys::{self, Client, ClientKey};
use crate::table::StoreError;

/// Problem type of 429 answers (draft-ietf-httpapi-ratelimit-headers-10).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
/// Its title in the draft.
pub const QUOTA_EXCEEDED_TITLE: &str =
    "Request cannot be satisfied as assigned quota has been exceeded";
/// Response header naming the shadow limits that would have refused the request.
pub const SHADOW_HEADER: &str = "x-tollgate-ratelimit-shadow";

/// Per-VM state: the compiled configuration and metrics.
pub struct RateLimitRoot {
    context_id: u32,
    shared: Rc<Shared>,
}

/// What every request of a VM shares.
pub struct Shared {
    /// The compiled configuration.
    pub config: Config,
    /// The filter's metrics.
    pub metrics: Metrics,
}

const TOTALS: [&str; 8] = [
    "requests",
    "skipped",
    "allowed",
    "limited",
    "shadow_limited",
    "failures",
    "cas_exhausted",
    "evictions",
];

impl RootFilter for RateLimitRoot {
    type Filter = RateLimitFilter;
    const NAME: &'static str = "ratelimit";

    fn new(context_id: u32) -> Self {
        RateLimitRoot {
            context_id,
            shared: Rc::new(Shared {
                config: Config::default(),
                metrics: Metrics::new("ratelimit"),
            }),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config = Config::parse(configuration)?;
        let metrics = Metrics::new("ratelimit");
        for m in TOTALS {
            metrics.count(host, m, 0);
        }
        let mut keys = 0u64;
        let mut bound = 0usize;
        for limit in &config.limits {
            for m in &limit.metric_names {
                metrics.count(host, m, 0);
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
        self.shared = Rc::new(Shared { config, metrics });
        Ok(())
    }

    fn create_filter(&self, context_id: u32) -> RateLimitFilter {
        RateLimitFilter {
            context_id,
            shared: self.shared.clone(),
            response_headers: Vec::new(),
            replied: false,
        }
    }
}

/// Per-request state.
pub struct RateLimitFilter {
    context_id: u32,
    shared: Rc<Shared>,
    /// Headers to add to the response of an admitted request.
    response_headers: Vec<(String, String)>,
    /// This filter answered the request itself.
    replied: bool,
}

/// One limit to check for this request.
struct Check {
    limit: usize,
    key: ClientKey,
    params: Params,
}

/// What one limit said.
struct Verdict {
    limit: usize,
    params: Params,
    outcome: Outcome,
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
        now: u64,
        cost: u64,
        take: bool,
    ) -> Result<Outcome, StoreError> {
        let Some(limit) = self.limit(check.limit) else {
            return Err(StoreError::CasExhausted);
        };
        let slot = limit.table.slot(check.key.hash);
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
        let m = &self.shared.metrics;
        if updated.evicted {
            m.count(host, "evictions", 1);
            m.count(host, limit.metric(LimitMetric::Evicted), 1);
        }
        let o = updated.value;
        if !o.admitted && o.warn {
            log::warn!(
                "[{}] rate limit `{}` crossed by {}: {} per {}s{}",
                self.context_id,
                limit.name,
                check.key.label,
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
        let m = &shared.metrics;
        m.count(host, "failures", 1);
        if *e == StoreError::CasExhausted {
            m.count(host, "cas_exhausted", 1);
            if let Some(l) = limit {
                m.count(host, l.metric(LimitMetric::CasExhausted), 1);
            }
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

    fn enforced(&self, v: &Verdict) -> bool {
        self.limit(v.limit).is_some_and(|l| !l.shadow)
    }

    /// Rate limit headers for these verdicts (enforced limits only).
    fn rate_headers(&self, verdicts: &[&Verdict]) -> Vec<(String, String)> {
        let mode: HeaderMode = self.shared.config.headers;
        let mut out = Vec::new();
        if verdicts.is_empty() {
            return out;
        }
        let name = |v: &Verdict| self.limit(v.limit).map_or("", |l| l.name.as_str());
        if mode.draft() {
            let policy: Vec<String> = verdicts
                .iter()
                .map(|v| {
                    format!(
                        "\"{}\";q={};w={}",
                        name(v),
                        v.params.quota,
                        v.params.window_secs()
                    )
                })
                .collect();
            let state: Vec<String> = verdicts
                .iter()
                .map(|v| {
                    format!(
                        "\"{}\";r={};t={}",
                        name(v),
                        v.outcome.remaining,
                        v.outcome.reset_secs()
                    )
                })
                .collect();
            out.push(("ratelimit-policy".into(), policy.join(", ")));
            out.push(("ratelimit".into(), state.join(", ")));
        }
        if mode.legacy() {
            // The most restrictive limit: least remaining, then the latest reset.
            if let Some(v) = verdicts.iter().min_by_key(|v| {
                (
                    v.outcome.remaining,
                    std::cmp::Reverse(v.outcome.reset_secs()),
                )
            }) {
                out.push(("x-ratelimit-limit".into(), v.params.quota.to_string()));
                out.push((
                    "x-ratelimit-remaining".into(),
                    v.outcome.remaining.to_string(),
                ));
                out.push((
                    "x-ratelimit-reset".into(),
                    v.outcome.reset_secs().to_string(),
                ));
            }
        }
        out
    }

    fn shadow_header(&self, verdicts: &[Verdict]) -> Option<(String, String)> {
        let names: Vec<&str> = verdicts
            .iter()
            .filter(|v| !v.outcome.admitted && !self.enforced(v))
            .filter_map(|v| self.limit(v.limit).map(|l| l.name.as_str()))
            .collect();
        (!names.is_empty()).then(|| (SHADOW_HEADER.to_string(), names.join(", ")))
    }

    /// Count the final verdicts.
    fn count(&self, host: &mut dyn Host, verdicts: &[Verdict], refused: bool) {
        let m = &self.shared.metrics;
        m.count(host, if refused { "limited" } else { "allowed" }, 1);
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
                (true, _) if !refused => LimitMetric::Allowed,
                (true, _) => continue,
            };
            m.count(host, limit.metric(metric), 1);
        }
        if shadow {
            m.count(host, "shadow_limited", 1);
        }
    }

    fn refuse(&mut self, host: &mut dyn Host, verdicts: &[Verdict]) -> Decision {
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
        let detail = refusing
            .first()
            .map(|v| {
                format!(
                    "limit `{}` allows {} per {}s; retry in {retry}s",
                    names.first().copied().unwrap_or(""),
                    v.params.quota,
                    v.params.window_secs()
                )
            })
            .unwrap_or_default();
        let path = host.path();
        let instance = path.split('?').next().unwrap_or("").to_string();
        let mut reply = Problem::new(429)
            .typed(QUOTA_EXCEEDED, QUOTA_EXCEEDED_TITLE)
            .detail(detail)
            .instance(instance)
            .extension("violated-policies", names.clone())
            .into_reply()
            .with_header("retry-after", retry.to_string());
        for (k, v) in self.rate_headers(&refusing) {
            reply = reply.with_header(k, v);
        }
        if let Some((k, v)) = self.shadow_header(verdicts) {
            reply = reply.with_header(k, v);
        }
        self.replied = true;
        Decision::Respond(reply)
    }

    fn admit(&mut self, host: &mut dyn Host, verdicts: &[Verdict]) -> Decision {
        self.count(host, verdicts, false);
        let enforced: Vec<&Verdict> = verdicts.iter().filter(|v| self.enforced(v)).collect();
        let mut headers = self.rate_headers(&enforced);
        headers.extend(self.shadow_header(verdicts));
        self.response_headers = headers;
        Decision::Continue
    }
}

impl HttpFilter for RateLimitFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        let shared = self.shared.clone();
        let config = &shared.config;
        let req = RequestInfo::from_host(host);
        let Some((route, _)) = config.routes.find(&req) else {
            shared.metrics.count(host, "requests", 1);
            return Decision::Continue;
        };
        if route.disabled {
            shared.metrics.count(host, "skipped", 1);
            return Decision::Continue;
        }
        shared.metrics.count(host, "requests", 1);
        let client = if route.uses_client {
            Client::read(host, config)
        } else {
            Client::default()
        };
        let checks: Vec<Check> = route
            .limits
            .iter()
            .filter_map(|&id| {
                let limit = config.limits.get(id)?;
                let applies = match limit.applies_to {
                    AppliesTo::All => true,
                    AppliesTo::Anonymous => client.consumer.is_none(),
                    AppliesTo::Identified => client.consumer.is_some(),
                };
                if !applies {
                    return None;
                }
                let key = keys::build(
                    host,
                    config,
                    &limit.name,
                    &limit.key,
                    limit.missing_key,
                    &client,
                    &req,
                    &route.name,
                )?;
                Some(Check {
                    limit: id,
                    key,
                    params: *limit.params_for(client.plan.as_deref()),
                })
            })
            .collect();
        if checks.is_empty() {
            return Decision::Continue;
        }
        let now = now_us(host);
        let cost = route.cost;

        // Phase 1 (several limits): would every enforced limit admit? Nothing is taken.
        if checks.len() > 1 {
            let mut verdicts = Vec::new();
            for check in &checks {
                match self.run(host, check, now, cost, false) {
                    Ok(outcome) => verdicts.push(Verdict {
                        limit: check.limit,
                        params: check.params,
                        outcome,
                    }),
                    Err(e) => {
                        if let Some(d) = self.failure(host, check, &e) {
                            return d;
                        }
                    }
                }
            }
            if verdicts
                .iter()
                .any(|v| !v.outcome.admitted && self.enforced(v))
            {
                return self.refuse(host, &verdicts);
            }
        }

        // Phase 2: take the units from each limit (exact: read, decide, CAS-write).
        let mut verdicts = Vec::new();
        for check in &checks {
            match self.run(host, check, now, cost, true) {
                Ok(outcome) => verdicts.push(Verdict {
                    limit: check.limit,
                    params: check.params,
                    outcome,
                }),
                Err(e) => {
                    if let Some(d) = self.failure(host, check, &e) {
                        return d;
                    }
                }
            }
        }
        if verdicts
            .iter()
            .any(|v| !v.outcome.admitted && self.enforced(v))
        {
            return self.refuse(host, &verdicts);
        }
        self.admit(host, &verdicts)
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        if !self.replied {
            for (k, v) in std::mem::take(&mut self.response_headers) {
                host.set_header(MapKind::ResponseHeaders, &k, &v);
            }
        }
        Decision::Continue
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
