#![allow(clippy::type_complexity)]
use super::*;
use tollgate_common::testing::Driver;

const CONFIG: &str = r#"{
  "routes": [
    {"match": {"prefix": "/api/"}, "key": {"query_exclude": ["utm"]},
     "refresh": {"cluster": "products", "strip_prefix": "/api", "add_prefix": ""}},
    {"match": {"prefix": "/sc/"}, "set_cookie": "strip", "stale_if_error": "1h"}
  ],
  "max_total_bytes": 262144, "max_entry_bytes": 16384, "ways": 4,
  "purge": {"path": "/_purge", "key_sha256": "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"}
}"#;

fn driver() -> Driver<CacheRoot> {
    Driver::new(CONFIG).unwrap()
}

/// One request through the filter against an origin answer; returns the local reply, if any,
/// and the response headers the client would see when forwarded.
struct Outcome {
    reply: Option<LocalReply>,
    forwarded: bool,
    response: Vec<(String, String)>,
    request: Vec<(String, String)>,
}

fn run(d: &mut Driver<CacheRoot>, id: u32, origin: &[(&str, &str)], body: &[u8]) -> Outcome {
    let request_headers = |d: &Driver<CacheRoot>| {
        d.host(id)
            .map(|h| h.headers(MapKind::RequestHeaders))
            .unwrap_or_default()
    };
    let outcome = match d.request_headers(id, true) {
        Decision::Respond(r) => Outcome {
            reply: Some(r),
            forwarded: false,
            response: vec![],
            request: request_headers(d),
        },
        Decision::Pause => panic!("unexpected pause"),
        Decision::Continue => {
            let request = request_headers(d);
            match d.response_headers(id, origin, body.is_empty()) {
                Decision::Respond(r) => Outcome {
                    reply: Some(r),
                    forwarded: true,
                    response: vec![],
                    request,
                },
                _ => {
                    if !body.is_empty() {
                        assert_eq!(d.response_body(id, body, true), Decision::Continue);
                    }
                    Outcome {
                        reply: None,
                        forwarded: true,
                        response: d.host(id).unwrap().headers(MapKind::ResponseHeaders),
                        request,
                    }
                }
            }
        }
    };
    d.done(id);
    outcome
}

fn cs(o: &Outcome) -> String {
    o.reply
        .as_ref()
        .and_then(|r| r.header("cache-status").map(str::to_string))
        .or_else(|| header(&o.response, "cache-status"))
        .unwrap_or_default()
}

const FRESH: &[(&str, &str)] = &[
    (":status", "200"),
    ("cache-control", "public, max-age=60"),
    ("etag", "\"v1\""),
    ("content-type", "application/json"),
    ("content-length", "7"),
];

#[test]
fn miss_then_hit_with_age_then_304_for_matching_validator() {
    let mut d = driver();
    let h = d.request("GET", "/api/p/1?utm=x", &[]);
    let o = run(&mut d, h, FRESH, b"{\"a\":1}");
    assert!(o.forwarded && o.reply.is_none());
    assert_eq!(cs(&o), "tollgate; fwd=uri-miss; stored");

    let h = d.request("GET", "/api/p/1?utm=y", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(5));
    let o = run(&mut d, h, &[], b"");
    let r = o.reply.clone().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{\"a\":1}");
    assert_eq!(r.header("age"), Some("5"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(cs(&o), "tollgate; hit; ttl=55");

    let h = d.request("GET", "/api/p/1", &[("if-none-match", "W/\"v1\"")]);
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type"), None);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(d.metric("tollgate.cache.hits"), Some(2));
    assert_eq!(d.metric("tollgate.cache.stores"), Some(1));
}

#[test]
fn unstorable_responses_are_not_stored() {
    let mut d = driver();
    let cases: &[(&str, &[(&str, &str)], &[(&str, &str)], &str)] = &[
        (
            "/api/a",
            &[],
            &[(":status", "200"), ("cache-control", "private, max-age=60")],
            "not-storable",
        ),
        (
            "/api/b",
            &[],
            &[(":status", "200"), ("cache-control", "no-store")],
            "not-storable",
        ),
        (
            "/api/c",
            &[("authorization", "Bearer t")],
            &[(":status", "200"), ("cache-control", "max-age=60")],
            "not-storable",
        ),
        (
            "/api/d",
            &[],
            &[
                (":status", "200"),
                ("cache-control", "max-age=60"),
                ("set-cookie", "s=1"),
            ],
            "set-cookie",
        ),
        (
            "/api/e",
            &[],
            &[
                (":status", "200"),
                ("cache-control", "max-age=60"),
                ("vary", "*"),
            ],
            "vary-star",
        ),
        (
            "/api/f",
            &[],
            &[
                (":status", "200"),
                ("cache-control", "max-age=60"),
                ("content-length", "99999"),
            ],
            "too-large",
        ),
        (
            "/api/g",
            &[("cache-control", "no-store")],
            &[(":status", "200"), ("cache-control", "max-age=60")],
            "request-no-store",
        ),
    ];
    for (path, req, res, detail) in cases {
        for round in 0..2 {
            let h = d.request("GET", path, req);
            let o = run(&mut d, h, res, b"x");
            assert!(o.forwarded, "{path} round {round}");
            assert_eq!(
                cs(&o),
                format!("tollgate; fwd=uri-miss; detail={detail}"),
                "{path}"
            );
        }
    }
    // An authorized request may be stored when the response allows it.
    let h = d.request("GET", "/api/auth", &[("authorization", "Bearer t")]);
    run(
        &mut d,
        h,
        &[(":status", "200"), ("cache-control", "public, max-age=60")],
        b"x",
    );
    let h = d.request("GET", "/api/auth", &[]);
    assert!(run(&mut d, h, &[], b"").reply.is_some());
}

#[test]
fn set_cookie_strip_stores_without_the_cookie() {
    let mut d = driver();
    let h = d.request("GET", "/sc/1", &[]);
    let o = run(
        &mut d,
        h,
        &[
            (":status", "200"),
            ("cache-control", "public, max-age=60"),
            ("set-cookie", "s=1"),
        ],
        b"x",
    );
    assert_eq!(header(&o.response, "set-cookie").as_deref(), Some("s=1"));
    let h = d.request("GET", "/sc/1", &[]);
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.header("set-cookie"), None);
    assert_eq!(r.body, b"x");
}

#[test]
fn vary_keeps_variants_apart() {
    let mut d = driver();
    let res = |lang: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            (":status", "200"),
            ("cache-control", "max-age=60"),
            ("vary", "Accept-Language"),
            ("content-language", lang),
        ]
    };
    for lang in ["en", "fr"] {
        let h = d.request("GET", "/api/v", &[("accept-language", lang)]);
        let o = run(&mut d, h, &res(lang), lang.as_bytes());
        assert!(
            cs(&o).contains(if lang == "en" {
                "uri-miss"
            } else {
                "vary-miss"
            }),
            "{}",
            cs(&o)
        );
    }
    for lang in ["en", "fr"] {
        let h = d.request("GET", "/api/v", &[("accept-language", lang)]);
        let r = run(&mut d, h, &[], b"").reply.unwrap();
        assert_eq!(r.body, lang.as_bytes());
    }
    let h = d.request("GET", "/api/v", &[("accept-language", "de")]);
    assert!(cs(&run(&mut d, h, &res("de"), b"de")).contains("vary-miss"));
}

#[test]
fn stale_entries_are_revalidated_and_refreshed_on_304() {
    let mut d = driver();
    let res = [
        (":status", "200"),
        ("cache-control", "max-age=1"),
        ("etag", "\"e1\""),
        ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
    ];
    let h = d.request("GET", "/sc/r", &[]);
    run(&mut d, h, &res, b"body");
    let h = d.request("GET", "/sc/r", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(3));
    let o = run(
        &mut d,
        h,
        &[
            (":status", "304"),
            ("cache-control", "max-age=30"),
            ("etag", "\"e1\""),
        ],
        b"",
    );
    assert_eq!(
        header(&o.request, "if-none-match").as_deref(),
        Some("\"e1\"")
    );
    assert_eq!(
        header(&o.request, "if-modified-since").as_deref(),
        Some("Thu, 01 Jan 2026 00:00:00 GMT")
    );
    let r = o.reply.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"body"[..]));
    assert_eq!(
        r.header("cache-status"),
        Some("tollgate; fwd=stale; fwd-status=304")
    );
    assert_eq!(r.header("cache-control"), Some("max-age=30"));
    // now fresh again for 30s
    let h = d.request("GET", "/sc/r", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(13));
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.header("cache-status"), Some("tollgate; hit; ttl=20"));
}

#[test]
fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    let mut d = driver();
    let h = d.request("GET", "/sc/e", &[]);
    run(
        &mut d,
        h,
        &[(":status", "200"), ("cache-control", "max-age=1")],
        b"old",
    );
    let h = d.request("GET", "/sc/e", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(5));
    let r = run(&mut d, h, &[(":status", "503")], b"").reply.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"old"[..]));
    assert_eq!(
        r.header("cache-status"),
        Some("tollgate; fwd=stale; fwd-status=503; detail=stale-if-error")
    );
    // /api/ has no stale_if_error default and the response had no directive: the error passes
    let h = d.request("GET", "/api/e", &[]);
    run(
        &mut d,
        h,
        &[(":status", "200"), ("cache-control", "max-age=1")],
        b"old",
    );
    let h = d.request("GET", "/api/e", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(5));
    let o = run(&mut d, h, &[(":status", "503")], b"");
    assert!(o.reply.is_none());
}

#[test]
fn stale_while_revalidate_serves_stale_and_queues_one_refresh() {
    let mut d = driver();
    let h = d.request("GET", "/api/s?b=2&a=1", &[]);
    run(
        &mut d,
        h,
        &[
            (":status", "200"),
            ("cache-control", "max-age=1, stale-while-revalidate=30"),
            ("etag", "\"s1\""),
        ],
        b"old",
    );
    for _ in 0..3 {
        let h = d.request("GET", "/api/s?a=1&b=2", &[]);
        d.host_mut(h).unwrap().advance(Duration::from_secs(3));
        let r = run(&mut d, h, &[], b"").reply.unwrap();
        assert_eq!(r.body, b"old");
        assert_eq!(
            r.header("cache-status"),
            Some("tollgate; hit; ttl=-2; detail=stale-while-revalidate")
        );
    }
    assert_eq!(d.root().unwrap().shared.jobs.borrow().len(), 1);
    d.advance(Duration::from_secs(3));
    d.tick();
    assert_eq!(d.vm().calls.len(), 1);
    let call = &d.vm().calls[0].clone();
    assert_eq!(call.cluster, "products");
    assert_eq!(call.header(":path"), Some("/s?a=1&b=2"));
    assert_eq!(call.header("if-none-match"), Some("\"s1\""));
    let token = call.token;
    d.answer(
        token,
        CallResponse {
            headers: vec![
                (":status".into(), "200".into()),
                ("cache-control".into(), "max-age=60".into()),
            ],
            body: b"new".to_vec(),
        },
    );
    let h = d.request("GET", "/api/s?a=1&b=2", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(4));
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.body, b"new");
    assert!(r
        .header("cache-status")
        .unwrap()
        .starts_with("tollgate; hit; ttl="));
}

#[test]
fn request_directives_and_only_if_cached() {
    let mut d = driver();
    let h = d.request("GET", "/api/oic", &[("cache-control", "only-if-cached")]);
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.status, 504);
    let h = d.request("GET", "/api/oic", &[]);
    run(&mut d, h, FRESH, b"{\"a\":1}");
    let h = d.request("GET", "/api/oic", &[("cache-control", "no-cache")]);
    let o = run(&mut d, h, FRESH, b"{\"a\":2}");
    assert!(o.forwarded);
    assert_eq!(cs(&o), "tollgate; fwd=request; fwd-status=200; stored");
    let h = d.request("GET", "/api/oic", &[("cache-control", "only-if-cached")]);
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.body, b"{\"a\":2}");
}

#[test]
fn unsafe_methods_invalidate_on_success_and_head_uses_get_entries() {
    let mut d = driver();
    let h = d.request("GET", "/api/u", &[]);
    run(&mut d, h, FRESH, b"{\"a\":1}");
    let h = d.request("HEAD", "/api/u", &[]);
    assert!(run(&mut d, h, &[], b"").reply.is_some());
    let h = d.request("POST", "/api/u", &[]);
    let o = run(&mut d, h, &[(":status", "500")], b"");
    assert_eq!(cs(&o), "tollgate; fwd=method");
    let h = d.request("GET", "/api/u", &[]);
    assert!(
        run(&mut d, h, &[], b"").reply.is_some(),
        "a failed POST invalidates nothing"
    );
    let h = d.request("DELETE", "/api/u", &[]);
    run(&mut d, h, &[(":status", "204")], b"");
    let h = d.request("GET", "/api/u", &[]);
    assert!(run(&mut d, h, FRESH, b"{}").forwarded);
    assert_eq!(d.metric("tollgate.cache.invalidations"), Some(1));
}

#[test]
fn large_bodies_stream_through_unstored() {
    let mut d = driver();
    let big = vec![b'x'; 20_000];
    let h = d.request("GET", "/api/big", &[]);
    run(
        &mut d,
        h,
        &[(":status", "200"), ("cache-control", "max-age=60")],
        &big,
    );
    let h = d.request("GET", "/api/big", &[]);
    assert!(
        run(
            &mut d,
            h,
            &[(":status", "200"), ("cache-control", "max-age=60")],
            b"x"
        )
        .forwarded
    );
    assert!(d.metric("tollgate.cache.too_large").unwrap_or(0) >= 1);
}

#[test]
fn purge_endpoint_checks_the_key_and_purges() {
    let mut d = driver();
    let h = d.request("GET", "/api/x/1", &[]);
    run(&mut d, h, FRESH, b"{\"a\":1}");
    let cases: &[(&str, &str, &[(&str, &str)], u16)] = &[
        (
            "GET",
            "/_purge?url=/api/x/1",
            &[("x-tollgate-purge-key", "secret")],
            405,
        ),
        ("POST", "/_purge?url=/api/x/1", &[], 401),
        (
            "POST",
            "/_purge?url=/api/x/1",
            &[("x-tollgate-purge-key", "nope")],
            403,
        ),
        (
            "POST",
            "/_purge",
            &[("x-tollgate-purge-key", "secret")],
            400,
        ),
        (
            "POST",
            "/_purge?url=api",
            &[("x-tollgate-purge-key", "secret")],
            400,
        ),
    ];
    for (m, p, hd, want) in cases {
        let h = d.request(m, p, hd);
        let r = run(&mut d, h, &[], b"").reply.unwrap();
        assert_eq!(r.status, *want, "{m} {p}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    let h = d.request("GET", "/api/x/1", &[]);
    assert!(run(&mut d, h, &[], b"").reply.is_some(), "still cached");
    let h = d.request(
        "POST",
        "/_purge?prefix=/api/x/",
        &[("x-tollgate-purge-key", "secret")],
    );
    assert_eq!(run(&mut d, h, &[], b"").reply.unwrap().status, 200);
    let h = d.request("GET", "/api/x/1", &[]);
    assert!(run(&mut d, h, FRESH, b"{}").forwarded);
}

#[test]
fn empty_configuration_passes_untouched() {
    let mut d = Driver::<CacheRoot>::new("{}").unwrap();
    assert_eq!(d.tick_period(), None);
    let h = d.request("GET", "/api/p/1", &[]);
    let o = run(&mut d, h, FRESH, b"{}");
    assert!(o.forwarded && cs(&o).is_empty());
    // one counter per request: its outcome's
    assert_eq!(d.metric("tollgate.cache.uncached"), Some(1));
    assert_eq!(d.metric("tollgate.cache.requests"), None);
}

#[test]
fn origin_age_counts_and_upstream_cache_status_is_kept() {
    let mut d = driver();
    let h = d.request("GET", "/api/aged", &[]);
    let o = run(
        &mut d,
        h,
        &[
            (":status", "200"),
            ("cache-control", "max-age=60"),
            ("age", "10"),
            ("cache-status", "origin-cache; hit"),
        ],
        b"x",
    );
    assert_eq!(cs(&o), "origin-cache; hit, tollgate; fwd=uri-miss");
    let h = d.request("GET", "/api/aged", &[]);
    d.host_mut(h).unwrap().advance(Duration::from_secs(5));
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    assert_eq!(r.header("age"), Some("15"));
    assert_eq!(r.headers.iter().filter(|(k, _)| k == "age").count(), 1);
    assert_eq!(r.header("cache-status"), Some("tollgate; hit; ttl=45"));
}

#[test]
fn unsafe_methods_also_invalidate_same_host_location_targets() {
    let mut d = driver();
    for p in ["/api/l/1", "/api/l/2", "/api/l/3"] {
        let h = d.request("GET", p, &[]);
        run(&mut d, h, FRESH, b"{}");
    }
    let h = d.request("POST", "/api/l/new", &[]);
    run(
        &mut d,
        h,
        &[
            (":status", "201"),
            ("location", "/api/l/1"),
            ("content-location", "http://gateway.test/api/l/2"),
        ],
        b"",
    );
    let h = d.request("PATCH", "/api/l/x", &[]);
    run(
        &mut d,
        h,
        &[
            (":status", "200"),
            ("location", "http://elsewhere.test/api/l/3"),
        ],
        b"",
    );
    for (p, cached) in [("/api/l/1", false), ("/api/l/2", false), ("/api/l/3", true)] {
        let h = d.request("GET", p, &[]);
        assert_eq!(run(&mut d, h, FRESH, b"{}").reply.is_some(), cached, "{p}");
    }
}

#[test]
#[ignore = "timing probe: cargo test --release -p tollgate-cache -- --ignored --nocapture"]
fn hit_path_timing_probe() {
    let mut d = driver();
    let h = d.request("GET", "/api/p/1", &[]);
    run(&mut d, h, FRESH, b"{\"a\":1}");
    let n = 20_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let h = d.request("GET", "/api/p/1", &[]);
        assert!(matches!(d.request_headers(h, true), Decision::Respond(_)));
        d.done(h);
    }
    eprintln!("hit: {:?}/op", t.elapsed() / n);
    let t = std::time::Instant::now();
    for i in 0..n {
        let h = d.request("GET", &format!("/api/miss/{i}"), &[]);
        let o = run(&mut d, h, FRESH, b"{\"a\":1}");
        assert!(o.reply.is_none());
    }
    eprintln!("miss+store: {:?}/op", t.elapsed() / n);
    let shared = d.root().unwrap().shared.clone();
    let store = shared.store;
    let mut h0 = d.vm().worker();
    let t = std::time::Instant::now();
    for _ in 0..n {
        let r: Vec<(String, String)> = vec![];
        let _ = store.lookup(
            &mut h0,
            crate::key::fnv64(&[b"x"]),
            &r,
            &[],
            &Default::default(),
        );
    }
    eprintln!("lookup miss: {:?}/op", t.elapsed() / n);
    let mut h = h0.next_request("GET", "/api/p/1", &[]);
    let req = h.headers(MapKind::RequestHeaders);
    let uh = crate::key::request_url_key(&h, &shared.config.rules.0[0]).hash;
    let (Lookup::Hit(found), _) = store.lookup(&mut h, uh, &req, &[], &Default::default()) else {
        panic!()
    };
    let e = &found.entry;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let r = RequestDirectives::of(&req);
        let v = freshness(&e.meta.f, &r, millis(h.now), true);
        assert!(matches!(v, Verdict::Fresh { .. }));
    }
    eprintln!("freshness: {:?}/op", t.elapsed() / n);
}

#[test]
fn hostile_headers_do_not_panic() {
    let mut d = driver();
    let nasty: &[(&str, &str)] = &[
        (":status", "200"),
        (
            "cache-control",
            "max-age=99999999999999999999999, s-maxage=-1, stale-if-error=x, ,,=",
        ),
        ("age", "18446744073709551615"),
        ("expires", "0"),
        ("date", "Thu, 99 Foo 99999 99:99:99 GMT"),
        ("last-modified", "Thu, 01 Jan 1000 00:00:00 GMT"),
        ("etag", "\"\u{e9}\""),
        ("vary", ",,, ,"),
    ];
    let reqs: &[(&str, &str)] = &[
        (
            "cache-control",
            "max-stale=99999999999999999999, min-fresh=-5, max-age=x",
        ),
        (
            "if-modified-since",
            "Thu, 01 Jan 99999999999999999999 00:00:00 GMT",
        ),
        ("if-none-match", ",,,*"),
    ];
    for _ in 0..3 {
        let h = d.request("GET", "/api/nasty?%zz=%%&a", reqs);
        d.host_mut(h).unwrap().advance(Duration::from_secs(100));
        let _ = run(&mut d, h, nasty, b"body");
    }
    for status in ["0", "999", "abc", "304", "503"] {
        let h = d.request("GET", "/sc/nasty", reqs);
        d.host_mut(h).unwrap().advance(Duration::from_secs(1000));
        let mut res = nasty.to_vec();
        res[0] = (":status", status);
        let _ = run(&mut d, h, &res, b"body");
    }
}

#[test]
fn failed_background_refresh_keeps_the_stale_entry() {
    let mut d = driver();
    let h = d.request("GET", "/api/f", &[]);
    let swr = [
        (":status", "200"),
        ("cache-control", "max-age=1, stale-while-revalidate=60"),
    ];
    run(&mut d, h, &swr, b"old");
    for answer in [
        CallResponse::default(),
        CallResponse {
            headers: vec![(":status".into(), "401".into())],
            body: vec![],
        },
        CallResponse {
            headers: vec![(":status".into(), "503".into())],
            body: vec![],
        },
    ] {
        d.advance(Duration::from_secs(10));
        let h = d.request("GET", "/api/f", &[]);
        let r = run(&mut d, h, &[], b"").reply.unwrap();
        assert_eq!(r.body, b"old");
        d.tick();
        let token = d.vm().calls.last().expect("a refresh was started").token;
        d.answer(token, answer);
    }
    assert_eq!(d.metric("tollgate.cache.refresh_failures"), Some(3));
}

#[test]
fn purge_targets_are_bounded() {
    let mut d = driver();
    let long = format!("/_purge?prefix=/{}", "a".repeat(MAX_PURGE_TARGET));
    let h = d.request("POST", &long, &[("x-tollgate-purge-key", "secret")]);
    assert_eq!(run(&mut d, h, &[], b"").reply.unwrap().status, 400);
    let ok = format!("/_purge?prefix=/{}", "a".repeat(MAX_PURGE_TARGET - 1));
    let h = d.request("POST", &ok, &[("x-tollgate-purge-key", "secret")]);
    assert_eq!(run(&mut d, h, &[], b"").reply.unwrap().status, 200);
}

#[test]
fn overlong_vary_lists_are_not_stored() {
    let mut d = driver();
    let names: Vec<String> = (0..40).map(|i| format!("x-header-{i}")).collect();
    let vary = names.join(", ");
    let h = d.request("GET", "/api/vary-long", &[]);
    let o = run(
        &mut d,
        h,
        &[
            (":status", "200"),
            ("cache-control", "max-age=60"),
            ("vary", &vary),
        ],
        b"x",
    );
    assert!(cs(&o).ends_with("detail=vary-too-long"), "{}", cs(&o));
}

#[test]
fn concurrent_misses_of_one_url_are_collapsed_on_a_worker() {
    let mut d = driver();
    // the leader misses and goes upstream
    let leader = d.request("GET", "/api/c", &[]);
    assert_eq!(d.request_headers(leader, true), Decision::Continue);
    // two more arrive meanwhile: they wait
    let waiter = d.request("GET", "/api/c", &[]);
    assert_eq!(d.request_headers(waiter, true), Decision::Pause);
    let head = d.request("HEAD", "/api/c", &[]);
    assert_eq!(d.request_headers(head, true), Decision::Pause);
    // the leader's response is stored; the root wakes the waiters on its next tick
    d.response_headers(leader, FRESH, false);
    d.response_body(leader, b"{\"a\":1}", true);
    d.tick();
    assert_eq!(
        d.take_woken(),
        vec![(waiter, WAKE_FETCHED), (head, WAKE_FETCHED)]
    );
    let Some(Decision::Respond(r)) = d.wake_decision(waiter, WAKE_FETCHED) else {
        panic!()
    };
    assert_eq!(r.body, b"{\"a\":1}");
    assert!(r.header("cache-status").unwrap().ends_with("; collapsed"));
    assert!(matches!(
        d.wake_decision(head, WAKE_FETCHED),
        Some(Decision::Respond(_))
    ));
    assert_eq!(d.metric("tollgate.cache.collapsed"), Some(2));
    assert_eq!(d.metric("tollgate.cache.stores"), Some(1));
}

#[test]
fn waiters_of_an_unstorable_fetch_go_upstream_themselves() {
    let mut d = driver();
    let leader = d.request("GET", "/api/u2", &[]);
    assert_eq!(d.request_headers(leader, true), Decision::Continue);
    let waiter = d.request("GET", "/api/u2", &[]);
    assert_eq!(d.request_headers(waiter, true), Decision::Pause);
    d.response_headers(
        leader,
        &[(":status", "200"), ("cache-control", "private")],
        false,
    );
    d.tick();
    assert_eq!(d.take_woken(), vec![(waiter, WAKE_FETCHED)]);
    assert_eq!(
        d.wake_decision(waiter, WAKE_FETCHED),
        Some(Decision::Continue)
    );
    d.response_headers(
        waiter,
        &[(":status", "200"), ("cache-control", "private")],
        true,
    );
    assert_eq!(
        d.header(waiter, MapKind::ResponseHeaders, "cache-status")
            .as_deref(),
        Some("tollgate; fwd=uri-miss; detail=not-storable")
    );
    // a leader that ends without an answer (reset) releases its waiters too
    let l3 = d.request("GET", "/api/u3", &[]);
    assert_eq!(d.request_headers(l3, true), Decision::Continue);
    let w4 = d.request("GET", "/api/u3", &[]);
    assert_eq!(d.request_headers(w4, true), Decision::Pause);
    d.done(l3);
    d.tick();
    assert_eq!(d.take_woken(), vec![(w4, WAKE_FETCHED)]);
}

#[test]
fn per_hop_headers_are_not_stored() {
    let mut d = driver();
    let origin: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "public, max-age=60"),
        ("etag", "\"v1\""),
        ("connection", "close, X-Hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("x-envoy-upstream-service-time", "3"),
        ("x-kept", "yes"),
    ];
    let h = d.request("GET", "/api/hop", &[]);
    run(&mut d, h, origin, b"{}");
    let h = d.request("GET", "/api/hop", &[]);
    let r = run(&mut d, h, &[], b"").reply.unwrap();
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "x-envoy-upstream-service-time",
    ] {
        assert_eq!(r.header(gone), None, "{gone}");
    }
    assert_eq!(r.header("x-kept"), Some("yes"));
}

#[test]
fn not_modified_merge_follows_rfc_9111_3_2() {
    let stored = vec![
        ("content-type".to_string(), "text/plain".to_string()),
        ("content-length".to_string(), "7".to_string()),
        ("etag".to_string(), "\"v1\"".to_string()),
        ("x-a".to_string(), "old".to_string()),
        ("age".to_string(), "30".to_string()),
    ];
    let fresh = vec![
        (":status".to_string(), "304".to_string()),
        ("content-type".to_string(), "text/html".to_string()),
        ("content-length".to_string(), "0".to_string()),
        ("X-A".to_string(), "new".to_string()),
        ("set-cookie".to_string(), "s=1".to_string()),
        ("connection".to_string(), "x-b".to_string()),
        ("x-b".to_string(), "hop".to_string()),
    ];
    let mut merged = merge_not_modified(&stored, &fresh);
    merged.sort();
    let want: Vec<(String, String)> = [
        ("content-length", "7"),
        ("content-type", "text/html"),
        ("etag", "\"v1\""),
        ("x-a", "new"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(merged, want);
}

#[test]
fn failed_purge_attempts_are_throttled_per_client() {
    // #15 finding 6: counted per client IP in shared data; past the limit, 429 before hashing.
    let cfg = CONFIG.replace(
        r#""key_sha256": "2bb8"#,
        r#""failure_limit": {"max_failures": 2, "window": "1m"}, "key_sha256": "2bb8"#,
    );
    let mut d = Driver::<CacheRoot>::new(&cfg).unwrap();
    let send = |d: &mut Driver<CacheRoot>, ip: &str, key: &str| {
        let h = d.request(
            "POST",
            "/_purge?url=/api/x/1",
            &[("x-tollgate-purge-key", key)],
        );
        d.host_mut(h)
            .unwrap()
            .set_property(&["source", "address"], &format!("{ip}:1"));
        run(d, h, &[], b"").reply.unwrap()
    };
    assert_eq!(send(&mut d, "10.0.0.1", "nope").status, 403);
    assert_eq!(send(&mut d, "10.0.0.1", "nope").status, 403);
    let r = send(&mut d, "10.0.0.1", "secret");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(send(&mut d, "10.0.0.2", "secret").status, 200);
    assert_eq!(d.metric("tollgate.cache.purge_throttled"), Some(1));
}

#[test]
fn single_ranges_are_served_from_a_stored_complete_response() {
    let mut d = driver();
    let origin: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "public, max-age=60"),
        ("etag", "\"v1\""),
        ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
    ];
    let h = d.request("GET", "/api/range", &[]);
    run(&mut d, h, origin, b"0123456789");
    let ask = |d: &mut Driver<CacheRoot>, headers: &[(&str, &str)]| {
        let h = d.request("GET", "/api/range", headers);
        run(d, h, &[], b"").reply.unwrap()
    };
    let r = ask(&mut d, &[("range", "bytes=2-4")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &b"234"[..]));
    assert_eq!(r.header("content-range"), Some("bytes 2-4/10"));
    let r = ask(&mut d, &[("range", "bytes=-3")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &b"789"[..]));
    let r = ask(&mut d, &[("range", "bytes=10-")]);
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */10"))
    );
    assert!(r.body.is_empty());
    let r = ask(&mut d, &[("range", "bytes=0-1,4-5")]);
    assert_eq!((r.status, r.body.len()), (200, 10));
    for (cond, status) in [
        ("\"v1\"", 206),
        ("W/\"v1\"", 200),
        ("\"v2\"", 200),
        ("Thu, 01 Jan 2026 00:00:00 GMT", 206),
        ("Fri, 02 Jan 2026 00:00:00 GMT", 200),
    ] {
        let r = ask(&mut d, &[("range", "bytes=0-0"), ("if-range", cond)]);
        assert_eq!(r.status, status, "If-Range: {cond}");
    }
}

/// The lead record a worker wrote for the fetch it leads: (key, value).
fn written_lead(d: &Driver<CacheRoot>) -> (String, Vec<u8>) {
    (0..LEAD_BUCKETS)
        .map(|n| format!("tc.lead.{n}"))
        .find_map(|k| {
            let (v, _) = d.vm().shared_get(&k).ok()??;
            (!v.is_empty()).then_some((k, v))
        })
        .unwrap()
}

#[test]
fn a_miss_on_another_worker_waits_for_the_leading_fetch() {
    let mut a = driver();
    let mut b = a.worker(CONFIG).unwrap();
    let leader = a.request("GET", "/api/w", &[]);
    assert_eq!(a.request_headers(leader, true), Decision::Continue);
    let waiter = b.request("GET", "/api/w", &[]);
    assert_eq!(b.request_headers(waiter, true), Decision::Pause);
    b.tick();
    assert!(
        b.take_woken().is_empty(),
        "woken while the fetch is under way"
    );
    a.response_headers(leader, FRESH, false);
    a.response_body(leader, b"{\"w\":1}", true);
    b.tick();
    assert_eq!(b.take_woken(), vec![(waiter, WAKE_FETCHED)]);
    let Some(Decision::Respond(r)) = b.wake_decision(waiter, WAKE_FETCHED) else {
        panic!()
    };
    assert_eq!(r.body, b"{\"w\":1}");
    assert!(r.header("cache-status").unwrap().ends_with("; collapsed"));
}

#[test]
fn two_workers_taking_the_lead_at_once_make_one_fetch() {
    let mut a = driver();
    let mut b = a.worker(CONFIG).unwrap();
    let leader = a.request("GET", "/api/race", &[]);
    assert_eq!(a.request_headers(leader, true), Decision::Continue);
    // worker b read the record before a wrote it, and writes it just after: undo a's write
    // and replay it between b's read and b's write
    let (key, record) = written_lead(&a);
    let mut vm = a.vm().worker();
    vm.shared_set(&key, b"", None).unwrap();
    a.vm().shared.race_next_write(&key, &record);
    let second = b.request("GET", "/api/race", &[]);
    assert_eq!(
        b.request_headers(second, true),
        Decision::Pause,
        "both fetched"
    );
    assert_eq!(b.metric("tollgate.cache.misses"), Some(1), "only a's miss");
    a.response_headers(leader, FRESH, false);
    a.response_body(leader, b"{\"r\":1}", true);
    b.tick();
    assert_eq!(b.take_woken(), vec![(second, WAKE_FETCHED)]);
    let Some(Decision::Respond(r)) = b.wake_decision(second, WAKE_FETCHED) else {
        panic!()
    };
    assert_eq!(r.body, b"{\"r\":1}");
}

#[test]
fn stored_headers_in_place_are_the_copied_ones() {
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let response = h(&[
        (":status", "200"),
        ("Content-Type", "text/plain"),
        ("Connection", "X-Hop, keep-alive"),
        ("x-hop", "1"),
        ("Set-Cookie", "a=1"),
        ("content-length", "3"),
        ("Cache-Control", "max-age=60"),
        ("x-envoy-upstream-service-time", "2"),
        ("ETag", "\"v1\""),
    ]);
    for mode in [SetCookie::Strip, SetCookie::Bypass] {
        assert_eq!(
            into_stored_headers(response.clone(), mode),
            stored_headers(&response, mode)
        );
    }
}

#[test]
fn misses_of_a_url_whose_answer_could_not_be_stored_do_not_wait_for_one_another() {
    let mut a = driver();
    let mut b = a.worker(CONFIG).unwrap();
    let private = [(":status", "200"), ("cache-control", "private")];
    let leader = a.request("GET", "/api/pass", &[]);
    assert_eq!(a.request_headers(leader, true), Decision::Continue);
    a.response_headers(leader, &private, true);
    a.done(leader);
    // on both workers, concurrent misses of that URL now go upstream at once
    let (r1, r2) = (
        a.request("GET", "/api/pass", &[]),
        a.request("GET", "/api/pass", &[]),
    );
    assert_eq!(a.request_headers(r1, true), Decision::Continue);
    assert_eq!(a.request_headers(r2, true), Decision::Continue, "waited");
    let r3 = b.request("GET", "/api/pass", &[]);
    assert_eq!(b.request_headers(r3, true), Decision::Continue, "waited");
    // a storable answer is still stored (and then hit)
    a.response_headers(r1, FRESH, false);
    a.response_body(r1, b"{\"p\":1}", true);
    let hit = a.request("GET", "/api/pass", &[]);
    assert!(matches!(a.request_headers(hit, true), Decision::Respond(_)));
    // a URL whose last answer was stored collapses as before; and after PASS_MS, so does this one
    let l = a.request("GET", "/api/pass2", &[]);
    assert_eq!(a.request_headers(l, true), Decision::Continue);
    a.response_headers(l, &private, true);
    a.done(l);
    a.advance(Duration::from_millis(PASS_MS + 1));
    let (l2, w2) = (
        a.request("GET", "/api/pass2", &[]),
        a.request("GET", "/api/pass2", &[]),
    );
    assert_eq!(a.request_headers(l2, true), Decision::Continue);
    assert_eq!(a.request_headers(w2, true), Decision::Pause);
}

#[test]
fn a_hit_reads_one_shared_data_key_and_counts_one_metric() {
    let mut d = driver();
    let h = d.request("GET", "/api/one", &[]);
    assert!(run(&mut d, h, FRESH, b"{\"a\":1}").forwarded);
    // the first hit on this worker reads the slot and keeps a copy
    let h = d.request("GET", "/api/one", &[]);
    assert!(run(&mut d, h, &[], b"").reply.is_some());
    let (hits, misses) = (
        d.metric("tollgate.cache.hits"),
        d.metric("tollgate.cache.misses"),
    );
    d.count_host_calls(true);
    let id = d.request("GET", "/api/one", &[]);
    let Decision::Respond(r) = d.request_headers(id, true) else {
        panic!("a hit");
    };
    assert_eq!(r.body, b"{\"a\":1}");
    let calls = d.take_host_calls();
    let n = |c: &str| calls.iter().filter(|x| **x == c).count();
    // the set record only: the entry is this worker's copy
    assert_eq!(n("get_shared_data"), 1, "{calls:?}");
    assert_eq!(n("increment_metric"), 1, "{calls:?}");
    assert_eq!(d.metric("tollgate.cache.hits"), hits.map(|n| n + 1));
    assert_eq!(d.metric("tollgate.cache.misses"), misses);
    assert_eq!(d.metric("tollgate.cache.requests"), None);
    // Envoy passes the local reply through this filter's response hooks: nothing is read
    let status = r.status.to_string();
    d.response_headers(id, &[(":status", &status)], false);
    d.response_body(id, &r.body, true);
    d.done(id);
    assert_eq!(d.take_host_calls(), Vec::<&str>::new());
}
