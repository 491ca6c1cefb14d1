//! Counters: one atomic check-and-increment per call, in Redis or in memory.
//!
//! Why not limitador's own Redis storage: it does not compile without its `disk_storage`
//! feature (RocksDB, a large C++ build) in any release from 0.7 to 0.14, and its
//! check-and-update reads the counters and increments them in two round trips, so two calls in
//! flight at once can both take the last unit. Here one Lua script reads every counter the call
//! touches and increments them all only if every one has room: exact however many calls, and
//! however many servers share the Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// One counter a call touches.
#[derive(Clone)]
pub struct CounterRef {
    /// Its storage key (stable across processes).
    pub key: String,
    /// Units per window.
    pub max: u64,
    /// The window.
    pub window: Duration,
}

/// A counter after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterState {
    /// Units used in the current window (including this call's, if admitted).
    pub used: u64,
    /// Time until the window ends.
    pub resets_in: Duration,
}

/// The outcome of a check-and-increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// True when every counter had room and all were incremented; false when none was.
    pub admitted: bool,
    /// The counters, in the order given.
    pub states: Vec<CounterState>,
}

/// Reads every counter (value and time left) and, if each has room for `delta`, increments them
/// all, starting the window (an expiry) of any counter that did not exist. Returns
/// `admitted, value1, pttl1, value2, pttl2, ...`.
const CHECK_AND_INCREMENT: &str = r"
local delta = tonumber(ARGV[1])
local admitted = 1
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('get', key) or '0')
  if used + delta > tonumber(ARGV[2 * i]) then admitted = 0 end
end
local out = { admitted }
for i, key in ipairs(KEYS) do
  local used
  if admitted == 1 then
    used = redis.call('incrby', key, delta)
    if redis.call('pttl', key) < 0 then redis.call('pexpire', key, ARGV[2 * i + 1]) end
  else
    used = tonumber(redis.call('get', key) or '0')
  end
  table.insert(out, used)
  table.insert(out, redis.call('pttl', key))
end
return out
";

/// Where counters live.
pub enum Store {
    /// In this process.
    Memory(Mutex<HashMap<String, (u64, Instant)>>),
    /// In Redis.
    Redis(ConnectionManager, redis::Script),
}

impl Store {
    /// Counters in memory.
    pub fn memory() -> Self {
        Store::Memory(Mutex::new(HashMap::new()))
    }

    /// Counters in Redis at `url`; fails when Redis does not answer.
    pub async fn redis(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_number_of_retries(1);
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| e.to_string())?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Store::Redis(conn, redis::Script::new(CHECK_AND_INCREMENT)))
    }

    /// Check every counter for room for `delta` and, if all have it, take it from each.
    pub async fn check_and_increment(
        &self,
        counters: &[CounterRef],
        delta: u64,
    ) -> Result<Outcome, String> {
        match self {
            Store::Memory(map) => memory_check(map, counters, delta, Instant::now()),
            Store::Redis(conn, script) => {
                let mut inv = script.prepare_invoke();
                inv.arg(delta);
                for c in counters {
                    inv.key(&c.key)
                        .arg(c.max)
                        .arg(u64::try_from(c.window.as_millis()).unwrap_or(u64::MAX));
                }
                let mut conn = conn.clone();
                let out: Vec<i64> = inv
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                outcome(&out, counters)
            }
        }
    }
}

fn outcome(out: &[i64], counters: &[CounterRef]) -> Result<Outcome, String> {
    if out.len() != 1 + 2 * counters.len() {
        return Err(format!("unexpected script answer of {} values", out.len()));
    }
    let states = counters
        .iter()
        .zip(out[1..].chunks(2))
        .map(|(c, pair)| CounterState {
            used: u64::try_from(pair[0]).unwrap_or(0),
            resets_in: u64::try_from(pair[1])
                .map(Duration::from_millis)
                .unwrap_or(c.window),
        })
        .collect();
    Ok(Outcome {
        admitted: out[0] == 1,
        states,
    })
}

fn memory_check(
    map: &Mutex<HashMap<String, (u64, Instant)>>,
    counters: &[CounterRef],
    delta: u64,
    now: Instant,
) -> Result<Outcome, String> {
    let mut map = map
        .lock()
        .map_err(|_| "memory store poisoned".to_string())?;
    let current = |map: &HashMap<String, (u64, Instant)>, c: &CounterRef| match map.get(&c.key) {
        Some(&(used, ends)) if ends > now => (used, ends),
        _ => (0, now + c.window),
    };
    let admitted = counters
        .iter()
        .all(|c| current(&map, c).0.saturating_add(delta) <= c.max);
    let mut states = Vec::with_capacity(counters.len());
    for c in counters {
        let (mut used, ends) = current(&map, c);
        if admitted {
            used = used.saturating_add(delta);
            map.insert(c.key.clone(), (used, ends));
        }
        states.push(CounterState {
            used,
            resets_in: ends.saturating_duration_since(now),
        });
    }
    Ok(Outcome { admitted, states })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_all_or_nothing_and_restarts_windows() {
        let map = Mutex::new(HashMap::new());
        let a = CounterRef {
            key: "a".into(),
            max: 5,
            window: Duration::from_secs(10),
        };
        let b = CounterRef {
            key: "b".into(),
            max: 2,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let both = [a, b];
        let o = memory_check(&map, &both, 2, t0).unwrap();
        assert!(o.admitted);
        assert_eq!(o.states[0].used, 2);
        let o = memory_check(&map, &both, 1, t0).unwrap();
        assert!(!o.admitted, "b is full");
        assert_eq!(o.states[0].used, 2, "a was not taken from");
        let o = memory_check(&map, &both, 1, t0 + Duration::from_secs(11)).unwrap();
        assert!(o.admitted, "a new window");
        assert_eq!(o.states[1].used, 1);
    }

    #[test]
    fn script_answers_are_checked() {
        let c = [CounterRef {
            key: "a".into(),
            max: 5,
            window: Duration::from_secs(10),
        }];
        assert!(outcome(&[1, 3], &c).is_err());
        let o = outcome(&[1, 3, -2], &c).unwrap();
        assert_eq!(o.states[0].resets_in, Duration::from_secs(10));
    }
}
