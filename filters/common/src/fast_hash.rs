//! A cheap hasher for the dispatcher's and the filters' internal maps (context ids, callout
//! tokens, metric names): the multiply-rotate hash of rustc's `FxHasher`, a few instructions per
//! word where the standard library's SipHash-1-3 costs a hundred per key. Only for keys that a
//! client cannot choose (ids handed out by the proxy, names from the configuration): it has no
//! protection against collisions built on purpose.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The hasher (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher {
    hash: u64,
}

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Builds [`FastHasher`]s.
pub type FastBuild = BuildHasherDefault<FastHasher>;

/// A `HashMap` with [`FastHasher`] (create with `FastMap::default()`).
pub type FastMap<K, V> = HashMap<K, V, FastBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn h<T: Hash>(t: T) -> u64 {
        FastBuild::default().hash_one(t)
    }

    #[test]
    fn distinct_keys_hash_apart() {
        assert_ne!(h(1u32), h(2u32));
        assert_ne!(h("abc"), h("abd"));
        assert_ne!(h("a"), h("a\0"));
        assert_ne!(h(("ab", "c")), h(("a", "bc")));
        assert_eq!(h("same name"), h("same name"));
    }

    #[test]
    fn a_map_works() {
        let mut m: FastMap<u32, &str> = FastMap::default();
        for i in 0..1000u32 {
            m.insert(i, "x");
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get(&999), Some(&"x"));
        assert!(m.remove(&0).is_some());
        assert!(!m.contains_key(&0));
    }
}
