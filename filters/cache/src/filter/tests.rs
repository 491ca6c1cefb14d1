#![allow(clippy::type_complexity)]
use super::*;
use tollgate_common::mem_host::MemHost;

const CONFIG: &str = r#"{
  "routes": [
    {"match": {"prefix": "/api/"}, "key": {"query_exclude": ["utm"]},
     "refresh": {"cluster": "products", "strip_prefix": "/api", "add_prefix": ""}},
    {"match": {"prefix": "/sc/"}, "set_cookie": "strip", "stale_if_error": "1h"}
  ],
  "max_total_bytes": 262144, "max_entry_bytes": 16384, "ways": 4,
  "purge": {"path": "/_purge", "key_sha256": "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"}
}"#;

fn root(host: &mut MemHost) -> CacheRoot {
    let mut r = CacheRoot::new(1);
    r.configure(host, CONFIG.as_bytes()).unwrap();
    r
}

/// One request through the filter against an origin answer; returns the local reply, if any,
/// and the response headers the client would see when forwarded.
struct Outcome {
    reply: Option<LocalReply>,
    forwarded: bool,
    response: Vec<(String, String)>,
    request: Vec<(String, String)>,
}

fn run(root: &CacheRoot, host: &mut MemHost, origin: &[(&str, &str)], body: &[u8]) -> Outcome {
    let mut f = root.create_filter(7);
    match f.on_request_headers(host, true) {
        Decision::Respond(r) => {
            return Outcome {
                reply: Some(r),
                forwarded: false,
                response: vec![],
                request: host.headers(MapKind::RequestHeaders),
            }
        }
        Decision::Pause => panic!("unexpected pause"),
        Decision::Continue => {}
    }
    let request = host.headers(MapKind::RequestHeaders);
    host.set_map(MapKind::ResponseHeaders, origin);
    if let Decision::Respond(r) = f.on_response_headers(host, body.is_empty()) {
        return Outcome {
            reply: Some(r),
            forwarded: true,
            response: vec![],
            request,
        };
    }
    if !body.is_empty() {
        host.set_body_bytes(Body::Response, body);
        assert_eq!(
            f.on_response_body(host, body.len(), true),
            Decision::Continue
        );
    }
    Outcome {
        reply: None,
        forwarded: true,
        response: host.headers(MapKind::ResponseHeaders),
        request,
    }
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
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/p/1?utm=x", &[]);
    let o = run(&root, &mut h, FRESH, b"{\"a\":1}");
    assert!(o.forwarded && o.reply.is_none());
    assert_eq!(cs(&o), "tollgate; fwd=uri-miss; stored");

    let mut h = h0.next_request("GET", "/api/p/1?utm=y", &[]);
    h.advance(Duration::from_secs(5));
    let o = run(&root, &mut h, &[], b"");
    let r = o.reply.clone().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{\"a\":1}");
    assert_eq!(r.header("age"), Some("5"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(cs(&o), "tollgate; hit; ttl=55");

    let mut h = h0.next_request("GET", "/api/p/1", &[("if-none-match", "W/\"v1\"")]);
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type"), None);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(h.metric("tollgate.cache.hits"), Some(2));
    assert_eq!(h.metric("tollgate.cache.stores"), Some(1));
}

#[test]
fn unstorable_responses_are_not_stored() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
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
            let mut h = h0.next_request("GET", path, req);
            let o = run(&root, &mut h, res, b"x");
            assert!(o.forwarded, "{path} round {round}");
            assert_eq!(
                cs(&o),
                format!("tollgate; fwd=uri-miss; detail={detail}"),
                "{path}"
            );
        }
    }
    // An authorized request may be stored when the response allows it.
    let mut h = h0.next_request("GET", "/api/auth", &[("authorization", "Bearer t")]);
    run(
        &root,
        &mut h,
        &[(":status", "200"), ("cache-control", "public, max-age=60")],
        b"x",
    );
    let mut h = h0.next_request("GET", "/api/auth", &[]);
    assert!(run(&root, &mut h, &[], b"").reply.is_some());
}

#[test]
fn set_cookie_strip_stores_without_the_cookie() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/sc/1", &[]);
    let o = run(
        &root,
        &mut h,
        &[
            (":status", "200"),
            ("cache-control", "public, max-age=60"),
            ("set-cookie", "s=1"),
        ],
        b"x",
    );
    assert_eq!(header(&o.response, "set-cookie").as_deref(), Some("s=1"));
    let mut h = h0.next_request("GET", "/sc/1", &[]);
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.header("set-cookie"), None);
    assert_eq!(r.body, b"x");
}

#[test]
fn vary_keeps_variants_apart() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let res = |lang: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            (":status", "200"),
            ("cache-control", "max-age=60"),
            ("vary", "Accept-Language"),
            ("content-language", lang),
        ]
    };
    for lang in ["en", "fr"] {
        let mut h = h0.next_request("GET", "/api/v", &[("accept-language", lang)]);
        let o = run(&root, &mut h, &res(lang), lang.as_bytes());
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
        let mut h = h0.next_request("GET", "/api/v", &[("accept-language", lang)]);
        let r = run(&root, &mut h, &[], b"").reply.unwrap();
        assert_eq!(r.body, lang.as_bytes());
    }
    let mut h = h0.next_request("GET", "/api/v", &[("accept-language", "de")]);
    assert!(cs(&run(&root, &mut h, &res("de"), b"de")).contains("vary-miss"));
}

#[test]
fn stale_entries_are_revalidated_and_refreshed_on_304() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let res = [
        (":status", "200"),
        ("cache-control", "max-age=1"),
        ("etag", "\"e1\""),
        ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
    ];
    let mut h = h0.next_request("GET", "/sc/r", &[]);
    run(&root, &mut h, &res, b"body");
    let mut h = h0.next_request("GET", "/sc/r", &[]);
    h.advance(Duration::from_secs(3));
    let o = run(
        &root,
        &mut h,
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
    let mut h = h0.next_request("GET", "/sc/r", &[]);
    h.advance(Duration::from_secs(13));
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.header("cache-status"), Some("tollgate; hit; ttl=20"));
}

#[test]
fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/sc/e", &[]);
    run(
        &root,
        &mut h,
        &[(":status", "200"), ("cache-control", "max-age=1")],
        b"old",
    );
    let mut h = h0.next_request("GET", "/sc/e", &[]);
    h.advance(Duration::from_secs(5));
    let r = run(&root, &mut h, &[(":status", "503")], b"")
        .reply
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"old"[..]));
    assert_eq!(
        r.header("cache-status"),
        Some("tollgate; fwd=stale; fwd-status=503; detail=stale-if-error")
    );
    // /api/ has no stale_if_error default and the response had no directive: the error passes
    let mut h = h0.next_request("GET", "/api/e", &[]);
    run(
        &root,
        &mut h,
        &[(":status", "200"), ("cache-control", "max-age=1")],
        b"old",
    );
    let mut h = h0.next_request("GET", "/api/e", &[]);
    h.advance(Duration::from_secs(5));
    let o = run(&root, &mut h, &[(":status", "503")], b"");
    assert!(o.reply.is_none());
}

#[test]
fn stale_while_revalidate_serves_stale_and_queues_one_refresh() {
    let mut h0 = MemHost::new();
    let mut root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/s?b=2&a=1", &[]);
    run(
        &root,
        &mut h,
        &[
            (":status", "200"),
            ("cache-control", "max-age=1, stale-while-revalidate=30"),
            ("etag", "\"s1\""),
        ],
        b"old",
    );
    for _ in 0..3 {
        let mut h = h0.next_request("GET", "/api/s?a=1&b=2", &[]);
        h.advance(Duration::from_secs(3));
        let r = run(&root, &mut h, &[], b"").reply.unwrap();
        assert_eq!(r.body, b"old");
        assert_eq!(
            r.header("cache-status"),
            Some("tollgate; hit; ttl=-2; detail=stale-while-revalidate")
        );
    }
    assert_eq!(root.shared.jobs.borrow().len(), 1);
    let mut rh = h0.next_request("GET", "/", &[]);
    rh.advance(Duration::from_secs(3));
    root.on_tick(&mut rh);
    assert_eq!(rh.calls.len(), 1);
    let call = &rh.calls[0];
    assert_eq!(call.cluster, "products");
    assert_eq!(call.header(":path"), Some("/s?a=1&b=2"));
    assert_eq!(call.header("if-none-match"), Some("\"s1\""));
    let token = call.token;
    root.on_call_response(
        &mut rh,
        token,
        CallResponse {
            headers: vec![
                (":status".into(), "200".into()),
                ("cache-control".into(), "max-age=60".into()),
            ],
            body: b"new".to_vec(),
        },
    );
    let mut h = h0.next_request("GET", "/api/s?a=1&b=2", &[]);
    h.advance(Duration::from_secs(4));
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.body, b"new");
    assert!(r
        .header("cache-status")
        .unwrap()
        .starts_with("tollgate; hit; ttl="));
}

#[test]
fn request_directives_and_only_if_cached() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/oic", &[("cache-control", "only-if-cached")]);
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.status, 504);
    let mut h = h0.next_request("GET", "/api/oic", &[]);
    run(&root, &mut h, FRESH, b"{\"a\":1}");
    let mut h = h0.next_request("GET", "/api/oic", &[("cache-control", "no-cache")]);
    let o = run(&root, &mut h, FRESH, b"{\"a\":2}");
    assert!(o.forwarded);
    assert_eq!(cs(&o), "tollgate; fwd=request; fwd-status=200; stored");
    let mut h = h0.next_request("GET", "/api/oic", &[("cache-control", "only-if-cached")]);
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.body, b"{\"a\":2}");
}

#[test]
fn unsafe_methods_invalidate_on_success_and_head_uses_get_entries() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/u", &[]);
    run(&root, &mut h, FRESH, b"{\"a\":1}");
    let mut h = h0.next_request("HEAD", "/api/u", &[]);
    assert!(run(&root, &mut h, &[], b"").reply.is_some());
    let mut h = h0.next_request("POST", "/api/u", &[]);
    let o = run(&root, &mut h, &[(":status", "500")], b"");
    assert_eq!(cs(&o), "tollgate; fwd=method");
    let mut h = h0.next_request("GET", "/api/u", &[]);
    assert!(
        run(&root, &mut h, &[], b"").reply.is_some(),
        "a failed POST invalidates nothing"
    );
    let mut h = h0.next_request("DELETE", "/api/u", &[]);
    run(&root, &mut h, &[(":status", "204")], b"");
    let mut h = h0.next_request("GET", "/api/u", &[]);
    assert!(run(&root, &mut h, FRESH, b"{}").forwarded);
    assert_eq!(h.metric("tollgate.cache.invalidations"), Some(1));
}

#[test]
fn large_bodies_stream_through_unstored() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let big = vec![b'x'; 20_000];
    let mut h = h0.next_request("GET", "/api/big", &[]);
    run(
        &root,
        &mut h,
        &[(":status", "200"), ("cache-control", "max-age=60")],
        &big,
    );
    let mut h = h0.next_request("GET", "/api/big", &[]);
    assert!(
        run(
            &root,
            &mut h,
            &[(":status", "200"), ("cache-control", "max-age=60")],
            b"x"
        )
        .forwarded
    );
    assert!(h.metric("tollgate.cache.too_large").unwrap_or(0) >= 1);
}

#[test]
fn purge_endpoint_checks_the_key_and_purges() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/x/1", &[]);
    run(&root, &mut h, FRESH, b"{\"a\":1}");
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
        let mut h = h0.next_request(m, p, hd);
        let r = run(&root, &mut h, &[], b"").reply.unwrap();
        assert_eq!(r.status, *want, "{m} {p}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    let mut h = h0.next_request("GET", "/api/x/1", &[]);
    assert!(run(&root, &mut h, &[], b"").reply.is_some(), "still cached");
    let mut h = h0.next_request(
        "POST",
        "/_purge?prefix=/api/x/",
        &[("x-tollgate-purge-key", "secret")],
    );
    assert_eq!(run(&root, &mut h, &[], b"").reply.unwrap().status, 200);
    let mut h = h0.next_request("GET", "/api/x/1", &[]);
    assert!(run(&root, &mut h, FRESH, b"{}").forwarded);
}

#[test]
fn empty_configuration_passes_untouched() {
    let mut h0 = MemHost::new();
    let mut r = CacheRoot::new(1);
    r.configure(&mut h0, b"{}").unwrap();
    assert_eq!(h0.tick_period, None);
    let mut h = h0.next_request("GET", "/api/p/1", &[]);
    let o = run(&r, &mut h, FRESH, b"{}");
    assert!(o.forwarded && cs(&o).is_empty());
    assert_eq!(h.metric("tollgate.cache.requests"), Some(1));
}

#[test]
fn http_dates() {
    assert_eq!(
        http_date("Thu, 01 Jan 2026 00:00:00 GMT"),
        Some(1_767_225_600)
    );
    assert_eq!(http_date("Thu, 01 Jan 2026 00:00:00 UTC"), None);
    assert_eq!(http_date("garbage"), None);
}

#[test]
fn origin_age_counts_and_upstream_cache_status_is_kept() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/aged", &[]);
    let o = run(
        &root,
        &mut h,
        &[
            (":status", "200"),
            ("cache-control", "max-age=60"),
            ("age", "10"),
            ("cache-status", "origin-cache; hit"),
        ],
        b"x",
    );
    assert_eq!(cs(&o), "origin-cache; hit, tollgate; fwd=uri-miss");
    let mut h = h0.next_request("GET", "/api/aged", &[]);
    h.advance(Duration::from_secs(5));
    let r = run(&root, &mut h, &[], b"").reply.unwrap();
    assert_eq!(r.header("age"), Some("15"));
    assert_eq!(r.headers.iter().filter(|(k, _)| k == "age").count(), 1);
    assert_eq!(r.header("cache-status"), Some("tollgate; hit; ttl=45"));
}

#[test]
fn unsafe_methods_also_invalidate_same_host_location_targets() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    for p in ["/api/l/1", "/api/l/2", "/api/l/3"] {
        let mut h = h0.next_request("GET", p, &[]);
        run(&root, &mut h, FRESH, b"{}");
    }
    let mut h = h0.next_request("POST", "/api/l/new", &[]);
    run(
        &root,
        &mut h,
        &[
            (":status", "201"),
            ("location", "/api/l/1"),
            ("content-location", "http://gateway.test/api/l/2"),
        ],
        b"",
    );
    let mut h = h0.next_request("PATCH", "/api/l/x", &[]);
    run(
        &root,
        &mut h,
        &[
            (":status", "200"),
            ("location", "http://elsewhere.test/api/l/3"),
        ],
        b"",
    );
    for (p, cached) in [("/api/l/1", false), ("/api/l/2", false), ("/api/l/3", true)] {
        let mut h = h0.next_request("GET", p, &[]);
        assert_eq!(
            run(&root, &mut h, FRESH, b"{}").reply.is_some(),
            cached,
            "{p}"
        );
    }
}

#[test]
#[ignore = "timing probe: cargo test --release -p tollgate-cache -- --ignored --nocapture"]
fn hit_path_timing_probe() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/p/1", &[]);
    run(&root, &mut h, FRESH, b"{\"a\":1}");
    let n = 20_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let mut h = h0.next_request("GET", "/api/p/1", &[]);
        let mut f = root.create_filter(7);
        assert!(matches!(
            f.on_request_headers(&mut h, true),
            Decision::Respond(_)
        ));
    }
    eprintln!("hit: {:?}/op", t.elapsed() / n);
    let t = std::time::Instant::now();
    for i in 0..n {
        let mut h = h0.next_request("GET", &format!("/api/miss/{i}"), &[]);
        let o = run(&root, &mut h, FRESH, b"{\"a\":1}");
        assert!(o.reply.is_none());
    }
    eprintln!("miss+store: {:?}/op", t.elapsed() / n);
    let store = root.shared.store;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let p = store.purges(&h0);
        let r: Vec<(String, String)> = vec![];
        let _ = store.lookup(&mut h0, crate::key::fnv64(&[b"x"]), &r, &[], &p);
    }
    eprintln!("lookup miss: {:?}/op", t.elapsed() / n);
    let mut h = h0.next_request("GET", "/api/p/1", &[]);
    let req = h.headers(MapKind::RequestHeaders);
    let uh = crate::key::request_url_key(&h, &root.shared.config.rules.0[0]).hash;
    let p = store.purges(&h0);
    let Lookup::Hit(found) = store.lookup(&mut h, uh, &req, &[], &p) else {
        panic!()
    };
    let e = &found.entry;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(e.meta.at);
        let p = Policy::new(&e.meta.url, &e.meta.req, e.meta.status, &e.meta.headers, at);
        assert!(p.satisfies(&req, h.now));
    }
    eprintln!("policy: {:?}/op", t.elapsed() / n);
}

#[test]
fn hostile_headers_do_not_panic() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
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
        let mut h = h0.next_request("GET", "/api/nasty?%zz=%%&a", reqs);
        h.advance(Duration::from_secs(100));
        let _ = run(&root, &mut h, nasty, b"body");
    }
    for status in ["0", "999", "abc", "304", "503"] {
        let mut h = h0.next_request("GET", "/sc/nasty", reqs);
        h.advance(Duration::from_secs(1000));
        let mut res = nasty.to_vec();
        res[0] = (":status", status);
        let _ = run(&root, &mut h, &res, b"body");
    }
}

#[test]
fn failed_background_refresh_keeps_the_stale_entry() {
    let mut h0 = MemHost::new();
    let mut root = root(&mut h0);
    let mut h = h0.next_request("GET", "/api/f", &[]);
    let swr = [
        (":status", "200"),
        ("cache-control", "max-age=1, stale-while-revalidate=60"),
    ];
    run(&root, &mut h, &swr, b"old");
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
        h0.advance(Duration::from_secs(10));
        let mut h = h0.next_request("GET", "/api/f", &[]);
        let r = run(&root, &mut h, &[], b"").reply.unwrap();
        assert_eq!(r.body, b"old");
        let mut rh = h0.next_request("GET", "/", &[]);
        root.on_tick(&mut rh);
        let token = rh.calls.last().expect("a refresh was started").token;
        root.on_call_response(&mut rh, token, answer);
    }
    assert_eq!(h0.metric("tollgate.cache.refresh_failures"), Some(3));
}

#[test]
fn purge_targets_are_bounded() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let long = format!("/_purge?prefix=/{}", "a".repeat(MAX_PURGE_TARGET));
    let mut h = h0.next_request("POST", &long, &[("x-tollgate-purge-key", "secret")]);
    assert_eq!(run(&root, &mut h, &[], b"").reply.unwrap().status, 400);
    let ok = format!("/_purge?prefix=/{}", "a".repeat(MAX_PURGE_TARGET - 1));
    let mut h = h0.next_request("POST", &ok, &[("x-tollgate-purge-key", "secret")]);
    assert_eq!(run(&root, &mut h, &[], b"").reply.unwrap().status, 200);
}

#[test]
fn overlong_vary_lists_are_not_stored() {
    let mut h0 = MemHost::new();
    let root = root(&mut h0);
    let names: Vec<String> = (0..40).map(|i| format!("x-header-{i}")).collect();
    let vary = names.join(", ");
    let mut h = h0.next_request("GET", "/api/vary-long", &[]);
    let o = run(
        &root,
        &mut h,
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
    let mut h0 = MemHost::new();
    let mut root = root(&mut h0);
    // the leader misses and goes upstream
    let mut hl = h0.next_request("GET", "/api/c", &[]);
    let mut leader = root.create_filter(10);
    assert_eq!(leader.on_request_headers(&mut hl, true), Decision::Continue);
    // two more arrive meanwhile: they wait
    let mut hw = h0.next_request("GET", "/api/c", &[]);
    let mut waiter = root.create_filter(11);
    assert_eq!(waiter.on_request_headers(&mut hw, true), Decision::Pause);
    let mut hh = h0.next_request("HEAD", "/api/c", &[]);
    let mut head = root.create_filter(12);
    assert_eq!(head.on_request_headers(&mut hh, true), Decision::Pause);
    // the leader's response is stored; the root wakes the waiters on its next tick
    hl.set_map(MapKind::ResponseHeaders, FRESH);
    leader.on_response_headers(&mut hl, false);
    hl.set_body_bytes(Body::Response, b"{\"a\":1}");
    leader.on_response_body(&mut hl, 7, true);
    let mut rh = h0.next_request("GET", "/", &[]);
    root.on_tick(&mut rh);
    assert_eq!(rh.woken, vec![(11, WAKE_FETCHED), (12, WAKE_FETCHED)]);
    let Decision::Respond(r) = waiter.on_wake(&mut hw, WAKE_FETCHED) else {
        panic!()
    };
    assert_eq!(r.body, b"{\"a\":1}");
    assert!(r.header("cache-status").unwrap().ends_with("; collapsed"));
    assert!(matches!(
        head.on_wake(&mut hh, WAKE_FETCHED),
        Decision::Respond(_)
    ));
    assert_eq!(hw.metric("tollgate.cache.collapsed"), Some(2));
    assert_eq!(hw.metric("tollgate.cache.stores"), Some(1));
}

#[test]
fn waiters_of_an_unstorable_fetch_go_upstream_themselves() {
    let mut h0 = MemHost::new();
    let mut root = root(&mut h0);
    let mut hl = h0.next_request("GET", "/api/u2", &[]);
    let mut leader = root.create_filter(10);
    assert_eq!(leader.on_request_headers(&mut hl, true), Decision::Continue);
    let mut hw = h0.next_request("GET", "/api/u2", &[]);
    let mut waiter = root.create_filter(11);
    assert_eq!(waiter.on_request_headers(&mut hw, true), Decision::Pause);
    hl.set_map(
        MapKind::ResponseHeaders,
        &[(":status", "200"), ("cache-control", "private")],
    );
    leader.on_response_headers(&mut hl, false);
    let mut rh = h0.next_request("GET", "/", &[]);
    root.on_tick(&mut rh);
    assert_eq!(rh.woken, vec![(11, WAKE_FETCHED)]);
    assert_eq!(waiter.on_wake(&mut hw, WAKE_FETCHED), Decision::Continue);
    hw.set_map(
        MapKind::ResponseHeaders,
        &[(":status", "200"), ("cache-control", "private")],
    );
    waiter.on_response_headers(&mut hw, true);
    assert_eq!(
        hw.header(MapKind::ResponseHeaders, "cache-status")
            .as_deref(),
        Some("tollgate; fwd=uri-miss; detail=not-storable")
    );
    // a leader that ends without an answer (reset) releases its waiters too
    let mut h3 = h0.next_request("GET", "/api/u3", &[]);
    let mut l3 = root.create_filter(20);
    assert_eq!(l3.on_request_headers(&mut h3, true), Decision::Continue);
    let mut h4 = h0.next_request("GET", "/api/u3", &[]);
    let mut w4 = root.create_filter(21);
    assert_eq!(w4.on_request_headers(&mut h4, true), Decision::Pause);
    l3.on_done(&mut h3);
    let mut rh = h0.next_request("GET", "/", &[]);
    root.on_tick(&mut rh);
    assert_eq!(rh.woken, vec![(21, WAKE_FETCHED)]);
}
