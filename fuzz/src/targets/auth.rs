//! The auth filter on whole requests: credentials from headers (with and without the
//! `Bearer` prefix), query parameters and cookies, forged identity headers, odd methods, hosts
//! and paths, and introspection answers. Refusals are problem+json without the credential;
//! a forged identity never reaches the service; the right API key is always accepted.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Value};
use tollgate_auth::AuthRoot;
use tollgate_common::mem_host::MemHost;
use tollgate_common::problem::PROBLEM_JSON;
use tollgate_common::{CallResponse, Decision, Host, HttpFilter, MapKind, RootFilter};

use crate::gen::{json as random_json, text};
use crate::seeds::{auth_routes, KEY_PRO_SHA256, SECRET};
use crate::targets::jose::{b64, token};

const FORGED: &str = "forged-evil";
const WRONG_KEY: &str = "wrong-key-7f3a";

fn config() -> &'static str {
    static CELL: OnceLock<String> = OnceLock::new();
    CELL.get_or_init(|| {
        json!({
            "providers": [{
                "name": "idp", "issuer": "https://idp", "audiences": ["api", "other"],
                "algorithms": ["HS256"],
                "jwks": {"keys": [{"kty": "oct", "kid": "hs", "k": b64(&SECRET)}]},
                "claim_headers": [{"claim": "org", "header": "x-org"}],
                "payload_header": "x-jwt-payload",
                "plan_claim": "plan"
            }],
            "token_sources": [{"header": "authorization", "prefix": "Bearer "},
                              {"query": "access_token"}, {"cookie": "session"}],
            "remove_credential": true,
            "api_keys": {
                "from": [{"header": "x-api-key"}, {"query": "api_key"}, {"cookie": "apikey"}],
                "keys": [{"sha256": KEY_PRO_SHA256, "consumer": "acme", "metadata": {"plan": "pro"}}]
            },
            "introspection": {"cluster": "idp", "path": "/introspect", "client_id": "gw",
                              "client_secret": "s3cret"},
            "routes": auth_routes()
        })
        .to_string()
    })
}

const PATHS: &[&str] = &[
    "/orders/1",
    "/public/x",
    "/admin/x",
    "/users/alice",
    "/users/",
    "/maybe",
    "/",
    "/orders",
];
const PREFIXES: &[&str] = &[
    "Bearer ", "bearer ", "BEARER  ", "Bearer", "Basic ", "", " Bearer ",
];
const KEYS: &[&str] = &[
    "key-pro",
    " key-pro ",
    "key-pr",
    "KEY-PRO",
    WRONG_KEY,
    "",
    "key-pro\u{0}",
];

/// One request through the auth filter.
pub fn request(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check_request(&mut u);
}

fn check_request(u: &mut Unstructured<'_>) -> Result<()> {
    let mut root = AuthRoot::new(1);
    let mut vm = MemHost::new();
    assert!(
        root.configure(&mut vm, config().as_bytes()).is_ok(),
        "the request target's configuration is refused"
    );
    let method = *u.choose(&["GET", "POST", "HEAD", "DELETE", "get", "X"])?;
    let mut path = if u.ratio(4, 5)? {
        (*u.choose(PATHS)?).to_string()
    } else {
        text(u, PATHS, 4)?
    };
    let tok = token(u)?;
    let key = *u.choose(KEYS)?;
    let mut query = Vec::new();
    if u.ratio(1, 4)? {
        query.push(format!(
            "api_key={}",
            tollgate_common::request::percent_encode(key)
        ));
    }
    if u.ratio(1, 4)? {
        query.push(format!("access_token={}", tok.text));
    }
    if u.ratio(1, 6)? {
        query.push(text(u, &["=", "&", "api_key", "%"], 4)?);
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    let header_key = u.ratio(1, 2)?;
    if header_key {
        headers.push(("x-api-key".into(), key.into()));
    }
    if u.ratio(1, 2)? {
        let prefix = *u.choose(PREFIXES)?;
        headers.push(("authorization".into(), format!("{prefix}{}", tok.text)));
    }
    if u.ratio(1, 4)? {
        let c = format!(
            "a=1; session={}; apikey={key}; {}",
            tok.text,
            text(u, &[";", "=", "\""], 4)?
        );
        headers.push(("cookie".into(), c));
    }
    for h in [
        "x-tollgate-consumer",
        "x-tollgate-plan",
        "x-org",
        "x-jwt-payload",
    ] {
        if u.ratio(1, 4)? {
            headers.push((h.into(), FORGED.into()));
        }
    }
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut req = vm.next_request(method, &path, &refs);
    if u.ratio(1, 4)? {
        let host = *u.choose(&["a.example.com", "example.com", "A.EXAMPLE.COM:443", "[::1]"])?;
        req.set_header(MapKind::RequestHeaders, ":authority", host);
    }
    let mut f = root.create_filter(2);
    let mut d = f.on_request_headers(&mut req, true);
    // Introspection: answer the call (with anything).
    for _ in 0..2 {
        let Decision::Pause = d else { break };
        let Some(call) = req.calls.last().cloned() else {
            break;
        };
        let status = *u.choose(&["200", "200", "401", "500", "x", ""])?;
        let body = if u.arbitrary()? {
            let mut v =
                json!({"active": true, "sub": "bob", "scope": "users:read", "exp": 1_767_300_000});
            crate::gen::mutate(
                u,
                &mut v,
                3,
                &["active", "sub", "exp", "scope", "plan"],
                &["bob"],
            )?;
            v.to_string().into_bytes()
        } else {
            random_json(u, 2, &["active"], &[])?
                .to_string()
                .into_bytes()
        };
        let answer = CallResponse {
            headers: vec![(":status".into(), status.into())],
            body,
        };
        d = f.on_call_response(&mut req, call.token, answer);
    }
    check_decision(&d, &req, key, &tok.text);
    // A forged identity never reaches the service.
    for h in [
        "x-tollgate-consumer",
        "x-tollgate-plan",
        "x-org",
        "x-jwt-payload",
    ] {
        assert_ne!(
            req.header(MapKind::RequestHeaders, h).as_deref(),
            Some(FORGED),
            "a forged `{h}` was forwarded: {method} {path} {headers:?} -> {d:?}"
        );
    }
    // The right API key in its header, on a route that takes any credential, is accepted
    // and removed before forwarding.
    let bare = path.split('?').next().unwrap_or_default();
    if header_key && key.trim() == "key-pro" && (bare == "/orders" || bare == "/orders/1") {
        assert_eq!(d, Decision::Continue, "{method} {path} {headers:?}");
        assert_eq!(
            req.header(MapKind::RequestHeaders, "x-tollgate-consumer")
                .as_deref(),
            Some("acme")
        );
        assert_eq!(req.header(MapKind::RequestHeaders, "x-api-key"), None);
    }
    Ok(())
}

fn check_decision(d: &Decision, req: &MemHost, key: &str, token: &str) {
    let Decision::Respond(r) = d else {
        return;
    };
    assert!((400..600).contains(&r.status), "{r:?}");
    assert_eq!(r.header("content-type"), Some(PROBLEM_JSON), "{r:?}");
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    assert_eq!(
        body.get("status").and_then(Value::as_u64),
        Some(u64::from(r.status))
    );
    let text = String::from_utf8_lossy(&r.body);
    for secret in [key.trim(), token, WRONG_KEY, "s3cret"] {
        if secret.len() >= 8 && !req.path().split('?').next().unwrap_or("").contains(secret) {
            assert!(
                !text.contains(secret),
                "the reply shows a credential: {text}"
            );
            for (_, v) in &r.headers {
                assert!(
                    !v.contains(secret),
                    "a reply header shows a credential: {v}"
                );
            }
        }
    }
    for (k, v) in &r.headers {
        assert!(
            !v.chars().any(|c| c.is_control()) && !k.is_empty(),
            "{k}: {v:?}"
        );
    }
}
