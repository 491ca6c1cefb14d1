//! RFC 9111 decisions through the `http-cache-semantics` crate (shared-cache rules:
//! storability, `Authorization`, `private`, `s-maxage`, freshness, heuristic freshness, request
//! directives), plus the stale extensions of RFC 5861 that the crate does not cover.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};

/// Request headers kept with an entry: only what the policy needs (`host`, the headers the
/// response varies on, and whether `authorization` was present: its value is never stored).
pub fn policy_request_headers(
    request: &[(String, String)],
    vary: &[String],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in request {
        let k = k.to_ascii_lowercase();
        if k == "authorization" {
            out.push((k, "(redacted)".to_string()));
        } else if k == "host" || k == ":authority" {
            out.push(("host".to_string(), v.clone()));
        } else if vary.contains(&k) {
            out.push((k, v.clone()));
        }
    }
    out
}

const MAX_AGE_HEADER: u64 = 2_147_483_648;

fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = if k == ":authority" {
            "host"
        } else {
            k.as_str()
        };
        if name.starts_with(':') {
            continue;
        }
        // RFC 9111 5.1: an Age too large to hold is 2^31; an invalid one is ignored. (Also keeps
        // the policy's time arithmetic from overflowing.)
        let clamped;
        let v = if name.eq_ignore_ascii_case("age") {
            match v.trim().parse::<u64>() {
                Ok(n) => {
                    clamped = n.min(MAX_AGE_HEADER).to_string();
                    &clamped
                }
                Err(_) => continue,
            }
        } else {
            v
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            map.append(n, v);
        }
    }
    map
}

fn request_parts(method: &str, url: &str, headers: &[(String, String)]) -> http::request::Parts {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
    parts.uri = url.parse::<Uri>().unwrap_or_default();
    parts.headers = header_map(headers);
    parts
}

fn response_parts(status: u16, headers: &[(String, String)]) -> http::response::Parts {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    parts.headers = header_map(headers);
    parts
}

/// A stored response's policy and the facts derived from it.
pub struct Policy {
    inner: CachePolicy,
}

impl Policy {
    /// The policy of a response to a request (`url` is the cache key's URL).
    pub fn new(
        url: &str,
        request: &[(String, String)],
        status: u16,
        response: &[(String, String)],
        response_time: SystemTime,
    ) -> Policy {
        let req = request_parts("GET", url, request);
        let res = response_parts(status, response);
        let opts = CacheOptions {
            shared: true,
            ..CacheOptions::default()
        };
        Policy {
            inner: CachePolicy::new_options(&req, &res, response_time, opts),
        }
    }

    /// May this response be stored by a shared cache?
    pub fn is_storable(&self) -> bool {
        self.inner.is_storable()
    }

    /// Age at `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.inner.age(now)
    }

    /// Remaining freshness at `now`.
    pub fn ttl(&self, now: SystemTime) -> Duration {
        self.inner.time_to_live(now)
    }

    /// Freshness lifetime (age + ttl at any time while fresh).
    pub fn lifetime(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_add(self.ttl(now))
    }

    /// May a request with these headers be answered from this entry without contacting the
    /// origin (freshness, request `max-age`, `min-fresh`, `max-stale`, `no-cache`)?
    pub fn satisfies(&self, url: &str, request: &[(String, String)], now: SystemTime) -> bool {
        // The variant was chosen by our own Vary matching; give the policy the request's
        // `host` as stored so that its own URL/host/Vary check agrees.
        let req = request_parts("GET", url, request);
        matches!(
            self.inner.before_request(&req, now),
            BeforeRequest::Fresh(_)
        )
    }
}

/// The value of a `Cache-Control` directive in response headers (`None`: absent; `Some("")`:
/// present without value).
pub fn directive(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cache-control"))
        .flat_map(|(_, v)| v.split(','))
        .find_map(|part| {
            let mut kv = part.trim().splitn(2, '=');
            let k = kv.next()?.trim();
            if k.eq_ignore_ascii_case(name) {
                Some(kv.next().unwrap_or("").trim().trim_matches('"').to_string())
            } else {
                None
            }
        })
}

/// A directive's value in seconds.
pub fn directive_secs(headers: &[(String, String)], name: &str) -> Option<u64> {
    directive(headers, name).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: &str = "http://gateway.test/p";

    #[test]
    #[allow(clippy::type_complexity)]
    fn storability_table() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let anon = h(&[("host", "gateway.test")]);
        let auth = h(&[("host", "gateway.test"), ("authorization", "Bearer x")]);
        let cases: &[(&[(String, String)], u16, &[(&str, &str)], bool)] = &[
            (&anon, 200, &[("cache-control", "max-age=60")], true),
            (&anon, 200, &[("cache-control", "public, max-age=60")], true),
            (
                &anon,
                200,
                &[("cache-control", "private, max-age=60")],
                false,
            ),
            (&anon, 200, &[("cache-control", "no-store")], false),
            (&auth, 200, &[("cache-control", "max-age=60")], false),
            (&auth, 200, &[("cache-control", "public, max-age=60")], true),
            (&auth, 200, &[("cache-control", "s-maxage=60")], true),
            (
                &auth,
                200,
                &[("cache-control", "must-revalidate, max-age=60")],
                true,
            ),
            (&anon, 500, &[("cache-control", "max-age=60")], false),
            (
                &anon,
                200,
                &[("expires", "Thu, 01 Jan 2026 00:10:00 GMT")],
                true,
            ),
        ];
        for (req, status, res, want) in cases {
            let p = Policy::new(URL, req, *status, &h(res), t0);
            assert_eq!(p.is_storable(), *want, "{req:?} {status} {res:?}");
        }
    }

    #[test]
    fn freshness_and_request_directives() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let req = h(&[("host", "gateway.test")]);
        let p = Policy::new(URL, &req, 200, &h(&[("cache-control", "max-age=60")]), t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(p.ttl(at(10)), Duration::from_secs(50));
        assert_eq!(p.lifetime(at(10)), Duration::from_secs(60));
        assert!(p.satisfies(URL, &req, at(10)));
        assert!(!p.satisfies(URL, &req, at(61)));
        let with = |cc: &str| h(&[("host", "gateway.test"), ("cache-control", cc)]);
        assert!(!p.satisfies(URL, &with("no-cache"), at(10)));
        assert!(!p.satisfies(URL, &with("max-age=5"), at(10)));
        assert!(p.satisfies(URL, &with("max-age=50"), at(10)));
        assert!(!p.satisfies(URL, &with("min-fresh=55"), at(10)));
        assert!(p.satisfies(URL, &with("max-stale=30"), at(80)));
        assert!(!p.satisfies(URL, &with("max-stale=10"), at(80)));
        // heuristic freshness: 10% of the time since Last-Modified, only without explicit expiry
        let lm = Policy::new(
            URL,
            &req,
            200,
            &h(&[
                ("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT"),
                ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ]),
            t0,
        );
        assert_eq!(lm.lifetime(t0), Duration::from_secs(8640));
        let nc = Policy::new(
            URL,
            &req,
            200,
            &h(&[("cache-control", "no-cache, max-age=60")]),
            t0,
        );
        assert!(!nc.satisfies(URL, &req, t0));
    }

    #[test]
    fn absurd_values_do_not_overflow() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let req = h(&[("host", "gateway.test")]);
        let res = h(&[
            (
                "cache-control",
                "max-age=18446744073709551615, stale-if-error=99999999999999999999",
            ),
            ("age", "18446744073709551615"),
            ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("last-modified", "Mon, 01 Jan 0001 00:00:00 GMT"),
        ]);
        let p = Policy::new(URL, &req, 200, &res, t0);
        let far = t0 + Duration::from_secs(1 << 28);
        assert_eq!(p.age(t0), Duration::from_secs(MAX_AGE_HEADER));
        let _ = (p.lifetime(far), p.ttl(far), p.satisfies(URL, &req, far));
        let bad = Policy::new(
            URL,
            &req,
            200,
            &h(&[("age", "-3"), ("cache-control", "max-age=5")]),
            t0,
        );
        assert_eq!(bad.age(t0), Duration::ZERO);
        let with = h(&[("host", "gateway.test"), ("cache-control", "max-stale=18446744073709551615, min-fresh=18446744073709551615, max-age=18446744073709551615")]);
        let _ = p.satisfies(URL, &with, far);
    }

    #[test]
    fn directives_are_read() {
        let r = h(&[
            ("cache-control", "max-age=1, stale-while-revalidate=30"),
            ("cache-control", "stale-if-error=\"60\""),
        ]);
        assert_eq!(directive_secs(&r, "stale-while-revalidate"), Some(30));
        assert_eq!(directive_secs(&r, "stale-if-error"), Some(60));
        assert_eq!(directive(&r, "max-age").as_deref(), Some("1"));
        assert_eq!(directive(&r, "no-cache"), None);
    }
}
