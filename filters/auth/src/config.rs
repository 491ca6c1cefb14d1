//! Configuration of the authentication filter: serde structs (what is written), then
//! [`Config::compile`] into the immutable [`Compiled`] form the filter uses.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tollgate_common::config::{ConfigDuration, HeaderName, Sha256Hex};
use tollgate_common::route::{RouteMatch, Routed};
use tollgate_common::throttle::{FailureLimit, FailureLimitConfig};
use tollgate_common::ConfigError;

use crate::identity::{HeaderNames, Identity};
use crate::jose::{self, Alg, Jwk};

/// The filter's configuration (JSON in Envoy's `configuration` field).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Per-route rules; the first match applies. Requests no rule matches pass untouched
    /// (apart from the removal of forged identity headers).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// JWT providers, chosen by the token's `iss`.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// API keys.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// OAuth 2.0 token introspection (RFC 7662) for opaque bearer tokens.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// Where bearer tokens (JWTs and opaque tokens) are read from, tried in order.
    #[serde(default = "default_token_sources")]
    pub token_sources: Vec<SourceConfig>,
    /// Header that receives the consumer id.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: HeaderName,
    /// Header that receives the plan (API key metadata `plan`, or a provider's `plan_claim`).
    #[serde(default = "default_plan_header")]
    pub plan_header: HeaderName,
    /// Header that receives where the identity comes from: `jwt:<provider>`, `api_key` or
    /// `introspection` (a JWT's `sub` and an API key's consumer may be the same string; the
    /// rate limiting filter keys consumers by both). `null`: not set.
    #[serde(default = "default_source_header")]
    pub identity_source_header: Option<HeaderName>,
    /// Remove the credential (header, query parameter or cookie) before forwarding.
    #[serde(default)]
    pub remove_credential: bool,
    /// What to do when a key server or introspection endpoint cannot answer.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Longest credential accepted, in bytes.
    #[serde(default = "default_max_token_size")]
    pub max_token_size: usize,
    /// Verified tokens kept per worker (0 disables the cache).
    #[serde(default = "default_token_cache_size")]
    pub token_cache_size: usize,
    /// `realm` of `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Failed-credential throttling: refused credentials counted per client IP (all workers);
    /// past `max_failures` within `window`, 429 before any hash or signature work. Absent: off.
    #[serde(default)]
    pub failure_limit: Option<FailureLimitConfig>,
}

fn default_token_sources() -> Vec<SourceConfig> {
    vec![SourceConfig {
        header: Some(HeaderName::from_static("authorization")),
        prefix: Some("Bearer ".into()),
        query: None,
        cookie: None,
    }]
}
fn default_consumer_header() -> HeaderName {
    HeaderName::from_static("x-tollgate-consumer")
}
fn default_plan_header() -> HeaderName {
    HeaderName::from_static("x-tollgate-plan")
}
fn default_source_header() -> Option<HeaderName> {
    Some(HeaderName::from_static(DEFAULT_SOURCE_HEADER))
}

/// Shared-data keys of the failed-credential counters.
pub const FAILURES_PREFIX: &str = "tollgate.auth.failures.";

/// The default `identity_source_header`.
pub const DEFAULT_SOURCE_HEADER: &str = "x-tollgate-identity-source";
/// The identity source of an API key.
pub const SOURCE_API_KEY: &str = "api_key";
/// The identity source of an introspected token.
pub const SOURCE_INTROSPECTION: &str = "introspection";
fn default_max_token_size() -> usize {
    8192
}
fn default_token_cache_size() -> usize {
    1024
}
fn default_realm() -> String {
    "tollgate".into()
}

/// Behaviour when an identity provider cannot answer in time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Answer 503.
    #[default]
    Deny,
    /// Let the request through without an identity.
    Allow,
}

/// Where a credential is read from: exactly one of `header` (with an optional `prefix`),
/// `query` or `cookie`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Request header name.
    #[serde(default)]
    pub header: Option<HeaderName>,
    /// Prefix the header value must start with (compared case-insensitively), removed.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Query parameter name.
    #[serde(default)]
    pub query: Option<String>,
    /// Cookie name.
    #[serde(default)]
    pub cookie: Option<String>,
}

/// A compiled credential source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A header, with a prefix to strip.
    Header {
        /// Lower-case header name.
        name: String,
        /// Prefix (may be empty).
        prefix: String,
    },
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

impl SourceConfig {
    fn compile(&self) -> Result<Source, ConfigError> {
        let n = [
            self.header.is_some(),
            self.query.is_some(),
            self.cookie.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            return Err(ConfigError::new(
                "(root)",
                "give exactly one of `header`, `query` and `cookie`",
            ));
        }
        if self.prefix.is_some() && self.header.is_none() {
            return Err(ConfigError::new("prefix", "`prefix` goes with `header`"));
        }
        if let Some(h) = &self.header {
            return Ok(Source::Header {
                name: h.as_str().to_string(),
                prefix: self.prefix.clone().unwrap_or_default(),
            });
        }
        if let Some(q) = &self.query {
            if q.is_empty() {
                return Err(ConfigError::new("query", "must not be empty"));
            }
            return Ok(Source::Query(q.clone()));
        }
        let c = self.cookie.clone().unwrap_or_default();
        if c.is_empty() || c.contains([';', '=', ' ']) {
            return Err(ConfigError::new("cookie", "not a cookie name"));
        }
        Ok(Source::Cookie(c))
    }
}

/// Header names a client may not set: the filter removes them. Refuse configuring these
/// as identity headers (they would break the request).
fn check_forward_header(h: &str) -> Result<String, String> {
    let l = HeaderName::new(h)?.into_string();
    if matches!(
        l.as_str(),
        "host" | "authorization" | "cookie" | "content-length" | "transfer-encoding" | "te"
    ) {
        return Err(format!("`{h}` cannot be an identity header"));
    }
    Ok(l)
}

/// A JWT provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name used by routes.
    pub name: String,
    /// The `iss` of its tokens.
    pub issuer: String,
    /// Accepted audiences (any of); empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Algorithm allowlist.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Inline JWK Set.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// Remote JWK Set (or OIDC discovery).
    #[serde(default)]
    pub remote_jwks: Option<RemoteJwksConfig>,
    /// Refuse tokens without `exp`.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Longest accepted lifetime (`exp` - `iat`, or `exp` - now without `iat`).
    #[serde(default)]
    pub max_lifetime: Option<ConfigDuration>,
    /// Allowed clock difference for `exp`, `nbf` and `iat`.
    #[serde(default = "default_skew")]
    pub clock_skew: ConfigDuration,
    /// Required header `typ` (RFC 8725 explicit typing), such as `at+jwt`.
    #[serde(default)]
    pub typ: Option<String>,
    /// Claims forwarded as request headers.
    #[serde(default)]
    pub claim_headers: Vec<ClaimHeaderConfig>,
    /// Header that receives the verified payload (base64url).
    #[serde(default)]
    pub payload_header: Option<HeaderName>,
    /// Claim that names the consumer.
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    /// Claim that names the plan.
    #[serde(default)]
    pub plan_claim: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_algorithms() -> Vec<String> {
    vec!["ES256".into(), "RS256".into()]
}
fn default_skew() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_consumer_claim() -> String {
    "sub".into()
}

/// A claim forwarded as a header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimHeaderConfig {
    /// Claim path, dot-separated for nested objects (`realm_access.roles`).
    pub claim: String,
    /// Header name.
    pub header: HeaderName,
}

/// Where a provider's keys come from over HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksConfig {
    /// Envoy cluster of the key server.
    pub cluster: String,
    /// Path of the JWK Set (when not using discovery).
    #[serde(default)]
    pub path: Option<String>,
    /// Path of the OpenID configuration; its `jwks_uri` gives the JWK Set path.
    #[serde(default)]
    pub discovery_path: Option<String>,
    /// `:authority` of the calls (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// How long fetched keys are used.
    #[serde(default = "default_cache_duration")]
    pub cache_duration: ConfigDuration,
    /// Timeout of each fetch, and the longest a request waits for keys.
    #[serde(default = "default_fetch_timeout")]
    pub timeout: ConfigDuration,
    /// Least time between two fetches caused by unknown `kid`s (all workers together).
    #[serde(default = "default_refetch_interval")]
    pub refetch_interval: ConfigDuration,
    /// Wait after a failed fetch before the next.
    #[serde(default = "default_retry_interval")]
    pub retry_interval: ConfigDuration,
}

fn default_cache_duration() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(300))
}
fn default_fetch_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn default_refetch_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_retry_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}

/// API keys, stored as SHA-256 digests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Where keys are read from, tried in order.
    #[serde(default = "default_api_key_sources")]
    pub from: Vec<SourceConfig>,
    /// The keys.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
    /// Prefix of the headers that receive key metadata (`plan` goes to `plan_header`).
    #[serde(default = "default_metadata_prefix")]
    pub metadata_header_prefix: String,
}

fn default_api_key_sources() -> Vec<SourceConfig> {
    vec![SourceConfig {
        header: Some(HeaderName::from_static("x-api-key")),
        ..SourceConfig::default()
    }]
}
fn default_metadata_prefix() -> String {
    "x-tollgate-".into()
}

/// One API key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Hex SHA-256 of the key.
    #[serde(default)]
    pub sha256: Option<Sha256Hex>,
    /// Refused with an explanation: keys are never configured in plain text.
    #[serde(default)]
    pub key: Option<Value>,
    /// Consumer id.
    pub consumer: String,
    /// Expiry: Unix seconds or `YYYY-MM-DDTHH:MM:SSZ`.
    #[serde(default)]
    pub expires: Option<Value>,
    /// Free-form metadata forwarded as headers.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Token introspection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// Envoy cluster of the introspection endpoint.
    pub cluster: String,
    /// Path of the endpoint.
    pub path: String,
    /// `:authority` (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Client id for HTTP Basic authentication (optional).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Client secret for HTTP Basic authentication.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Timeout of the call.
    #[serde(default = "default_fetch_timeout")]
    pub timeout: ConfigDuration,
    /// Longest time an active result is reused (shorter when the token's `exp` is sooner).
    #[serde(default = "default_positive_ttl")]
    pub cache_duration: ConfigDuration,
    /// How long an inactive result is reused.
    #[serde(default = "default_negative_ttl")]
    pub negative_cache_duration: ConfigDuration,
    /// Number of cache slots in shared data (bounds its size; 0 disables the cache).
    #[serde(default = "default_slots")]
    pub cache_slots: u32,
    /// Member of the answer that names the consumer (`sub`, else `client_id`).
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    /// Member of the answer that names the plan.
    #[serde(default)]
    pub plan_claim: Option<String>,
}

fn default_positive_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(300))
}
fn default_negative_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_slots() -> u32 {
    4096
}

/// Whether a credential is needed on a route.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    /// A valid credential is needed.
    #[default]
    Required,
    /// No credential, or a valid one.
    AllowMissing,
    /// Anything passes; a valid credential adds identity headers.
    Optional,
}

/// A per-route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub route: RouteMatch,
    /// Skip the filter for these requests.
    #[serde(default)]
    pub disabled: bool,
    /// Whether a credential is needed.
    #[serde(default)]
    pub requirement: Requirement,
    /// Accepted methods: provider names, `api_key`, `introspection`. Default: all configured.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Scopes that must all be granted (`scope` string or `scp` array).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claims that must hold one of the given values.
    #[serde(default)]
    pub claims: Vec<ClaimRequirement>,
    /// Consumers allowed (default: any).
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Path variables bound to the caller's identity: `/api/dashboard/{user}` only for the
    /// caller whose id is `user` (unless a scope lifts it).
    #[serde(default)]
    pub bind: Vec<BindConfig>,
}

/// A path variable of the route's template bound to the caller's identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BindConfig {
    /// The variable of the route's `match.template` (`user` in `/api/dashboard/{user}`).
    pub param: String,
    /// Claim path (dot-separated) the variable must equal; default: the consumer id (a JWT's
    /// `consumer_claim`, an API key's consumer, an introspected token's consumer).
    #[serde(default)]
    pub claim: Option<String>,
    /// Scopes that lift the binding: a caller granted any of them may name any value.
    #[serde(default)]
    pub unless_scopes: Vec<String>,
}

/// A compiled binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Template variable.
    pub param: String,
    /// Claim path; `None`: the consumer id.
    pub claim: Option<Vec<String>>,
    /// Scopes that lift it.
    pub unless_scopes: Vec<String>,
}

/// A required claim value.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequirement {
    /// Claim path (dot-separated).
    pub claim: String,
    /// The claim (a string, or an array of strings) must hold one of these.
    pub any_of: Vec<String>,
}

impl Routed for RouteConfig {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

// ------------------------------------------------------------------------------------------
// Compiled form

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Configured keys.
    Inline(Vec<Jwk>),
    /// Fetched over HTTP.
    Remote(Remote),
}

/// A compiled remote key source.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Cluster.
    pub cluster: String,
    /// JWK Set path, or `None` to discover it.
    pub path: Option<String>,
    /// Discovery document path.
    pub discovery_path: Option<String>,
    /// `:authority`.
    pub authority: String,
    /// Key lifetime.
    pub cache_duration: Duration,
    /// Fetch timeout and longest wait.
    pub timeout: Duration,
    /// Least time between unknown-`kid` refetches.
    pub refetch_interval: Duration,
    /// Wait after a failure.
    pub retry_interval: Duration,
}

/// A compiled JWT provider.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Name.
    pub name: String,
    /// `iss`.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Allowed algorithms.
    pub algorithms: Vec<Alg>,
    /// Keys.
    pub keys: KeySource,
    /// `exp` required.
    pub require_exp: bool,
    /// Longest lifetime, seconds.
    pub max_lifetime: Option<f64>,
    /// Clock skew, seconds.
    pub skew: f64,
    /// Required `typ`.
    pub typ: Option<String>,
    /// (claim path, header).
    pub claim_headers: Vec<(Vec<String>, String)>,
    /// Payload header.
    pub payload_header: Option<String>,
    /// Consumer claim path.
    pub consumer_claim: Vec<String>,
    /// Plan claim path.
    pub plan_claim: Option<Vec<String>>,
    /// Identity source of its tokens: `jwt:<name>`.
    pub source: String,
}

/// A compiled API key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// SHA-256 of the key.
    pub digest: [u8; 32],
    /// Expiry (Unix seconds).
    pub expires: Option<f64>,
    /// The identity a request with this key gets (consumer; claims `sub`, `plan` and the
    /// metadata headers; the headers to set), built once at load.
    pub identity: std::rc::Rc<Identity>,
}

/// Compiled API key settings.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    /// Sources.
    pub from: Vec<Source>,
    /// Keys.
    pub keys: Vec<ApiKey>,
}

/// Compiled introspection settings.
#[derive(Debug, Clone)]
pub struct Introspection {
    /// Cluster.
    pub cluster: String,
    /// Path.
    pub path: String,
    /// Authority.
    pub authority: String,
    /// `Authorization: Basic ...` value, if any (never logged).
    pub basic: Option<String>,
    /// Timeout.
    pub timeout: Duration,
    /// Positive cache cap, seconds.
    pub positive_ttl: f64,
    /// Negative cache, seconds.
    pub negative_ttl: f64,
    /// Cache slots.
    pub slots: u32,
    /// Consumer member.
    pub consumer_claim: Vec<String>,
    /// Plan member.
    pub plan_claim: Option<Vec<String>>,
}

/// What a route accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// Indexes of accepted providers.
    pub providers: Vec<usize>,
    /// API keys accepted.
    pub api_key: bool,
    /// Introspection accepted.
    pub introspection: bool,
}

/// A compiled route rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Match.
    pub route: RouteMatch,
    /// Skip.
    pub disabled: bool,
    /// Requirement.
    pub requirement: Requirement,
    /// Accepted methods.
    pub allow: Allow,
    /// Required scopes.
    pub scopes: Vec<String>,
    /// Required claims (path, any of).
    pub claims: Vec<(Vec<String>, Vec<String>)>,
    /// Allowed consumers.
    pub consumers: Vec<String>,
    /// Path variables bound to the identity.
    pub bind: Vec<Binding>,
}

impl Routed for Rule {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// The compiled, immutable configuration.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Rules.
    pub rules: tollgate_common::Rules<Rule>,
    /// Providers.
    pub providers: Vec<Provider>,
    /// API keys.
    pub api_keys: Option<ApiKeys>,
    /// Introspection.
    pub introspection: Option<Introspection>,
    /// Bearer token sources.
    pub token_sources: Vec<Source>,
    /// Consumer header.
    pub consumer_header: String,
    /// Plan header.
    pub plan_header: String,
    /// Identity source header, if set.
    pub source_header: Option<String>,
    /// Remove the credential.
    pub remove_credential: bool,
    /// Failure mode.
    pub failure_mode: FailureMode,
    /// Longest credential.
    pub max_token_size: usize,
    /// Verified-token cache size.
    pub token_cache_size: usize,
    /// Realm.
    pub realm: String,
    /// Every header the filter may set: removed from every request first.
    pub identity_headers: Vec<String>,
    /// Some rule matches on the method (else `:method` is not read).
    pub reads_method: bool,
    /// Some rule matches on the host (else `:authority` is not read).
    pub reads_host: bool,
    /// Failed-credential throttling.
    pub failure_limit: Option<FailureLimit>,
}

impl Compiled {
    /// The names of the identity headers.
    pub fn names(&self) -> HeaderNames<'_> {
        HeaderNames {
            consumer: &self.consumer_header,
            plan: &self.plan_header,
            source: self.source_header.as_deref(),
        }
    }

    /// True when some provider fetches its keys.
    pub fn has_remote(&self) -> bool {
        self.providers
            .iter()
            .any(|p| matches!(p.keys, KeySource::Remote(_)))
    }
}

fn claim_path(field: &str, s: &str) -> Result<Vec<String>, ConfigError> {
    if s.is_empty() || s.split('.').any(str::is_empty) {
        return Err(ConfigError::new(
            field,
            format!("`{s}` is not a claim path (names separated by dots)"),
        ));
    }
    Ok(s.split('.').map(str::to_string).collect())
}

fn nonzero(field: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be more than 0"));
    }
    Ok(d)
}

fn check_path(field: &str, p: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(
            field,
            format!("`{p}` must start with `/`"),
        ));
    }
    Ok(p.to_string())
}

/// Parse `YYYY-MM-DDTHH:MM:SSZ` into Unix seconds.
pub fn parse_rfc3339_utc(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() != 20 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    if b.get(10) != Some(&b'T') || b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    if b.get(19) != Some(&b'Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86400 + hh * 3600 + mm * 60 + ss) as f64)
}

impl Config {
    /// Parse and compile a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Compiled, ConfigError> {
        let c: Config = tollgate_common::config::parse(bytes)?;
        c.compile()
    }

    /// Validate and compile.
    pub fn compile(self) -> Result<Compiled, ConfigError> {
        let mut identity = Vec::new();
        let consumer_header = check_forward_header(&self.consumer_header)
            .map_err(|e| ConfigError::new("consumer_header", e))?;
        let plan_header = check_forward_header(&self.plan_header)
            .map_err(|e| ConfigError::new("plan_header", e))?;
        let source_header = match &self.identity_source_header {
            Some(h) => Some(
                check_forward_header(h)
                    .map_err(|e| ConfigError::new("identity_source_header", e))?,
            ),
            None => None,
        };
        let mut providers = Vec::new();
        for (i, p) in self.providers.into_iter().enumerate() {
            let at = format!("providers[{i}]");
            let prov = compile_provider(p, &mut identity).map_err(|e| e.within(&at))?;
            if providers.iter().any(|q: &Provider| q.name == prov.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("provider `{}` is defined twice", prov.name),
                ));
            }
            if providers.iter().any(|q: &Provider| q.issuer == prov.issuer) {
                return Err(ConfigError::new(
                    format!("{at}.issuer"),
                    "two providers have the same issuer (providers are chosen by `iss`)",
                ));
            }
            if matches!(prov.name.as_str(), "api_key" | "introspection") {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    "`api_key` and `introspection` are reserved names",
                ));
            }
            providers.push(prov);
        }
        let api_keys = match self.api_keys {
            None => None,
            Some(a) => {
                let names = HeaderNames {
                    consumer: &consumer_header,
                    plan: &plan_header,
                    source: source_header.as_deref(),
                };
                Some(compile_api_keys(a, names, &mut identity).map_err(|e| e.within("api_keys"))?)
            }
        };
        let introspection = match self.introspection {
            None => None,
            Some(i) => Some(compile_introspection(i).map_err(|e| e.within("introspection"))?),
        };
        let token_sources = self
            .token_sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.compile()
                    .map_err(|e| e.within(&format!("token_sources[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if token_sources.is_empty() {
            return Err(ConfigError::new("token_sources", "must not be empty"));
        }
        if self.max_token_size < 64 || self.max_token_size > 65536 {
            return Err(ConfigError::new(
                "max_token_size",
                "must be between 64 and 65536 bytes",
            ));
        }
        let mut rules = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let at = format!("routes[{i}]");
            rules.push(
                compile_rule(r, &providers, api_keys.is_some(), introspection.is_some())
                    .map_err(|e| e.within(&at))?,
            );
        }
        if !providers.is_empty() || api_keys.is_some() || introspection.is_some() {
            identity.push(consumer_header.clone());
            identity.push(plan_header.clone());
            identity.extend(source_header.clone());
        }
        identity.sort();
        identity.dedup();
        Ok(Compiled {
            reads_method: rules.iter().any(|r| r.route.uses_method()),
            reads_host: rules.iter().any(|r| r.route.uses_host()),
            rules: tollgate_common::Rules(rules),
            providers,
            api_keys,
            introspection,
            token_sources,
            consumer_header,
            plan_header,
            source_header,
            remove_credential: self.remove_credential,
            failure_mode: self.failure_mode,
            max_token_size: self.max_token_size,
            token_cache_size: self.token_cache_size.min(100_000),
            realm: self.realm.replace(['"', '\\'], ""),
            identity_headers: identity,
            failure_limit: match &self.failure_limit {
                Some(f) => Some(
                    FailureLimit::compile(FAILURES_PREFIX, f)
                        .map_err(|e| e.within("failure_limit"))?,
                ),
                None => None,
            },
        })
    }
}

fn compile_provider(
    p: ProviderConfig,
    identity: &mut Vec<String>,
) -> Result<Provider, ConfigError> {
    if p.name.is_empty() {
        return Err(ConfigError::new("name", "must not be empty"));
    }
    if p.issuer.is_empty() {
        return Err(ConfigError::new("issuer", "must not be empty"));
    }
    let mut algorithms = Vec::new();
    for (i, a) in p.algorithms.iter().enumerate() {
        let alg = Alg::parse(a).ok_or_else(|| {
            ConfigError::new(
                format!("algorithms[{i}]"),
                format!(
                    "`{a}` is not a supported algorithm ({})",
                    jose::ALL_ALGS.map(|a| a.name()).join(", ")
                ),
            )
        })?;
        algorithms.push(alg);
    }
    if algorithms.is_empty() {
        return Err(ConfigError::new("algorithms", "must not be empty"));
    }
    let keys = match (p.jwks, p.remote_jwks) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ConfigError::new(
                "(root)",
                "give exactly one of `jwks` (inline) and `remote_jwks`",
            ))
        }
        (Some(v), None) => {
            let keys = jose::parse_jwks(&v).map_err(|e| ConfigError::new("jwks", e))?;
            if keys.is_empty() {
                return Err(ConfigError::new("jwks", "no usable signature key"));
            }
            for k in &keys {
                if !algorithms.iter().any(|a| k.accepts(*a)) {
                    return Err(ConfigError::new(
                        "jwks",
                        format!(
                            "key {:?} ({:?}) fits none of the allowed algorithms",
                            k.kid.as_deref().unwrap_or("without kid"),
                            k.material
                        ),
                    ));
                }
            }
            KeySource::Inline(keys)
        }
        (None, Some(r)) => {
            let compiled = compile_remote(r).map_err(|e| e.within("remote_jwks"))?;
            if algorithms.iter().any(|a| a.is_symmetric()) {
                return Err(ConfigError::new(
                    "algorithms",
                    "HMAC algorithms need an inline secret: remote keys are public keys",
                ));
            }
            KeySource::Remote(compiled)
        }
    };
    let mut claim_headers = Vec::new();
    for (i, c) in p.claim_headers.iter().enumerate() {
        let at = format!("claim_headers[{i}]");
        let path = claim_path(&format!("{at}.claim"), &c.claim)?;
        let h = check_forward_header(&c.header)
            .map_err(|e| ConfigError::new(format!("{at}.header"), e))?;
        identity.push(h.clone());
        claim_headers.push((path, h));
    }
    let payload_header = match p.payload_header {
        None => None,
        Some(h) => {
            let h = check_forward_header(&h).map_err(|e| ConfigError::new("payload_header", e))?;
            identity.push(h.clone());
            Some(h)
        }
    };
    let skew = p.clock_skew.0.as_secs_f64();
    if skew > 3600.0 {
        return Err(ConfigError::new("clock_skew", "must be at most 1h"));
    }
    Ok(Provider {
        source: format!("jwt:{}", p.name),
        name: p.name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms,
        keys,
        require_exp: p.require_exp,
        max_lifetime: match p.max_lifetime {
            Some(d) => Some(nonzero("max_lifetime", d.0)?.as_secs_f64()),
            None => None,
        },
        skew,
        typ: p.typ,
        claim_headers,
        payload_header,
        consumer_claim: claim_path("consumer_claim", &p.consumer_claim)?,
        plan_claim: match p.plan_claim {
            Some(c) => Some(claim_path("plan_claim", &c)?),
            None => None,
        },
    })
}

fn compile_remote(r: RemoteJwksConfig) -> Result<Remote, ConfigError> {
    if r.cluster.is_empty() {
        return Err(ConfigError::new("cluster", "must not be empty"));
    }
    let (path, discovery_path) =
        match (r.path, r.discovery_path) {
            (Some(p), None) => (Some(check_path("path", &p)?), None),
            (None, Some(d)) => (None, Some(check_path("discovery_path", &d)?)),
            _ => return Err(ConfigError::new(
                "(root)",
                "give exactly one of `path` (the JWK Set) and `discovery_path` (OIDC discovery)",
            )),
        };
    let cache_duration = nonzero("cache_duration", r.cache_duration.0)?;
    if cache_duration < Duration::from_secs(1) {
        return Err(ConfigError::new("cache_duration", "must be at least 1s"));
    }
    Ok(Remote {
        authority: r.authority.unwrap_or_else(|| r.cluster.clone()),
        cluster: r.cluster,
        path,
        discovery_path,
        cache_duration,
        timeout: nonzero("timeout", r.timeout.0)?,
        refetch_interval: r.refetch_interval.0,
        retry_interval: r.retry_interval.0,
    })
}

fn compile_api_keys(
    a: ApiKeysConfig,
    names: HeaderNames<'_>,
    identity: &mut Vec<String>,
) -> Result<ApiKeys, ConfigError> {
    let from = a
        .from
        .iter()
        .enumerate()
        .map(|(i, s)| s.compile().map_err(|e| e.within(&format!("from[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    if from.is_empty() {
        return Err(ConfigError::new("from", "must not be empty"));
    }
    let prefix = a.metadata_header_prefix.to_ascii_lowercase();
    let mut keys = Vec::new();
    for (i, k) in a.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        if k.key.is_some() {
            return Err(ConfigError::new(
                format!("{at}.key"),
                "plain-text keys are refused: give `sha256`, the hex SHA-256 of the key \
                 (printf %s KEY | sha256sum)",
            ));
        }
        let digest = k
            .sha256
            .ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.sha256"),
                    "missing: the hex SHA-256 of the key",
                )
            })?
            .0;
        if keys.iter().any(|x: &ApiKey| x.digest == digest) {
            return Err(ConfigError::new(
                format!("{at}.sha256"),
                "the same key appears twice",
            ));
        }
        if k.consumer.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.consumer"),
                "must not be empty",
            ));
        }
        let expires = match &k.expires {
            None => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => Some(parse_rfc3339_utc(s).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.expires"),
                    "use Unix seconds or YYYY-MM-DDTHH:MM:SSZ",
                )
            })?),
            Some(_) => {
                return Err(ConfigError::new(
                    format!("{at}.expires"),
                    "use Unix seconds or YYYY-MM-DDTHH:MM:SSZ",
                ))
            }
        };
        let mut headers = Vec::new();
        let mut plan = None;
        for (name, value) in &k.metadata {
            if name == "plan" {
                plan = Some(value.clone());
                continue;
            }
            let h = check_forward_header(&format!("{prefix}{name}"))
                .map_err(|e| ConfigError::new(format!("{at}.metadata.{name}"), e))?;
            if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err(ConfigError::new(
                    format!("{at}.metadata.{name}"),
                    "control characters cannot go in a header",
                ));
            }
            identity.push(h.clone());
            headers.push((h, value.clone()));
        }
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), Value::String(k.consumer.clone()));
        if let Some(p) = &plan {
            claims.insert("plan".into(), Value::String(p.clone()));
        }
        for (h, v) in &headers {
            claims.insert(h.clone(), Value::String(v.clone()));
        }
        keys.push(ApiKey {
            digest,
            expires,
            identity: std::rc::Rc::new(Identity::new(
                names,
                SOURCE_API_KEY,
                Some(k.consumer),
                plan.as_deref(),
                std::rc::Rc::new(claims),
                headers,
            )),
        });
    }
    Ok(ApiKeys { from, keys })
}

fn compile_introspection(i: IntrospectionConfig) -> Result<Introspection, ConfigError> {
    if i.cluster.is_empty() {
        return Err(ConfigError::new("cluster", "must not be empty"));
    }
    let basic = match (&i.client_id, &i.client_secret) {
        (Some(id), Some(secret)) => Some(format!(
            "Basic {}",
            jose::b64_encode(
                format!(
                    "{}:{}",
                    tollgate_common::request::percent_encode(id),
                    tollgate_common::request::percent_encode(secret)
                )
                .as_bytes()
            )
        )),
        (None, None) => None,
        _ => {
            return Err(ConfigError::new(
                "client_secret",
                "give both `client_id` and `client_secret`, or neither",
            ))
        }
    };
    Ok(Introspection {
        authority: i.authority.unwrap_or_else(|| i.cluster.clone()),
        path: check_path("path", &i.path)?,
        cluster: i.cluster,
        basic,
        timeout: nonzero("timeout", i.timeout.0)?,
        positive_ttl: i.cache_duration.0.as_secs_f64(),
        negative_ttl: i.negative_cache_duration.0.as_secs_f64(),
        slots: i.cache_slots.min(1 << 20),
        consumer_claim: claim_path("consumer_claim", &i.consumer_claim)?,
        plan_claim: match i.plan_claim {
            Some(c) => Some(claim_path("plan_claim", &c)?),
            None => None,
        },
    })
}

fn compile_rule(
    r: RouteConfig,
    providers: &[Provider],
    has_keys: bool,
    has_introspection: bool,
) -> Result<Rule, ConfigError> {
    let allow = match &r.allow {
        None => Allow {
            providers: (0..providers.len()).collect(),
            api_key: has_keys,
            introspection: has_introspection,
        },
        Some(names) => {
            let mut a = Allow {
                providers: Vec::new(),
                api_key: false,
                introspection: false,
            };
            for (i, n) in names.iter().enumerate() {
                let at = format!("allow[{i}]");
                match n.as_str() {
                    "api_key" if has_keys => a.api_key = true,
                    "api_key" => {
                        return Err(ConfigError::new(
                            at,
                            "`api_key` needs an `api_keys` section",
                        ))
                    }
                    "introspection" if has_introspection => a.introspection = true,
                    "introspection" => {
                        return Err(ConfigError::new(
                            at,
                            "`introspection` needs an `introspection` section",
                        ))
                    }
                    other => match providers.iter().position(|p| p.name == other) {
                        Some(idx) => a.providers.push(idx),
                        None => {
                            return Err(ConfigError::new(
                                at,
                                format!("no provider is named `{other}`"),
                            ))
                        }
                    },
                }
            }
            a
        }
    };
    if !r.disabled && allow.providers.is_empty() && !allow.api_key && !allow.introspection {
        return Err(ConfigError::new(
            "allow",
            "no authentication method: configure `providers`, `api_keys` or `introspection`, \
             or set `disabled`",
        ));
    }
    let mut claims = Vec::new();
    for (i, c) in r.claims.iter().enumerate() {
        let path = claim_path(&format!("claims[{i}].claim"), &c.claim)?;
        if c.any_of.is_empty() {
            return Err(ConfigError::new(
                format!("claims[{i}].any_of"),
                "must not be empty",
            ));
        }
        claims.push((path, c.any_of.clone()));
    }
    let mut bind = Vec::new();
    for (i, b) in r.bind.iter().enumerate() {
        if !r.route.variables().contains(&b.param.as_str()) {
            return Err(ConfigError::new(
                format!("bind[{i}].param"),
                format!(
                    "`{}` is not a variable of this rule's `match.template`",
                    b.param
                ),
            ));
        }
        if r.disabled || r.requirement == Requirement::Optional {
            return Err(ConfigError::new(
                format!("bind[{i}]"),
                "a binding needs a credential: not on a `disabled` or `optional` rule",
            ));
        }
        let claim = match &b.claim {
            Some(c) => Some(claim_path(&format!("bind[{i}].claim"), c)?),
            None => None,
        };
        bind.push(Binding {
            param: b.param.clone(),
            claim,
            unless_scopes: b.unless_scopes.clone(),
        });
    }
    Ok(Rule {
        bind,
        route: r.route,
        disabled: r.disabled,
        requirement: r.requirement,
        allow,
        scopes: r.scopes,
        claims,
        consumers: r.consumers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC: &str = r#"{"kty":"EC","crv":"P-256","kid":"k1","x":"aa0nWgETctJpaXXZtcfSQUBtXo2Z2Cb7B_HlwJCK-Wk","y":"lfo6v6CStrhix-FIVGehxIAjwEuzWuNuoCiRo7tUowA"}"#;

    fn cfg(json: &str) -> Result<Compiled, ConfigError> {
        Config::parse(json.as_bytes())
    }

    #[test]
    fn empty_is_valid_and_does_nothing() {
        let c = cfg("{}").unwrap();
        assert!(c.rules.0.is_empty());
        assert!(c.identity_headers.is_empty());
        assert!(cfg(r#"{"routes":[{"match":{"prefix":"/h"},"disabled":true}]}"#).is_ok());
    }

    #[test]
    fn refusals_name_the_field() {
        let p = |extra: &str| {
            format!(
                r#"{{"providers":[{{"name":"a","issuer":"i","jwks":{{"keys":[{EC}]}}{extra}}}]}}"#
            )
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (r#"{"routes":[],"no_such_field":1}"#.into(), "no_such_field", "unknown field"),
            (p(r#","algorithms":["none"]"#), "providers[0].algorithms[0]", "not a supported"),
            (p(r#","algorithms":["HS256"]"#), "providers[0].jwks", "fits none"),
            (p(r#","remote_jwks":{"cluster":"x","path":"/k"}"#), "providers[0]", "exactly one"),
            (p(r#","claim_headers":[{"claim":"a..b","header":"x-a"}]"#), "providers[0].claim_headers[0].claim", "claim path"),
            (p(r#","claim_headers":[{"claim":"a","header":"host"}]"#), "providers[0].claim_headers[0].header", "identity header"),
            (
                r#"{"providers":[{"name":"a","issuer":"i","algorithms":["HS256"],"remote_jwks":{"cluster":"c","path":"/k"}}]}"#.into(),
                "providers[0].algorithms",
                "HMAC",
            ),
            (
                r#"{"providers":[{"name":"a","issuer":"i","remote_jwks":{"cluster":"c"}}]}"#.into(),
                "providers[0].remote_jwks",
                "exactly one",
            ),
            (
                r#"{"api_keys":{"keys":[{"key":"secret","consumer":"c"}]}}"#.into(),
                "api_keys.keys[0].key",
                "plain-text",
            ),
            (
                r#"{"api_keys":{"keys":[{"sha256":"abc","consumer":"c"}]}}"#.into(),
                "api_keys.keys[0].sha256",
                "64 hexadecimal",
            ),
            (
                r#"{"api_keys":{"keys":[{"sha256":"0000000000000000000000000000000000000000000000000000000000000000","consumer":"c","expires":"tomorrow"}]}}"#.into(),
                "api_keys.keys[0].expires",
                "Unix seconds",
            ),
            (r#"{"routes":[{"match":{}}]}"#.into(), "routes[0].allow", "no authentication"),
            (
                r#"{"api_keys":{},"routes":[{"allow":["nope"]}]}"#.into(),
                "routes[0].allow[0]",
                "no provider",
            ),
            (
                r#"{"api_keys":{},"routes":[{"allow":["introspection"]}]}"#.into(),
                "routes[0].allow[0]",
                "introspection",
            ),
            (r#"{"token_sources":[{"header":"a","query":"b"}]}"#.into(), "token_sources[0]", "exactly one"),
            (r#"{"introspection":{"cluster":"c","path":"/i","client_id":"x"}}"#.into(), "introspection.client_secret", "both"),
        ];
        for (json, field, why) in cases {
            let e = cfg(&json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.reason.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn identity_headers_collect_everything_the_filter_sets() {
        let c = cfg(&format!(
            r#"{{"providers":[{{"name":"a","issuer":"i","jwks":{{"keys":[{EC}]}},
                "claim_headers":[{{"claim":"org.id","header":"X-Org"}}],"payload_header":"x-jwt"}}],
               "api_keys":{{"keys":[{{"sha256":"{}","consumer":"c","metadata":{{"plan":"pro","tier":"gold"}}}}]}}}}"#,
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(
            c.identity_headers,
            vec![
                "x-jwt",
                "x-org",
                "x-tollgate-consumer",
                "x-tollgate-identity-source",
                "x-tollgate-plan",
                "x-tollgate-tier"
            ]
        );
        assert_eq!(c.rules.0.len(), 0);
    }

    #[test]
    fn dates() {
        assert_eq!(
            parse_rfc3339_utc("2026-01-01T00:00:00Z"),
            Some(1_767_225_600.0)
        );
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339_utc("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2026-01-01 00:00:00"), None);
    }
}

#[cfg(test)]
mod doc_tests {
    #[test]
    fn the_documented_example_compiles() {
        let doc = include_str!("../../../docs/filters/auth.md");
        let example = doc
            .split("<!-- example -->")
            .nth(1)
            .and_then(|s| s.split("```json").nth(1))
            .and_then(|s| s.split("```").next())
            .unwrap();
        let c = super::Config::parse(example.as_bytes()).unwrap();
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.rules.0.len(), 5);
        for bench in [
            include_str!("../../../bench/scenarios/auth/tollgate-cold.json"),
            include_str!("../../../bench/scenarios/auth/tollgate-cached.json"),
        ] {
            super::Config::parse(bench.as_bytes()).unwrap();
        }
    }
}
