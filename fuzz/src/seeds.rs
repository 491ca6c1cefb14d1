//! Valid inputs to start from: the bundled configuration (`envoy/envoy.yaml`), the JSON
//! examples of the filter docs, and a few configurations that use what those leave out
//! (inline keys, introspection, credential sources). They are read at build time, so the
//! targets follow the configuration as it changes.

use std::sync::OnceLock;

use serde_json::{json, Value};

/// The filters whose configuration the targets parse.
pub const FILTERS: [&str; 4] = ["auth", "ratelimit", "cache", "aggregate"];

const ENVOY_YAML: &str = include_str!("../../envoy/envoy.yaml");
const DOCS: [(&str, &str); 4] = [
    ("auth", include_str!("../../docs/filters/auth.md")),
    ("ratelimit", include_str!("../../docs/filters/ratelimit.md")),
    ("cache", include_str!("../../docs/filters/cache.md")),
    ("aggregate", include_str!("../../docs/filters/aggregate.md")),
];

/// A 32-byte HMAC secret for the inline-key seeds and the request targets.
pub const SECRET: [u8; 32] = [42u8; 32];
/// The demo's public keys (EC P-256, RSA, ...), a JWK Set.
pub const DEMO_JWKS: &str = include_str!("../../envoy/demo-keys/jwks.json");

/// SHA-256 of `key-pro`, the API key of the request targets (consumer `acme`).
pub const KEY_PRO_SHA256: &str = "ac8df72d006a04bace645fec46e76f337f660acd245ba3f2289992acaf31c2af";

/// The auth routes of the extra seed and of the `auth_request` target: every kind of rule
/// (disabled, template with scopes, hosts with claims, allow-missing, catch-all).
pub fn auth_routes() -> Value {
    json!([
        {"match": {"prefix": "/public"}, "disabled": true},
        {"match": {"template": "/users/{user}", "methods": ["GET"]}, "scopes": ["users:read"]},
        {"match": {"prefix": "/admin", "hosts": ["*.example.com"]}, "allow": ["idp"],
         "claims": [{"claim": "roles", "any_of": ["admin"]}]},
        {"match": {"prefix": "/maybe"}, "requirement": "allow_missing"},
        {"match": {"prefix": "/"}}
    ])
}

/// The configuration values (`value: |` blocks) of `envoy/envoy.yaml`, by filter.
pub fn bundled() -> &'static [(String, String)] {
    static CELL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut out = Vec::new();
        let mut filter: Option<String> = None;
        let mut lines = ENVOY_YAML.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(name) = line.trim().strip_prefix("- name: tollgate.") {
                filter = Some(name.trim().to_string());
            }
            if line.trim() == "value: |" {
                let indent = line.len() - line.trim_start().len();
                let mut block = String::new();
                while let Some(next) = lines.peek() {
                    let ind = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && ind <= indent {
                        break;
                    }
                    block.push_str(next);
                    block.push('\n');
                    lines.next();
                }
                if let Some(f) = filter.take() {
                    out.push((f, block));
                }
            }
        }
        out
    })
}

/// The ```json blocks of the filter docs that are JSON objects, by filter.
pub fn doc_examples() -> &'static [(String, String)] {
    static CELL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut out = Vec::new();
        for (filter, text) in DOCS {
            let mut block: Option<String> = None;
            for line in text.lines() {
                match (&mut block, line.trim()) {
                    (None, "```json") => block = Some(String::new()),
                    (Some(b), "```") => {
                        if serde_json::from_str::<Value>(b).is_ok_and(|v| v.is_object()) {
                            out.push((filter.to_string(), b.clone()));
                        }
                        block = None;
                    }
                    (Some(b), _) => {
                        b.push_str(line);
                        b.push('\n');
                    }
                    (None, _) => {}
                }
            }
        }
        out
    })
}

/// Configurations that use what the bundled one and the docs leave out.
pub fn extra() -> &'static [(String, String)] {
    static CELL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut keys = vec![json!({"kty": "oct", "kid": "hs", "k": crate::targets::jose::b64(&SECRET)})];
        if let Ok(Value::Object(demo)) = serde_json::from_str::<Value>(DEMO_JWKS) {
            if let Some(Value::Array(list)) = demo.get("keys") {
                keys.extend(list.iter().cloned());
            }
        }
        let auth = json!({
            "providers": [{
                "name": "idp", "issuer": "https://idp", "audiences": ["api", "other"],
                "algorithms": ["HS256", "ES256", "RS256", "EdDSA"],
                "jwks": {"keys": keys},
                "claim_headers": [{"claim": "org.id", "header": "x-org"}],
                "payload_header": "x-jwt-payload",
                "plan_claim": "plan",
                "max_lifetime": "1h", "clock_skew": "30s", "typ": "JWT"
            }, {
                "name": "oidc", "issuer": "https://oidc",
                "remote_jwks": {"cluster": "idp", "discovery_path": "/.well-known/openid-configuration"}
            }],
            "token_sources": [{"header": "authorization", "prefix": "Bearer "},
                              {"query": "access_token"}, {"cookie": "session"}],
            "remove_credential": true,
            "api_keys": {
                "from": [{"header": "x-api-key"}, {"query": "api_key"}, {"cookie": "apikey"}],
                "keys": [
                    {"sha256": KEY_PRO_SHA256, "consumer": "acme", "metadata": {"plan": "pro"}},
                    {"sha256": KEY_PRO_SHA256.replace('4', "5"), "consumer": "old", "expires": "2025-01-01T00:00:00Z"}
                ]
            },
            "introspection": {"cluster": "idp", "path": "/introspect", "client_id": "gw", "client_secret": "s3cret"},
            "routes": auth_routes()
        });
        vec![("auth".to_string(), auth.to_string())]
    })
}

/// Every seed of one filter (bundled, docs, extra).
pub fn of(filter: &str) -> Vec<&'static str> {
    bundled()
        .iter()
        .chain(doc_examples())
        .chain(extra())
        .filter(|(f, _)| f == filter)
        .map(|(_, s)| s.as_str())
        .collect()
}

/// Every seed, of every filter.
pub fn all() -> Vec<&'static str> {
    bundled()
        .iter()
        .chain(doc_examples())
        .chain(extra())
        .map(|(_, s)| s.as_str())
        .collect()
}
