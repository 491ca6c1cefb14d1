//! Configuration of the cache filter: serde structs as written, then [`Config::compile`] into
//! the immutable [`Compiled`] form the filter runs on.

use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tollgate_common::config::{ByteSize, ConfigDuration, HeaderName, Sha256Hex};
use tollgate_common::route::{RouteMatch, Routed, Rules};
use tollgate_common::ConfigError;

/// Default bound of the shared-data memory the cache may hold (bodies, headers and metadata).
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 16 << 20;
/// Default bound of one stored entry.
pub const DEFAULT_MAX_ENTRY_BYTES: u64 = 256 << 10;
/// Default bound of each worker's copies of entries (`store::LocalCopies`).
pub const DEFAULT_WORKER_COPY_BYTES: u64 = 1 << 20;
/// Entries per set (set-associative layout, see `store.rs`).
pub const DEFAULT_WAYS: u32 = 4;

/// The filter's configuration (JSON in Envoy's `configuration` field).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Per-route rules; the first match applies. Requests no rule matches pass untouched.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Upper bound of the bytes stored in shared data (all entries together).
    #[serde(default)]
    pub max_total_bytes: Option<ByteSize>,
    /// Upper bound of one entry (body, headers and metadata); larger responses stream through.
    #[serde(default)]
    pub max_entry_bytes: Option<ByteSize>,
    /// Entries per set of the set-associative store (1 to 16).
    #[serde(default)]
    pub ways: Option<u32>,
    /// Bound of the copies of entries each worker keeps (a hit on one reads no slot).
    #[serde(default)]
    pub worker_copy_bytes: Option<ByteSize>,
    /// The purge endpoint; absent: no purge endpoint.
    #[serde(default)]
    pub purge: Option<PurgeConfig>,
    /// Targeted cache-control fields this cache obeys, first valid one wins over
    /// `Cache-Control` and `Expires` (RFC 9213). Default `["cdn-cache-control"]`; `[]`: none.
    #[serde(default)]
    pub targeted_fields: Option<Vec<HeaderName>>,
    /// Remove the targeted fields from responses before the client (they are for this cache).
    #[serde(default)]
    pub strip_targeted_fields: bool,
}

/// The targeted field of RFC 9213 that every CDN cache obeys.
pub const CDN_CACHE_CONTROL: &str = "cdn-cache-control";

/// The purge endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeConfig {
    /// Path of the endpoint (exact, without query), for example `/_tollgate/cache/purge`.
    pub path: String,
    /// Hex SHA-256 of the key that callers send in `x-tollgate-purge-key`.
    pub key_sha256: Sha256Hex,
    /// Response header whose tags (separated by spaces or commas) a purge `?tag=` matches,
    /// e.g. `surrogate-key` or `cache-tag`; absent: no tag purge.
    #[serde(default)]
    pub tag_header: Option<HeaderName>,
    /// Failed purge attempts (missing or wrong key) counted per client IP (all workers); past
    /// `max_failures` within `window`, 429 before the key is hashed. Absent: off.
    #[serde(default)]
    pub failure_limit: Option<tollgate_common::throttle::FailureLimitConfig>,
}

/// How `Set-Cookie` responses are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetCookie {
    /// Never store a response that sets a cookie (default).
    #[default]
    Bypass,
    /// Store it without its `Set-Cookie` headers (the client that caused it still gets them).
    Strip,
}

/// A per-route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub route: RouteMatch,
    /// Pass these requests untouched (no lookup, no store, no `Cache-Status`).
    #[serde(default)]
    pub disabled: bool,
    /// What goes into the cache key besides method, scheme, host and path.
    #[serde(default)]
    pub key: KeyConfig,
    /// `Set-Cookie` handling.
    #[serde(default)]
    pub set_cookie: SetCookie,
    /// Serve a stale entry this long past its freshness when the origin fails, even when the
    /// response had no `stale-if-error` directive (a directive, when present, wins).
    #[serde(default)]
    pub stale_if_error: Option<ConfigDuration>,
    /// Request fields whose values are normalised before they select a `Vary` variant (case,
    /// whitespace, order of equal preference, `q=0` members dropped): `accept`,
    /// `accept-encoding`, `accept-language`.
    #[serde(default)]
    pub vary_normalise: Vec<HeaderName>,
    /// Where background refreshes (`stale-while-revalidate`) are sent. Absent: a stale entry
    /// inside its `stale-while-revalidate` window is revalidated synchronously instead.
    #[serde(default)]
    pub refresh: Option<RefreshConfig>,
}

/// The cache key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Only these query parameters take part (empty: all of them).
    #[serde(default)]
    pub query_include: Vec<String>,
    /// These query parameters never take part.
    #[serde(default)]
    pub query_exclude: Vec<String>,
    /// Compare query names and values case-insensitively.
    #[serde(default)]
    pub query_ignore_case: bool,
    /// Request headers whose values take part (lower-cased names).
    #[serde(default)]
    pub headers: Vec<HeaderName>,
}

/// The upstream of background refreshes: Envoy's router is not on a callout's path, so the
/// route's cluster and path rewrite are repeated here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshConfig {
    /// Envoy cluster that serves the route.
    pub cluster: String,
    /// Replace this path prefix (like the route's `prefix_rewrite`)...
    #[serde(default)]
    pub strip_prefix: String,
    /// ...with this one.
    #[serde(default)]
    pub add_prefix: String,
    /// Timeout of the refresh callout.
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
}

impl Routed for RouteConfig {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// A compiled route rule.
#[derive(Debug)]
pub struct Rule {
    /// Which requests it applies to.
    pub route: RouteMatch,
    /// Pass untouched.
    pub disabled: bool,
    /// Query parameters that take part (empty: all).
    pub query_include: Vec<String>,
    /// Query parameters that never take part.
    pub query_exclude: Vec<String>,
    /// Case-insensitive query.
    pub query_ignore_case: bool,
    /// Headers in the key (lower case).
    pub key_headers: Vec<String>,
    /// `Set-Cookie` handling.
    pub set_cookie: SetCookie,
    /// Default stale-if-error window.
    pub stale_if_error: Option<Duration>,
    /// Background refresh upstream.
    pub refresh: Option<Refresh>,
    /// Request fields normalised for `Vary` matching (lower case).
    pub vary_normalise: Vec<String>,
}

/// The fields whose values [`crate::key::normalise_accept`] may normalise.
pub const NORMALISABLE: &[&str] = &["accept", "accept-encoding", "accept-language"];

/// A compiled refresh upstream.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// Cluster.
    pub cluster: String,
    /// Prefix to strip.
    pub strip_prefix: String,
    /// Prefix to add.
    pub add_prefix: String,
    /// Callout timeout.
    pub timeout: Duration,
}

impl Routed for Rule {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// The compiled purge endpoint.
#[derive(Debug)]
pub struct Purge {
    /// Exact path.
    pub path: String,
    /// SHA-256 of the key.
    pub key_sha256: [u8; 32],
    /// Response header carrying the tags a tag purge matches (lower case).
    pub tag_header: Option<String>,
    /// Failed-attempt throttling.
    pub failure_limit: Option<tollgate_common::throttle::FailureLimit>,
}

impl Purge {
    /// Whether `key` is the configured key.
    pub fn key_matches(&self, key: &str) -> bool {
        let digest = Sha256::digest(key.as_bytes());
        // Compare every byte, so the time taken says nothing about where they differ.
        digest
            .iter()
            .zip(self.key_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The compiled configuration.
#[derive(Debug)]
pub struct Compiled {
    /// Per-route rules.
    pub rules: Rules<Rule>,
    /// Bound of one entry in bytes.
    pub max_entry_bytes: u64,
    /// Number of sets.
    pub sets: u32,
    /// Entries per set.
    pub ways: u32,
    /// Bound of each worker's copies of entries.
    pub worker_copy_bytes: u64,
    /// Purge endpoint.
    pub purge: Option<Purge>,
    /// Targeted cache-control fields, in precedence order (lower case).
    pub targeted: Vec<String>,
    /// Strip them before the client.
    pub strip_targeted: bool,
}

impl Default for Compiled {
    fn default() -> Self {
        Compiled {
            rules: Rules::default(),
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            sets: 1,
            ways: 1,
            worker_copy_bytes: 0,
            purge: None,
            targeted: vec![CDN_CACHE_CONTROL.to_string()],
            strip_targeted: false,
        }
    }
}

impl Compiled {
    /// Slots in the store.
    pub fn slots(&self) -> u64 {
        u64::from(self.sets) * u64::from(self.ways)
    }
    /// Upper bound of the bytes held in entry slots.
    pub fn bound_bytes(&self) -> u64 {
        self.slots() * self.max_entry_bytes
    }
}

impl Config {
    /// Parse and validate a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        tollgate_common::config::parse(bytes)
    }

    /// Validate and compile.
    pub fn compile(self) -> Result<Compiled, ConfigError> {
        let max_entry = self
            .max_entry_bytes
            .map_or(DEFAULT_MAX_ENTRY_BYTES, |b| b.0);
        let max_total = self
            .max_total_bytes
            .map_or(DEFAULT_MAX_TOTAL_BYTES, |b| b.0);
        let ways = self.ways.unwrap_or(DEFAULT_WAYS);
        if !(1..=16).contains(&ways) {
            return Err(ConfigError::new("ways", "must be between 1 and 16"));
        }
        if max_entry < 1024 {
            return Err(ConfigError::new(
                "max_entry_bytes",
                "must be at least 1024 (headers and metadata are stored with the body)",
            ));
        }
        if max_entry > 64 << 20 {
            return Err(ConfigError::new(
                "max_entry_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        let per_set = max_entry * u64::from(ways);
        if max_total < per_set {
            return Err(ConfigError::new(
                "max_total_bytes",
                format!("must hold at least one set: max_entry_bytes x ways = {per_set}"),
            ));
        }
        let sets = u32::try_from((max_total / per_set).min(65_536)).unwrap_or(65_536);
        let worker_copy_bytes = self
            .worker_copy_bytes
            .map_or(DEFAULT_WORKER_COPY_BYTES.min(max_total), |b| b.0);
        if worker_copy_bytes > max_total {
            return Err(ConfigError::new(
                "worker_copy_bytes",
                "must be at most max_total_bytes",
            ));
        }
        let purge = match self.purge {
            None => None,
            Some(p) => {
                if !p.path.starts_with('/') || p.path.contains('?') {
                    return Err(ConfigError::new(
                        "purge.path",
                        "must start with `/` and have no query string",
                    ));
                }
                let failure_limit = match &p.failure_limit {
                    Some(f) => Some(
                        tollgate_common::throttle::FailureLimit::compile(
                            "tollgate.cache.purge_failures.",
                            f,
                        )
                        .map_err(|e| e.within("purge.failure_limit"))?,
                    ),
                    None => None,
                };
                Some(Purge {
                    path: p.path,
                    key_sha256: p.key_sha256.0,
                    tag_header: p.tag_header.map(|h| h.as_str().to_string()),
                    failure_limit,
                })
            }
        };
        let targeted: Vec<String> = match self.targeted_fields {
            None => vec![CDN_CACHE_CONTROL.to_string()],
            Some(list) => list.iter().map(|h| h.as_str().to_string()).collect(),
        };
        for (i, t) in targeted.iter().enumerate() {
            if t == "cache-control" || t == "expires" {
                return Err(ConfigError::new(
                    format!("targeted_fields[{i}]"),
                    "a targeted field must not be `cache-control` or `expires`",
                ));
            }
        }
        let mut rules = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            rules.push(compile_rule(r).map_err(|e| e.within(&format!("routes[{i}]")))?);
        }
        Ok(Compiled {
            rules: Rules(rules),
            max_entry_bytes: max_entry,
            sets,
            ways,
            worker_copy_bytes,
            purge,
            targeted,
            strip_targeted: self.strip_targeted_fields,
        })
    }
}

fn compile_rule(r: RouteConfig) -> Result<Rule, ConfigError> {
    let mut key_headers = Vec::new();
    for (i, h) in r.key.headers.iter().enumerate() {
        let name = h.as_str().to_string();
        if name == "authorization" || name == "cookie" {
            return Err(ConfigError::new(
                format!("key.headers[{i}]"),
                format!("`{h}` would put a credential into the cache key"),
            ));
        }
        key_headers.push(name);
    }
    for (field, list) in [
        ("key.query_include", &r.key.query_include),
        ("key.query_exclude", &r.key.query_exclude),
    ] {
        if let Some(i) = list.iter().position(String::is_empty) {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                "a parameter name cannot be empty",
            ));
        }
    }
    let lower = |v: &Vec<String>| -> Vec<String> {
        if r.key.query_ignore_case {
            v.iter().map(|s| s.to_lowercase()).collect()
        } else {
            v.clone()
        }
    };
    let refresh = match r.refresh {
        None => None,
        Some(f) => {
            if f.cluster.is_empty() {
                return Err(ConfigError::new("refresh.cluster", "cannot be empty"));
            }
            if !f.strip_prefix.is_empty() && !f.strip_prefix.starts_with('/') {
                return Err(ConfigError::new(
                    "refresh.strip_prefix",
                    "must start with `/`",
                ));
            }
            if !f.add_prefix.is_empty() && !f.add_prefix.starts_with('/') {
                return Err(ConfigError::new(
                    "refresh.add_prefix",
                    "must start with `/`",
                ));
            }
            let timeout = f.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(5));
            if timeout.is_zero() || timeout > Duration::from_secs(300) {
                return Err(ConfigError::new(
                    "refresh.timeout",
                    "must be more than 0 and at most 5m",
                ));
            }
            Some(Refresh {
                cluster: f.cluster,
                strip_prefix: f.strip_prefix,
                add_prefix: f.add_prefix,
                timeout,
            })
        }
    };
    let mut vary_normalise = Vec::new();
    for (i, h) in r.vary_normalise.iter().enumerate() {
        if !NORMALISABLE.contains(&h.as_str()) {
            return Err(ConfigError::new(
                format!("vary_normalise[{i}]"),
                format!(
                    "`{h}` cannot be normalised: one of accept, accept-encoding, accept-language"
                ),
            ));
        }
        vary_normalise.push(h.as_str().to_string());
    }
    Ok(Rule {
        vary_normalise,
        query_include: lower(&r.key.query_include),
        query_exclude: lower(&r.key.query_exclude),
        route: r.route,
        disabled: r.disabled,
        query_ignore_case: r.key.query_ignore_case,
        key_headers,
        set_cookie: r.set_cookie,
        stale_if_error: r.stale_if_error.map(|d| d.0),
        refresh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(json: &str) -> Result<Compiled, ConfigError> {
        Config::parse(json.as_bytes())?.compile()
    }

    #[test]
    fn empty_configuration_is_valid() {
        let c = compile("{}").unwrap();
        assert!(c.rules.0.is_empty());
        assert!(c.purge.is_none());
        assert!(c.bound_bytes() <= DEFAULT_MAX_TOTAL_BYTES);
    }

    #[test]
    fn sizes_give_sets() {
        let c = compile(r#"{"max_total_bytes": 1048576, "max_entry_bytes": 65536, "ways": 4}"#)
            .unwrap();
        assert_eq!((c.sets, c.ways), (4, 4));
        assert_eq!(c.bound_bytes(), 1048576);
        assert_eq!(c.worker_copy_bytes, DEFAULT_WORKER_COPY_BYTES);
        let small = compile(r#"{"max_total_bytes": 65536, "max_entry_bytes": 16384}"#).unwrap();
        assert_eq!(small.worker_copy_bytes, 65536);
        let none = compile(r#"{"worker_copy_bytes": 0}"#).unwrap();
        assert_eq!(none.worker_copy_bytes, 0);
    }

    #[test]
    fn purge_key_is_compared_by_digest() {
        // sha256("secret")
        let c = compile(
            r#"{"purge":{"path":"/_purge","key_sha256":"2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"}}"#,
        )
        .unwrap();
        let p = c.purge.unwrap();
        assert!(p.key_matches("secret"));
        assert!(!p.key_matches("Secret"));
        assert!(!p.key_matches(""));
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let cases = [
            (r#"{"no_such_field":1}"#, "no_such_field"),
            (r#"{"ways":0}"#, "ways"),
            (r#"{"ways":17}"#, "ways"),
            (r#"{"max_entry_bytes":10}"#, "max_entry_bytes"),
            (r#"{"worker_copy_bytes":"32MiB"}"#, "worker_copy_bytes"),
            (
                r#"{"max_entry_bytes":65536,"max_total_bytes":1000,"ways":4}"#,
                "max_total_bytes",
            ),
            (
                r#"{"purge":{"path":"nope","key_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}"#,
                "purge.path",
            ),
            (
                r#"{"purge":{"path":"/p","key_sha256":"zz"}}"#,
                "purge.key_sha256",
            ),
            (r#"{"purge":{"path":"/p"}}"#, "purge"),
            (
                r#"{"routes":[{"key":{"headers":["ok","bad header"]}}]}"#,
                "routes[0].key.headers[1]",
            ),
            (
                r#"{"routes":[{},{"key":{"headers":["Authorization"]}}]}"#,
                "routes[1].key.headers[0]",
            ),
            (
                r#"{"routes":[{"key":{"query_exclude":[""]}}]}"#,
                "routes[0].key.query_exclude[0]",
            ),
            (
                r#"{"routes":[{"set_cookie":"keep"}]}"#,
                "routes[0].set_cookie",
            ),
            (
                r#"{"routes":[{"refresh":{"cluster":""}}]}"#,
                "routes[0].refresh.cluster",
            ),
            (
                r#"{"routes":[{"refresh":{"cluster":"c","strip_prefix":"x"}}]}"#,
                "routes[0].refresh.strip_prefix",
            ),
            (
                r#"{"routes":[{"stale_if_error":"soon"}]}"#,
                "routes[0].stale_if_error",
            ),
            (
                r#"{"routes":[{"match":{"prefix":"/a","exact":"/a"}}]}"#,
                "routes[0].match",
            ),
        ];
        for (json, field) in cases {
            let e = compile(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }
}
