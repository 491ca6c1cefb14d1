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

use crate::claims::{self, AuthzError};
use crate::config::{
    Allow, Compiled, Config, FailureMode, KeySource, Provider, Requirement, Rule, Source,
};
use crate::identity::Identity;
use crate::jose::{self, JwsError};
use crate::keyset::{self, CachedToken, Worker, WAKE_TIMEOUT};
use crate::verdict::{self, Attempt, KeyStep, KeyView, KidStep, Refusal};

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
    // Request headers only: its request body hook only held the body while a check was
    // pending, and Envoy delivers no body chunk while the headers are paused.
    const HOOKS: tollgate_common::filter::Hooks = tollgate_common::filter::Hooks::NONE;

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

/// The result of checking a credential.
#[derive(Debug)]
enum Outcome {
    /// An authenticated caller, with the outcome counter of the request (`allowed.jwt`, ...).
    Allowed(Rc<Identity>, &'static str),
    Refused(Refusal),
    /// The key server or introspection endpoint could not answer.
    Unavailable(String),
    /// Wait (the filter's `pending` says for what).
    Wait,
}

/// Where the request's credential was found: an index into `api_keys.from` or
/// `token_sources`.
#[derive(Debug, Clone, Copy)]
enum SourceAt {
    ApiKey(usize),
    Token(usize),
}

/// A credential found in the request.
#[derive(Debug)]
enum Credential {
    /// An API key.
    ApiKey(String),
    /// A bearer token (JWT or opaque).
    Token(String),
}

/// What a bearer token is, for the route that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// Longer than `max_token_size`.
    TooLarge,
    /// A JWS (or a JSON-serialized one, which the JWT check refuses), on a route that accepts
    /// a provider.
    Jwt,
    /// Anything else, on a route that accepts introspection.
    Opaque,
    /// Neither.
    Malformed,
}

/// Classify a bearer token (pure).
fn token_kind(token: &str, allow: &Allow, config: &Compiled) -> TokenKind {
    let looks_like_jwt =
        token.starts_with('{') || token.bytes().filter(|b| *b == b'.').count() == 2;
    if token.len() > config.max_token_size {
        TokenKind::TooLarge
    } else if looks_like_jwt && !allow.providers.is_empty() {
        TokenKind::Jwt
    } else if allow.introspection {
        TokenKind::Opaque
    } else {
        TokenKind::Malformed
    }
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
    credential: Option<SourceAt>,
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
        self.strip_forged(host);
        self.choose_rule(host);
        let config = Rc::clone(&self.config);
        let Some(rule) = self.rule.and_then(|i| config.rules.0.get(i)) else {
            self.count(host, "skipped");
            return Decision::Continue;
        };
        if rule.disabled {
            self.count(host, "skipped");
            return Decision::Continue;
        }
        let allow = &rule.allow;
        let Some((src, credential)) = self.find_credential(host, allow) else {
            return self.missing(host);
        };
        self.credential = Some(src);
        if let Some(d) = self.throttled(host) {
            return d;
        }
        let outcome = match credential {
            Credential::ApiKey(key) => self.check_api_key(host, &key),
            Credential::Token(token) => match token_kind(&token, allow, &self.config) {
                TokenKind::TooLarge => Outcome::Refused(Refusal::token(
                    "token_too_large",
                    format!(
                        "the credential is longer than {} bytes",
                        self.config.max_token_size
                    ),
                )),
                TokenKind::Jwt => self.check_jwt(host, token, Attempt::First),
                TokenKind::Opaque => self.introspect(host, token),
                TokenKind::Malformed => Outcome::Refused(Refusal::token(
                    "malformed",
                    "the token is malformed: a JWS has three dot-separated parts",
                )),
            },
        };
        self.finish(host, outcome)
    }

    /// Remove every identity header the filter can set from the request.
    fn strip_forged(&self, host: &mut dyn Host) {
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
    }

    /// The first rule whose match fits, with the template's variables.
    fn choose_rule(&mut self, host: &dyn Host) {
        let config = Rc::clone(&self.config);
        // Only what the rules match on is read (`:method` and `:authority` when some rule
        // lists methods or hosts).
        let method = if config.reads_method {
            host.method()
        } else {
            String::new()
        };
        let authority = if config.reads_host {
            host.authority()
        } else {
            String::new()
        };
        let req = RequestInfo::from_parts(method, authority, host.path());
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
    }

    /// The credential to check: an API key when the route accepts them and one was sent, else
    /// the first bearer token of `token_sources` when the route accepts bearer tokens.
    fn find_credential(&self, host: &dyn Host, allow: &Allow) -> Option<(SourceAt, Credential)> {
        let first = |sources: &[Source]| {
            sources
                .iter()
                .enumerate()
                .find_map(|(i, s)| read_source(host, s).map(|v| (i, v)))
        };
        let api_keys = self.config.api_keys.as_ref().filter(|_| allow.api_key);
        if let Some((i, key)) = api_keys.and_then(|k| first(&k.from)) {
            return Some((SourceAt::ApiKey(i), Credential::ApiKey(key)));
        }
        if allow.providers.is_empty() && !allow.introspection {
            return None;
        }
        let (i, token) = first(&self.config.token_sources)?;
        Some((SourceAt::Token(i), Credential::Token(token)))
    }

    /// The source a credential was read from.
    fn source(&self, at: SourceAt) -> Option<&Source> {
        match at {
            SourceAt::ApiKey(i) => self.config.api_keys.as_ref()?.from.get(i),
            SourceAt::Token(i) => self.config.token_sources.get(i),
        }
    }

    /// A client past its failed-credential limit gets 429, before any hash or signature work.
    fn throttled(&mut self, host: &mut dyn Host) -> Option<Decision> {
        let limit = self.config.failure_limit.as_ref()?;
        self.client = client_address(host);
        let retry_after = limit.refused(host, self.client.as_deref()?, host.now_secs())?;
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
        // A key found valid before on this worker (compared in constant time with the key
        // remembered, `keyset::TokenCache`); else its SHA-256 compared with every key's digest
        // in constant time, without stopping at a match.
        let known = self
            .runtime
            .try_borrow()
            .ok()
            .and_then(|rt| rt.api_keys.get(key).copied());
        let found = known.or_else(|| {
            let digest = sha256(key.as_bytes());
            let mut found: Option<usize> = None;
            for (i, k) in keys.keys.iter().enumerate() {
                if bool::from(k.digest.ct_eq(&digest)) {
                    found = Some(i);
                }
            }
            if let (Some(i), Ok(mut rt)) = (found, self.runtime.try_borrow_mut()) {
                rt.api_keys.insert(key, i);
            }
            found
        });
        let Some(k) = found.and_then(|i| keys.keys.get(i)) else {
            return api_refusal("invalid_api_key", "the API key is not valid");
        };
        if k.expires.is_some_and(|e| host.now_secs() >= e) {
            return api_refusal("expired_api_key", "the API key has expired");
        }
        Outcome::Allowed(Rc::clone(&k.identity), "allowed.api_key")
    }

    /// The identity of a verified token (kept in the verified-token cache).
    fn jwt_identity(
        &self,
        p: &Provider,
        claims: Map<String, Value>,
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
        let plan = p
            .plan_claim
            .as_ref()
            .and_then(|c| claims::string_claim(&claims, c));
        Identity::new(
            self.config.names(),
            &p.source,
            claims::string_claim(&claims, &p.consumer_claim),
            plan.as_deref(),
            Rc::new(claims),
            headers,
        )
    }

    /// Verify a JWT; `attempt`: which waits are behind (never the same one twice).
    fn check_jwt(&mut self, host: &mut dyn Host, token: String, attempt: Attempt) -> Outcome {
        let now = host.now_secs();
        let config = Rc::clone(&self.config);
        let allowed: &[usize] = self
            .rule
            .and_then(|i| config.rules.0.get(i))
            .map_or(&[], |r| &r.allow.providers);
        // The verified-token cache (keyed by a cheap hash of the token, the token compared in
        // constant time: `keyset::TokenCache`).
        if let Some(outcome) = self.cached_jwt(&token, now) {
            return outcome;
        }
        let read = match verdict::read_token(&token, &config.providers, allowed) {
            Ok(r) => r,
            Err(r) => return Outcome::Refused(r),
        };
        let Some(p) = config.providers.get(read.provider) else {
            return Outcome::Refused(Refusal::token("unknown_issuer", "no such provider"));
        };
        let verified = match &p.keys {
            KeySource::Inline(keys) => jose::verify_jws(&read.jws, keys, &p.algorithms),
            KeySource::Remote(_) => {
                match self.verify_remote(host, &read, p, &token, attempt, now) {
                    Ok(v) => v,
                    Err(outcome) => return outcome,
                }
            }
        };
        if let Err(e) = verified {
            return Outcome::Refused(e.into());
        }
        if let Err(e) = claims::check_claims(p, read.jws.header.typ.as_deref(), &read.claims, now) {
            return Outcome::Refused(e.into());
        }
        let identity = Rc::new(self.jwt_identity(p, read.claims, read.jws.payload_b64));
        if let Ok(mut rt) = self.runtime.try_borrow_mut() {
            rt.cache.insert(
                &token,
                CachedToken {
                    provider: read.provider,
                    identity: Rc::clone(&identity),
                },
            );
        }
        Outcome::Allowed(identity, "allowed.jwt")
    }

    /// A token in the verified-token cache, for a provider the route accepts: allowed (its
    /// times checked again) or refused (and dropped from the cache). `None`: not cached.
    fn cached_jwt(&mut self, token: &str, now: f64) -> Option<Outcome> {
        let hit = self.runtime.try_borrow().ok()?.cache.get(token).cloned()?;
        let config = Rc::clone(&self.config);
        let p = config.providers.get(hit.provider)?;
        if !self.rule()?.allow.providers.contains(&hit.provider) {
            return None;
        }
        Some(match claims::check_times(p, &hit.identity.claims, now) {
            Ok(()) => Outcome::Allowed(hit.identity, "allowed.jwt_cached"),
            Err(e) => {
                if let Ok(mut rt) = self.runtime.try_borrow_mut() {
                    rt.cache.remove(token);
                }
                Outcome::Refused(e.into())
            }
        })
    }

    /// Verify with a remote provider's keys, or say why not yet (`Err`: wait, or the failure
    /// mode). The decisions are [`verdict::key_step`] and [`verdict::unknown_kid_step`].
    fn verify_remote(
        &mut self,
        host: &mut dyn Host,
        read: &verdict::Read<'_>,
        p: &Provider,
        token: &str,
        attempt: Attempt,
        now: f64,
    ) -> Result<Result<(), JwsError>, Outcome> {
        let KeySource::Remote(r) = &p.keys else {
            return Ok(Err(JwsError::UnknownKid));
        };
        let view = {
            let Ok(rt) = self.runtime.try_borrow() else {
                return Err(Outcome::Unavailable("busy".into()));
            };
            let Some(st) = rt.remotes.get(read.provider) else {
                return Err(Outcome::Unavailable("no key state".into()));
            };
            KeyView::of(st, now)
        };
        let fetch_failed = || format!("the keys of provider `{}` could not be fetched", p.name);
        let keys = match (verdict::key_step(&view, attempt), &view.keys) {
            (KeyStep::Verify, Some(keys)) => keys.clone(),
            (KeyStep::Wait { fetch, then }, _) => {
                let (pi, token) = (read.provider, token.to_string());
                return Err(self.wait_for_keys(host, pi, r, token, fetch, then));
            }
            _ => return Err(Outcome::Unavailable(fetch_failed())),
        };
        match jose::verify_jws(&read.jws, &keys, &p.algorithms) {
            Err(JwsError::UnknownKid) => {}
            other => return Ok(other),
        }
        let elsewhere = || {
            matches!(
                keyset::read_lease(host, &p.name),
                Some(keyset::Lease::Fetching(until)) if until > now
            )
        };
        let (pi, then) = (read.provider, Attempt::AfterRefetch);
        match verdict::unknown_kid_step(&view, attempt, elsewhere) {
            KidStep::Unavailable => {
                self.want_fetch(pi);
                Err(Outcome::Unavailable(format!(
                    "{}, and the token's key is not among the last ones fetched",
                    fetch_failed()
                )))
            }
            KidStep::WaitForFetch => {
                Err(self.wait_for_keys(host, pi, r, token.to_string(), false, then))
            }
            KidStep::TryRefetch => {
                let interval = r.refetch_interval.as_secs_f64();
                if !keyset::claim_refetch(host, &p.name, now, interval) {
                    return Ok(Err(JwsError::UnknownKid));
                }
                self.count(host, "jwks_refetches");
                Err(self.wait_for_keys(host, pi, r, token.to_string(), true, then))
            }
            KidStep::Refuse => Ok(Err(JwsError::UnknownKid)),
        }
    }

    /// Ask the root for a fetch of provider `pi`'s keys (done after its retry interval).
    fn want_fetch(&self, pi: usize) {
        if let Ok(mut rt) = self.runtime.try_borrow_mut() {
            if let Some(st) = rt.remotes.get_mut(pi) {
                st.wanted = true;
            }
        }
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
        let identity = Identity::new(
            self.config.names(),
            crate::config::SOURCE_INTROSPECTION,
            consumer,
            plan.as_deref(),
            Rc::new(claims),
            Vec::new(),
        );
        Outcome::Allowed(Rc::new(identity), "allowed.introspection")
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
        match outcome {
            Outcome::Wait => Decision::Pause,
            Outcome::Allowed(id, metric) => self.allow(host, &id, metric),
            Outcome::Refused(r) => self.refuse(host, &r),
            Outcome::Unavailable(why) => self.unavailable(host, &why),
        }
    }

    /// An authenticated caller: authorize, then forward the identity.
    fn allow(&mut self, host: &mut dyn Host, id: &Identity, metric: &str) -> Decision {
        let authz = match self.rule() {
            Some(rule) => claims::authorize(rule, &id.claims, id.consumer.as_deref(), &self.params),
            None => Ok(()),
        };
        if let Err(e) = authz {
            if self.requirement() == Requirement::Optional {
                self.count(host, "anonymous");
                return Decision::Continue;
            }
            return self.forbidden(host, &e);
        }
        for (h, v) in &id.headers {
            host.set_header(MapKind::RequestHeaders, h, v);
        }
        if self.config.remove_credential {
            if let Some(src) = self.credential.and_then(|at| self.source(at)) {
                remove_source(host, src);
            }
        }
        self.count(host, metric);
        Decision::Continue
    }

    /// A refused credential: 401 (or through without identity on an `optional` route).
    fn refuse(&mut self, host: &mut dyn Host, r: &Refusal) -> Decision {
        self.record_failure(host);
        if self.requirement() == Requirement::Optional {
            self.count(host, "anonymous");
            return Decision::Continue;
        }
        log::debug!("[{}] refused: {}", self.context_id, r.reason);
        self.metrics.count_in(host, "denied.", r.reason);
        let realm = quote(&self.config.realm);
        let error = if r.scheme == "ApiKey" {
            "invalid_key"
        } else {
            "invalid_token"
        };
        let desc = quote(&r.detail);
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

    /// The identity provider cannot answer: the failure mode.
    fn unavailable(&mut self, host: &mut dyn Host, why: &str) -> Decision {
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

    fn forbidden(&self, host: &mut dyn Host, e: &AuthzError) -> Decision {
        self.metrics.count_in(host, "denied.", e.reason());
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
