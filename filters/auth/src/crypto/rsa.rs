//! RSA signature verification (RSASSA-PKCS1-v1_5 and RSASSA-PSS, RFC 8017) with Montgomery
//! multiplication on 32-bit limbs. The key's Montgomery constants are computed once, when the
//! JWK is parsed; `e = 65537` takes 16 squarings (with a dedicated squaring) and one
//! multiplication.

use sha2::Digest;

use super::field::{geq, limbs_from_be, limbs_to_be, neg_inv32, sub_assign};

/// Largest modulus accepted, in bits.
pub const MAX_BITS: usize = 8192;

/// An RSA public key with its Montgomery constants.
#[derive(Clone)]
pub struct RsaKey {
    /// The modulus, little-endian limbs.
    n: Vec<u32>,
    /// The public exponent.
    e: u64,
    /// Modulus length in bits.
    bits: usize,
    /// `-n^-1 mod 2^32`.
    inv: u32,
    /// `R^2 mod n`.
    r2: Vec<u32>,
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
        if bits > max_bits {
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
        let limbs = n.len().div_ceil(4).max(1);
        let mut nl = vec![0u32; limbs];
        limbs_from_be(n, &mut nl).ok_or("bad modulus")?;
        if nl.first().is_none_or(|l| l & 1 == 0) || bits <= 64 && (bits < 34 || e_ge(&nl, e)) {
            return Err("invalid modulus".into());
        }
        if e & 1 == 0 {
            return Err(ERR_EXPONENT.into());
        }
        // R^2 mod n by doubling: 1 -> 2^(64·limbs) mod n.
        let mut x = vec![0u32; limbs];
        if let Some(l) = x.first_mut() {
            *l = 1;
        }
        for _ in 0..64 * limbs {
            double_mod(&mut x, &nl);
        }
        Ok(RsaKey {
            inv: neg_inv32(nl.first().copied().unwrap_or(1)),
            n: nl,
            e,
            bits,
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

    /// `out = a·b·R^-1 mod n`: the `l²` products row by row (the unrolled multiply-add), then
    /// the reduction shared with the squaring (SOS). `t` is scratch of `2l + 1` limbs.
    fn mont_mul(&self, a: &[u32], b: &[u32], out: &mut [u32], t: &mut [u32]) {
        let l = self.n.len();
        let (Some(a), Some(b), Some(t)) = (a.get(..l), b.get(..l), t.get_mut(..2 * l + 1)) else {
            return;
        };
        t.iter_mut().for_each(|x| *x = 0);
        for (i, &bi) in b.iter().enumerate() {
            let Some(row) = t.get_mut(i..i + l) else {
                continue;
            };
            let c = mul_add_row(row, a, u64::from(bi), 0);
            t[i + l] = c as u32;
        }
        self.reduce(t, out);
    }

    /// `out = a^2·R^-1 mod n`: the square's `l(l+1)/2` products, then the reduction (SOS);
    /// about a quarter cheaper than [`Self::mont_mul`]. `t` is scratch of `2l + 1` limbs.
    fn mont_sqr(&self, a: &[u32], out: &mut [u32], t: &mut [u32]) {
        let n = &self.n[..];
        let l = n.len();
        let (Some(a), Some(out), Some(t)) = (a.get(..l), out.get_mut(..l), t.get_mut(..2 * l + 1))
        else {
            return;
        };
        t.iter_mut().for_each(|x| *x = 0);
        // Products a[i]·a[j], i < j.
        for (i, &ai) in a.iter().enumerate() {
            let ai = u64::from(ai);
            let mut c = 0u64;
            let (Some(row), Some(rest)) = (t.get_mut(2 * i + 1..i + l), a.get(i + 1..)) else {
                continue;
            };
            c = mul_add_row(row, rest, ai, c);
            t[i + l] = c as u32;
        }
        // Doubled, plus the squares a[i]^2.
        let mut top = 0u32;
        for x in t.iter_mut().take(2 * l) {
            let next = *x >> 31;
            *x = (*x << 1) | top;
            top = next;
        }
        t[2 * l] = top;
        let mut c = 0u64;
        for i in 0..l {
            let sq = u64::from(a[i]) * u64::from(a[i]);
            let s = u64::from(t[2 * i]) + (sq & 0xffff_ffff) + c;
            t[2 * i] = s as u32;
            let s = u64::from(t[2 * i + 1]) + (sq >> 32) + (s >> 32);
            t[2 * i + 1] = s as u32;
            c = s >> 32;
        }
        t[2 * l] = t[2 * l].wrapping_add(c as u32);
        self.reduce(t, out);
    }

    /// `out = t·R^-1 mod n` for `t < n·R` in `2l + 1` limbs (clobbered).
    fn reduce(&self, t: &mut [u32], out: &mut [u32]) {
        let n = &self.n[..];
        let l = n.len();
        let (Some(out), Some(t)) = (out.get_mut(..l), t.get_mut(..2 * l + 1)) else {
            return;
        };
        // Montgomery reduction, two limbs at a time (one pass over `t` for both), then one at a
        // time for an odd last limb; `pending` is the carry into limb i + l.
        let mut pending = 0u64;
        let (Some(&n0), Some(&n1)) = (n.first(), n.get(1)) else {
            return;
        };
        let mut i = 0;
        while i + 1 < l {
            let m0 = u64::from(t[i].wrapping_mul(self.inv));
            let s = u64::from(t[i]) + m0 * u64::from(n0);
            let mut c1 = s >> 32;
            let t1 = u64::from(t[i + 1]) + m0 * u64::from(n1) + c1;
            let m1 = u64::from((t1 as u32).wrapping_mul(self.inv));
            let mut c2 = 0u64;
            if let (Some(row), Some(hi), Some(lo)) =
                (t.get_mut(i + 1..i + l), n.get(1..), n.get(..l - 1))
            {
                (c1, c2) = mul2_add_row(row, hi, lo, m0, m1, c1, c2);
            }
            let s = u64::from(t[i + l]) + c1 + pending;
            let s2 = u64::from(s as u32) + m1 * u64::from(n[l - 1]) + c2;
            t[i + l] = s2 as u32;
            let s3 = u64::from(t[i + l + 1]) + (s >> 32) + (s2 >> 32);
            t[i + l + 1] = s3 as u32;
            pending = s3 >> 32;
            i += 2;
        }
        if i < l {
            let m = u64::from(t[i].wrapping_mul(self.inv));
            let mut c = 0u64;
            if let Some(row) = t.get_mut(i..i + l) {
                c = mul_add_row(row, n, m, c);
            }
            let s = u64::from(t[i + l]) + c + pending;
            t[i + l] = s as u32;
            pending = s >> 32;
        }
        t[2 * l] = t[2 * l].wrapping_add(pending as u32);
        out.copy_from_slice(&t[l..2 * l]);
        if t[2 * l] != 0 || geq(out, n) {
            sub_assign(out, n);
        }
    }

    /// `sig^e mod n` as `size()` big-endian bytes; `None` when the signature does not have the
    /// modulus's length or is not below the modulus.
    pub fn public_op(&self, sig: &[u8]) -> Option<Vec<u8>> {
        if sig.len() != self.size() {
            return None;
        }
        let l = self.n.len();
        let mut s = vec![0u32; l];
        limbs_from_be(sig, &mut s)?;
        if geq(&s, &self.n) {
            return None;
        }
        // One allocation for the working values: x, t, s·R, and the scratch of 2l + 1 limbs.
        let mut buf = vec![0u32; 5 * l + 1];
        let (x, rest) = buf.split_at_mut(l);
        let (t, rest) = rest.split_at_mut(l);
        let (s_m, scratch) = rest.split_at_mut(l);
        let (mut x, mut t) = (x, t);
        self.mont_mul(&s, &self.r2, s_m, scratch); // s·R
        x.copy_from_slice(s_m);
        let s_m = &*s_m;
        let top = 63 - self.e.leading_zeros();
        // Square-and-multiply from the top bit. `e` is odd, so the last step multiplies: by the
        // plain `s` there, which leaves the plain result (no conversion out of Montgomery form).
        // For e = 65537: one conversion, 16 squarings, one multiplication.
        for i in (0..top).rev() {
            self.mont_sqr(x, t, scratch);
            std::mem::swap(&mut x, &mut t);
            if (self.e >> i) & 1 == 1 {
                self.mont_mul(x, if i == 0 { &s } else { s_m }, t, scratch);
                std::mem::swap(&mut x, &mut t);
            }
        }
        let mut out = vec![0u8; self.size()];
        limbs_to_be(x, &mut out);
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

/// `row += src·m + carry` (equal lengths); returns the carry out. Unrolled by four
/// (V8 does not unroll loops; this is where RSA spends its time).
#[inline(always)]
fn mul_add_row(row: &mut [u32], src: &[u32], m: u64, mut c: u64) -> u64 {
    let mut rows = row.chunks_exact_mut(4);
    let mut srcs = src.chunks_exact(4);
    for (r, x) in (&mut rows).zip(&mut srcs) {
        if let ([r0, r1, r2, r3], [x0, x1, x2, x3]) = (r, x) {
            let s = u64::from(*r0) + m * u64::from(*x0) + c;
            *r0 = s as u32;
            let s = u64::from(*r1) + m * u64::from(*x1) + (s >> 32);
            *r1 = s as u32;
            let s = u64::from(*r2) + m * u64::from(*x2) + (s >> 32);
            *r2 = s as u32;
            let s = u64::from(*r3) + m * u64::from(*x3) + (s >> 32);
            *r3 = s as u32;
            c = s >> 32;
        }
    }
    for (r, x) in rows.into_remainder().iter_mut().zip(srcs.remainder()) {
        let s = u64::from(*r) + m * u64::from(*x) + c;
        *r = s as u32;
        c = s >> 32;
    }
    c
}

/// `row += hi·m0 + (lo·m1 << 32)` (equal lengths), the two limbs of one reduction pass, with
/// their carries `c1` and `c2` in and out. Unrolled by two, as [`mul_add_row`].
#[inline(always)]
fn mul2_add_row(
    row: &mut [u32],
    hi: &[u32],
    lo: &[u32],
    m0: u64,
    m1: u64,
    mut c1: u64,
    mut c2: u64,
) -> (u64, u64) {
    let mut rows = row.chunks_exact_mut(2);
    let mut his = hi.chunks_exact(2);
    let mut los = lo.chunks_exact(2);
    for ((r, x), y) in (&mut rows).zip(&mut his).zip(&mut los) {
        if let ([r0, r1], [x0, x1], [y0, y1]) = (r, x, y) {
            let s = u64::from(*r0) + m0 * u64::from(*x0) + c1;
            let s2 = u64::from(s as u32) + m1 * u64::from(*y0) + c2;
            *r0 = s2 as u32;
            let s = u64::from(*r1) + m0 * u64::from(*x1) + (s >> 32);
            c1 = s >> 32;
            let s2 = u64::from(s as u32) + m1 * u64::from(*y1) + (s2 >> 32);
            c2 = s2 >> 32;
            *r1 = s2 as u32;
        }
    }
    for ((r, x), y) in rows
        .into_remainder()
        .iter_mut()
        .zip(his.remainder())
        .zip(los.remainder())
    {
        let s = u64::from(*r) + m0 * u64::from(*x) + c1;
        c1 = s >> 32;
        let s2 = u64::from(s as u32) + m1 * u64::from(*y) + c2;
        c2 = s2 >> 32;
        *r = s2 as u32;
    }
    (c1, c2)
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

/// For a modulus of at most 64 bits: `e >= n`.
fn e_ge(n: &[u32], e: u64) -> bool {
    let nv = n
        .iter()
        .take(2)
        .rev()
        .fold(0u64, |a, l| (a << 32) | u64::from(*l));
    e >= nv
}

/// `x = 2x mod n` for `x < n`.
fn double_mod(x: &mut [u32], n: &[u32]) {
    let mut carry = 0u32;
    for l in x.iter_mut() {
        let nc = *l >> 31;
        *l = (*l << 1) | carry;
        carry = nc;
    }
    if carry != 0 || geq(x, n) {
        sub_assign(x, n);
    }
}
