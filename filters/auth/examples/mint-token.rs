//! Mint a demo JWT with the DEMO-ONLY keys of `envoy/demo-keys/private.jwks.json`.
//!
//! ```text
//! cargo run -q --release -p tollgate-auth --example mint-token -- --sub alice --scopes "orders:read"
//! ```
//!
//! Options: `--keys FILE` (private JWKS), `--kid KID` (default `demo-es256`), `--sub`, `--scopes`
//! (space-separated, into `scope`), `--iss` (default `https://demo.tollgate.local`), `--aud`
//! (default `tollgate-demo`; `-` for none), `--ttl SECS` (default 3600; `--no-exp` for none),
//! `--nbf-in SECS`, `--iat-in SECS` (offsets from now), `--claims JSON` (merged into the claims,
//! `null` removes one), `--header JSON` (merged into the header, `null` removes one),
//! `--hs-secret B64URL` (sign HS256/384/512 with this secret instead of a key from the file;
//! set `alg` with `--header`), `--at UNIX` (pretend the time is this).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::{Sha256, Sha384, Sha512};

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

fn merge(into: &mut Map<String, Value>, extra: &str) {
    let v: Value = serde_json::from_str(extra).expect("--claims / --header must be a JSON object");
    for (k, v) in v.as_object().expect("a JSON object") {
        if v.is_null() {
            into.remove(k);
        } else {
            into.insert(k.clone(), v.clone());
        }
    }
}

/// A deterministic byte source for the PSS salt (demo tokens only).
struct SaltSource(u64);

impl rsa::rand_core::RngCore for SaltSource {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rsa::rand_core::CryptoRng for SaltSource {}

fn sign(alg: &str, key: Option<&Value>, secret: Option<&[u8]>, input: &[u8]) -> Vec<u8> {
    use p256::ecdsa::signature::Signer;
    match alg {
        "HS256" | "HS384" | "HS512" => {
            let s = secret.expect("--hs-secret for HS algorithms");
            match alg {
                "HS256" => mac::<Hmac<Sha256>>(s, input),
                "HS384" => mac::<Hmac<Sha384>>(s, input),
                _ => mac::<Hmac<Sha512>>(s, input),
            }
        }
        _ => {
            let k = key.expect("a key");
            let get = |n: &str| unb64(k[n].as_str().unwrap_or_else(|| panic!("key has no {n}")));
            match alg {
                "ES256" => {
                    let sk = p256::ecdsa::SigningKey::from_slice(&get("d")).unwrap();
                    let sig: p256::ecdsa::Signature = sk.sign(input);
                    sig.to_bytes().to_vec()
                }
                "ES384" => {
                    let sk = p384::ecdsa::SigningKey::from_slice(&get("d")).unwrap();
                    let sig: p384::ecdsa::Signature = sk.sign(input);
                    sig.to_bytes().to_vec()
                }
                "EdDSA" => {
                    let kp = ed25519_compact::KeyPair::from_seed(
                        ed25519_compact::Seed::from_slice(&get("d")).unwrap(),
                    );
                    kp.sk.sign(input, None).to_vec()
                }
                rs if rs.starts_with("RS") || rs.starts_with("PS") => {
                    let big = |n: &str| rsa::BigUint::from_bytes_be(&get(n));
                    let key = rsa::RsaPrivateKey::from_components(
                        big("n"),
                        big("e"),
                        big("d"),
                        vec![big("p"), big("q")],
                    )
                    .unwrap();
                    rsa_sign(rs, key, input)
                }
                other => panic!("cannot sign {other}"),
            }
        }
    }
}

fn rsa_sign(alg: &str, key: rsa::RsaPrivateKey, input: &[u8]) -> Vec<u8> {
    use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
    let mut rng = SaltSource(input.len() as u64);
    match alg {
        "RS256" => rsa::pkcs1v15::SigningKey::<Sha256>::new(key)
            .sign(input)
            .to_vec(),
        "RS384" => rsa::pkcs1v15::SigningKey::<Sha384>::new(key)
            .sign(input)
            .to_vec(),
        "RS512" => rsa::pkcs1v15::SigningKey::<Sha512>::new(key)
            .sign(input)
            .to_vec(),
        "PS256" => rsa::pss::SigningKey::<Sha256>::new(key)
            .sign_with_rng(&mut rng, input)
            .to_vec(),
        "PS384" => rsa::pss::SigningKey::<Sha384>::new(key)
            .sign_with_rng(&mut rng, input)
            .to_vec(),
        "PS512" => rsa::pss::SigningKey::<Sha512>::new(key)
            .sign_with_rng(&mut rng, input)
            .to_vec(),
        other => panic!("cannot sign {other}"),
    }
}

fn mac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], input: &[u8]) -> Vec<u8> {
    let mut m = <M as hmac::digest::KeyInit>::new_from_slice(secret).unwrap();
    m.update(input);
    m.finalize().into_bytes().to_vec()
}

const DEMO_KEYS: &str = include_str!("../../../envoy/demo-keys/private.jwks.json");

fn main() {
    let mut args = std::env::args().skip(1);
    // The DEMO-ONLY keys are built in, so the binary works wherever the checkout is (a copied
    // target/ or a moved worktree); `--keys FILE` reads others.
    let mut keys_path = "the built-in demo keys".to_string();
    let mut keys_file = None;
    let mut kid = "demo-es256".to_string();
    let (mut sub, mut scopes) = (None, None);
    let mut iss = "https://demo.tollgate.local".to_string();
    let mut aud = "tollgate-demo".to_string();
    let mut ttl: Option<i64> = Some(3600);
    let (mut nbf_in, mut iat_in) = (None::<i64>, 0i64);
    let (mut claims_extra, mut header_extra) = (Vec::new(), Vec::new());
    let mut secret = None;
    let mut now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--keys" => {
                keys_path = val();
                keys_file = Some(keys_path.clone());
            }
            "--kid" => kid = val(),
            "--sub" => sub = Some(val()),
            "--scopes" => scopes = Some(val()),
            "--iss" => iss = val(),
            "--aud" => aud = val(),
            "--ttl" => ttl = Some(val().parse().expect("--ttl SECS")),
            "--no-exp" => ttl = None,
            "--nbf-in" => nbf_in = Some(val().parse().expect("--nbf-in SECS")),
            "--iat-in" => iat_in = val().parse().expect("--iat-in SECS"),
            "--claims" => claims_extra.push(val()),
            "--header" => header_extra.push(val()),
            "--hs-secret" => secret = Some(unb64(&val())),
            "--at" => now = val().parse().expect("--at UNIX"),
            "-h" | "--help" => {
                println!("see the comment at the top of filters/auth/examples/mint-token.rs");
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let mut claims = Map::new();
    if iss != "-" {
        claims.insert("iss".into(), json!(iss));
    }
    if aud != "-" {
        claims.insert("aud".into(), json!(aud));
    }
    if let Some(s) = sub {
        claims.insert("sub".into(), json!(s));
    }
    if let Some(s) = scopes {
        claims.insert("scope".into(), json!(s));
    }
    claims.insert("iat".into(), json!(now + iat_in));
    if let Some(t) = ttl {
        claims.insert("exp".into(), json!(now + t));
    }
    if let Some(n) = nbf_in {
        claims.insert("nbf".into(), json!(now + n));
    }
    for c in &claims_extra {
        merge(&mut claims, c);
    }
    let mut header = Map::new();
    let key = if secret.is_some() {
        header.insert("alg".into(), json!("HS256"));
        None
    } else {
        let text = match &keys_file {
            Some(f) => std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}")),
            None => DEMO_KEYS.to_string(),
        };
        let doc: Value = serde_json::from_str(&text).unwrap();
        let key = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("no key {kid} in {keys_path}"))
            .clone();
        header.insert("alg".into(), key["alg"].clone());
        header.insert("kid".into(), json!(kid));
        Some(key)
    };
    header.insert("typ".into(), json!("JWT"));
    for h in &header_extra {
        merge(&mut header, h);
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string();
    let input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(&header).unwrap()),
        b64(&serde_json::to_vec(&claims).unwrap())
    );
    let sig = if alg == "none" {
        Vec::new()
    } else {
        // With a header `alg` other than the key's, sign with the key's own algorithm (for
        // tests of algorithm substitution).
        let sign_alg = key
            .as_ref()
            .and_then(|k| k["alg"].as_str())
            .filter(|_| secret.is_none())
            .unwrap_or(&alg)
            .to_string();
        sign(&sign_alg, key.as_ref(), secret.as_deref(), input.as_bytes())
    };
    println!("{input}.{}", b64(&sig));
}
