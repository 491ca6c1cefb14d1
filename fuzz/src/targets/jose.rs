//! JOSE: compact JWS splitting, strict base64url, the header's JSON without duplicate members,
//! JWK and JWK Set parsing, signature verification and the claim checks.

use std::rc::Rc;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use tollgate_auth::claims;
use tollgate_auth::config::{Compiled, Config};
use tollgate_auth::jose::{
    b64url, b64url_encode, parse_compact, parse_jwk, parse_jwks_bytes, verify_jws, Jwk,
    StrictValue, ALL_ALGS,
};

use crate::gen::{json as random_json, mutate, number, text};
use crate::seeds::{DEMO_JWKS, SECRET};

/// base64url without padding (for seeds).
pub fn b64(bytes: &[u8]) -> String {
    b64url_encode(bytes)
}

/// HS256 over `input` with [`SECRET`].
pub fn hs256(input: &str) -> Vec<u8> {
    match <Hmac<Sha256> as Mac>::new_from_slice(&SECRET) {
        Ok(mut m) => {
            m.update(input.as_bytes());
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

const ALGS: &[&str] = &[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "PS256",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "none",
    "None",
    "hs256",
    "",
    "HS256\u{0}",
    "RS1",
];
const HEADER_KEYS: &[&str] = &[
    "alg", "kid", "typ", "cty", "jwk", "jku", "x5u", "x5c", "x5t", "crit", "b64", "zip", "enc",
];
const CLAIM_KEYS: &[&str] = &[
    "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "scp", "plan", "roles", "org",
];
const CLAIM_STRINGS: &[&str] = &[
    "https://idp",
    "api",
    "other",
    "alice",
    "admin",
    "orders:read users:read",
    "pro",
    "",
];

/// Tokens signed with the demo keys (`make token`), in the corpus: the only tokens signed
/// with an asymmetric key that may verify.
const DEMO_TOKENS: [&str; 5] = [
    include_str!("../../corpus/jws/demo-es256"),
    include_str!("../../corpus/jws/demo-es384"),
    include_str!("../../corpus/jws/demo-eddsa"),
    include_str!("../../corpus/jws/demo-ps256"),
    include_str!("../../corpus/jws/demo-rs256"),
];

/// MemHost's clock, the `now` of the claim checks.
const NOW: f64 = 1_767_225_600.0;

fn header(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => {
            let with_kid = u.arbitrary::<bool>()?;
            let mut h = json!({"alg": "HS256"});
            if with_kid {
                h["kid"] = json!("hs");
            }
            h.to_string()
        }
        2 | 3 => {
            let mut m = Map::new();
            for _ in 0..u.int_in_range(0..=4)? {
                let k = *u.choose(HEADER_KEYS)?;
                let v = match k {
                    "alg" if u.arbitrary()? => json!(*u.choose(ALGS)?),
                    "kid" | "typ" if u.arbitrary()? => json!(text(u, &["hs", "es", "JWT"], 2)?),
                    _ => random_json(u, 1, HEADER_KEYS, ALGS)?,
                };
                m.insert(k.to_string(), v);
            }
            let mut s = Value::Object(m).to_string();
            if u.ratio(1, 4)? {
                // A duplicate member, which a plain JSON parser would let the second win.
                let k = *u.choose(HEADER_KEYS)?;
                s = s.replacen('{', &format!("{{\"{k}\":\"HS256\","), 1);
            }
            s
        }
        4 => random_json(u, 2, HEADER_KEYS, ALGS)?.to_string(),
        _ => text(u, &["{", "}", "\"alg\"", ":", "\"HS256\"", ","], 10)?,
    })
}

fn claims_value(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut c = json!({"iss": "https://idp", "aud": "api", "sub": "alice",
                       "iat": NOW, "exp": NOW + 600.0});
    if u.arbitrary()? {
        mutate(u, &mut c, 4, CLAIM_KEYS, CLAIM_STRINGS)?;
    }
    for name in ["exp", "nbf", "iat"] {
        if u.ratio(1, 4)? && c.is_object() {
            c[name] = match u.int_in_range(0..=3u8)? {
                0 => json!(NOW + f64::from(u.int_in_range(-4000..=4000)?)),
                1 => number(u)?,
                2 => json!(text(u, &["1", "e", "9"], 4)?),
                _ => Value::Null,
            };
        }
    }
    Ok(c)
}

/// Change a base64url segment the way an attacker would: padding, other alphabets, spaces,
/// non-canonical trailing bits, characters cut off.
fn corrupt(u: &mut Unstructured<'_>, s: &mut String) -> Result<()> {
    if !u.ratio(1, 5)? {
        return Ok(());
    }
    match u.int_in_range(0..=5u8)? {
        0 => s.push('='),
        1 => {
            let at = u.int_in_range(0..=s.len())?;
            if s.is_char_boundary(at) {
                s.insert(at, *u.choose(&['+', '/', ' ', '\n', '.', '%', 'é'])?);
            }
        }
        2 => {
            // The last character with other trailing bits.
            if let Some(c) = s.pop() {
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let i = alphabet
                    .iter()
                    .position(|a| char::from(*a) == c)
                    .unwrap_or(0);
                s.push(char::from(alphabet[(i + 1) % 64]));
            }
        }
        3 => {
            s.pop();
        }
        4 => s.clear(),
        _ => s.push_str(&text(u, &["A", "_", "-"], 3)?),
    }
    Ok(())
}

fn keys() -> &'static [Jwk] {
    static CELL: OnceLock<Vec<Jwk>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut keys = Vec::new();
        if let Ok(Some(k)) = parse_jwk(&json!({"kty": "oct", "kid": "hs", "k": b64(&SECRET)})) {
            keys.push(k);
        }
        if let Ok(demo) = parse_jwks_bytes(DEMO_JWKS.as_bytes()) {
            keys.extend(demo);
        }
        keys
    })
}

/// The compiled configuration the claim checks run against, built once per thread (a compiled
/// configuration holds `Rc`s: it is per worker in the filter, per thread here).
fn provider_config() -> Option<Rc<Compiled>> {
    thread_local! {
        static CELL: Option<Rc<Compiled>> = {
            let cfg = json!({
                "providers": [{"name": "idp", "issuer": "https://idp", "audiences": ["api", "other"],
                               "algorithms": ["HS256"], "max_lifetime": "1h", "clock_skew": "30s",
                               "jwks": {"keys": [{"kty": "oct", "kid": "hs", "k": b64(&SECRET)}]}}],
                "routes": [{"match": {}, "scopes": ["orders:read"],
                            "claims": [{"claim": "org.id", "any_of": ["o1"]}], "consumers": ["alice"]}]
            });
            Config::parse(cfg.to_string().as_bytes()).ok().map(Rc::new)
        };
    }
    CELL.with(Clone::clone)
}

/// A compact JWS, parsed, verified and its claims checked; only a token signed with the right
/// key and `alg` verifies. The bytes are used twice: as the token's text (real tokens in the
/// corpus), and to build a token from parts (each possibly broken).
pub fn jws(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_token(text);
    }
    let mut u = Unstructured::new(data);
    if let Ok(t) = token(&mut u) {
        check_token(&t.text);
    }
}

/// A compact JWS built from parts, each possibly broken.
pub struct Token {
    /// The token text.
    pub text: String,
    /// Its claims, when they are JSON.
    pub claims: Option<Value>,
}

/// Build a token: a header (plain, odd or random), claims (valid, mutated or bytes), a
/// signature (right or random), each segment possibly corrupted, and sometimes the wrong
/// number of segments.
pub fn token(u: &mut Unstructured<'_>) -> Result<Token> {
    let h = header(u)?;
    let claims = if u.ratio(3, 4)? {
        Some(claims_value(u)?)
    } else {
        None
    };
    let payload = match &claims {
        Some(c) => c.to_string().into_bytes(),
        None => u.arbitrary::<Vec<u8>>()?,
    };
    let (mut hs, mut ps) = (b64(h.as_bytes()), b64(&payload));
    let (h0, p0) = (hs.clone(), ps.clone());
    corrupt(u, &mut hs)?;
    corrupt(u, &mut ps)?;
    let mut ss = if u.arbitrary()? {
        b64(&hs256(&format!("{h0}.{p0}")))
    } else {
        b64(&u.arbitrary::<Vec<u8>>()?)
    };
    corrupt(u, &mut ss)?;
    let text = match u.int_in_range(0..=9u8)? {
        0 => format!("{hs}.{ps}"),
        1 => format!("{hs}.{ps}.{ss}.{ss}"),
        2 => crate::gen::text(u, &[".", "eyJ", "A", "_"], 12)?,
        _ => format!("{hs}.{ps}.{ss}"),
    };
    Ok(Token { text, claims })
}

/// What a token must give: (signed with [`SECRET`] over exactly its first two segments;
/// signed and with a plain `{"alg":"HS256"}` header, `kid` `hs` or none, so it must verify).
fn expected(token: &str) -> (bool, bool) {
    let Some((input, sig)) = token.rsplit_once('.') else {
        return (false, false);
    };
    let Some((h, p)) = input.split_once('.') else {
        return (false, false);
    };
    let signed = !p.contains('.') && !sig.is_empty() && sig == b64(&hs256(input));
    let header = b64url(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<StrictValue>(&b).ok());
    let plain = header.is_some_and(|StrictValue(v)| {
        v == json!({"alg": "HS256"}) || v == json!({"alg": "HS256", "kid": "hs"})
    });
    (signed, signed && plain)
}

fn check_token(token: &str) {
    let (untouched, plain_hs256) = expected(token);
    let parsed = parse_compact(token);
    let jws = match parsed {
        Ok(j) => j,
        Err(e) => {
            assert!(!e.to_string().is_empty() && !e.reason().is_empty());
            assert!(
                !(untouched && plain_hs256),
                "a well-formed HS256 token was refused: {e}"
            );
            return;
        }
    };
    // The parts are exactly those sent, and each decoding is the canonical one.
    let mut parts = token.split('.');
    let (th, tp, ts) = (parts.next(), parts.next(), parts.next());
    assert_eq!(
        Some(jws.signing_input),
        token.rsplit_once('.').map(|(a, _)| a)
    );
    assert_eq!(th.map(|s| b64url(s).is_ok()), Some(true));
    assert_eq!(tp, Some(jws.payload_b64));
    assert_eq!(b64(&jws.payload), jws.payload_b64);
    assert_eq!(Some(b64(&jws.signature).as_str()), ts);
    assert_eq!(
        tollgate_auth::jose::Alg::parse(jws.header.alg.name()),
        Some(jws.header.alg)
    );
    // The header is a JSON object without duplicates or key-bearing members.
    let hv = th.and_then(|s| b64url(s).ok()).unwrap_or_default();
    let strict: StrictValue = serde_json::from_slice(&hv).unwrap_or(StrictValue(Value::Null));
    let obj = strict.0.as_object().cloned().unwrap_or_default();
    assert!(
        !obj.is_empty(),
        "a header that is not a strict JSON object was accepted"
    );
    for k in ["jwk", "jku", "x5u", "x5c", "crit", "b64", "zip", "enc"] {
        assert!(!obj.contains_key(k), "a header with `{k}` was accepted");
    }
    let verdict = verify_jws(&jws, keys(), &ALL_ALGS);
    if verdict.is_ok() {
        assert!(
            (untouched && jws.header.alg == tollgate_auth::jose::Alg::HS256)
                || DEMO_TOKENS.contains(&token),
            "a token not signed with the key verified: {token}"
        );
    } else if untouched && plain_hs256 {
        unreachable!("a token signed with the key did not verify: {verdict:?}");
    }
    check_claims(&jws.payload, jws.header.typ.as_deref());
}

/// The claim checks on a payload: never a panic, and an accepted token is in its time window.
fn check_claims(payload: &[u8], typ: Option<&str>) {
    let Some(compiled) = provider_config() else {
        return;
    };
    let compiled = &*compiled;
    let (Some(p), Some(rule)) = (compiled.providers.first(), compiled.rules.0.first()) else {
        return;
    };
    let Ok(StrictValue(Value::Object(c))) = serde_json::from_slice::<StrictValue>(payload) else {
        return;
    };
    if claims::check_claims(p, typ, &c, NOW).is_ok() {
        let exp = c.get("exp").and_then(Value::as_f64);
        assert!(exp.is_some_and(|e| NOW <= e + p.skew), "{c:?}");
        for name in ["nbf", "iat"] {
            if let Some(t) = c.get(name).and_then(Value::as_f64) {
                assert!(t <= NOW + p.skew, "{name} in the future: {c:?}");
            }
        }
        if let (Some(max), Some(e)) = (p.max_lifetime, exp) {
            let start = c.get("iat").and_then(Value::as_f64).unwrap_or(NOW);
            assert!(e - start <= max + p.skew);
        }
    }
    let consumer = claims::string_claim(&c, &p.consumer_claim);
    let params = tollgate_common::RouteParams::default();
    if claims::authorize(rule, &c, consumer.as_deref(), &params).is_ok() {
        assert!(claims::scopes(&c).iter().any(|s| s == "orders:read"));
        assert_eq!(consumer.as_deref(), Some("alice"));
    }
    for v in c.values() {
        if let Some(h) = claims::header_value(v) {
            assert!(!h.chars().any(char::is_control), "{h:?}");
        }
    }
}

/// Strict base64url and the strict JSON value: a decoding is canonical (it encodes back to
/// the text), and the strict parser agrees with serde_json except on duplicate members.
/// The bytes are used twice: as text (base64url, then JSON), and to build such text.
pub fn b64_and_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = b64url(text) {
            assert_eq!(b64(&bytes), text, "a non-canonical encoding was accepted");
        }
    }
    if let Ok(StrictValue(sv)) = serde_json::from_slice::<StrictValue>(data) {
        assert_eq!(serde_json::from_slice::<Value>(data).ok(), Some(sv));
    }
    let mut u = Unstructured::new(data);
    let _ = check_b64_and_json(&mut u);
}

fn check_b64_and_json(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(
        u,
        &["A", "Q", "_", "-", "=", "+", "/", "AA", "AAA", "AAAA"],
        12,
    )?;
    if let Ok(bytes) = b64url(&s) {
        assert_eq!(b64(&bytes), s, "a non-canonical encoding was accepted");
    }
    let bytes: Vec<u8> = u.arbitrary()?;
    assert_eq!(b64url(&b64(&bytes)).ok(), Some(bytes));
    let v = random_json(u, 3, HEADER_KEYS, ALGS)?;
    let mut t = v.to_string();
    let duplicate = u.ratio(1, 3)? && t.starts_with('{') && t.len() > 2;
    if duplicate {
        let k = v
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .unwrap_or_else(|| "alg".into());
        let k = serde_json::to_string(&k).unwrap_or_default();
        t = format!("{{{k}:0,{k}:1,{}", t.get(1..).unwrap_or_default());
    }
    let strict = serde_json::from_str::<StrictValue>(&t);
    let plain = serde_json::from_str::<Value>(&t);
    if duplicate {
        assert!(strict.is_err(), "duplicate members accepted: {t}");
    } else {
        assert_eq!(strict.ok().map(|s| s.0), plain.ok(), "{t}");
    }
    Ok(())
}

/// JWKs and JWK Sets: the demo keys and an HMAC key, mutated, and arbitrary bytes. A key that
/// is accepted can verify the algorithm it names.
/// The bytes are used twice: as a JWK Set (or one JWK), and to choose mutations of the demo
/// keys.
pub fn jwk(data: &[u8]) {
    if let Ok(keys) = parse_jwks_bytes(data) {
        assert!(!keys.is_empty());
    }
    if let Ok(StrictValue(v)) = serde_json::from_slice::<StrictValue>(data) {
        check_key(&v);
    }
    let mut u = Unstructured::new(data);
    let _ = check_jwk(&mut u);
}

fn check_key(k: &Value) {
    if let Ok(Some(jwk)) = parse_jwk(k) {
        if let Some(a) = jwk.alg {
            assert!(jwk.material.supports(a), "{k}");
            assert!(jwk.accepts(a));
        }
    }
}

fn check_jwk(u: &mut Unstructured<'_>) -> Result<()> {
    let mut set: Value = serde_json::from_str(DEMO_JWKS).unwrap_or(Value::Null);
    if let Some(Value::Array(keys)) = set.get_mut("keys") {
        keys.push(json!({"kty": "oct", "kid": "hs", "k": b64(&SECRET), "alg": "HS256"}));
        keys.push(json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&[7u8; 32])}));
    }
    let jwk_keys = &[
        "kty", "crv", "x", "y", "n", "e", "k", "d", "alg", "use", "key_ops", "kid", "keys",
    ];
    let jwk_strings = &[
        "EC", "RSA", "oct", "OKP", "P-256", "P-384", "P-521", "Ed25519", "X25519", "sig", "enc",
        "verify", "AQAB", "AA", "", "ES256", "RS256", "HS256", "ES521",
    ];
    mutate(u, &mut set, 4, jwk_keys, jwk_strings)?;
    if let Some(Value::Array(keys)) = set.get("keys") {
        keys.iter().for_each(check_key);
    }
    let text = set.to_string();
    if let Ok(keys) = parse_jwks_bytes(text.as_bytes()) {
        assert!(!keys.is_empty());
    }
    Ok(())
}

/// The order of P-256's group (FIPS 186-4 D.1.2.3), for ECDSA values at the edge.
const P256_N: &str = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2)
        .filter_map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// Signature verification: a demo token with its signature or signing input changed never
/// verifies; signatures at the edges (zero, the group order, all ones, wrong lengths) never
/// verify; every key and algorithm pair answers without panicking.
pub fn signature(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check_signature(&mut u);
}

fn check_signature(u: &mut Unstructured<'_>) -> Result<()> {
    let token = u.choose(&DEMO_TOKENS)?.trim();
    let Ok(mut jws) = parse_compact(token) else {
        return Ok(());
    };
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        for t in DEMO_TOKENS {
            let ok =
                parse_compact(t.trim()).is_ok_and(|j| verify_jws(&j, keys(), &ALL_ALGS).is_ok());
            assert!(ok, "a demo token does not verify: {t}");
        }
    });
    let original = (jws.signature.clone(), jws.signing_input.to_string());
    let n = jws.signature.len();
    match u.int_in_range(0..=7u8)? {
        0 => {
            let i = u.choose_index(n.max(1))?;
            let bit = u.int_in_range(0..=7u8)?;
            if let Some(b) = jws.signature.get_mut(i) {
                *b ^= 1 << bit;
            }
        }
        1 => jws.signature.truncate(u.choose_index(n.max(1))?),
        2 => jws.signature.extend(u.arbitrary::<Vec<u8>>()?),
        3 => jws.signature = vec![*u.choose(&[0u8, 0xff, 1])?; n],
        4 => {
            // ECDSA: r and s set to 0, the order, or 1.
            let half = n / 2;
            let order = hex_bytes(P256_N);
            let edge = |k: u8| -> Vec<u8> {
                match k {
                    0 => vec![0; half],
                    1 if order.len() == half => order.clone(),
                    _ => {
                        let mut one = vec![0; half];
                        if let Some(l) = one.last_mut() {
                            *l = 1;
                        }
                        one
                    }
                }
            };
            let (r, s) = (u.int_in_range(0..=2u8)?, u.int_in_range(0..=2u8)?);
            if u.arbitrary()? {
                jws.signature.splice(..half, edge(r));
            } else {
                jws.signature.splice(half.., edge(s));
            }
        }
        5 => jws.signature = u.arbitrary::<Vec<u8>>()?,
        _ => {
            // Another signing input with the same signature.
            let mut input = jws.signing_input.as_bytes().to_vec();
            let i = u.choose_index(input.len().max(1))?;
            if let Some(b) = input.get_mut(i) {
                *b = b.wrapping_add(u.int_in_range(1..=255u8)?);
            }
            let alg = jws.header.alg;
            let changed = String::from_utf8_lossy(&input).into_owned();
            let verified = keys().iter().any(|k| {
                k.accepts(alg)
                    && tollgate_auth::jose::verify_signature(
                        alg,
                        &k.material,
                        &input,
                        &jws.signature,
                    )
            });
            assert!(
                !verified || changed == original.1,
                "another input verified: {changed}"
            );
        }
    }
    if jws.signature != original.0 {
        assert!(
            verify_jws(&jws, keys(), &ALL_ALGS).is_err(),
            "a changed signature verified: {token} with {:?}",
            jws.signature
        );
    }
    // Any key with any algorithm and arbitrary bytes: an answer, never a panic.
    let key = u.choose(keys())?;
    let alg = *u.choose(&ALL_ALGS)?;
    let sig: Vec<u8> = u.arbitrary()?;
    let _ = tollgate_auth::jose::verify_signature(alg, &key.material, token.as_bytes(), &sig);
    Ok(())
}
