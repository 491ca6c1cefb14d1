//! `tollgate-micro`: runs one filter's pure core (the same code as in the .wasm, compiled for the
//! host) over `MemHost`, request after request, and prints nanoseconds per request. Used to find
//! hot spots with a profiler, since Envoy's V8 gives wasm code no symbols:
//!
//!     cargo build --release --manifest-path bench/micro/Cargo.toml
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!         bench/micro/target/release/tollgate-micro auth CONFIG.json 2000 -H 'authorization: Bearer ...'
//!     callgrind_annotate /tmp/cg.out | head -40
//!
//! usage: tollgate-micro MODULE CONFIG.json ITERATIONS [--path P] [-H 'name: value']...
//!        [--response-header 'name: value']... [--distinct]   (`{n}` in path/headers = iteration)
//! MODULE: probe | auth | ratelimit | cache. The request's answer (when the filter lets it through)
//! is a 200 with a small JSON body and the given response headers.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use tollgate_common::mem_host::MemHost;
use tollgate_common::{
    Body, Decision, Host, HostError, HttpCall, HttpFilter, MapKind, MetricKind, RootFilter,
    SharedError,
};

/// A `Host` that counts the calls filter logic makes (each is a proxy-wasm hostcall in Envoy:
/// a V8-to-C++ transition plus the copy of its arguments and results) and passes them to MemHost.
struct Counting<'a> {
    inner: &'a mut MemHost,
    calls: &'a RefCell<BTreeMap<&'static str, u64>>,
}

impl Counting<'_> {
    fn count(&self, what: &'static str) {
        *self.calls.borrow_mut().entry(what).or_default() += 1;
    }
}

impl Host for Counting<'_> {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        self.count("header");
        self.inner.header(map, name)
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        self.count("headers (whole map)");
        self.inner.headers(map)
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.count("set_header");
        self.inner.set_header(map, name, value)
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.count("add_header");
        self.inner.add_header(map, name, value)
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        self.count("remove_header");
        self.inner.remove_header(map, name)
    }
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        self.count("body");
        self.inner.body(which, start, max)
    }
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        self.count("set_body");
        self.inner.set_body(which, start, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.count("property");
        self.inner.property(path)
    }
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.count("shared_get");
        self.inner.shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        self.count("shared_set");
        self.inner.shared_set(key, value, cas)
    }
    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        self.count("http_call");
        self.inner.http_call(call)
    }
    fn now(&self) -> SystemTime {
        self.count("now");
        self.inner.now()
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.count("define_metric");
        self.inner.define_metric(kind, name)
    }
    fn increment_metric(&mut self, id: u32, delta: i64) {
        self.count("increment_metric");
        self.inner.increment_metric(id, delta)
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.count("record_metric");
        self.inner.record_metric(id, value)
    }
    fn set_tick_period(&mut self, period: Duration) {
        self.count("set_tick_period");
        self.inner.set_tick_period(period)
    }
    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        self.count("wake");
        self.inner.wake(context_id, reason)
    }
}

struct Args {
    module: String,
    config: Vec<u8>,
    iterations: u64,
    path: String,
    headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let module = it.next().ok_or("MODULE missing")?;
    let config_path = it.next().ok_or("CONFIG missing")?;
    let config = std::fs::read(&config_path).map_err(|e| format!("{config_path}: {e}"))?;
    let iterations = it
        .next()
        .ok_or("ITERATIONS missing")?
        .parse()
        .map_err(|e| format!("ITERATIONS: {e}"))?;
    let mut a = Args {
        module,
        config,
        iterations,
        path: "/bench".into(),
        headers: Vec::new(),
        response_headers: Vec::new(),
    };
    while let Some(x) = it.next() {
        let mut val = || it.next().ok_or(format!("{x} needs a value"));
        match x.as_str() {
            "--path" => a.path = val()?,
            "-H" | "--response-header" => {
                let v = val()?;
                let (k, v2) = v.split_once(':').ok_or(format!("{v:?}: want 'name: value'"))?;
                let pair = (k.trim().to_ascii_lowercase(), v2.trim().to_string());
                if x == "-H" {
                    a.headers.push(pair);
                } else {
                    a.response_headers.push(pair);
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

const BODY: &[u8] = br#"{"id":1,"name":"bench","items":[1,2,3],"ok":true}"#;

/// One request through the filter; returns what happened for a summary. With `calls`, the
/// filter's host calls are counted there.
fn one<R: RootFilter>(
    root: &R,
    base: &MemHost,
    args: &Args,
    n: u64,
    calls: Option<&RefCell<BTreeMap<&'static str, u64>>>,
) -> &'static str {
    let num = n.to_string();
    let path = args.path.replace("{n}", &num);
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("{n}", &num)))
        .collect();
    let hv: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut mem = base.next_request("GET", &path, &hv);
    let scratch = RefCell::new(BTreeMap::new());
    let calls = calls.unwrap_or(&scratch);
    let mut f = root.create_filter(n as u32 + 2);
    let decision = f.on_request_headers(&mut Counting { inner: &mut mem, calls }, true);
    let outcome = match decision {
        Decision::Respond(_) => "local reply",
        Decision::Pause => "paused",
        Decision::Continue => {
            let mut rh: Vec<(&str, &str)> =
                vec![(":status", "200"), ("content-type", "application/json")];
            rh.extend(args.response_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            mem.set_map(MapKind::ResponseHeaders, &rh);
            let _ = f.on_response_headers(&mut Counting { inner: &mut mem, calls }, false);
            mem.set_body_bytes(Body::Response, BODY);
            let _ = f.on_response_body(&mut Counting { inner: &mut mem, calls }, BODY.len(), true);
            "upstream"
        }
    };
    f.on_done(&mut Counting { inner: &mut mem, calls });
    outcome
}

fn run<R: RootFilter>(args: &Args) -> Result<(), String> {
    let mut base = MemHost::new();
    let mut root = R::new(1);
    root.configure(&mut base, &args.config)
        .map_err(|e| format!("configuration refused: {e}"))?;
    // warm-up (JWKS parsing, caches filled, ...)
    for i in 0..args.iterations.min(100) {
        one(&root, &base, args, i, None);
    }
    // host calls of one more request, after the warm-up
    let calls = RefCell::new(BTreeMap::new());
    one(&root, &base, args, 999_999, Some(&calls));
    let calls = calls.into_inner();
    let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
    let t0 = Instant::now();
    for i in 0..args.iterations {
        *counts.entry(one(&root, &base, args, 1_000_000 + i, None)).or_default() += 1;
    }
    let ns = t0.elapsed().as_nanos() as f64 / args.iterations.max(1) as f64;
    let total: u64 = calls.values().sum();
    println!(
        "{{\"module\":\"{}\",\"iterations\":{},\"ns_per_request\":{:.0},\"outcomes\":{:?},\"host_calls_per_request\":{},\"host_calls\":{:?}}}",
        args.module, args.iterations, ns, counts, total, calls
    );
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let r = match args.module.as_str() {
        "probe" => run::<tollgate_probe::ProbeRoot>(&args),
        "auth" => run::<tollgate_auth::AuthRoot>(&args),
        "ratelimit" => run::<tollgate_ratelimit::RateLimitRoot>(&args),
        "cache" => run::<tollgate_cache::CacheRoot>(&args),
        other => Err(format!("unknown module {other}")),
    };
    if let Err(e) = r {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
