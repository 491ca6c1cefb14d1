//! ECDSA verification on the NIST prime curves with `a = -3` (P-256, P-384), in Jacobian
//! coordinates over the Montgomery field of [`super::field`].
//!
//! `u1·G + u2·Q` is a sum of table entries: a fixed-base table holds `d·2^(w·k)·P` for every
//! window `k` and digit `d` in `1..=2^(w-1)` (signed digits: a negative one adds the entry with
//! `y` negated), so a scalar multiplication is one mixed addition per non-zero window and no
//! doubling. The generator's table is built once per VM on first use;
//! a public key's table is built on its first verification ([`EcKey`]), counted against a
//! total ([`TABLE_BYTES_CAP`]) and freed with the key. A key over the cap verifies without a
//! table (windowed double-and-add). The result is compared with `r` without an inversion:
//! `X == r·Z^2` (or `(r + n)·Z^2` when `r + n < p`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::field::{add_assign, geq, is_zero, limbs_from_be, Field, Limbs};

/// A point in affine coordinates (Montgomery form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affine<const N: usize> {
    /// x.
    pub x: Limbs<N>,
    /// y.
    pub y: Limbs<N>,
}

/// A point in Jacobian coordinates (`x = X/Z^2`, `y = Y/Z^3`); `Z = 0` is the point at infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jac<const N: usize> {
    x: Limbs<N>,
    y: Limbs<N>,
    z: Limbs<N>,
}

impl<const N: usize> Jac<N> {
    const INFINITY: Self = Jac {
        x: [0; N],
        y: [0; N],
        z: [0; N],
    };
    fn is_infinity(&self) -> bool {
        is_zero(&self.z)
    }
}

/// A short Weierstrass curve `y^2 = x^3 - 3x + b` of prime order `n`.
#[derive(Debug)]
pub struct Curve<const N: usize> {
    /// The base field.
    pub fp: Field<N>,
    /// The scalar field (modulo the group order `n`).
    pub fq: Field<N>,
    /// `b` (Montgomery form).
    b: Limbs<N>,
    /// The generator.
    g: Affine<N>,
    /// Bytes of a field element / scalar in a JWS signature (32, 48).
    pub size: usize,
    /// Window of the generator's table, in bits.
    g_window: usize,
    /// Window of a public key's table, in bits.
    q_window: usize,
    /// `p - n` when `n < p` (else zero): r + n < p  ⇔  r < p - n.
    p_minus_n: Limbs<N>,
    /// The generator's table, built on first use.
    g_table: OnceLock<Option<Table<N>>>,
}

/// Curve constants: `p`, `n`, `b`, `Gx`, `Gy` as plain integers.
pub struct Params<const N: usize> {
    /// Field prime.
    pub p: Limbs<N>,
    /// Group order.
    pub n: Limbs<N>,
    /// `b`.
    pub b: Limbs<N>,
    /// Generator x.
    pub gx: Limbs<N>,
    /// Generator y.
    pub gy: Limbs<N>,
}

/// Most bytes all public keys' tables may take together (per VM).
pub const TABLE_BYTES_CAP: usize = 8 << 20;
static TABLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes the public keys' tables take now (per VM).
pub fn table_bytes() -> usize {
    TABLE_BYTES.load(Ordering::Relaxed)
}

/// A fixed-base table: `pts[k·2^(w-1) + d-1] = d·2^(w·k)·P` for `d` in `1..=2^(w-1)`.
#[derive(Debug)]
pub struct Table<const N: usize> {
    w: usize,
    pts: Vec<Affine<N>>,
}

impl<const N: usize> Table<N> {
    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.pts.len() * std::mem::size_of::<Affine<N>>()
    }
}

/// Windows and entries per window of a table with `w`-bit signed windows over `N` limbs:
/// `ceil((32N + 1) / w)` windows (the last digit never carries out), `2^(w-1)` entries each.
fn table_shape<const N: usize>(w: usize) -> (usize, usize) {
    ((32 * N + 1).div_ceil(w), 1usize << (w - 1))
}

/// Bits `[k·w, k·w + w)` of `u`.
#[inline]
fn window<const N: usize>(u: &Limbs<N>, k: usize, w: usize) -> usize {
    let bit = k * w;
    let limb = bit / 32;
    let off = bit % 32;
    let mut v = u64::from(u.get(limb).copied().unwrap_or(0)) >> off;
    if off + w > 32 {
        v |= u64::from(u.get(limb + 1).copied().unwrap_or(0)) << (32 - off);
    }
    (v & ((1u64 << w) - 1)) as usize
}

impl<const N: usize> Curve<N> {
    /// A curve from its constants; `g_window`, `q_window`: table windows in bits (1..=8).
    pub fn new(c: &Params<N>, size: usize, g_window: usize, q_window: usize) -> Self {
        let fp = Field::new(c.p);
        let fq = Field::new(c.n);
        let mut p_minus_n = [0; N];
        if !geq(&c.n, &c.p) {
            p_minus_n = c.p;
            super::field::sub_assign(&mut p_minus_n, &c.n);
        }
        Curve {
            b: fp.to_mont(&c.b),
            g: Affine {
                x: fp.to_mont(&c.gx),
                y: fp.to_mont(&c.gy),
            },
            fp,
            fq,
            size,
            g_window,
            q_window,
            p_minus_n,
            g_table: OnceLock::new(),
        }
    }

    /// The public key `(x, y)` (big-endian, `size` bytes each) if it is a point of the curve.
    pub fn point(&self, x: &[u8], y: &[u8]) -> Option<Affine<N>> {
        if x.len() != self.size || y.len() != self.size {
            return None;
        }
        let mut xl = [0; N];
        let mut yl = [0; N];
        limbs_from_be(x, &mut xl)?;
        limbs_from_be(y, &mut yl)?;
        if geq(&xl, &self.fp.p) || geq(&yl, &self.fp.p) {
            return None;
        }
        let f = &self.fp;
        let (x, y) = (f.to_mont(&xl), f.to_mont(&yl));
        // y^2 = x^3 - 3x + b
        let x3 = f.mul(&f.sqr(&x), &x);
        let three_x = f.add(&f.add(&x, &x), &x);
        let rhs = f.add(&f.sub(&x3, &three_x), &self.b);
        (f.sqr(&y) == rhs).then_some(Affine { x, y })
    }

    fn double(&self, p: &Jac<N>) -> Jac<N> {
        if p.is_infinity() {
            return *p;
        }
        // dbl-2001-b (a = -3).
        let f = &self.fp;
        let delta = f.sqr(&p.z);
        let gamma = f.sqr(&p.y);
        let beta = f.mul(&p.x, &gamma);
        let t = f.mul(&f.sub(&p.x, &delta), &f.add(&p.x, &delta));
        let alpha = f.add(&f.add(&t, &t), &t);
        let beta2 = f.add(&beta, &beta);
        let beta4 = f.add(&beta2, &beta2);
        let beta8 = f.add(&beta4, &beta4);
        let x = f.sub(&f.sqr(&alpha), &beta8);
        let yz = f.add(&p.y, &p.z);
        let z = f.sub(&f.sub(&f.sqr(&yz), &gamma), &delta);
        let g2 = f.sqr(&gamma);
        let g4 = f.add(&g2, &g2);
        let g8 = f.add(&g4, &g4);
        let g8 = f.add(&g8, &g8);
        let y = f.sub(&f.mul(&alpha, &f.sub(&beta4, &x)), &g8);
        Jac { x, y, z }
    }

    /// `p + q` with `q` affine (madd-2007-bl), every special case handled.
    fn add_mixed(&self, p: &Jac<N>, q: &Affine<N>) -> Jac<N> {
        let f = &self.fp;
        if p.is_infinity() {
            return Jac {
                x: q.x,
                y: q.y,
                z: f.one,
            };
        }
        let z1z1 = f.sqr(&p.z);
        let u2 = f.mul(&q.x, &z1z1);
        let s2 = f.mul(&q.y, &f.mul(&p.z, &z1z1));
        let h = f.sub(&u2, &p.x);
        let rr = f.sub(&s2, &p.y);
        if is_zero(&h) {
            return if is_zero(&rr) {
                self.double(p)
            } else {
                Jac::INFINITY
            };
        }
        let hh = f.sqr(&h);
        let i = f.add(&hh, &hh);
        let i = f.add(&i, &i);
        let j = f.mul(&h, &i);
        let r = f.add(&rr, &rr);
        let v = f.mul(&p.x, &i);
        let x = f.sub(&f.sub(&f.sqr(&r), &j), &f.add(&v, &v));
        let y1j = f.mul(&p.y, &j);
        let y = f.sub(&f.mul(&r, &f.sub(&v, &x)), &f.add(&y1j, &y1j));
        let zh = f.add(&p.z, &h);
        let z = f.sub(&f.sub(&f.sqr(&zh), &z1z1), &hh);
        Jac { x, y, z }
    }

    /// `p + q` (add-2007-bl), every special case handled.
    fn add(&self, p: &Jac<N>, q: &Jac<N>) -> Jac<N> {
        if p.is_infinity() {
            return *q;
        }
        if q.is_infinity() {
            return *p;
        }
        let f = &self.fp;
        let z1z1 = f.sqr(&p.z);
        let z2z2 = f.sqr(&q.z);
        let u1 = f.mul(&p.x, &z2z2);
        let u2 = f.mul(&q.x, &z1z1);
        let s1 = f.mul(&p.y, &f.mul(&q.z, &z2z2));
        let s2 = f.mul(&q.y, &f.mul(&p.z, &z1z1));
        let h = f.sub(&u2, &u1);
        let rr = f.sub(&s2, &s1);
        if is_zero(&h) {
            return if is_zero(&rr) {
                self.double(p)
            } else {
                Jac::INFINITY
            };
        }
        let h2 = f.add(&h, &h);
        let i = f.sqr(&h2);
        let j = f.mul(&h, &i);
        let r = f.add(&rr, &rr);
        let v = f.mul(&u1, &i);
        let x = f.sub(&f.sub(&f.sqr(&r), &j), &f.add(&v, &v));
        let s1j = f.mul(&s1, &j);
        let y = f.sub(&f.mul(&r, &f.sub(&v, &x)), &f.add(&s1j, &s1j));
        let zz = f.add(&p.z, &q.z);
        let z = f.mul(&f.sub(&f.sub(&f.sqr(&zz), &z1z1), &z2z2), &h);
        Jac { x, y, z }
    }

    /// Affine coordinates of points none of which is at infinity (one inversion).
    fn batch_to_affine(&self, pts: &[Jac<N>]) -> Option<Vec<Affine<N>>> {
        let f = &self.fp;
        let mut prefix = Vec::with_capacity(pts.len());
        let mut acc = f.one;
        for p in pts {
            if p.is_infinity() {
                return None;
            }
            acc = f.mul(&acc, &p.z);
            prefix.push(acc);
        }
        let mut inv = f.invert(&acc);
        let mut out = vec![
            Affine {
                x: [0; N],
                y: [0; N]
            };
            pts.len()
        ];
        for i in (0..pts.len()).rev() {
            let (p, o) = (pts.get(i)?, out.get_mut(i)?);
            let zinv = match i.checked_sub(1) {
                Some(j) => f.mul(&inv, prefix.get(j)?),
                None => inv,
            };
            inv = f.mul(&inv, &p.z);
            let zinv2 = f.sqr(&zinv);
            o.x = f.mul(&p.x, &zinv2);
            o.y = f.mul(&p.y, &f.mul(&zinv2, &zinv));
        }
        Some(out)
    }

    /// The fixed-base table of `p` with `w`-bit signed windows (`None` if an entry is at
    /// infinity, which a point of prime order never gives).
    pub fn table(&self, p: &Affine<N>, w: usize) -> Option<Table<N>> {
        let (windows, per) = table_shape::<N>(w);
        let mut jac = Vec::with_capacity(windows * per);
        let mut base = Jac {
            x: p.x,
            y: p.y,
            z: self.fp.one,
        };
        for _ in 0..windows {
            let mut acc = base;
            jac.push(acc);
            for _ in 1..per {
                acc = self.add(&acc, &base);
                jac.push(acc);
            }
            for _ in 0..w {
                base = self.double(&base);
            }
        }
        Some(Table {
            w,
            pts: self.batch_to_affine(&jac)?,
        })
    }

    /// `acc + u·P` with `P`'s table: signed digits in `[-2^(w-1), 2^(w-1)]`, one mixed addition
    /// per non-zero digit (a negative digit adds the entry with `y` negated).
    fn add_table(&self, mut acc: Jac<N>, t: &Table<N>, u: &Limbs<N>) -> Jac<N> {
        let (windows, per) = table_shape::<N>(t.w);
        let full = 1usize << t.w;
        let mut carry = 0;
        for k in 0..windows {
            let v = window(u, k, t.w) + carry;
            let (d, neg) = if v > per {
                carry = 1;
                (full - v, true)
            } else {
                carry = 0;
                (v, false)
            };
            if d != 0 {
                if let Some(pt) = t.pts.get(k * per + d - 1) {
                    acc = if neg {
                        let q = Affine {
                            x: pt.x,
                            y: self.fp.neg(&pt.y),
                        };
                        self.add_mixed(&acc, &q)
                    } else {
                        self.add_mixed(&acc, pt)
                    };
                }
            }
        }
        acc
    }

    /// `u·q` without a table: 4-bit windows, most significant first.
    fn mul_var(&self, q: &Affine<N>, u: &Limbs<N>) -> Jac<N> {
        let one = Jac {
            x: q.x,
            y: q.y,
            z: self.fp.one,
        };
        let mut mult = [Jac::INFINITY; 16];
        for d in 1..16 {
            mult[d] = self.add(&mult[d - 1], &one);
        }
        let mut acc = Jac::INFINITY;
        for k in (0..8 * N).rev() {
            for _ in 0..4 {
                acc = self.double(&acc);
            }
            let d = window(u, k, 4);
            if d != 0 {
                acc = self.add(&acc, &mult[d]);
            }
        }
        acc
    }

    fn g_table(&self) -> Option<&Table<N>> {
        self.g_table
            .get_or_init(|| self.table(&self.g, self.g_window))
            .as_ref()
    }

    /// Verify the JWS signature `r || s` (`size` bytes each) of the message whose hash is
    /// `hash` (as long as a scalar: SHA-256 for P-256, SHA-384 for P-384) with key `key`.
    pub fn verify(&self, key: &EcKey<N>, hash: &[u8], sig: &[u8]) -> bool {
        self.verify_inner(key, hash, sig).unwrap_or(false)
    }

    fn verify_inner(&self, key: &EcKey<N>, hash: &[u8], sig: &[u8]) -> Option<bool> {
        if sig.len() != 2 * self.size || hash.len() != self.size {
            return Some(false);
        }
        let (rb, sb) = sig.split_at(self.size);
        let n = &self.fq.p;
        let (mut r, mut s, mut e) = ([0; N], [0; N], [0; N]);
        limbs_from_be(rb, &mut r)?;
        limbs_from_be(sb, &mut s)?;
        limbs_from_be(hash, &mut e)?;
        if is_zero(&r) || is_zero(&s) || geq(&r, n) || geq(&s, n) {
            return Some(false);
        }
        if geq(&e, n) {
            super::field::sub_assign(&mut e, n);
        }
        let fq = &self.fq;
        let w = fq.to_mont(&fq.invert_plain(&s));
        // Plain × Montgomery = plain.
        let u1 = fq.mul(&e, &w);
        let u2 = fq.mul(&r, &w);
        let acc = self.add_table(Jac::INFINITY, self.g_table()?, &u1);
        let acc = match key.table(self) {
            Some(t) => self.add_table(acc, t, &u2),
            None => self.add(&acc, &self.mul_var(&key.q, &u2)),
        };
        if acc.is_infinity() {
            return Some(false);
        }
        let f = &self.fp;
        let z2 = f.sqr(&acc.z);
        if f.mul(&f.to_mont(&r), &z2) == acc.x {
            return Some(true);
        }
        if !is_zero(&self.p_minus_n) && !geq(&r, &self.p_minus_n) {
            let mut rn = r;
            add_assign(&mut rn, n);
            return Some(f.mul(&f.to_mont(&rn), &z2) == acc.x);
        }
        Some(false)
    }
}

/// A public key and its table (built on the first verification, shared by clones of the
/// key material, freed with the last of them).
#[derive(Debug)]
pub struct EcKey<const N: usize> {
    q: Affine<N>,
    table: OnceLock<Option<Table<N>>>,
}

impl<const N: usize> EcKey<N> {
    /// The key `q` (checked on the curve by [`Curve::point`]).
    pub fn new(q: Affine<N>) -> Self {
        EcKey {
            q,
            table: OnceLock::new(),
        }
    }

    /// The key's table, building it on first use unless all tables are at the cap.
    fn table(&self, c: &Curve<N>) -> Option<&Table<N>> {
        self.table
            .get_or_init(|| {
                let (windows, per) = table_shape::<N>(c.q_window);
                let bytes = windows * per * std::mem::size_of::<Affine<N>>();
                if table_bytes() + bytes > TABLE_BYTES_CAP {
                    return None;
                }
                let t = c.table(&self.q, c.q_window)?;
                TABLE_BYTES.fetch_add(t.bytes(), Ordering::Relaxed);
                Some(t)
            })
            .as_ref()
    }

    /// The key `q` that never gets a table (the path of keys above the cap), for tests.
    #[cfg(test)]
    pub fn without_table(q: Affine<N>) -> Self {
        let table = OnceLock::new();
        let _ = table.set(None);
        EcKey { q, table }
    }

    /// Has the table been built?
    pub fn has_table(&self) -> bool {
        matches!(self.table.get(), Some(Some(_)))
    }
}

impl<const N: usize> Drop for EcKey<N> {
    fn drop(&mut self) {
        if let Some(Some(t)) = self.table.get() {
            TABLE_BYTES.fetch_sub(t.bytes(), Ordering::Relaxed);
        }
    }
}

/// P-256.
pub fn p256() -> &'static Curve<8> {
    static C: OnceLock<Curve<8>> = OnceLock::new();
    C.get_or_init(|| {
        Curve::new(
            &Params {
                p: [
                    0xffffffff, 0xffffffff, 0xffffffff, 0x00000000, 0x00000000, 0x00000000,
                    0x00000001, 0xffffffff,
                ],
                n: [
                    0xfc632551, 0xf3b9cac2, 0xa7179e84, 0xbce6faad, 0xffffffff, 0xffffffff,
                    0x00000000, 0xffffffff,
                ],
                b: [
                    0x27d2604b, 0x3bce3c3e, 0xcc53b0f6, 0x651d06b0, 0x769886bc, 0xb3ebbd55,
                    0xaa3a93e7, 0x5ac635d8,
                ],
                gx: [
                    0xd898c296, 0xf4a13945, 0x2deb33a0, 0x77037d81, 0x63a440f2, 0xf8bce6e5,
                    0xe12c4247, 0x6b17d1f2,
                ],
                gy: [
                    0x37bf51f5, 0xcbb64068, 0x6b315ece, 0x2bce3357, 0x7c0f9e16, 0x8ee7eb4a,
                    0xfe1a7f9b, 0x4fe342e2,
                ],
            },
            32,
            P256_G_WINDOW,
            P256_Q_WINDOW,
        )
    })
}

/// Window of P-256's generator table (bits).
pub const P256_G_WINDOW: usize = 8;
/// Window of a P-256 public key's table (bits).
pub const P256_Q_WINDOW: usize = 6;
/// Window of P-384's generator table (bits).
pub const P384_G_WINDOW: usize = 7;
/// Window of a P-384 public key's table (bits).
pub const P384_Q_WINDOW: usize = 5;

/// P-384.
pub fn p384() -> &'static Curve<12> {
    static C: OnceLock<Curve<12>> = OnceLock::new();
    C.get_or_init(|| {
        Curve::new(
            &Params {
                p: [
                    0xffffffff, 0x00000000, 0x00000000, 0xffffffff, 0xfffffffe, 0xffffffff,
                    0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
                ],
                n: [
                    0xccc52973, 0xecec196a, 0x48b0a77a, 0x581a0db2, 0xf4372ddf, 0xc7634d81,
                    0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
                ],
                b: [
                    0xd3ec2aef, 0x2a85c8ed, 0x8a2ed19d, 0xc656398d, 0x5013875a, 0x0314088f,
                    0xfe814112, 0x181d9c6e, 0xe3f82d19, 0x988e056b, 0xe23ee7e4, 0xb3312fa7,
                ],
                gx: [
                    0x72760ab7, 0x3a545e38, 0xbf55296c, 0x5502f25d, 0x82542a38, 0x59f741e0,
                    0x8ba79b98, 0x6e1d3b62, 0xf320ad74, 0x8eb1c71e, 0xbe8b0537, 0xaa87ca22,
                ],
                gy: [
                    0x90ea0e5f, 0x7a431d7c, 0x1d7e819d, 0x0a60b1ce, 0xb5f0b8c0, 0xe9da3113,
                    0x289a147c, 0xf8f41dbd, 0x9292dc29, 0x5d9e98bf, 0x96262c6f, 0x3617de4a,
                ],
            },
            48,
            P384_G_WINDOW,
            P384_Q_WINDOW,
        )
    })
}
