//! Request handling of the authentication filter: the root (configuration, key fetches, the
//! waiting list) and the per-request filter (credentials, verification, authorization,
//! forwarding, answers).

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_common::log_limit::LogLimit;
use tollgate_common::metrics::Metrics;
use tollgate_common::request::{cookie, percent_encode, query_param, split_query};
use tollgate_common::route::{RequestInfo, RouteParams};
use tollgate_common::throttle::{client_address, FailureLimit};
use tollgate_common::warn_limited;
use tollgate_common::{
    CallResponse, ConfigError, Decision, Host, HttpCall, HttpFilter, LocalReply, MapKind, Problem,
    RootFilter,
};

use crate::claims::{self, AuthzError, ClaimError};
use crate::config::{
    Compiled, Config, FailureMode, KeySource, Provider, Requirement, Rule, Source,
};
use crate::jose::{self, JwsError, StrictValue};
use crate::keyset::{self, CachedToken, Worker, WAKE_TIMEOUT};

/// While an identity provider is down, its warning is logged once per this interval (per
/// worker), with the number of requests refused since.
pub const OUTAGE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Per-VM (per worker) state: the compiled configuration, runtime state and metrics.
pub struct AuthRoot {
    context_id: u32,
    config: Rc<Compiled>,
    runtime: Rc<RefCell<Worker>>,
    metrics: Rc<Metrics>,
    /// The warnings of an identity provider's outage (once per interval).
    outage_log: Rc<LogLimit>,
    /// Wakes that could not be done yet (runtime state busy): done on the next tick.
    deferred: keyset::Wakes,
}

impl AuthRoot {
    fn wake_all(&self, host: &mut dyn Host, wakes: keyset::Wakes) {
        for (id, reason) in wakes {
            if !host.wake(id, reason) {
                log::debug!(
                    "[{}] request {id} was gone before its wake",
                    self.context_id
                );
            }
        }
    }
}

impl RootFilter for AuthRoot {
    type Filter = AuthFilter;
    const NAME: &'static str = "auth";

    fn new(context_id: u32) -> Self {
        AuthRoot {
            context_id,
            deferred: Vec::new(),
            config: Rc::default(),
            runtime: Rc::default(),
            metrics: Rc::new(Metrics::new("auth")),
            outage_log: Rc::new(LogLimit::new(OUTAGE_LOG_INTERVAL)),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let compiled = Config::parse(configuration)?;
        self.runtime = Rc::new(RefCell::new(Worker::new(&compiled)));
        for p in &compiled.providers {
            if matches!(p.keys, KeySource::Remote(_)) {
                keyset::ensure_lease(host, &p.name);
            }
        }
        if compiled.has_remote() {
            // Fetch keys at once (first tick), then keep them fresh.
            host.set_tick_period(std::time::Duration::from_millis(50));
        }
        self.config = Rc::new(compiled);
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        let mut wakes = std::mem::take(&mut self.deferred);
        match self.runtime.try_borrow_mut() {
            Ok(mut rt) => wakes.extend(keyset::tick(
                host,
                self.context_id,
                &self.config,
                &mut rt,
                &self.metrics,
            )),
            Err(_) => {
                self.deferred = wakes;
                return;
            }
        };
        self.wake_all(host, wakes);
    }

    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse) {
        if let Ok(mut rt) = self.runtime.try_borrow_mut() {
            let wakes = keyset::on_fetched(
                host,
                self.context_id,
                &self.config,
                &mut rt,
                &self.metrics,
                token,
                &response,
            );
            drop(rt);
            self.wake_all(host, wakes);
        }
    }

    fn create_filter(&self, context_id: u32) -> AuthFilter {
        AuthFilter {
            context_id,
            config: self.config.clone(),
            runtime: self.runtime.clone(),
            metrics: self.metrics.clone(),
            outage_log: self.outage_log.clone(),
            rule: None,
            pending: Pending::Nothing,
            credential: None,
            client: None,
            params: RouteParams::default(),
        }
    }
}

/// What a paused request waits for.
#[derive(Debug)]
enum Pending {
    Nothing,
    /// Keys of a remote provider.
    Keys {
        token: String,
        /// What the request waits for.
        then: Attempt,
    },
    /// An introspection answer.
    Introspection {
        call: u32,
        token: String,
        digest: [u8; 32],
    },
}

/// How far a JWT's check has gone: a request waits at most once for a provider's first keys
/// and once for a refetch its unknown `kid` asked for (or one under way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Not waited yet.
    First,
    /// After waiting for the provider's keys (there were none).
    AfterKeys,
    /// After waiting for a fetch that may bring an unknown `kid`.
    AfterRefetch,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
struct Identity {
    method: &'static str,
    /// `jwt:<provider>`, `api_key` or `introspection`.
    source: String,
    consumer: Option<String>,
    plan: Option<String>,
    claims: Rc<Map<String, Value>>,
    headers: Vec<(String, String)>,
}

/// A refused credential.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    reason: &'static str,
    detail: String,
    /// Scheme of `WWW-Authenticate` (`Bearer` or `ApiKey`).
    scheme: &'static str,
}

impl Refusal {
    fn token(reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
            scheme: "Bearer",
        }
    }
}

impl From<JwsError> for Refusal {
    fn from(e: JwsError) -> Self {
        Refusal::token(e.reason(), e.to_string())
    }
}

impl From<ClaimError> for Refusal {
    fn from(e: ClaimError) -> Self {
        Refusal::token(e.reason(), e.to_string())
    }
}

/// The result of checking a credential.
#[derive(Debug)]
enum Outcome {
    Allowed(Identity),
    Refused(Refusal),
    /// The key server or introspection endpoint could not answer.
    Unavailable(String),
    /// Wait (the filter's `pending` says for what).
    Wait,
}

/// Per-request state.
pub struct AuthFilter {
    context_id: u32,
    config: Rc<Compiled>,
    runtime: Rc<RefCell<Worker>>,
    metrics: Rc<Metrics>,
    outage_log: Rc<LogLimit>,
    rule: Option<usize>,
    pending: Pending,
    credential: Option<Source>,
    /// The client's address, read when failed-credential throttling is on.
    client: Option<String>,
    /// The matched rule's template variables.
    params: RouteParams,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Read a credential from a source.
fn read_source(host: &dyn Host, s: &Source) -> Option<String> {
    match s {
        Source::Header { name, prefix } => {
            let v = host.header(MapKind::RequestHeaders, name)?;
            let v = v.trim();
            if prefix.is_empty() {
                return Some(v.to_string()).filter(|v| !v.is_empty());
            }
            let head = v.get(..prefix.len())?;
            if !head.eq_ignore_ascii_case(prefix) {
                return None;
            }
            Some(v.get(prefix.len()..)?.trim().to_string()).filter(|v| !v.is_empty())
        }
        Source::Query(q) => {
            let path = host.path();
            let (_, query) = split_query(&path);
            query_param(query, q).filter(|v| !v.is_empty())
        }
        Source::Cookie(c) => {
            let h = host.header(MapKind::RequestHeaders, "cookie")?;
            cookie(&h, c).filter(|v| !v.is_empty())
        }
    }
}

/// Remove a credential before forwarding.
fn remove_source(host: &mut dyn Host, s: &Source) {
    match s {
        Source::Header { name, .. } => host.remove_header(MapKind::RequestHeaders, name),
        Source::Query(q) => {
            let path = host.path();
            let (p, query) = split_query(&path);
            let kept: Vec<&str> = query
                .split('&')
                .filter(|part| {
                    let k = part.split_once('=').map_or(*part, |(k, _)| k);
                    tollgate_common::request::percent_decode(k, true) != *q
                })
                .collect();
            let new = if kept.iter().all(|k| k.is_empty()) {
                p.to_string()
            } else {
                format!("{p}?{}", kept.join("&"))
            };
            host.set_header(MapKind::RequestHeaders, ":path", &new);
        }
        Source::Cookie(c) => {
            if let Some(h) = host.header(MapKind::RequestHeaders, "cookie") {
                let kept: Vec<&str> = h
                    .split(';')
                    .map(str::trim)
                    .filter(|part| part.split_once('=').is_none_or(|(k, _)| k.trim() != c))
                    .collect();
                if kept.is_empty() {
                    host.remove_header(MapKind::RequestHeaders, "cookie");
                } else {
                    host.set_header(MapKind::RequestHeaders, "cookie", &kept.join("; "));
                }
            }
        }
    }
}

fn quote(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

impl AuthFilter {
    fn count(&self, host: &mut dyn Host, name: &str) {
        self.metrics.count(host, name, 1);
    }

    fn rule(&self) -> Option<&Rule> {
        self.rule.and_then(|i| self.config.rules.0.get(i))
    }

    fn requirement(&self) -> Requirement {
        self.rule().map_or(Requirement::Required, |r| r.requirement)
    }

    /// Start: strip forged identity headers, choose the rule, find a credential.
    fn start(&mut self, host: &mut dyn Host) -> Decision {
        self.count(host, "requests");
        let mut forged = 0;
        for h in &self.config.identity_headers {
            if host.header(MapKind::RequestHeaders, h).is_some() {
                host.remove_header(MapKind::RequestHeaders, h);
                forged += 1;
            }
        }
        if forged > 0 {
            self.metrics.count(host, "forged_headers_removed", forged);
        }
        let req = RequestInfo::from_host(host);
        let config = Rc::clone(&self.config);
        if let Some((i, params)) = config
            .rules
            .0
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.route.matches(&req).map(|p| (i, p)))
        {
            self.rule = Some(i);
            self.params = params;
        }
        let Some(rule) = self.rule() else {
            return Decision::Continue;
        };
        if rule.disabled {
            self.count(host, "skipped");
            return Decision::Continue;
        }
        let allow = rule.allow.clone();
        // An API key, when the route accepts them and one was sent.
        if allow.api_key {
            if let Some(keys) = &self.config.api_keys {
                let found = keys
                    .from
                    .iter()
                    .find_map(|s| read_source(host, s).map(|v| (s.clone(), v)));
                if let Some((src, key)) = found {
                    self.credential = Some(src);
                    if let Some(d) = self.throttled(host) {
                        return d;
                    }
                    let outcome = self.check_api_key(host, &key);
                    return self.finish(host, outcome);
                }
            }
        }
        let found = if allow.providers.is_empty() && !allow.introspection {
            None
        } else {
            self.config
                .token_sources
                .iter()
                .find_map(|s| read_source(host, s).map(|v| (s.clone(), v)))
        };
        let Some((src, token)) = found else {
            return self.missing(host);
        };
        self.credential = Some(src);
        if let Some(d) = self.throttled(host) {
            return d;
        }
        if token.len() > self.config.max_token_size {
            let outcome = Outcome::Refused(Refusal::token(
                "token_too_large",
                format!(
                    "the credential is longer than {} bytes",
                    self.config.max_token_size
                ),
            ));
            return self.finish(host, outcome);
        }
        // A JWS (or a JSON-serialized one, which `parse_compact` refuses); anything else is an
        // opaque token.
        let looks_like_jwt =
            token.starts_with('{') || token.bytes().filter(|b| *b == b'.').count() == 2;
        let outcome = if looks_like_jwt && !allow.providers.is_empty() {
            self.check_jwt(host, token, Attempt::First)
        } else if allow.introspection {
            self.introspect(host, token)
        } else {
            Outcome::Refused(Refusal::token(
                "malformed",
                "the token is malformed: a JWS has three dot-separated parts",
            ))
        };
        self.finish(host, outcome)
    }

    /// A client past its failed-credential limit gets 429, before any hash or signature work.
    fn throttled(&mut self, host: &mut dyn Host) -> Option<Decision> {
        let limit = self.config.failure_limit.as_ref()?;
        self.client = client_address(host);
        let retry_after = limit.refused(host, self.client.as_deref()?, host.now_secs())?;
        self.count(host, "denied");
        self.count(host, "denied.too_many_failures");
        Some(Decision::Respond(FailureLimit::reply(
            "https://tollgate.dev/problems/auth/too_many_failures",
            &self.instance(host),
            retry_after,
        )))
    }

    /// Count a refused credential against the client (failed-credential throttling).
    fn record_failure(&self, host: &mut dyn Host) {
        if let (Some(limit), Some(client)) = (&self.config.failure_limit, &self.client) {
            let now = host.now_secs();
            limit.record(host, client, now);
        }
    }

    fn missing(&mut self, host: &mut dyn Host) -> Decision {
        if self.requirement() != Requirement::Required {
            self.count(host, "anonymous");
            return Decision::Continue;
        }
        self.count(host, "denied");
        self.count(host, "denied.missing");
        let realm = quote(&self.config.realm);
        let (bearer, api_key) = self.rule().map_or((true, false), |r| {
            (
                !r.allow.providers.is_empty() || r.allow.introspection,
                r.allow.api_key,
            )
        });
        let mut challenge = Vec::new();
        if bearer {
            challenge.push(format!("Bearer realm=\"{realm}\""));
        }
        if api_key {
            challenge.push(format!("ApiKey realm=\"{realm}\""));
        }
        let reply = Problem::new(401)
            .typed("https://tollgate.dev/problems/auth/missing", "Unauthorized")
            .detail("no credential was sent")
            .instance(self.instance(host))
            .extension("reason", "missing")
            .into_reply();
        let reply = challenge
            .into_iter()
            .fold(reply, |r, c| r.with_header("www-authenticate", c));
        Decision::Respond(reply)
    }

    fn instance(&self, host: &dyn Host) -> String {
        // Never the query string: it may hold the credential.
        split_query(&host.path()).0.to_string()
    }

    fn check_api_key(&self, host: &mut dyn Host, key: &str) -> Outcome {
        let Some(keys) = &self.config.api_keys else {
            return Outcome::Refused(Refusal::token("invalid_api_key", "unknown API key"));
        };
        let api_refusal = |reason: &'static str, detail: &str| {
            Outcome::Refused(Refusal {
                reason,
                detail: detail.to_string(),
                scheme: "ApiKey",
            })
        };
        if key.len() > self.config.max_token_size {
            return api_refusal("token_too_large", "the API key is too long");
        }
        let digest = sha256(key.as_bytes());
        // Compare with every key in constant time, without stopping at a match.
        let mut found: Option<usize> = None;
        for (i, k) in keys.keys.iter().enumerate() {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(i);
            }
        }
        let Some(k) = found.and_then(|i| keys.keys.get(i)) else {
            return api_refusal("invalid_api_key", "the API key is not valid");
        };
        if k.expires.is_some_and(|e| host.now_secs() >= e) {
            return api_refusal("expired_api_key", "the API key has expired");
        }
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::String(k.consumer.clone()));
        if let Some(p) = &k.plan {
            claims.insert("plan".into(), Value::String(p.clone()));
        }
        for (h, v) in &k.headers {
            claims.insert(h.clone(), Value::String(v.clone()));
        }
        Outcome::Allowed(Identity {
            method: "api_key",
            source: crate::config::SOURCE_API_KEY.to_string(),
            consumer: Some(k.consumer.clone()),
            plan: k.plan.clone(),
            claims: Rc::new(claims),
            headers: k.headers.clone(),
        })
    }

    fn jwt_identity(
        &self,
        p: &Provider,
        claims: Rc<Map<String, Value>>,
        payload_b64: &str,
    ) -> Identity {
        let mut headers = Vec::new();
        for (path, h) in &p.claim_headers {
            if let Some(v) = claims::lookup(&claims, path).and_then(claims::header_value) {
                headers.push((h.clone(), v));
            }
        }
        if let Some(h) = &p.payload_header {
            headers.push((h.clone(), payload_b64.to_string()));
        }
        Identity {
            method: "jwt",
            source: p.source.clone(),
            consumer: claims::string_claim(&claims, &p.consumer_claim),
            plan: p
                .plan_claim
                .as_ref()
                .and_then(|c| claims::string_claim(&claims, c)),
            claims,
            headers,
        }
    }

    /// Verify a JWT; `attempt`: which waits are behind (never the same one twice).
    fn check_jwt(&mut self, host: &mut dyn Host, token: String, attempt: Attempt) -> Outcome {
        let now = host.now_secs();
        let config = Rc::clone(&self.config);
        let allowed = self
            .rule()
            .map(|r| r.allow.providers.clone())
            .unwrap_or_default();
        let digest = sha256(token.as_bytes());
        // The verified-token cache.
        let hit = self
            .runtime
            .try_borrow()
            .ok()
            .and_then(|rt| rt.cache.get(&digest).cloned());
        if let Some(hit) = hit {
            if let Some(p) = config.providers.get(hit.provider) {
                if allowed.contains(&hit.provider) {
                    self.count(host, "token_cache_hits");
                    return match claims::check_times(p, &hit.claims, now) {
                        Ok(()) => {
                            Outcome::Allowed(self.jwt_identity(p, hit.claims, &hit.payload_b64))
                        }
                        Err(e) => {
                            if let Ok(mut rt) = self.runtime.try_borrow_mut() {
                                rt.cache.remove(&digest);
                            }
                            Outcome::Refused(e.into())
                        }
                    };
                }
            }
        }
        let jws = match jose::parse_compact(&token) {
            Ok(j) => j,
            Err(e) => return Outcome::Refused(e.into()),
        };
        let claims = match serde_json::from_slice::<StrictValue>(&jws.payload) {
            Ok(StrictValue(Value::Object(m))) => m,
            _ => {
                return Outcome::Refused(Refusal::token(
                    "malformed",
                    "the token's payload is not a JSON object without duplicate members",
                ))
            }
        };
        let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
            return Outcome::Refused(Refusal::token(
                "unknown_issuer",
                "the token has no issuer (`iss`)",
            ));
        };
        let Some(pi) = config.providers.iter().position(|p| p.issuer == iss) else {
            return Outcome::Refused(Refusal::token(
                "unknown_issuer",
                "the token's issuer is not known",
            ));
        };
        if !allowed.contains(&pi) {
            return Outcome::Refused(Refusal::token(
                "issuer_not_allowed",
                "the token's issuer is not accepted on this route",
            ));
        }
        let Some(p) = config.providers.get(pi) else {
            return Outcome::Refused(Refusal::token(
                "unknown_issuer",
                "the token's issuer is not known",
            ));
        };
        if !p.algorithms.contains(&jws.header.alg) {
            return Outcome::Refused(JwsError::AlgNotAllowed(jws.header.alg.name().into()).into());
        }
        let verified = match &p.keys {
            KeySource::Inline(keys) => jose::verify_jws(&jws, keys, &p.algorithms),
            KeySource::Remote(r) => {
                let (keys, fetching_here, failed_recently, down) = {
                    let Ok(rt) = self.runtime.try_borrow() else {
                        return Outcome::Unavailable("busy".into());
                    };
                    let Some(st) = rt.remotes.get(pi) else {
                        return Outcome::Unavailable("no key state".into());
                    };
                    let failed_recently =
                        st.failed_at > 0.0 && st.fetching.is_none() && now < st.next_attempt;
                    // The last fetch (this worker's or another's) failed.
                    let down = st.failed_at > 0.0 && st.fetching.is_none();
                    (
                        st.current(now),
                        st.fetching.is_some(),
                        failed_recently,
                        down,
                    )
                };
                match keys {
                    None if attempt != Attempt::First || failed_recently => {
                        return Outcome::Unavailable(format!(
                            "the keys of provider `{}` could not be fetched",
                            p.name
                        ))
                    }
                    None => {
                        return self.wait_for_keys(host, pi, r, token, true, Attempt::AfterKeys)
                    }
                    Some(keys) => match jose::verify_jws(&jws, &keys, &p.algorithms) {
                        // The key server is down: the token's key may simply be new, so the
                        // provider's failure mode decides, as for any token of that provider.
                        // A fetch is asked for (after the retry interval) without waiting.
                        Err(JwsError::UnknownKid) if down => {
                            if let Ok(mut rt) = self.runtime.try_borrow_mut() {
                                if let Some(st) = rt.remotes.get_mut(pi) {
                                    st.wanted = true;
                                }
                            }
                            return Outcome::Unavailable(format!(
                                "the keys of provider `{}` could not be fetched, and the \
                                 token's key is not among the last ones fetched",
                                p.name
                            ));
                        }
                        Err(JwsError::UnknownKid) if attempt != Attempt::AfterRefetch => {
                            // A fetch under way (in this worker or another) may bring the key.
                            let elsewhere = matches!(
                                keyset::read_lease(host, &p.name),
                                Some(keyset::Lease::Fetching(until)) if until > now
                            );
                            if fetching_here || elsewhere {
                                return self.wait_for_keys(
                                    host,
                                    pi,
                                    r,
                                    token,
                                    false,
                                    Attempt::AfterRefetch,
                                );
                            }
                            // One refetch per `refetch_interval` for all workers.
                            let interval = r.refetch_interval.as_secs_f64();
                            if keyset::claim_refetch(host, &p.name, now, interval) {
                                self.count(host, "jwks_refetches");
                                return self.wait_for_keys(
                                    host,
                                    pi,
                                    r,
                                    token,
                                    true,
                                    Attempt::AfterRefetch,
                                );
                            }
                            Err(JwsError::UnknownKid)
                        }
                        other => other,
                    },
                }
            }
        };
        if let Err(e) = verified {
            return Outcome::Refused(e.into());
        }
        if let Err(e) = claims::check_claims(p, jws.header.typ.as_deref(), &claims, now) {
            return Outcome::Refused(e.into());
        }
        let claims = Rc::new(claims);
        if let Ok(mut rt) = self.runtime.try_borrow_mut() {
            rt.cache.insert(
                digest,
                CachedToken {
                    provider: pi,
                    claims: claims.clone(),
                    payload_b64: jws.payload_b64.to_string(),
                },
            );
        }
        Outcome::Allowed(self.jwt_identity(p, claims, jws.payload_b64))
    }

    /// Pause until the provider's keys change or a fetch ends; `fetch`: ask the root for one.
    fn wait_for_keys(
        &mut self,
        host: &mut dyn Host,
        pi: usize,
        r: &crate::config::Remote,
        token: String,
        fetch: bool,
        then: Attempt,
    ) -> Outcome {
        let now = host.now_secs();
        let Ok(mut rt) = self.runtime.try_borrow_mut() else {
            return Outcome::Unavailable("busy".into());
        };
        let Some(st) = rt.remotes.get_mut(pi) else {
            return Outcome::Unavailable("no key state".into());
        };
        if fetch {
            st.wanted = true;
        }
        st.waiters
            .push((self.context_id, now + keyset::wait_limit(r).as_secs_f64()));
        self.pending = Pending::Keys { token, then };
        Outcome::Wait
    }

    fn introspect(&mut self, host: &mut dyn Host, token: String) -> Outcome {
        let Some(cfg) = self.config.introspection.clone() else {
            return Outcome::Refused(Refusal::token("malformed", "the token is malformed"));
        };
        let digest = sha256(token.as_bytes());
        let now = host.now_secs();
        if cfg.slots > 0 {
            if let Some(entry) = self.cached_introspection(host, &digest, cfg.slots, now) {
                self.count(host, "introspection_cache_hits");
                return self.introspection_outcome(&entry, now);
            }
        }
        let body = format!(
            "token={}&token_type_hint=access_token",
            percent_encode(&token)
        );
        let mut headers = vec![
            (":method", "POST"),
            (":path", cfg.path.as_str()),
            (":authority", cfg.authority.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
        ];
        if let Some(b) = &cfg.basic {
            headers.push(("authorization", b.as_str()));
        }
        let call = HttpCall {
            cluster: &cfg.cluster,
            headers,
            body: Some(body.as_bytes()),
            timeout: cfg.timeout,
        };
        match host.http_call(&call) {
            Ok(id) => {
                self.count(host, "introspection_calls");
                self.pending = Pending::Introspection {
                    call: id,
                    token,
                    digest,
                };
                Outcome::Wait
            }
            Err(e) => {
                warn_limited!(
                    self.outage_log,
                    now,
                    "[{}] introspection call failed: {e}",
                    self.context_id
                );
                self.count(host, "introspection_failures");
                Outcome::Unavailable("the introspection endpoint cannot be called".into())
            }
        }
    }

    fn slot_key(digest: &[u8; 32], slots: u32) -> String {
        let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % slots.max(1);
        format!("tollgate.auth.introspect.{n}")
    }

    fn cached_introspection(
        &self,
        host: &dyn Host,
        digest: &[u8; 32],
        slots: u32,
        now: f64,
    ) -> Option<Map<String, Value>> {
        let (v, _) = host.shared_get(&Self::slot_key(digest, slots)).ok()??;
        let Value::Object(entry) = serde_json::from_slice::<Value>(&v).ok()? else {
            return None;
        };
        if entry.get("h").and_then(Value::as_str) != Some(hex(digest).as_str()) {
            return None;
        }
        if entry
            .get("until")
            .and_then(Value::as_f64)
            .is_none_or(|u| u <= now)
        {
            return None;
        }
        Some(entry)
    }

    /// An entry is `{"h": digest, "until": secs, "active": bool, "claims": {...}}`.
    fn introspection_outcome(&self, entry: &Map<String, Value>, _now: f64) -> Outcome {
        let active = entry
            .get("active")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !active {
            return Outcome::Refused(Refusal::token("inactive_token", "the token is not active"));
        }
        let claims = match entry.get("claims") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let Some(cfg) = &self.config.introspection else {
            return Outcome::Refused(Refusal::token("inactive_token", "the token is not active"));
        };
        let consumer = claims::string_claim(&claims, &cfg.consumer_claim)
            .or_else(|| claims::string_claim(&claims, &["client_id".to_string()]));
        let plan = cfg
            .plan_claim
            .as_ref()
            .and_then(|c| claims::string_claim(&claims, c));
        Outcome::Allowed(Identity {
            method: "introspection",
            source: crate::config::SOURCE_INTROSPECTION.to_string(),
            consumer,
            plan,
            claims: Rc::new(claims),
            headers: Vec::new(),
        })
    }

    fn on_introspection(
        &mut self,
        host: &mut dyn Host,
        token: &str,
        digest: [u8; 32],
        resp: &CallResponse,
    ) -> Outcome {
        let _ = token;
        let Some(cfg) = self.config.introspection.clone() else {
            return Outcome::Unavailable("no introspection".into());
        };
        let now = host.now_secs();
        let answer = match resp.status() {
            Some(200) => serde_json::from_slice::<Value>(&resp.body).ok(),
            _ => None,
        };
        let Some(Value::Object(answer)) = answer else {
            warn_limited!(
                self.outage_log,
                now,
                "[{}] introspection failed: {}",
                self.context_id,
                resp.status().map_or("no answer".to_string(), |s| format!(
                    "status {s} or a body that is not a JSON object"
                ))
            );
            self.count(host, "introspection_failures");
            return Outcome::Unavailable("the introspection endpoint did not answer".into());
        };
        let Some(mut active) = answer.get("active").and_then(Value::as_bool) else {
            self.count(host, "introspection_failures");
            return Outcome::Unavailable("the introspection answer has no `active`".into());
        };
        let exp = answer.get("exp").and_then(Value::as_f64);
        if exp.is_some_and(|e| e <= now) {
            active = false;
        }
        let until = if active {
            let cap = now + cfg.positive_ttl;
            exp.map_or(cap, |e| e.min(cap))
        } else {
            now + cfg.negative_ttl
        };
        let mut entry = Map::new();
        entry.insert("h".into(), Value::String(hex(&digest)));
        entry.insert("until".into(), serde_json::json!(until));
        entry.insert("active".into(), Value::Bool(active));
        let mut claims = answer;
        claims.remove("active");
        entry.insert("claims".into(), Value::Object(claims));
        if cfg.slots > 0 && until > now {
            if let Ok(bytes) = serde_json::to_vec(&entry) {
                if let Err(e) = host.shared_set(&Self::slot_key(&digest, cfg.slots), &bytes, None) {
                    log::debug!("[{}] cannot cache introspection: {e}", self.context_id);
                }
            }
        }
        self.introspection_outcome(&entry, now)
    }

    /// Turn an outcome into the request's fate.
    fn finish(&mut self, host: &mut dyn Host, outcome: Outcome) -> Decision {
        let requirement = self.requirement();
        match outcome {
            Outcome::Wait => Decision::Pause,
            Outcome::Allowed(id) => {
                let authz = match self.rule() {
                    Some(rule) => {
                        claims::authorize(rule, &id.claims, id.consumer.as_deref(), &self.params)
                    }
                    None => Ok(()),
                };
                if let Err(e) = authz {
                    if requirement == Requirement::Optional {
                        self.count(host, "anonymous");
                        return Decision::Continue;
                    }
                    return self.forbidden(host, &e);
                }
                for (h, v) in &id.headers {
                    host.set_header(MapKind::RequestHeaders, h, v);
                }
                if let Some(c) = &id.consumer {
                    let c = claims::header_value(&Value::String(c.clone())).unwrap_or_default();
                    host.set_header(MapKind::RequestHeaders, &self.config.consumer_header, &c);
                }
                if let Some(p) = &id.plan {
                    let p = claims::header_value(&Value::String(p.clone())).unwrap_or_default();
                    host.set_header(MapKind::RequestHeaders, &self.config.plan_header, &p);
                }
                if let Some(h) = &self.config.source_header {
                    let s =
                        claims::header_value(&Value::String(id.source.clone())).unwrap_or_default();
                    host.set_header(MapKind::RequestHeaders, h, &s);
                }
                if self.config.remove_credential {
                    if let Some(src) = self.credential.clone() {
                        remove_source(host, &src);
                    }
                }
                self.count(host, "allowed");
                self.count(host, &format!("allowed.{}", id.method));
                Decision::Continue
            }
            Outcome::Refused(r) => {
                self.record_failure(host);
                if requirement == Requirement::Optional {
                    self.count(host, "anonymous");
                    return Decision::Continue;
                }
                log::debug!("[{}] refused: {}", self.context_id, r.reason);
                self.count(host, "denied");
                self.count(host, &format!("denied.{}", r.reason));
                let realm = quote(&self.config.realm);
                let (error, desc) = (
                    if r.scheme == "ApiKey" {
                        "invalid_key"
                    } else {
                        "invalid_token"
                    },
                    quote(&r.detail),
                );
                let reply = Problem::new(401)
                    .typed(
                        format!("https://tollgate.dev/problems/auth/{}", r.reason),
                        "Unauthorized",
                    )
                    .detail(r.detail.clone())
                    .instance(self.instance(host))
                    .extension("reason", r.reason)
                    .into_reply()
                    .with_header(
                        "www-authenticate",
                        format!(
                            "{} realm=\"{realm}\", error=\"{error}\", error_description=\"{desc}\"",
                            r.scheme
                        ),
                    );
                Decision::Respond(reply)
            }
            Outcome::Unavailable(why) => {
                warn_limited!(
                    self.outage_log,
                    host.now_secs(),
                    "[{}] identity provider unavailable: {why}",
                    self.context_id
                );
                if self.config.failure_mode == FailureMode::Allow {
                    self.count(host, "failure_mode_allowed");
                    return Decision::Continue;
                }
                self.count(host, "denied");
                self.count(host, "denied.unavailable");
                let reply = Problem::new(503)
                    .typed(
                        "https://tollgate.dev/problems/auth/unavailable",
                        "Service Unavailable",
                    )
                    .detail(format!("the credential cannot be checked now: {why}"))
                    .instance(self.instance(host))
                    .extension("reason", "unavailable")
                    .into_reply()
                    .with_header("retry-after", "1");
                Decision::Respond(reply)
            }
        }
    }

    fn forbidden(&self, host: &mut dyn Host, e: &AuthzError) -> Decision {
        self.count(host, "denied");
        self.count(host, &format!("denied.{}", e.reason()));
        let realm = quote(&self.config.realm);
        let mut challenge = format!(
            "Bearer realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{}\"",
            quote(&e.to_string())
        );
        match e {
            AuthzError::InsufficientScope(s) => {
                challenge.push_str(&format!(", scope=\"{}\"", quote(&s.join(" "))));
            }
            AuthzError::IdentityMismatch(_, s) if !s.is_empty() => {
                challenge.push_str(&format!(", scope=\"{}\"", quote(&s.join(" "))));
            }
            _ => {}
        }
        let reply: LocalReply = Problem::new(403)
            .typed(
                format!("https://tollgate.dev/problems/auth/{}", e.reason()),
                "Forbidden",
            )
            .detail(e.to_string())
            .instance(self.instance(host))
            .extension("reason", e.reason())
            .into_reply()
            .with_header("www-authenticate", challenge);
        Decision::Respond(reply)
    }
}

impl HttpFilter for AuthFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        self.start(host)
    }

    /// While the request waits (keys, introspection), its body is held too: Envoy documents that
    /// a `Continue` from a body callback resumes a stream whose headers were stopped. (Envoy
    /// 1.40's wasm filter did not resume in our test, `test_introspection_active_inactive_and_
    /// cached`; holding the body does not depend on that.)
    fn on_request_body(
        &mut self,
        _host: &mut dyn Host,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Decision {
        match self.pending {
            Pending::Nothing => Decision::Continue,
            _ => Decision::Pause,
        }
    }

    fn on_wake(&mut self, host: &mut dyn Host, reason: u32) -> Decision {
        let Pending::Keys { token, then } = std::mem::replace(&mut self.pending, Pending::Nothing)
        else {
            return Decision::Pause;
        };
        let outcome = if reason == WAKE_TIMEOUT {
            Outcome::Unavailable("timed out waiting for the provider's keys".into())
        } else {
            self.check_jwt(host, token, then)
        };
        self.finish(host, outcome)
    }

    fn on_call_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: CallResponse,
    ) -> Decision {
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Introspection {
                call,
                token: t,
                digest,
            } if call == token => {
                let outcome = self.on_introspection(host, &t, digest, &response);
                self.finish(host, outcome)
            }
            other => {
                self.pending = other;
                Decision::Pause
            }
        }
    }
}
