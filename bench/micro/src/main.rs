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

use std::time::Instant;

use tollgate_common::mem_host::MemHost;
use tollgate_common::{Body, Decision, HttpFilter, MapKind, RootFilter};

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

/// One request through the filter; returns what happened for a summary.
fn one<R: RootFilter>(root: &R, base: &MemHost, args: &Args, n: u64) -> &'static str {
    let num = n.to_string();
    let path = args.path.replace("{n}", &num);
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("{n}", &num)))
        .collect();
    let hv: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut host = base.next_request("GET", &path, &hv);
    let mut f = root.create_filter(n as u32 + 2);
    let outcome = match f.on_request_headers(&mut host, true) {
        Decision::Respond(_) => "local reply",
        Decision::Pause => "paused",
        Decision::Continue => {
            let mut rh: Vec<(&str, &str)> = vec![
                (":status", "200"),
                ("content-type", "application/json"),
            ];
            rh.extend(args.response_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            host.set_map(MapKind::ResponseHeaders, &rh);
            let _ = f.on_response_headers(&mut host, false);
            host.set_body_bytes(Body::Response, BODY);
            let _ = f.on_response_body(&mut host, BODY.len(), true);
            "upstream"
        }
    };
    f.on_done(&mut host);
    outcome
}

fn run<R: RootFilter>(args: &Args) -> Result<(), String> {
    let mut base = MemHost::new();
    let mut root = R::new(1);
    root.configure(&mut base, &args.config)
        .map_err(|e| format!("configuration refused: {e}"))?;
    // warm-up (JWKS parsing, caches filled, ...)
    for i in 0..args.iterations.min(100) {
        one(&root, &base, args, i);
    }
    let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
    let t0 = Instant::now();
    for i in 0..args.iterations {
        *counts.entry(one(&root, &base, args, 1_000_000 + i)).or_default() += 1;
    }
    let ns = t0.elapsed().as_nanos() as f64 / args.iterations.max(1) as f64;
    println!(
        "{{\"module\":\"{}\",\"iterations\":{},\"ns_per_request\":{:.0},\"outcomes\":{:?}}}",
        args.module, args.iterations, ns, counts
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
