//! Failed-credential throttling: failures (a wrong API key, a forged token, a wrong purge key)
//! counted per client IP in shared data, so every worker sees them, and a client past a
//! threshold within a window refused cheaply — one shared-data read, before any signature or
//! hash work — with `429` and `retry-after`.
//!
//! Layout: `slots` shared-data keys `<prefix><slot>`, the slot chosen by a hash of the client
//! address; each holds 20 bytes: the window number (u64), the failures in it (u32) and the hash
//! of the client that owns the slot (u64), big-endian. A client whose hash differs takes the
//! slot over (so one client cannot be throttled for another's failures; two clients in one
//! slot are rare with the default 4096 slots, and the later one wins).

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigDuration, ConfigError};
use crate::host::{Host, SharedError};
use crate::problem::{LocalReply, Problem};

/// How many CAS retries a failure gets before it is dropped (heavy contention on one slot).
const CAS_TRIES: usize = 4;

/// Failed-credential throttling as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureLimitConfig {
    /// Failures a client (IP address) may have within `window`; the next attempt, and every
    /// one until the window ends, is refused with 429.
    pub max_failures: u32,
    /// Length of the (fixed) window.
    #[serde(default = "default_window")]
    pub window: ConfigDuration,
    /// Shared-data keys (tracked clients at once).
    #[serde(default = "default_slots")]
    pub slots: u32,
}

fn default_window() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_slots() -> u32 {
    4096
}

/// Compiled failed-credential throttling.
#[derive(Debug, Clone)]
pub struct FailureLimit {
    prefix: String,
    max: u32,
    window: f64,
    slots: u32,
}

/// One slot's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    window: u64,
    failures: u32,
    client: u64,
}

impl Slot {
    fn decode(v: &[u8]) -> Option<Slot> {
        let window = u64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
        let failures = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
        let client = u64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
        Some(Slot {
            window,
            failures,
            client,
        })
    }
    fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&self.window.to_be_bytes());
        b[8..12].copy_from_slice(&self.failures.to_be_bytes());
        b[12..20].copy_from_slice(&self.client.to_be_bytes());
        b
    }
}

/// FNV-1a, 64 bits.
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The client's address as Envoy sees it (`source.address`, the port removed): with
/// `use_remote_address` the TCP peer, never a header the client chose.
pub fn client_address(host: &dyn Host) -> Option<String> {
    let raw = host.property(&["source", "address"])?;
    let a = String::from_utf8(raw).ok()?;
    let a = a.trim();
    let ip = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match a.split_once(':') {
            Some((ip, port)) if !port.contains(':') => ip,
            _ => a,
        }
    };
    Some(ip.to_string()).filter(|s| !s.is_empty())
}

impl FailureLimit {
    /// Compile; `prefix` names the shared-data keys (`tollgate.auth.failures.`).
    pub fn compile(prefix: &str, c: &FailureLimitConfig) -> Result<FailureLimit, ConfigError> {
        if c.max_failures == 0 {
            return Err(ConfigError::new("max_failures", "must be at least 1"));
        }
        if c.window.0 < Duration::from_secs(1) {
            return Err(ConfigError::new("window", "must be at least 1s"));
        }
        if !(8..=1 << 20).contains(&c.slots) {
            return Err(ConfigError::new("slots", "must be from 8 to 1048576"));
        }
        Ok(FailureLimit {
            prefix: prefix.to_string(),
            max: c.max_failures,
            window: c.window.0.as_secs_f64(),
            slots: c.slots,
        })
    }

    fn key(&self, client: u64) -> String {
        format!("{}{}", self.prefix, client % u64::from(self.slots))
    }

    fn window_of(&self, now: f64) -> u64 {
        // Saturating float-to-int conversion: a clock before 1970 is window 0.
        (now / self.window) as u64
    }

    /// Is `client` refused now? `Some(seconds)` until its window ends (for `retry-after`).
    /// One shared-data read.
    pub fn refused(&self, host: &dyn Host, client: &str, now: f64) -> Option<u64> {
        let h = hash(client);
        let (v, _) = host.shared_get(&self.key(h)).ok()??;
        let slot = Slot::decode(&v)?;
        let window = self.window_of(now);
        if slot.client != h || slot.window != window || slot.failures < self.max {
            return None;
        }
        let end = (window + 1) as f64 * self.window;
        Some(((end - now).ceil() as u64).max(1))
    }

    /// Count a failure of `client` (a few CAS retries; dropped under heavy contention).
    pub fn record(&self, host: &mut dyn Host, client: &str, now: f64) {
        let h = hash(client);
        let key = self.key(h);
        let window = self.window_of(now);
        for _ in 0..CAS_TRIES {
            let current = match host.shared_get(&key) {
                Ok(c) => c,
                Err(_) => return,
            };
            let (old, cas) = match &current {
                Some((v, cas)) => (Slot::decode(v), Some(*cas)),
                None => (None, None),
            };
            let failures = match old {
                Some(s) if s.client == h && s.window == window => s.failures.saturating_add(1),
                _ => 1,
            };
            let new = Slot {
                window,
                failures,
                client: h,
            };
            match host.shared_set(&key, &new.encode(), cas) {
                Ok(()) => return,
                Err(SharedError::CasMismatch) => continue,
                Err(SharedError::Host(_)) => return,
            }
        }
    }

    /// The 429 answer: `application/problem+json` with `reason: too_many_failures` and
    /// `retry-after`; `type_uri` names the filter's problem type.
    pub fn reply(type_uri: &str, instance: &str, retry_after: u64) -> LocalReply {
        Problem::new(429)
            .typed(type_uri, "Too Many Requests")
            .detail("too many failed attempts from this client; retry later")
            .instance(instance)
            .extension("reason", "too_many_failures")
            .into_reply()
            .with_header("retry-after", retry_after.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_host::MemHost;

    fn limit(max: u32) -> FailureLimit {
        let c: FailureLimitConfig =
            serde_json::from_value(serde_json::json!({"max_failures": max, "window": "1m"}))
                .unwrap();
        FailureLimit::compile("t.", &c).unwrap()
    }

    #[test]
    fn refused_past_the_threshold_until_the_window_ends() {
        let l = limit(3);
        let mut h = MemHost::new();
        let now = 600.0;
        for _ in 0..3 {
            assert_eq!(l.refused(&h, "10.0.0.1", now), None);
            l.record(&mut h, "10.0.0.1", now);
        }
        assert_eq!(l.refused(&h, "10.0.0.1", now + 1.0), Some(59));
        assert_eq!(l.refused(&h, "10.0.0.2", now + 1.0), None, "per client");
        assert_eq!(l.refused(&h, "10.0.0.1", now + 60.0), None, "a new window");
    }

    #[test]
    fn workers_share_the_count_and_cas_conflicts_retry() {
        let l = limit(2);
        let mut a = MemHost::new();
        let mut b = MemHost::new();
        b.shared = a.shared.clone();
        l.record(&mut a, "c", 10.0);
        a.shared.force_conflicts(2);
        l.record(&mut b, "c", 10.0);
        assert!(l.refused(&a, "c", 10.0).is_some());
    }

    #[test]
    fn a_client_in_a_taken_slot_starts_its_own_count() {
        let c: FailureLimitConfig =
            serde_json::from_value(serde_json::json!({"max_failures": 1, "slots": 8})).unwrap();
        let l = FailureLimit::compile("t.", &c).unwrap();
        let mut h = MemHost::new();
        l.record(&mut h, "a", 10.0);
        // Find another client in the same slot.
        let other = (0..1000)
            .map(|i| format!("b{i}"))
            .find(|b| hash(b) % 8 == hash("a") % 8)
            .unwrap();
        assert_eq!(l.refused(&h, &other, 10.0), None);
        l.record(&mut h, &other, 10.0);
        assert!(l.refused(&h, &other, 10.0).is_some());
        assert_eq!(l.refused(&h, "a", 10.0), None, "taken over");
    }

    #[test]
    fn configuration_errors_and_addresses() {
        for (json, field) in [
            (r#"{"max_failures":0}"#, "max_failures"),
            (r#"{"max_failures":1,"window":"10ms"}"#, "window"),
            (r#"{"max_failures":1,"slots":1}"#, "slots"),
        ] {
            let c: FailureLimitConfig = serde_json::from_str(json).unwrap();
            assert_eq!(FailureLimit::compile("t.", &c).unwrap_err().field, field);
        }
        let mut h = MemHost::new();
        assert_eq!(client_address(&h), None);
        for (raw, ip) in [
            ("10.0.0.1:5555", "10.0.0.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            h.set_property(&["source", "address"], raw);
            assert_eq!(client_address(&h).as_deref(), Some(ip));
        }
        let r = FailureLimit::reply("https://x/y", "/p", 7);
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("7"));
    }
}
