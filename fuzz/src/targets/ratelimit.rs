//! The rate limiting filter's client keys from untrusted request data: `x-forwarded-for`
//! (with trusted hops), the downstream address, identity headers, API keys, query values; and
//! whole requests through the filter with a configuration that uses every key source.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Value};
use tollgate_common::mem_host::MemHost;
use tollgate_common::problem::PROBLEM_JSON;
use tollgate_common::{Decision, HttpFilter, RootFilter};
use tollgate_ratelimit::client::{normalize_ip, strip_port};
use tollgate_ratelimit::RateLimitRoot;

use crate::gen::text;

const ADDRS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.1:5555",
    "[::1]:80",
    "::1",
    "2001:db8:1:2:3:4:5:6",
    "::ffff:10.1.2.3",
    "[2001:db8::1]",
    "unknown",
    "",
    ",",
    ", ",
    ":",
    "[",
    "]",
    "1.2.3.4.5",
    "999.1.1.1",
    "%",
];

fn config() -> &'static str {
    static CELL: OnceLock<String> = OnceLock::new();
    CELL.get_or_init(|| {
        json!({
            "trusted_hops": 2,
            "ipv6_prefix": 56,
            "headers": "both",
            "limits": [
                {"name": "consumer", "quota": 3, "window": "1m", "key": ["consumer"],
                 "applies_to": "identified", "plans": {"free": {"quota": 2}}, "slots": 64},
                {"name": "ip", "quota": 2, "window": "1s", "key": ["client_ip"],
                 "applies_to": "anonymous", "slots": 64},
                {"name": "tenant", "algorithm": "fixed_window", "quota": 5, "window": "1h",
                 "key": [{"header": "x-tenant"}, {"query": "t"}, "route", "api_key"],
                 "shadow": true, "slots": 64}
            ],
            "routes": [
                {"match": {"prefix": "/healthz"}, "disabled": true},
                {"name": "search", "match": {"prefix": "/api/search", "methods": ["GET"]}, "cost": 2,
                 "limits": ["consumer", "ip", "tenant"]},
                {"name": "api", "match": {"prefix": "/api/"}, "limits": ["consumer", "ip", "tenant"]}
            ]
        })
        .to_string()
    })
}

/// Addresses and whole requests.
pub fn request(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        check_addr(s);
    }
    let mut u = Unstructured::new(data);
    let _ = check(&mut u);
}

fn check_addr(s: &str) {
    let ip = strip_port(s);
    assert!(s.contains(ip), "{s:?} -> {ip:?}");
    for prefix in [0, 1, 56, 64, 127, 128, 200] {
        let n = normalize_ip(ip, prefix);
        if let Ok(std::net::IpAddr::V4(v4)) = ip.parse::<std::net::IpAddr>() {
            assert_eq!(n, v4.to_string());
        }
    }
}

fn check(u: &mut Unstructured<'_>) -> Result<()> {
    let addr = text(u, ADDRS, 3)?;
    check_addr(&addr);
    let mut root = RateLimitRoot::new(1);
    let mut vm = MemHost::new();
    if let Err(e) = root.configure(&mut vm, config().as_bytes()) {
        unreachable!("the target's configuration is refused: {e}");
    }
    for n in 0..u.int_in_range(1..=4)? {
        let path = format!(
            "{}?t={}",
            u.choose(&["/api/search", "/api/x", "/healthz", "/other", "/api/"])?,
            text(u, &["a", "%", "&"], 2)?
        );
        let xff = (0..u.int_in_range(0..=4)?)
            .map(|_| text(u, ADDRS, 2))
            .collect::<Result<Vec<_>>>()?
            .join(", ");
        let mut headers: Vec<(&str, String)> = vec![("x-forwarded-for", xff)];
        if u.arbitrary()? {
            headers.push(("x-tollgate-consumer", text(u, &["alice", "", " "], 2)?));
        }
        if u.arbitrary()? {
            headers.push((
                "x-tollgate-plan",
                (*u.choose(&["free", "pro", ""])?).to_string(),
            ));
        }
        if u.arbitrary()? {
            headers.push(("x-tenant", text(u, ADDRS, 2)?));
        }
        if u.arbitrary()? {
            headers.push(("x-api-key", text(u, &["key", "é"], 2)?));
        }
        // Envoy's codecs refuse control characters in header values.
        let headers: Vec<(&str, String)> = headers
            .into_iter()
            .map(|(k, v)| (k, v.replace(char::is_control, "")))
            .collect();
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let method = *u.choose(&["GET", "POST"])?;
        let mut req = vm.next_request(method, &path, &refs);
        req.set_property(&["source", "address"], &addr);
        let mut f = root.create_filter(2 + n);
        let d = f.on_request_headers(&mut req, true);
        match &d {
            Decision::Continue => {}
            Decision::Respond(r) => {
                assert!(r.status == 429 || r.status == 503, "{r:?}");
                assert_eq!(r.header("content-type"), Some(PROBLEM_JSON));
                let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                assert_eq!(
                    body.get("status").and_then(Value::as_u64),
                    Some(u64::from(r.status))
                );
                for (k, v) in &r.headers {
                    assert!(!v.chars().any(char::is_control), "{k}: {v:?}");
                }
            }
            Decision::Pause => {}
        }
        let _ = f.on_response_headers(&mut req, true);
    }
    Ok(())
}
