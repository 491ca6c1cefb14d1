//! Request handling of the cache filter: lookups, answers from the cache (200, 304, stale),
//! revalidation, capture and store, invalidation, purge and background refresh.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use tollgate_common::decimal::push_u64;
use tollgate_common::metrics::Metrics;
use tollgate_common::request::{query_param, split_query};
use tollgate_common::route::RequestInfo;
use tollgate_common::{
    Body, CallResponse, ConfigError, Decision, Host, HttpCall, HttpFilter, LocalReply, MapKind,
    Problem, RootFilter, SharedError,
};

use crate::config::{Compiled, Config, Refresh, Rule, SetCookie};
use crate::freshness::{
    facts, freshness, stale_if_error, targeted_view, Facts, RequestDirectives, StoringRequest,
    Verdict,
};
use crate::key::{url_key_of, vary_names, UrlKey};
use crate::parse::{byte_range, http_date, list_members, ByteRange};
use crate::store::{
    millis, Entry, Found, LocalCopies, Lookup, Meta, PurgeRule, Purges, PutError, Store,
    UNKNOWN_PSEQ,
};

/// Name of this cache in `Cache-Status`.
pub const CACHE_NAME: &str = "tollgate";
/// Longest list of `Vary` names (joined with commas) an entry may have.
pub const MAX_VARY_BYTES: usize = 256;
/// Longest purge path or prefix accepted.
pub const MAX_PURGE_TARGET: usize = 1024;
/// Header carrying the purge key.
pub const PURGE_KEY_HEADER: &str = "x-tollgate-purge-key";

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "cache-status",
    "proxy-connection",
    // added by Envoy for this response only
    "x-envoy-upstream-service-time",
];

/// Headers a 304 carries (RFC 9110 15.4.5).
const NOT_MODIFIED_HEADERS: &[&str] = &[
    "cache-control",
    "content-location",
    "date",
    "etag",
    "expires",
    "vary",
    "last-modified",
];

/// A background refresh the root performs (stale-while-revalidate).
#[derive(Debug, Clone)]
pub struct RefreshJob {
    /// The entry as it was found.
    pub found: Found,
    /// Its URL hash.
    pub url_hash: u64,
    /// Upstream.
    pub refresh: Refresh,
    /// Path and query as the client sent them.
    pub path: String,
    /// Authority.
    pub authority: String,
    /// Request headers that the entry varies on (sent with the refresh).
    pub vary_headers: Vec<(String, String)>,
    /// Configured key headers (to store the answer under the same variant).
    pub key_headers: Vec<String>,
    /// The storing request carried `Authorization`.
    pub auth: bool,
    /// Set-Cookie handling.
    pub set_cookie: SetCookie,
    /// Purge sequence number when the refresh was started.
    pub purge_seq: u64,
}

/// What every request of a VM shares.
pub struct Worker {
    /// Compiled configuration.
    pub config: Compiled,
    /// The store's geometry.
    pub store: Store,
    /// The filter's metrics.
    pub metrics: Metrics,
    /// This worker's copies of entries it read (`worker_copy_bytes`).
    pub copies: LocalCopies,
    /// Refresh jobs queued by requests, started by the root on its next tick.
    pub jobs: RefCell<Vec<RefreshJob>>,
    /// Misses being fetched on this worker: URL hash -> requests waiting for that fetch.
    pub inflight: RefCell<HashMap<u64, Vec<u32>>>,
    /// Waiting requests to wake on the next tick (their fetch finished).
    pub wake_queue: RefCell<Vec<u32>>,
    /// Misses being fetched by another worker: URL hash -> requests of this worker waiting for
    /// that fetch (checked on every tick through the shared lead record).
    pub remote: RefCell<HashMap<u64, Vec<u32>>>,
}

impl Worker {
    fn new(config: Compiled) -> Worker {
        Worker {
            store: Store {
                sets: config.sets,
                ways: config.ways,
                max_entry_bytes: config.max_entry_bytes,
            },
            copies: LocalCopies::new(config.worker_copy_bytes),
            config,
            metrics: Metrics::new("cache"),
            jobs: RefCell::new(Vec::new()),
            inflight: RefCell::new(HashMap::new()),
            wake_queue: RefCell::new(Vec::new()),
            remote: RefCell::new(HashMap::new()),
        }
    }
}

/// Per-VM state: the compiled configuration, metrics and background refreshes.
pub struct CacheRoot {
    shared: Rc<Worker>,
    pending: HashMap<u32, RefreshJob>,
    /// Usage scan: next set, and the sums so far of this pass.
    scan: (u32, u64, u64),
}

impl RootFilter for CacheRoot {
    type Filter = CacheFilter;
    const NAME: &'static str = "cache";
    // A miss stores the response (headers and body); the request body is never read.
    // `on_done` releases what a request that ended held.
    const HOOKS: tollgate_common::filter::Hooks = tollgate_common::filter::Hooks {
        response_headers: true,
        response_body: true,
        done: true,
        ..tollgate_common::filter::Hooks::NONE
    };

    fn new(_context_id: u32) -> Self {
        CacheRoot {
            shared: Rc::new(Worker::new(Compiled::default())),
            pending: HashMap::new(),
            scan: (0, 0, 0),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config = Config::parse(configuration)?.compile()?;
        if !config.rules.0.is_empty() {
            host.set_tick_period(Duration::from_millis(TICK_MS));
            init_lead_records(host);
        }
        self.shared = Rc::new(Worker::new(config));
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        let jobs: Vec<RefreshJob> = self.shared.jobs.borrow_mut().drain(..).collect();
        for job in jobs {
            self.start_refresh(host, job);
        }
        self.check_remote_fetches(host);
        let woken: Vec<u32> = self.shared.wake_queue.borrow_mut().drain(..).collect();
        for id in woken {
            if !host.wake(id, WAKE_FETCHED) {
                log::debug!("cache: collapsed request {id} was gone before its wake");
            }
        }
        // The usage gauges, from the set records, a bounded number of sets per tick.
        let store = self.shared.store;
        let (from, bytes, entries) = self.scan;
        let to = from.saturating_add(SCAN_SETS_PER_TICK).min(store.sets);
        let (b, e) = store.usage_of(host, from, to);
        if to >= store.sets {
            self.shared.metrics.gauge_set(host, "bytes", bytes + b);
            self.shared.metrics.gauge_set(host, "entries", entries + e);
            self.scan = (0, 0, 0);
        } else {
            self.scan = (to, bytes + b, entries + e);
        }
    }

    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse) {
        let Some(job) = self.pending.remove(&token) else {
            return;
        };
        self.finish_refresh(host, job, response);
    }

    fn create_filter(&self, context_id: u32) -> CacheFilter {
        CacheFilter {
            context_id,
            shared: self.shared.clone(),
            state: State::Pass,
            rule: None,
            url: None,
            request: Vec::new(),
            is_head: false,
            no_store: false,
            directives: RequestDirectives::default(),
            capture: None,
            purge_seq: 0,
            leading: None,
            unstored: false,
            collapsed: false,
        }
    }
}

const TICK_MS: u64 = 50;
/// Wake reason: the fetch a collapsed request waited for has finished.
const WAKE_FETCHED: u32 = 1;
/// Most requests that wait for one fetch; more go upstream themselves.
const MAX_WAITERS: usize = 1024;
const SCAN_SETS_PER_TICK: u32 = 128;
/// Lead records (`tc.lead.<n>`): which URL a worker is fetching, so that the other workers'
/// misses of it wait (#14.13).
const LEAD_BUCKETS: u64 = 1024;
/// A lead record older than this is ignored (its fetch is taken to have failed).
const LEAD_MS: u64 = 30_000;
/// How long misses of a URL whose last response could not be stored skip collapsing.
const PASS_MS: u64 = 30_000;

fn lead_key(url_hash: u64) -> String {
    let mut key = String::with_capacity(16);
    key.push_str("tc.lead.");
    push_u64(&mut key, url_hash % LEAD_BUCKETS);
    key
}

/// The clock (ms) and the lead record as read once on a miss.
type LeadRead = (u64, (Option<LeadRecord>, Option<u32>));

/// A lead record: a worker fetches the URL (`pass: false`), or the last fetch of the URL gave a
/// response that could not be stored (`pass: true`): until `until`, its misses go upstream at
/// once instead of waiting for one another (Varnish's "hit-for-miss").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeadRecord {
    hash: u64,
    until: u64,
    pass: bool,
}

impl LeadRecord {
    fn live_for(&self, url_hash: u64, now_ms: u64) -> bool {
        self.hash == url_hash && self.until > now_ms
    }

    fn bytes(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(17);
        value.extend_from_slice(&self.hash.to_le_bytes());
        value.extend_from_slice(&self.until.to_le_bytes());
        if self.pass {
            value.push(1);
        }
        value
    }
}

/// The lead record of a URL's bucket, and its CAS.
fn read_lead(host: &dyn Host, url_hash: u64) -> (Option<LeadRecord>, Option<u32>) {
    match host.shared_get(&lead_key(url_hash)) {
        Ok(Some((bytes, cas))) => {
            let rec = bytes
                .get(..16)
                .and_then(|b| Some((b.get(..8)?.try_into().ok()?, b.get(8..)?.try_into().ok()?)))
                .map(|(a, b): ([u8; 8], [u8; 8])| LeadRecord {
                    hash: u64::from_le_bytes(a),
                    until: u64::from_le_bytes(b),
                    pass: bytes.get(16) == Some(&1),
                });
            (rec, Some(cas))
        }
        _ => (None, None),
    }
}

/// Create the lead records that do not exist yet, so that every later write of one is a
/// compare-and-swap: Envoy applies a CAS only to an existing key, so two workers taking the
/// lead of a never-written bucket would both win.
fn init_lead_records(host: &mut dyn Host) {
    for n in 0..LEAD_BUCKETS {
        let key = format!("tc.lead.{n}");
        if matches!(host.shared_get(&key), Ok(None)) {
            let _ = host.shared_set(&key, b"", None);
        }
    }
}

/// Is another fetch of this URL under way (a live lead record names it)?
fn lead_active(host: &dyn Host, url_hash: u64, now_ms: u64) -> bool {
    matches!(read_lead(host, url_hash).0, Some(r) if !r.pass && r.live_for(url_hash, now_ms))
}

impl CacheRoot {
    /// Wake the requests that wait for another worker's fetch once that fetch is over (its
    /// lead record is gone, taken by another URL, or expired).
    fn check_remote_fetches(&mut self, host: &mut dyn Host) {
        if self.shared.remote.borrow().is_empty() {
            return;
        }
        let now = millis(host.now());
        let mut remote = self.shared.remote.borrow_mut();
        let done: Vec<u64> = remote
            .keys()
            .copied()
            .filter(|h| !lead_active(host, *h, now))
            .collect();
        for h in done {
            if let Some(ids) = remote.remove(&h) {
                self.shared.wake_queue.borrow_mut().extend(ids);
            }
        }
    }

    fn start_refresh(&mut self, host: &mut dyn Host, mut job: RefreshJob) {
        job.purge_seq = self.shared.store.purges(host).seq;
        let (path, query) = split_query(&job.path);
        let rest = path
            .strip_prefix(job.refresh.strip_prefix.as_str())
            .unwrap_or(path);
        let mut upstream = format!("{}{}", job.refresh.add_prefix, rest);
        if upstream.is_empty() {
            upstream.push('/');
        }
        if !query.is_empty() {
            upstream.push('?');
            upstream.push_str(query);
        }
        let meta = &job.found.entry.meta;
        let etag = header(&meta.headers, "etag");
        let last_modified = header(&meta.headers, "last-modified");
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", &upstream),
            (":authority", &job.authority),
        ];
        for (k, v) in &job.vary_headers {
            headers.push((k, v));
        }
        if let Some(e) = etag.as_deref() {
            headers.push(("if-none-match", e));
        }
        if let Some(lm) = last_modified.as_deref() {
            headers.push(("if-modified-since", lm));
        }
        let call = HttpCall {
            cluster: &job.refresh.cluster,
            headers,
            body: None,
            timeout: job.refresh.timeout,
        };
        match host.http_call(&call) {
            Ok(token) => {
                self.pending.insert(token, job);
            }
            Err(e) => {
                log::warn!("cache: background refresh of {} not started: {e}", meta.url);
                self.shared.metrics.count(host, "refresh_failures", 1);
            }
        }
    }

    fn finish_refresh(&mut self, host: &mut dyn Host, job: RefreshJob, response: CallResponse) {
        let shared = self.shared.clone();
        let now = host.now();
        let old = &job.found.entry;
        let (status, headers, body) = match response.status() {
            Some(304) => {
                let headers = merge_not_modified(&old.meta.headers, &response.headers);
                (old.meta.status, headers, old.body.clone())
            }
            // The refresh carries no credentials: an authentication answer says nothing about
            // the resource, so it is a failure like a 5xx.
            Some(s) if s < 500 && !matches!(s, 401 | 403 | 407 | 429) => (
                s,
                stored_headers(&response.headers, job.set_cookie),
                response.body.clone(),
            ),
            other => {
                log::info!(
                    "cache: background refresh of {} failed ({other:?}); the stale entry stays",
                    old.meta.url
                );
                shared.metrics.count(host, "refresh_failures", 1);
                return;
            }
        };
        if job.set_cookie == SetCookie::Bypass && header(&response.headers, "set-cookie").is_some()
        {
            shared.metrics.count(host, "refresh_failures", 1);
            return;
        }
        let Some(vary) =
            vary_names(&all(&headers, "vary")).filter(|v| v.join(",").len() <= MAX_VARY_BYTES)
        else {
            shared.store.invalidate_url(host, job.url_hash);
            return;
        };
        let storing = StoringRequest {
            authorization: job.auth,
        };
        let view = targeted_view(&headers, &shared.config.targeted);
        let Ok(f) = facts(status, &view, storing, millis(now)) else {
            // The origin no longer allows storing it: drop the stale entry.
            shared.store.invalidate_url(host, job.url_hash);
            return;
        };
        let v = crate::key::variant_hash(&job.vary_headers, &job.key_headers, &vary);
        let entry = Entry {
            meta: Meta {
                g: 0,
                url: old.meta.url.clone(),
                host: old.meta.host.clone(),
                path: old.meta.path.clone(),
                v,
                status,
                headers,
                auth: job.auth,
                f,
            },
            body,
        };
        match shared
            .store
            .put(host, job.url_hash, &vary, entry, now, job.purge_seq)
        {
            Ok(st) => {
                shared.metrics.count(host, "refreshes", 1);
                shared.metrics.count(host, "stores", 1);
                if st.evicted {
                    shared.metrics.count(host, "evictions", 1);
                }
            }
            Err(PutError::TooLarge) => {
                // The fresh answer no longer fits: the stale entry must not outlive it.
                shared.metrics.count(host, "too_large", 1);
                shared.store.invalidate_url(host, job.url_hash);
            }
            Err(PutError::Lost) => shared.metrics.count(host, "refresh_failures", 1),
        }
    }
}

/// A response being captured for the store.
struct Capture {
    status: u16,
    headers: Vec<(String, String)>,
    vary: Vec<String>,
    auth: bool,
    facts: Facts,
    body: Vec<u8>,
    /// When the response headers arrived: the entry's response time and its stored-at time.
    at: std::time::SystemTime,
}

/// Where a request stands.
enum State {
    /// Untouched: no rule, or a disabled one.
    Pass,
    /// Forwarded without lookup; the text is the `Cache-Status` `fwd` value.
    Bypass(&'static str),
    /// An unsafe method: invalidate the URL when it succeeds.
    Unsafe,
    /// Nothing usable in the cache; `fwd` value.
    Miss(&'static str),
    /// A stale entry is being revalidated upstream.
    Revalidate {
        found: Box<Found>,
        fwd: &'static str,
        client_conditional: Vec<(String, String)>,
    },
    /// Answered (or decided); nothing more to do.
    Done,
    /// Waiting for another request of this worker that fetches the same URL.
    Waiting,
}

/// Per-request state.
pub struct CacheFilter {
    context_id: u32,
    shared: Rc<Worker>,
    state: State,
    rule: Option<usize>,
    /// Shared so that the lookup holds it without copying its strings.
    url: Option<Rc<UrlKey>>,
    request: Vec<(String, String)>,
    is_head: bool,
    no_store: bool,
    /// The request's `Cache-Control` (and `Pragma`), read with its headers.
    directives: RequestDirectives,
    capture: Option<Capture>,
    purge_seq: u64,
    /// This request fetches a missing URL that other requests may wait for.
    leading: Option<u64>,
    /// The response this request fetched could not be stored (not storable, too large).
    unstored: bool,
    /// This request already waited for another's fetch (it waits at most once).
    collapsed: bool,
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// The first value of a header, borrowed.
fn first<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A response's `:status` from its header map (0 when missing or malformed).
fn status_of(headers: &[(String, String)]) -> u16 {
    first(headers, ":status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Is a response header per-hop, i.e. never stored (RFC 9111 3.1): the hop-by-hop fields,
/// the ones Envoy adds for one response, and the names `Connection` lists.
fn per_hop(name: &str, connection: &[String]) -> bool {
    name.starts_with(':')
        || HOP_BY_HOP.contains(&name)
        || connection.iter().any(|c| c.as_str() == name)
}

/// The field names a response's `Connection` lists (lower case).
fn connection_names(headers: &[(String, String)]) -> Vec<String> {
    all(headers, "connection")
        .into_iter()
        .flat_map(list_members)
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Response headers as stored: no pseudo-headers, no per-hop headers, no `Set-Cookie` when
/// stripping.
fn stored_headers(headers: &[(String, String)], set_cookie: SetCookie) -> Vec<(String, String)> {
    let connection = connection_names(headers);
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| !per_hop(k, &connection))
        .filter(|(k, _)| set_cookie == SetCookie::Bypass || k != "set-cookie")
        .map(|(k, v)| (k, v.clone()))
        .collect()
}

/// [`stored_headers`] of headers the caller owns: the names lower-cased in place and the
/// per-hop (and stripped `Set-Cookie`) fields removed, nothing copied.
fn into_stored_headers(
    mut headers: Vec<(String, String)>,
    set_cookie: SetCookie,
) -> Vec<(String, String)> {
    let connection = connection_names(&headers);
    for (k, _) in headers.iter_mut() {
        k.make_ascii_lowercase();
    }
    headers.retain(|(k, _)| {
        !per_hop(k, &connection) && (set_cookie == SetCookie::Bypass || k != "set-cookie")
    });
    headers
}

/// Stored headers updated with those of a 304 or of a `HEAD` 200 (RFC 9111 3.2, 4.3.4,
/// 4.3.5): every field of the new response replaces the stored one, except the per-hop ones,
/// `Content-Length` (the stored body is kept) and `Set-Cookie` (never stored from an update).
fn merge_not_modified(
    stored: &[(String, String)],
    fresh: &[(String, String)],
) -> Vec<(String, String)> {
    let connection = connection_names(fresh);
    let update: Vec<(String, String)> = fresh
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(k, _)| !per_hop(k, &connection) && k != "content-length" && k != "set-cookie")
        .collect();
    let mut out: Vec<(String, String)> = stored
        .iter()
        .filter(|(k, _)| k != "age" && !update.iter().any(|(u, _)| u == k))
        .cloned()
        .collect();
    out.extend(update);
    out
}

/// Does a client's conditional request match the entry (so that 304 is the answer)?
/// `If-None-Match` (weak comparison, `*`) wins over `If-Modified-Since`.
/// A request without either (most hits) reads nothing of the entry.
fn client_not_modified(request: &[(String, String)], entry: &[(String, String)]) -> bool {
    if let Some(inm) = first(request, "if-none-match") {
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return match first(entry, "etag") {
            Some(e) => inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(e)),
            None => false,
        };
    }
    let Some(ims) = first(request, "if-modified-since").and_then(http_date) else {
        return false;
    };
    // Without `Last-Modified`, the entry's `Date` (RFC 9110 13.1.3).
    first(entry, "last-modified")
        .or_else(|| first(entry, "date"))
        .and_then(http_date)
        .is_some_and(|lm| lm <= ims)
}

/// May a `HEAD` answer freshen this entry (RFC 9111 4.3.5)? Its validators must not
/// contradict the stored ones.
fn same_validators(entry: &Entry, head: &[(String, String)]) -> bool {
    ["etag", "last-modified"].iter().all(|name| {
        match (header(&entry.meta.headers, name), header(head, name)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    })
}

/// Does an `If-Range` validator match the stored response (RFC 9110 13.1.5)? An entity tag by
/// strong comparison, or a date equal to the `Last-Modified`.
fn if_range_matches(cond: &str, stored: &[(String, String)]) -> bool {
    let cond = cond.trim();
    if cond.starts_with('"') || cond.starts_with("W/") {
        return !cond.starts_with("W/")
            && header(stored, "etag").is_some_and(|e| !e.starts_with("W/") && e.trim() == cond);
    }
    match (
        http_date(cond),
        header(stored, "last-modified").and_then(|l| http_date(&l)),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The `504` of `only-if-cached` (RFC 9111 5.2.1.7).
fn only_if_cached_reply(detail: &str, status_params: &str) -> LocalReply {
    Problem::new(504)
        .detail(detail)
        .into_reply()
        .with_header("cache-status", cache_status(status_params))
}

/// `n` in decimal (the `Age` of every answer from the cache).
fn decimal(n: u64) -> String {
    let mut out = String::with_capacity(20);
    push_u64(&mut out, n);
    out
}

fn cache_status(params: &str) -> String {
    let mut value = String::with_capacity(CACHE_NAME.len() + 2 + params.len());
    value.push_str(CACHE_NAME);
    value.push_str("; ");
    value.push_str(params);
    value
}

impl CacheFilter {
    fn rule(&self) -> Option<&Rule> {
        self.rule.and_then(|i| self.shared.config.rules.0.get(i))
    }

    /// The answer from an entry: 304 when the client's validators match; 206 / 416 for a
    /// single `Range` of a stored complete 200; else the stored response (HEAD: Envoy sends no
    /// body). `cache_status`: the whole `Cache-Status` value ([`cache_status`]).
    fn answer(&self, entry: Entry, age: u64, cache_status: String) -> LocalReply {
        let not_modified = client_not_modified(&self.request, &entry.meta.headers);
        let range = if not_modified {
            ByteRange::Ignore
        } else {
            self.requested_range(&entry)
        };
        let status = match range {
            _ if not_modified => 304,
            ByteRange::Range { .. } => 206,
            ByteRange::Unsatisfiable => 416,
            ByteRange::Ignore => entry.meta.status,
        };
        let mut reply = LocalReply::new(status);
        reply.headers.reserve(entry.meta.headers.len() + 3);
        let config = &self.shared.config;
        // The entry is this reply's: its header strings and body move into it, uncopied.
        for (k, v) in entry.meta.headers {
            if k == "age" || (not_modified && !NOT_MODIFIED_HEADERS.contains(&k.as_str())) {
                continue;
            }
            if config.strip_targeted && config.targeted.contains(&k) {
                continue;
            }
            reply.headers.push((k, v));
        }
        reply = reply
            .with_header("age", decimal(age))
            .with_header("cache-status", cache_status);
        let len = entry.body.len();
        match range {
            _ if not_modified => reply,
            ByteRange::Range { first, last } => {
                let (a, b) = (
                    usize::try_from(first).unwrap_or(len),
                    usize::try_from(last).unwrap_or(len),
                );
                let part = entry.body.get(a..=b).unwrap_or_default().to_vec();
                reply
                    .with_header("content-range", format!("bytes {first}-{last}/{len}"))
                    .with_body(part)
            }
            ByteRange::Unsatisfiable => {
                reply.with_header("content-range", format!("bytes */{len}"))
            }
            ByteRange::Ignore => reply.with_body(entry.body),
        }
    }

    /// The single byte range a `GET` asks of a stored complete `200` (RFC 9110 14.2), with
    /// `If-Range` (14.3) honoured; anything else is answered whole.
    fn requested_range(&self, entry: &Entry) -> ByteRange {
        if self.is_head || entry.meta.status != 200 {
            return ByteRange::Ignore;
        }
        let Some(range) = header(&self.request, "range") else {
            return ByteRange::Ignore;
        };
        if let Some(cond) = header(&self.request, "if-range") {
            if !if_range_matches(&cond, &entry.meta.headers) {
                return ByteRange::Ignore;
            }
        }
        byte_range(&range, u64::try_from(entry.body.len()).unwrap_or(u64::MAX))
    }

    /// The refusal of a purge request that may not purge (method, throttled client, key), if
    /// any. Failed attempts are counted per client; past the limit, 429 before any hashing.
    fn purge_refusal(&self, host: &mut dyn Host, path: &str) -> Option<LocalReply> {
        let method = host.method();
        if method != "POST" && method != "PURGE" {
            return Some(
                Problem::new(405)
                    .detail("use POST (or PURGE) with ?url=/path or ?prefix=/path/")
                    .instance(split_query(path).0)
                    .into_reply()
                    .with_header("allow", "POST, PURGE"),
            );
        }
        let purge = self.shared.config.purge.as_ref()?;
        let client = purge
            .failure_limit
            .as_ref()
            .and_then(|_| tollgate_common::throttle::client_address(host));
        if let (Some(limit), Some(c)) = (&purge.failure_limit, &client) {
            if let Some(retry_after) = limit.refused(host, c, host.now_secs()) {
                self.shared.metrics.count(host, "purge_throttled", 1);
                return Some(tollgate_common::throttle::FailureLimit::reply(
                    "https://tollgate.dev/problems/cache/too_many_failures",
                    split_query(path).0,
                    retry_after,
                ));
            }
        }
        let failed = |host: &mut dyn Host| {
            if let (Some(limit), Some(c)) = (&purge.failure_limit, &client) {
                let now = host.now_secs();
                limit.record(host, c, now);
            }
        };
        let Some(key) = host.header(MapKind::RequestHeaders, PURGE_KEY_HEADER) else {
            failed(host);
            return Some(
                Problem::new(401)
                    .detail(format!(
                        "the purge endpoint needs the `{PURGE_KEY_HEADER}` header"
                    ))
                    .into_reply(),
            );
        };
        if !purge.key_matches(&key) {
            failed(host);
            log::warn!("[{}] cache: purge refused: wrong key", self.context_id);
            return Some(Problem::new(403).detail("wrong purge key").into_reply());
        }
        None
    }

    fn purge(&mut self, host: &mut dyn Host) -> Decision {
        let Some(purge) = self.shared.config.purge.as_ref() else {
            return Decision::Continue;
        };
        let tag_enabled = purge.tag_header.is_some();
        self.state = State::Done;
        let path = host.path();
        if let Some(refusal) = self.purge_refusal(host, &path) {
            return Decision::Respond(refusal);
        }
        let (_, query) = split_query(&path);
        let tag = query_param(query, "tag");
        if let Some(tag) = tag {
            if query_param(query, "url").is_some() || query_param(query, "prefix").is_some() {
                return Decision::Respond(
                    Problem::new(400)
                        .detail(
                            "give exactly one of the query parameters `url`, `prefix` and `tag`",
                        )
                        .into_reply(),
                );
            }
            return self.purge_tag(host, tag_enabled, tag);
        }
        let (target, prefix) =
            match (query_param(query, "url"), query_param(query, "prefix")) {
                (Some(u), None) => (split_query(&u).0.to_string(), false),
                (None, Some(p)) => (p, true),
                _ => return Decision::Respond(
                    Problem::new(400)
                        .detail(
                            "give exactly one of the query parameters `url`, `prefix` and `tag`",
                        )
                        .into_reply(),
                ),
            };
        if !target.starts_with('/') {
            return Decision::Respond(
                Problem::new(400)
                    .detail("`url` and `prefix` are paths starting with `/`")
                    .into_reply(),
            );
        }
        let host_filter = query_param(query, "host").map(|h| h.to_ascii_lowercase());
        if target.len() > MAX_PURGE_TARGET || host_filter.as_ref().is_some_and(|h| h.len() > 255) {
            // Keeps the purge record (64 rules) small.
            return Decision::Respond(
                Problem::new(400)
                    .detail(format!(
                        "the path is longer than {MAX_PURGE_TARGET} bytes (or the host than 255)"
                    ))
                    .into_reply(),
            );
        }
        let rule = PurgeRule {
            host: host_filter.clone(),
            path: target.clone(),
            prefix,
            at: millis(host.now()),
            seq: 0,
            tag: None,
        };
        let body = serde_json::json!({
            "purged": target,
            "kind": if prefix { "prefix" } else { "path" },
            "host": host_filter,
        });
        self.record_purge(host, rule, &body)
    }

    /// Add a purge rule to the shared record and answer with `body` (or `503`).
    fn record_purge(
        &mut self,
        host: &mut dyn Host,
        rule: PurgeRule,
        body: &serde_json::Value,
    ) -> Decision {
        if !self.shared.store.add_purge(host, rule) {
            return Decision::Respond(
                Problem::new(503)
                    .detail("the purge could not be recorded; retry")
                    .into_reply(),
            );
        }
        self.shared.metrics.count(host, "purges", 1);
        log::info!("[{}] cache: purged {body}", self.context_id);
        Decision::Respond(
            LocalReply::new(200)
                .with_header("content-type", "application/json")
                .with_header("cache-control", "no-store")
                .with_body(serde_json::to_vec(body).unwrap_or_default()),
        )
    }

    /// `?tag=T`: every entry whose tag header names `T` is gone (on every worker: the rule is
    /// in the shared purge record that each lookup reads).
    fn purge_tag(&mut self, host: &mut dyn Host, enabled: bool, tag: String) -> Decision {
        if !enabled {
            return Decision::Respond(
                Problem::new(400)
                    .detail("tag purge is off: configure `purge.tag_header`")
                    .into_reply(),
            );
        }
        if tag.is_empty()
            || tag.len() > 255
            || tag.contains(|c: char| c == ',' || c.is_whitespace())
        {
            return Decision::Respond(
                Problem::new(400)
                    .detail("a tag is 1 to 255 bytes without spaces or commas")
                    .into_reply(),
            );
        }
        let rule = PurgeRule {
            host: None,
            path: String::new(),
            prefix: false,
            at: millis(host.now()),
            seq: 0,
            tag: Some(tag.clone()),
        };
        let body = serde_json::json!({"purged": tag, "kind": "tag"});
        self.record_purge(host, rule, &body)
    }

    /// Look the request up and decide: a hit, a stale answer with a background refresh, a
    /// revalidation, a miss (possibly waiting for another request's fetch), or `504` for
    /// `only-if-cached`.
    fn lookup(&mut self, host: &mut dyn Host) -> Decision {
        let Some(url) = self.url.clone() else {
            return Decision::Continue;
        };
        let req = self.directives;
        let found = match self.find(host, &url) {
            Ok(found) => found,
            Err(fwd) => return self.on_miss(host, &url, fwd, req.cc.only_if_cached),
        };
        let background = self.rule().is_some_and(|r| r.refresh.is_some());
        let now = millis(host.now());
        match freshness(&found.entry.meta.f, &req, now, background) {
            Verdict::Fresh { age, ttl } => {
                self.shared.metrics.count(host, "hits", 1);
                let collapsed = if self.collapsed { "; collapsed" } else { "" };
                // `Cache-Status` written once, without a `params` string in between.
                let mut status = String::with_capacity(CACHE_NAME.len() + 40);
                status.push_str(CACHE_NAME);
                status.push_str("; hit; ttl=");
                if ttl < 0 {
                    status.push('-');
                }
                push_u64(&mut status, ttl.unsigned_abs());
                status.push_str(collapsed);
                let reply = self.answer(found.entry, age, status);
                self.state = State::Done;
                Decision::Respond(reply)
            }
            Verdict::StaleWhileRevalidate { age, stale_by } => {
                self.serve_stale_and_refresh(host, found, age, stale_by)
            }
            Verdict::Revalidate if req.cc.only_if_cached => {
                self.shared.metrics.count(host, "misses", 1);
                self.state = State::Done;
                Decision::Respond(only_if_cached_reply(
                    "only-if-cached: the cached response is stale",
                    "fwd=stale; detail=only-if-cached",
                ))
            }
            Verdict::Revalidate => self.revalidate(host, found, req.no_cache),
        }
    }

    /// The entry for this request, or the `fwd` reason of a miss.
    fn find(&mut self, host: &mut dyn Host, url: &UrlKey) -> Result<Box<Found>, &'static str> {
        let shared = Rc::clone(&self.shared);
        let key_headers = self
            .rule
            .and_then(|i| shared.config.rules.0.get(i))
            .map_or(&[][..], |r| r.key_headers.as_slice());
        let store = shared.store;
        let (lookup, pseq) =
            store.lookup(host, url.hash, &self.request, key_headers, &shared.copies);
        // The purge sequence number a response fetched now is stored with: the set's (no
        // higher than the purge record's, and at least that of every finished purge), else
        // the purge record's.
        let found = match lookup {
            // A 64-bit hash collision of two URLs reads as a miss.
            Lookup::Hit(found) if found.entry.meta.url == url.url => found,
            other => {
                self.purge_seq = match pseq {
                    UNKNOWN_PSEQ => store.purges(host).seq,
                    known => known,
                };
                return Err(match other {
                    Lookup::VaryMiss => "vary-miss",
                    _ => "uri-miss",
                });
            }
        };
        let Some(purges) = found.purges.as_ref() else {
            // No purge since the entry was fetched: nothing to check.
            self.purge_seq = pseq;
            return Ok(found);
        };
        self.purge_seq = purges.seq;
        if self.purged_by_tag(&found, purges) {
            store.invalidate_way(host, found.set, found.way, found.record.g);
            return Err("uri-miss");
        }
        store.mark_unpurged(host, &found);
        Ok(found)
    }

    /// Was this entry purged by tag (its tag header names a tag purged after it was fetched)?
    fn purged_by_tag(&self, found: &Found, purges: &Purges) -> bool {
        let Some(name) = self
            .shared
            .config
            .purge
            .as_ref()
            .and_then(|p| p.tag_header.as_deref())
        else {
            return false;
        };
        if purges.rules.iter().all(|r| r.tag.is_none()) {
            return false;
        }
        let tags = all(&found.entry.meta.headers, name)
            .into_iter()
            .flat_map(|v| v.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|t| !t.is_empty());
        purges.purged_by_tag(tags, found.record.p)
    }

    /// Another worker fetches this URL: wait for it (on this worker's tick), within the same
    /// bounds as a local wait. Only when this worker is not fetching it itself. `lead` is set
    /// to the clock and the lead record read here, so that taking the lead reads neither again.
    fn wait_for_remote_fetch(
        &mut self,
        host: &mut dyn Host,
        url: &UrlKey,
        lead: &mut Option<LeadRead>,
    ) -> bool {
        if self.shared.inflight.borrow().contains_key(&url.hash) {
            return false;
        }
        let now = millis(host.now());
        let read = read_lead(host, url.hash);
        let active = matches!(read.0, Some(r) if !r.pass && r.live_for(url.hash, now));
        *lead = Some((now, read));
        active && self.join_remote(url.hash)
    }

    /// Wait (on this worker's tick) for another worker's fetch of the URL, unless too many do.
    fn join_remote(&self, url_hash: u64) -> bool {
        let mut remote = self.shared.remote.borrow_mut();
        let waiters = remote.entry(url_hash).or_default();
        if waiters.len() >= MAX_WAITERS {
            return false;
        }
        waiters.push(self.context_id);
        true
    }

    /// Record in shared data that this worker fetches the URL. False when another worker took
    /// the lead of this URL between our read and our write (the CAS failed): then that worker
    /// fetches and this request waits for it. A bucket busy with another URL, or a store
    /// error, means that this worker fetches without a record.
    fn take_lead(&self, host: &mut dyn Host, url_hash: u64, lead: Option<LeadRead>) -> bool {
        let (now, (rec, cas)) = match lead {
            Some(read) => read,
            None => (millis(host.now()), read_lead(host, url_hash)),
        };
        if matches!(rec, Some(r) if r.until > now && r.hash != url_hash) {
            return true;
        }
        let value = LeadRecord {
            hash: url_hash,
            until: now.saturating_add(LEAD_MS),
            pass: false,
        };
        match host.shared_set(&lead_key(url_hash), &value.bytes(), cas) {
            Err(SharedError::CasMismatch) => !lead_active(host, url_hash, now),
            _ => true,
        }
    }

    /// Nothing usable stored: wait for another request's fetch of the URL (once), fetch it
    /// ourselves, or answer `only-if-cached` with 504.
    fn on_miss(
        &mut self,
        host: &mut dyn Host,
        url: &UrlKey,
        fwd: &'static str,
        only_if_cached: bool,
    ) -> Decision {
        if only_if_cached {
            self.shared.metrics.count(host, "misses", 1);
            self.state = State::Done;
            return Decision::Respond(only_if_cached_reply(
                "only-if-cached: not in the cache",
                &format!("fwd={fwd}; detail=only-if-cached"),
            ));
        }
        let mut lead = None;
        if !self.collapsed && self.wait_for_remote_fetch(host, url, &mut lead) {
            self.state = State::Waiting;
            return Decision::Pause;
        }
        if matches!(lead, Some((now, (Some(r), _))) if r.pass && r.live_for(url.hash, now)) {
            // the last fetch of this URL could not be stored: no waiting for one another
            self.shared.metrics.count(host, "misses", 1);
            self.state = State::Miss(fwd);
            return Decision::Continue;
        }
        // Collapse concurrent misses of one URL on this worker: the first fetches, the others
        // wait for it (once) and look again.
        let mut inflight = self.shared.inflight.borrow_mut();
        match inflight.get_mut(&url.hash) {
            Some(waiters) if !self.collapsed && waiters.len() < MAX_WAITERS => {
                waiters.push(self.context_id);
                self.state = State::Waiting;
                return Decision::Pause;
            }
            Some(_) => {}
            None if !self.is_head && !self.no_store => {
                inflight.insert(url.hash, Vec::new());
                self.leading = Some(url.hash);
            }
            None => {}
        }
        drop(inflight);
        if self.leading.is_some() && !self.take_lead(host, url.hash, lead) {
            // another worker won the lead in the same instant: wait for its fetch instead
            self.leading = None;
            self.shared.inflight.borrow_mut().remove(&url.hash);
            if !self.collapsed && self.join_remote(url.hash) {
                self.state = State::Waiting;
                return Decision::Pause;
            }
        }
        self.shared.metrics.count(host, "misses", 1);
        self.state = State::Miss(fwd);
        Decision::Continue
    }

    /// Serve a stale entry inside its `stale-while-revalidate` window and queue one
    /// background refresh (the way's refresh lock makes it one across workers).
    fn serve_stale_and_refresh(
        &mut self,
        host: &mut dyn Host,
        found: Box<Found>,
        age: u64,
        stale_by: u64,
    ) -> Decision {
        let m = &self.shared.metrics;
        m.count(host, "hits", 1);
        m.count(host, "stale_served", 1);
        let ttl = -i64::try_from(stale_by).unwrap_or(i64::MAX);
        let reply = self.answer(
            found.entry.clone(),
            age,
            cache_status(&format!("hit; ttl={ttl}; detail=stale-while-revalidate")),
        );
        self.state = State::Done;
        let Some(rule) = self.rule() else {
            return Decision::Respond(reply);
        };
        let (Some(refresh), Some(url)) = (rule.refresh.clone(), self.url.as_ref()) else {
            return Decision::Respond(reply);
        };
        let lock_for = refresh.timeout + Duration::from_secs(1);
        let now = host.now();
        if !self.shared.store.lock_refresh(host, &found, now, lock_for) {
            return Decision::Respond(reply);
        }
        let meta = &found.entry.meta;
        let vary = vary_names(&all(&meta.headers, "vary")).unwrap_or_default();
        let key_headers = rule.key_headers.clone();
        let vary_headers: Vec<(String, String)> = self
            .request
            .iter()
            .filter(|(k, _)| vary.contains(k) || key_headers.contains(k))
            .cloned()
            .collect();
        let job = RefreshJob {
            url_hash: url.hash,
            refresh,
            path: host.path(),
            authority: host.authority(),
            auth: meta.auth,
            vary_headers,
            key_headers,
            set_cookie: rule.set_cookie,
            purge_seq: 0,
            found: *found,
        };
        self.shared.jobs.borrow_mut().push(job);
        Decision::Respond(reply)
    }

    /// Revalidate upstream with the entry's validators; the client's own conditional headers
    /// are kept aside and answered by us.
    fn revalidate(
        &mut self,
        host: &mut dyn Host,
        found: Box<Found>,
        request_no_cache: bool,
    ) -> Decision {
        self.shared.metrics.count(host, "revalidations", 1);
        let mut client_conditional = Vec::new();
        for name in ["if-none-match", "if-modified-since"] {
            if let Some(v) = host.header(MapKind::RequestHeaders, name) {
                client_conditional.push((name.to_string(), v));
                host.remove_header(MapKind::RequestHeaders, name);
            }
        }
        if let Some(e) = header(&found.entry.meta.headers, "etag") {
            host.set_header(MapKind::RequestHeaders, "if-none-match", &e);
        }
        if let Some(lm) = header(&found.entry.meta.headers, "last-modified") {
            host.set_header(MapKind::RequestHeaders, "if-modified-since", &lm);
        }
        self.state = State::Revalidate {
            found,
            fwd: if request_no_cache { "request" } else { "stale" },
            client_conditional,
        };
        Decision::Continue
    }

    /// The origin's answer to a revalidation: a `304` (or a `HEAD` 200 with the same
    /// validators) freshens the entry; an error may be answered with the stale entry
    /// (`stale-if-error`). `Ok`: the reply to send; `Err`: the `Cache-Status` params of a
    /// forwarded answer.
    fn on_revalidated(
        &mut self,
        host: &mut dyn Host,
        found: Box<Found>,
        fwd: &'static str,
        client_conditional: Vec<(String, String)>,
        status: u16,
        headers: &[(String, String)],
    ) -> Result<LocalReply, String> {
        let now = host.now();
        let entry = &found.entry;
        if status == 304 || (self.is_head && status == 200 && same_validators(entry, headers)) {
            let fresh = self.freshen(host, entry, headers);
            if status != 304 {
                // HEAD: the origin's own answer goes to the client.
                return Err(format!("fwd={fwd}; fwd-status=200; detail=head-freshened"));
            }
            self.restore_client_conditional(client_conditional);
            let reply = match fresh {
                Some(f) => {
                    let age = f.meta.f.age_at(millis(now));
                    self.answer(f, age, cache_status(&format!("fwd={fwd}; fwd-status=304")))
                }
                None => self.answer(
                    entry.clone(),
                    0,
                    cache_status(&format!("fwd={fwd}; fwd-status=304")),
                ),
            };
            return Ok(reply);
        }
        if status >= 500 || status == 0 {
            let window = self
                .rule()
                .and_then(|r| r.stale_if_error)
                .map(|d| d.as_secs());
            if let Some(age) = stale_if_error(&entry.meta.f, millis(now), window) {
                self.shared.metrics.count(host, "stale_served", 1);
                self.restore_client_conditional(client_conditional);
                let params = format!("fwd={fwd}; fwd-status={status}; detail=stale-if-error");
                return Ok(self.answer(entry.clone(), age, cache_status(&params)));
            }
        }
        if self.is_head && status == 200 {
            // A HEAD whose validators differ: the stored representation is outdated.
            if let Some(url) = self.url.as_ref() {
                self.shared.store.invalidate_url(host, url.hash);
            }
        }
        Err(self.start_capture(host, fwd, status, headers.to_vec()))
    }

    /// Update a stored entry with the header fields of a `304` or `HEAD` answer and store it
    /// again; returns the updated entry (`None` when it may no longer be stored: then it is
    /// dropped).
    fn freshen(
        &mut self,
        host: &mut dyn Host,
        entry: &Entry,
        headers: &[(String, String)],
    ) -> Option<Entry> {
        let now = host.now();
        let url_hash = self.url.as_ref()?.hash;
        let mut fresh = entry.clone();
        fresh.meta.headers = merge_not_modified(&entry.meta.headers, headers);
        let storing = StoringRequest {
            authorization: entry.meta.auth,
        };
        let view = targeted_view(&fresh.meta.headers, &self.shared.config.targeted);
        let Ok(f) = facts(fresh.meta.status, &view, storing, millis(now)) else {
            self.shared.store.invalidate_url(host, url_hash);
            return None;
        };
        fresh.meta.f = f;
        let vary = vary_names(&all(&fresh.meta.headers, "vary")).unwrap_or_default();
        if self
            .shared
            .store
            .put(host, url_hash, &vary, fresh.clone(), now, self.purge_seq)
            .is_ok()
        {
            self.shared.metrics.count(host, "refreshes", 1);
        }
        Some(fresh)
    }

    /// Put back the client's conditional headers (the revalidation replaced them).
    fn restore_client_conditional(&mut self, client_conditional: Vec<(String, String)>) {
        self.request
            .retain(|(k, _)| k != "if-none-match" && k != "if-modified-since");
        self.request.extend(client_conditional);
    }

    /// Decide whether to capture a forwarded response; returns the `Cache-Status` params.
    /// `headers` (the response's, as read) become the stored headers without a copy.
    fn start_capture(
        &mut self,
        host: &mut dyn Host,
        fwd: &str,
        status: u16,
        headers: Vec<(String, String)>,
    ) -> String {
        let mut params = String::with_capacity(48);
        params.push_str("fwd=");
        params.push_str(fwd);
        if fwd == "stale" || fwd == "request" {
            params.push_str(&format!("; fwd-status={status}"));
        }
        let Some(rule) = self.rule() else {
            return params;
        };
        let set_cookie = rule.set_cookie;
        if self.url.is_none() {
            return params;
        }
        let detail = (|| {
            if self.is_head {
                return Some("head");
            }
            if self.no_store {
                return Some("request-no-store");
            }
            if set_cookie == SetCookie::Bypass && first(&headers, "set-cookie").is_some() {
                return Some("set-cookie");
            }
            if let Some(len) = first(&headers, "content-length").and_then(|l| l.parse::<u64>().ok())
            {
                if len > self.shared.config.max_entry_bytes {
                    return Some("too-large");
                }
            }
            None
        })();
        if let Some(d) = detail {
            if d == "too-large" {
                self.shared.metrics.count(host, "too_large", 1);
            }
            return format!("{params}; detail={d}");
        }
        let Some(vary) = vary_names(&all(&headers, "vary")) else {
            return format!("{params}; detail=vary-star");
        };
        if vary.join(",").len() > MAX_VARY_BYTES {
            // The names live in the set record, which must stay small.
            return format!("{params}; detail=vary-too-long");
        }
        // `stored` is promised only when the size is known to fit.
        let length_known = first(&headers, "content-length").is_some();
        let stored = into_stored_headers(headers, set_cookie);
        let auth = first(&self.request, "authorization").is_some();
        let storing = StoringRequest {
            authorization: auth,
        };
        let view = targeted_view(&stored, &self.shared.config.targeted);
        let at = host.now();
        let facts = match facts(status, &view, storing, millis(at)) {
            Ok(f) => f,
            Err(why) => return format!("{params}; detail={why}"),
        };
        self.capture = Some(Capture {
            status,
            headers: stored,
            vary,
            auth,
            facts,
            body: Vec::new(),
            at,
        });
        if length_known {
            params.push_str("; stored");
        }
        params
    }

    /// After a successful unsafe request: drop the target URL, and the `Location` and
    /// `Content-Location` URLs when they are on the same host (RFC 9111 4.4).
    fn invalidate_targets(&mut self, host: &mut dyn Host) {
        let (Some(url), Some(rule)) = (self.url.as_ref(), self.rule()) else {
            return;
        };
        let mut hashes = vec![url.hash];
        let scheme = url.url.split("://").next().unwrap_or("http").to_string();
        for name in ["location", "content-location"] {
            let Some(target) = host.header(MapKind::ResponseHeaders, name) else {
                continue;
            };
            let same_origin = format!("{scheme}://{}", url.host);
            let path = if target.starts_with('/') && !target.starts_with("//") {
                target.as_str()
            } else if let Some(rest) = target.strip_prefix(&same_origin) {
                if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
                    rest
                } else {
                    continue;
                }
            } else {
                continue;
            };
            let path = if path.is_empty() || path.starts_with('?') {
                format!("/{path}")
            } else {
                path.to_string()
            };
            hashes.push(crate::key::url_key(&scheme, &url.host, &path, rule).hash);
        }
        hashes.dedup();
        let mut dropped = 0;
        for h in hashes {
            dropped += self.shared.store.invalidate_url(host, h).0;
        }
        if dropped > 0 {
            self.shared.metrics.count(host, "invalidations", dropped);
        }
    }

    /// The fetch this request led is over (stored or not): wake the requests waiting for it.
    fn release(&mut self, host: &mut dyn Host) {
        let Some(hash) = self.leading.take() else {
            return;
        };
        if let (Some(r), cas) = read_lead(host, hash) {
            if r.hash == hash {
                // an answer that could not be stored makes the next misses go upstream at once
                let value = match self.unstored {
                    true => LeadRecord {
                        hash,
                        until: millis(host.now()).saturating_add(PASS_MS),
                        pass: true,
                    }
                    .bytes(),
                    false => Vec::new(),
                };
                let _ = host.shared_set(&lead_key(hash), &value, cas);
            }
        }
        let waiters = self.shared.inflight.borrow_mut().remove(&hash);
        if let Some(w) = waiters {
            self.shared.wake_queue.borrow_mut().extend(w);
        }
    }

    fn finish_capture(&mut self, host: &mut dyn Host) {
        self.store_capture(host);
        self.release(host);
    }

    fn store_capture(&mut self, host: &mut dyn Host) {
        let Some(c) = self.capture.take() else {
            return;
        };
        let (Some(url), Some(rule)) = (self.url.as_ref(), self.rule()) else {
            return;
        };
        let v = crate::key::variant_hash(&self.request, &rule.key_headers, &c.vary);
        let entry = Entry {
            meta: Meta {
                g: 0,
                url: url.url.clone(),
                host: url.host.clone(),
                path: url.path.clone(),
                v,
                status: c.status,
                headers: c.headers,
                auth: c.auth,
                f: c.facts,
            },
            body: c.body,
        };
        match self
            .shared
            .store
            .put(host, url.hash, &c.vary, entry, c.at, self.purge_seq)
        {
            Ok(st) => {
                self.shared.metrics.count(host, "stores", 1);
                if st.evicted {
                    self.shared.metrics.count(host, "evictions", 1);
                }
            }
            Err(PutError::TooLarge) => {
                self.unstored = true;
                self.shared.metrics.count(host, "too_large", 1)
            }
            Err(PutError::Lost) => {
                log::debug!("[{}] cache: store lost a race", self.context_id)
            }
        }
    }
}

impl HttpFilter for CacheFilter {
    fn on_wake(&mut self, host: &mut dyn Host, _reason: u32) -> Decision {
        if !matches!(self.state, State::Waiting) {
            return Decision::Continue;
        }
        // The fetch we waited for is over: look again (a hit now, or upstream ourselves).
        self.collapsed = true;
        self.state = State::Pass;
        self.shared.metrics.count(host, "collapsed", 1);
        self.lookup(host)
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        self.release(host);
    }

    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        // One counter per request: its outcome's (hits, misses, revalidations, bypass, unsafe,
        // skipped, uncached, purges, purge_throttled, purge_refused); no `requests` counter.
        // One copy of the request headers (names lower-cased in place): the route match, the
        // URL key, the lookup and the store read this copy, never the proxy again (three
        // owned header reads fewer than `RequestInfo::from_host`).
        let mut request = host.headers(MapKind::RequestHeaders);
        for (k, _) in request.iter_mut() {
            k.make_ascii_lowercase();
        }
        let req = {
            let authority = first(&request, ":authority").or_else(|| first(&request, "host"));
            RequestInfo::new(
                first(&request, ":method").unwrap_or_default(),
                authority.unwrap_or_default(),
                first(&request, ":path").unwrap_or_default(),
            )
        };
        if let Some(p) = self.shared.config.purge.as_ref() {
            if req.path == p.path {
                let decision = self.purge(host);
                if matches!(&decision, Decision::Respond(r) if r.status != 200 && r.status != 429) {
                    self.shared.metrics.count(host, "purge_refused", 1);
                }
                return decision;
            }
        }
        let Some(index) = self
            .shared
            .config
            .rules
            .0
            .iter()
            .position(|r| r.route.matches(&req).is_some())
        else {
            self.shared.metrics.count(host, "uncached", 1);
            return Decision::Continue;
        };
        let Some(rule) = self.shared.config.rules.0.get(index) else {
            return Decision::Continue;
        };
        if rule.disabled {
            self.shared.metrics.count(host, "skipped", 1);
            return Decision::Continue;
        }
        self.rule = Some(index);
        self.url = Some(Rc::new(url_key_of(&request, rule)));
        self.request = request;
        if !rule.vary_normalise.is_empty() {
            crate::key::normalise_request(&mut self.request, &rule.vary_normalise);
        }
        // The request's directives, parsed once for this lookup and any after a wake.
        self.directives = RequestDirectives::of(&self.request);
        self.no_store = self.directives.cc.no_store;
        match req.method.as_str() {
            "GET" => self.lookup(host),
            "HEAD" => {
                self.is_head = true;
                self.lookup(host)
            }
            "POST" | "PUT" | "DELETE" | "PATCH" => {
                self.shared.metrics.count(host, "unsafe", 1);
                self.state = State::Unsafe;
                Decision::Continue
            }
            _ => {
                self.shared.metrics.count(host, "bypass", 1);
                self.state = State::Bypass("method");
                Decision::Continue
            }
        }
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Decision {
        let state = std::mem::replace(&mut self.state, State::Done);
        // A miss or a revalidation reads the response headers once (one host call) and takes
        // `:status` and an upstream `Cache-Status` from that copy; the other states read only
        // what they use, and a request the cache does not handle reads nothing.
        let mut upstream: Option<Option<String>> = None;
        let params = match state {
            State::Pass | State::Done | State::Waiting => return Decision::Continue,
            State::Bypass(fwd) => format!("fwd={fwd}"),
            State::Unsafe => {
                let status = host
                    .header(MapKind::ResponseHeaders, ":status")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if (200..400).contains(&status) {
                    self.invalidate_targets(host);
                }
                "fwd=method".to_string()
            }
            State::Miss(fwd) => {
                let headers = host.headers(MapKind::ResponseHeaders);
                let status = status_of(&headers);
                upstream = Some(first(&headers, "cache-status").map(str::to_string));
                let params = self.start_capture(host, fwd, status, headers);
                self.unstored = self.capture.is_none();
                params
            }
            State::Revalidate {
                found,
                fwd,
                client_conditional,
            } => {
                let headers = host.headers(MapKind::ResponseHeaders);
                let status = status_of(&headers);
                match self.on_revalidated(host, found, fwd, client_conditional, status, &headers) {
                    Ok(reply) => return Decision::Respond(reply),
                    Err(params) => {
                        upstream = Some(first(&headers, "cache-status").map(str::to_string));
                        params
                    }
                }
            }
        };
        let upstream = match upstream {
            Some(from_copy) => from_copy,
            None => host.header(MapKind::ResponseHeaders, "cache-status"),
        };
        // RFC 9211: caches append their member; the one nearest the client comes last.
        let value = match upstream {
            Some(upstream) if !upstream.trim().is_empty() => {
                format!("{upstream}, {}", cache_status(&params))
            }
            _ => cache_status(&params),
        };
        host.set_header(MapKind::ResponseHeaders, "cache-status", &value);
        if self.shared.config.strip_targeted {
            for name in &self.shared.config.targeted {
                host.remove_header(MapKind::ResponseHeaders, name);
            }
        }
        if end_of_stream || self.capture.is_none() {
            self.finish_capture(host);
        }
        Decision::Continue
    }

    fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        let limit = usize::try_from(self.shared.config.max_entry_bytes).unwrap_or(usize::MAX);
        if let Some(c) = self.capture.as_mut() {
            if body_size > 0 {
                match host.body(Body::Response, 0, body_size) {
                    Some(chunk) if c.body.len() + chunk.len() <= limit => {
                        if c.body.is_empty() {
                            c.body = chunk;
                        } else {
                            c.body.extend_from_slice(&chunk);
                        }
                    }
                    _ => {
                        // Too large (or unreadable): stop capturing, let it stream through.
                        self.capture = None;
                        self.unstored = true;
                        self.release(host);
                        self.shared.metrics.count(host, "too_large", 1);
                    }
                }
            }
        }
        if end_of_stream {
            self.finish_capture(host);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests;
