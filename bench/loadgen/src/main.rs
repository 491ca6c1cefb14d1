//! `tollgate-loadgen`: the HTTP/1.1 load generator of the Tollgate benchmarks (std only).
//!
//! One thread per keep-alive connection. An *operation* is one request, or a sequence of requests
//! sent one after another on the same connection (`--req` given several times: e.g. a client that
//! makes three calls in a row). `{n}` in a path or header value is replaced by the operation's
//! number (plus `--start`), which gives distinct URLs or keys. `{rand:K}` is replaced by K
//! pseudo-random bytes in base64url without padding, different for every operation (a forged
//! signature: a new token on every request that still decodes).
//!
//! Three modes:
//! - `--ops N`: closed loop, exactly N operations (CPU per request is measured around this);
//! - `--rate R --duration S`: open loop. Operation i is *due* at start + i/R whatever happened to
//!   the previous ones; its latency is measured from when it was due (not from when a connection
//!   was free to send it), so a slow answer delays and is charged to every operation queued behind
//!   it (no coordinated omission, as wrk2 does);
//! - `--duration S` alone: closed loop for S seconds (throughput at saturation); with `--ops N`
//!   too, at most N operations in at most S seconds.
//!
//! Prints one JSON object on stdout.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
}

#[derive(Clone, Debug)]
struct Opts {
    addr: SocketAddr,
    host: String,
    reqs: Vec<Req>,
    headers: Vec<(String, String)>,
    body: Option<String>,
    connections: usize,
    ops: Option<u64>,
    rate: Option<f64>,
    duration: Option<f64>,
    start: u64,
    timeout: Duration,
}

const USAGE: &str = "usage: tollgate-loadgen --addr HOST:PORT [--req 'GET /path']... [-H 'name: value']... \
[--body TEXT] [--host NAME] [-c CONNECTIONS] (--ops N [--duration MAX_S] | --rate R --duration S | --duration S) \
[--start N] [--timeout S]";

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = None;
    let mut host = "bench".to_string();
    let mut reqs = Vec::new();
    let mut headers = Vec::new();
    let mut body = None;
    let mut connections = 8usize;
    let mut ops = None;
    let mut rate = None;
    let mut duration = None;
    let mut start = 0u64;
    let mut timeout = 10.0f64;
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--addr" => {
                let v = val("--addr")?;
                addr = v
                    .to_socket_addrs()
                    .map_err(|e| format!("--addr {v}: {e}"))?
                    .next();
            }
            "--host" => host = val("--host")?,
            "--req" => {
                let v = val("--req")?;
                let (m, p) = v
                    .split_once(' ')
                    .ok_or_else(|| format!("--req {v:?}: expected 'METHOD /path'"))?;
                reqs.push(Req {
                    method: m.to_string(),
                    path: p.trim().to_string(),
                });
            }
            "-H" | "--header" => {
                let v = val("-H")?;
                let (k, v2) = v
                    .split_once(':')
                    .ok_or_else(|| format!("-H {v:?}: expected 'name: value'"))?;
                headers.push((k.trim().to_string(), v2.trim().to_string()));
            }
            "--body" => body = Some(val("--body")?),
            "-c" | "--connections" => {
                connections = val("-c")?.parse().map_err(|e| format!("-c: {e}"))?;
            }
            "--ops" => ops = Some(val("--ops")?.parse().map_err(|e| format!("--ops: {e}"))?),
            "--rate" => rate = Some(val("--rate")?.parse().map_err(|e| format!("--rate: {e}"))?),
            "--duration" => {
                duration = Some(val("--duration")?.parse().map_err(|e| format!("--duration: {e}"))?)
            }
            "--start" => start = val("--start")?.parse().map_err(|e| format!("--start: {e}"))?,
            "--timeout" => timeout = val("--timeout")?.parse().map_err(|e| format!("--timeout: {e}"))?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let addr = addr.ok_or_else(|| format!("--addr is required\n{USAGE}"))?;
    if reqs.is_empty() {
        reqs.push(Req {
            method: "GET".into(),
            path: "/".into(),
        });
    }
    if connections == 0 {
        return Err("-c must be at least 1".into());
    }
    match (ops, rate, duration) {
        (Some(_), None, _) | (None, None, Some(_)) => {}
        (None, Some(r), Some(_)) if r > 0.0 => {}
        _ => return Err(format!("choose one of --ops N, --rate R --duration S, --duration S\n{USAGE}")),
    }
    Ok(Opts {
        addr,
        host,
        reqs,
        headers,
        body,
        connections,
        ops,
        rate,
        duration,
        start,
        timeout: Duration::from_secs_f64(timeout),
    })
}

/// One keep-alive connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(opts: &Opts) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&opts.addr, opts.timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(opts.timeout))?;
        s.set_write_timeout(Some(opts.timeout))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, s),
        })
    }

    /// Sends one request and reads its whole response. Returns (status, keep-alive).
    fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        self.reader.get_mut().write_all(request)?;
        read_response(&mut self.reader)
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn read_line(r: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> std::io::Result<()> {
    line.clear();
    let n = r.read_until(b'\n', line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(())
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut line = Vec::with_capacity(256);
    read_line(r, &mut line)?;
    // "HTTP/1.1 200 OK"
    let status = line
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = true;
    loop {
        read_line(r, &mut line)?;
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if let Some((k, v)) = text.split_once(':') {
            let k = k.trim();
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                keep_alive = !v.eq_ignore_ascii_case("close");
            }
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok((status, keep_alive));
    }
    if chunked {
        loop {
            read_line(r, &mut line)?;
            let text = String::from_utf8_lossy(&line);
            let size_text = text.trim().split(';').next().unwrap_or("").to_string();
            let size = u64::from_str_radix(&size_text, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // trailers until an empty line
                loop {
                    read_line(r, &mut line)?;
                    if line == b"\r\n" || line == b"\n" {
                        break;
                    }
                }
                break;
            }
            discard(r, size + 2)?;
        }
    } else if let Some(n) = content_length {
        discard(r, n)?;
    } else {
        let mut sink = Vec::new();
        r.read_to_end(&mut sink)?;
        keep_alive = false;
    }
    Ok((status, keep_alive))
}

fn discard(r: &mut BufReader<TcpStream>, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink())?;
    if copied != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "short body",
        ));
    }
    Ok(())
}

/// `{n}` and every `{rand:K}` of `text` substituted for operation `n`.
fn substitute(text: &str, num: &str, n: u64) -> String {
    let text = text.replace("{n}", num);
    if !text.contains("{rand:") {
        return text;
    }
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // splitmix64 seeded by the operation number.
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u8
    };
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text.as_str();
    while let Some(at) = rest.find("{rand:") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 6..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[at..]);
            return out;
        };
        let Ok(k) = after[..end].parse::<usize>() else {
            out.push_str(&rest[at..at + 6]);
            rest = after;
            continue;
        };
        let bytes: Vec<u8> = (0..k).map(|_| next()).collect();
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The requests of operation `n`, serialized (`{n}` and `{rand:K}` substituted).
fn render(opts: &Opts, n: u64) -> Vec<Vec<u8>> {
    let num = n.to_string();
    opts.reqs
        .iter()
        .map(|req| {
            let mut s = String::with_capacity(256);
            s.push_str(&req.method);
            s.push(' ');
            s.push_str(&substitute(&req.path, &num, n));
            s.push_str(" HTTP/1.1\r\nhost: ");
            s.push_str(&opts.host);
            s.push_str("\r\n");
            for (k, v) in &opts.headers {
                s.push_str(k);
                s.push_str(": ");
                s.push_str(&substitute(v, &num, n));
                s.push_str("\r\n");
            }
            if let Some(b) = &opts.body {
                s.push_str(&format!("content-length: {}\r\n\r\n{}", b.len(), b));
            } else {
                s.push_str("\r\n");
            }
            s.into_bytes()
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    ops: u64,
    requests: u64,
}

fn worker(opts: Arc<Opts>, next: Arc<AtomicU64>, stop: Arc<AtomicBool>, t0: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    let total_ops = match (opts.ops, opts.rate, opts.duration) {
        (Some(n), _, _) => Some(n),
        (None, Some(r), Some(d)) => Some((r * d).round() as u64),
        _ => None,
    };
    // closed loop: --duration alone, or a time cap on --ops
    let deadline = match (opts.rate, opts.duration) {
        (None, Some(d)) => Some(t0 + Duration::from_secs_f64(d)),
        _ => None,
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if let Some(total) = total_ops {
            if i >= total {
                break;
            }
        }
        if let Some(dl) = deadline {
            if Instant::now() >= dl {
                break;
            }
        }
        let due = match opts.rate {
            Some(r) => {
                let due = t0 + Duration::from_secs_f64(i as f64 / r);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                due
            }
            None => Instant::now(),
        };
        let requests = render(&opts, i + opts.start);
        let mut failed = None;
        for req in &requests {
            if conn.is_none() {
                match Conn::open(&opts) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        failed = Some(format!("connect: {}", e.kind()));
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            match c.exchange(req) {
                Ok((status, keep)) => {
                    tally.requests += 1;
                    *tally.statuses.entry(status).or_default() += 1;
                    if !keep {
                        conn = None;
                    }
                }
                Err(e) => {
                    conn = None;
                    failed = Some(format!("{}", e.kind()));
                    break;
                }
            }
        }
        let elapsed = due.elapsed();
        tally.ops += 1;
        match failed {
            Some(kind) => {
                tally.errors += 1;
                *tally.error_kinds.entry(kind).or_default() += 1;
                if opts.rate.is_none() {
                    // do not spin on a dead server
                    thread::sleep(Duration::from_millis(10));
                }
            }
            None => tally.latencies_us.push(elapsed.as_micros() as u64),
        }
    }
    tally
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.saturating_sub(1).min(sorted.len() - 1);
    sorted.get(idx).copied().unwrap_or(0)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now() + Duration::from_millis(5);
    let mut handles = Vec::new();
    for _ in 0..opts.connections {
        let (o, n, s, r) = (opts.clone(), next.clone(), stop.clone(), results.clone());
        handles.push(thread::spawn(move || {
            let t = worker(o, n, s, t0);
            if let Ok(mut v) = r.lock() {
                v.push(t);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut all = Tally::default();
    if let Ok(mut v) = results.lock() {
        for t in v.drain(..) {
            all.latencies_us.extend(t.latencies_us);
            for (k, c) in t.statuses {
                *all.statuses.entry(k).or_default() += c;
            }
            for (k, c) in t.error_kinds {
                *all.error_kinds.entry(k).or_default() += c;
            }
            all.errors += t.errors;
            all.ops += t.ops;
            all.requests += t.requests;
        }
    }
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    let statuses: Vec<String> = all
        .statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    let kinds: Vec<String> = all
        .error_kinds
        .iter()
        .map(|(k, v)| format!("\"{}\":{v}", k.replace('"', "'")))
        .collect();
    let mean = if l.is_empty() {
        0.0
    } else {
        l.iter().sum::<u64>() as f64 / l.len() as f64
    };
    println!(
        "{{\"ops\":{},\"requests\":{},\"errors\":{},\"error_kinds\":{{{}}},\"statuses\":{{{}}},\
\"elapsed_s\":{:.6},\"ops_per_s\":{:.1},\"latency_us\":{{\"mean\":{:.1},\"p50\":{},\"p90\":{},\
\"p99\":{},\"p999\":{},\"max\":{}}}}}",
        all.ops,
        all.requests,
        all.errors,
        kinds.join(","),
        statuses.join(","),
        elapsed,
        all.ops as f64 / elapsed.max(1e-9),
        mean,
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        percentile(l, 99.9),
        l.last().copied().unwrap_or(0),
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::substitute;

    #[test]
    fn rand_placeholder_is_base64url_of_fresh_bytes() {
        let a = substitute("x.{rand:64}.{n}", "7", 7);
        let b = substitute("x.{rand:64}.{n}", "8", 8);
        assert_ne!(a, b);
        assert_eq!(a, substitute("x.{rand:64}.{n}", "7", 7));
        assert!(a.starts_with("x.") && a.ends_with(".7"));
        let sig = &a[2..a.len() - 2];
        assert_eq!(sig.len(), 86);
        // 64 bytes: the last character carries 2 bits, its 4 low bits are zero.
        let last = sig.as_bytes()[85];
        let idx = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            .iter()
            .position(|c| *c == last)
            .unwrap();
        assert_eq!(idx & 15, 0);
        assert_eq!(substitute("{rand:256}", "1", 1).len(), 342);
        assert_eq!(substitute("{rand:x}{n}", "1", 1), "{rand:x}1");
        assert_eq!(substitute("{rand:3", "1", 1), "{rand:3");
    }
}
