//! The signature verifiers of `tollgate_auth::crypto` against the `p256`, `p384` and `rsa`
//! crates (the implementations they replaced): on any public key, message and signature —
//! valid, mutated or arbitrary bytes — both give the same verdict, and a point is accepted as
//! a P-256 / P-384 key exactly when the crate accepts it.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Value};
use tollgate_auth::jose::{b64url, b64url_encode, parse_jwk, verify_signature, Alg, KeyMaterial};

/// The demo's private keys (two RSA-2048 keys among them).
const PRIVATE_JWKS: &str = include_str!("../../../envoy/demo-keys/private.jwks.json");

/// Differential check of one input (see the module documentation).
pub fn verifiers(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = match u.int_in_range(0..=3u8) {
        Ok(0) => ec_point(&mut u),
        Ok(1) => es384(&mut u),
        Ok(2) => rsa(&mut u),
        _ => es256(&mut u),
    };
}

fn material(jwk: Value) -> Option<KeyMaterial> {
    parse_jwk(&jwk).ok().flatten().map(|k| k.material)
}

/// Change a valid signature the way an attacker would, or replace it.
fn mutate(u: &mut Unstructured<'_>, sig: &mut Vec<u8>, order: &[u8]) -> Result<()> {
    let n = sig.len();
    let half = n / 2;
    match u.int_in_range(0..=7u8)? {
        0 => {}
        1 => {
            let i = u.choose_index(n.max(1))?;
            if let Some(b) = sig.get_mut(i) {
                *b ^= 1 << u.int_in_range(0..=7u8)?;
            }
        }
        2 => *sig = u.arbitrary()?,
        3 => {
            let len = sig.len();
            *sig = u.bytes(len)?.to_vec();
        }
        4 if order.len() == half => {
            // r or s set to the order, or to a value near it.
            let mut v = order.to_vec();
            if let Some(l) = v.last_mut() {
                *l = l.wrapping_add(u.int_in_range(0..=2u8)?.wrapping_sub(1));
            }
            let at = if u.arbitrary()? { 0 } else { half };
            sig.splice(at..at + half, v);
        }
        5 if half > 0 => {
            // r and s swapped.
            let (r, s) = sig.split_at(half);
            *sig = [s, r].concat();
        }
        6 => sig.truncate(u.choose_index(n.max(1))?),
        _ => sig.insert(0, 0),
    }
    Ok(())
}

/// One ECDSA case for a curve crate (`p256`, `p384`): a key from arbitrary bytes, a valid
/// signature of an arbitrary message, mutated, then both verdicts compared.
macro_rules! ecdsa_case {
    ($name:ident, $curve:ident, $size:literal, $crv:literal, $alg:ident, $order:expr) => {
        fn $name(u: &mut Unstructured<'_>) -> Result<()> {
            use $curve::ecdsa::signature::{Signer, Verifier};
            use $curve::ecdsa::{Signature, SigningKey};
            let Ok(sk) = SigningKey::from_slice(u.bytes($size)?) else {
                return Ok(());
            };
            let vk = *sk.verifying_key();
            let pt = vk.to_encoded_point(false);
            let (Some(x), Some(y)) = (pt.x(), pt.y()) else {
                return Ok(());
            };
            let key = material(
                json!({"kty": "EC", "crv": $crv, "x": b64url_encode(x), "y": b64url_encode(y)}),
            );
            assert!(key.is_some(), "a {} key from the crate is refused", $crv);
            let Some(key) = key else { return Ok(()) };
            let msg: Vec<u8> = u.arbitrary()?;
            let sig: Signature = sk.sign(&msg);
            let mut sig = sig.to_bytes().to_vec();
            mutate(u, &mut sig, &$order)?;
            let theirs = Signature::from_slice(&sig).is_ok_and(|s| vk.verify(&msg, &s).is_ok());
            let ours = verify_signature(Alg::$alg, &key, &msg, &sig);
            assert_eq!(ours, theirs, "{} verdicts differ on {sig:?}", Alg::$alg);
            Ok(())
        }
    };
}

ecdsa_case!(es256, p256, 32, "P-256", ES256, P256_N);
ecdsa_case!(es384, p384, 48, "P-384", ES384, P384_N);

/// Arbitrary coordinates (often a real point with a byte changed): accepted as a key exactly
/// when the crate accepts the point.
fn ec_point(u: &mut Unstructured<'_>) -> Result<()> {
    let p384 = u.arbitrary::<bool>()?;
    let size = if p384 { 48 } else { 32 };
    let (mut x, mut y) = if u.arbitrary()? {
        (u.bytes(size)?.to_vec(), u.bytes(size)?.to_vec())
    } else {
        // The generator, then changed.
        let (gx, gy) = if p384 {
            (P384_GX, P384_GY)
        } else {
            (P256_GX, P256_GY)
        };
        (
            b64url(gx).unwrap_or_default(),
            b64url(gy).unwrap_or_default(),
        )
    };
    if u.arbitrary()? {
        let i = u.choose_index(size)?;
        let c = if u.arbitrary()? { &mut x } else { &mut y };
        if let Some(b) = c.get_mut(i) {
            *b = b.wrapping_add(u.arbitrary()?);
        }
    }
    let crv = if p384 { "P-384" } else { "P-256" };
    let ours =
        material(json!({"kty": "EC", "crv": crv, "x": b64url_encode(&x), "y": b64url_encode(&y)}))
            .is_some();
    let sec1 = [&[4u8][..], &x, &y].concat();
    let theirs = if p384 {
        p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).is_ok()
    } else {
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).is_ok()
    };
    assert_eq!(ours, theirs, "{crv} point verdicts differ: {x:?} {y:?}");
    Ok(())
}

struct RsaCase {
    ours: KeyMaterial,
    public: rsa::RsaPublicKey,
    /// (algorithm, message, valid signature)
    sigs: Vec<(Alg, Vec<u8>, Vec<u8>)>,
    n: Vec<u8>,
}

/// The demo's RSA keys with one valid signature per algorithm (signing is slow: made once).
fn rsa_cases() -> &'static [RsaCase] {
    static CELL: OnceLock<Vec<RsaCase>> = OnceLock::new();
    CELL.get_or_init(|| {
        use rsa::pkcs1v15::SigningKey as Pkcs1;
        use rsa::pss::BlindedSigningKey as Pss;
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        use sha2::{Sha256, Sha384, Sha512};
        let jwks: Value = serde_json::from_str(PRIVATE_JWKS).unwrap_or_default();
        let mut out = Vec::new();
        let empty = Vec::new();
        for k in jwks["keys"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter(|k| k["kty"] == "RSA")
        {
            let get = |n: &str| {
                rsa::BigUint::from_bytes_be(
                    &b64url(k[n].as_str().unwrap_or("")).unwrap_or_default(),
                )
            };
            let Ok(sk) = rsa::RsaPrivateKey::from_components(
                get("n"),
                get("e"),
                get("d"),
                vec![get("p"), get("q")],
            ) else {
                continue;
            };
            let Some(ours) = material(json!({"kty": "RSA", "n": k["n"], "e": k["e"]})) else {
                continue;
            };
            let mut rng = Salt(7);
            let msg = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9".to_vec();
            let sign = |alg: Alg, rng: &mut Salt| -> Vec<u8> {
                let sk = sk.clone();
                match alg {
                    Alg::RS256 => Pkcs1::<Sha256>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                    Alg::RS384 => Pkcs1::<Sha384>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                    Alg::RS512 => Pkcs1::<Sha512>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                    Alg::PS256 => Pss::<Sha256>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                    Alg::PS384 => Pss::<Sha384>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                    _ => Pss::<Sha512>::new(sk).sign_with_rng(rng, &msg).to_vec(),
                }
            };
            let sigs = [
                Alg::RS256,
                Alg::RS384,
                Alg::RS512,
                Alg::PS256,
                Alg::PS384,
                Alg::PS512,
            ]
            .into_iter()
            .map(|a| (a, msg.clone(), sign(a, &mut rng)))
            .collect();
            out.push(RsaCase {
                ours,
                public: sk.to_public_key(),
                sigs,
                n: b64url(k["n"].as_str().unwrap_or("")).unwrap_or_default(),
            });
        }
        assert!(out.len() >= 2, "the demo's RSA keys");
        out
    })
}

/// The crate's verdict: `sig` parses as the scheme's signature and `key` accepts it for `msg`.
fn verifies<S, V>(key: V, msg: &[u8], sig: &[u8]) -> bool
where
    S: for<'a> TryFrom<&'a [u8]>,
    V: rsa::signature::Verifier<S>,
{
    S::try_from(sig).is_ok_and(|s| key.verify(msg, &s).is_ok())
}

fn rsa(u: &mut Unstructured<'_>) -> Result<()> {
    use rsa::pkcs1v15::{Signature as Pkcs1Sig, VerifyingKey as Pkcs1Key};
    use rsa::pss::{Signature as PssSig, VerifyingKey as PssKey};
    use sha2::{Sha256, Sha384, Sha512};
    let case = u.choose(rsa_cases())?;
    let (alg, msg, sig) = u.choose(&case.sigs)?;
    let mut sig = sig.clone();
    if u.ratio(1, 8)? {
        // The modulus itself, or just below / above it.
        sig = case.n.clone();
        if let Some(l) = sig.last_mut() {
            *l = l.wrapping_add(u.int_in_range(0..=2u8)?.wrapping_sub(1));
        }
    } else {
        mutate(u, &mut sig, &[])?;
    }
    let mut msg = msg.clone();
    if u.ratio(1, 8)? {
        msg.push(u.arbitrary()?);
    }
    let pk = case.public.clone();
    let theirs = match alg {
        Alg::RS256 => verifies::<Pkcs1Sig, _>(Pkcs1Key::<Sha256>::new(pk), &msg, &sig),
        Alg::RS384 => verifies::<Pkcs1Sig, _>(Pkcs1Key::<Sha384>::new(pk), &msg, &sig),
        Alg::RS512 => verifies::<Pkcs1Sig, _>(Pkcs1Key::<Sha512>::new(pk), &msg, &sig),
        Alg::PS256 => verifies::<PssSig, _>(PssKey::<Sha256>::new(pk), &msg, &sig),
        Alg::PS384 => verifies::<PssSig, _>(PssKey::<Sha384>::new(pk), &msg, &sig),
        _ => verifies::<PssSig, _>(PssKey::<Sha512>::new(pk), &msg, &sig),
    };
    let ours = verify_signature(*alg, &case.ours, &msg, &sig);
    assert_eq!(ours, theirs, "{alg} verdicts differ on {sig:?}");
    Ok(())
}

/// Salt for PSS (and blinding): a fixed generator, so that the runs are reproducible.
struct Salt(u64);

impl rsa::rand_core::RngCore for Salt {
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
        dest.iter_mut().for_each(|b| *b = self.next_u64() as u8);
    }
    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> std::result::Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for Salt {}

const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
const P384_N: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];
const P256_GX: &str = "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY";
const P256_GY: &str = "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";
const P384_GX: &str = "qofKIr6LBTeOscce8yCtdG4dO2KLp5uYWfdB4IJUKjhVAvJdv1UpbDpUXjhydgq3";
const P384_GY: &str = "NhfeSpYmLG9dnpi_kpLcKfj0Hb0omhR86doxE7XwuMAKYLHOHX6BnXpDHXyQ6g5f";
