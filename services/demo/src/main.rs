//! Demo JSON services for the Tollgate gateway: `users`, `orders` and `products`, each on its
//! own loopback port, with knobs that tests and benchmarks use.
//!
//! ```text
//! tollgate-demo --listen users=127.0.0.1:8081 --listen orders=127.0.0.1:8082 \
//!               --listen products=127.0.0.1:8083 [--jwks envoy/demo-keys/jwks.json]
//! ```
//!
//! Every knob is a request header `x-demo-<knob>` or a query parameter `<knob>`:
//! `delay` (ms), `delay_first` (ms, only the first request to a path since the last stats
//! reset waits: hedging tests), `hold` (a name: the request waits until `POST /hold/<name>/release`
//! or 60 s; tests order events with it instead of delays), `hold_first` (a name: only the first
//! request to a path since the last stats reset is held), `status`, `fail_rate` (0..1, answers 500), `size` (pad the body to bytes),
//! `cache_control`, `etag` (`none` to omit), `last_modified` (`none` to omit), `vary`, `expires`,
//! `set_cookie`, `content_type` (a non-JSON type sends a plain text body), `age`, `date` (sent
//! verbatim as `Age` / `Date`), `header` (`name: value`, one extra response header),
//! `conditional` (`ignore`: a matching conditional request still gets 200).
//! Holds (tests order events with them, never with sleeps): `POST /hold?path=/products/5` makes
//! every later request to that path wait (after it is counted in `/stats`) until
//! `POST /release?path=/products/5`; `GET /hold?path=...` says how many requests wait there.
//! Conditional GETs (`If-None-Match`, `If-Modified-Since`) get 304.
//! `--require-identity users,orders`: those services answer `401` to a request without the
//! `x-tollgate-consumer` identity the gateway's auth filter sets (the service's own check, behind
//! the gateway's: what a backend of a composite endpoint should do). Users are `/users/1` to
//! `/users/1000`, and any other name: `/users/alice` is the record of the consumer `alice`.
//! Other endpoints: `/healthz`, `/echo/...` and `/<service>/echo/...` (the request as JSON),
//! `/stats` (request counts per
//! path; `POST /stats/reset` clears them), `/hold/<name>` (how many requests are held under that
//! name now, how many arrived, whether it is released; holds are shared by every service of the
//! process), `POST /hold/<name>/release` (lets them and every later one go), `POST /hold/release`
//! (releases every name), `/.well-known/jwks.json`,
//! `/.well-known/openid-configuration`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_common::http_date::http_date;

/// Largest request body read (bigger bodies are cut).
const MAX_BODY: usize = 1 << 20;
/// The longest a `hold` keeps a request.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// A fixed Last-Modified for demo data: 2026-01-01T00:00:00Z.
const LAST_MODIFIED: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

struct Service {
    name: String,
    /// Answer 401 to requests without an `x-tollgate-consumer` identity.
    require_identity: bool,
    jwks: Option<String>,
    issuer: String,
    counts: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    rng: AtomicU64,
    /// The `hold` knob's gates, shared by every service of the process.
    holds: Arc<Holds>,
}

/// Named gates: a request with `hold=<name>` waits until the name is released (or `MAX_HOLD`).
#[derive(Default)]
struct Holds {
    gates: Mutex<HashMap<String, Gate>>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
struct Gate {
    /// Requests waiting now.
    waiting: u64,
    /// Requests that arrived with this name since it was first used.
    arrived: u64,
    /// Released: waiting requests go, later ones pass at once.
    released: bool,
}

impl Holds {
    /// Wait until `name` is released or `MAX_HOLD` has passed.
    fn wait(&self, name: &str) {
        let Ok(mut gates) = self.gates.lock() else {
            return;
        };
        let gate = gates.entry(name.to_string()).or_default();
        gate.arrived += 1;
        if gate.released {
            return;
        }
        gate.waiting += 1;
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + MAX_HOLD;
        loop {
            if gates.get(name).is_none_or(|g| g.released) {
                break;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            match self.changed.wait_timeout(gates, deadline - now) {
                Ok((g, _)) => gates = g,
                Err(_) => return,
            }
        }
        if let Some(g) = gates.get_mut(name) {
            g.waiting = g.waiting.saturating_sub(1);
        }
    }

    /// Release `name` (every name when `None`).
    fn release(&self, name: Option<&str>) {
        if let Ok(mut gates) = self.gates.lock() {
            match name {
                Some(n) => gates.entry(n.to_string()).or_default().released = true,
                None => gates.values_mut().for_each(|g| g.released = true),
            }
        }
        self.changed.notify_all();
    }

    /// Hold `name` (again): later requests that wait on it wait until it is released.
    fn arm(&self, name: &str) {
        if let Ok(mut gates) = self.gates.lock() {
            gates.entry(name.to_string()).or_default().released = false;
        }
    }

    /// Whether `name` is held now (armed and not released).
    fn armed(&self, name: &str) -> bool {
        self.gates
            .lock()
            .ok()
            .is_some_and(|g| g.get(name).is_some_and(|g| !g.released))
    }

    fn state(&self, name: &str) -> Gate {
        self.gates
            .lock()
            .ok()
            .and_then(|g| g.get(name).copied())
            .unwrap_or_default()
    }
}

/// The command line.
struct Options {
    /// `NAME=ADDR:PORT` per service.
    listens: Vec<String>,
    /// The JWKS document served at `/.well-known/jwks.json`.
    jwks: Option<String>,
    /// The services that answer identified callers only.
    require_identity: Vec<String>,
    issuer: String,
}

fn options() -> Options {
    let mut o = Options {
        listens: Vec::new(),
        jwks: None,
        require_identity: Vec::new(),
        issuer: "https://demo.tollgate.local".to_string(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => o.listens.push(args.next().unwrap_or_default()),
            "--jwks" => o.jwks = args.next(),
            "--issuer" => o.issuer = args.next().unwrap_or(o.issuer),
            "--require-identity" => o.require_identity.extend(
                args.next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string()),
            ),
            "-h" | "--help" => {
                println!(
                    "usage: tollgate-demo --listen NAME=ADDR:PORT ... [--jwks FILE] [--issuer URL] \
                     [--require-identity NAME,...]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("tollgate-demo: unknown argument `{other}` (see --help)");
                std::process::exit(2);
            }
        }
    }
    if o.listens.is_empty() {
        o.listens = vec![
            "users=127.0.0.1:8081".into(),
            "orders=127.0.0.1:8082".into(),
            "products=127.0.0.1:8083".into(),
        ];
    }
    o.jwks = o.jwks.and_then(|path| match std::fs::read_to_string(&path) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("tollgate-demo: cannot read --jwks {path}: {e}; /.well-known/jwks.json will answer 404");
            None
        }
    });
    o
}

fn main() {
    let o = options();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1024)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate-demo: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let holds = Arc::new(Holds::default());
    runtime.block_on(async move {
        let mut servers = Vec::new();
        for l in &o.listens {
            let Some((name, addr)) = l.split_once('=') else {
                eprintln!("tollgate-demo: --listen wants NAME=ADDR:PORT, got `{l}`");
                std::process::exit(2);
            };
            let listener = match TcpListener::bind(addr).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tollgate-demo: cannot listen on {addr}: {e}");
                    std::process::exit(1);
                }
            };
            eprintln!("tollgate-demo: {name} listening on http://{addr}");
            let svc = Arc::new(Service {
                name: name.to_string(),
                require_identity: o.require_identity.iter().any(|n| n == name),
                jwks: o.jwks.clone(),
                issuer: o.issuer.clone(),
                counts: Mutex::new(HashMap::new()),
                total: AtomicU64::new(0),
                rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15 ^ addr.len() as u64),
                holds: holds.clone(),
            });
            servers.push(tokio::spawn(serve(listener, svc)));
        }
        for s in servers {
            let _ = s.await;
        }
    });
}

/// Accept connections and serve HTTP/1.1 (keep-alive) on each; a request is handled on the
/// blocking pool (up to 1024 at once: tests hold hundreds), so the `delay` knobs simply sleep.
async fn serve(listener: TcpListener, svc: Arc<Service>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let svc = svc.clone();
                async move {
                    let request = read_request(req).await;
                    let answer = tokio::task::spawn_blocking(move || handle(&svc, request))
                        .await
                        .unwrap_or_else(|_| DemoResponse::error());
                    Ok::<_, std::convert::Infallible>(answer.into_hyper())
                }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A hyper request read whole (the body up to [`MAX_BODY`], lossily as text).
async fn read_request(req: hyper::Request<hyper::body::Incoming>) -> DemoRequest {
    let method = req.method().as_str().to_string();
    let url = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    DemoRequest {
        method,
        url,
        headers,
        body,
    }
}

/// A request as the handler sees it.
struct DemoRequest {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// The handler's answer.
struct DemoResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    content_type: String,
    head: bool,
}

impl DemoResponse {
    fn error() -> Self {
        DemoResponse {
            status: 500,
            headers: Vec::new(),
            body: b"{\"error\":\"handler failed\"}".to_vec(),
            content_type: "application/json".into(),
            head: false,
        }
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let body = if self.head { Vec::new() } else { self.body };
        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        if self.status != 304 {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&self.content_type) {
                h.insert(hyper::header::CONTENT_TYPE, v);
            }
        }
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(&v),
            ) {
                h.append(k, v);
            }
        }
        resp
    }
}

struct Knobs {
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Knobs {
    fn get(&self, knob: &str) -> Option<String> {
        let header = format!("x-demo-{}", knob.replace('_', "-"));
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&header))
            .map(|(_, v)| v.clone())
            .or_else(|| {
                self.query
                    .iter()
                    .find(|(k, _)| k == knob)
                    .map(|(_, v)| v.clone())
            })
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path segment, percent-decoded (`+` stays `+`).
fn decode_segment(s: &str) -> String {
    decode(&s.replace('+', "%2B"))
}

fn next_random(svc: &Service) -> f64 {
    // xorshift; good enough for a failure rate knob.
    let mut x = svc.rng.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    svc.rng.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn item(service: &str, id: &str) -> Option<Value> {
    let Ok(n) = id.parse::<u64>() else {
        // A user by name (a consumer id): a stable made-up record.
        let named = service == "users"
            && !id.is_empty()
            && id.len() <= 128
            && !id.starts_with(|c: char| c.is_ascii_digit())
            && !id.chars().any(char::is_control);
        return named.then(|| {
            let h = fnv(id.as_bytes());
            json!({
                "id": id, "name": id, "email": format!("{id}@example.com"),
                "company_id": (h % 5) + 1, "plan": if h % 2 == 0 { "pro" } else { "free" }
            })
        });
    };
    if n == 0 || n > 1000 {
        return None;
    }
    Some(match service {
        "users" => json!({
            "id": n, "name": format!("User {n}"), "email": format!("user{n}@example.com"),
            "company_id": (n % 5) + 1, "plan": if n % 2 == 0 { "pro" } else { "free" }
        }),
        "orders" => json!({
            "id": n, "user": (n % 10) + 1, "product_ids": [n % 7 + 1, n % 11 + 1],
            "total": (n * 1234) % 10000 + 99, "currency": "EUR", "status": "shipped"
        }),
        "products" => json!({
            "id": n, "name": format!("Product {n}"), "price": (n * 317) % 5000 + 100,
            "currency": "EUR", "stock": n % 13
        }),
        _ => json!({"id": n, "service": service}),
    })
}

fn list(service: &str, knobs: &Knobs) -> Value {
    let user = knobs
        .query
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone());
    let items: Vec<Value> = (1..=5)
        .filter_map(|i| {
            let mut v = item(service, &i.to_string())?;
            if let (Some(u), Some(obj)) = (&user, v.as_object_mut()) {
                obj.insert("user".into(), Value::String(u.clone()));
            }
            Some(v)
        })
        .collect();
    json!({ "service": service, "items": items, "count": items.len() })
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// One request: the counters and holds, then the route's answer with the knobs applied.
fn handle(svc: &Service, req: DemoRequest) -> DemoResponse {
    let (path, knobs) = read_knobs(&req);
    let method = req.method.as_str();
    if path == "/hold" || path == "/release" {
        return hold_endpoint(svc, method, &path, &knobs);
    }
    let nth_for_path = count(svc, &path);
    wait_as_asked(svc, &path, &knobs, nth_for_path);
    let decoded: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let call = Call {
        method,
        url: &req.url,
        path: &path,
        segments: &segments,
        knobs: &knobs,
        body: &req.body,
    };
    if let Some(refused) = refuse_anonymous(svc, &call) {
        return refused;
    }
    let routed = control(svc, &call).unwrap_or_else(|| data(svc, &call));
    if let Some(rate) = knobs.get("fail_rate").and_then(|r| r.parse::<f64>().ok()) {
        if next_random(svc) < rate {
            return respond(
                500,
                vec![],
                b"{\"error\":\"injected failure\"}".to_vec(),
                "application/json",
                method,
            );
        }
    }
    answer(svc, &call, routed)
}

/// The path of a request and its knobs (decoded query parameters, lower-cased headers).
fn read_knobs(req: &DemoRequest) -> (String, Knobs) {
    let (path, query) = req.url.split_once('?').unwrap_or((&req.url, ""));
    let knobs = Knobs {
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect(),
        headers: req
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
    };
    (path.to_string(), knobs)
}

/// Count a request in the request log (not the log's own endpoints): which request to this
/// path it is since the last reset (1 for the first), 0 when not counted.
fn count(svc: &Service, path: &str) -> u64 {
    if path == "/stats"
        || path == "/stats/reset"
        || path == "/healthz"
        || path.starts_with("/hold/")
    {
        return 0;
    }
    svc.total.fetch_add(1, Ordering::Relaxed);
    let Ok(mut c) = svc.counts.lock() else {
        return 0;
    };
    let n = c.entry(path.to_string()).or_insert(0);
    *n += 1;
    *n
}

/// The `hold`, `hold_first`, held-path, `delay` and `delay_first` knobs: wait before answering.
fn wait_as_asked(svc: &Service, path: &str, knobs: &Knobs, nth_for_path: u64) {
    if let Some(name) = knobs.get("hold").filter(|n| !n.is_empty()) {
        svc.holds.wait(&name);
    }
    if let Some(name) = knobs.get("hold_first").filter(|n| !n.is_empty()) {
        if nth_for_path == 1 {
            svc.holds.wait(&name);
        }
    }
    wait_while_held(svc, path);
    if let Some(ms) = knobs.get("delay").and_then(|d| d.parse::<u64>().ok()) {
        std::thread::sleep(Duration::from_millis(ms.min(60_000)));
    }
    // `delay_first`: only the first request to this path (since the last stats reset) waits.
    if let Some(ms) = knobs.get("delay_first").and_then(|d| d.parse::<u64>().ok()) {
        if nth_for_path == 1 {
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
        }
    }
}

/// A request as the routes see it.
struct Call<'a> {
    method: &'a str,
    /// Path and query, as received.
    url: &'a str,
    path: &'a str,
    /// The path's segments, percent-decoded.
    segments: &'a [&'a str],
    knobs: &'a Knobs,
    body: &'a str,
}

/// A route's answer before the knobs apply.
struct Routed {
    status: u16,
    body: Value,
    /// `None`: the service's default.
    cache_control: Option<&'static str>,
    /// Send `ETag` / `Last-Modified` and answer conditional requests (on a 200).
    validators: bool,
}

impl Routed {
    fn ok(body: Value) -> Self {
        Routed {
            status: 200,
            body,
            cache_control: None,
            validators: true,
        }
    }
    /// A 200 without validators.
    fn plain(body: Value) -> Self {
        Routed {
            validators: false,
            ..Routed::ok(body)
        }
    }
    /// A 200 without validators, never stored.
    fn no_store(body: Value) -> Self {
        Routed {
            cache_control: Some("no-store"),
            ..Routed::plain(body)
        }
    }
    fn not_found(body: Value) -> Self {
        Routed {
            status: 404,
            ..Routed::plain(body)
        }
    }
}

/// The service's own check of the identity the gateway forwards (`--require-identity`).
fn refuse_anonymous(svc: &Service, call: &Call<'_>) -> Option<DemoResponse> {
    let exempt = matches!(
        call.segments,
        ["healthz"]
            | ["stats", ..]
            | ["hold", ..]
            | [".well-known", ..]
            | ["echo", ..]
            | [_, "echo", ..]
    );
    let identified = call
        .knobs
        .header("x-tollgate-consumer")
        .is_some_and(|c| !c.trim().is_empty());
    if !svc.require_identity || exempt || identified {
        return None;
    }
    let body = json!({"type": "about:blank", "title": "Unauthorized", "status": 401,
                      "detail": format!("the {} service answers identified callers only (x-tollgate-consumer)", svc.name)});
    Some(respond(
        401,
        vec![("cache-control".into(), "no-store".into())],
        serde_json::to_vec(&body).unwrap_or_default(),
        "application/problem+json",
        call.method,
    ))
}

/// The endpoints every service has: health, the request log, holds, discovery, echo.
fn control(svc: &Service, call: &Call<'_>) -> Option<Routed> {
    Some(match (call.method, call.segments) {
        (_, ["healthz"]) => Routed::ok(json!({"ok": true, "service": svc.name})),
        (_, ["stats"]) => {
            let counts = svc.counts.lock().map(|c| c.clone()).unwrap_or_default();
            Routed::no_store(
                json!({"service": svc.name, "requests": svc.total.load(Ordering::Relaxed), "by_path": counts}),
            )
        }
        ("POST", ["stats", "reset"]) => {
            if let Ok(mut c) = svc.counts.lock() {
                c.clear();
            }
            svc.total.store(0, Ordering::Relaxed);
            Routed::plain(json!({"reset": true}))
        }
        ("POST", ["hold", "release"]) => {
            svc.holds.release(None);
            Routed::no_store(json!({"released": true}))
        }
        ("POST", ["hold", name, "release"]) => {
            svc.holds.release(Some(name));
            Routed::no_store(json!({"name": name, "released": true}))
        }
        (_, ["hold", name]) => {
            let g = svc.holds.state(name);
            Routed::no_store(
                json!({"name": name, "waiting": g.waiting, "arrived": g.arrived, "released": g.released}),
            )
        }
        (_, [".well-known", "jwks.json"]) => match &svc.jwks {
            Some(doc) => Routed {
                cache_control: Some("public, max-age=300"),
                ..Routed::ok(serde_json::from_str(doc).unwrap_or(Value::Null))
            },
            None => Routed {
                status: 404,
                ..Routed::ok(json!({"title": "no JWKS configured"}))
            },
        },
        (_, [".well-known", "openid-configuration"]) => {
            let host = call.knobs.header("host").unwrap_or("127.0.0.1");
            Routed::ok(json!({
                "issuer": svc.issuer,
                "jwks_uri": format!("http://{host}/.well-known/jwks.json"),
                "id_token_signing_alg_values_supported": ["ES256", "RS256"]
            }))
        }
        (_, ["echo", ..] | [_, "echo", ..]) => Routed::no_store(echo(svc, call)),
        _ => return None,
    })
}

/// What `/echo` answers: the request as the service received it (repeated headers joined).
fn echo(svc: &Service, call: &Call<'_>) -> Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in &call.knobs.headers {
        match headers.get_mut(k) {
            Some(Value::String(prev)) => *prev = format!("{prev},{v}"),
            _ => {
                headers.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    json!({"service": svc.name, "method": call.method, "path": call.url, "headers": headers, "body": call.body})
}

/// The service's data: a list, an item, writes accepted; anything else 404.
fn data(svc: &Service, call: &Call<'_>) -> Routed {
    match (call.method, call.segments) {
        ("GET" | "HEAD", [s]) if *s == svc.name => Routed::ok(list(&svc.name, call.knobs)),
        ("GET" | "HEAD", [s, id]) if *s == svc.name => match item(&svc.name, id) {
            Some(v) => Routed::ok(v),
            None => Routed::not_found(
                json!({"type": "about:blank", "title": "Not Found", "status": 404,
                       "detail": format!("no {} with id {id}", svc.name)}),
            ),
        },
        ("POST" | "PUT" | "PATCH" | "DELETE", [s, ..]) if *s == svc.name => Routed {
            status: if call.method == "POST" { 201 } else { 200 },
            ..Routed::no_store(
                json!({"service": svc.name, "method": call.method, "path": call.path, "accepted": true}),
            )
        },
        _ => Routed::not_found(
            json!({"type": "about:blank", "title": "Not Found", "status": 404, "detail": call.path}),
        ),
    }
}

/// The response of a route with the knobs applied: status, cache control, content type, size,
/// validators (and 304), extra headers.
fn answer(svc: &Service, call: &Call<'_>, routed: Routed) -> DemoResponse {
    let knobs = call.knobs;
    let mut status = routed.status;
    if let Some(s) = knobs.get("status").and_then(|s| s.parse::<u16>().ok()) {
        status = s;
    }
    let cache_control = knobs.get("cache_control").unwrap_or_else(|| {
        routed
            .cache_control
            .unwrap_or(match svc.name.as_str() {
                "products" => "public, max-age=60",
                "users" => "private, max-age=30",
                _ => "no-store",
            })
            .to_string()
    });
    let content_type = knobs
        .get("content_type")
        .unwrap_or_else(|| "application/json".into());
    let mut bytes = body_bytes(&routed.body, knobs, &content_type);
    let mut extra: Vec<(String, String)> = Vec::new();
    if routed.validators && status == 200 && validate(knobs, &bytes, &mut extra) {
        status = 304;
        bytes = Vec::new();
    }
    extra.push(("cache-control".into(), cache_control));
    knob_headers(knobs, &mut extra);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    extra.push(("x-demo-service".into(), svc.name.clone()));
    extra.push(("x-demo-served-at-ms".into(), now.to_string()));
    respond(status, extra, bytes, &content_type, call.method)
}

/// The body's bytes: JSON (padded to the `size` knob), or a non-JSON text for another
/// `content_type`.
fn body_bytes(body: &Value, knobs: &Knobs, content_type: &str) -> Vec<u8> {
    let json = content_type.contains("json");
    let mut bytes = if json {
        serde_json::to_vec(body).unwrap_or_default()
    } else {
        b"this is not JSON <html>".to_vec()
    };
    let Some(size) = knobs.get("size").and_then(|s| s.parse::<usize>().ok()) else {
        return bytes;
    };
    let size = size.min(64 << 20);
    if !json {
        bytes.resize(size, b'.');
    } else if let Value::Object(mut m) = body.clone() {
        let base = serde_json::to_vec(&m).unwrap_or_default().len() + 12;
        m.insert(
            "padding".into(),
            Value::String("x".repeat(size.saturating_sub(base))),
        );
        bytes = serde_json::to_vec(&m).unwrap_or_default();
    }
    bytes
}

/// Add `ETag` and `Last-Modified` (the `etag` / `last_modified` knobs, `none` to omit) and
/// say whether the request's `If-None-Match` / `If-Modified-Since` makes the answer a 304
/// (never with `conditional: ignore`).
fn validate(knobs: &Knobs, bytes: &[u8], extra: &mut Vec<(String, String)>) -> bool {
    let etag = knobs
        .get("etag")
        .unwrap_or_else(|| format!("\"{:016x}\"", fnv(bytes)));
    let last_modified = knobs
        .get("last_modified")
        .unwrap_or_else(|| LAST_MODIFIED.into());
    let mut not_modified = false;
    let honour = knobs.get("conditional").as_deref() != Some("ignore");
    if etag != "none" {
        if let Some(inm) = knobs.header("if-none-match").filter(|_| honour) {
            let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
            not_modified = inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(&etag));
        }
        extra.push(("etag".into(), etag));
    }
    if last_modified != "none" {
        if honour && knobs.header("if-none-match").is_none() {
            if let (Some(ims), Some(lm)) = (
                knobs.header("if-modified-since").and_then(http_date),
                http_date(&last_modified),
            ) {
                not_modified = lm <= ims;
            }
        }
        extra.push(("last-modified".into(), last_modified));
    }
    not_modified
}

/// The response headers set by knobs: `vary`, `expires`, `set_cookie`, `age`, `date`, and
/// `header: NAME: VALUE`.
fn knob_headers(knobs: &Knobs, extra: &mut Vec<(String, String)>) {
    for (knob, name) in [
        ("vary", "vary"),
        ("expires", "expires"),
        ("set_cookie", "set-cookie"),
        ("age", "age"),
        ("date", "date"),
    ] {
        if let Some(v) = knobs.get(knob) {
            extra.push((name.into(), v));
        }
    }
    if let Some((k, v)) = knobs
        .get("header")
        .as_deref()
        .and_then(|h| h.split_once(':'))
    {
        extra.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// `POST /hold?path=P` (hold later requests to P), `POST /release?path=P`, `GET /hold?path=P`
/// (how many wait at P now).
fn hold_endpoint(svc: &Service, method: &str, path: &str, knobs: &Knobs) -> DemoResponse {
    let target = knobs.get("path").unwrap_or_default();
    let gate = path_gate(&target);
    match (method, path) {
        ("POST", "/hold") => svc.holds.arm(&gate),
        ("POST", "/release") => svc.holds.release(Some(&gate)),
        _ => {}
    }
    let g = svc.holds.state(&gate);
    let held = svc.holds.armed(&gate);
    let body = json!({"path": target, "held": held, "waiting": g.waiting});
    respond(
        200,
        vec![("cache-control".into(), "no-store".into())],
        serde_json::to_vec(&body).unwrap_or_default(),
        "application/json",
        method,
    )
}

/// The gate of a held path (`POST /hold?path=...`): one kind of hold, named after the path.
fn path_gate(path: &str) -> String {
    format!("path:{path}")
}

/// Wait while `path` is held (at most [`MAX_HOLD`]).
fn wait_while_held(svc: &Service, path: &str) {
    let gate = path_gate(path);
    if svc.holds.armed(&gate) {
        svc.holds.wait(&gate);
    }
}

fn respond(
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    ct: &str,
    method: &str,
) -> DemoResponse {
    DemoResponse {
        status,
        headers,
        body,
        content_type: ct.to_string(),
        head: method == "HEAD",
    }
}
