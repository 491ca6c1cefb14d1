//! RSA signature verification (RSASSA-PKCS1-v1_5 and RSASSA-PSS, RFC 8017) with Montgomery
//! multiplication on limbs of 28 (or 27) bits held in `u64`s. The key's Montgomery constants are
//! computed once, when the JWK is parsed; `e = 65537` takes 16 squarings (with a dedicated
//! squaring) and one multiplication.
//!
//! Why such short limbs: wasm32 has a native 64-bit multiplication but no 64×64→128 one, so a
//! product of two limbs must fit in 64 bits. With 32-bit limbs every product needs its carry
//! split off at once (shift, mask, store: most of the instructions of the inner loop). With
//! `w`-bit limbs a whole column of products — the `a·b` terms and the reduction's `m·n` terms of
//! one result limb (product scanning, "FIPS") — adds up in one `u64` as long as
//! `2·l·(2^w - 1)^2` stays below `2^64` (`l` limbs): the inner loop is two loads, one
//! multiplication and one addition per product, and the carry is taken once per column. For a
//! 2048-bit key that is 74 limbs of 28 bits (5476 products per multiplication against 4096
//! with 32-bit limbs, each about half the instructions).

use sha2::Digest;

/// Largest modulus accepted, in bits.
pub const MAX_BITS: usize = 8192;

/// Limb width for moduli of up to `MAX_LIMBS_28` limbs of 28 bits (3360 bits); 27 bits above
/// (up to 500 limbs). The column sums are bounded by `2·l·(2^w - 1)^2 + 2^(64-w)`, which stays
/// below `2^64` for `w = 28, l ≤ 127` and `w = 27, l ≤ 511`.
const MAX_LIMBS_28: usize = 120;

/// An RSA public key with its Montgomery constants.
#[derive(Clone)]
pub struct RsaKey {
    /// The modulus, little-endian limbs of `w` bits.
    n: Vec<u64>,
    /// The public exponent.
    e: u64,
    /// Modulus length in bits.
    bits: usize,
    /// Limb width in bits (28, or 27 for moduli above 3360 bits).
    w: u32,
    /// `-n^-1 mod 2^w`.
    inv: u64,
    /// `R^2 mod n`, `R = 2^(w·l)`.
    r2: Vec<u64>,
}

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSA-{} e={}", self.bits, self.e)
    }
}

/// Why a key is refused.
pub const ERR_EXPONENT: &str = "the exponent must be odd, at least 3 and below 2^33";

impl RsaKey {
    /// The key `(n, e)` from big-endian bytes. Refused as the `rsa` crate refuses them:
    /// more than `max_bits` bits, an even modulus, an even or out-of-range exponent
    /// (`2 < e < 2^33`), `e >= n`.
    pub fn new(n: &[u8], e: &[u8], max_bits: usize) -> Result<Self, String> {
        let n = strip(n);
        let bits = match n.first() {
            None => 0,
            Some(top) => n.len() * 8 - top.leading_zeros() as usize,
        };
        if bits > max_bits || bits > MAX_BITS {
            return Err("modulus too large".into());
        }
        let e = strip(e);
        if e.len() > 8 {
            return Err(ERR_EXPONENT.into());
        }
        let e = e.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
        if !(2..=(1u64 << 33) - 1).contains(&e) {
            return Err(ERR_EXPONENT.into());
        }
        let w = if bits.div_ceil(28) <= MAX_LIMBS_28 {
            28
        } else {
            27
        };
        let limbs = bits.div_ceil(w as usize).max(1);
        let mut nl = vec![0u64; limbs];
        limbs_from_be(n, w, &mut nl).ok_or("bad modulus")?;
        if n.last().is_none_or(|l| l & 1 == 0) || bits <= 64 && (bits < 34 || e >= low_u64(n)) {
            return Err("invalid modulus".into());
        }
        if e & 1 == 0 {
            return Err(ERR_EXPONENT.into());
        }
        // R^2 mod n by doubling: 1 -> 2^(2·w·limbs) mod n.
        let mut x = vec![0u64; limbs];
        if let Some(l) = x.first_mut() {
            *l = 1;
        }
        for _ in 0..2 * w as usize * limbs {
            double_mod(&mut x, &nl, w);
        }
        Ok(RsaKey {
            inv: neg_inv(nl.first().copied().unwrap_or(1), w),
            n: nl,
            e,
            bits,
            w,
            r2: x,
        })
    }

    /// Modulus length in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Modulus length in bytes (the signature's length).
    pub fn size(&self) -> usize {
        self.bits.div_ceil(8)
    }

    /// `out = a·b·R^-1 mod n` for `a, b < n`, product scanning: column `k` of the result sums
    /// `a[j]·b[k-j]` and the reduction's `m[j]·n[k-j]` in one `u64`; while `k < l` the column's
    /// low limb gives `m[k]` (which zeroes it), after that it is a limb of the result. Two
    /// columns at a time ([`dot_pair`]: each limb loaded once for both). `m` is scratch of `l`
    /// limbs.
    fn mont_mul(&self, a: &[u64], b: &[u64], out: &mut [u64], m: &mut [u64]) {
        let n = &self.n[..];
        let l = n.len();
        let (w, mask, inv) = (self.w, (1u64 << self.w) - 1, self.inv);
        let (Some(a), Some(b), Some(out), Some(m)) =
            (a.get(..l), b.get(..l), out.get_mut(..l), m.get_mut(..l))
        else {
            return;
        };
        let (Some(&b0), Some(&n0)) = (b.first(), n.first()) else {
            return;
        };
        let (b1, n1) = (
            b.get(1).copied().unwrap_or(0),
            n.get(1).copied().unwrap_or(0),
        );
        let mut acc = 0u64;
        // Columns k and k + 1 below l: the products of j < k together, then the rest.
        let mut k = 0;
        while k + 1 < l {
            let (Some(x), Some(y), Some(mx), Some(ny)) =
                (a.get(..k), b.get(1..k + 2), m.get(..k), n.get(1..k + 2))
            else {
                return;
            };
            let ((alo, ahi), (mlo, mhi)) = (dot_pair(x, y), dot_pair(mx, ny));
            let (lo, hi) = (alo + mlo, ahi + mhi);
            let s = acc + lo + a[k] * b0;
            let mk = s.wrapping_mul(inv) & mask;
            acc = (s + mk * n0) >> w;
            let s = acc + hi + a[k] * b1 + a[k + 1] * b0 + mk * n1;
            let mk1 = s.wrapping_mul(inv) & mask;
            acc = (s + mk1 * n0) >> w;
            m[k] = mk;
            m[k + 1] = mk1;
            k += 2;
        }
        if k < l {
            let (Some(bk), Some(nk)) = (b.get(1..=k), n.get(1..=k)) else {
                return;
            };
            let s = acc + dot2(&a[..k], bk, &m[..k], nk) + a[k] * b0;
            let mk = s.wrapping_mul(inv) & mask;
            m[k] = mk;
            acc = (s + mk * n0) >> w;
        }
        // Columns k and k + 1 from l: column k's products of j = k + 1 - l, then those of
        // j > k + 1 - l for both.
        let mut k = l;
        while k + 1 < 2 * l - 1 {
            let j0 = k + 1 - l;
            let (Some(x), Some(y), Some(mx), Some(ny)) =
                (a.get(j0 + 1..), b.get(j0..), m.get(j0 + 1..), n.get(j0..))
            else {
                return;
            };
            let ((alo, ahi), (mlo, mhi)) = (dot_pair(x, y), dot_pair(mx, ny));
            let (lo, hi) = (alo + mlo, ahi + mhi);
            let s = acc + lo + a[j0] * b[l - 1] + m[j0] * n[l - 1];
            out[k - l] = s & mask;
            let s = (s >> w) + hi;
            out[k + 1 - l] = s & mask;
            acc = s >> w;
            k += 2;
        }
        if k < 2 * l - 1 {
            let j0 = k + 1 - l;
            let (Some(aj), Some(bk), Some(mj), Some(nk)) =
                (a.get(j0..), b.get(j0..), m.get(j0..), n.get(j0..))
            else {
                return;
            };
            let s = acc + dot2(aj, bk, mj, nk);
            out[k - l] = s & mask;
            acc = s >> w;
        }
        self.finish(out, acc);
    }

    /// `out = a^2·R^-1 mod n` for `a < n`: [`Self::mont_mul`] with each column's products
    /// `a[j]·a[k-j]`, `j < k - j`, taken once and doubled. `m` is scratch of `l` limbs.
    fn mont_sqr(&self, a: &[u64], out: &mut [u64], m: &mut [u64]) {
        let n = &self.n[..];
        let l = n.len();
        let (w, mask, inv) = (self.w, (1u64 << self.w) - 1, self.inv);
        let (Some(a), Some(out), Some(m)) = (a.get(..l), out.get_mut(..l), m.get_mut(..l)) else {
            return;
        };
        let Some(&n0) = n.first() else {
            return;
        };
        let n1 = n.get(1).copied().unwrap_or(0);
        let mut acc = 0u64;
        // Columns k (even) and k + 1 below l: the pairs j < k/2 of both together; column k's
        // square a[k/2]^2, column k + 1's pair (k/2, k/2 + 1).
        let mut k = 0;
        while k + 1 < l {
            let h = k / 2;
            let (Some(x), Some(y), Some(mx), Some(ny)) =
                (a.get(..h), a.get(h + 1..k + 2), m.get(..k), n.get(1..k + 2))
            else {
                return;
            };
            let (plo, phi) = dot_pair(x, y);
            let (mlo, mhi) = dot_pair(mx, ny);
            let s = acc + 2 * plo + a[h] * a[h] + mlo;
            let mk = s.wrapping_mul(inv) & mask;
            acc = (s + mk * n0) >> w;
            let s = acc + 2 * (phi + a[h] * a[h + 1]) + mhi + mk * n1;
            let mk1 = s.wrapping_mul(inv) & mask;
            acc = (s + mk1 * n0) >> w;
            m[k] = mk;
            m[k + 1] = mk1;
            k += 2;
        }
        if k < l {
            let h = k / 2;
            let (Some(x), Some(y), Some(nk)) = (a.get(..h), a.get(h + 1..=k), n.get(1..=k)) else {
                return;
            };
            let s = acc + 2 * dot(x, y) + a[h] * a[h] + dot(&m[..k], nk);
            let mk = s.wrapping_mul(inv) & mask;
            m[k] = mk;
            acc = (s + mk * n0) >> w;
        }
        // Columns k and k + 1 from l: the pairs (j, k - j), j0 = k + 1 - l ≤ j < k - j, and
        // (j, k + 1 - j), j0 < j < k + 1 - j: those of j0 < j < ceil(k/2) together; column k's
        // pair of j0, and its square when k is even; column k + 1's pair of k/2 when k is even,
        // its square when k is odd.
        let mut k = l;
        while k + 1 < 2 * l - 1 {
            let j0 = k + 1 - l;
            let h = k.div_ceil(2);
            let (Some(x), Some(y), Some(mx), Some(ny)) = (
                a.get(j0 + 1..h),
                a.get(k + 1 - h..),
                m.get(j0 + 1..),
                n.get(j0..),
            ) else {
                return;
            };
            let (plo, phi) = dot_pair(x, y);
            let (mlo, mhi) = dot_pair(mx, ny);
            let (mut s0, mut s1) = (plo + a[j0] * a[l - 1], phi);
            if k % 2 == 0 {
                s0 = 2 * s0 + a[h] * a[h];
                s1 = 2 * (s1 + a[h] * a[h + 1]);
            } else {
                s0 *= 2;
                s1 = 2 * s1 + a[h] * a[h];
            }
            let s = acc + s0 + mlo + m[j0] * n[l - 1];
            out[k - l] = s & mask;
            let s = (s >> w) + s1 + mhi;
            out[k + 1 - l] = s & mask;
            acc = s >> w;
            k += 2;
        }
        if k < 2 * l - 1 {
            let start = k + 1 - l;
            let half = k.div_ceil(2);
            let (Some(lo), Some(hi), Some(mj), Some(nk)) = (
                a.get(start..half),
                a.get(k + 1 - half..),
                m.get(start..),
                n.get(start..),
            ) else {
                return;
            };
            let mut s = acc + 2 * dot(lo, hi) + dot(mj, nk);
            if k % 2 == 0 {
                s += a[k / 2] * a[k / 2];
            }
            out[k - l] = s & mask;
            acc = s >> w;
        }
        self.finish(out, acc);
    }

    /// The last limb from the carry `acc` of the last column, then one subtraction of `n` if
    /// the result (below `2n`) is not below `n`.
    fn finish(&self, out: &mut [u64], acc: u64) {
        let n = &self.n[..];
        let mask = (1u64 << self.w) - 1;
        if let Some(top) = out.last_mut() {
            *top = acc & mask;
        }
        if acc >> self.w != 0 || geq(out, n) {
            sub_assign(out, n, self.w);
        }
    }

    /// `sig^e mod n` as `size()` big-endian bytes; `None` when the signature does not have the
    /// modulus's length or is not below the modulus.
    pub fn public_op(&self, sig: &[u8]) -> Option<Vec<u8>> {
        if sig.len() != self.size() {
            return None;
        }
        let l = self.n.len();
        // One allocation for the working values: s, x, t, s·R and the scratch `m`.
        let mut buf = vec![0u64; 5 * l];
        let (s, rest) = buf.split_at_mut(l);
        let (x, rest) = rest.split_at_mut(l);
        let (t, rest) = rest.split_at_mut(l);
        let (s_m, m) = rest.split_at_mut(l);
        limbs_from_be(sig, self.w, s)?;
        if geq(s, &self.n) {
            return None;
        }
        let s = &*s;
        let (mut x, mut t) = (x, t);
        self.mont_mul(s, &self.r2, s_m, m); // s·R
        x.copy_from_slice(s_m);
        let s_m = &*s_m;
        let top = 63 - self.e.leading_zeros();
        // Square-and-multiply from the top bit. `e` is odd, so the last step multiplies: by the
        // plain `s` there, which leaves the plain result (no conversion out of Montgomery form).
        // For e = 65537: one conversion, 16 squarings, one multiplication.
        for i in (0..top).rev() {
            self.mont_sqr(x, t, m);
            std::mem::swap(&mut x, &mut t);
            if (self.e >> i) & 1 == 1 {
                self.mont_mul(x, if i == 0 { s } else { s_m }, t, m);
                std::mem::swap(&mut x, &mut t);
            }
        }
        let mut out = vec![0u8; self.size()];
        limbs_to_be(x, self.w, &mut out);
        Some(out)
    }

    /// RSASSA-PKCS1-v1_5 with hash `D` (SHA-256/384/512) over `msg`.
    pub fn verify_pkcs1<D: Digest>(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Some(em) = self.public_op(sig) else {
            return false;
        };
        let hash = D::digest(msg);
        let Some(prefix) = digest_info_prefix(hash.len()) else {
            return false;
        };
        let k = em.len();
        let t_len = prefix.len() + hash.len();
        if k < t_len + 11 {
            return false;
        }
        let ps_end = k - t_len - 1;
        em.first() == Some(&0)
            && em.get(1) == Some(&1)
            && em
                .get(2..ps_end)
                .is_some_and(|ps| ps.iter().all(|b| *b == 0xff))
            && em.get(ps_end) == Some(&0)
            && em.get(ps_end + 1..ps_end + 1 + prefix.len()) == Some(prefix)
            && em.get(k - hash.len()..) == Some(&hash[..])
    }

    /// RSASSA-PSS with hash `D`, MGF1 with `D`, and a salt as long as the hash (RFC 7518 §3.5).
    pub fn verify_pss<D: Digest>(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.pss_inner::<D>(msg, sig).unwrap_or(false)
    }

    fn pss_inner<D: Digest>(&self, msg: &[u8], sig: &[u8]) -> Option<bool> {
        let mut em = self.public_op(sig)?;
        let m_hash = D::digest(msg);
        let h_len = m_hash.len();
        let s_len = h_len;
        let em_bits = self.bits - 1;
        let em_len = em_bits.div_ceil(8);
        // I2OSP(m, emLen): when emLen < k the extra leading octet must be zero.
        let skip = em.len() - em_len;
        if em.get(..skip)?.iter().any(|b| *b != 0) {
            return Some(false);
        }
        let em = em.get_mut(skip..)?;
        if em_len < h_len + s_len + 2 || em.last() != Some(&0xbc) {
            return Some(false);
        }
        let (db, rest) = em.split_at_mut(em_len - h_len - 1);
        let h = rest.get(..h_len)?;
        let top_bits = 8 * em_len - em_bits;
        let mask: u8 = 0xff >> top_bits;
        if db.first()? & !mask != 0 {
            return Some(false);
        }
        // DB = maskedDB xor MGF1(H).
        for (counter, chunk) in (0u32..).zip(db.chunks_mut(h_len)) {
            let mut d = D::new();
            d.update(h);
            d.update(counter.to_be_bytes());
            let m = d.finalize();
            for (x, y) in chunk.iter_mut().zip(m.iter()) {
                *x ^= y;
            }
        }
        *db.first_mut()? &= mask;
        let ps_len = em_len - h_len - s_len - 2;
        if db.get(..ps_len)?.iter().any(|b| *b != 0) || db.get(ps_len) != Some(&1) {
            return Some(false);
        }
        let salt = db.get(ps_len + 1..)?;
        let mut d = D::new();
        d.update([0u8; 8]);
        d.update(&m_hash);
        d.update(salt);
        Some(d.finalize()[..] == *h)
    }
}

/// The DER DigestInfo prefix of SHA-256/384/512, by hash length.
fn digest_info_prefix(h_len: usize) -> Option<&'static [u8]> {
    const SHA256: [u8; 19] = [
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    const SHA384: [u8; 19] = [
        0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
        0x05, 0x00, 0x04, 0x30,
    ];
    const SHA512: [u8; 19] = [
        0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
        0x05, 0x00, 0x04, 0x40,
    ];
    match h_len {
        32 => Some(&SHA256),
        48 => Some(&SHA384),
        64 => Some(&SHA512),
        _ => None,
    }
}

/// Without leading zero bytes.
fn strip(b: &[u8]) -> &[u8] {
    let z = b.iter().take_while(|x| **x == 0).count();
    b.get(z..).unwrap_or(&[])
}

/// The value of the last (at most) eight big-endian bytes.
fn low_u64(b: &[u8]) -> u64 {
    let start = b.len().saturating_sub(8);
    b.get(start..)
        .unwrap_or(&[])
        .iter()
        .fold(0u64, |a, x| (a << 8) | u64::from(*x))
}

/// `Σ x[i]·y[len-1-i]` (the second slice read backwards), in one `u64` (see the module's
/// bound on the column sums).
#[inline(always)]
fn dot(x: &[u64], y: &[u64]) -> u64 {
    x.iter()
        .zip(y.iter().rev())
        .fold(0u64, |s, (a, b)| s.wrapping_add(a * b))
}

/// `Σ a[i]·b[len-i] + m[i]·n[len-i]` over `i < a.len()`, the second and fourth slices read
/// backwards from their ends: one column of [`RsaKey::mont_mul`].
#[inline(always)]
fn dot2(a: &[u64], b: &[u64], m: &[u64], n: &[u64]) -> u64 {
    a.iter()
        .zip(b.iter().rev())
        .zip(m.iter().zip(n.iter().rev()))
        .fold(0u64, |s, ((x, y), (u, v))| {
            s.wrapping_add(x * y).wrapping_add(u * v)
        })
}

/// Two neighbouring columns at once: with `r = x.len()` and `y` of `r + 1` limbs,
/// `(Σ x[i]·y[r-1-i], Σ x[i]·y[r-i])`, each `y` limb loaded once for both sums.
#[inline(always)]
fn dot_pair(x: &[u64], y: &[u64]) -> (u64, u64) {
    let r = x.len();
    let (Some(&top), Some(rest)) = (y.get(r), y.get(..r)) else {
        return (0, 0);
    };
    let (_, lo, hi) = x
        .iter()
        .zip(rest.iter().rev())
        .fold((top, 0u64, 0u64), |(prev, lo, hi), (a, b)| {
            (*b, lo.wrapping_add(a * b), hi.wrapping_add(a * prev))
        });
    (lo, hi)
}

/// `-m^-1 mod 2^w` for an odd `m0` (Newton's iteration).
fn neg_inv(m0: u64, w: u32) -> u64 {
    let mut x: u64 = 1;
    for _ in 0..6 {
        x = x.wrapping_mul(2u64.wrapping_sub(m0.wrapping_mul(x)));
    }
    x.wrapping_neg() & ((1u64 << w) - 1)
}

/// `a >= b` for equal-length little-endian limb slices.
fn geq(a: &[u64], b: &[u64]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x > y;
        }
    }
    true
}

/// `a -= b` (mod `2^(w·len)`) over equal lengths of `w`-bit limbs.
fn sub_assign(a: &mut [u64], b: &[u64], w: u32) {
    let mask = (1u64 << w) - 1;
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let d = x.wrapping_sub(*y).wrapping_sub(borrow);
        *x = d & mask;
        borrow = d >> 63;
    }
}

/// Big-endian bytes into little-endian `w`-bit limbs; `None` when the value needs more than
/// `out.len()` limbs.
fn limbs_from_be(bytes: &[u8], w: u32, out: &mut [u64]) -> Option<()> {
    let mask = (1u64 << w) - 1;
    out.iter_mut().for_each(|l| *l = 0);
    let mut limbs = out.iter_mut();
    let (mut acc, mut have) = (0u64, 0u32);
    for b in bytes.iter().rev() {
        acc |= u64::from(*b) << have;
        have += 8;
        if have >= w {
            match limbs.next() {
                Some(l) => *l = acc & mask,
                None if acc & mask != 0 => return None,
                None => {}
            }
            acc >>= w;
            have -= w;
        }
    }
    if acc != 0 {
        *limbs.next()? = acc;
    }
    Some(())
}

/// Little-endian `w`-bit limbs into exactly `out.len()` big-endian bytes (the value must fit).
fn limbs_to_be(limbs: &[u64], w: u32, out: &mut [u8]) {
    let mut bytes = out.iter_mut().rev();
    let (mut acc, mut have) = (0u64, 0u32);
    for l in limbs {
        acc |= l << have;
        have += w;
        while have >= 8 {
            if let Some(o) = bytes.next() {
                *o = acc as u8;
            }
            acc >>= 8;
            have -= 8;
        }
    }
    for o in bytes {
        *o = acc as u8;
        acc >>= 8;
    }
}

/// `x = 2x mod n` for `x < n`.
fn double_mod(x: &mut [u64], n: &[u64], w: u32) {
    let mask = (1u64 << w) - 1;
    let mut carry = 0u64;
    for l in x.iter_mut() {
        let d = (*l << 1) | carry;
        *l = d & mask;
        carry = d >> w;
    }
    if carry != 0 || geq(x, n) {
        sub_assign(x, n, w);
    }
}
