//! Differential tests: our verifiers against the `p256`, `p384` and `rsa` crates on valid
//! signatures and on signatures corrupted the ways an attacker (or a bug) would.

use serde_json::{json, Value};

use crate::jose::{b64url, b64url_encode, parse_jwk, verify_signature, Alg, KeyMaterial};

/// A deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

impl rsa::rand_core::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        self.next() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.next()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.iter_mut().for_each(|b| *b = self.next() as u8);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for Rng {}

fn key(jwk: Value) -> KeyMaterial {
    parse_jwk(&jwk).unwrap().unwrap().material
}

/// Corrupted versions of a valid signature `sig` of `size`-byte halves (EC) or of one
/// `size`-byte integer (RSA), and the order / modulus as big-endian bytes.
fn corruptions(rng: &mut Rng, sig: &[u8], modulus: &[u8], ec: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = sig.to_vec();
    let i = rng.below(s.len());
    s[i] ^= 1 << rng.below(8);
    out.push(s);
    out.push(rng.bytes(sig.len()));
    out.push(sig[..sig.len() - 1].to_vec());
    let mut longer = sig.to_vec();
    longer.insert(0, 0);
    out.push(longer);
    out.push(vec![0; sig.len()]);
    out.push(vec![0xff; sig.len()]);
    let size = modulus.len();
    let mut minus_one = modulus.to_vec();
    for b in minus_one.iter_mut().rev() {
        let (v, borrow) = b.overflowing_sub(1);
        *b = v;
        if !borrow {
            break;
        }
    }
    if ec {
        // r or s replaced by 0, n, n - 1, or r and s swapped.
        for edge in [vec![0u8; size], modulus.to_vec(), minus_one.clone()] {
            let mut a = sig.to_vec();
            a[..size].copy_from_slice(&edge);
            out.push(a);
            let mut b = sig.to_vec();
            b[size..].copy_from_slice(&edge);
            out.push(b);
        }
        let mut swapped = sig[size..].to_vec();
        swapped.extend_from_slice(&sig[..size]);
        out.push(swapped);
        // s negated (n - s): the other valid `s` for the same `r` in plain ECDSA.
        let mut neg = sig.to_vec();
        let mut borrow = 0i32;
        for k in (0..size).rev() {
            let v = i32::from(modulus[k]) - i32::from(sig[size + k]) - borrow;
            neg[size + k] = v.rem_euclid(256) as u8;
            borrow = i32::from(v < 0);
        }
        out.push(neg);
    } else {
        out.push(modulus.to_vec());
        out.push(minus_one);
        out.push(vec![1; sig.len()]);
    }
    out
}

#[test]
fn p256_and_p384_agree_with_the_crates() {
    use p256::ecdsa::signature::{Signer, Verifier};
    let mut rng = Rng(256);
    let mut checked = 0;
    let n256 = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    let n384 = hex("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973");
    for round in 0..12 {
        let msgs: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                let n = rng.below(200);
                rng.bytes(n)
            })
            .collect();
        // P-256
        let sk = loop {
            if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&rng.bytes(32)) {
                break k;
            }
        };
        let vk = *sk.verifying_key();
        let pt = vk.to_encoded_point(false);
        let ours = key(json!({"kty": "EC", "crv": "P-256",
            "x": b64url_encode(pt.x().unwrap()), "y": b64url_encode(pt.y().unwrap())}));
        for (i, m) in msgs.iter().enumerate() {
            let sig: p256::ecdsa::Signature = sk.sign(m);
            let sig = sig.to_bytes().to_vec();
            assert!(
                verify_signature(Alg::ES256, &ours, m, &sig),
                "round {round}"
            );
            let other = &msgs[(i + 1) % msgs.len()];
            assert_eq!(verify_signature(Alg::ES256, &ours, other, &sig), other == m);
            for bad in corruptions(&mut rng, &sig, &n256, true) {
                let theirs = p256::ecdsa::Signature::from_slice(&bad)
                    .is_ok_and(|s| vk.verify(m, &s).is_ok());
                assert_eq!(
                    verify_signature(Alg::ES256, &ours, m, &bad),
                    theirs,
                    "{bad:?}"
                );
                checked += 1;
            }
            checked += 2;
        }
        // P-384
        let sk = loop {
            if let Ok(k) = p384::ecdsa::SigningKey::from_slice(&rng.bytes(48)) {
                break k;
            }
        };
        let vk = *sk.verifying_key();
        let pt = vk.to_encoded_point(false);
        let ours = key(json!({"kty": "EC", "crv": "P-384",
            "x": b64url_encode(pt.x().unwrap()), "y": b64url_encode(pt.y().unwrap())}));
        for m in msgs.iter().take(3) {
            let sig: p384::ecdsa::Signature = sk.sign(m);
            let sig = sig.to_bytes().to_vec();
            assert!(
                verify_signature(Alg::ES384, &ours, m, &sig),
                "round {round}"
            );
            for bad in corruptions(&mut rng, &sig, &n384, true) {
                let theirs = p384::ecdsa::Signature::from_slice(&bad)
                    .is_ok_and(|s| vk.verify(m, &s).is_ok());
                assert_eq!(
                    verify_signature(Alg::ES384, &ours, m, &bad),
                    theirs,
                    "{bad:?}"
                );
                checked += 1;
            }
            checked += 1;
        }
    }
    assert!(checked >= 2000, "{checked}");
}

#[test]
fn ec_keys_off_the_curve_are_refused() {
    let g_x = "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY";
    let g_y = "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";
    assert!(parse_jwk(&json!({"kty": "EC", "crv": "P-256", "x": g_x, "y": g_y})).is_ok());
    let mut y = b64url(g_y).unwrap();
    y[31] ^= 1;
    let bad = json!({"kty": "EC", "crv": "P-256", "x": g_x, "y": b64url_encode(&y)});
    assert!(parse_jwk(&bad).is_err());
    // x = p (not a field element).
    let p = hex("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");
    let bad = json!({"kty": "EC", "crv": "P-256", "x": b64url_encode(&p), "y": g_y});
    assert!(parse_jwk(&bad).is_err());
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn rsa_agrees_with_the_crate() {
    use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer, Verifier};
    use sha2::{Sha256, Sha384, Sha512};
    let text = include_str!("../../../../envoy/demo-keys/private.jwks.json");
    let jwks: Value = serde_json::from_str(text).unwrap();
    let mut rng = Rng(2048);
    let mut checked = 0;
    for k in jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kty"] == "RSA")
    {
        let get = |n: &str| rsa::BigUint::from_bytes_be(&b64url(k[n].as_str().unwrap()).unwrap());
        let sk = rsa::RsaPrivateKey::from_components(
            get("n"),
            get("e"),
            get("d"),
            vec![get("p"), get("q")],
        )
        .unwrap();
        let pk = sk.to_public_key();
        let ours = key(json!({"kty": "RSA", "n": k["n"], "e": k["e"]}));
        let n = b64url(k["n"].as_str().unwrap()).unwrap();
        for round in 0..4 {
            let len = rng.below(300);
            let m = rng.bytes(len);
            macro_rules! check {
                ($alg:expr, $sig:expr, $verifier:expr, $sigty:ty) => {{
                    let sig: Vec<u8> = $sig;
                    assert!(verify_signature($alg, &ours, &m, &sig), "{} {round}", $alg);
                    assert!(!verify_signature($alg, &ours, b"other", &sig));
                    for bad in corruptions(&mut rng, &sig, &n, false) {
                        let theirs = <$sigty>::try_from(&bad[..])
                            .is_ok_and(|s| $verifier.verify(&m, &s).is_ok());
                        assert_eq!(verify_signature($alg, &ours, &m, &bad), theirs, "{}", $alg);
                        checked += 1;
                    }
                }};
            }
            use rsa::pkcs1v15::{Signature as P1, SigningKey as S1, VerifyingKey as V1};
            use rsa::pss::{Signature as Pss, SigningKey as S2, VerifyingKey as V2};
            check!(
                Alg::RS256,
                S1::<Sha256>::new(sk.clone()).sign(&m).to_vec(),
                V1::<Sha256>::new(pk.clone()),
                P1
            );
            check!(
                Alg::RS384,
                S1::<Sha384>::new(sk.clone()).sign(&m).to_vec(),
                V1::<Sha384>::new(pk.clone()),
                P1
            );
            check!(
                Alg::RS512,
                S1::<Sha512>::new(sk.clone()).sign(&m).to_vec(),
                V1::<Sha512>::new(pk.clone()),
                P1
            );
            check!(
                Alg::PS256,
                S2::<Sha256>::new(sk.clone())
                    .sign_with_rng(&mut rng, &m)
                    .to_vec(),
                V2::<Sha256>::new(pk.clone()),
                Pss
            );
            check!(
                Alg::PS384,
                S2::<Sha384>::new(sk.clone())
                    .sign_with_rng(&mut rng, &m)
                    .to_vec(),
                V2::<Sha384>::new(pk.clone()),
                Pss
            );
            check!(
                Alg::PS512,
                S2::<Sha512>::new(sk.clone())
                    .sign_with_rng(&mut rng, &m)
                    .to_vec(),
                V2::<Sha512>::new(pk.clone()),
                Pss
            );
            // Key confusion inside the family: a PKCS#1 signature is no PSS signature.
            let p1 = S1::<Sha256>::new(sk.clone()).sign(&m).to_vec();
            assert!(!verify_signature(Alg::PS256, &ours, &m, &p1));
        }
    }
    assert!(checked >= 400, "{checked}");
}

#[test]
fn rsa_keys_are_refused_as_the_crate_refuses_them() {
    use crate::crypto::rsa::RsaKey;
    let n = {
        let mut n = vec![0xc5u8; 256];
        n[255] = 0x01;
        n
    };
    for (e, ok) in [
        (3u64, true),
        (65537, true),
        ((1 << 33) - 1, true),
        (1, false),
        (2, false),
        (65536, false),
        (1 << 33, false),
        ((1 << 33) + 1, false),
    ] {
        let e = e.to_be_bytes();
        assert_eq!(RsaKey::new(&n, &e, 8192).is_ok(), ok, "{e:?}");
        let theirs = rsa::RsaPublicKey::new_with_max_size(
            rsa::BigUint::from_bytes_be(&n),
            rsa::BigUint::from_bytes_be(&e),
            8192,
        );
        assert_eq!(theirs.is_ok(), ok, "{e:?}");
    }
    let mut even = n.clone();
    even[255] = 0x02;
    assert!(RsaKey::new(&even, &[1, 0, 1], 8192).is_err());
    assert!(RsaKey::new(&[0xff; 1025], &[1, 0, 1], 8192).is_err());
    assert!(RsaKey::new(&[], &[1, 0, 1], 8192).is_err());
    // Leading zeros in n and e are ignored.
    let mut padded = vec![0u8; 3];
    padded.extend_from_slice(&n);
    let k = RsaKey::new(&padded, &[0, 0, 1, 0, 1], 8192).unwrap();
    assert_eq!((k.bits(), k.size()), (2048, 256));
}

#[test]
fn p256_tables_are_counted_and_freed() {
    use crate::crypto::ec::{self, EcKey};
    use sha2::{Digest, Sha256};
    let before = ec::table_bytes();
    let g = ec::p256()
        .point(
            &b64url("axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY").unwrap(),
            &b64url("T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU").unwrap(),
        )
        .unwrap();
    let k = EcKey::new(g);
    assert!(!k.has_table());
    assert!(!ec::p256().verify(&k, &Sha256::digest(b"x"), &[1u8; 64]));
    assert!(k.has_table());
    drop(k);
    // Other tests build tables concurrently: only check the drop does not underflow.
    assert!(ec::table_bytes() < ec::TABLE_BYTES_CAP || before >= ec::TABLE_BYTES_CAP);
}

#[test]
fn binary_inversion_agrees_with_fermat() {
    use crate::crypto::ec;
    let mut rng = Rng(99);
    for _ in 0..200 {
        let f = &ec::p256().fq;
        let mut a = [0u32; 8];
        a.iter_mut().for_each(|l| *l = rng.next() as u32);
        if crate::crypto::field::geq(&a, &f.p) {
            a[7] &= 0x7fff_ffff;
        }
        let inv = f.invert_plain(&a);
        assert_eq!(f.to_mont(&inv), f.invert(&f.to_mont(&a)), "{a:?}");
        let f = &ec::p384().fp;
        let mut b = [0u32; 12];
        b.iter_mut().for_each(|l| *l = rng.next() as u32);
        b[11] &= 0x7fff_ffff;
        b[0] = (b[0] & 0xff) * (rng.below(2) as u32);
        let inv = f.invert_plain(&b);
        assert_eq!(f.to_mont(&inv), f.invert(&f.to_mont(&b)), "{b:?}");
    }
    let f = &ec::p256().fq;
    assert_eq!(f.invert_plain(&[0; 8]), [0; 8]);
    let mut one = [0u32; 8];
    one[0] = 1;
    assert_eq!(f.invert_plain(&one), one);
}

#[test]
fn rsa_public_operation_for_any_exponent() {
    use crate::crypto::rsa::RsaKey;
    let mut rng = Rng(3);
    // Even and odd limb counts (74, 73, 37, 3 limbs of 28 bits; 125, 223, 304 of 27).
    for bits in [
        2048usize, 2044, 2056, 3072, 4096, 1024, 57, 3361, 6000, 8192,
    ] {
        let mut n = rng.bytes(bits.div_ceil(8));
        let top = bits - 8 * (n.len() - 1);
        n[0] = (n[0] & ((1u16 << top) - 1) as u8) | 1 << (top - 1);
        *n.last_mut().unwrap() |= 1;
        let big_n = rsa::BigUint::from_bytes_be(&n);
        for e in [3u64, 17, 65537, (1 << 33) - 1] {
            let k = RsaKey::new(&n, &e.to_be_bytes(), 8192).unwrap();
            for _ in 0..3 {
                let mut s = rng.bytes(n.len());
                s[0] &= ((1u16 << (top - 1)) - 1) as u8;
                let got = k.public_op(&s).unwrap();
                let want = rsa::BigUint::from_bytes_be(&s).modpow(&rsa::BigUint::from(e), &big_n);
                assert_eq!(rsa::BigUint::from_bytes_be(&got), want, "{bits} {e}");
            }
            // n - 1 = -1: odd powers give n - 1 back.
            let mut m1 = n.clone();
            *m1.last_mut().unwrap() -= 1;
            assert_eq!(k.public_op(&m1).unwrap(), m1);
            assert_eq!(k.public_op(&n), None);
            assert_eq!(k.public_op(&n[1..]), None);
        }
    }
}

#[test]
fn keys_without_a_table_give_the_same_verdicts() {
    use crate::crypto::ec::{self, EcKey};
    use p256::ecdsa::signature::Signer;
    use sha2::{Digest, Sha256, Sha384};
    let mut rng = Rng(7);
    let n256 = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    for _ in 0..6 {
        let sk = p256::ecdsa::SigningKey::from_slice(&rng.bytes(32)).unwrap();
        let pt = sk.verifying_key().to_encoded_point(false);
        let q = ec::p256().point(pt.x().unwrap(), pt.y().unwrap()).unwrap();
        let (with, without) = (EcKey::new(q), EcKey::without_table(q));
        let m = rng.bytes(40);
        let sig: p256::ecdsa::Signature = sk.sign(&m);
        let sig = sig.to_bytes().to_vec();
        let h = Sha256::digest(&m);
        assert!(ec::p256().verify(&without, &h, &sig));
        assert!(!without.has_table());
        for bad in corruptions(&mut rng, &sig, &n256, true) {
            assert_eq!(
                ec::p256().verify(&without, &h, &bad),
                ec::p256().verify(&with, &h, &bad)
            );
        }
    }
    let sk = p384::ecdsa::SigningKey::from_slice(&rng.bytes(48)).unwrap();
    let pt = sk.verifying_key().to_encoded_point(false);
    let q = ec::p384().point(pt.x().unwrap(), pt.y().unwrap()).unwrap();
    let m = b"p384";
    let sig: p384::ecdsa::Signature = p384::ecdsa::signature::Signer::sign(&sk, m);
    let h = Sha384::digest(m);
    assert!(ec::p384().verify(&EcKey::without_table(q), &h, &sig.to_bytes()));
    let mut bad = sig.to_bytes().to_vec();
    bad[5] ^= 1;
    assert!(!ec::p384().verify(&EcKey::without_table(q), &h, &bad));
}
