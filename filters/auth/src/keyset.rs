//! Per-worker runtime state shared by the root and its requests: remote key sets (with the
//! fetch under way and the requests waiting for it) and the verified-token cache.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;
use subtle::ConstantTimeEq;
use tollgate_common::fast_hash::{FastBuild, FastMap};
use tollgate_common::{CallResponse, Host, HttpCall};

use crate::config::{Compiled, KeySource, Remote};
use crate::identity::Identity;
use crate::jose::{self, Jwk};

/// Wake reason: a fetch a request waited for has finished (successfully or not).
pub const WAKE_FETCHED: u32 = 1;
/// Wake reason: the request waited longer than the fetch timeout.
pub const WAKE_TIMEOUT: u32 = 2;

/// Which document a fetch asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The OpenID configuration.
    Discovery,
    /// The JWK Set.
    Jwks,
}

/// A fetch under way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fetch {
    /// Callout token.
    pub token: u32,
    /// What it fetches.
    pub stage: Stage,
    /// When it started (Unix seconds).
    pub started: f64,
}

/// Worker state of one provider with remote keys.
#[derive(Debug, Default)]
pub struct RemoteState {
    /// Current keys.
    pub keys: Option<Rc<Vec<Jwk>>>,
    /// When the current keys were fetched (by any worker).
    pub fetched_at: f64,
    /// When they stop being used.
    pub expires_at: f64,
    /// The fetch under way.
    pub fetching: Option<Fetch>,
    /// A request asked for a fetch (no keys yet, or an unknown `kid`).
    pub wanted: bool,
    /// No fetch before this time (after a failure).
    pub next_attempt: f64,
    /// When the last fetch failed (0: the last one succeeded).
    pub failed_at: f64,
    /// Requests waiting for keys: (context id, deadline).
    pub waiters: Vec<(u32, f64)>,
    /// JWK Set path and authority (configured, or from discovery).
    pub jwks_location: Option<(String, String)>,
}

impl RemoteState {
    /// Keys usable now.
    pub fn current(&self, now: f64) -> Option<Rc<Vec<Jwk>>> {
        self.keys.clone().filter(|_| now < self.expires_at)
    }
}

/// A verified token in the cache.
#[derive(Debug, Clone)]
pub struct CachedToken {
    /// Provider index.
    pub provider: usize,
    /// The caller: verified claims (their times are checked again on every hit), consumer and
    /// identity headers, built once when the token was verified.
    pub identity: Rc<Identity>,
}

/// A bounded cache of verified tokens, per worker. Entries leave in insertion order when the
/// cache is full; expired entries are refused on lookup.
///
/// Keyed by a cheap 64-bit hash of the token (`fast_hash`, a few instructions per 8 bytes; the
/// SHA-256 it replaced cost about 17,000 instructions per request for a 500-byte token), and
/// each entry keeps the token itself: a lookup is a hit only when the presented token equals
/// the stored one, compared in constant time (`subtle`). So a hash collision (built on purpose
/// or not) can never return another token's claims; at worst two colliding tokens replace
/// each other in the cache (a miss: the signature is verified again). What the lookup's timing
/// depends on: the presented token's length and its hash, never the bytes of a stored token.
///
/// The same cache (with the key's index as the value) remembers the API keys recently found
/// valid (`api_keys` of [`Worker`]), so that a known key is not hashed with SHA-256 again.
#[derive(Debug)]
pub struct TokenCache<T = CachedToken> {
    cap: usize,
    map: FastMap<u64, (Box<[u8]>, T)>,
    order: VecDeque<u64>,
}

impl<T> Default for TokenCache<T> {
    fn default() -> Self {
        TokenCache::new(0)
    }
}

/// The cache's key of a token.
fn token_key(token: &str) -> u64 {
    FastBuild::default().hash_one(token.as_bytes())
}

impl<T> TokenCache<T> {
    /// A cache of `cap` entries (0: disabled).
    pub fn new(cap: usize) -> Self {
        TokenCache {
            cap,
            map: FastMap::default(),
            order: VecDeque::new(),
        }
    }
    /// Look a token up: its entry when this very token is cached.
    pub fn get(&self, token: &str) -> Option<&T> {
        if self.cap == 0 {
            return None;
        }
        let (stored, t) = self.map.get(&token_key(token))?;
        bool::from(stored.as_ref().ct_eq(token.as_bytes())).then_some(t)
    }
    /// Remove a token's entry (expired).
    pub fn remove(&mut self, token: &str) {
        let key = token_key(token);
        let same = self
            .map
            .get(&key)
            .is_some_and(|(stored, _)| bool::from(stored.as_ref().ct_eq(token.as_bytes())));
        if same && self.map.remove(&key).is_some() {
            self.order.retain(|k| *k != key);
        }
    }
    /// Insert, evicting the oldest entries beyond the capacity.
    pub fn insert(&mut self, token: &str, t: T) {
        if self.cap == 0 {
            return;
        }
        let key = token_key(token);
        if self.map.insert(key, (token.as_bytes().into(), t)).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// State shared by a worker's root and its requests.
#[derive(Debug, Default)]
pub struct Worker {
    /// One per provider (unused for inline providers).
    pub remotes: Vec<RemoteState>,
    /// Verified tokens.
    pub cache: TokenCache,
    /// API keys recently found valid: the index of the key in the configuration.
    pub api_keys: TokenCache<usize>,
}

impl Worker {
    /// Fresh state for a configuration.
    pub fn new(c: &Compiled) -> Self {
        Worker {
            remotes: c
                .providers
                .iter()
                .map(|p| RemoteState {
                    jwks_location: match &p.keys {
                        KeySource::Remote(r) => {
                            r.path.clone().map(|path| (path, r.authority.clone()))
                        }
                        KeySource::Inline(_) => None,
                    },
                    ..RemoteState::default()
                })
                .collect(),
            cache: TokenCache::new(c.token_cache_size),
            // A valid key is the one preimage of its digest: at most one entry per key.
            api_keys: TokenCache::new(c.api_keys.as_ref().map_or(0, |k| k.keys.len())),
        }
    }
}

/// Shared-data key of a provider's keys.
pub fn shared_key(provider: &str) -> String {
    format!("tollgate.auth.jwks.{provider}")
}

/// Encode keys for shared data: `fetched_at` then the JWK Set as fetched.
pub fn encode_shared(fetched_at: f64, body: &[u8]) -> Vec<u8> {
    let mut v = format!("{fetched_at}\n").into_bytes();
    v.extend_from_slice(body);
    v
}

/// Decode [`encode_shared`].
pub fn decode_shared(v: &[u8]) -> Option<(f64, &[u8])> {
    let nl = v.iter().position(|b| *b == b'\n')?;
    let t: f64 = std::str::from_utf8(v.get(..nl)?).ok()?.parse().ok()?;
    Some((t, v.get(nl + 1..)?))
}

/// Shared-data key of a provider's fetch lease: `fetching <until>` while a worker fetches,
/// then `ok <time>` or `fail <time>`. One worker fetches at a time; the others adopt its
/// result from shared data (or its failure).
pub fn lease_key(provider: &str) -> String {
    format!("tollgate.auth.jwks_lease.{provider}")
}

/// Shared-data key of the time of a provider's last unknown-`kid` refetch (all workers).
pub fn refetch_key(provider: &str) -> String {
    format!("tollgate.auth.jwks_refetch.{provider}")
}

/// A provider's fetch lease as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lease {
    /// A worker fetches until this time (or until it finishes).
    Fetching(f64),
    /// The last fetch succeeded at this time.
    Ok(f64),
    /// The last fetch failed at this time.
    Failed(f64),
}

/// Parse a lease value.
pub fn parse_lease(v: &[u8]) -> Option<Lease> {
    let text = std::str::from_utf8(v).ok()?;
    let (kind, t) = text.split_once(' ')?;
    let t: f64 = t.parse().ok()?;
    match kind {
        "fetching" => Some(Lease::Fetching(t)),
        "ok" => Some(Lease::Ok(t)),
        "fail" => Some(Lease::Failed(t)),
        _ => None,
    }
}

fn encode_lease(l: Lease) -> String {
    match l {
        Lease::Fetching(t) => format!("fetching {t}"),
        Lease::Ok(t) => format!("ok {t}"),
        Lease::Failed(t) => format!("fail {t}"),
    }
}

/// Create a provider's lease key when missing, so that later claims are guarded by CAS (in
/// Envoy a CAS only guards an existing key).
pub fn ensure_lease(host: &mut dyn Host, provider: &str) {
    if let Ok(None) = host.shared_get(&lease_key(provider)) {
        let _ = host.shared_set(
            &lease_key(provider),
            encode_lease(Lease::Ok(0.0)).as_bytes(),
            None,
        );
    }
}

/// The current lease, if readable.
pub fn read_lease(host: &dyn Host, provider: &str) -> Option<Lease> {
    let (v, _) = host.shared_get(&lease_key(provider)).ok()??;
    parse_lease(&v)
}

/// Claim the lease to fetch until `until`; false when another worker holds it.
fn claim_lease(host: &mut dyn Host, provider: &str, now: f64, until: f64) -> bool {
    let key = lease_key(provider);
    let current = host.shared_get(&key).ok().flatten();
    let cas = match &current {
        Some((v, cas)) => {
            if let Some(Lease::Fetching(u)) = parse_lease(v) {
                if u > now {
                    return false;
                }
            }
            Some(*cas)
        }
        None => None,
    };
    host.shared_set(&key, encode_lease(Lease::Fetching(until)).as_bytes(), cas)
        .is_ok()
}

fn release_lease(host: &mut dyn Host, provider: &str, l: Lease) {
    let _ = host.shared_set(&lease_key(provider), encode_lease(l).as_bytes(), None);
}

/// May a request cause an unknown-`kid` refetch now? Claims the slot (all workers share the
/// rate limit); false when another refetch happened within `interval`.
pub fn claim_refetch(host: &mut dyn Host, provider: &str, now: f64, interval: f64) -> bool {
    let key = refetch_key(provider);
    let current = host.shared_get(&key).ok().flatten();
    let cas = match &current {
        Some((v, cas)) => {
            let last: f64 = std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            if now - last < interval {
                return false;
            }
            Some(*cas)
        }
        None => None,
    };
    host.shared_set(&key, format!("{now}").as_bytes(), cas)
        .is_ok()
}

/// The path and authority of a `jwks_uri` (`https://host/path?q` gives `/path?q`, `host`).
pub fn split_uri(uri: &str) -> Option<(String, String)> {
    // A URI is printable ASCII (RFC 3986). Anything else from a remote document (a CR LF, a
    // space) would go into the callout's `:authority` or `:path`.
    if !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let rest = uri.split_once("://").map(|(_, r)| r)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    Some((path.to_string(), authority.to_string()))
}

/// What the root should do after a fetch answer or a tick: requests to wake.
pub type Wakes = Vec<(u32, u32)>;

fn start_fetch(
    host: &mut dyn Host,
    ctx: u32,
    name: &str,
    r: &Remote,
    st: &mut RemoteState,
    now: f64,
) -> Result<(), String> {
    let (stage, path, authority) = match &st.jwks_location {
        Some((p, a)) => (Stage::Jwks, p.clone(), a.clone()),
        None => match &r.discovery_path {
            Some(d) => (Stage::Discovery, d.clone(), r.authority.clone()),
            None => return Err("no JWK Set path".into()),
        },
    };
    let call = HttpCall {
        cluster: &r.cluster,
        headers: vec![
            (":method", "GET"),
            (":path", &path),
            (":authority", &authority),
            ("accept", "application/json"),
        ],
        body: None,
        timeout: r.timeout,
    };
    match host.http_call(&call) {
        Ok(token) => {
            log::debug!(
                "[{ctx}] provider {name}: fetching {path} from {}",
                r.cluster
            );
            st.fetching = Some(Fetch {
                token,
                stage,
                started: now,
            });
            Ok(())
        }
        Err(e) => Err(format!("cannot call cluster `{}`: {e}", r.cluster)),
    }
}

fn fail(st: &mut RemoteState, r: &Remote, now: f64, wakes: &mut Wakes) {
    st.fetching = None;
    st.wanted = false;
    st.failed_at = now;
    st.next_attempt = now + r.retry_interval.as_secs_f64();
    wakes.extend(st.waiters.drain(..).map(|(id, _)| (id, WAKE_FETCHED)));
}

fn install(st: &mut RemoteState, keys: Vec<Jwk>, fetched_at: f64, r: &Remote, wakes: &mut Wakes) {
    st.keys = Some(Rc::new(keys));
    st.fetched_at = fetched_at;
    st.expires_at = fetched_at + r.cache_duration.as_secs_f64();
    st.failed_at = 0.0;
    st.wanted = false;
    wakes.extend(st.waiters.drain(..).map(|(id, _)| (id, WAKE_FETCHED)));
}

/// Keys stored by another worker (or an earlier fetch of ours), when newer and fresh.
fn adopt_keys(
    host: &dyn Host,
    name: &str,
    r: &Remote,
    st: &mut RemoteState,
    now: f64,
    wakes: &mut Wakes,
) {
    let Ok(Some((v, _))) = host.shared_get(&shared_key(name)) else {
        return;
    };
    let Some((t, body)) = decode_shared(&v) else {
        return;
    };
    let fresh = t + r.cache_duration.as_secs_f64() > now;
    if t > st.fetched_at && fresh {
        if let Ok(keys) = jose::parse_jwks_bytes(body) {
            install(st, keys, t, r, wakes);
        }
    }
}

/// Another worker's fetch failed at `t`: our waiters need not wait for a fetch of their own,
/// and an unknown `kid` meets the provider's failure mode here too.
fn adopt_failure(st: &mut RemoteState, r: &Remote, t: f64, wakes: &mut Wakes) {
    if t > st.failed_at && t > st.fetched_at && st.fetching.is_none() {
        if st.waiters.is_empty() {
            st.failed_at = t;
        } else {
            fail(st, r, t, wakes);
        }
    }
    // Nobody retries before `retry_interval` after anyone's failure.
    st.next_attempt = st.next_attempt.max(t + r.retry_interval.as_secs_f64());
}

/// Periodic work for every remote provider: adopt keys another worker stored, time out
/// waiting requests, and start fetches (at start, before expiry, on request).
pub fn tick(
    host: &mut dyn Host,
    ctx: u32,
    c: &Compiled,
    rt: &mut Worker,
    metrics: &tollgate_common::metrics::Metrics,
) -> Wakes {
    let now = host.now_secs();
    let mut wakes = Vec::new();
    for (i, p) in c.providers.iter().enumerate() {
        let KeySource::Remote(r) = &p.keys else {
            continue;
        };
        let Some(st) = rt.remotes.get_mut(i) else {
            continue;
        };
        adopt_keys(host, &p.name, r, st, now, &mut wakes);
        if let Some(Lease::Failed(t)) = read_lease(host, &p.name) {
            adopt_failure(st, r, t, &mut wakes);
        }
        // Waiting requests past their deadline.
        let (late, keep): (Vec<_>, Vec<_>) = st.waiters.drain(..).partition(|(_, d)| *d <= now);
        st.waiters = keep;
        wakes.extend(late.into_iter().map(|(id, _)| (id, WAKE_TIMEOUT)));
        // A fetch whose answer never came.
        if let Some(f) = st.fetching {
            if now > f.started + r.timeout.as_secs_f64() + 2.0 {
                st.fetching = None;
            }
        }
        let refresh_at = st.fetched_at + 0.8 * r.cache_duration.as_secs_f64();
        let need = st.keys.is_none() || now >= refresh_at || st.wanted;
        let until = now + r.timeout.as_secs_f64() * 2.0 + 1.0;
        if need
            && st.fetching.is_none()
            && now >= st.next_attempt
            && claim_lease(host, &p.name, now, until)
        {
            if let Err(e) = start_fetch(host, ctx, &p.name, r, st, now) {
                release_lease(host, &p.name, Lease::Failed(now));
                log::warn!("[{ctx}] provider {}: key fetch failed: {e}", p.name);
                metrics.count(host, "jwks_fetch_failures", 1);
                fail(st, r, now, &mut wakes);
            }
        }
    }
    wakes
}

/// A callout answer to the root: if it is a key fetch, use it.
pub fn on_fetched(
    host: &mut dyn Host,
    ctx: u32,
    c: &Compiled,
    rt: &mut Worker,
    metrics: &tollgate_common::metrics::Metrics,
    token: u32,
    resp: &CallResponse,
) -> Wakes {
    let now = host.now_secs();
    let mut wakes = Vec::new();
    for (i, p) in c.providers.iter().enumerate() {
        let KeySource::Remote(r) = &p.keys else {
            continue;
        };
        let Some(st) = rt.remotes.get_mut(i) else {
            continue;
        };
        let Some(f) = st.fetching.filter(|f| f.token == token) else {
            continue;
        };
        st.fetching = None;
        let result = match resp.status() {
            None => Err("no answer (connection failure or timeout)".to_string()),
            Some(200) => Ok(()),
            Some(s) => Err(format!("status {s}")),
        };
        let result = result.and_then(|()| match f.stage {
            Stage::Discovery => {
                let v: Value = serde_json::from_slice(&resp.body)
                    .map_err(|_| "the OpenID configuration is not JSON".to_string())?;
                let uri = v
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or("the OpenID configuration has no `jwks_uri`")?;
                let loc = split_uri(uri).ok_or("`jwks_uri` is not an absolute URL")?;
                st.jwks_location = Some(loc);
                start_fetch(host, ctx, &p.name, r, st, now)
            }
            Stage::Jwks => {
                let keys = jose::parse_jwks_bytes(&resp.body)?;
                let n = keys.len();
                if let Err(e) =
                    host.shared_set(&shared_key(&p.name), &encode_shared(now, &resp.body), None)
                {
                    log::warn!("[{ctx}] provider {}: cannot store keys: {e}", p.name);
                }
                install(st, keys, now, r, &mut wakes);
                release_lease(host, &p.name, Lease::Ok(now));
                metrics.count(host, "jwks_fetches", 1);
                log::info!("[{ctx}] provider {}: fetched {n} keys", p.name);
                Ok(())
            }
        });
        if let Err(e) = result {
            log::warn!("[{ctx}] provider {}: key fetch failed: {e}", p.name);
            metrics.count(host, "jwks_fetch_failures", 1);
            release_lease(host, &p.name, Lease::Failed(now));
            fail(st, r, now, &mut wakes);
        }
    }
    wakes
}

/// The longest a request waits for a provider's keys.
pub fn wait_limit(r: &Remote) -> Duration {
    r.timeout + Duration::from_millis(500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_and_shared_encoding() {
        assert_eq!(
            split_uri("http://127.0.0.1:8081/.well-known/jwks.json"),
            Some(("/.well-known/jwks.json".into(), "127.0.0.1:8081".into()))
        );
        assert_eq!(split_uri("https://idp"), Some(("/".into(), "idp".into())));
        assert_eq!(split_uri("/relative"), None);
        // Found by the `auth_remote` fuzz target: a `jwks_uri` that would put a header line
        // into the key fetch.
        for bad in [
            "http://a\r\nx-injected: 1/p",
            "http://a b/c",
            "http://h/\u{0}",
            "http://é/k",
        ] {
            assert_eq!(split_uri(bad), None, "{bad:?}");
        }
        let v = encode_shared(12.5, b"{\"keys\":[]}");
        assert_eq!(decode_shared(&v), Some((12.5, &b"{\"keys\":[]}"[..])));
        assert_eq!(decode_shared(b"garbage"), None);
    }

    #[test]
    fn token_cache_is_bounded() {
        let mut c = TokenCache::new(2);
        let t = CachedToken {
            provider: 0,
            identity: Rc::default(),
        };
        c.insert("a.b.c1", t.clone());
        c.insert("a.b.c2", t.clone());
        c.insert("a.b.c3", t.clone());
        assert_eq!(c.len(), 2);
        assert!(c.get("a.b.c1").is_none());
        assert!(c.get("a.b.c3").is_some());
        // Another token never hits, whatever its hash.
        assert!(c.get("a.b.c4").is_none());
        c.remove("a.b.c4");
        assert_eq!(c.len(), 2);
        c.remove("a.b.c3");
        assert_eq!(c.len(), 1);
        // An entry under the key of a token but holding another token (a hash collision):
        // never returned for it.
        c.map
            .insert(token_key("x.y.z"), ("x.y.w".as_bytes().into(), t.clone()));
        assert!(c.get("x.y.z").is_none());
        let mut off = TokenCache::new(0);
        off.insert("a.b.c1", t);
        assert!(off.is_empty());
    }
}
