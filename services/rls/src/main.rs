//! `tollgate-rls`: a rate limit service speaking Envoy's RLS protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, gRPC), on the `limitador`
//! crate with counters in Redis. Limits come from a file in Limitador's format.
//!
//! ```text
//! tollgate-rls --listen 127.0.0.1:8091 --limits envoy/rls-limits.yaml \
//!              [--redis redis://127.0.0.1:6379 | --memory] [--timeout-ms 500] [--redis-wait-s 30]
//! ```
//!
//! The listener opens once Redis has answered (so an open port means ready). A Redis that goes
//! away later makes calls fail with `UNAVAILABLE` (logged once per 10 s) until it is back.

mod grpc;
mod limits;
mod service;
mod store;

use std::time::{Duration, Instant};

use service::RateLimitService;
use store::Store;

struct Args {
    listen: String,
    limits: String,
    redis: Option<String>,
    timeout: Duration,
    redis_wait: Duration,
}

const USAGE: &str = "usage: tollgate-rls --listen ADDR:PORT --limits FILE \
    [--redis redis://HOST:PORT | --memory] [--timeout-ms MS] [--redis-wait-s S]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        listen: "127.0.0.1:8091".into(),
        limits: String::new(),
        redis: Some("redis://127.0.0.1:6379".into()),
        timeout: Duration::from_millis(500),
        redis_wait: Duration::from_secs(30),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value()?,
            "--limits" => a.limits = value()?,
            "--redis" => a.redis = Some(value()?),
            "--memory" => a.redis = None,
            "--timeout-ms" => {
                let ms = value()?.parse().map_err(|_| "--timeout-ms: a number")?;
                a.timeout = Duration::from_millis(ms);
            }
            "--redis-wait-s" => {
                let s = value()?.parse().map_err(|_| "--redis-wait-s: a number")?;
                a.redis_wait = Duration::from_secs(s);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if a.limits.is_empty() {
        return Err(format!("--limits is required\n{USAGE}"));
    }
    Ok(a)
}

/// Connect to Redis, retrying until `wait` has passed.
async fn connect(url: &str, wait: Duration) -> Result<Store, String> {
    let start = Instant::now();
    let mut reported = false;
    loop {
        match Store::redis(url).await {
            Ok(l) => return Ok(l),
            Err(e) if start.elapsed() < wait => {
                if !reported {
                    eprintln!("tollgate-rls: waiting for Redis at {url}: {e}");
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("Redis at {url}: {e}")),
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.limits)
        .map_err(|e| format!("cannot read {}: {e}", args.limits))?;
    let limits = limits::parse(&text).map_err(|e| format!("{}: {e}", args.limits))?;
    let count = limits.len();
    let (limiter, storage) = match &args.redis {
        Some(url) => (connect(url, args.redis_wait).await?, url.as_str()),
        None => (Store::memory(), "memory"),
    };
    let service = RateLimitService::new(limiter, limits, args.timeout);
    let addr = args
        .listen
        .parse()
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    eprintln!(
        "tollgate-rls: {count} limits from {}, counters in {storage}, listening on {addr}",
        args.limits
    );
    tonic::transport::Server::builder()
        .add_service(grpc::RlsServer::new(service))
        .serve(addr)
        .await
        .map_err(|e| format!("server: {e}"))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tollgate-rls: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("tollgate-rls: {e}");
        std::process::exit(1);
    }
}
