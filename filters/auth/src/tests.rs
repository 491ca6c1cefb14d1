//! Filter tests on MemHost: the whole request path with inline keys, API keys, remote keys
//! (fetch, wait, wake, refetch, failure), introspection and authorization.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_common::mem_host::MemHost;
use tollgate_common::{CallResponse, Decision, Host, HttpFilter, MapKind, RootFilter};

use crate::filter::AuthRoot;
use crate::jose::b64url_encode;
use crate::keyset::{WAKE_FETCHED, WAKE_TIMEOUT};

const SECRET: [u8; 32] = [42u8; 32];
const NOW: i64 = 1_767_225_600; // MemHost's clock
const ES_D: &str = "ysQY_36uOrytF3diIIO_LwvLsIoX5MdAo9i1-b5o0XU";
const ES_PUB: &str = r#"{"kty":"EC","crv":"P-256","kid":"es","x":"aa0nWgETctJpaXXZtcfSQUBtXo2Z2Cb7B_HlwJCK-Wk","y":"lfo6v6CStrhix-FIVGehxIAjwEuzWuNuoCiRo7tUowA"}"#;

fn hs(header: Value, claims: Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(claims.to_string().as_bytes())
    );
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(input.as_bytes());
    format!("{input}.{}", b64url_encode(&m.finalize().into_bytes()))
}

fn es(kid: &str, claims: Value) -> String {
    use p256::ecdsa::signature::Signer;
    let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let input = format!(
        "{}.{}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(claims.to_string().as_bytes())
    );
    let sk = p256::ecdsa::SigningKey::from_slice(&crate::jose::b64url(ES_D).unwrap()).unwrap();
    let sig: p256::ecdsa::Signature = sk.sign(input.as_bytes());
    format!("{input}.{}", b64url_encode(&sig.to_bytes()))
}

fn claims(extra: Value) -> Value {
    let mut c =
        json!({"iss": "https://idp", "aud": "api", "sub": "alice", "iat": NOW, "exp": NOW + 600});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn good_hs() -> String {
    hs(
        json!({"alg": "HS256", "kid": "hs"}),
        claims(json!({})),
        &SECRET,
    )
}

fn inline_config() -> String {
    json!({
        "providers": [{
            "name": "idp", "issuer": "https://idp", "audiences": ["api", "other"],
            "algorithms": ["HS256", "ES256"],
            "jwks": {"keys": [
                {"kty": "oct", "kid": "hs", "k": b64url_encode(&SECRET)},
                serde_json::from_str::<Value>(ES_PUB).unwrap()
            ]},
            "claim_headers": [{"claim": "org.id", "header": "x-org"}, {"claim": "roles", "header": "x-roles"}],
            "payload_header": "x-jwt-payload",
            "plan_claim": "plan"
        }],
        "api_keys": {
            "keys": [
                {"sha256": hex::<32>(Sha256::digest(b"key-pro").into()), "consumer": "acme", "metadata": {"plan": "pro", "tier": "gold"}},
                {"sha256": hex::<32>(Sha256::digest(b"key-old").into()), "consumer": "old", "expires": "2025-01-01T00:00:00Z"}
            ]
        },
        "routes": [
            {"match": {"prefix": "/public"}, "disabled": true},
            {"match": {"prefix": "/admin"}, "allow": ["idp"], "claims": [{"claim": "roles", "any_of": ["admin"]}]},
            {"match": {"prefix": "/orders"}, "scopes": ["orders:read"]},
            {"match": {"prefix": "/maybe"}, "requirement": "allow_missing"},
            {"match": {"prefix": "/opt"}, "requirement": "optional"},
            {"match": {"prefix": "/"}}
        ]
    })
    .to_string()
}

fn hex<const N: usize>(b: [u8; N]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn root(config: &str) -> (AuthRoot, MemHost) {
    let mut r = AuthRoot::new(1);
    let mut h = MemHost::new();
    r.configure(&mut h, config.as_bytes()).unwrap();
    (r, h)
}

fn status(d: &Decision) -> u16 {
    match d {
        Decision::Continue => 0,
        Decision::Pause => 1,
        Decision::Respond(r) => r.status,
    }
}

fn reason(d: &Decision) -> String {
    match d {
        Decision::Respond(r) => {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["reason"].as_str().unwrap_or_default().to_string()
        }
        _ => String::new(),
    }
}

#[test]
fn empty_configuration_passes_untouched() {
    let (r, h) = root("{}");
    let mut req = h.next_request("GET", "/x", &[("x-tollgate-consumer", "forged")]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "x-tollgate-consumer")
            .as_deref(),
        Some("forged")
    );
    assert_eq!(req.metric("tollgate.auth.requests"), Some(1));
}

#[test]
fn table_of_tokens() {
    let (r, h) = root(&inline_config());
    let bearer = |t: &str| format!("Bearer {t}");
    let wrong_secret = hs(json!({"alg": "HS256"}), claims(json!({})), &[1u8; 32]);
    let mut tampered = good_hs();
    tampered.push('A');
    let big = "a".repeat(10_000);
    // Key confusion: HS256 "signed" with the EC public key's bytes.
    let confusion = hs(
        json!({"alg": "HS256", "kid": "es"}),
        claims(json!({})),
        ES_PUB.as_bytes(),
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("valid HS256", bearer(&good_hs()), 0, ""),
        ("valid ES256", bearer(&es("es", claims(json!({})))), 0, ""),
        ("lower-case scheme", format!("bearer {}", good_hs()), 0, ""),
        ("wrong secret", bearer(&wrong_secret), 401, "bad_signature"),
        ("tampered", bearer(&tampered), 401, "bad_signature"),
        (
            "alg none",
            bearer(&format!(
                "{}.{}.",
                b64url_encode(br#"{"alg":"none"}"#),
                b64url_encode(claims(json!({})).to_string().as_bytes())
            )),
            401,
            "alg_not_allowed",
        ),
        (
            "alg none with sig",
            bearer(&hs(json!({"alg": "none"}), claims(json!({})), &SECRET)),
            401,
            "alg_not_allowed",
        ),
        (
            "HS512 not allowed",
            bearer(&hs(json!({"alg": "HS512"}), claims(json!({})), &SECRET)),
            401,
            "alg_not_allowed",
        ),
        (
            "embedded jwk",
            bearer(&hs(
                json!({"alg": "HS256", "jwk": {"kty": "oct"}}),
                claims(json!({})),
                &SECRET,
            )),
            401,
            "embedded_key",
        ),
        (
            "jku",
            bearer(&hs(
                json!({"alg": "HS256", "jku": "http://evil"}),
                claims(json!({})),
                &SECRET,
            )),
            401,
            "embedded_key",
        ),
        (
            "crit",
            bearer(&hs(
                json!({"alg": "HS256", "crit": ["x"], "x": 1}),
                claims(json!({})),
                &SECRET,
            )),
            401,
            "crit",
        ),
        ("key confusion", bearer(&confusion), 401, "no_key"),
        (
            "unknown kid",
            bearer(&hs(
                json!({"alg": "HS256", "kid": "nope"}),
                claims(json!({})),
                &SECRET,
            )),
            401,
            "unknown_kid",
        ),
        (
            "expired",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"exp": NOW - 61})),
                &SECRET,
            )),
            401,
            "expired",
        ),
        (
            "expired within skew",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"exp": NOW - 30})),
                &SECRET,
            )),
            0,
            "",
        ),
        (
            "no exp",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"exp": null})),
                &SECRET,
            )),
            401,
            "missing_exp",
        ),
        (
            "exp not a number",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"exp": "soon"})),
                &SECRET,
            )),
            401,
            "malformed",
        ),
        (
            "nbf future",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"nbf": NOW + 300})),
                &SECRET,
            )),
            401,
            "not_yet_valid",
        ),
        (
            "iat future",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"iat": NOW + 300})),
                &SECRET,
            )),
            401,
            "issued_in_future",
        ),
        (
            "wrong issuer",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"iss": "https://evil"})),
                &SECRET,
            )),
            401,
            "unknown_issuer",
        ),
        (
            "no issuer",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"iss": null})),
                &SECRET,
            )),
            401,
            "unknown_issuer",
        ),
        (
            "wrong audience",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"aud": "x"})),
                &SECRET,
            )),
            401,
            "wrong_audience",
        ),
        (
            "audience list",
            bearer(&hs(
                json!({"alg": "HS256"}),
                claims(json!({"aud": ["x", "other"]})),
                &SECRET,
            )),
            0,
            "",
        ),
        (
            "payload not JSON",
            bearer(&format!(
                "{}.{}.AAAA",
                b64url_encode(br#"{"alg":"HS256"}"#),
                b64url_encode(b"nope")
            )),
            401,
            "malformed",
        ),
        (
            "header not base64",
            bearer("!!!.e30.AAAA"),
            401,
            "malformed",
        ),
        (
            "duplicate claim",
            bearer(&{
                let input = format!(
                    "{}.{}",
                    b64url_encode(br#"{"alg":"HS256"}"#),
                    b64url_encode(br#"{"iss":"https://idp","iss":"https://idp"}"#)
                );
                let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&SECRET).unwrap();
                m.update(input.as_bytes());
                format!("{input}.{}", b64url_encode(&m.finalize().into_bytes()))
            }),
            401,
            "malformed",
        ),
        ("100 KB", bearer(&big), 401, "token_too_large"),
        (
            "opaque, no introspection",
            bearer("opaque-token"),
            401,
            "malformed",
        ),
        ("missing", String::new(), 401, "missing"),
    ];
    for (name, auth, want, why) in cases {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth.as_str())]
        };
        let mut req = h.next_request("GET", "/x", &headers);
        let d = r.create_filter(2).on_request_headers(&mut req, true);
        assert_eq!(status(&d), want, "{name}: {d:?}");
        assert_eq!(reason(&d), why, "{name}");
        if let Decision::Respond(reply) = &d {
            let body = String::from_utf8_lossy(&reply.body).to_string();
            assert!(
                auth.is_empty() || !body.contains(auth.trim_start_matches("Bearer ")),
                "{name}: echoes the token"
            );
            let www = reply.header("www-authenticate").unwrap();
            assert!(
                www.starts_with("Bearer realm=\"tollgate\""),
                "{name}: {www}"
            );
            if !why.is_empty() && why != "missing" {
                assert!(www.contains("error=\"invalid_token\""), "{name}: {www}");
            }
            assert_eq!(
                reply.header("content-type"),
                Some("application/problem+json")
            );
        }
    }
}

#[test]
fn forwards_claims_and_strips_forged_headers() {
    let (r, h) = root(&inline_config());
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"org": {"id": "o-1"}, "roles": ["admin", "dev"], "plan": "gold"})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    let mut req = h.next_request(
        "GET",
        "/x",
        &[
            ("authorization", &auth),
            ("x-tollgate-consumer", "mallory"),
            ("x-org", "evil"),
            ("x-tollgate-tier", "x"),
        ],
    );
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    let hv = |n: &str| req.header(MapKind::RequestHeaders, n);
    assert_eq!(hv("x-tollgate-consumer").as_deref(), Some("alice"));
    assert_eq!(hv("x-tollgate-plan").as_deref(), Some("gold"));
    assert_eq!(hv("x-org").as_deref(), Some("o-1"));
    assert_eq!(hv("x-roles").as_deref(), Some("admin,dev"));
    assert_eq!(hv("x-tollgate-tier"), None);
    assert_eq!(hv("x-jwt-payload").as_deref(), t.split('.').nth(1));
    assert_eq!(req.metric("tollgate.auth.forged_headers_removed"), Some(3));
    // A disabled route still has forged identity headers removed.
    let mut req = h.next_request("GET", "/public/x", &[("x-tollgate-consumer", "mallory")]);
    assert_eq!(
        r.create_filter(3).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "x-tollgate-consumer"),
        None
    );
}

#[test]
fn api_keys() {
    let (r, h) = root(&inline_config());
    let cases: &[(&str, u16, &str)] = &[
        ("key-pro", 0, ""),
        ("key-wrong", 401, "invalid_api_key"),
        ("key-old", 401, "expired_api_key"),
    ];
    for (key, want, why) in cases {
        let mut req = h.next_request("GET", "/x", &[("x-api-key", key)]);
        let d = r.create_filter(2).on_request_headers(&mut req, true);
        assert_eq!(status(&d), *want, "{key}");
        assert_eq!(reason(&d), *why, "{key}");
        if *want == 0 {
            assert_eq!(
                req.header(MapKind::RequestHeaders, "x-tollgate-consumer")
                    .as_deref(),
                Some("acme")
            );
            assert_eq!(
                req.header(MapKind::RequestHeaders, "x-tollgate-plan")
                    .as_deref(),
                Some("pro")
            );
            assert_eq!(
                req.header(MapKind::RequestHeaders, "x-tollgate-tier")
                    .as_deref(),
                Some("gold")
            );
        } else if let Decision::Respond(reply) = &d {
            assert!(reply
                .header("www-authenticate")
                .unwrap()
                .starts_with("ApiKey"));
            assert!(!String::from_utf8_lossy(&reply.body).contains(key));
        }
    }
    // Missing key on an API-key-only route: only the ApiKey challenge.
    let cfg = json!({"api_keys": {"keys": []}, "routes": [{"match": {}}]}).to_string();
    let (r2, h2) = root(&cfg);
    let mut req = h2.next_request("GET", "/x", &[("authorization", "Bearer x.y.z")]);
    let d = r2.create_filter(2).on_request_headers(&mut req, true);
    assert_eq!(reason(&d), "missing");
    if let Decision::Respond(reply) = &d {
        assert_eq!(
            reply.header("www-authenticate"),
            Some("ApiKey realm=\"tollgate\"")
        );
    }
    // The admin route accepts only the JWT provider.
    let mut req = h.next_request("GET", "/admin", &[("x-api-key", "key-pro")]);
    assert_eq!(
        status(&r.create_filter(2).on_request_headers(&mut req, true)),
        401
    );
}

#[test]
fn authorization_and_requirements() {
    let (r, h) = root(&inline_config());
    let run = |path: &str, extra: Value| {
        let t = hs(json!({"alg": "HS256"}), claims(extra), &SECRET);
        let auth = format!("Bearer {t}");
        let mut req = h.next_request("GET", path, &[("authorization", &auth)]);
        r.create_filter(2).on_request_headers(&mut req, true)
    };
    assert_eq!(
        status(&run("/orders/1", json!({"scope": "orders:read x"}))),
        0
    );
    assert_eq!(
        status(&run("/orders/1", json!({"scp": ["orders:read"]}))),
        0
    );
    let d = run("/orders/1", json!({"scope": "users:read"}));
    assert_eq!(status(&d), 403);
    if let Decision::Respond(reply) = &d {
        let www = reply.header("www-authenticate").unwrap();
        assert!(
            www.contains("error=\"insufficient_scope\"") && www.contains("scope=\"orders:read\""),
            "{www}"
        );
    }
    assert_eq!(
        status(&run("/admin", json!({"roles": ["dev", "admin"]}))),
        0
    );
    assert_eq!(
        reason(&run("/admin", json!({"roles": ["dev"]}))),
        "claim_mismatch"
    );
    // allow_missing: no token passes, a bad one does not.
    let mut req = h.next_request("GET", "/maybe", &[]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(status(&run("/maybe", json!({"exp": NOW - 1000}))), 401);
    // optional: a bad token passes without identity.
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"exp": NOW - 1000})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    let mut req = h.next_request("GET", "/opt", &[("authorization", &auth)]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "x-tollgate-consumer"),
        None
    );
}

#[test]
fn verified_tokens_are_cached_until_they_expire() {
    let (r, mut h) = root(&inline_config());
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"exp": NOW + 100})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    for _ in 0..3 {
        let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
        assert_eq!(
            r.create_filter(2).on_request_headers(&mut req, true),
            Decision::Continue
        );
    }
    assert_eq!(h.metric("tollgate.auth.token_cache_hits"), Some(2));
    h.advance(Duration::from_secs(200));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(
        reason(&r.create_filter(2).on_request_headers(&mut req, true)),
        "expired"
    );
}

fn remote_config(extra: Value) -> String {
    let mut p = json!({
        "name": "idp", "issuer": "https://idp", "algorithms": ["ES256"],
        "remote_jwks": {"cluster": "idp", "path": "/jwks", "cache_duration": "60s", "timeout": "1s", "refetch_interval": "10s"}
    });
    for (k, v) in extra.as_object().unwrap() {
        p["remote_jwks"][k] = v.clone();
    }
    json!({"providers": [p], "routes": [{"match": {}}]}).to_string()
}

fn ok(body: &str) -> CallResponse {
    CallResponse {
        headers: vec![(":status".into(), "200".into())],
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn remote_keys_fetched_at_start_and_waiters_woken() {
    let (mut r, mut h) = root(&remote_config(json!({})));
    assert_eq!(h.tick_period, Some(Duration::from_millis(50)));
    // A request before the keys arrive waits.
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f = r.create_filter(7);
    assert_eq!(f.on_request_headers(&mut req, true), Decision::Pause);
    r.on_tick(&mut h);
    assert_eq!(h.calls.len(), 1);
    assert_eq!(h.calls[0].header(":path"), Some("/jwks"));
    r.on_tick(&mut h);
    assert_eq!(h.calls.len(), 1, "one fetch at a time");
    let token = h.calls[0].token;
    r.on_call_response(&mut h, token, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(h.woken, vec![(7, WAKE_FETCHED)]);
    assert_eq!(f.on_wake(&mut req, WAKE_FETCHED), Decision::Continue);
    assert_eq!(h.metric("tollgate.auth.jwks_fetches"), Some(1));
    // Stored in shared data for the other workers.
    assert!(h.shared_get("tollgate.auth.jwks.idp").unwrap().is_some());
    // Another worker adopts them on its first tick without fetching.
    let mut r2 = AuthRoot::new(1);
    let mut h2 = h.next_request("GET", "/", &[]);
    r2.configure(&mut h2, remote_config(json!({})).as_bytes())
        .unwrap();
    r2.on_tick(&mut h2);
    assert!(h2.calls.is_empty());
    let mut req = h2.next_request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(
        r2.create_filter(8).on_request_headers(&mut req, true),
        Decision::Continue
    );
    // Refreshed before expiry (80% of 60 s).
    h.advance(Duration::from_secs(50));
    r.on_tick(&mut h);
    assert_eq!(h.calls.len(), 2);
}

#[test]
fn unknown_kid_refetches_once_per_interval() {
    let (mut r, mut h) = root(&remote_config(json!({})));
    r.on_tick(&mut h);
    let t0 = h.calls[0].token;
    r.on_call_response(&mut h, t0, ok(r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"old","x":"aa0nWgETctJpaXXZtcfSQUBtXo2Z2Cb7B_HlwJCK-Wk","y":"lfo6v6CStrhix-FIVGehxIAjwEuzWuNuoCiRo7tUowA"}]}"#));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f = r.create_filter(9);
    assert_eq!(f.on_request_headers(&mut req, true), Decision::Pause);
    r.on_tick(&mut h);
    assert_eq!(h.calls.len(), 2, "refetch for the unknown kid");
    let t1 = h.calls[1].token;
    // Rotation: the new JWKS has the key.
    r.on_call_response(&mut h, t1, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(f.on_wake(&mut req, WAKE_FETCHED), Decision::Continue);
    // Another unknown kid within the interval: refused at once, no fetch.
    let auth2 = format!("Bearer {}", es("other", claims(json!({}))));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth2)]);
    let d = r.create_filter(10).on_request_headers(&mut req, true);
    assert_eq!(reason(&d), "unknown_kid");
    r.on_tick(&mut h);
    assert_eq!(h.calls.len(), 2);
}

#[test]
fn fetch_failures_answer_503_and_timeouts_too() {
    for (name, resp) in [
        ("down", CallResponse::default()),
        ("garbage", ok("this is not JSON <html>")),
        (
            "500",
            CallResponse {
                headers: vec![(":status".into(), "500".into())],
                body: vec![],
            },
        ),
    ] {
        let (mut r, mut h) = root(&remote_config(json!({})));
        let auth = format!("Bearer {}", es("es", claims(json!({}))));
        let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
        let mut f = r.create_filter(7);
        assert_eq!(
            f.on_request_headers(&mut req, true),
            Decision::Pause,
            "{name}"
        );
        r.on_tick(&mut h);
        let t = h.calls[0].token;
        r.on_call_response(&mut h, t, resp);
        assert_eq!(h.woken, vec![(7, WAKE_FETCHED)], "{name}");
        let d = f.on_wake(&mut req, WAKE_FETCHED);
        assert_eq!(status(&d), 503, "{name}");
        assert_eq!(
            h.metric("tollgate.auth.jwks_fetch_failures"),
            Some(1),
            "{name}"
        );
        // Within the retry interval, new requests get 503 at once.
        let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
        assert_eq!(
            status(&r.create_filter(8).on_request_headers(&mut req, true)),
            503
        );
    }
    // Slow: the waiter times out.
    let (mut r, mut h) = root(&remote_config(json!({})));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f = r.create_filter(7);
    assert_eq!(f.on_request_headers(&mut req, true), Decision::Pause);
    r.on_tick(&mut h);
    h.advance(Duration::from_millis(1600));
    r.on_tick(&mut h);
    assert_eq!(h.woken, vec![(7, WAKE_TIMEOUT)]);
    assert_eq!(status(&f.on_wake(&mut req, WAKE_TIMEOUT)), 503);
    // failure_mode allow lets it through.
    let cfg = remote_config(json!({}))
        .replace("\"providers\"", "\"failure_mode\":\"allow\",\"providers\"");
    let (mut r, mut h) = root(&cfg);
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f = r.create_filter(7);
    assert_eq!(f.on_request_headers(&mut req, true), Decision::Pause);
    r.on_tick(&mut h);
    let t = h.calls[0].token;
    r.on_call_response(&mut h, t, CallResponse::default());
    assert_eq!(f.on_wake(&mut req, WAKE_FETCHED), Decision::Continue);
}

#[test]
fn oidc_discovery_then_jwks() {
    let cfg = remote_config(json!({})).replace(
        r#""path":"/jwks""#,
        r#""discovery_path":"/.well-known/openid-configuration""#,
    );
    let (mut r, mut h) = root(&cfg);
    r.on_tick(&mut h);
    assert_eq!(
        h.calls[0].header(":path"),
        Some("/.well-known/openid-configuration")
    );
    let t = h.calls[0].token;
    r.on_call_response(
        &mut h,
        t,
        ok(r#"{"issuer":"https://idp","jwks_uri":"http://keys.local:8081/k/jwks.json"}"#),
    );
    assert_eq!(h.calls[1].header(":path"), Some("/k/jwks.json"));
    assert_eq!(h.calls[1].header(":authority"), Some("keys.local:8081"));
    let t = h.calls[1].token;
    r.on_call_response(&mut h, t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let mut req = h.next_request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(
        r.create_filter(7).on_request_headers(&mut req, true),
        Decision::Continue
    );
}

#[test]
fn introspection_active_inactive_down_and_cached() {
    let cfg = json!({
        "introspection": {"cluster": "idp", "path": "/introspect", "client_id": "gw", "client_secret": "s3cret", "plan_claim": "plan"},
        "routes": [{"match": {"prefix": "/orders"}, "scopes": ["orders:read"]}, {"match": {}}]
    })
    .to_string();
    let (r, h) = root(&cfg);
    let mut req = h.next_request("GET", "/x", &[("authorization", "Bearer active-1")]);
    let mut f = r.create_filter(2);
    assert_eq!(f.on_request_headers(&mut req, true), Decision::Pause);
    let call = req.calls[0].clone();
    assert_eq!(call.header(":method"), Some("POST"));
    assert!(call.header("authorization").unwrap().starts_with("Basic "));
    assert_eq!(
        call.body.as_deref(),
        Some(&b"token=active-1&token_type_hint=access_token"[..])
    );
    let answer = ok(&format!(
        r#"{{"active":true,"sub":"bob","scope":"orders:read","plan":"pro","exp":{}}}"#,
        NOW + 100
    ));
    assert_eq!(
        f.on_call_response(&mut req, call.token, answer),
        Decision::Continue
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "x-tollgate-consumer")
            .as_deref(),
        Some("bob")
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "x-tollgate-plan")
            .as_deref(),
        Some("pro")
    );
    // Cached: the next request needs no call.
    let mut req2 = req.next_request("GET", "/orders/1", &[("authorization", "Bearer active-1")]);
    assert_eq!(
        r.create_filter(3).on_request_headers(&mut req2, true),
        Decision::Continue
    );
    assert!(req2.calls.is_empty());
    assert_eq!(
        req2.metric("tollgate.auth.introspection_cache_hits"),
        Some(1)
    );
    // Inactive.
    let mut req3 = req.next_request("GET", "/x", &[("authorization", "Bearer nope")]);
    let mut f3 = r.create_filter(4);
    assert_eq!(f3.on_request_headers(&mut req3, true), Decision::Pause);
    let t3 = req3.calls[0].token;
    assert_eq!(
        reason(&f3.on_call_response(&mut req3, t3, ok(r#"{"active":false}"#))),
        "inactive_token"
    );
    // Down.
    let mut req4 = req.next_request("GET", "/x", &[("authorization", "Bearer other")]);
    let mut f4 = r.create_filter(5);
    assert_eq!(f4.on_request_headers(&mut req4, true), Decision::Pause);
    let t4 = req4.calls[0].token;
    assert_eq!(
        status(&f4.on_call_response(&mut req4, t4, CallResponse::default())),
        503
    );
}

#[test]
fn remove_credential_from_header_query_and_cookie() {
    let cfg = json!({
        "api_keys": {"from": [{"query": "api_key"}, {"cookie": "k"}, {"header": "x-api-key"}],
                     "keys": [{"sha256": hex::<32>(Sha256::digest(b"key-pro").into()), "consumer": "acme"}]},
        "remove_credential": true,
        "routes": [{"match": {}}]
    })
    .to_string();
    let (r, h) = root(&cfg);
    let mut req = h.next_request("GET", "/x?a=1&api_key=key-pro&b=2", &[]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(req.path(), "/x?a=1&b=2");
    let mut req = h.next_request("GET", "/x", &[("cookie", "z=1; k=key-pro; y=2")]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(
        req.header(MapKind::RequestHeaders, "cookie").as_deref(),
        Some("z=1; y=2")
    );
    let mut req = h.next_request("GET", "/x", &[("x-api-key", "key-pro")]);
    assert_eq!(
        r.create_filter(2).on_request_headers(&mut req, true),
        Decision::Continue
    );
    assert_eq!(req.header(MapKind::RequestHeaders, "x-api-key"), None);
}

#[test]
fn workers_share_one_fetch_and_its_failure() {
    // Two workers of one Envoy: two roots over one shared-data store.
    let cfg = remote_config(json!({}));
    let (mut r1, mut h1) = root(&cfg);
    let mut r2 = AuthRoot::new(1);
    let mut h2 = h1.next_request("GET", "/", &[]);
    r2.configure(&mut h2, cfg.as_bytes()).unwrap();
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let mut req2 = h2.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f2 = r2.create_filter(21);
    assert_eq!(f2.on_request_headers(&mut req2, true), Decision::Pause);
    r1.on_tick(&mut h1);
    r2.on_tick(&mut h2);
    assert_eq!(h1.calls.len(), 1, "worker 1 holds the lease and fetches");
    assert!(h2.calls.is_empty(), "worker 2 waits for worker 1's fetch");
    let t = h1.calls[0].token;
    r1.on_call_response(&mut h1, t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    h2.advance(Duration::from_millis(50));
    r2.on_tick(&mut h2);
    assert_eq!(
        h2.woken,
        vec![(21, WAKE_FETCHED)],
        "adopted from shared data"
    );
    assert_eq!(f2.on_wake(&mut req2, WAKE_FETCHED), Decision::Continue);
    assert!(h2.calls.is_empty());

    // A failure of the lease holder reaches the other worker's waiters at once.
    let cfg = remote_config(json!({}));
    let (mut r1, mut h1) = root(&cfg);
    let mut r2 = AuthRoot::new(1);
    let mut h2 = h1.next_request("GET", "/", &[]);
    r2.configure(&mut h2, cfg.as_bytes()).unwrap();
    let mut req2 = h2.next_request("GET", "/x", &[("authorization", &auth)]);
    let mut f2 = r2.create_filter(22);
    assert_eq!(f2.on_request_headers(&mut req2, true), Decision::Pause);
    r1.on_tick(&mut h1);
    r2.on_tick(&mut h2);
    let t = h1.calls[0].token;
    h1.advance(Duration::from_millis(10));
    r1.on_call_response(&mut h1, t, CallResponse::default());
    h2.advance(Duration::from_millis(50));
    r2.on_tick(&mut h2);
    assert_eq!(h2.woken, vec![(22, WAKE_FETCHED)]);
    assert_eq!(status(&f2.on_wake(&mut req2, WAKE_FETCHED)), 503);
    // Neither worker retries before the retry interval (1 s) has passed since the failure.
    for _ in 0..5 {
        h1.advance(Duration::from_millis(100));
        h2.advance(Duration::from_millis(100));
        r1.on_tick(&mut h1);
        r2.on_tick(&mut h2);
    }
    assert_eq!(h1.calls.len() + h2.calls.len(), 1);
    h1.advance(Duration::from_millis(600));
    h2.advance(Duration::from_millis(600));
    r1.on_tick(&mut h1);
    r2.on_tick(&mut h2);
    assert_eq!(h1.calls.len() + h2.calls.len(), 2, "then one retry");
}

#[test]
fn unknown_kid_refetch_is_limited_for_all_workers() {
    let cfg = remote_config(json!({}));
    let (mut r1, mut h1) = root(&cfg);
    r1.on_tick(&mut h1);
    let t = h1.calls[0].token;
    r1.on_call_response(&mut h1, t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    let mut r2 = AuthRoot::new(1);
    let mut h2 = h1.next_request("GET", "/", &[]);
    r2.configure(&mut h2, cfg.as_bytes()).unwrap();
    r2.on_tick(&mut h2);
    let stranger = format!("Bearer {}", es("nobody", claims(json!({}))));
    // Worker 1 refetches for the unknown kid.
    let mut req = h1.next_request("GET", "/x", &[("authorization", &stranger)]);
    let mut f1 = r1.create_filter(31);
    assert_eq!(f1.on_request_headers(&mut req, true), Decision::Pause);
    r1.on_tick(&mut h1);
    assert_eq!(h1.calls.len(), 2);
    // Worker 2, meanwhile: a fetch is under way, so it waits for it without a refetch of its own.
    let mut req2 = h2.next_request("GET", "/x", &[("authorization", &stranger)]);
    let mut f2 = r2.create_filter(32);
    assert_eq!(f2.on_request_headers(&mut req2, true), Decision::Pause);
    let t = h1.calls[1].token;
    h1.advance(Duration::from_millis(10));
    r1.on_call_response(&mut h1, t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(reason(&f1.on_wake(&mut req, WAKE_FETCHED)), "unknown_kid");
    h2.advance(Duration::from_millis(50));
    r2.on_tick(&mut h2);
    assert!(h2.calls.is_empty());
    assert_eq!(reason(&f2.on_wake(&mut req2, WAKE_FETCHED)), "unknown_kid");
    // Within the interval, worker 2 refuses at once.
    let mut req3 = h2.next_request("GET", "/x", &[("authorization", &stranger)]);
    assert_eq!(
        reason(&r2.create_filter(33).on_request_headers(&mut req3, true)),
        "unknown_kid"
    );
}
