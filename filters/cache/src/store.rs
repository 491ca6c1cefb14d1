//! The store in Envoy's shared data (one per VM id, shared by every worker).
//!
//! Shared data has no delete and a CAS only guards an existing key, so the layout uses a fixed
//! set of keys and overwrites them:
//!
//! * `tc.set.<s>` for `s` in `0..sets`: the set record, a compact binary list of `ways` way records
//!   (URL hash, variant hash, Vary names, generation, stored-at, size, refresh lock). Updated
//!   with CAS.
//! * `tc.slot.<s>.<w>`: one entry (compact binary metadata + body, [`Entry::encode`]), at most
//!   `max_entry_bytes`. A slot is
//!   written before its way record; a reader checks that the slot's generation and key are the
//!   ones the way record names, so a torn or raced write reads as a miss, never as another URL's
//!   or another variant's entry.
//! * `tc.purges`: the purge rules (prefix or path, with the time of the purge), at most
//!   [`MAX_PURGE_RULES`]; when full, the oldest rule is folded into `flush_before`.
//!
//! A URL's set is `hash(url) % sets`, so all its variants live in one set and invalidating a
//! URL touches one record. Eviction is FIFO within the set: the oldest way is overwritten.
//! Memory is bounded by `sets x ways x max_entry_bytes` plus the set records and purge rules.

use std::cell::{Cell, RefCell};
use std::time::{Duration, SystemTime};
use tollgate_common::fast_hash::FastMap;

use serde::{Deserialize, Serialize};
use tollgate_common::decimal::push_u64;
use tollgate_common::{Host, SharedError};

use crate::freshness::Facts;

/// How many purge rules are kept before the oldest is folded into a flush.
pub const MAX_PURGE_RULES: usize = 64;
const CAS_RETRIES: usize = 4;

/// Milliseconds since the epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A way of a set: which entry occupies a slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Way {
    /// URL hash (0: empty).
    pub u: u64,
    /// Variant hash.
    pub v: u64,
    /// Vary header names, comma separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vary: String,
    /// Generation of the slot's content.
    pub g: u64,
    /// Stored at (ms).
    pub t: u64,
    /// Bytes in the slot.
    pub n: u64,
    /// A background refresh is running until (ms).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub r: u64,
    /// Purge sequence number seen before the response was fetched: purges with a higher
    /// number apply to this entry.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub p: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Way {
    /// Is this way empty?
    pub fn is_empty(&self) -> bool {
        self.u == 0
    }
    /// The Vary names.
    pub fn vary_names(&self) -> Vec<String> {
        self.vary
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// A set record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRecord {
    /// The purge sequence number every finished purge has reached in this set: a purge
    /// records its rule, then raises this in every set record before it answers. A way whose
    /// `p` is at least this was fetched after every finished purge, so a hit on it needs no
    /// purge record read. [`UNKNOWN_PSEQ`] for a record created or read without a
    /// compare-and-swap (never lowered by a purge; the first hit that reads the purge record
    /// sets it with a CAS).
    pub pseq: u64,
    /// The ways (padded to the configured number).
    pub ways: Vec<Way>,
}

/// [`SetRecord::pseq`] not known: every hit in the set reads the purge record.
pub const UNKNOWN_PSEQ: u64 = u64::MAX;

const SET_FORMAT: u8 = 2;

impl SetRecord {
    /// Compact binary form (read on every lookup, so not JSON): a format byte, the purge
    /// sequence number (u64), then per way seven little-endian u64 (`u v g t n r p`), a u16
    /// length and the Vary names.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.ways.len() * 64);
        out.push(SET_FORMAT);
        out.extend_from_slice(&self.pseq.to_le_bytes());
        for w in &self.ways {
            for x in [w.u, w.v, w.g, w.t, w.n, w.r, w.p] {
                out.extend_from_slice(&x.to_le_bytes());
            }
            let vary = w.vary.as_bytes();
            let len = u16::try_from(vary.len()).unwrap_or(0);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(vary.get(..usize::from(len)).unwrap_or(&[]));
        }
        out
    }

    /// Decode; `None` for anything malformed.
    pub fn decode(bytes: &[u8]) -> Option<SetRecord> {
        if *bytes.first()? != SET_FORMAT {
            return None;
        }
        let mut pos: usize = 1;
        let mut take = |n: usize| -> Option<&[u8]> {
            let slice = bytes.get(pos..pos.checked_add(n)?)?;
            pos += n;
            Some(slice)
        };
        let pseq = u64::from_le_bytes(take(8)?.try_into().ok()?);
        // 58 bytes per way without its Vary names
        let mut ways = Vec::with_capacity(bytes.len() / 58);
        while let Some(first) = take(8) {
            let mut x = [u64::from_le_bytes(first.try_into().ok()?); 7];
            for slot in x.iter_mut().skip(1) {
                *slot = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            let len = u16::from_le_bytes(take(2)?.try_into().ok()?);
            let vary = String::from_utf8(take(usize::from(len))?.to_vec()).ok()?;
            let [u, v, g, t, n, r, p] = x;
            ways.push(Way {
                u,
                v,
                vary,
                g,
                t,
                n,
                r,
                p,
            });
        }
        Some(SetRecord { pseq, ways })
    }
}

/// What is stored about a response besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Generation (matches the way's).
    pub g: u64,
    /// URL of the key.
    pub url: String,
    /// Host (for purges).
    pub host: String,
    /// Path without query (for purges).
    pub path: String,
    /// Variant hash.
    pub v: u64,
    /// Response status.
    pub status: u16,
    /// Response headers as stored.
    pub headers: Vec<(String, String)>,
    /// The storing request carried `Authorization` (a refresh answer is judged as such).
    pub auth: bool,
    /// What reuse depends on (response time, age, lifetime, ...), computed when stored.
    pub f: Facts,
}

/// An entry read from a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Metadata.
    pub meta: Meta,
    /// Body.
    pub body: Vec<u8>,
}

/// Slot format: the first byte of every slot value.
const ENTRY_FORMAT: u8 = 2;

/// Little-endian writer of the slot format.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// `None` as 0, `Some(n)` as n + 1 (saturating: windows and dates are far below).
    fn opt(&mut self, v: Option<u64>) {
        self.u64(v.map_or(0, |n| n.saturating_add(1)));
    }
    fn str(&mut self, s: &str) {
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0
            .extend_from_slice(s.as_bytes().get(..len as usize).unwrap_or_default());
    }
}

/// Reader of the slot format; every read is bounds-checked (`None` ends the decode).
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn opt(&mut self) -> Option<Option<u64>> {
        Some(self.u64()?.checked_sub(1))
    }
    fn str(&mut self) -> Option<String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        let bytes = self.take(usize::try_from(len).ok()?)?;
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Entry {
    /// Encode in the compact slot format (read on every hit, so neither JSON nor anything to
    /// compute): a format byte; `g`, `v` (u64), status (u16), auth (u8); the facts (`at`,
    /// `age`, `life` u64, `flags` u8, `swr`, `sie`, `modified` as u64 + 1, 0 for none); `url`,
    /// `host`, `path` (u32 length + bytes); the header count (u16) and each name and value
    /// (u32 length + bytes); then the body.
    pub fn encode(&self) -> Vec<u8> {
        let m = &self.meta;
        let head: usize = m.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut w = Writer(Vec::with_capacity(
            80 + m.url.len() + m.host.len() + m.path.len() + head + self.body.len(),
        ));
        w.u8(ENTRY_FORMAT);
        w.u64(m.g);
        w.u64(m.v);
        w.u16(m.status);
        w.u8(u8::from(m.auth));
        w.u64(m.f.at);
        w.u64(m.f.age);
        w.u64(m.f.life);
        w.u8(m.f.flags);
        w.opt(m.f.swr);
        w.opt(m.f.sie);
        w.opt(m.f.modified);
        w.str(&m.url);
        w.str(&m.host);
        w.str(&m.path);
        let count = u16::try_from(m.headers.len()).unwrap_or(u16::MAX);
        w.u16(count);
        for (k, v) in m.headers.iter().take(usize::from(count)) {
            w.str(k);
            w.str(v);
        }
        w.0.extend_from_slice(&self.body);
        w.0
    }

    /// Decode; `None` for anything malformed (an empty slot, an older format included).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (meta, pos) = Entry::decode_meta(bytes)?;
        Some(Entry {
            meta,
            body: bytes.get(pos..).unwrap_or_default().to_vec(),
        })
    }

    /// [`Entry::decode`] of a slot value the caller owns: the body stays in that buffer (moved
    /// to its start), not copied into a new one.
    pub fn decode_owned(mut bytes: Vec<u8>) -> Option<Entry> {
        let (meta, pos) = Entry::decode_meta(&bytes)?;
        bytes.drain(..pos.min(bytes.len()));
        Some(Entry { meta, body: bytes })
    }

    /// The metadata, and where the body starts.
    fn decode_meta(bytes: &[u8]) -> Option<(Meta, usize)> {
        let mut r = Reader { bytes, pos: 0 };
        if r.u8()? != ENTRY_FORMAT {
            return None;
        }
        let (g, v, status, auth) = (r.u64()?, r.u64()?, r.u16()?, r.u8()? != 0);
        let f = Facts {
            at: r.u64()?,
            age: r.u64()?,
            life: r.u64()?,
            flags: r.u8()?,
            swr: r.opt()?,
            sie: r.opt()?,
            modified: r.opt()?,
        };
        let (url, host, path) = (r.str()?, r.str()?, r.str()?);
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            headers.push((r.str()?, r.str()?));
        }
        let meta = Meta {
            g,
            url,
            host,
            path,
            v,
            status,
            headers,
            auth,
            f,
        };
        Some((meta, r.pos))
    }
}

/// A purge rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRule {
    /// Host it applies to (`None`: every host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path or path prefix.
    pub path: String,
    /// Prefix rather than exact path.
    pub prefix: bool,
    /// When (ms), for operators reading the record.
    pub at: u64,
    /// Sequence number: entries fetched before it (a lower `p`) are gone.
    #[serde(default)]
    pub seq: u64,
    /// A tag purge: entries tagged with this (by the configured tag header) are gone; `path`
    /// and `prefix` are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The purge rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Purges {
    /// Last purge sequence number given out.
    #[serde(default)]
    pub seq: u64,
    /// Every entry fetched before this sequence number is gone.
    pub flush_before: u64,
    /// Rules, oldest first.
    pub rules: Vec<PurgeRule>,
}

impl Purges {
    /// Is an entry of `host` + `path`, fetched when the sequence number was `seen`, purged?
    /// Sequence numbers rather than times: workers' clocks need not agree to the millisecond,
    /// and a response fetched before a purge must not survive it even if stored after it.
    pub fn purged(&self, host: &str, path: &str, seen: u64) -> bool {
        if seen < self.flush_before {
            return true;
        }
        self.rules.iter().any(|r| {
            seen < r.seq
                && r.tag.is_none()
                && r.host
                    .as_deref()
                    .is_none_or(|h| h.eq_ignore_ascii_case(host))
                && if r.prefix {
                    path.starts_with(&r.path)
                } else {
                    path == r.path
                }
        })
    }
}

impl Purges {
    /// Is an entry carrying these tags, fetched when the sequence number was `seen`, purged by
    /// a tag purge?
    pub fn purged_by_tag<'a>(&self, mut tags: impl Iterator<Item = &'a str>, seen: u64) -> bool {
        let live: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| seen < r.seq)
            .filter_map(|r| r.tag.as_deref())
            .collect();
        !live.is_empty() && tags.any(|t| live.contains(&t))
    }
}

/// A successful lookup.
#[derive(Debug, Clone)]
pub struct Found {
    /// The entry.
    pub entry: Entry,
    /// Set and way it lives in.
    pub set: u32,
    /// Way index.
    pub way: usize,
    /// The way record as read.
    pub record: Way,
    /// The purge sequence number of the set record as read ([`SetRecord::pseq`]).
    pub pseq: u64,
    /// The purge record, when this hit needed it (the way is older than a purge of its set,
    /// or the set's purge sequence number is unknown): the path rules were checked, the caller
    /// checks the tag rules, then [`Store::mark_unpurged`]. `None`: no purge applies.
    pub purges: Option<Purges>,
    /// The set record as read and its CAS, with `purges` (for [`Store::mark_unpurged`]).
    pub set_read: Option<(SetRecord, Option<u32>)>,
}

/// This worker's copies of entries it read from slots, keyed by slot and checked against the
/// way record like the slot itself (generation and variant): a hit on an entry this worker
/// already read reads the set record only, not the slot again. A slot's content for a
/// generation never changes (a store writes a new generation), and the set record stays the
/// authority (invalidations, purges, evictions change or empty the way record), so a copy is
/// served only when the slot would hold the same bytes. Bounded by `budget` bytes (the
/// entries' encoded sizes); 0 keeps none.
#[derive(Debug, Default)]
pub struct LocalCopies {
    budget: u64,
    bytes: Cell<u64>,
    map: RefCell<FastMap<(u32, usize), (u64, Entry)>>,
}

impl LocalCopies {
    /// Copies of at most `budget` bytes in all.
    pub fn new(budget: u64) -> LocalCopies {
        LocalCopies {
            budget,
            ..LocalCopies::default()
        }
    }

    /// The copy of slot `s`.`w` if it holds what `way` names.
    fn get(&self, s: u32, w: usize, way: &Way) -> Option<Entry> {
        let map = self.map.borrow();
        let (_, e) = map.get(&(s, w))?;
        (e.meta.g == way.g && e.meta.v == way.v).then(|| e.clone())
    }

    /// Keep a copy of slot `s`.`w` (`n`: its encoded size), dropping other copies to stay
    /// within the budget.
    fn put(&self, s: u32, w: usize, n: u64, entry: &Entry) {
        if n > self.budget {
            return;
        }
        let mut map = self.map.borrow_mut();
        let mut bytes = self.bytes.get();
        if let Some((old, _)) = map.remove(&(s, w)) {
            bytes = bytes.saturating_sub(old);
        }
        while bytes + n > self.budget {
            let Some(k) = map.keys().next().copied() else {
                break;
            };
            if let Some((old, _)) = map.remove(&k) {
                bytes = bytes.saturating_sub(old);
            }
        }
        map.insert((s, w), (n, entry.clone()));
        self.bytes.set(bytes + n);
    }

    /// Bytes held (encoded sizes).
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }
}

/// Result of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// No entry for the URL.
    UriMiss,
    /// Entries for the URL, none for this variant (or the response said `Vary: *`).
    VaryMiss,
    /// Found.
    Hit(Box<Found>),
}

/// Result of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Bytes held now minus before.
    pub bytes_delta: i64,
    /// A valid entry of another URL or variant was overwritten.
    pub evicted: bool,
    /// The way was empty before.
    pub new_entry: bool,
}

/// The store: a view of the layout with the configured geometry.
#[derive(Debug, Clone, Copy)]
pub struct Store {
    /// Number of sets.
    pub sets: u32,
    /// Ways per set.
    pub ways: u32,
    /// Largest slot value (entry with metadata) stored.
    pub max_entry_bytes: u64,
}

/// Why a store did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutError {
    /// The encoded entry is larger than `max_entry_bytes`.
    TooLarge,
    /// Shared data refused the write, or other writers won every compare-and-swap.
    Lost,
}

fn set_key(s: u32) -> String {
    let mut key = String::with_capacity(18);
    key.push_str("tc.set.");
    push_u64(&mut key, u64::from(s));
    key
}

fn slot_key(s: u32, w: usize) -> String {
    let mut key = String::with_capacity(28);
    key.push_str("tc.slot.");
    push_u64(&mut key, u64::from(s));
    key.push('.');
    push_u64(&mut key, w as u64);
    key
}

const PURGES_KEY: &str = "tc.purges";

impl Store {
    /// The set of a URL hash.
    pub fn set_of(&self, url_hash: u64) -> u32 {
        u32::try_from(url_hash % u64::from(self.sets.max(1))).unwrap_or(0)
    }

    fn read_set(&self, host: &dyn Host, s: u32) -> (SetRecord, Option<u32>) {
        // Missing or unreadable: its purge sequence number is unknown (never lowered by a
        // purge's write, so that a record written without a CAS cannot hide a purge).
        let unknown = || SetRecord {
            pseq: UNKNOWN_PSEQ,
            ways: Vec::new(),
        };
        let (mut rec, cas) = match host.shared_get(&set_key(s)) {
            Ok(Some((bytes, cas))) => {
                (SetRecord::decode(&bytes).unwrap_or_else(unknown), Some(cas))
            }
            _ => (unknown(), None),
        };
        let ways = usize::try_from(self.ways).unwrap_or(1);
        rec.ways.resize(ways, Way::default());
        (rec, cas)
    }

    /// Read-modify-write a set record with CAS; `f` returns false to leave it unchanged.
    fn update_set<T>(
        &self,
        host: &mut dyn Host,
        s: u32,
        f: impl FnMut(&mut SetRecord) -> Option<T>,
    ) -> Option<T> {
        self.update_read_set(host, s, None, f)
    }

    /// [`Store::update_set`] whose first attempt starts from a record already read (and its
    /// CAS): a write in between makes that attempt's CAS fail and the next one read again.
    fn update_read_set<T>(
        &self,
        host: &mut dyn Host,
        s: u32,
        mut read: Option<(SetRecord, Option<u32>)>,
        mut f: impl FnMut(&mut SetRecord) -> Option<T>,
    ) -> Option<T> {
        for _ in 0..CAS_RETRIES {
            let (mut rec, cas) = match read.take() {
                Some(first) => first,
                None => self.read_set(host, s),
            };
            let out = f(&mut rec)?;
            let bytes = rec.encode();
            match host.shared_set(&set_key(s), &bytes, cas) {
                Ok(()) => return Some(out),
                Err(SharedError::CasMismatch) => continue,
                Err(SharedError::Host(e)) => {
                    log::warn!("cache: shared data write failed: {e}");
                    return None;
                }
            }
        }
        None
    }

    /// The purge rules.
    pub fn purges(&self, host: &dyn Host) -> Purges {
        match host.shared_get(PURGES_KEY) {
            Ok(Some((bytes, _))) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => Purges::default(),
        }
    }

    /// Add a purge rule, then raise every set record's purge sequence number to it (so that
    /// hits on entries fetched before it read the purge record). False when the rule could
    /// not be recorded.
    pub fn add_purge(&self, host: &mut dyn Host, rule: PurgeRule) -> bool {
        let Some(seq) = self.record_purge(host, rule) else {
            return false;
        };
        for s in 0..self.sets {
            // Always written (a CAS version change even when the number stays), so that a
            // hit that read the set before this purge cannot lower it afterwards.
            let raised = self.update_set(host, s, |rec| {
                if rec.pseq != UNKNOWN_PSEQ {
                    rec.pseq = rec.pseq.max(seq);
                }
                Some(())
            });
            if raised.is_none() {
                // Lost every CAS: the set is emptied with an unknown sequence number instead.
                let empty = SetRecord {
                    pseq: UNKNOWN_PSEQ,
                    ways: Vec::new(),
                };
                let _ = host.shared_set(&set_key(s), &empty.encode(), None);
            }
        }
        true
    }

    /// Add a purge rule to the purge record; its sequence number.
    fn record_purge(&self, host: &mut dyn Host, rule: PurgeRule) -> Option<u64> {
        for _ in 0..CAS_RETRIES {
            let (mut purges, cas) = match host.shared_get(PURGES_KEY) {
                Ok(Some((bytes, cas))) => (
                    serde_json::from_slice::<Purges>(&bytes).unwrap_or_default(),
                    Some(cas),
                ),
                _ => (Purges::default(), None),
            };
            purges.seq += 1;
            let mut rule = rule.clone();
            rule.seq = purges.seq;
            purges.rules.push(rule);
            while purges.rules.len() > MAX_PURGE_RULES {
                let oldest = purges.rules.remove(0);
                purges.flush_before = purges.flush_before.max(oldest.seq);
            }
            let bytes = serde_json::to_vec(&purges).ok()?;
            match host.shared_set(PURGES_KEY, &bytes, cas) {
                Ok(()) => return Some(purges.seq),
                Err(SharedError::CasMismatch) => continue,
                Err(SharedError::Host(_)) => return None,
            }
        }
        None
    }

    /// Find the entry of a URL for a request (`request` are its headers; `key_headers` the
    /// configured key headers), with the set's purge sequence number (on a hit
    /// [`UNKNOWN_PSEQ`] when unknown; a miss learns it from the purge record). The purge record is read only when a way is older than a purge of its set
    /// (or the set's number is unknown); entries purged by path read as misses and are
    /// emptied.
    pub fn lookup(
        &self,
        host: &mut dyn Host,
        url_hash: u64,
        request: &[(String, String)],
        key_headers: &[String],
        local: &LocalCopies,
    ) -> (Lookup, u64) {
        let s = self.set_of(url_hash);
        let (rec, cas) = self.read_set(host, s);
        let pseq = rec.pseq;
        let mut purges: Option<Purges> = None;
        let mut any = false;
        for (w, way) in rec.ways.iter().enumerate() {
            if way.is_empty() || way.u != url_hash {
                continue;
            }
            any = true;
            let v = crate::key::variant_hash(request, key_headers, &way.vary_names());
            if v != way.v {
                continue;
            }
            let entry = match local.get(s, w, way) {
                Some(entry) => entry,
                None => {
                    let Ok(Some((bytes, _))) = host.shared_get(&slot_key(s, w)) else {
                        continue;
                    };
                    let n = bytes.len() as u64;
                    let Some(entry) = Entry::decode_owned(bytes) else {
                        continue;
                    };
                    if entry.meta.g != way.g || entry.meta.v != way.v {
                        continue;
                    }
                    local.put(s, w, n, &entry);
                    entry
                }
            };
            let record = way.clone();
            if pseq != UNKNOWN_PSEQ && way.p >= pseq {
                // Fetched after every finished purge: none applies.
                return (
                    Lookup::Hit(Box::new(Found {
                        entry,
                        set: s,
                        way: w,
                        record,
                        pseq,
                        purges: None,
                        set_read: None,
                    })),
                    pseq,
                );
            }
            // Read after the set record: see `mark_unpurged`.
            let p = purges.get_or_insert_with(|| self.purges(host));
            if p.purged(&entry.meta.host, &entry.meta.path, way.p) {
                self.invalidate_way(host, s, w, way.g);
                any = false;
                continue;
            }
            let purges = purges.take();
            return (
                Lookup::Hit(Box::new(Found {
                    entry,
                    set: s,
                    way: w,
                    record,
                    pseq,
                    purges,
                    set_read: Some((rec, cas)),
                })),
                pseq,
            );
        }
        let out = if any {
            Lookup::VaryMiss
        } else {
            Lookup::UriMiss
        };
        if pseq != UNKNOWN_PSEQ {
            return (out, pseq);
        }
        // A miss in a set whose number is unknown: the purge record's (read after the set
        // record), written into the set with the CAS of its read (see `mark_unpurged`).
        let seq = purges.map_or_else(|| self.purges(host).seq, |p| p.seq);
        if let Some(cas) = cas {
            let mut rec = rec;
            rec.pseq = seq;
            let _ = host.shared_set(&set_key(s), &rec.encode(), Some(cas));
        }
        (out, seq)
    }

    /// A hit that read the purge record and is purged by none of its rules (path and tag):
    /// record that in its set (the way's `p` raised to the record's sequence number, and an
    /// unknown set number set to it) with the CAS of the lookup's read, so that the next hits
    /// read no purge record. The purge record was read after the set record: a purge that
    /// finished in between has changed the set record (its CAS fails), and one that finishes
    /// later raises the number again. One attempt; a lost CAS leaves it to the next hit.
    pub fn mark_unpurged(&self, host: &mut dyn Host, found: &Found) {
        let (Some(purges), Some((rec, Some(cas)))) = (&found.purges, &found.set_read) else {
            return;
        };
        let mut rec = rec.clone();
        let Some(way) = rec.ways.get_mut(found.way) else {
            return;
        };
        if way.g != found.record.g || way.is_empty() {
            return;
        }
        way.p = way.p.max(purges.seq);
        if rec.pseq == UNKNOWN_PSEQ {
            rec.pseq = purges.seq;
        }
        let _ = host.shared_set(&set_key(found.set), &rec.encode(), Some(*cas));
    }

    /// Empty a way (if it still holds generation `g`) and its slot. Returns the bytes freed.
    pub fn invalidate_way(&self, host: &mut dyn Host, s: u32, w: usize, g: u64) -> u64 {
        let freed = self.update_set(host, s, |rec| {
            let way = rec.ways.get_mut(w)?;
            if way.g != g || way.is_empty() {
                return None;
            }
            let n = way.n;
            *way = Way::default();
            Some(n)
        });
        if let Some(n) = freed {
            let _ = host.shared_set(&slot_key(s, w), b"", None);
            n
        } else {
            0
        }
    }

    /// Drop every entry of a URL (all variants). Returns (entries, bytes) freed.
    pub fn invalidate_url(&self, host: &mut dyn Host, url_hash: u64) -> (u64, u64) {
        let s = self.set_of(url_hash);
        let cleared = self
            .update_set(host, s, |rec| {
                let mut cleared = Vec::new();
                for (w, way) in rec.ways.iter_mut().enumerate() {
                    if !way.is_empty() && way.u == url_hash {
                        cleared.push((w, way.n));
                        *way = Way::default();
                    }
                }
                if cleared.is_empty() {
                    None
                } else {
                    Some(cleared)
                }
            })
            .unwrap_or_default();
        let mut bytes = 0;
        for (w, n) in &cleared {
            let _ = host.shared_set(&slot_key(s, *w), b"", None);
            bytes += n;
        }
        (cleared.len() as u64, bytes)
    }

    /// Store an entry for a URL and variant. The way chosen: the one holding the same URL and
    /// variant, else an empty one, else the oldest (FIFO eviction).
    pub fn put(
        &self,
        host: &mut dyn Host,
        url_hash: u64,
        vary: &[String],
        mut entry: Entry,
        now: SystemTime,
        purge_seq: u64,
    ) -> Result<Stored, PutError> {
        let s = self.set_of(url_hash);
        let now_ms = millis(now);
        let v = entry.meta.v;
        entry.meta.g = 0;
        let mut bytes = entry.encode();
        let n = bytes.len() as u64;
        if n > self.max_entry_bytes {
            return Err(PutError::TooLarge);
        }
        let (rec, cas) = self.read_set(host, s);
        let w = choose_way(&rec, url_hash, v);
        let old_g = rec.ways.get(w).map_or(0, |old| old.g);
        let g = generation(
            now_ms,
            url_hash,
            v,
            &bytes,
            &entry.body,
            old_g,
            cas.unwrap_or(0),
        );
        if let Some(field) = bytes.get_mut(1..9) {
            // `g` follows the format byte ([`Entry::encode`])
            field.copy_from_slice(&g.to_le_bytes());
        }
        host.shared_set(&slot_key(s, w), &bytes, None)
            .map_err(|_| PutError::Lost)?;
        let vary = vary.join(",");
        // The set record as read serves the first CAS attempt (one shared-data read less).
        self.update_read_set(host, s, Some((rec, cas)), |rec| {
            let way = rec.ways.get_mut(w)?;
            let old = way.clone();
            *way = Way {
                u: url_hash,
                v,
                vary: vary.clone(),
                g,
                t: now_ms,
                n,
                r: 0,
                p: purge_seq,
            };
            Some(Stored {
                bytes_delta: i64::try_from(n).unwrap_or(i64::MAX)
                    - i64::try_from(old.n).unwrap_or(i64::MAX),
                evicted: !(old.is_empty() || (old.u == url_hash && old.v == v)),
                new_entry: old.is_empty(),
            })
        })
        .ok_or(PutError::Lost)
    }

    /// Take the refresh lock of an entry's way: true for exactly one caller until `until`.
    pub fn lock_refresh(
        &self,
        host: &mut dyn Host,
        found: &Found,
        now: SystemTime,
        hold: Duration,
    ) -> bool {
        let now_ms = millis(now);
        let until = millis(now + hold);
        self.update_set(host, found.set, |rec| {
            let way = rec.ways.get_mut(found.way)?;
            if way.g != found.record.g || way.r > now_ms {
                return None;
            }
            way.r = until;
            Some(())
        })
        .is_some()
    }

    /// Bytes and entries held, from the set records.
    pub fn usage(&self, host: &dyn Host) -> (u64, u64) {
        self.usage_of(host, 0, self.sets)
    }

    /// Bytes and entries held in sets `from..to`.
    pub fn usage_of(&self, host: &dyn Host, from: u32, to: u32) -> (u64, u64) {
        let mut bytes = 0;
        let mut entries = 0;
        for s in from..to.min(self.sets) {
            let (rec, _) = self.read_set(host, s);
            for w in rec.ways.iter().filter(|w| !w.is_empty()) {
                bytes += w.n;
                entries += 1;
            }
        }
        (bytes, entries)
    }
}

fn choose_way(rec: &SetRecord, url_hash: u64, v: u64) -> usize {
    if let Some(w) = rec.ways.iter().position(|w| w.u == url_hash && w.v == v) {
        return w;
    }
    if let Some(w) = rec.ways.iter().position(Way::is_empty) {
        return w;
    }
    rec.ways
        .iter()
        .enumerate()
        .min_by_key(|(_, w)| w.t)
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// The generation of an entry being stored: unlikely to collide with a racing writer's. The
/// slot's content for a generation must not change (workers keep copies by generation,
/// [`LocalCopies`]), so besides the time, key and size, the stored headers and facts, a hash of
/// the body and the generation it replaces (with the record's CAS) take part: storing the same
/// URL again in the same millisecond, or two workers storing different bodies of one URL from
/// the same record in the same millisecond, gives different generations. Computed when storing
/// only (a miss), never on a hit.
fn generation(
    now_ms: u64,
    url_hash: u64,
    v: u64,
    encoded: &[u8],
    body: &[u8],
    old_g: u64,
    cas: u32,
) -> u64 {
    use std::hash::Hasher;
    let mut body_hash = tollgate_common::fast_hash::FastHasher::default();
    body_hash.write(body);
    let meta_len = encoded.len().saturating_sub(body.len());
    crate::key::fnv64(&[
        &now_ms.to_le_bytes(),
        &url_hash.to_le_bytes(),
        &v.to_le_bytes(),
        &body.len().to_le_bytes(),
        &body_hash.finish().to_le_bytes(),
        encoded.get(..meta_len).unwrap_or_default(),
        &old_g.to_le_bytes(),
        &cas.to_le_bytes(),
    ]) | 1
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn keys_are_the_formatted_ones() {
        for n in [0u64, 7, 10, 1234567, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::from("x.");
            push_u64(&mut s, n);
            assert_eq!(s, format!("x.{n}"));
        }
        assert_eq!(set_key(41), "tc.set.41");
        assert_eq!(slot_key(0, 3), "tc.slot.0.3");
        assert_eq!(slot_key(1023, 10), "tc.slot.1023.10");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of `sets` × `ways` with entries up to 1 MiB.
    fn store(sets: u32, ways: u32) -> Store {
        Store {
            sets,
            ways,
            max_entry_bytes: 1 << 20,
        }
    }
    use tollgate_common::mem_host::MemHost;

    fn entry(url: &str, v: u64, body: &[u8]) -> Entry {
        Entry {
            meta: Meta {
                g: 0,
                url: url.into(),
                host: "h".into(),
                path: url.into(),
                v,
                status: 200,
                headers: vec![("etag".into(), "\"1\"".into())],
                auth: false,
                f: Facts {
                    at: 5,
                    age: 1,
                    life: 60,
                    flags: 1,
                    swr: Some(0),
                    sie: Some(30),
                    modified: None,
                },
            },
            body: body.to_vec(),
        }
    }

    impl Store {
        fn lookup_now(
            &self,
            h: &mut MemHost,
            u: u64,
            r: &[(String, String)],
            k: &[String],
        ) -> Lookup {
            self.lookup(h, u, r, k, &LocalCopies::default()).0
        }
    }

    #[test]
    fn tag_purges_match_tags_only() {
        let tag = |t: &str, seq| PurgeRule {
            host: None,
            path: String::new(),
            prefix: false,
            at: 0,
            seq,
            tag: Some(t.into()),
        };
        let p = Purges {
            seq: 5,
            flush_before: 0,
            rules: vec![tag("blue", 5)],
        };
        assert!(p.purged_by_tag(["red", "blue"].into_iter(), 4));
        assert!(!p.purged_by_tag(["red", "blue"].into_iter(), 5));
        assert!(!p.purged_by_tag(["red"].into_iter(), 0));
        // a tag rule never purges by path (its path is empty, a prefix of everything)
        assert!(!p.purged("h", "/any", 0));
    }

    #[test]
    fn set_records_round_trip_and_garbage_is_empty() {
        let rec = SetRecord {
            pseq: 9,
            ways: vec![
                Way {
                    u: 1,
                    v: 2,
                    vary: "accept,accept-language".into(),
                    g: 3,
                    t: 4,
                    n: 5,
                    r: 6,
                    p: 7,
                },
                Way::default(),
                Way {
                    u: u64::MAX,
                    v: 0,
                    vary: String::new(),
                    g: u64::MAX,
                    t: 0,
                    n: 0,
                    r: 0,
                    p: 0,
                },
            ],
        };
        assert_eq!(SetRecord::decode(&rec.encode()), Some(rec.clone()));
        let bytes = rec.encode();
        for cut in 1..bytes.len() {
            // a truncated record is refused or shorter, never garbage ways
            if let Some(r) = SetRecord::decode(&bytes[..cut]) {
                assert!(r.ways.len() < rec.ways.len());
            }
        }
        assert_eq!(SetRecord::decode(b""), None);
        assert_eq!(SetRecord::decode(b"{\"ways\":[]}"), None);
    }

    #[test]
    fn entries_round_trip_and_garbage_is_a_miss() {
        let e = entry("/a", 7, b"hello");
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(b"\xff\xff\xff\xff{}"), None);
        let bytes = e.encode();
        for cut in 0..bytes.len() - e.body.len() {
            assert_eq!(Entry::decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn put_lookup_and_fifo_eviction_within_a_set() {
        let store = store(1, 2);
        let mut h = MemHost::new();
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        for (i, url) in ["/a", "/b", "/c"].iter().enumerate() {
            h.advance(Duration::from_secs(1));
            let now = h.now;
            let st = store
                .put(
                    &mut h,
                    100 + i as u64,
                    &[],
                    entry(url, v0, url.as_bytes()),
                    now,
                    0,
                )
                .unwrap();
            assert_eq!(st.evicted, i == 2, "{url}");
        }
        assert!(matches!(
            store.lookup_now(&mut h, 100, &[], &[]),
            Lookup::UriMiss
        ));
        match store.lookup_now(&mut h, 101, &[], &[]) {
            Lookup::Hit(f) => assert_eq!(f.entry.body, b"/b"),
            other => panic!("{other:?}"),
        }
        let (bytes, entries) = store.usage(&h);
        assert_eq!(entries, 2);
        assert!(bytes > 0);
        assert_eq!(store.invalidate_url(&mut h, 101).0, 1);
        assert!(matches!(
            store.lookup_now(&mut h, 101, &[], &[]),
            Lookup::UriMiss
        ));
    }

    #[test]
    fn variants_are_kept_apart() {
        let store = store(1, 4);
        let mut h = MemHost::new();
        let vary = vec!["accept-language".to_string()];
        let req = |l: &str| vec![("accept-language".to_string(), l.to_string())];
        let now = h.now;
        for l in ["en", "fr"] {
            let v = crate::key::variant_hash(&req(l), &[], &vary);
            store
                .put(&mut h, 5, &vary, entry("/a", v, l.as_bytes()), now, 0)
                .unwrap();
        }
        for l in ["en", "fr"] {
            match store.lookup_now(&mut h, 5, &req(l), &[]) {
                Lookup::Hit(f) => assert_eq!(f.entry.body, l.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            store.lookup_now(&mut h, 5, &req("de"), &[]),
            Lookup::VaryMiss
        ));
    }

    #[test]
    fn purge_rules_hide_older_entries_and_fold_when_full() {
        let store = store(1, 4);
        let mut h = MemHost::new();
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        let now = h.now;
        let seen = store.purges(&h).seq;
        store
            .put(&mut h, 1, &[], entry("/api/x", v0, b"x"), now, seen)
            .unwrap();
        let rule = PurgeRule {
            host: None,
            path: "/api/".into(),
            prefix: true,
            at: millis(now),
            seq: 0,
            tag: None,
        };
        assert!(store.add_purge(&mut h, rule));
        assert!(matches!(
            store.lookup_now(&mut h, 1, &[], &[]),
            Lookup::UriMiss
        ));
        // fetched before the purge, stored after it (same clock): still purged
        store
            .put(&mut h, 1, &[], entry("/api/x", v0, b"x"), now, seen)
            .unwrap();
        assert!(matches!(
            store.lookup_now(&mut h, 1, &[], &[]),
            Lookup::UriMiss
        ));
        let seen = store.purges(&h).seq;
        store
            .put(&mut h, 1, &[], entry("/api/x", v0, b"x"), now, seen)
            .unwrap();
        assert!(matches!(
            store.lookup_now(&mut h, 1, &[], &[]),
            Lookup::Hit(_)
        ));
        for i in 0..(MAX_PURGE_RULES as u64 + 1) {
            let r = PurgeRule {
                host: Some("other".into()),
                path: "/z".into(),
                prefix: false,
                at: i,
                seq: 0,
                tag: None,
            };
            store.add_purge(&mut h, r);
        }
        let p = store.purges(&h);
        assert_eq!(p.rules.len(), MAX_PURGE_RULES);
        assert!(p.flush_before > 0);
    }

    #[test]
    fn racing_writers_of_different_bodies_get_different_generations() {
        // two workers storing one URL from the same record in the same millisecond, same
        // headers and size, different bodies
        let a = generation(1, 7, 9, b"hdrone", b"one", 3, 4);
        let b = generation(1, 7, 9, b"hdrtwo", b"two", 3, 4);
        assert_ne!(a, b);
        assert_eq!(a, generation(1, 7, 9, b"hdrone", b"one", 3, 4));
        assert_eq!(a & 1, 1, "never 0");
    }

    #[test]
    fn worker_copies_are_served_only_while_the_way_record_names_them() {
        let store = store(1, 2);
        let mut h = MemHost::new();
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        let (a, b) = (LocalCopies::new(1 << 20), LocalCopies::new(1 << 20));
        let body = |l: (Lookup, u64)| match l.0 {
            Lookup::Hit(f) => Some(f.entry.body),
            _ => None,
        };
        let now = h.now;
        store
            .put(&mut h, 7, &[], entry("/u", v0, b"one"), now, 0)
            .unwrap();
        assert_eq!(
            body(store.lookup(&mut h, 7, &[], &[], &a)),
            Some(b"one".to_vec())
        );
        assert!(a.bytes() > 0, "the first hit keeps a copy");
        // another worker stores a new version in the same millisecond, same size: a new
        // generation (the headers differ), so the copy is not served
        let mut e = entry("/u", v0, b"two");
        e.meta.headers = vec![("etag".into(), "\"2\"".into())];
        store.put(&mut h, 7, &[], e, now, 0).unwrap();
        assert_eq!(
            body(store.lookup(&mut h, 7, &[], &[], &a)),
            Some(b"two".to_vec())
        );
        assert_eq!(
            body(store.lookup(&mut h, 7, &[], &[], &a)),
            Some(b"two".to_vec())
        );
        // the slot itself is no longer read while the way record names the copy
        let set = store.set_of(7);
        let way = store
            .read_set(&h, set)
            .0
            .ways
            .iter()
            .position(|w| w.u == 7)
            .unwrap();
        h.shared_set(&slot_key(set, way), b"", None).unwrap();
        assert_eq!(
            body(store.lookup(&mut h, 7, &[], &[], &a)),
            Some(b"two".to_vec())
        );
        assert_eq!(
            body(store.lookup(&mut h, 7, &[], &[], &b)),
            None,
            "b has no copy"
        );
        // invalidated by another worker: a miss, copy or not
        store
            .put(&mut h, 7, &[], entry("/u", v0, b"three"), now, 0)
            .unwrap();
        assert!(body(store.lookup(&mut h, 7, &[], &[], &a)).is_some());
        store.invalidate_url(&mut h, 7);
        assert!(matches!(
            store.lookup(&mut h, 7, &[], &[], &a).0,
            Lookup::UriMiss
        ));
        // purged by path: a miss, copy or not
        store
            .put(&mut h, 7, &[], entry("/u", v0, b"four"), now, 0)
            .unwrap();
        assert!(body(store.lookup(&mut h, 7, &[], &[], &a)).is_some());
        let rule = PurgeRule {
            host: None,
            path: "/u".into(),
            prefix: false,
            at: 0,
            seq: 0,
            tag: None,
        };
        assert!(store.add_purge(&mut h, rule));
        assert!(matches!(
            store.lookup(&mut h, 7, &[], &[], &a).0,
            Lookup::UriMiss
        ));
        // the budget bounds the copies: an entry larger than it is never kept
        let small = LocalCopies::new(8);
        store
            .put(&mut h, 7, &[], entry("/u", v0, b"five"), now, 1)
            .unwrap();
        assert!(body(store.lookup(&mut h, 7, &[], &[], &small)).is_some());
        assert_eq!(small.bytes(), 0);
    }

    #[test]
    fn hits_read_the_purge_record_only_after_a_purge_of_their_set() {
        let store = store(2, 2);
        let mut h = MemHost::new();
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        let now = h.now;
        store
            .put(&mut h, 2, &[], entry("/api/x", v0, b"x"), now, 0)
            .unwrap();
        let hit = |h: &mut MemHost| match store.lookup(h, 2, &[], &[], &LocalCopies::default()) {
            (Lookup::Hit(f), pseq) => (f, pseq),
            other => panic!("{other:?}"),
        };
        // a set record written without a CAS: its purge number is unknown, the hit checks
        let (f, pseq) = hit(&mut h);
        assert_eq!(pseq, UNKNOWN_PSEQ);
        assert!(f.purges.is_some());
        store.mark_unpurged(&mut h, &f);
        let (f, pseq) = hit(&mut h);
        assert_eq!((pseq, f.purges.is_none()), (0, true));
        // a purge of another path raises the set's number: one checked hit, then none
        let other = |path: &str| PurgeRule {
            host: None,
            path: path.into(),
            prefix: false,
            at: 0,
            seq: 0,
            tag: None,
        };
        assert!(store.add_purge(&mut h, other("/other")));
        let (f, pseq) = hit(&mut h);
        assert_eq!((pseq, f.purges.as_ref().map(|p| p.seq)), (1, Some(1)));
        store.mark_unpurged(&mut h, &f);
        let (f, _) = hit(&mut h);
        assert!(f.purges.is_none());
        assert_eq!(f.record.p, 1);
        // a mark from a read older than a purge is refused (the CAS changed)
        assert!(store.add_purge(&mut h, other("/other2")));
        let (stale, _) = hit(&mut h);
        assert!(stale.purges.is_some());
        assert!(store.add_purge(&mut h, other("/other3")));
        store.mark_unpurged(&mut h, &stale);
        let (f, pseq) = hit(&mut h);
        assert_eq!((pseq, f.record.p), (3, 1));
        // the purge of its path hides it even after fast hits
        store.mark_unpurged(&mut h, &f);
        assert!(hit(&mut h).0.purges.is_none());
        assert!(store.add_purge(&mut h, other("/api/x")));
        assert!(matches!(
            store.lookup(&mut h, 2, &[], &[], &LocalCopies::default()).0,
            Lookup::UriMiss
        ));
        // every set was raised, the never-written one included (created unknown)
        let (rec, _) = store.read_set(&h, 1);
        assert_eq!(rec.pseq, UNKNOWN_PSEQ);
        assert_eq!(store.read_set(&h, 0).0.pseq, 4);
        // a miss there learns the number from the purge record and writes it
        let (miss, seq) = store.lookup(&mut h, 3, &[], &[], &LocalCopies::default());
        assert!(matches!(miss, Lookup::UriMiss));
        assert_eq!((seq, store.read_set(&h, 1).0.pseq), (4, 4));
    }

    #[test]
    fn entries_over_the_bound_are_refused() {
        let store = Store {
            sets: 1,
            ways: 1,
            max_entry_bytes: 300,
        };
        let mut h = MemHost::new();
        let now = h.now;
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        assert_eq!(
            store.put(&mut h, 1, &[], entry("/a", v0, &[b'x'; 300]), now, 0),
            Err(PutError::TooLarge)
        );
        assert!(store
            .put(&mut h, 1, &[], entry("/a", v0, b"x"), now, 0)
            .is_ok());
        assert!(store.usage(&h).0 <= 300);
    }

    #[test]
    fn refresh_lock_is_taken_once() {
        let store = store(1, 1);
        let mut h = MemHost::new();
        let now = h.now;
        let v0 = crate::key::variant_hash(&[], &[], &[]);
        store
            .put(&mut h, 1, &[], entry("/a", v0, b"a"), now, 0)
            .unwrap();
        let Lookup::Hit(f) = store.lookup_now(&mut h, 1, &[], &[]) else {
            panic!()
        };
        assert!(store.lock_refresh(&mut h, &f, now, Duration::from_secs(5)));
        let Lookup::Hit(f) = store.lookup_now(&mut h, 1, &[], &[]) else {
            panic!()
        };
        assert!(!store.lock_refresh(&mut h, &f, now, Duration::from_secs(5)));
        h.advance(Duration::from_secs(6));
        let now = h.now;
        assert!(store.lock_refresh(&mut h, &f, now, Duration::from_secs(5)));
    }
}
