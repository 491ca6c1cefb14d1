//! The counter store: one fixed table of slots per limit in proxy-wasm shared data.
//!
//! Shared data has no delete, and a CAS only guards a key that exists (a set on a missing key
//! always inserts, so two workers creating the same key race and one update is lost). So:
//!
//! - Each limit owns `buckets` shared-data keys `tollgate.ratelimit:<limit>:<g|f>:<buckets>:<i>`
//!   (`g` GCRA, `f` fixed window: a limit that changes algorithm starts new counters),
//!   all written (empty) when the configuration is loaded, before any traffic: every key a
//!   request touches already exists, and memory never grows with the number of clients.
//! - A bucket holds [`WAYS`] slots of [`SLOT_BYTES`] bytes: a 64-bit fingerprint of the client
//!   key and its state (`a`, `n`, `warn_until`, little-endian u64s). A client key hashes to one
//!   bucket and is looked up there by fingerprint.
//! - Updates read the bucket, compute, and write it back with the CAS that was read, retrying
//!   on a mismatch at most [`MAX_ATTEMPTS`] times.
//! - A key not in its bucket takes an empty slot, else an idle one (a state equivalent to a
//!   fresh one, so nothing is lost), else the slot that becomes idle soonest: that key's
//!   state is evicted (counted), and it starts again with a full quota.
//!
//! Memory per limit: `buckets * (key length + WAYS * SLOT_BYTES)` bytes of shared data.

use tollgate_common::decimal::push_u64;
use tollgate_common::{Host, HostError, SharedError};

use crate::algo::State;

/// Slots per bucket.
pub const WAYS: usize = 8;
/// Bytes per slot: fingerprint + three u64 of state.
pub const SLOT_BYTES: usize = 32;
/// Bytes of one bucket value.
pub const BUCKET_BYTES: usize = WAYS * SLOT_BYTES;
/// Read-compute-write attempts before giving up (the failure mode then applies).
pub const MAX_ATTEMPTS: u32 = 32;

/// Why an update did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Every attempt met a concurrent writer.
    CasExhausted,
    /// The proxy refused a shared-data operation.
    Host(HostError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::CasExhausted => {
                write!(f, "gave up after {MAX_ATTEMPTS} compare-and-swap conflicts")
            }
            StoreError::Host(e) => e.fmt(f),
        }
    }
}

/// Where a client key lives in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Bucket index.
    pub bucket: u32,
    /// Fingerprint (never 0, which marks an empty slot).
    pub fingerprint: u64,
}

/// The answer of [`Table::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated<R> {
    /// What the update function returned.
    pub value: R,
    /// A live state of another key was overwritten.
    pub evicted: bool,
}

/// One limit's table of slots in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    prefix: String,
    buckets: u32,
}

impl Table {
    /// The table of the limit `name` (whose states `kind` interprets: `g` GCRA, `f` fixed
    /// window) with room for at least `slots` keys.
    pub fn new(name: &str, kind: char, slots: u32) -> Self {
        let buckets = slots.div_ceil(WAYS as u32).max(1);
        Table {
            prefix: format!("tollgate.ratelimit:{name}:{kind}:{buckets}:"),
            buckets,
        }
    }

    /// Number of buckets (shared-data keys).
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The shared-data key of a bucket.
    pub fn key(&self, bucket: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 10);
        key.push_str(&self.prefix);
        push_u64(&mut key, u64::from(bucket));
        key
    }

    /// Upper bound of the shared data this table uses, in bytes of keys and values.
    pub fn bytes_bound(&self) -> usize {
        let longest_key = self.key(self.buckets.saturating_sub(1)).len();
        self.buckets as usize * (longest_key + BUCKET_BYTES) + self.allocated_key().len() + 1
    }

    /// Where a client key (already hashed) lives.
    pub fn slot(&self, key_hash: u64) -> Slot {
        let bucket = u32::try_from((key_hash >> 32) % u64::from(self.buckets)).unwrap_or(0);
        let fingerprint = mix(key_hash ^ 0x9e37_79b9_7f4a_7c15).max(1);
        Slot {
            bucket,
            fingerprint,
        }
    }

    /// The key marking a table whose buckets were all written.
    fn allocated_key(&self) -> String {
        format!("{}allocated", self.prefix)
    }

    /// Write every missing bucket, empty, so that all later writes can be guarded by a CAS.
    /// Buckets that exist (another worker's VM, or a previous configuration with the same
    /// layout) are kept; a table already marked allocated (by the first VM that loaded this
    /// configuration) is not scanned again. Returns how many buckets were created.
    pub fn allocate(&self, host: &mut dyn Host) -> Result<u32, HostError> {
        let marker = self.allocated_key();
        if host.shared_get(&marker)?.is_some() {
            return Ok(0);
        }
        let empty = [0u8; BUCKET_BYTES];
        let mut created = 0;
        for b in 0..self.buckets {
            let key = self.key(b);
            if host.shared_get(&key)?.is_none() {
                host.shared_set(&key, &empty, None).map_err(|e| match e {
                    SharedError::Host(h) => h,
                    SharedError::CasMismatch => HostError::Failed("set_shared_data"),
                })?;
                created += 1;
            }
        }
        host.shared_set(&marker, b"1", None).map_err(|e| match e {
            SharedError::Host(h) => h,
            SharedError::CasMismatch => HostError::Failed("set_shared_data"),
        })?;
        Ok(created)
    }

    /// Read the state of `slot` at `now`, let `f` decide (returning the state to write, if
    /// any, and a value), and write it back guarded by the CAS, retrying on conflicts.
    pub fn update<R>(
        &self,
        host: &mut dyn Host,
        slot: Slot,
        now: u64,
        mut f: impl FnMut(State) -> (Option<State>, R),
    ) -> Result<Updated<R>, StoreError> {
        let key = self.key(slot.bucket);
        for _ in 0..MAX_ATTEMPTS {
            let Some((bytes, cas)) = host.shared_get(&key).map_err(StoreError::Host)? else {
                // Not allocated (allocation failed at load): create it, then read it again.
                let empty = [0u8; BUCKET_BYTES];
                match host.shared_set(&key, &empty, None) {
                    Ok(()) | Err(SharedError::CasMismatch) => continue,
                    Err(SharedError::Host(e)) => return Err(StoreError::Host(e)),
                }
            };
            let mut bucket = decode(&bytes);
            let (way, evicts) = choose_way(&bucket, slot.fingerprint, now);
            let current = match bucket.get(way) {
                Some((fp, s)) if *fp == slot.fingerprint => *s,
                _ => State::default(),
            };
            let (write, value) = f(current);
            let Some(next) = write else {
                return Ok(Updated {
                    value,
                    evicted: false,
                });
            };
            if let Some(entry) = bucket.get_mut(way) {
                *entry = (slot.fingerprint, next);
            }
            match host.shared_set(&key, &encode(&bucket), Some(cas)) {
                Ok(()) => {
                    return Ok(Updated {
                        value,
                        evicted: evicts,
                    })
                }
                Err(SharedError::CasMismatch) => continue,
                Err(SharedError::Host(e)) => return Err(StoreError::Host(e)),
            }
        }
        Err(StoreError::CasExhausted)
    }
}

/// The slot for `fingerprint`: its own, else an empty one, else an idle one, else the one
/// that becomes idle soonest (true: a live state is evicted).
fn choose_way(bucket: &[(u64, State)], fingerprint: u64, now: u64) -> (usize, bool) {
    if let Some(i) = bucket.iter().position(|(fp, _)| *fp == fingerprint) {
        return (i, false);
    }
    if let Some(i) = bucket.iter().position(|(fp, _)| *fp == 0) {
        return (i, false);
    }
    if let Some(i) = bucket.iter().position(|(_, s)| s.idle(now)) {
        return (i, false);
    }
    let soonest = bucket
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, s))| s.a)
        .map_or(0, |(i, _)| i);
    (soonest, true)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The slots of a bucket (on the stack: no allocation per request).
type Bucket = [(u64, State); WAYS];

/// Decode a bucket value; a value of the wrong size reads as an empty bucket.
fn decode(bytes: &[u8]) -> Bucket {
    let mut bucket = [(0, State::default()); WAYS];
    if bytes.len() != BUCKET_BYTES {
        return bucket;
    }
    for (w, slot) in bucket.iter_mut().enumerate() {
        let o = w * SLOT_BYTES;
        *slot = (
            read_u64(bytes, o),
            State {
                a: read_u64(bytes, o + 8),
                n: read_u64(bytes, o + 16),
                warn_until: read_u64(bytes, o + 24),
            },
        );
    }
    bucket
}

fn encode(bucket: &Bucket) -> [u8; BUCKET_BYTES] {
    let mut out = [0u8; BUCKET_BYTES];
    for (chunk, (fp, s)) in out.chunks_exact_mut(SLOT_BYTES).zip(bucket.iter()) {
        for (field, v) in chunk.chunks_exact_mut(8).zip([*fp, s.a, s.n, s.warn_until]) {
            field.copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// A 64-bit finalizer (splitmix64): spreads the bits of a hash.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the parts of a key, with a separator, then mixed.
pub fn hash_parts<'a>(seed: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for b in seed.bytes() {
        eat(b);
    }
    for part in parts {
        eat(0x1f);
        for b in part {
            eat(*b);
        }
    }
    mix(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::{evaluate, Algorithm, Params, MICROS};
    use tollgate_common::mem_host::MemHost;

    const NOW: u64 = 1_767_225_600 * MICROS;

    fn live(a: u64) -> State {
        State {
            a,
            n: 1,
            warn_until: 0,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut b = decode(&[]);
        assert_eq!(b.len(), WAYS);
        b[3] = (42, live(7));
        let bytes = encode(&b);
        assert_eq!(bytes.len(), BUCKET_BYTES);
        assert_eq!(decode(&bytes), b);
    }

    #[test]
    fn way_choice_prefers_own_then_empty_then_idle_then_soonest() {
        let mut b = vec![(0, State::default()); WAYS];
        assert_eq!(choose_way(&b, 5, NOW), (0, false));
        for (i, e) in b.iter_mut().enumerate() {
            *e = (100 + i as u64, live(NOW + 1000 - i as u64));
        }
        assert_eq!(choose_way(&b, 103, NOW), (3, false));
        // all live: the one that becomes idle soonest is evicted
        assert_eq!(choose_way(&b, 5, NOW), (WAYS - 1, true));
        b[2].1 = live(NOW - 1);
        assert_eq!(choose_way(&b, 5, NOW), (2, false));
    }

    #[test]
    fn allocation_creates_every_bucket_once() {
        let mut h = MemHost::new();
        let t = Table::new("api", 'g', 100);
        assert_eq!(t.buckets(), 13);
        assert_eq!(t.allocate(&mut h).unwrap(), 13);
        assert_eq!(t.allocate(&mut h).unwrap(), 0);
        assert_eq!(h.shared.len(), 13 + 1);
        assert!(h.shared.bytes() <= t.bytes_bound());
    }

    fn admit(t: &Table, h: &mut MemHost, key: &str, p: &Params, now: u64) -> Updated<bool> {
        let slot = t.slot(hash_parts("x", [key.as_bytes()]));
        t.update(h, slot, now, |s| {
            let o = evaluate(p, s, now, 1);
            (if o.admitted { o.next } else { None }, o.admitted)
        })
        .unwrap()
    }

    #[test]
    fn updates_survive_conflicts_and_give_up_when_they_never_end() {
        let mut h = MemHost::new();
        let t = Table::new("api", 'g', 8);
        t.allocate(&mut h).unwrap();
        let p = Params {
            algorithm: Algorithm::FixedWindow,
            quota: 3,
            window_us: 60 * MICROS,
            burst: 3,
        };
        h.shared.force_conflicts(MAX_ATTEMPTS - 1);
        assert!(admit(&t, &mut h, "a", &p, NOW).value);
        h.shared.force_conflicts(MAX_ATTEMPTS);
        let slot = t.slot(hash_parts("x", [&b"a"[..]]));
        let r = t.update(&mut h, slot, NOW, |s| (Some(s), ()));
        assert_eq!(r, Err(StoreError::CasExhausted));
        assert!(admit(&t, &mut h, "a", &p, NOW).value);
        assert!(admit(&t, &mut h, "a", &p, NOW).value);
        assert!(!admit(&t, &mut h, "a", &p, NOW).value);
    }

    #[test]
    fn two_workers_interleaving_stay_exact() {
        // Worker B writes between worker A's read and A's write: A's CAS fails and A retries.
        let mut a = MemHost::new();
        let t = Table::new("api", 'g', 8);
        t.allocate(&mut a).unwrap();
        let mut b = a.next_request("GET", "/", &[]);
        let p = Params {
            algorithm: Algorithm::Gcra,
            quota: 2,
            window_us: 3600 * MICROS,
            burst: 2,
        };
        let slot = t.slot(hash_parts("x", [&b"k"[..]]));
        let mut first = true;
        let r = t
            .update(&mut a, slot, NOW, |s| {
                if first {
                    first = false;
                    assert!(admit(&t, &mut b, "k", &p, NOW).value);
                }
                let o = evaluate(&p, s, NOW, 1);
                (if o.admitted { o.next } else { None }, o.admitted)
            })
            .unwrap();
        assert!(r.value);
        assert!(!admit(&t, &mut b, "k", &p, NOW).value, "2 of 2 used");
    }

    #[test]
    fn a_missing_bucket_is_created_on_first_use() {
        let mut h = MemHost::new();
        let t = Table::new("lazy", 'g', 8);
        let p = Params {
            algorithm: Algorithm::FixedWindow,
            quota: 1,
            window_us: 60 * MICROS,
            burst: 1,
        };
        assert!(admit(&t, &mut h, "a", &p, NOW).value);
        assert!(!admit(&t, &mut h, "a", &p, NOW).value);
    }

    #[test]
    fn memory_stays_bounded_with_many_clients() {
        // 200,000 distinct clients through a 4,096-slot table: the shared data never grows
        // past the table's bound; live states are evicted (those clients start afresh).
        let mut h = MemHost::new();
        let t = Table::new("per-ip", 'g', 4096);
        t.allocate(&mut h).unwrap();
        let before = h.shared.bytes();
        let p = Params {
            algorithm: Algorithm::Gcra,
            quota: 10,
            window_us: 3600 * MICROS,
            burst: 10,
        };
        let mut evictions = 0;
        for i in 0..200_000u32 {
            let key = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            if admit(&t, &mut h, &key, &p, NOW + u64::from(i)).evicted {
                evictions += 1;
            }
        }
        assert_eq!(h.shared.len(), t.buckets() as usize + 1);
        assert_eq!(h.shared.bytes(), before);
        assert!(h.shared.bytes() <= t.bytes_bound());
        assert!(t.bytes_bound() < 300 * 1024, "{}", t.bytes_bound());
        assert!(evictions > 190_000, "{evictions}");
    }
}
