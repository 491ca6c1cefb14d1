//! Filter tests on MemHost: the whole request path with inline keys, API keys, remote keys
//! (fetch, wait, wake, refetch, failure), introspection and authorization.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_common::testing::Driver;
use tollgate_common::{CallResponse, Decision, Host, MapKind};

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

/// A VM (one Envoy worker) with the filter configured, driven like Envoy drives it.
fn root(config: &str) -> Driver<AuthRoot> {
    Driver::new(config).unwrap()
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
    let mut vm = root("{}");
    let req = vm.request("GET", "/x", &[("x-tollgate-consumer", "forged")]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-consumer")
            .as_deref(),
        Some("forged")
    );
    // No `requests` counter: a request no rule matches counts in `skipped` (#11).
    assert_eq!(vm.metric("tollgate.auth.skipped"), Some(1));
    assert_eq!(vm.metric("tollgate.auth.requests"), None);
}

#[test]
fn table_of_tokens() {
    let mut vm = root(&inline_config());
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
        let req = vm.request("GET", "/x", &headers);
        let d = vm.request_headers(req, true);
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
    let mut vm = root(&inline_config());
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"org": {"id": "o-1"}, "roles": ["admin", "dev"], "plan": "gold"})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    let req = vm.request(
        "GET",
        "/x",
        &[
            ("authorization", &auth),
            ("x-tollgate-consumer", "mallory"),
            ("x-org", "evil"),
            ("x-tollgate-tier", "x"),
        ],
    );
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    let hv = |n: &str| vm.header(req, MapKind::RequestHeaders, n);
    assert_eq!(hv("x-tollgate-consumer").as_deref(), Some("alice"));
    assert_eq!(hv("x-tollgate-plan").as_deref(), Some("gold"));
    assert_eq!(hv("x-org").as_deref(), Some("o-1"));
    assert_eq!(hv("x-roles").as_deref(), Some("admin,dev"));
    assert_eq!(hv("x-tollgate-tier"), None);
    assert_eq!(hv("x-jwt-payload").as_deref(), t.split('.').nth(1));
    assert_eq!(vm.metric("tollgate.auth.forged_headers_removed"), Some(3));
    // A disabled route still has forged identity headers removed.
    let req = vm.request("GET", "/public/x", &[("x-tollgate-consumer", "mallory")]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-consumer"),
        None
    );
}

#[test]
fn api_keys() {
    let mut vm = root(&inline_config());
    let cases: &[(&str, u16, &str)] = &[
        ("key-pro", 0, ""),
        ("key-wrong", 401, "invalid_api_key"),
        ("key-old", 401, "expired_api_key"),
    ];
    // Twice: the second time the valid keys (`key-pro`, and `key-old`, whose expiry is still
    // checked) are the ones the worker remembers, not hashed again; the same answers.
    for (key, want, why) in cases.iter().chain(cases) {
        let req = vm.request("GET", "/x", &[("x-api-key", key)]);
        let d = vm.request_headers(req, true);
        assert_eq!(status(&d), *want, "{key}");
        assert_eq!(reason(&d), *why, "{key}");
        if *want == 0 {
            assert_eq!(
                vm.header(req, MapKind::RequestHeaders, "x-tollgate-consumer")
                    .as_deref(),
                Some("acme")
            );
            assert_eq!(
                vm.header(req, MapKind::RequestHeaders, "x-tollgate-plan")
                    .as_deref(),
                Some("pro")
            );
            assert_eq!(
                vm.header(req, MapKind::RequestHeaders, "x-tollgate-tier")
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
    let mut vm2 = root(&cfg);
    let req = vm2.request("GET", "/x", &[("authorization", "Bearer x.y.z")]);
    let d = vm2.request_headers(req, true);
    assert_eq!(reason(&d), "missing");
    if let Decision::Respond(reply) = &d {
        assert_eq!(
            reply.header("www-authenticate"),
            Some("ApiKey realm=\"tollgate\"")
        );
    }
    // The admin route accepts only the JWT provider.
    let req = vm.request("GET", "/admin", &[("x-api-key", "key-pro")]);
    assert_eq!(status(&vm.request_headers(req, true)), 401);
}

#[test]
fn authorization_and_requirements() {
    let mut vm = root(&inline_config());
    let run = |vm: &mut Driver<AuthRoot>, path: &str, extra: Value| {
        let t = hs(json!({"alg": "HS256"}), claims(extra), &SECRET);
        let auth = format!("Bearer {t}");
        let req = vm.request("GET", path, &[("authorization", &auth)]);
        vm.request_headers(req, true)
    };
    assert_eq!(
        status(&run(
            &mut vm,
            "/orders/1",
            json!({"scope": "orders:read x"})
        )),
        0
    );
    assert_eq!(
        status(&run(&mut vm, "/orders/1", json!({"scp": ["orders:read"]}))),
        0
    );
    let d = run(&mut vm, "/orders/1", json!({"scope": "users:read"}));
    assert_eq!(status(&d), 403);
    if let Decision::Respond(reply) = &d {
        let www = reply.header("www-authenticate").unwrap();
        assert!(
            www.contains("error=\"insufficient_scope\"") && www.contains("scope=\"orders:read\""),
            "{www}"
        );
    }
    assert_eq!(
        status(&run(&mut vm, "/admin", json!({"roles": ["dev", "admin"]}))),
        0
    );
    assert_eq!(
        reason(&run(&mut vm, "/admin", json!({"roles": ["dev"]}))),
        "claim_mismatch"
    );
    // allow_missing: no token passes, a bad one does not.
    let req = vm.request("GET", "/maybe", &[]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        status(&run(&mut vm, "/maybe", json!({"exp": NOW - 1000}))),
        401
    );
    // optional: a bad token passes without identity.
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"exp": NOW - 1000})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    let req = vm.request("GET", "/opt", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-consumer"),
        None
    );
}

#[test]
fn verified_tokens_are_cached_until_they_expire() {
    let mut vm = root(&inline_config());
    let t = hs(
        json!({"alg": "HS256"}),
        claims(json!({"exp": NOW + 100})),
        &SECRET,
    );
    let auth = format!("Bearer {t}");
    for _ in 0..3 {
        let req = vm.request("GET", "/x", &[("authorization", &auth)]);
        assert_eq!(vm.request_headers(req, true), Decision::Continue);
    }
    assert_eq!(vm.metric("tollgate.auth.allowed.jwt_cached"), Some(2));
    vm.advance(Duration::from_secs(200));
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(reason(&vm.request_headers(req, true)), "expired");
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
    let mut vm = root(&remote_config(json!({})));
    assert_eq!(vm.tick_period(), Some(Duration::from_millis(50)));
    // A request before the keys arrive waits.
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    assert_eq!(vm.calls().len(), 1);
    assert_eq!(vm.calls()[0].header(":path"), Some("/jwks"));
    vm.tick();
    assert_eq!(vm.calls().len(), 1, "one fetch at a time");
    let token = vm.calls()[0].token;
    vm.answer(token, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(vm.woken(), vec![(req, WAKE_FETCHED)]);
    assert_eq!(
        vm.wake_decision(req, WAKE_FETCHED).unwrap(),
        Decision::Continue
    );
    assert_eq!(vm.metric("tollgate.auth.jwks_fetches"), Some(1));
    // Stored in shared data for the other workers.
    assert!(vm
        .vm()
        .shared_get("tollgate.auth.jwks.idp")
        .unwrap()
        .is_some());
    // Another worker adopts them on its first tick without fetching.
    let mut vm2 = vm.worker(&remote_config(json!({}))).unwrap();
    vm2.tick();
    assert!(vm2.calls().is_empty());
    let req = vm2.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm2.request_headers(req, true), Decision::Continue);
    // Refreshed before expiry (80% of 60 s).
    vm.advance(Duration::from_secs(50));
    vm.tick();
    assert_eq!(vm.calls().len(), 2);
}

#[test]
fn unknown_kid_refetches_once_per_interval() {
    let mut vm = root(&remote_config(json!({})));
    vm.tick();
    let t0 = vm.calls()[0].token;
    vm.answer(t0, ok(r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"old","x":"aa0nWgETctJpaXXZtcfSQUBtXo2Z2Cb7B_HlwJCK-Wk","y":"lfo6v6CStrhix-FIVGehxIAjwEuzWuNuoCiRo7tUowA"}]}"#));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    assert_eq!(vm.calls().len(), 2, "refetch for the unknown kid");
    let t1 = vm.calls()[1].token;
    // Rotation: the new JWKS has the key.
    vm.answer(t1, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(
        vm.wake_decision(req, WAKE_FETCHED).unwrap(),
        Decision::Continue
    );
    // Another unknown kid within the interval: refused at once, no fetch.
    let auth2 = format!("Bearer {}", es("other", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &auth2)]);
    let d = vm.request_headers(req, true);
    assert_eq!(reason(&d), "unknown_kid");
    vm.tick();
    assert_eq!(vm.calls().len(), 2);
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
        let mut vm = root(&remote_config(json!({})));
        let auth = format!("Bearer {}", es("es", claims(json!({}))));
        let req = vm.request("GET", "/x", &[("authorization", &auth)]);
        assert_eq!(vm.request_headers(req, true), Decision::Pause, "{name}");
        vm.tick();
        let t = vm.calls()[0].token;
        vm.answer(t, resp);
        assert_eq!(vm.woken(), vec![(req, WAKE_FETCHED)], "{name}");
        let d = vm.wake_decision(req, WAKE_FETCHED).unwrap();
        assert_eq!(status(&d), 503, "{name}");
        assert_eq!(
            vm.metric("tollgate.auth.jwks_fetch_failures"),
            Some(1),
            "{name}"
        );
        // Within the retry interval, new requests get 503 at once.
        let req = vm.request("GET", "/x", &[("authorization", &auth)]);
        assert_eq!(status(&vm.request_headers(req, true)), 503);
    }
    // Slow: the waiter times out.
    let mut vm = root(&remote_config(json!({})));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    vm.advance(Duration::from_millis(1600));
    vm.tick();
    assert_eq!(vm.woken(), vec![(req, WAKE_TIMEOUT)]);
    assert_eq!(status(&vm.wake_decision(req, WAKE_TIMEOUT).unwrap()), 503);
    // failure_mode allow lets it through.
    let cfg = remote_config(json!({}))
        .replace("\"providers\"", "\"failure_mode\":\"allow\",\"providers\"");
    let mut vm = root(&cfg);
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    let t = vm.calls()[0].token;
    vm.answer(t, CallResponse::default());
    assert_eq!(
        vm.wake_decision(req, WAKE_FETCHED).unwrap(),
        Decision::Continue
    );
}

#[test]
fn oidc_discovery_then_jwks() {
    let cfg = remote_config(json!({})).replace(
        r#""path":"/jwks""#,
        r#""discovery_path":"/.well-known/openid-configuration""#,
    );
    let mut vm = root(&cfg);
    vm.tick();
    assert_eq!(
        vm.calls()[0].header(":path"),
        Some("/.well-known/openid-configuration")
    );
    let t = vm.calls()[0].token;
    vm.answer(
        t,
        ok(r#"{"issuer":"https://idp","jwks_uri":"http://keys.local:8081/k/jwks.json"}"#),
    );
    assert_eq!(vm.calls()[1].header(":path"), Some("/k/jwks.json"));
    assert_eq!(vm.calls()[1].header(":authority"), Some("keys.local:8081"));
    let t = vm.calls()[1].token;
    vm.answer(t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
}

#[test]
fn introspection_active_inactive_down_and_cached() {
    let cfg = json!({
        "introspection": {"cluster": "idp", "path": "/introspect", "client_id": "gw", "client_secret": "s3cret", "plan_claim": "plan"},
        "routes": [{"match": {"prefix": "/orders"}, "scopes": ["orders:read"]}, {"match": {}}]
    })
    .to_string();
    let mut vm = root(&cfg);
    let req = vm.request("GET", "/x", &[("authorization", "Bearer active-1")]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    let call = vm.host(req).unwrap().calls[0].clone();
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
    assert_eq!(vm.answer(call.token, answer), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-consumer")
            .as_deref(),
        Some("bob")
    );
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-plan")
            .as_deref(),
        Some("pro")
    );
    // Cached: the next request needs no call.
    let req2 = vm.request("GET", "/orders/1", &[("authorization", "Bearer active-1")]);
    assert_eq!(vm.request_headers(req2, true), Decision::Continue);
    assert!(vm.host(req2).unwrap().calls.is_empty());
    assert_eq!(vm.metric("tollgate.auth.introspection_cache_hits"), Some(1));
    // Inactive.
    let req3 = vm.request("GET", "/x", &[("authorization", "Bearer nope")]);
    assert_eq!(vm.request_headers(req3, true), Decision::Pause);
    let t3 = vm.host(req3).unwrap().calls[0].token;
    assert_eq!(
        reason(&vm.answer(t3, ok(r#"{"active":false}"#))),
        "inactive_token"
    );
    // Down.
    let req4 = vm.request("GET", "/x", &[("authorization", "Bearer other")]);
    assert_eq!(vm.request_headers(req4, true), Decision::Pause);
    let t4 = vm.host(req4).unwrap().calls[0].token;
    assert_eq!(status(&vm.answer(t4, CallResponse::default())), 503);
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
    let mut vm = root(&cfg);
    let req = vm.request("GET", "/x?a=1&api_key=key-pro&b=2", &[]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(vm.host(req).unwrap().path(), "/x?a=1&b=2");
    let req = vm.request("GET", "/x", &[("cookie", "z=1; k=key-pro; y=2")]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "cookie").as_deref(),
        Some("z=1; y=2")
    );
    let req = vm.request("GET", "/x", &[("x-api-key", "key-pro")]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(vm.header(req, MapKind::RequestHeaders, "x-api-key"), None);
}

#[test]
fn workers_share_one_fetch_and_its_failure() {
    // Two workers of one Envoy: two roots over one shared-data store.
    let cfg = remote_config(json!({}));
    let mut vm1 = root(&cfg);
    let mut vm2 = vm1.worker(&cfg).unwrap();
    let auth = format!("Bearer {}", es("es", claims(json!({}))));
    let req2 = vm2.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm2.request_headers(req2, true), Decision::Pause);
    vm1.tick();
    vm2.tick();
    assert_eq!(vm1.calls().len(), 1, "worker 1 holds the lease and fetches");
    assert!(
        vm2.calls().is_empty(),
        "worker 2 waits for worker 1's fetch"
    );
    let t = vm1.calls()[0].token;
    vm1.answer(t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    vm2.advance(Duration::from_millis(50));
    vm2.tick();
    assert_eq!(
        vm2.woken(),
        vec![(req2, WAKE_FETCHED)],
        "adopted from shared data"
    );
    assert_eq!(
        vm2.wake_decision(req2, WAKE_FETCHED).unwrap(),
        Decision::Continue
    );
    assert!(vm2.calls().is_empty());

    // A failure of the lease holder reaches the other worker's waiters at once.
    let cfg = remote_config(json!({}));
    let mut vm1 = root(&cfg);
    let mut vm2 = vm1.worker(&cfg).unwrap();
    let req2 = vm2.request("GET", "/x", &[("authorization", &auth)]);
    assert_eq!(vm2.request_headers(req2, true), Decision::Pause);
    vm1.tick();
    vm2.tick();
    let t = vm1.calls()[0].token;
    vm1.advance(Duration::from_millis(10));
    vm1.answer(t, CallResponse::default());
    vm2.advance(Duration::from_millis(50));
    vm2.tick();
    assert_eq!(vm2.woken(), vec![(req2, WAKE_FETCHED)]);
    assert_eq!(status(&vm2.wake_decision(req2, WAKE_FETCHED).unwrap()), 503);
    // Neither worker retries before the retry interval (1 s) has passed since the failure.
    for _ in 0..5 {
        vm1.advance(Duration::from_millis(100));
        vm2.advance(Duration::from_millis(100));
        vm1.tick();
        vm2.tick();
    }
    assert_eq!(vm1.calls().len() + vm2.calls().len(), 1);
    vm1.advance(Duration::from_millis(600));
    vm2.advance(Duration::from_millis(600));
    vm1.tick();
    vm2.tick();
    assert_eq!(vm1.calls().len() + vm2.calls().len(), 2, "then one retry");
}

#[test]
fn unknown_kid_refetch_is_limited_for_all_workers() {
    let cfg = remote_config(json!({}));
    let mut vm1 = root(&cfg);
    vm1.tick();
    let t = vm1.calls()[0].token;
    vm1.answer(t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    let mut vm2 = vm1.worker(&cfg).unwrap();
    vm2.tick();
    let stranger = format!("Bearer {}", es("nobody", claims(json!({}))));
    // Worker 1 refetches for the unknown kid.
    let req = vm1.request("GET", "/x", &[("authorization", &stranger)]);
    assert_eq!(vm1.request_headers(req, true), Decision::Pause);
    vm1.tick();
    assert_eq!(vm1.calls().len(), 2);
    // Worker 2, meanwhile: a fetch is under way, so it waits for it without a refetch of its own.
    let req2 = vm2.request("GET", "/x", &[("authorization", &stranger)]);
    assert_eq!(vm2.request_headers(req2, true), Decision::Pause);
    let t = vm1.calls()[1].token;
    vm1.advance(Duration::from_millis(10));
    vm1.answer(t, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    assert_eq!(
        reason(&vm1.wake_decision(req, WAKE_FETCHED).unwrap()),
        "unknown_kid"
    );
    vm2.advance(Duration::from_millis(50));
    vm2.tick();
    assert!(vm2.calls().is_empty());
    assert_eq!(
        reason(&vm2.wake_decision(req2, WAKE_FETCHED).unwrap()),
        "unknown_kid"
    );
    // Within the interval, worker 2 refuses at once.
    let req3 = vm2.request("GET", "/x", &[("authorization", &stranger)]);
    assert_eq!(reason(&vm2.request_headers(req3, true)), "unknown_kid");
}

const OLD_KEYS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"old","x":"aa0nWgETctJpaXXZtcfSQUBtXo2Z2Cb7B_HlwJCK-Wk","y":"lfo6v6CStrhix-FIVGehxIAjwEuzWuNuoCiRo7tUowA"}]}"#;

#[test]
fn unknown_kid_during_a_key_server_outage_meets_the_failure_mode() {
    // #15 finding 7: the token's key may simply be new; 503 like any token of the provider.
    let cfg = remote_config(json!({"refetch_interval": "1s"}));
    let mut vm = root(&cfg);
    vm.tick();
    let t0 = vm.calls()[0].token;
    vm.answer(t0, ok(OLD_KEYS));
    let mut vm2 = vm.worker(&cfg).unwrap();
    vm2.tick();
    let new_key = format!("Bearer {}", es("es", claims(json!({}))));
    // The refetch for the unknown kid fails: the waiting request gets 503, not 401.
    let req = vm.request("GET", "/x", &[("authorization", &new_key)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    let t1 = vm.calls()[1].token;
    vm.advance(Duration::from_millis(10));
    vm.answer(t1, CallResponse::default());
    let d = vm.wake_decision(req, WAKE_FETCHED).unwrap();
    assert_eq!((status(&d), reason(&d).as_str()), (503, "unavailable"));
    // While it is down, the next ones get 503 at once (no wait), in this worker and the other.
    let req = vm.request("GET", "/x", &[("authorization", &new_key)]);
    let d = vm.request_headers(req, true);
    assert_eq!((status(&d), reason(&d).as_str()), (503, "unavailable"));
    vm2.advance(Duration::from_millis(50));
    vm2.tick();
    let req = vm2.request("GET", "/x", &[("authorization", &new_key)]);
    let d = vm2.request_headers(req, true);
    assert_eq!((status(&d), reason(&d).as_str()), (503, "unavailable"));
    // A token whose key is known still passes.
    let known = format!("Bearer {}", es("old", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &known)]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    // failure_mode allow lets the unknown kid through without identity, as for the others.
    let allow = cfg.replace("\"providers\"", "\"failure_mode\":\"allow\",\"providers\"");
    let mut vm3 = vm.worker(&allow).unwrap();
    vm3.tick();
    let req = vm3.request("GET", "/x", &[("authorization", &new_key)]);
    assert_eq!(vm3.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm3.header(req, MapKind::RequestHeaders, "x-tollgate-consumer"),
        None
    );
    // After the retry interval the asked-for fetch runs; the server is back with the new key.
    vm.advance(Duration::from_millis(1100));
    vm.tick();
    let t2 = vm.calls()[2].token;
    vm.answer(t2, ok(&format!(r#"{{"keys":[{ES_PUB}]}}"#)));
    let req = vm.request("GET", "/x", &[("authorization", &new_key)]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
}

#[test]
fn an_unknown_kid_that_waited_for_the_first_keys_still_gets_its_refetch() {
    let mut vm = root(&remote_config(json!({})));
    let new_key = format!("Bearer {}", es("es", claims(json!({}))));
    let req = vm.request("GET", "/x", &[("authorization", &new_key)]);
    assert_eq!(vm.request_headers(req, true), Decision::Pause);
    vm.tick();
    let t0 = vm.calls()[0].token;
    vm.answer(t0, ok(OLD_KEYS));
    // Woken by the first keys, which lack its kid: it waits for a refetch, not a 401.
    assert_eq!(
        vm.wake_decision(req, WAKE_FETCHED).unwrap(),
        Decision::Pause
    );
    vm.tick();
    assert_eq!(vm.calls().len(), 2);
    let t1 = vm.calls()[1].token;
    vm.advance(Duration::from_millis(10));
    vm.answer(t1, CallResponse::default());
    let d = vm.wake_decision(req, WAKE_FETCHED).unwrap();
    assert_eq!((status(&d), reason(&d).as_str()), (503, "unavailable"));
}

#[test]
fn identities_carry_their_source() {
    // #15 finding 4: a JWT `sub` equal to an API key's consumer is told apart by its source.
    let mut vm = root(&inline_config());
    let jwt = hs(
        json!({"alg": "HS256"}),
        claims(json!({"sub": "acme"})),
        &SECRET,
    );
    let auth = format!("Bearer {jwt}");
    let forged = ("x-tollgate-identity-source", "api_key");
    for (headers, source) in [
        (vec![("authorization", auth.as_str()), forged], "jwt:idp"),
        (vec![("x-api-key", "key-pro"), forged], "api_key"),
    ] {
        let req = vm.request("GET", "/x", &headers);
        assert_eq!(vm.request_headers(req, true), Decision::Continue);
        let hv = |n: &str| vm.header(req, MapKind::RequestHeaders, n);
        assert_eq!(hv("x-tollgate-consumer").as_deref(), Some("acme"));
        assert_eq!(hv("x-tollgate-identity-source").as_deref(), Some(source));
    }
    // An anonymous request keeps no forged source.
    let req = vm.request("GET", "/maybe", &[forged]);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    assert_eq!(
        vm.header(req, MapKind::RequestHeaders, "x-tollgate-identity-source"),
        None
    );
    // Configurable: another name, or none.
    for (setting, header) in [
        (json!("x-who-from"), Some("x-who-from")),
        (Value::Null, None),
    ] {
        let mut cfg: Value = serde_json::from_str(&inline_config()).unwrap();
        cfg["identity_source_header"] = setting;
        let mut vm = root(&cfg.to_string());
        let req = vm.request("GET", "/x", &[("x-api-key", "key-pro")]);
        assert_eq!(vm.request_headers(req, true), Decision::Continue);
        assert_eq!(
            vm.header(req, MapKind::RequestHeaders, "x-tollgate-identity-source"),
            None
        );
        if let Some(h) = header {
            assert_eq!(
                vm.header(req, MapKind::RequestHeaders, h).as_deref(),
                Some("api_key")
            );
        }
    }
}

#[test]
fn failed_credentials_are_throttled_per_client_before_any_hash() {
    // #15 finding 6.
    let mut cfg: Value = serde_json::from_str(&inline_config()).unwrap();
    cfg["failure_limit"] = json!({"max_failures": 3, "window": "1m"});
    let mut vm = root(&cfg.to_string());
    let mut vm2 = vm.worker(&cfg.to_string()).unwrap();
    let send = |vm: &mut Driver<AuthRoot>, ip: &str, headers: &[(&str, &str)]| {
        let req = vm.request("GET", "/x", headers);
        vm.host_mut(req)
            .unwrap()
            .set_property(&["source", "address"], &format!("{ip}:4242"));
        vm.request_headers(req, true)
    };
    // Three failures (wrong key, forged token), counted in shared data by both workers.
    assert_eq!(
        reason(&send(&mut vm, "10.0.0.1", &[("x-api-key", "nope")])),
        "invalid_api_key"
    );
    assert_eq!(
        reason(&send(&mut vm2, "10.0.0.1", &[("x-api-key", "nope")])),
        "invalid_api_key"
    );
    let forged = format!(
        "Bearer {}",
        hs(json!({"alg": "HS256"}), claims(json!({})), &[1u8; 32])
    );
    assert_eq!(
        reason(&send(&mut vm, "10.0.0.1", &[("authorization", &forged)])),
        "bad_signature"
    );
    // Past the threshold: 429 for any credential from that client, in any worker.
    for (vm, headers) in [
        (&mut vm2, vec![("x-api-key", "key-pro")]),
        (&mut vm, vec![("authorization", forged.as_str())]),
    ] {
        let d = send(vm, "10.0.0.1", &headers);
        assert_eq!(
            (status(&d), reason(&d).as_str()),
            (429, "too_many_failures")
        );
        if let Decision::Respond(r) = &d {
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            assert_eq!(r.header("retry-after"), Some("60"));
        }
    }
    assert_eq!(vm.metric("tollgate.auth.denied.too_many_failures"), Some(2));
    // Before any hash: a refused request reads the counter and nothing else of the credential.
    vm.count_host_calls(true);
    send(&mut vm, "10.0.0.1", &[("x-api-key", "key-pro")]);
    let calls = vm.take_host_calls();
    assert_eq!(
        calls.iter().filter(|c| **c == "get_shared_data").count(),
        1,
        "{calls:?}"
    );
    assert!(!calls.contains(&"set_shared_data"), "{calls:?}");
    // Another client is not affected; a missing credential is not a failure.
    assert_eq!(
        send(&mut vm, "10.0.0.2", &[("x-api-key", "key-pro")]),
        Decision::Continue
    );
    assert_eq!(reason(&send(&mut vm, "10.0.0.2", &[])), "missing");
    // A new window.
    vm.advance(Duration::from_secs(60));
    assert_eq!(
        send(&mut vm, "10.0.0.1", &[("x-api-key", "key-pro")]),
        Decision::Continue
    );
    // Off by default.
    let mut off = root(&inline_config());
    for _ in 0..5 {
        assert_eq!(
            reason(&send(&mut off, "10.0.0.1", &[("x-api-key", "nope")])),
            "invalid_api_key"
        );
    }
}

/// Path, request headers, expected status (0: continue) and reason.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);

#[test]
fn a_path_variable_bound_to_the_identity() {
    // #15 finding 2(c): `/dash/{user}` only for the caller `user`, unless `dash:any`.
    let mut cfg: Value = serde_json::from_str(&inline_config()).unwrap();
    cfg["routes"] = json!([
        {"match": {"template": "/dash/{user}"}, "bind": [{"param": "user", "unless_scopes": ["dash:any"]}]},
        {"match": {"template": "/org/{org}/x"}, "allow": ["idp"], "bind": [{"param": "org", "claim": "org.id"}]},
        {"match": {"prefix": "/"}}
    ]);
    let mut vm = root(&cfg.to_string());
    let bearer = |extra: Value| {
        format!(
            "Bearer {}",
            hs(json!({"alg": "HS256"}), claims(extra), &SECRET)
        )
    };
    let alice = bearer(json!({}));
    let ops = bearer(json!({"sub": "ops", "scope": "dash:any"}));
    let org = bearer(json!({"org": {"id": "o-1"}}));
    let cases: Vec<Case> = vec![
        ("/dash/alice", vec![("authorization", &alice)], 0, ""),
        (
            "/dash/bob",
            vec![("authorization", &alice)],
            403,
            "identity_mismatch",
        ),
        (
            "/dash/al%69ce",
            vec![("authorization", &alice)],
            403,
            "identity_mismatch",
        ),
        ("/dash/bob", vec![("authorization", &ops)], 0, ""),
        ("/dash/acme", vec![("x-api-key", "key-pro")], 0, ""),
        (
            "/dash/alice",
            vec![("x-api-key", "key-pro")],
            403,
            "identity_mismatch",
        ),
        ("/dash/alice", vec![], 401, "missing"),
        ("/org/o-1/x", vec![("authorization", &org)], 0, ""),
        (
            "/org/o-2/x",
            vec![("authorization", &org)],
            403,
            "identity_mismatch",
        ),
        (
            "/org/o-1/x",
            vec![("authorization", &alice)],
            403,
            "identity_mismatch",
        ),
    ];
    for (path, headers, want, why) in cases {
        let req = vm.request("GET", path, &headers);
        let d = vm.request_headers(req, true);
        assert_eq!(
            (status(&d), reason(&d).as_str()),
            (want, why),
            "{path} {headers:?}"
        );
        if let (403, Decision::Respond(r)) = (want, &d) {
            let challenge = r.header("www-authenticate").unwrap();
            assert!(
                challenge.contains("error=\"insufficient_scope\""),
                "{challenge}"
            );
            if path.starts_with("/dash") {
                assert!(challenge.ends_with("scope=\"dash:any\""), "{challenge}");
            }
        }
    }
    assert_eq!(vm.metric("tollgate.auth.denied.identity_mismatch"), Some(5));
    // Refused at load: a variable the template does not have, a binding without a credential.
    for (routes, field) in [
        (
            json!([{"match": {"template": "/d/{u}"}, "bind": [{"param": "user"}]}]),
            "routes[0].bind[0].param",
        ),
        (
            json!([{"match": {"prefix": "/d"}, "bind": [{"param": "user"}]}]),
            "routes[0].bind[0].param",
        ),
        (
            json!([{"match": {"template": "/d/{u}"}, "requirement": "optional", "bind": [{"param": "u"}]}]),
            "routes[0].bind[0]",
        ),
    ] {
        cfg["routes"] = routes;
        let e = crate::config::Config::parse(cfg.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, field);
    }
}

/// Host calls of one request on a hot path (the verified-token cache warm).
fn hot_path_calls(headers: &[(&str, &str)]) -> Vec<&'static str> {
    let mut vm = root(&inline_config());
    // Warm up: metrics defined, the token in the cache.
    for _ in 0..2 {
        let req = vm.request("GET", "/x", headers);
        assert_eq!(vm.request_headers(req, true), Decision::Continue);
        vm.done(req);
    }
    let req = vm.request("GET", "/x", headers);
    vm.count_host_calls(true);
    assert_eq!(vm.request_headers(req, true), Decision::Continue);
    vm.take_host_calls()
}

#[test]
fn host_calls_on_the_hot_paths() {
    // #11: one metric increment per request (its outcome), headers read once, no metric
    // defined or name formatted per request. Counted with the test driver (docs/filters/auth.md, "Cost").
    let auth = format!("Bearer {}", good_hs());
    let jwt = hot_path_calls(&[("authorization", &auth)]);
    assert_eq!(
        jwt,
        [
            "get_header_map_pairs",
            "get_current_time_nanoseconds",
            "replace_header_map_value",
            "replace_header_map_value",
            "replace_header_map_value",
            "increment_metric"
        ],
        "JWT from the verified-token cache: consumer, source and payload headers"
    );
    let key = hot_path_calls(&[("x-api-key", "key-pro")]);
    assert_eq!(
        key,
        [
            "get_header_map_pairs",
            "replace_header_map_value",
            "replace_header_map_value",
            "replace_header_map_value",
            "replace_header_map_value",
            "increment_metric"
        ],
        "API key: metadata, consumer, plan and source headers"
    );
}

#[test]
fn one_counter_per_outcome() {
    // #11: a request increments its outcome counter and nothing else; `requests` is the sum of
    // the outcome counters (docs/filters/auth.md, "Metrics").
    let mut vm = root(&inline_config());
    let auth = format!("Bearer {}", good_hs());
    let send = |vm: &mut Driver<AuthRoot>, path: &str, headers: &[(&str, &str)]| {
        let req = vm.request("GET", path, headers);
        let d = vm.request_headers(req, true);
        vm.done(req);
        status(&d)
    };
    let counters = |vm: &Driver<AuthRoot>| {
        [
            "requests",
            "allowed",
            "token_cache_hits",
            "allowed.api_key",
            "allowed.jwt",
            "allowed.jwt_cached",
            "denied.missing",
        ]
        .map(|n| vm.metric(&format!("tollgate.auth.{n}")))
    };
    assert_eq!(send(&mut vm, "/x", &[("x-api-key", "key-pro")]), 0);
    assert_eq!(
        counters(&vm),
        [None, None, None, Some(1), None, None, None],
        "an API key: allowed.api_key only"
    );
    assert_eq!(send(&mut vm, "/x", &[("authorization", &auth)]), 0);
    assert_eq!(send(&mut vm, "/x", &[("authorization", &auth)]), 0);
    assert_eq!(
        counters(&vm),
        [None, None, None, Some(1), Some(1), Some(1), None],
        "a verified JWT: allowed.jwt; the same from the cache: allowed.jwt_cached only"
    );
    assert_eq!(send(&mut vm, "/x", &[]), 401);
    assert_eq!(
        counters(&vm),
        [None, None, None, Some(1), Some(1), Some(1), Some(1)]
    );
}
