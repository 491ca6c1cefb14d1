//! The auth filter's remote keys: an OpenID configuration and a JWK Set from servers that
//! answer anything (statuses, JSON that is not what was asked for, bytes). Each callout is a
//! well-formed request; with the right answers a demo token verifies.

use std::collections::HashSet;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Value};
use tollgate_auth::AuthRoot;
use tollgate_common::mem_host::MemHost;
use tollgate_common::{CallResponse, Decision, Host, HttpFilter, MapKind, RootFilter};

use crate::gen::{mutate, text};
use crate::seeds::DEMO_JWKS;
use crate::targets::next_unanswered;

const DEMO_TOKEN: &str = include_str!("../../corpus/jws/demo-es256");
const DISCOVERY: &str = "/.well-known/openid-configuration";

fn config() -> &'static str {
    static CELL: OnceLock<String> = OnceLock::new();
    CELL.get_or_init(|| {
        json!({
            "providers": [{
                "name": "demo", "issuer": "https://demo.tollgate.local", "audiences": ["tollgate-demo"],
                "algorithms": ["ES256", "RS256", "PS256", "ES384", "EdDSA"],
                "remote_jwks": {"cluster": "users", "discovery_path": DISCOVERY,
                                "cache_duration": "5m", "timeout": "2s"}
            }],
            "routes": [{"match": {"prefix": "/"}}]
        })
        .to_string()
    })
}

const URIS: &[&str] = &[
    "http://users/.well-known/jwks.json",
    "https://keys.local:8443/k",
    "http://",
    "://x",
    "x",
    "http://a\r\nx-injected: 1/p",
    "http://a b/c",
    "http:///jwks",
    "http://h/%0d%0a",
    "",
];

fn answer(u: &mut Unstructured<'_>, discovery: bool) -> Result<(CallResponse, bool)> {
    // Returns the answer and whether it is the right one, unchanged.
    let status = *u.choose(&["200", "200", "200", "404", "500", "x"])?;
    let right = u.ratio(1, 2)?;
    let mut body: Value = if discovery {
        json!({"issuer": "https://demo.tollgate.local",
               "jwks_uri": "http://users/.well-known/jwks.json"})
    } else {
        serde_json::from_str(DEMO_JWKS).unwrap_or(Value::Null)
    };
    let mut unchanged = status == "200";
    if !right {
        unchanged = false;
        if discovery && u.arbitrary()? {
            body["jwks_uri"] = json!(*u.choose(URIS)?);
        } else {
            mutate(u, &mut body, 3, &["jwks_uri", "keys", "kty", "x"], URIS)?;
        }
    }
    let bytes = if u.ratio(1, 8)? {
        unchanged = false;
        text(u, &["{", "}", "\"keys\""], 6)?.into_bytes()
    } else {
        body.to_string().into_bytes()
    };
    let headers = if u.ratio(1, 10)? {
        unchanged = false;
        Vec::new()
    } else {
        vec![(":status".to_string(), status.to_string())]
    };
    Ok((
        CallResponse {
            headers,
            body: bytes,
        },
        unchanged,
    ))
}

/// Discovery, key fetch and a request with a demo token.
pub fn remote(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check(&mut u);
}

fn check(u: &mut Unstructured<'_>) -> Result<()> {
    let mut root = AuthRoot::new(1);
    let mut vm = MemHost::new();
    if let Err(e) = root.configure(&mut vm, config().as_bytes()) {
        unreachable!("the target's configuration is refused: {e}");
    }
    let mut answered = HashSet::new();
    let mut all_right = true;
    for _ in 0..4 {
        root.on_tick(&mut vm);
        let Some(call) = next_unanswered(&vm.calls, &mut answered) else {
            break;
        };
        for (k, v) in &call.headers {
            assert!(
                !k.is_empty() && !v.chars().any(char::is_control),
                "a callout header from a remote document: {k}: {v:?}"
            );
        }
        let path = call.header(":path").unwrap_or_default();
        assert!(path.starts_with('/'), "callout path {path:?}");
        let (resp, right) = answer(u, path == DISCOVERY)?;
        all_right &= right;
        root.on_call_response(&mut vm, call.token, resp);
    }
    let auth = format!("Bearer {}", DEMO_TOKEN.trim());
    let mut req = vm.next_request("GET", "/x", &[("authorization", &auth)]);
    let d = root.create_filter(7).on_request_headers(&mut req, true);
    if all_right && answered.len() == 2 {
        assert_eq!(d, Decision::Continue, "the demo token with the demo keys");
        assert_eq!(
            req.header(MapKind::RequestHeaders, "x-tollgate-consumer")
                .as_deref(),
            Some("alice")
        );
    }
    if let Decision::Respond(r) = &d {
        assert!(r.status == 401 || r.status == 503, "{r:?}");
    }
    Ok(())
}
