//! RFC 9111 decisions through the `http-cache-semantics` crate (shared-cache rules:
//! storability, `Authorization`, `private`, `s-maxage`, freshness, heuristic freshness, request
//! directives), plus the stale extensions of RFC 5861 that the crate does not cover.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
#[cfg(test)]
use http_cache_semantics::BeforeRequest;
use http_cache_semantics::{CacheOptions, CachePolicy};

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
    /// Freshness lifetime (RFC 9111 4.2.1), computed once.
    lifetime: Duration,
    /// The response forbids serving it stale (`must-revalidate`).
    must_revalidate: bool,
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
        let inner = CachePolicy::new_options(&req, &res, response_time, opts);
        // At the response time the resident time is zero: age + ttl is the lifetime.
        let lifetime = inner
            .age(response_time)
            .saturating_add(inner.time_to_live(response_time));
        Policy {
            inner,
            lifetime,
            must_revalidate: directive(response, "must-revalidate").is_some(),
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
        self.lifetime.saturating_sub(self.age(now))
    }

    /// Freshness lifetime.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// May a request with these headers be answered from this entry without contacting the
    /// origin? The stored response's freshness (from the crate), then the request's
    /// `no-cache` (and `Pragma: no-cache` without `Cache-Control`), `max-age`, `min-fresh`
    /// and `max-stale`, as the crate's `before_request` decides them (URL, host and `Vary` were
    /// matched by the store). Done here because `before_request` also builds a whole response
    /// head, which is most of the cost of a hit.
    pub fn satisfies(&self, request: &[(String, String)], now: SystemTime) -> bool {
        let has_cc = request
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("cache-control"));
        let pragma_no_cache = !has_cc
            && request
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("pragma") && v.contains("no-cache"));
        if pragma_no_cache || directive(request, "no-cache").is_some() {
            return false;
        }
        let age = self.age(now);
        if directive_secs(request, "max-age").is_some_and(|m| age > Duration::from_secs(m)) {
            return false;
        }
        let ttl = self.lifetime.saturating_sub(age);
        if directive_secs(request, "min-fresh").is_some_and(|m| ttl < Duration::from_secs(m)) {
            return false;
        }
        if self.lifetime <= age {
            let Some(max_stale) = directive(request, "max-stale") else {
                return false;
            };
            if self.must_revalidate {
                return false;
            }
            let stale_by = age - self.lifetime;
            return match max_stale.parse::<u64>() {
                Ok(m) => Duration::from_secs(m) > stale_by,
                // `max-stale` without a value: any staleness.
                Err(_) => true,
            };
        }
        true
    }

    /// The crate's own answer, for the parity test.
    #[cfg(test)]
    fn satisfies_by_crate(&self, url: &str, request: &[(String, String)], now: SystemTime) -> bool {
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
        assert_eq!(p.lifetime(), Duration::from_secs(60));
        assert!(p.satisfies(&req, at(10)));
        assert!(!p.satisfies(&req, at(61)));
        let with = |cc: &str| h(&[("host", "gateway.test"), ("cache-control", cc)]);
        assert!(!p.satisfies(&with("no-cache"), at(10)));
        assert!(!p.satisfies(&with("max-age=5"), at(10)));
        assert!(p.satisfies(&with("max-age=50"), at(10)));
        assert!(!p.satisfies(&with("min-fresh=55"), at(10)));
        assert!(p.satisfies(&with("max-stale=30"), at(80)));
        assert!(!p.satisfies(&with("max-stale=10"), at(80)));
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
        assert_eq!(lm.lifetime(), Duration::from_secs(8640));
        let nc = Policy::new(
            URL,
            &req,
            200,
            &h(&[("cache-control", "no-cache, max-age=60")]),
            t0,
        );
        assert!(!nc.satisfies(&req, t0));
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
        let _ = (p.lifetime(), p.ttl(far), p.satisfies(&req, far));
        let bad = Policy::new(
            URL,
            &req,
            200,
            &h(&[("age", "-3"), ("cache-control", "max-age=5")]),
            t0,
        );
        assert_eq!(bad.age(t0), Duration::ZERO);
        let with = h(&[("host", "gateway.test"), ("cache-control", "max-stale=18446744073709551615, min-fresh=18446744073709551615, max-age=18446744073709551615")]);
        let _ = p.satisfies(&with, far);
    }

    #[test]
    fn request_directives_agree_with_the_crate() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let responses = [
            "max-age=60",
            "max-age=60, must-revalidate",
            "max-age=0",
            "no-cache, max-age=60",
            "s-maxage=30, max-age=5",
            "public",
            "max-age=10, stale-while-revalidate=30",
        ];
        let requests = [
            None,
            Some("no-cache"),
            Some("max-age=5"),
            Some("max-age=100"),
            Some("max-age=x"),
            Some("min-fresh=20"),
            Some("min-fresh=200"),
            Some("max-stale"),
            Some("max-stale=10"),
            Some("max-stale=1000"),
            Some("max-stale=10, min-fresh=5"),
            Some("no-store"),
        ];
        for res in responses {
            let mut rh = h(&[
                ("cache-control", res),
                ("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT"),
            ]);
            rh.push(("date".into(), "Thu, 01 Jan 2026 00:00:00 GMT".into()));
            let p = Policy::new(URL, &h(&[("host", "gateway.test")]), 200, &rh, t0);
            for req in requests {
                let mut r = h(&[("host", "gateway.test")]);
                if let Some(cc) = req {
                    r.push(("cache-control".into(), cc.into()));
                }
                for secs in [0, 3, 20, 45, 59, 61, 75, 200, 5000] {
                    let now = t0 + Duration::from_secs(secs);
                    assert_eq!(
                        p.satisfies(&r, now),
                        p.satisfies_by_crate(URL, &r, now),
                        "response {res}, request {req:?}, at +{secs}s"
                    );
                }
            }
            let pragma = h(&[("host", "gateway.test"), ("pragma", "no-cache")]);
            assert_eq!(
                p.satisfies(&pragma, t0),
                p.satisfies_by_crate(URL, &pragma, t0),
                "{res}"
            );
        }
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
