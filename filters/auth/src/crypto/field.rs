//! Montgomery arithmetic modulo an odd prime of `N` 32-bit limbs (least significant first):
//! the base fields and scalar fields of the NIST curves. 32-bit limbs with 64-bit products,
//! since wasm32 has a native `i64.mul` but no 64×64→128 multiplication.
//!
//! Elements are `[u32; N]`, fully reduced, in Montgomery form (`a·R mod p`, `R = 2^(32N)`)
//! unless a function says otherwise. Nothing here is constant-time: it verifies signatures,
//! whose inputs are all public.

/// An element (or a plain integer) of `N` limbs, least significant first.
pub type Limbs<const N: usize> = [u32; N];

/// `-m^-1 mod 2^32` for an odd `m0` (Newton's iteration).
pub fn neg_inv32(m0: u32) -> u32 {
    let mut x: u32 = 1;
    for _ in 0..5 {
        x = x.wrapping_mul(2u32.wrapping_sub(m0.wrapping_mul(x)));
    }
    x.wrapping_neg()
}

/// `a >= b` for equal-length little-endian limb slices.
pub fn geq(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x > y;
        }
    }
    true
}

/// `a -= b` over equal lengths; returns the borrow (0 or 1).
pub fn sub_assign(a: &mut [u32], b: &[u32]) -> u32 {
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let d = u64::from(*x)
            .wrapping_sub(u64::from(*y))
            .wrapping_sub(borrow);
        *x = d as u32;
        borrow = (d >> 63) & 1;
    }
    borrow as u32
}

/// `a += b` over equal lengths; returns the carry (0 or 1).
pub fn add_assign(a: &mut [u32], b: &[u32]) -> u32 {
    let mut carry = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let s = u64::from(*x) + u64::from(*y) + carry;
        *x = s as u32;
        carry = s >> 32;
    }
    carry as u32
}

/// Big-endian bytes into little-endian limbs; `None` when the value needs more than `out.len()`
/// limbs.
pub fn limbs_from_be(bytes: &[u8], out: &mut [u32]) -> Option<()> {
    // Leading zero bytes beyond the capacity are allowed.
    let cap = out.len() * 4;
    let bytes = if bytes.len() > cap {
        let (extra, rest) = bytes.split_at(bytes.len() - cap);
        if extra.iter().any(|b| *b != 0) {
            return None;
        }
        rest
    } else {
        bytes
    };
    out.iter_mut().for_each(|l| *l = 0);
    for (i, b) in bytes.iter().rev().enumerate() {
        if let Some(l) = out.get_mut(i / 4) {
            *l |= u32::from(*b) << (8 * (i % 4));
        }
    }
    Some(())
}

/// Little-endian limbs into exactly `out.len()` big-endian bytes (the value must fit).
pub fn limbs_to_be(limbs: &[u32], out: &mut [u8]) {
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate() {
        let j = n - 1 - i;
        *o = limbs.get(j / 4).map_or(0, |l| (l >> (8 * (j % 4))) as u8);
    }
}

/// Arithmetic modulo the odd number `p`.
#[derive(Debug, Clone)]
pub struct Field<const N: usize> {
    /// The modulus.
    pub p: Limbs<N>,
    /// `-p^-1 mod 2^32`.
    pub inv: u32,
    /// `R^2 mod p`.
    pub r2: Limbs<N>,
    /// `R mod p`: one in Montgomery form.
    pub one: Limbs<N>,
    /// `p - 2`, the exponent of Fermat's inversion.
    pm2: Limbs<N>,
}

impl<const N: usize> Field<N> {
    /// The field of the odd prime `p` (`p > 2`).
    pub fn new(p: Limbs<N>) -> Self {
        let mut f = Field {
            p,
            inv: neg_inv32(p[0]),
            r2: [0; N],
            one: [0; N],
            pm2: p,
        };
        let mut x = [0u32; N];
        x[0] = 1;
        for _ in 0..32 * N {
            x = f.add(&x, &x);
        }
        f.one = x;
        for _ in 0..32 * N {
            x = f.add(&x, &x);
        }
        f.r2 = x;
        let mut two = [0u32; N];
        two[0] = 2;
        sub_assign(&mut f.pm2, &two);
        f
    }

    /// `a + b mod p` (any form, both reduced).
    #[inline]
    pub fn add(&self, a: &Limbs<N>, b: &Limbs<N>) -> Limbs<N> {
        let mut r = *a;
        let carry = add_assign(&mut r, b);
        if carry != 0 || geq(&r, &self.p) {
            sub_assign(&mut r, &self.p);
        }
        r
    }

    /// `a - b mod p`.
    #[inline]
    pub fn sub(&self, a: &Limbs<N>, b: &Limbs<N>) -> Limbs<N> {
        let mut r = *a;
        if sub_assign(&mut r, b) != 0 {
            add_assign(&mut r, &self.p);
        }
        r
    }

    /// `-a mod p`.
    #[inline]
    pub fn neg(&self, a: &Limbs<N>) -> Limbs<N> {
        if is_zero(a) {
            *a
        } else {
            let mut r = self.p;
            sub_assign(&mut r, a);
            r
        }
    }

    /// Montgomery product `a·b·R^-1 mod p` (CIOS).
    #[inline]
    pub fn mul(&self, a: &Limbs<N>, b: &Limbs<N>) -> Limbs<N> {
        let mut t = [0u32; N];
        let mut t_n: u32 = 0;
        let p = &self.p;
        for bi in b.iter() {
            let bi = u64::from(*bi);
            let mut c: u64 = 0;
            for (tj, aj) in t.iter_mut().zip(a.iter()) {
                let s = u64::from(*tj) + u64::from(*aj) * bi + c;
                *tj = s as u32;
                c = s >> 32;
            }
            let s = u64::from(t_n) + c;
            t_n = s as u32;
            let t_n1 = (s >> 32) as u32;
            let m = u64::from(t[0].wrapping_mul(self.inv));
            let s = u64::from(t[0]) + m * u64::from(p[0]);
            let mut c = s >> 32;
            for j in 1..N {
                let s = u64::from(t[j]) + m * u64::from(p[j]) + c;
                t[j - 1] = s as u32;
                c = s >> 32;
            }
            let s = u64::from(t_n) + c;
            t[N - 1] = s as u32;
            t_n = t_n1 + (s >> 32) as u32;
        }
        if t_n != 0 || geq(&t, p) {
            sub_assign(&mut t, p);
        }
        t
    }

    /// `a^2` in Montgomery form.
    #[inline]
    pub fn sqr(&self, a: &Limbs<N>) -> Limbs<N> {
        self.mul(a, a)
    }

    /// A plain integer `< p` into Montgomery form.
    pub fn to_mont(&self, a: &Limbs<N>) -> Limbs<N> {
        self.mul(a, &self.r2)
    }

    /// Montgomery form back to the plain integer.
    pub fn from_mont(&self, a: &Limbs<N>) -> Limbs<N> {
        let mut one = [0u32; N];
        one[0] = 1;
        self.mul(a, &one)
    }

    /// `a^e` (Montgomery form in and out; `e` a plain integer), 4-bit fixed window.
    pub fn pow(&self, a: &Limbs<N>, e: &Limbs<N>) -> Limbs<N> {
        let mut table = [self.one; 16];
        for i in 1..16 {
            table[i] = self.mul(&table[i - 1], a);
        }
        let mut r = self.one;
        let mut started = false;
        for i in (0..N * 8).rev() {
            let digit = (e[i / 8] >> (4 * (i % 8))) & 15;
            if started {
                for _ in 0..4 {
                    r = self.sqr(&r);
                }
            }
            if digit != 0 {
                r = if started {
                    self.mul(&r, &table[digit as usize])
                } else {
                    table[digit as usize]
                };
                started = true;
            }
        }
        r
    }

    /// `a^-1` of a plain integer `0 < a < p` as a plain integer (binary extended Euclid,
    /// variable time: several times faster than [`Field::invert`]); zero maps to zero.
    pub fn invert_plain(&self, a: &Limbs<N>) -> Limbs<N> {
        let (mut u, mut v) = (*a, self.p);
        let (mut x1, mut x2) = ([0u32; N], [0u32; N]);
        x1[0] = 1;
        let mut one = [0u32; N];
        one[0] = 1;
        if is_zero(&u) {
            return u;
        }
        // Invariants: x1·a ≡ u, x2·a ≡ v (mod p); u, v > 0 while neither is 1.
        while u != one && v != one {
            while u[0] & 1 == 0 {
                shr1(&mut u, 0);
                self.half(&mut x1);
            }
            while v[0] & 1 == 0 {
                shr1(&mut v, 0);
                self.half(&mut x2);
            }
            if geq(&u, &v) {
                sub_assign(&mut u, &v);
                x1 = self.sub(&x1, &x2);
            } else {
                sub_assign(&mut v, &u);
                x2 = self.sub(&x2, &x1);
            }
            if is_zero(&u) || is_zero(&v) {
                // gcd(a, p) > 1: p is not prime or a ≡ 0; no inverse.
                return [0; N];
            }
        }
        if u == one {
            x1
        } else {
            x2
        }
    }

    /// `x = x / 2 mod p`.
    #[inline]
    fn half(&self, x: &mut Limbs<N>) {
        if x[0] & 1 == 0 {
            shr1(x, 0);
        } else {
            let carry = add_assign(x, &self.p);
            shr1(x, carry);
        }
    }

    /// `a^-1` (Montgomery form; zero maps to zero), by Fermat's little theorem.
    pub fn invert(&self, a: &Limbs<N>) -> Limbs<N> {
        self.pow(a, &self.pm2)
    }
}

/// `x = (x + top·2^(32N)) >> 1`.
#[inline]
fn shr1<const N: usize>(x: &mut Limbs<N>, top: u32) {
    for i in 0..N {
        let next = if i + 1 < N { x[i + 1] } else { top };
        x[i] = (x[i] >> 1) | (next << 31);
    }
}

/// All limbs zero.
#[inline]
pub fn is_zero<const N: usize>(a: &Limbs<N>) -> bool {
    a.iter().all(|l| *l == 0)
}
