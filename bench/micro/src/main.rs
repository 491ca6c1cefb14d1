//! `tollgate-micro`: runs one module's code (the filter's pure core and the dispatcher, the same
//! code as in the .wasm, compiled for the host) over the in-memory proxy of the test driver,
//! request after request, and prints nanoseconds and the proxy calls (hostcalls in Envoy) per
//! request (in total, and hook by hook in order: `by_hook`), and the entries into the module per
//! request (the exports Envoy would call: the filter's `RootFilter::HOOKS` decide which stream
//! hooks are entries; `entries_per_request`). Used to find hot spots with a
//! profiler, since Envoy's V8 gives wasm code no symbols:
//!
//!     cargo build --release --manifest-path bench/micro/Cargo.toml
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!         bench/micro/target/release/tollgate-micro auth CONFIG.json 2000 -H 'authorization: Bearer ...'
//!     callgrind_annotate /tmp/cg.out | head -40
//!
//! usage: tollgate-micro MODULE CONFIG.json ITERATIONS [--path P] [-H 'name: value']...
//!        [--response-header 'name: value']... [--no-header-cache] [--request-body BYTES]
//!        (`{n}` in path/headers = iteration)
//! MODULE: probe | auth | ratelimit | cache | aggregate | tollgate (the combined module; CONFIG
//! has a section per filter). The request's answer (when the module lets it through) is a 200
//! with a small JSON body and the given response headers. `--no-header-cache` reads each request
//! header from the proxy instead of the whole map once (to measure what the cache saves).
//! `--request-body BYTES` sends a POST with a body of that many bytes (one chunk) instead of a GET.

use std::collections::BTreeMap;
use std::time::Instant;

use tollgate_common::testing::Driver;
use tollgate_common::{Decision, RootFilter};

struct Args {
    module: String,
    config: Vec<u8>,
    iterations: u64,
    path: String,
    headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
    header_cache: bool,
    request_body: Option<usize>,
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
        header_cache: true,
        request_body: None,
    };
    while let Some(x) = it.next() {
        let mut val = || it.next().ok_or(format!("{x} needs a value"));
        match x.as_str() {
            "--path" => a.path = val()?,
            "--no-header-cache" => a.header_cache = false,
            "--request-body" => {
                a.request_body = Some(val()?.parse().map_err(|e| format!("--request-body: {e}"))?)
            }
            "-H" | "--response-header" => {
                let v = val()?;
                let (k, v2) = v
                    .split_once(':')
                    .ok_or(format!("{v:?}: want 'name: value'"))?;
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

/// One request through the module (request headers, then the upstream's answer when it goes
/// on, then the end of the stream); returns what happened for a summary.
fn one<R: RootFilter>(d: &mut Driver<R>, args: &Args, n: u64) -> &'static str {
    one_phased(d, args, n, &mut |_, _| {})
}

/// [`one`], calling `phase(name, driver)` after each hook (to take the host calls it made).
fn one_phased<R: RootFilter>(
    d: &mut Driver<R>,
    args: &Args,
    n: u64,
    phase: &mut dyn FnMut(&'static str, &mut Driver<R>),
) -> &'static str {
    let num = n.to_string();
    let path = args.path.replace("{n}", &num);
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("{n}", &num)))
        .collect();
    let hv: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let method = if args.request_body.is_some() {
        "POST"
    } else {
        "GET"
    };
    let id = d.request(method, &path, &hv);
    let mut decision = d.request_headers(id, args.request_body.is_none());
    phase("request_headers", d);
    if let (Some(size), Decision::Continue) = (args.request_body, &decision) {
        decision = d.request_body(id, &vec![b'x'; size], true);
        phase("request_body", d);
    }
    let outcome = match decision {
        Decision::Respond(_) => "local reply",
        Decision::Pause => "paused",
        Decision::Continue => {
            let mut rh: Vec<(&str, &str)> =
                vec![(":status", "200"), ("content-type", "application/json")];
            rh.extend(
                args.response_headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let _ = d.response_headers(id, &rh, false);
            phase("response_headers", d);
            let _ = d.response_body(id, BODY, true);
            phase("response_body", d);
            "upstream"
        }
    };
    d.done(id);
    phase("done", d);
    outcome
}

fn run<R: RootFilter>(args: &Args) -> Result<(), String> {
    let config = String::from_utf8(args.config.clone()).map_err(|e| e.to_string())?;
    let mut d = Driver::<R>::new(&config).map_err(|e| format!("configuration refused: {e}"))?;
    d.dispatcher_mut().set_header_cache(args.header_cache);
    // warm-up (JWKS parsing, caches filled, metrics defined, ...)
    for i in 0..args.iterations.min(100) {
        one(&mut d, args, i);
    }
    // proxy calls of one more request, after the warm-up
    d.count_host_calls(true);
    d.take_entries();
    let mut phases: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    one_phased(&mut d, args, 999_999, &mut |name, d| {
        phases.push((name, d.take_host_calls()))
    });
    d.count_host_calls(false);
    let entries = d.take_entries();
    let mut calls: BTreeMap<&str, u64> = BTreeMap::new();
    for c in phases.iter().flat_map(|(_, calls)| calls) {
        *calls.entry(c).or_default() += 1;
    }
    // What the header reads cost besides the calls: bytes copied out of the proxy.
    let header_bytes = d.take_header_bytes();
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let t0 = Instant::now();
    for i in 0..args.iterations {
        *counts.entry(one(&mut d, args, 1_000_000 + i)).or_default() += 1;
    }
    let ns = t0.elapsed().as_nanos() as f64 / args.iterations.max(1) as f64;
    let total: u64 = calls.values().sum();
    println!(
        "{{\"module\":\"{}\",\"header_cache\":{},\"iterations\":{},\"ns_per_request\":{:.0},\"outcomes\":{:?},\"host_calls_per_request\":{},\"entries_per_request\":{},\"header_bytes_per_request\":{},\"host_calls\":{:?},\"by_hook\":{{{}}}}}",
        args.module,
        args.header_cache,
        args.iterations,
        ns,
        counts,
        total,
        entries,
        header_bytes,
        calls,
        phases
            .iter()
            .map(|(name, calls)| format!("\"{name}\":{calls:?}"))
            .collect::<Vec<_>>()
            .join(",")
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
        "aggregate" => run::<tollgate_aggregate::AggregateRoot>(&args),
        "tollgate" => run::<tollgate::TollgateRoot>(&args),
        other => Err(format!("unknown module {other}")),
    };
    if let Err(e) = r {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
