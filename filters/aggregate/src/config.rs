//! Configuration of the aggregate filter: serde structs as written (`Config`), validated and
//! compiled into an immutable form (`Compiled`) with templates parsed, dependencies ordered and
//! every duration resolved.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_common::config::{ByteSize, ConfigDuration, HeaderName, Name};
use tollgate_common::route::{RouteMatch, Routed};
use tollgate_common::ConfigError;

use crate::shape::FieldPath;
use crate::template::{PathTemplate, Var};

/// Default timeout of one call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default overall deadline of a composite request.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// Default largest call answer accepted.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Default largest request body buffered for calls that forward it.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Request headers forwarded to every call unless the call says otherwise.
pub const DEFAULT_FORWARD_HEADERS: &[&str] = &["traceparent", "tracestate", "x-request-id"];
/// The auth filter's consumer header (`{consumer}`).
pub const DEFAULT_CONSUMER_HEADER: &str = "x-tollgate-consumer";
/// The identity headers the auth filter sets by default: consumer, plan and where the identity
/// comes from (`jwt:<provider>`, `api_key`, `introspection`).
pub const DEFAULT_IDENTITY_HEADERS: &[&str] = &[
    "x-tollgate-consumer",
    "x-tollgate-plan",
    "x-tollgate-identity-source",
];

/// The filter's configuration (JSON in Envoy's `configuration` field).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Per-route rules; the first match applies.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Circuit breaker for every backend (cluster) that calls use; none: no breaker.
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    /// The request header with the caller's consumer id, set by the auth filter: `{consumer}`.
    #[serde(default)]
    pub consumer_header: Option<HeaderName>,
    /// The request headers that hold the caller's verified identity (the auth filter sets them
    /// and removes client copies): forwarded by calls with `forward_identity`, and
    /// `{identity.NAME}` in paths. The consumer header is always one of them.
    #[serde(default)]
    pub identity_headers: Option<Vec<HeaderName>>,
}

/// A per-route rule: a composite endpoint when it has calls, else a pass-through rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub route: RouteMatch,
    /// Skip the filter for these requests.
    #[serde(default)]
    pub disabled: bool,
    /// Name used in metrics (`tollgate.aggregate.ep.<name>.*`); default `route<index>`.
    #[serde(default)]
    pub name: Option<Name>,
    /// The calls of the composite endpoint; empty: requests pass through untouched.
    #[serde(default)]
    pub calls: Vec<CallConfig>,
    /// Bound of the whole composite request; each call gets at most what is left of it.
    #[serde(default)]
    pub deadline: Option<ConfigDuration>,
    /// Add an `errors` member naming each failed call, its backend and why.
    #[serde(default)]
    pub errors: bool,
    /// Largest request body buffered when a call forwards it; a larger one is refused (413).
    #[serde(default)]
    pub max_request_bytes: Option<ByteSize>,
    /// Client shapes, chosen by a request header or a path prefix; the first that fits applies.
    #[serde(default)]
    pub profiles: Vec<ProfileConfig>,
}

/// One backend call of a composite endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// Identifier of the call: used by dependent paths (`{user.company_id}`), errors, metrics.
    pub name: Name,
    /// Envoy cluster that receives the call.
    pub cluster: String,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Path (and query) template: `/users/{user}?q={query.q}&c={user.company_id}`.
    pub path: String,
    /// `:authority` of the call; default the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Request headers copied to the call (case-insensitive names).
    #[serde(default)]
    pub forward_headers: Option<Vec<HeaderName>>,
    /// Send the caller's identity headers (`identity_headers`) with the call, so the backend can
    /// check who is asking.
    #[serde(default = "default_true")]
    pub forward_identity: bool,
    /// Fixed headers added to the call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeout of the call (bounded by what is left of the deadline).
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
    /// A failed required call fails the whole request (502, or 504 on timeout).
    #[serde(default)]
    pub required: bool,
    /// How the answer goes into the merged reply.
    #[serde(default)]
    pub merge: MergeMode,
    /// Member of the merged reply for `key` and `append` merges; default the call's name.
    #[serde(default)]
    pub key: Option<String>,
    /// JSON pointer selecting a part of the answer (`/items/0`).
    #[serde(default)]
    pub pointer: Option<String>,
    /// Keep only these fields (dotted paths; arrays apply to each element).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Remove these fields (dotted paths; arrays apply to each element).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Rename top-level members of the (selected) answer: `{"old": "new"}`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Largest answer accepted, in bytes; a larger one counts as a failure.
    #[serde(default)]
    pub max_response_bytes: Option<ByteSize>,
    /// Send a second identical call when the first has not answered after this delay.
    #[serde(default)]
    pub hedge_after: Option<ConfigDuration>,
    /// Circuit breaker of this call's backend, overriding the top-level one; `null`: inherit.
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    /// Send the client's request body with this call (the calls then start at the end of the
    /// request body instead of at its headers).
    #[serde(default)]
    pub forward_body: bool,
    /// Accept that `forward_headers` other than the trace and identity headers go to a call
    /// with a circuit breaker (a client could make the backend fail and open the breaker for
    /// everyone); refused at load without it.
    #[serde(default)]
    pub breaker_accepts_client_headers: bool,
}

fn default_method() -> String {
    "GET".into()
}

fn default_true() -> bool {
    true
}

/// How a call's answer goes into the merged reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// Under the call's own key (nothing collides).
    #[default]
    Key,
    /// Members of the answer (an object) at the root; later calls in configuration order win.
    Root,
    /// Deep-merged into the root: objects merge recursively, other values replace.
    Deep,
    /// Appended to the array under the key (an array answer is appended element by element).
    Append,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long it stays open before one probe call is let through.
    #[serde(default)]
    pub cool_down: Option<ConfigDuration>,
    /// Turn the breaker off for this call (per-call override).
    #[serde(default)]
    pub disabled: bool,
}

fn default_failures() -> u32 {
    5
}

/// A client shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Name, sent back in `x-aggregate-profile`.
    pub name: Name,
    /// Chosen when this request header has this value: `{"name": "x-client", "value": "mobile"}`.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    /// Chosen when the request path starts with this prefix.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Only these calls are made (default: all); dependencies must be listed too.
    #[serde(default)]
    pub calls: Option<Vec<String>>,
    /// Keep only these fields of the merged reply (dotted paths).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Remove these fields of the merged reply (dotted paths).
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A request header and the value it must have.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: HeaderName,
    /// Exact value.
    pub value: String,
}

// ---------------------------------------------------------------------------------------------
// Compiled form

/// The compiled configuration.
#[derive(Debug)]
pub struct Compiled {
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// True when some call hedges (the root then ticks to wake requests).
    pub hedging: bool,
    /// The consumer header (lower case).
    pub consumer_header: String,
    /// The identity headers (lower case), the consumer header first.
    pub identity_headers: Vec<String>,
}

impl Default for Compiled {
    fn default() -> Self {
        Compiled {
            rules: Vec::new(),
            hedging: false,
            consumer_header: DEFAULT_CONSUMER_HEADER.into(),
            identity_headers: DEFAULT_IDENTITY_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

/// A compiled route rule.
#[derive(Debug)]
pub struct Rule {
    /// Which requests it applies to.
    pub route: RouteMatch,
    /// Skip the filter.
    pub disabled: bool,
    /// The composite endpoint, when the rule has calls.
    pub endpoint: Option<Endpoint>,
}

impl Routed for Rule {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// A compiled composite endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Metric name.
    pub name: String,
    /// Calls in configuration order (merge order).
    pub calls: Vec<Call>,
    /// Overall deadline.
    pub deadline: Duration,
    /// Add the `errors` member.
    pub errors: bool,
    /// Some call forwards the request body.
    pub needs_body: bool,
    /// Largest request body buffered.
    pub max_request_bytes: usize,
    /// Client shapes.
    pub profiles: Vec<Profile>,
}

/// A compiled call.
#[derive(Debug)]
pub struct Call {
    /// Name.
    pub name: String,
    /// Cluster.
    pub cluster: String,
    /// Method, upper case.
    pub method: String,
    /// Path template.
    pub path: PathTemplate,
    /// `:authority`.
    pub authority: String,
    /// Forwarded request headers (lower case).
    pub forward_headers: Vec<String>,
    /// Forward the identity headers.
    pub forward_identity: bool,
    /// The identity headers the path uses (`{consumer}`: the consumer header;
    /// `{identity.NAME}`: NAME), lower case.
    pub identity_vars: Vec<String>,
    /// Fixed headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Timeout.
    pub timeout: Duration,
    /// Required.
    pub required: bool,
    /// Merge mode.
    pub merge: MergeMode,
    /// Output key (`key` and `append`).
    pub key: String,
    /// JSON pointer.
    pub pointer: Option<String>,
    /// Allowed fields.
    pub allow: Vec<FieldPath>,
    /// Denied fields.
    pub deny: Vec<FieldPath>,
    /// Renames of top-level members.
    pub rename: Vec<(String, String)>,
    /// Largest answer.
    pub max_response_bytes: usize,
    /// Hedging delay.
    pub hedge_after: Option<Duration>,
    /// Send the request body.
    pub forward_body: bool,
    /// Breaker, when enabled.
    pub breaker: Option<Breaker>,
    /// Indexes of the calls whose answers the path uses.
    pub depends_on: Vec<usize>,
}

/// Compiled breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// Open time before a probe.
    pub cool_down: Duration,
}

/// How a profile is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// A header with an exact value (lower-case name).
    Header(String, String),
    /// A path prefix.
    PathPrefix(String),
}

/// A compiled profile.
#[derive(Debug)]
pub struct Profile {
    /// Name.
    pub name: String,
    /// How it is chosen.
    pub selector: Selector,
    /// Which calls run (indexes); `None`: all.
    pub calls: Option<Vec<usize>>,
    /// Allowed fields of the merged reply.
    pub allow: Vec<FieldPath>,
    /// Denied fields of the merged reply.
    pub deny: Vec<FieldPath>,
}

const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(10);

/// Headers that describe the downstream connection or message framing: Envoy sets them for the
/// call itself, and a copied value (a `content-length` that does not fit the call's body) would
/// break it.
const CONNECTION_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn check_header_name(name: &str) -> Result<String, String> {
    let lower = HeaderName::new(name)?.into_string();
    if CONNECTION_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "`{name}` belongs to the connection or the message framing; Envoy sets it for the call"
        ));
    }
    Ok(lower)
}

fn compile_breaker(b: &BreakerConfig) -> Result<Option<Breaker>, ConfigError> {
    if b.disabled {
        return Ok(None);
    }
    if b.failures == 0 {
        return Err(ConfigError::new("failures", "must be at least 1"));
    }
    let cool_down = b.cool_down.map(|d| d.0).unwrap_or(DEFAULT_COOL_DOWN);
    if cool_down.is_zero() {
        return Err(ConfigError::new("cool_down", "must be more than 0"));
    }
    Ok(Some(Breaker {
        failures: b.failures,
        cool_down,
    }))
}

fn compile_fields(list: &[String], field: &str) -> Result<Vec<FieldPath>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| FieldPath::parse(p).map_err(|e| ConfigError::new(format!("{field}[{i}]"), e)))
        .collect()
}

impl Config {
    /// Parse and validate a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Compiled, ConfigError> {
        let config: Config = tollgate_common::config::parse(bytes)?;
        config.compile()
    }

    /// Validate and compile.
    pub fn compile(self) -> Result<Compiled, ConfigError> {
        let default_breaker = match &self.circuit_breaker {
            Some(b) => compile_breaker(b).map_err(|e| e.within("circuit_breaker"))?,
            None => None,
        };
        let consumer_header = match &self.consumer_header {
            Some(h) => {
                check_header_name(h.as_str()).map_err(|e| ConfigError::new("consumer_header", e))?
            }
            None => DEFAULT_CONSUMER_HEADER.to_string(),
        };
        let mut identity_headers = vec![consumer_header.clone()];
        match &self.identity_headers {
            Some(list) => {
                for (i, h) in list.iter().enumerate() {
                    let name = check_header_name(h.as_str())
                        .map_err(|e| ConfigError::new(format!("identity_headers[{i}]"), e))?;
                    if !identity_headers.contains(&name) {
                        identity_headers.push(name);
                    }
                }
            }
            None => {
                for h in DEFAULT_IDENTITY_HEADERS {
                    if !identity_headers.iter().any(|x| x == h) {
                        identity_headers.push(h.to_string());
                    }
                }
            }
        }
        let identity = Identity {
            headers: &identity_headers,
        };
        let mut rules = Vec::new();
        let mut hedging = false;
        let mut names: Vec<String> = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let at = format!("routes[{i}]");
            let endpoint = if r.calls.is_empty() {
                if !r.profiles.is_empty() {
                    return Err(ConfigError::new(
                        format!("{at}.profiles"),
                        "profiles need `calls`",
                    ));
                }
                None
            } else {
                let name = r
                    .name
                    .as_ref()
                    .map_or_else(|| format!("route{i}"), |n| n.to_string());
                if names.contains(&name) {
                    return Err(ConfigError::new(
                        format!("{at}.name"),
                        format!("`{name}` is already the name of another route"),
                    ));
                }
                names.push(name.clone());
                let ep = compile_endpoint(name, &r, default_breaker, &identity)
                    .map_err(|e| e.within(&at))?;
                hedging |= ep.calls.iter().any(|c| c.hedge_after.is_some());
                Some(ep)
            };
            rules.push(Rule {
                route: r.route,
                disabled: r.disabled,
                endpoint,
            });
        }
        Ok(Compiled {
            rules,
            hedging,
            consumer_header,
            identity_headers,
        })
    }
}

/// What calls may use of the caller's identity.
struct Identity<'a> {
    /// The identity headers (lower case), the consumer header first.
    headers: &'a [String],
}

fn compile_endpoint(
    name: String,
    r: &RouteConfig,
    default_breaker: Option<Breaker>,
    identity: &Identity<'_>,
) -> Result<Endpoint, ConfigError> {
    let route_vars: Vec<&str> = r.route.variables();
    let deadline = r.deadline.map(|d| d.0).unwrap_or(DEFAULT_DEADLINE);
    if deadline.is_zero() {
        return Err(ConfigError::new("deadline", "must be more than 0"));
    }
    let max_request_bytes = r
        .max_request_bytes
        .map_or(DEFAULT_MAX_REQUEST_BYTES, ByteSize::usize);
    if max_request_bytes == 0 {
        return Err(ConfigError::new("max_request_bytes", "must be more than 0"));
    }
    let call_names: Vec<&str> = r.calls.iter().map(|c| c.name.as_str()).collect();
    let mut calls: Vec<Call> = Vec::new();
    for (i, c) in r.calls.iter().enumerate() {
        let at = format!("calls[{i}]");
        let call = compile_call(c, &route_vars, &call_names, default_breaker, identity)
            .map_err(|e| e.within(&at))?;
        let uses_consumer = call.path.vars().any(|v| *v == Var::Consumer);
        if uses_consumer && route_vars.contains(&"consumer") {
            return Err(ConfigError::new(
                "match.template",
                "the route variable `{consumer}` is ambiguous: in call paths `{consumer}` is the \
                 caller's identity; give the route variable another name",
            ));
        }
        if call_names.iter().take(i).any(|n| *n == c.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate call name `{}`", c.name),
            ));
        }
        calls.push(call);
    }
    check_keys(&calls, r.errors)?;
    check_cycles(&calls)?;
    let mut profiles = Vec::new();
    for (i, p) in r.profiles.iter().enumerate() {
        let at = format!("profiles[{i}]");
        profiles.push(compile_profile(p, &calls).map_err(|e| e.within(&at))?);
    }
    let needs_body = calls.iter().any(|c| c.forward_body);
    Ok(Endpoint {
        name,
        calls,
        deadline,
        errors: r.errors,
        needs_body,
        max_request_bytes,
        profiles,
    })
}

/// Output keys: two calls may share a key only when both append to it; `errors` is taken
/// when the errors member is on.
fn check_keys(calls: &[Call], errors: bool) -> Result<(), ConfigError> {
    let keyed = |c: &Call| matches!(c.merge, MergeMode::Key | MergeMode::Append);
    for (i, c) in calls.iter().enumerate().filter(|(_, c)| keyed(c)) {
        if errors && c.key == "errors" {
            return Err(ConfigError::new(
                format!("calls[{i}].key"),
                "`errors` is the errors member (`errors: true`); choose another key",
            ));
        }
        if let Some(j) = calls.iter().take(i).position(|o| {
            keyed(o)
                && o.key == c.key
                && !(o.merge == MergeMode::Append && c.merge == MergeMode::Append)
        }) {
            return Err(ConfigError::new(
                format!("calls[{i}].key"),
                format!(
                    "duplicate key `{}` (also the key of calls[{j}]); only `append` calls may share a key",
                    c.key
                ),
            ));
        }
    }
    Ok(())
}

fn compile_call(
    c: &CallConfig,
    route_vars: &[&str],
    call_names: &[&str],
    default_breaker: Option<Breaker>,
    identity: &Identity<'_>,
) -> Result<Call, ConfigError> {
    let method = check_target(c)?;
    let path = PathTemplate::parse(&c.path).map_err(|e| ConfigError::new("path", e))?;
    let (depends_on, identity_vars) = template_uses(&path, route_vars, call_names, identity)?;
    let (forward_headers, headers) = compile_headers(c)?;
    let timeout = c.timeout.map(|d| d.0).unwrap_or(DEFAULT_CALL_TIMEOUT);
    if timeout.is_zero() {
        return Err(ConfigError::new("timeout", "must be more than 0"));
    }
    let (key, rename) = compile_placement(c)?;
    let max_response_bytes = c
        .max_response_bytes
        .map_or(DEFAULT_MAX_RESPONSE_BYTES, ByteSize::usize);
    if max_response_bytes == 0 {
        return Err(ConfigError::new(
            "max_response_bytes",
            "must be more than 0",
        ));
    }
    let hedge_after = c.hedge_after.map(|d| d.0);
    if hedge_after.is_some_and(|h| h.is_zero() || h >= timeout) {
        return Err(ConfigError::new(
            "hedge_after",
            "must be more than 0 and less than the call's `timeout`",
        ));
    }
    let breaker = match &c.circuit_breaker {
        Some(b) => compile_breaker(b).map_err(|e| e.within("circuit_breaker"))?,
        None => default_breaker,
    };
    if breaker.is_some() && !c.breaker_accepts_client_headers {
        check_shared_breaker(c, &forward_headers, identity)?;
    }
    Ok(Call {
        name: c.name.to_string(),
        cluster: c.cluster.clone(),
        method,
        path,
        authority: c.authority.clone().unwrap_or_else(|| c.cluster.clone()),
        forward_headers,
        forward_identity: c.forward_identity,
        identity_vars,
        headers,
        timeout,
        required: c.required,
        merge: c.merge,
        key,
        pointer: c.pointer.clone(),
        allow: compile_fields(&c.allow, "allow")?,
        deny: compile_fields(&c.deny, "deny")?,
        rename,
        max_response_bytes,
        hedge_after,
        forward_body: c.forward_body,
        breaker,
        depends_on,
    })
}

/// Fixed headers of a call: (lower-case name, value).
type Fixed = Vec<(String, String)>;

/// The headers of a call: the names copied from the request (default: the trace headers) and
/// the fixed ones.
fn compile_headers(c: &CallConfig) -> Result<(Vec<String>, Fixed), ConfigError> {
    let forward_headers = match &c.forward_headers {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, h)| {
                check_header_name(h.as_str())
                    .map_err(|e| ConfigError::new(format!("forward_headers[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => DEFAULT_FORWARD_HEADERS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut headers = Vec::new();
    for (k, v) in &c.headers {
        let name = check_header_name(k).map_err(|e| ConfigError::new(format!("headers.{k}"), e))?;
        headers.push((name, v.clone()));
    }
    Ok((forward_headers, headers))
}

/// The call's name, cluster and method; the method upper-cased.
fn check_target(c: &CallConfig) -> Result<String, ConfigError> {
    // `{name}` is a route variable and `{name.field}` a call's answer, so a call may share a
    // route variable's name; `query` and `identity` are reserved for `{query.NAME}` and
    // `{identity.NAME}`.
    if c.name == "query" || c.name == "identity" {
        return Err(ConfigError::new(
            "name",
            format!(
                "`{0}` is reserved for `{{{0}.NAME}}`; choose another name",
                c.name
            ),
        ));
    }
    if c.cluster.trim().is_empty() {
        return Err(ConfigError::new("cluster", "must not be empty"));
    }
    let method = c.method.trim().to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ConfigError::new(
            "method",
            format!("`{}` is not a method name", c.method),
        ));
    }
    Ok(method)
}

/// What a call's path template uses: the calls it depends on (indexes, `{call.field}`) and the
/// identity headers it reads (`{consumer}`, `{identity.NAME}`). Every variable must resolve.
fn template_uses(
    path: &PathTemplate,
    route_vars: &[&str],
    call_names: &[&str],
    identity: &Identity<'_>,
) -> Result<(Vec<usize>, Vec<String>), ConfigError> {
    fn push_new<T: PartialEq>(list: &mut Vec<T>, x: T) {
        if !list.contains(&x) {
            list.push(x);
        }
    }
    let mut depends_on = Vec::new();
    let mut identity_vars: Vec<String> = Vec::new();
    for var in path.vars() {
        match var {
            Var::Consumer => push_new(
                &mut identity_vars,
                identity.headers.first().cloned().unwrap_or_default(),
            ),
            Var::Identity(h) if identity.headers.contains(h) => {
                push_new(&mut identity_vars, h.clone())
            }
            Var::Identity(h) => {
                return Err(ConfigError::new(
                    "path",
                    format!(
                        "`{{identity.{h}}}`: `{h}` is not one of `identity_headers` ({}), the \
                         headers the auth filter sets",
                        identity.headers.join(", ")
                    ),
                ));
            }
            Var::Route(n) if !route_vars.contains(&n.as_str()) => {
                let hint = if call_names.contains(&n.as_str()) {
                    format!(" (a call's answer is used as `{{{n}.field}}`)")
                } else {
                    String::new()
                };
                return Err(ConfigError::new(
                    "path",
                    format!(
                        "unknown template variable `{{{n}}}`: not a variable of the route's `match.template`{hint}"
                    ),
                ));
            }
            Var::Route(_) | Var::Query(_) => {}
            Var::Field(head, _) => match call_names.iter().position(|n| n == head) {
                Some(j) => push_new(&mut depends_on, j),
                None => {
                    return Err(ConfigError::new(
                        "path",
                        format!(
                            "unknown template variable `{{{head}.…}}`: `{head}` is not the name of a call"
                        ),
                    ))
                }
            },
        }
    }
    Ok((depends_on, identity_vars))
}

/// Where the answer goes: `pointer`, the output key and `rename`.
fn compile_placement(c: &CallConfig) -> Result<(String, Vec<(String, String)>), ConfigError> {
    if let Some(p) = &c.pointer {
        if !(p.is_empty() || p.starts_with('/')) {
            return Err(ConfigError::new(
                "pointer",
                format!("`{p}` is not a JSON pointer (RFC 6901): it must start with `/`"),
            ));
        }
    }
    let key = c.key.clone().unwrap_or_else(|| c.name.to_string());
    if key.is_empty() {
        return Err(ConfigError::new("key", "must not be empty"));
    }
    if c.key.is_some() && matches!(c.merge, MergeMode::Root | MergeMode::Deep) {
        return Err(ConfigError::new(
            "key",
            "a `root` or `deep` merge has no key",
        ));
    }
    let mut rename: Vec<(String, String)> = Vec::new();
    for (from, to) in &c.rename {
        if to.is_empty() {
            return Err(ConfigError::new(
                format!("rename.{from}"),
                "the new name must not be empty",
            ));
        }
        if let Some((other, _)) = rename.iter().find(|(_, t)| t == to) {
            return Err(ConfigError::new(
                format!("rename.{from}"),
                format!("`{other}` is renamed to `{to}` too; one would silently replace the other"),
            ));
        }
        rename.push((from.clone(), to.clone()));
    }
    Ok((key, rename))
}

/// A call with a circuit breaker forwards no header a client chooses. One breaker per backend,
/// shared by every client: a header a client chooses must not be able to make the backend fail
/// (slow, 5xx) and so open it for everyone. The trace headers carry no such power, and the
/// identity headers are the auth filter's.
fn check_shared_breaker(
    c: &CallConfig,
    forward_headers: &[String],
    identity: &Identity<'_>,
) -> Result<(), ConfigError> {
    let chosen = forward_headers.iter().enumerate().find(|(_, h)| {
        !DEFAULT_FORWARD_HEADERS.contains(&h.as_str()) && !identity.headers.contains(h)
    });
    let Some((i, h)) = chosen else {
        return Ok(());
    };
    Err(ConfigError::new(
        format!("forward_headers[{i}]"),
        format!(
            "`{h}` is the client's to choose, and this call has a circuit breaker that \
             every client shares: one client could make `{}` fail and open it for all; \
             forward it from a call without a breaker (`\"circuit_breaker\": {{\"disabled\": \
             true}}`), or accept that with `breaker_accepts_client_headers: true`",
            c.cluster
        ),
    ))
}

/// Refuse dependency cycles, naming a call on the cycle.
fn check_cycles(calls: &[Call]) -> Result<(), ConfigError> {
    // 0 = unvisited, 1 = on the stack, 2 = done
    fn visit(
        i: usize,
        calls: &[Call],
        marks: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        match marks.get(i) {
            Some(1) => {
                let from = stack.iter().position(|s| *s == i).unwrap_or(0);
                let mut cycle: Vec<usize> =
                    stack.get(from..).map(<[usize]>::to_vec).unwrap_or_default();
                cycle.push(i);
                return Some(cycle);
            }
            Some(2) | None => return None,
            _ => {}
        }
        if let Some(m) = marks.get_mut(i) {
            *m = 1;
        }
        stack.push(i);
        if let Some(c) = calls.get(i) {
            for d in &c.depends_on {
                if let Some(cycle) = visit(*d, calls, marks, stack) {
                    return Some(cycle);
                }
            }
        }
        stack.pop();
        if let Some(m) = marks.get_mut(i) {
            *m = 2;
        }
        None
    }
    let mut marks = vec![0u8; calls.len()];
    for i in 0..calls.len() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(i, calls, &mut marks, &mut stack) {
            let names: Vec<&str> = cycle
                .iter()
                .filter_map(|j| calls.get(*j).map(|c| c.name.as_str()))
                .collect();
            let first = cycle.first().copied().unwrap_or(i);
            return Err(ConfigError::new(
                format!("calls[{first}].path"),
                format!("dependency cycle: {}", names.join(" -> ")),
            ));
        }
    }
    Ok(())
}

fn compile_profile(p: &ProfileConfig, calls: &[Call]) -> Result<Profile, ConfigError> {
    let selector = match (&p.header, &p.path_prefix) {
        (Some(h), None) => Selector::Header(h.name.to_string(), h.value.clone()),
        (None, Some(prefix)) => {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new("path_prefix", "must start with `/`"));
            }
            Selector::PathPrefix(prefix.clone())
        }
        _ => {
            return Err(ConfigError::new(
                "(root)",
                "give exactly one of `header` and `path_prefix`",
            ))
        }
    };
    let selected = match &p.calls {
        None => None,
        Some(list) => Some(profile_calls(list, calls)?),
    };
    Ok(Profile {
        name: p.name.to_string(),
        selector,
        calls: selected,
        allow: compile_fields(&p.allow, "allow")?,
        deny: compile_fields(&p.deny, "deny")?,
    })
}

/// The calls a profile keeps (indexes), each with every call it depends on.
fn profile_calls(list: &[String], calls: &[Call]) -> Result<Vec<usize>, ConfigError> {
    let mut idx = Vec::new();
    for (i, n) in list.iter().enumerate() {
        let Some(j) = calls.iter().position(|c| c.name == *n) else {
            return Err(ConfigError::new(
                format!("calls[{i}]"),
                format!("`{n}` is not the name of a call"),
            ));
        };
        idx.push(j);
    }
    for (i, j) in idx.iter().enumerate() {
        let Some(c) = calls.get(*j) else { continue };
        if let Some(d) = c.depends_on.iter().find(|d| !idx.contains(d)) {
            let dep = calls.get(*d).map(|x| x.name.as_str()).unwrap_or("?");
            return Err(ConfigError::new(
                format!("calls[{i}]"),
                format!(
                    "`{}` depends on `{dep}`, which the profile leaves out",
                    c.name
                ),
            ));
        }
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).unwrap_err()
    }

    const EP: &str = r#"{"match":{"template":"/api/dashboard/{user}"},"calls":[
        {"name":"user","cluster":"users","path":"/users/{user}"},
        {"name":"orders","cluster":"orders","path":"/orders?user={user}"}]}"#;

    #[test]
    fn empty_and_example_configurations_are_valid() {
        let c = Config::parse(b"{}").unwrap();
        assert!(c.rules.is_empty() && !c.hedging);
        let c = Config::parse(format!(r#"{{"routes":[{EP}]}}"#).as_bytes()).unwrap();
        let ep = c.rules[0].endpoint.as_ref().unwrap();
        assert_eq!(ep.name, "route0");
        assert_eq!(ep.calls.len(), 2);
        assert_eq!(ep.calls[0].timeout, DEFAULT_CALL_TIMEOUT);
        assert_eq!(ep.calls[0].forward_headers.len(), 3);
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_field() {
        let call = |extra: &str| {
            format!(
                r#"{{"routes":[{{"match":{{"template":"/d/{{user}}"}},"calls":[{{"name":"a","cluster":"users","path":"/users/{{user}}"}}, {extra}]}}]}}"#
            )
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (
                r#"{"routes":[],"no_such_field":1}"#.into(),
                "no_such_field",
                "unknown field",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x/{nope}"}"#),
                "routes[0].calls[1].path",
                "unknown template variable `{nope}`",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x/{zz.id}"}"#),
                "routes[0].calls[1].path",
                "not the name of a call",
            ),
            (
                call(r#"{"name":"a","cluster":"c","path":"/x"}"#),
                "routes[0].calls[1].name",
                "duplicate call name",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","key":"a"}"#),
                "routes[0].calls[1].key",
                "duplicate key `a`",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"x"}"#),
                "routes[0].calls[1].path",
                "start with `/`",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","forward_headers":["x-a","Content-Length"]}"#),
                "routes[0].calls[1].forward_headers[1]",
                "message framing",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","headers":{"Host":"h"}}"#),
                "routes[0].calls[1].headers.Host",
                "Envoy sets it",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","rename":{"a":"z","b":"z"}}"#),
                "routes[0].calls[1].rename.b",
                "renamed to `z` too",
            ),
            (
                r#"{"routes":[{"max_request_bytes":0,"calls":[{"name":"a","cluster":"c","path":"/x"}]}]}"#.into(),
                "routes[0].max_request_bytes",
                "more than 0",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x/{unclosed"}"#),
                "routes[0].calls[1].path",
                "`{`",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","timeout":"0s"}"#),
                "routes[0].calls[1].timeout",
                "more than 0",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","pointer":"items"}"#),
                "routes[0].calls[1].pointer",
                "JSON pointer",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","merge":"sideways"}"#),
                "routes[0].calls[1].merge",
                "unknown variant",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","hedge_after":"5s","timeout":"1s"}"#),
                "routes[0].calls[1].hedge_after",
                "less than",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","circuit_breaker":{"failures":0}}"#),
                "routes[0].calls[1].circuit_breaker.failures",
                "at least 1",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","merge":"root","key":"k"}"#),
                "routes[0].calls[1].key",
                "no key",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x","allow":["a..b"]}"#),
                "routes[0].calls[1].allow[0]",
                "empty",
            ),
            (
                call(r#"{"name":"query","cluster":"c","path":"/x"}"#),
                "routes[0].calls[1].name",
                "reserved",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x/{a}"}"#),
                "routes[0].calls[1].path",
                "{a.field}",
            ),
            (
                call(r#"{"name":"b","cluster":"c","path":"/x/{identity.x-org}"}"#),
                "routes[0].calls[1].path",
                "not one of `identity_headers`",
            ),
            (
                call(r#"{"name":"identity","cluster":"c","path":"/x"}"#),
                "routes[0].calls[1].name",
                "reserved",
            ),
            (
                r#"{"routes":[{"match":{"template":"/d/{consumer}"},"calls":[{"name":"a","cluster":"c","path":"/u/{consumer}"}]}]}"#.into(),
                "routes[0].match.template",
                "ambiguous",
            ),
            (
                r#"{"identity_headers":["x-org","Content-Length"]}"#.into(),
                "identity_headers[1]",
                "message framing",
            ),
            (
                r#"{"routes":[],"consumer_header":"bad header"}"#.into(),
                "consumer_header",
                "not a header name",
            ),
            (
                r#"{"circuit_breaker":{},"routes":[{"calls":[{"name":"a","cluster":"orders","path":"/o",
                    "forward_headers":["traceparent","x-tollgate-plan","x-demo-delay"]}]}]}"#
                    .into(),
                "routes[0].calls[0].forward_headers[2]",
                "open it for all",
            ),
            (
                r#"{"routes":[{"calls":[{"name":"a","cluster":"orders","path":"/o",
                    "circuit_breaker":{"failures":2},"forward_headers":["accept-language"]}]}]}"#
                    .into(),
                "routes[0].calls[0].forward_headers[0]",
                "breaker_accepts_client_headers",
            ),
        ];
        for (json, field, reason) in cases {
            let e = err(&json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.reason.contains(reason), "{json}: {e}");
        }
    }

    #[test]
    fn identity_headers_and_variables() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.consumer_header, "x-tollgate-consumer");
        assert_eq!(
            c.identity_headers,
            [
                "x-tollgate-consumer",
                "x-tollgate-plan",
                "x-tollgate-identity-source"
            ]
        );
        let c = Config::parse(
            br#"{"consumer_header":"X-Who","identity_headers":["x-org","X-WHO"],"routes":[{"calls":[
              {"name":"a","cluster":"c","path":"/u/{consumer}?o={identity.X-Org}"},
              {"name":"b","cluster":"c","path":"/b","forward_identity":false}]}]}"#,
        )
        .unwrap();
        assert_eq!(c.identity_headers, ["x-who", "x-org"]);
        let calls = &c.rules[0].endpoint.as_ref().unwrap().calls;
        assert_eq!(calls[0].identity_vars, ["x-who", "x-org"]);
        assert!(calls[0].forward_identity && !calls[1].forward_identity);
        assert!(calls[1].identity_vars.is_empty());
        // A route variable may be called `consumer` when no call path says `{consumer}`.
        Config::parse(
            br#"{"routes":[{"match":{"template":"/d/{consumer}"},"calls":[{"name":"a","cluster":"c","path":"/u"}]}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn client_headers_go_to_a_breaker_only_when_accepted() {
        let ok = |json: &str| Config::parse(json.as_bytes()).unwrap();
        // No breaker: any header.
        ok(
            r#"{"routes":[{"calls":[{"name":"a","cluster":"c","path":"/a","forward_headers":["x-demo-delay"]}]}]}"#,
        );
        // The breaker turned off for that call.
        ok(
            r#"{"circuit_breaker":{},"routes":[{"calls":[{"name":"a","cluster":"c","path":"/a",
              "forward_headers":["x-demo-delay"],"circuit_breaker":{"disabled":true}}]}]}"#,
        );
        // Trace and identity headers (also a configured one), or an explicit acceptance.
        ok(
            r#"{"circuit_breaker":{},"identity_headers":["x-org"],"routes":[{"calls":[
              {"name":"a","cluster":"c","path":"/a","forward_headers":["TraceParent","x-request-id","x-org","x-tollgate-consumer"]},
              {"name":"b","cluster":"c","path":"/b","forward_headers":["x-demo-delay"],"breaker_accepts_client_headers":true}]}]}"#,
        );
    }

    #[test]
    fn dependency_cycles_are_refused() {
        let e = err(r#"{"routes":[{"calls":[
              {"name":"a","cluster":"c","path":"/a/{c.id}"},
              {"name":"b","cluster":"c","path":"/b/{a.id}"},
              {"name":"c","cluster":"c","path":"/c/{b.id}"}]}]}"#);
        assert_eq!(e.field, "routes[0].calls[0].path");
        assert!(e.reason.contains("cycle: a -> c -> b -> a"), "{e}");
        let e = err(r#"{"routes":[{"calls":[{"name":"a","cluster":"c","path":"/a/{a.id}"}]}]}"#);
        assert!(e.reason.contains("cycle: a -> a"), "{e}");
    }

    #[test]
    fn profiles_are_checked() {
        let p = |profile: &str| {
            format!(
                r#"{{"routes":[{{"match":{{"template":"/d/{{user}}"}},"calls":[{{"name":"a","cluster":"users","path":"/users/{{user}}"}},{{"name":"b","cluster":"c","path":"/c/{{a.id}}"}}],"profiles":[{profile}]}}]}}"#
            )
        };
        let e = err(&p(r#"{"name":"m"}"#));
        assert_eq!(e.field, "routes[0].profiles[0]");
        assert!(e.reason.contains("exactly one"), "{e}");
        let e = err(&p(r#"{"name":"m","path_prefix":"/m","calls":["b"]}"#));
        assert_eq!(e.field, "routes[0].profiles[0].calls[0]");
        assert!(e.reason.contains("leaves out"), "{e}");
        let e = err(&p(r#"{"name":"m","path_prefix":"/m","calls":["zz"]}"#));
        assert!(e.reason.contains("not the name of a call"), "{e}");
        let ok = Config::parse(
            p(r#"{"name":"m","header":{"name":"X-Client","value":"mobile"},"calls":["a"],"allow":["a.name"]}"#)
                .as_bytes(),
        )
        .unwrap();
        let prof = &ok.rules[0].endpoint.as_ref().unwrap().profiles[0];
        assert_eq!(
            prof.selector,
            Selector::Header("x-client".into(), "mobile".into())
        );
        assert_eq!(prof.calls, Some(vec![0]));
    }

    #[test]
    fn append_calls_may_share_a_key_and_hedging_is_noticed() {
        let c = Config::parse(
            br#"{"routes":[{"calls":[
              {"name":"a","cluster":"c","path":"/a","merge":"append","key":"all"},
              {"name":"b","cluster":"c","path":"/b","merge":"append","key":"all","hedge_after":"50ms"}]}]}"#,
        )
        .unwrap();
        assert!(c.hedging);
        let e = err(
            r#"{"routes":[{"errors":true,"calls":[{"name":"errors","cluster":"c","path":"/a"}]}]}"#,
        );
        assert_eq!(e.field, "routes[0].calls[0].key");
    }
}
