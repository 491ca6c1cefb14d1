//! Configuration of the ratelimit filter: JSON (serde, unknown fields refused), then validated
//! and compiled into [`Compiled`], immutable and shared by every request of a VM.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_common::config::{ConfigDuration, HeaderName, Name};
use tollgate_common::route::{RouteMatch, Routed, Rules};
use tollgate_common::{ConfigError, HeaderReads};

use crate::algo::{Algorithm, Params, MICROS};
use crate::table::Table;

/// Largest `quota` and `burst` accepted.
pub const MAX_UNITS: u64 = 1_000_000_000;
/// Default number of slots (tracked client keys) per limit.
pub const DEFAULT_SLOTS: u32 = 8192;
/// Smallest and largest `slots`.
pub const SLOTS_RANGE: (u32, u32) = (8, 1 << 20);

fn default_consumer_header() -> HeaderName {
    HeaderName::from_static("x-tollgate-consumer")
}
fn default_plan_header() -> HeaderName {
    HeaderName::from_static("x-tollgate-plan")
}
fn default_source_header() -> Option<HeaderName> {
    Some(HeaderName::from_static("x-tollgate-identity-source"))
}
fn default_api_key_header() -> HeaderName {
    HeaderName::from_static("x-api-key")
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_slots() -> u32 {
    DEFAULT_SLOTS
}
fn default_cost() -> u64 {
    1
}
fn default_domain() -> String {
    "tollgate".to_string()
}
fn default_global_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_millis(100))
}

/// Largest `lease_max`.
pub const MAX_LEASE: u64 = 1_000_000;

/// The configuration as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Named limits; routes refer to them by name.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// Per-route rules; the first whose `match` fits the request applies.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Request header with the consumer identity (set by the auth filter).
    #[serde(default = "default_consumer_header")]
    pub consumer_header: HeaderName,
    /// Request header with the consumer's plan (set by the auth filter).
    #[serde(default = "default_plan_header")]
    pub plan_header: HeaderName,
    /// Request header with where the consumer identity comes from (set by the auth filter:
    /// `jwt:<provider>`, `api_key`, `introspection`): a consumer counts as `<source>:<id>`, so
    /// a JWT `sub` equal to an API key's consumer has counters of its own. `null`: the
    /// consumer header alone.
    #[serde(default = "default_source_header")]
    pub identity_source_header: Option<HeaderName>,
    /// Request header with the API key (for the `api_key` key source).
    #[serde(default = "default_api_key_header")]
    pub api_key_header: HeaderName,
    /// Proxies in front of Envoy that append to `x-forwarded-for`; 0: use the downstream
    /// address.
    #[serde(default)]
    pub trusted_hops: u32,
    /// IPv6 client addresses count by this prefix length (one client usually holds a /64).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Which rate limit headers answers carry.
    #[serde(default)]
    pub headers: HeaderMode,
    /// What happens when the counters cannot be updated.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// The rate limit service (Envoy's RLS protocol) that decides `global` limits.
    #[serde(default)]
    pub rate_limit_service: Option<ServiceConfig>,
}

/// The rate limit service as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    /// The RLS `domain` of every call.
    #[serde(default = "default_domain")]
    pub domain: String,
}

/// How a global limit is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// One call per request; the request waits for the answer.
    #[default]
    Exact,
    /// Units are taken from the service in batches ahead of need and admitted locally.
    Leased,
}

/// A limit's `global` object as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    /// `exact` (default) or `leased`.
    #[serde(default)]
    pub mode: Consistency,
    /// How long a request waits for the service.
    #[serde(default = "default_global_timeout")]
    pub timeout: ConfigDuration,
    /// When the service fails: let requests through or answer 503.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// `leased`: the most units one lease takes (default: 5% of the quota, at least 1).
    #[serde(default)]
    pub lease_max: Option<u64>,
}

/// A limit as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Unique name: metrics, headers and shared-data keys use it.
    pub name: String,
    /// `gcra` (default) or `fixed_window` (global limits: the service's window).
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    /// Units per window.
    pub quota: u64,
    /// Window: a whole number of seconds (`"1s"`, `"1h"`, `"1d"`, or milliseconds).
    pub window: ConfigDuration,
    /// GCRA bucket size (default `quota`).
    #[serde(default)]
    pub burst: Option<u64>,
    /// What identifies a client: one source or several (combined).
    pub key: Vec<KeySource>,
    /// Overrides per plan name.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// Count and report, never refuse.
    #[serde(default)]
    pub shadow: bool,
    /// Which requests the limit applies to.
    #[serde(default)]
    pub applies_to: AppliesTo,
    /// What to do when a key source is missing from the request.
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Client keys tracked at once (the table size).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Decided by the rate limit service for the whole fleet instead of in this Envoy.
    #[serde(default)]
    pub global: Option<GlobalConfig>,
}

/// Plan overrides as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Units per window for this plan.
    pub quota: u64,
    /// Window for this plan (default: the limit's).
    #[serde(default)]
    pub window: Option<ConfigDuration>,
    /// GCRA bucket size for this plan (default: this plan's quota).
    #[serde(default)]
    pub burst: Option<u64>,
}

/// A route rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub route: RouteMatch,
    /// Name of the route (the `route` key source); default `routes[<index>]`.
    #[serde(default)]
    pub name: Option<String>,
    /// Skip the filter for these requests.
    #[serde(default)]
    pub disabled: bool,
    /// Names of the limits that apply; all must admit the request.
    #[serde(default)]
    pub limits: Vec<String>,
    /// Units one request takes from each limit.
    #[serde(default = "default_cost")]
    pub cost: u64,
}

/// A part of a client key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The consumer identity header (set by the auth filter).
    Consumer,
    /// The plan header (set by the auth filter).
    Plan,
    /// The API key header.
    ApiKey,
    /// The client IP: downstream address, or `x-forwarded-for` with `trusted_hops`.
    ClientIp,
    /// The name of the matched route.
    Route,
    /// A request header.
    Header(HeaderName),
    /// A query parameter.
    Query(String),
}

/// Which requests a limit applies to, by the presence of the consumer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppliesTo {
    /// Every request.
    #[default]
    All,
    /// Requests without a consumer.
    Anonymous,
    /// Requests with a consumer.
    Identified,
}

/// What a limit does when a key source is missing from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// The limit does not apply to the request.
    #[default]
    Skip,
    /// The missing part counts as an empty value: all such requests share one counter.
    Shared,
}

/// Rate limit headers on answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    #[default]
    Draft,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset`.
    Legacy,
    /// Both.
    Both,
    /// Neither (429 answers still carry `Retry-After`).
    None,
}

impl HeaderMode {
    /// Draft fields wanted.
    pub fn draft(self) -> bool {
        matches!(self, HeaderMode::Draft | HeaderMode::Both)
    }
    /// Legacy fields wanted.
    pub fn legacy(self) -> bool {
        matches!(self, HeaderMode::Legacy | HeaderMode::Both)
    }
}

/// What happens when the counters cannot be updated (CAS retries exhausted, shared data error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through (counted in `failures`).
    #[default]
    Allow,
    /// Answer 503 (counted in `failures`).
    Deny,
}

/// A compiled limit.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Unique name.
    pub name: String,
    /// Key sources, in order.
    pub key: Vec<KeySource>,
    /// Parameters without (or for an unknown) plan.
    pub params: Params,
    /// Parameters per plan.
    pub plans: Vec<(String, Params)>,
    /// Count and report only.
    pub shadow: bool,
    /// Which requests it applies to.
    pub applies_to: AppliesTo,
    /// Missing key sources.
    pub missing_key: MissingKey,
    /// Its table in shared data.
    pub table: Table,
    /// Its metric names: `limit.<name>.` + [`LIMIT_METRICS`] (see [`LimitMetric`]).
    pub metric_names: [String; 9],
    /// It reads the consumer or plan header (key, plans or `applies_to`).
    pub uses_client: bool,
    /// Its `RateLimit-Policy` items, `"<name>";q=<quota>;w=<window>`, written at load: index 0
    /// for its own parameters, `i + 1` for `plans[i]` (see [`Limit::plan_index`]).
    pub policies: Vec<String>,
    /// The start of its `RateLimit` item: `"<name>";r=`.
    pub state_prefix: String,
    /// Decided by the rate limit service (`None`: in this Envoy).
    pub global: Option<Global>,
}

/// A compiled `global` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Global {
    /// Exact or leased.
    pub mode: Consistency,
    /// Call timeout.
    pub timeout: Duration,
    /// When the service fails.
    pub failure_mode: FailureMode,
    /// Largest lease, in units.
    pub lease_max: u64,
}

/// The compiled `rate_limit_service`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    /// Envoy cluster.
    pub cluster: String,
    /// RLS domain.
    pub domain: String,
}

/// A per-limit metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMetric {
    /// Requests it refused.
    Limited = 0,
    /// Requests it would have refused (shadow).
    ShadowLimited = 1,
    /// CAS retries exhausted.
    CasExhausted = 2,
    /// Live states evicted.
    Evicted = 3,
    /// Calls to the rate limit service (requests and lease refills).
    RlsCalls = 4,
    /// Calls that failed (error, timeout, unusable answer): the failure mode applied.
    RlsFailures = 5,
    /// Leases granted.
    LeaseRefills = 6,
    /// Units of leases that ended unused (taken from the fleet's quota, never admitted).
    LeaseUnused = 7,
    /// Units granted in leases whose window end the service did not say: each may be admitted
    /// after the service's window ended (the worst-case over-admission so far).
    OverAdmissionBound = 8,
}

/// Per-limit metric names after `limit.<name>.`, indexed by [`LimitMetric`]. An admitted
/// request counts once, in the total `allowed`: no limit has an `allowed` of its own.
pub const LIMIT_METRICS: [&str; 9] = [
    "limited",
    "shadow_limited",
    "cas_exhausted",
    "evicted",
    "rls_calls",
    "rls_failures",
    "lease_refills",
    "lease_unused_units",
    "over_admission_bound",
];

impl Limit {
    /// The full name of one of its metrics (without the filter prefix).
    pub fn metric(&self, m: LimitMetric) -> &str {
        self.metric_names.get(m as usize).map_or("", String::as_str)
    }

    /// The parameters for a plan (the limit's own for no plan or an unknown one).
    pub fn params_for(&self, plan: Option<&str>) -> &Params {
        self.params_at(self.plan_index(plan))
    }

    /// Which parameters a plan uses: 0 the limit's own (no plan, or an unknown one), `i + 1`
    /// those of `plans[i]`.
    pub fn plan_index(&self, plan: Option<&str>) -> usize {
        plan.and_then(|p| self.plans.iter().position(|(n, _)| n == p))
            .map_or(0, |i| i + 1)
    }

    /// The parameters at a [`Limit::plan_index`].
    pub fn params_at(&self, index: usize) -> &Params {
        index
            .checked_sub(1)
            .and_then(|i| self.plans.get(i))
            .map_or(&self.params, |(_, params)| params)
    }
}

/// A compiled route rule.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its match.
    pub route: RouteMatch,
    /// Its name.
    pub name: String,
    /// Skip the filter.
    pub disabled: bool,
    /// Indexes into [`Compiled::limits`].
    pub limits: Vec<usize>,
    /// Units per request.
    pub cost: u64,
    /// One of its limits reads the consumer or plan header.
    pub uses_client: bool,
    /// One of its limits is global.
    pub has_global: bool,
}

impl Routed for Route {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// The compiled configuration.
#[derive(Debug, Default)]
pub struct Compiled {
    /// Limits, in configuration order.
    pub limits: Vec<Limit>,
    /// Route rules.
    pub routes: Rules<Route>,
    /// Consumer header name (lower case).
    pub consumer_header: String,
    /// Plan header name (lower case).
    pub plan_header: String,
    /// Identity source header name (lower case), if used.
    pub source_header: Option<String>,
    /// API key header name (lower case).
    pub api_key_header: String,
    /// Trusted `x-forwarded-for` hops.
    pub trusted_hops: u32,
    /// IPv6 prefix length of client IP keys.
    pub ipv6_prefix: u8,
    /// Headers on answers.
    pub headers: HeaderMode,
    /// Failure mode.
    pub failure_mode: FailureMode,
    /// Some route matches on the method: `:method` must be read.
    pub needs_method: bool,
    /// Some route matches on the host: `:authority` must be read.
    pub needs_host: bool,
    /// The rate limit service (when a limit is global).
    pub service: Service,
    /// Some limit is `leased` (the root refills leases on a tick).
    pub has_leases: bool,
}

impl Compiled {
    /// Every request header a request may read under this configuration (any hook; the
    /// dispatcher's header cache reads a few known ones value by value): what the routes match on,
    /// the consumer, plan and identity source headers when a route's limits use them, and each
    /// limit's header key sources (`api_key`, `header`, `x-forwarded-for` for `client_ip` with
    /// `trusted_hops`). A `query` source reads `:path`, which any route reads.
    pub fn request_header_reads(&self) -> HeaderReads {
        if self.routes.0.is_empty() {
            return HeaderReads::NONE;
        }
        let mut names: Vec<&str> = vec![":path"];
        if self.needs_method {
            names.push(":method");
        }
        if self.needs_host {
            names.extend([":authority", "host"]);
        }
        if self.routes.0.iter().any(|r| r.uses_client) {
            names.extend([self.consumer_header.as_str(), self.plan_header.as_str()]);
            names.extend(self.source_header.as_deref());
        }
        for source in self.limits.iter().flat_map(|l| &l.key) {
            match source {
                KeySource::ApiKey => names.push(&self.api_key_header),
                KeySource::Header(h) => names.push(h.as_str()),
                KeySource::ClientIp if self.trusted_hops > 0 => names.push("x-forwarded-for"),
                _ => {}
            }
        }
        HeaderReads::only(names)
    }

    /// Parse, validate and compile a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Compiled, ConfigError> {
        let raw: Config = tollgate_common::config::parse(bytes)?;
        compile(raw)
    }
}

fn window_us(field: &str, w: ConfigDuration) -> Result<u64, ConfigError> {
    let us = u64::try_from(w.0.as_micros()).unwrap_or(u64::MAX);
    if us == 0 || us % MICROS != 0 {
        return Err(ConfigError::new(
            field,
            "must be a whole number of seconds, at least 1s (RateLimit-Policy's `w` is in seconds)",
        ));
    }
    Ok(us)
}

fn units(field: &str, what: &str, n: u64) -> Result<u64, ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(
            field,
            format!("{what} must be at least 1"),
        ));
    }
    if n > MAX_UNITS {
        return Err(ConfigError::new(
            field,
            format!("{what} must be at most {MAX_UNITS}"),
        ));
    }
    Ok(n)
}

fn params(
    at: &str,
    algorithm: Algorithm,
    quota: u64,
    window: u64,
    burst: Option<u64>,
) -> Result<Params, ConfigError> {
    let quota = units(&format!("{at}.quota"), "the quota", quota)?;
    if algorithm == Algorithm::Gcra && quota > window {
        return Err(ConfigError::new(
            format!("{at}.quota"),
            "more than one unit per microsecond is not supported",
        ));
    }
    let burst = match (algorithm, burst) {
        (_, None) => quota,
        (Algorithm::Gcra, Some(b)) => units(&format!("{at}.burst"), "the burst", b)?,
        (Algorithm::FixedWindow, Some(_)) => {
            return Err(ConfigError::new(
                format!("{at}.burst"),
                "`burst` applies to the `gcra` algorithm only",
            ))
        }
    };
    Ok(Params {
        algorithm,
        quota,
        window_us: window,
        burst,
    })
}

/// A global limit is a window counted by the service: no GCRA, burst or plans.
fn compile_global(at: &str, raw: &LimitConfig) -> Result<Option<Global>, ConfigError> {
    let Some(g) = &raw.global else {
        return Ok(None);
    };
    let refuse = |field: &str, why: &str| Err(ConfigError::new(format!("{at}.{field}"), why));
    if raw.algorithm == Some(Algorithm::Gcra) {
        return refuse(
            "algorithm",
            "a global limit is a window counted by the rate limit service: use `fixed_window` or leave it out",
        );
    }
    if raw.burst.is_some() {
        return refuse(
            "burst",
            "a global limit has no burst (the service counts windows)",
        );
    }
    if !raw.plans.is_empty() {
        return refuse(
            "plans",
            "a global limit's quota is the service's: add the `plan` key source and give each plan its limit in the service",
        );
    }
    if g.timeout.0.is_zero() {
        return refuse("global.timeout", "must be more than 0");
    }
    let lease_max = match g.lease_max {
        Some(0) => return refuse("global.lease_max", "must be at least 1"),
        Some(n) if n > MAX_LEASE.min(raw.quota) => {
            return refuse(
                "global.lease_max",
                &format!("must be at most the quota and at most {MAX_LEASE}"),
            )
        }
        Some(n) => n,
        None => raw.quota.div_ceil(20).clamp(1, MAX_LEASE),
    };
    Ok(Some(Global {
        mode: g.mode,
        timeout: g.timeout.0,
        failure_mode: g.failure_mode,
        lease_max,
    }))
}

fn compile_limit(i: usize, raw: LimitConfig) -> Result<Limit, ConfigError> {
    let at = format!("limits[{i}]");
    let global = compile_global(&at, &raw)?;
    let algorithm = match (&global, raw.algorithm) {
        (Some(_), _) => Algorithm::FixedWindow,
        (None, a) => a.unwrap_or_default(),
    };
    let name_ok = Name::valid(&raw.name) && raw.name.len() <= 64;
    if !name_ok {
        return Err(ConfigError::new(
            format!("{at}.name"),
            format!(
                "`{}` is not a limit name (1 to 64 letters, digits, `_` or `-`)",
                raw.name
            ),
        ));
    }
    let window = window_us(&format!("{at}.window"), raw.window)?;
    let base = params(&at, algorithm, raw.quota, window, raw.burst)?;
    let mut plans = Vec::new();
    for (plan, p) in raw.plans {
        let pat = format!("{at}.plans.{plan}");
        if plan.is_empty() {
            return Err(ConfigError::new(pat, "a plan name must not be empty"));
        }
        let w = match p.window {
            Some(w) => window_us(&format!("{pat}.window"), w)?,
            None => window,
        };
        plans.push((plan, params(&pat, algorithm, p.quota, w, p.burst)?));
    }
    if raw.key.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.key"),
            "give at least one key source",
        ));
    }
    let mut key = Vec::new();
    for (k, source) in raw.key.into_iter().enumerate() {
        let kat = format!("{at}.key[{k}]");
        let source = match source {
            KeySource::Query(q) if q.is_empty() => {
                return Err(ConfigError::new(
                    format!("{kat}.query"),
                    "the parameter name must not be empty",
                ))
            }
            other => other,
        };
        if key.contains(&source) {
            return Err(ConfigError::new(kat, "this key source is already given"));
        }
        key.push(source);
    }
    if !(SLOTS_RANGE.0..=SLOTS_RANGE.1).contains(&raw.slots) {
        return Err(ConfigError::new(
            format!("{at}.slots"),
            format!("must be from {} to {}", SLOTS_RANGE.0, SLOTS_RANGE.1),
        ));
    }
    // `l`: a leased global limit's table holds leases.
    let kind = match (&global, algorithm) {
        (Some(_), _) => 'l',
        (None, Algorithm::Gcra) => 'g',
        (None, Algorithm::FixedWindow) => 'f',
    };
    let uses_client = !plans.is_empty()
        || raw.applies_to != AppliesTo::All
        || key
            .iter()
            .any(|k| matches!(k, KeySource::Consumer | KeySource::Plan));
    let policy = |p: &Params| format!("\"{}\";q={};w={}", raw.name, p.quota, p.window_secs());
    let policies = std::iter::once(&base)
        .chain(plans.iter().map(|(_, p)| p))
        .map(policy)
        .collect();
    Ok(Limit {
        policies,
        state_prefix: format!("\"{}\";r=", raw.name),
        table: Table::new(&raw.name, kind, raw.slots),
        metric_names: LIMIT_METRICS.map(|m| format!("limit.{}.{m}", raw.name)),
        global,
        uses_client,
        name: raw.name,
        key,
        params: base,
        plans,
        shadow: raw.shadow,
        applies_to: raw.applies_to,
        missing_key: raw.missing_key,
    })
}

fn compile(raw: Config) -> Result<Compiled, ConfigError> {
    let mut limits: Vec<Limit> = Vec::new();
    for (i, l) in raw.limits.into_iter().enumerate() {
        let limit = compile_limit(i, l)?;
        if let Some(j) = limits.iter().position(|o| o.name == limit.name) {
            return Err(ConfigError::new(
                format!("limits[{i}].name"),
                format!("duplicate limit name `{}` (also limits[{j}])", limit.name),
            ));
        }
        limits.push(limit);
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let cost = units(&format!("{at}.cost"), "the cost", r.cost)?;
        let mut ids = Vec::new();
        for (j, name) in r.limits.iter().enumerate() {
            let lat = format!("{at}.limits[{j}]");
            let Some(id) = limits.iter().position(|l| &l.name == name) else {
                return Err(ConfigError::new(lat, format!("no limit named `{name}`")));
            };
            if ids.contains(&id) {
                return Err(ConfigError::new(lat, format!("`{name}` is listed twice")));
            }
            if let Some(limit) = limits.get(id) {
                let smallest = limit
                    .plans
                    .iter()
                    .map(|(_, p)| p)
                    .chain([&limit.params])
                    .map(Params::capacity)
                    .min()
                    .unwrap_or(0);
                if cost > smallest {
                    return Err(ConfigError::new(
                        format!("{at}.cost"),
                        format!(
                            "a cost of {cost} can never fit limit `{name}` (at most {smallest} at once)"
                        ),
                    ));
                }
            }
            ids.push(id);
        }
        let uses_client = ids
            .iter()
            .any(|&id| limits.get(id).is_some_and(|l| l.uses_client));
        routes.push(Route {
            has_global: ids
                .iter()
                .any(|&id| limits.get(id).is_some_and(|l| l.global.is_some())),
            uses_client,
            route: r.route,
            name: r.name.unwrap_or_else(|| at.clone()),
            disabled: r.disabled,
            limits: ids,
            cost,
        });
    }
    let service = match raw.rate_limit_service {
        Some(s) => {
            if s.cluster.is_empty() {
                return Err(ConfigError::new(
                    "rate_limit_service.cluster",
                    "must name an Envoy cluster",
                ));
            }
            if s.domain.is_empty() {
                return Err(ConfigError::new(
                    "rate_limit_service.domain",
                    "must not be empty",
                ));
            }
            Service {
                cluster: s.cluster,
                domain: s.domain,
            }
        }
        None => {
            if let Some(i) = limits.iter().position(|l| l.global.is_some()) {
                return Err(ConfigError::new(
                    format!("limits[{i}].global"),
                    "a global limit needs `rate_limit_service` (the Envoy cluster of the service)",
                ));
            }
            Service::default()
        }
    };
    Ok(Compiled {
        has_leases: limits
            .iter()
            .any(|l| l.global.is_some_and(|g| g.mode == Consistency::Leased)),
        service,
        needs_method: routes.iter().any(|r: &Route| r.route.uses_method()),
        needs_host: routes.iter().any(|r: &Route| r.route.uses_host()),
        limits,
        routes: Rules(routes),
        consumer_header: raw.consumer_header.into_string(),
        plan_header: raw.plan_header.into_string(),
        source_header: raw.identity_source_header.map(HeaderName::into_string),
        api_key_header: raw.api_key_header.into_string(),
        trusted_hops: raw.trusted_hops,
        ipv6_prefix: if raw.ipv6_prefix <= 128 {
            raw.ipv6_prefix
        } else {
            return Err(ConfigError::new("ipv6_prefix", "must be from 0 to 128"));
        },
        headers: raw.headers,
        failure_mode: raw.failure_mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        Compiled::parse(json.as_bytes()).unwrap_err()
    }

    const LIMIT: &str = r#"{"name":"a","quota":10,"window":"1s","key":["client_ip"]}"#;

    #[test]
    fn empty_and_full_configurations_compile() {
        let c = Compiled::parse(b"{}").unwrap();
        assert!(c.limits.is_empty() && c.routes.0.is_empty());
        assert_eq!(c.consumer_header, "x-tollgate-consumer");
        assert_eq!(c.headers, HeaderMode::Draft);
        let c = Compiled::parse(
            br#"{
              "limits": [
                {"name":"per-consumer","quota":10,"window":"1m","burst":20,"key":["consumer"],
                 "plans":{"pro":{"quota":100},"gold":{"quota":5000,"window":"1h","burst":500}},
                 "applies_to":"identified"},
                {"name":"daily","algorithm":"fixed_window","quota":10000,"window":"1d",
                 "key":["consumer",{"header":"X-Tenant"},{"query":"t"}],"shadow":true,"slots":1024},
                {"name":"per-ip","quota":5,"window":1000,"key":["client_ip"],"applies_to":"anonymous",
                 "missing_key":"shared"}
              ],
              "routes": [
                {"match":{"prefix":"/api/"},"limits":["per-consumer","daily","per-ip"],"cost":2,"name":"api"},
                {"match":{"prefix":"/health"},"disabled":true}
              ],
              "trusted_hops": 2, "headers": "both", "failure_mode": "deny", "plan_header":"X-Plan"
            }"#,
        )
        .unwrap();
        assert_eq!(c.limits.len(), 3);
        let l = &c.limits[0];
        assert_eq!(
            (l.params.quota, l.params.window_us, l.params.burst),
            (10, 60 * MICROS, 20)
        );
        assert_eq!(l.params_for(Some("pro")).quota, 100);
        assert_eq!(l.params_for(Some("pro")).burst, 100);
        assert_eq!(l.params_for(Some("gold")).window_us, 3600 * MICROS);
        assert_eq!(l.params_for(Some("nope")).quota, 10);
        assert_eq!(l.params_for(None).quota, 10);
        // plans are kept sorted by name: gold, pro
        assert_eq!(l.plan_index(Some("pro")), 2);
        assert_eq!(l.plan_index(Some("nope")), 0);
        assert_eq!(
            l.policies[l.plan_index(Some("gold"))],
            "\"per-consumer\";q=5000;w=3600"
        );
        assert_eq!(l.policies[0], "\"per-consumer\";q=10;w=60");
        assert_eq!(
            c.limits[1].key[1],
            KeySource::Header(HeaderName::from_static("x-tenant"))
        );
        assert_eq!(c.limits[1].table.buckets(), 128);
        assert_eq!(c.limits[1].table.key(0), "tollgate.ratelimit:daily:f:128:0");
        assert_eq!(
            c.limits[0].table.key(1),
            "tollgate.ratelimit:per-consumer:g:1024:1"
        );
        assert_eq!(
            c.limits[1].metric(LimitMetric::Evicted),
            "limit.daily.evicted"
        );
        assert!(c.limits[0].uses_client && c.limits[1].uses_client && c.limits[2].uses_client);
        assert!(c.routes.0[0].uses_client && !c.routes.0[1].uses_client);
        assert_eq!(c.routes.0[0].limits, vec![0, 1, 2]);
        assert_eq!(c.routes.0[1].name, "routes[1]");
        assert_eq!(c.plan_header, "x-plan");
        assert_eq!(c.failure_mode, FailureMode::Deny);
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let with = |limit: &str| format!(r#"{{"limits":[{limit}]}}"#);
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with(r#"{"name":"a","quota":0,"window":"1s","key":["client_ip"]}"#),
                "limits[0].quota",
                "at least 1",
            ),
            (
                with(r#"{"name":"a","quota":-5,"window":"1s","key":["client_ip"]}"#),
                "limits[0].quota",
                "invalid value",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"0s","key":["client_ip"]}"#),
                "limits[0].window",
                "at least 1s",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"-1s","key":["client_ip"]}"#),
                "limits[0].window",
                "duration",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1.5s","key":["client_ip"]}"#),
                "limits[0].window",
                "whole number",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","burst":0,"key":["client_ip"]}"#),
                "limits[0].burst",
                "at least 1",
            ),
            (
                with(
                    r#"{"name":"a","algorithm":"fixed_window","quota":5,"window":"1s","burst":3,"key":["client_ip"]}"#,
                ),
                "limits[0].burst",
                "gcra",
            ),
            (
                with(
                    r#"{"name":"a","algorithm":"leaky","quota":5,"window":"1s","key":["client_ip"]}"#,
                ),
                "limits[0].algorithm",
                "unknown variant",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":["cookie"]}"#),
                "limits[0].key[0]",
                "unknown variant `cookie`",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":[{"header":"bad header"}]}"#),
                "limits[0].key[0].header",
                "not a header name",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":["route","route"]}"#),
                "limits[0].key[1]",
                "already",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":[]}"#),
                "limits[0].key",
                "at least one",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s"}"#),
                "limits[0]",
                "missing field `key`",
            ),
            (
                with(r#"{"name":"a b","quota":5,"window":"1s","key":["route"]}"#),
                "limits[0].name",
                "not a limit name",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":["route"],"slots":2}"#),
                "limits[0].slots",
                "from 8",
            ),
            (
                with(
                    r#"{"name":"a","quota":5,"window":"1s","key":["route"],"plans":{"pro":{"quota":0}}}"#,
                ),
                "limits[0].plans.pro.quota",
                "at least 1",
            ),
            (
                with(
                    r#"{"name":"a","quota":5,"window":"1s","key":["route"],"plans":{"pro":{"quota":1,"rate":2}}}"#,
                ),
                "limits[0].plans.pro.rate",
                "unknown field",
            ),
            (
                with(r#"{"name":"a","quota":5,"window":"1s","key":["route"],"applies_to":"bots"}"#),
                "limits[0].applies_to",
                "unknown variant",
            ),
            (
                format!(r#"{{"limits":[{LIMIT},{LIMIT}]}}"#),
                "limits[1].name",
                "duplicate limit name `a`",
            ),
            (
                format!(r#"{{"limits":[{LIMIT}],"routes":[{{"limits":["b"]}}]}}"#),
                "routes[0].limits[0]",
                "no limit named `b`",
            ),
            (
                format!(r#"{{"limits":[{LIMIT}],"routes":[{{"limits":["a","a"]}}]}}"#),
                "routes[0].limits[1]",
                "twice",
            ),
            (
                format!(r#"{{"limits":[{LIMIT}],"routes":[{{"limits":["a"],"cost":0}}]}}"#),
                "routes[0].cost",
                "at least 1",
            ),
            (
                format!(r#"{{"limits":[{LIMIT}],"routes":[{{"limits":["a"],"cost":11}}]}}"#),
                "routes[0].cost",
                "never fit",
            ),
            (r#"{"headers":"some"}"#.into(), "headers", "unknown variant"),
            (
                r#"{"failure_mode":"panic"}"#.into(),
                "failure_mode",
                "unknown variant",
            ),
            (
                r#"{"consumer_header":""}"#.into(),
                "consumer_header",
                "not a header name",
            ),
            (
                r#"{"routes":[],"no_such_field":1}"#.into(),
                "no_such_field",
                "unknown field",
            ),
        ];
        for (json, field, reason) in cases {
            let e = err(&json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.reason.contains(reason), "{json}: {e}");
        }
    }

    #[test]
    fn request_header_reads_list_what_requests_may_read() {
        let reads = |json: &str| match Compiled::parse(json.as_bytes())
            .unwrap()
            .request_header_reads()
        {
            HeaderReads::Only(names) => Some(names),
            HeaderReads::Any => None,
        };
        let route = |key: &str| {
            format!(
                r#"{{"limits":[{{"name":"a","quota":1,"window":"1s","key":{key}}}],
                   "routes":[{{"match":{{"prefix":"/"}},"limits":["a"]}}]}}"#
            )
        };
        assert_eq!(reads("{}"), Some(vec![]));
        assert_eq!(reads(&route(r#"["route"]"#)), Some(vec![":path".into()]));
        assert_eq!(
            reads(&route(r#"["client_ip", {"query": "t"}]"#)),
            Some(vec![":path".into()])
        );
        assert_eq!(
            reads(&route(r#"["api_key", {"header": "X-Tenant"}]"#)),
            Some(vec![":path".into(), "x-api-key".into(), "x-tenant".into()])
        );
        let trusted = route(r#"["client_ip"]"#).replacen('{', r#"{"trusted_hops":1,"#, 1);
        assert_eq!(
            reads(&trusted),
            Some(vec![":path".into(), "x-forwarded-for".into()])
        );
        // A route matching on the method and host; a limit using the consumer (its header, the
        // identity source and the plan header are read).
        let json = r#"{"limits":[{"name":"a","quota":1,"window":"1s","key":["consumer"]}],
            "routes":[{"match":{"prefix":"/","methods":["POST"],"hosts":["a.example"]},
                       "limits":["a"]}]}"#;
        assert_eq!(
            reads(json),
            Some(
                [
                    ":path",
                    ":method",
                    ":authority",
                    "host",
                    "x-tollgate-consumer",
                    "x-tollgate-plan",
                    "x-tollgate-identity-source"
                ]
                .map(String::from)
                .to_vec()
            )
        );
    }
}
