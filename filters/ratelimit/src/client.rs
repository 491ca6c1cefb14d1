//! Client keys: the values of a limit's key sources for one request.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};

use tollgate_common::request::query_param;
use tollgate_common::route::RequestInfo;
use tollgate_common::{Host, MapKind};

use crate::config::{Compiled, KeySource, Limit, MissingKey};
use crate::table::hash_parts;

/// What a request says about its client, read once per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    /// Consumer identity (non-empty), from the consumer header; `<source>:<id>` when the
    /// identity source header is configured and present.
    pub consumer: Option<String>,
    /// Plan (non-empty), from the plan header.
    pub plan: Option<String>,
}

impl Client {
    /// Read the consumer and plan headers.
    pub fn read(host: &dyn Host, config: &Compiled) -> Client {
        let get = |name: &str| {
            host.header(MapKind::RequestHeaders, name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let source = config.source_header.as_deref().and_then(get);
        let consumer = get(&config.consumer_header).map(|c| match source {
            Some(s) => format!("{s}:{c}"),
            None => c,
        });
        Client {
            consumer,
            plan: get(&config.plan_header),
        }
    }
}

/// A client key of one limit: its hash, and a label safe to log (no credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// Hash of the key's parts (seeded with the limit's name).
    pub hash: u64,
    /// `consumer=alice ip=10.0.0.1 api_key=#1a2b3c4d`: secrets appear only as a short hash.
    pub label: String,
}

/// The IP address without the port, from `ip:port`, `[v6]:port` or a bare address.
pub fn strip_port(addr: &str) -> &str {
    let a = addr.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.split_once(':') {
        Some((ip, port)) if !port.contains(':') => ip,
        _ => a,
    }
}

/// The key form of an address: IPv4 as is (also when written IPv4-mapped, `::ffff:a.b.c.d`),
/// IPv6 cut to its first `ipv6_prefix` bits (`2001:db8:1:2::/64`), as one client usually
/// holds a whole /64. Text that is not an address is kept as written.
pub fn normalize_ip(ip: &str, ipv6_prefix: u8) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None if ipv6_prefix >= 128 => v6.to_string(),
            None => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(ipv6_prefix))
                    .unwrap_or(0);
                format!("{}/{ipv6_prefix}", Ipv6Addr::from(bits & mask))
            }
        },
        Err(_) => ip.to_string(),
    }
}

/// The client IP: with `trusted_hops` N > 0, the Nth `x-forwarded-for` entry from the right
/// (the address the outermost trusted proxy saw; entries to its left may be forged); else,
/// or when the header has fewer than N entries, the downstream address. Normalized with
/// [`normalize_ip`].
pub fn client_ip(host: &dyn Host, trusted_hops: u32, ipv6_prefix: u8) -> Option<String> {
    raw_client_ip(host, trusted_hops).map(|ip| normalize_ip(&ip, ipv6_prefix))
}

fn raw_client_ip(host: &dyn Host, trusted_hops: u32) -> Option<String> {
    if trusted_hops > 0 {
        if let Some(xff) = host.header(MapKind::RequestHeaders, "x-forwarded-for") {
            // From the right: only the trusted entries are looked at, however long the header.
            let n = usize::try_from(trusted_hops).unwrap_or(usize::MAX);
            if let Some(ip) = xff
                .rsplit(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .nth(n.saturating_sub(1))
            {
                return Some(strip_port(ip).to_string());
            }
        }
    }
    let addr = host.property(&["source", "address"])?;
    let addr = String::from_utf8_lossy(&addr).into_owned();
    let ip = strip_port(&addr);
    (!ip.is_empty()).then(|| ip.to_string())
}

/// Longest value shown in a label (a log line), in characters.
const LABEL_VALUE_CHARS: usize = 64;

/// A value cut to [`LABEL_VALUE_CHARS`] for a label (`…` marks a cut).
fn clip(v: &str) -> String {
    match v.char_indices().nth(LABEL_VALUE_CHARS) {
        Some((at, _)) => format!("{}…", v.get(..at).unwrap_or("")),
        None => v.to_string(),
    }
}

fn short_hash(v: &str) -> String {
    format!("#{:08x}", hash_parts("label", [v.as_bytes()]) >> 32)
}

/// What a request's limit keys are built from, besides the host: read once per request.
#[derive(Debug, Clone, Copy)]
pub struct KeyContext<'a> {
    /// The compiled configuration (the API key header, trusted hops, IPv6 prefix).
    pub config: &'a Compiled,
    /// Consumer and plan.
    pub client: &'a Client,
    /// Method, host, path, query.
    pub req: &'a RequestInfo,
    /// The matched route's name (the `route` key source).
    pub route_name: &'a str,
}

impl<'a> KeyContext<'a> {
    /// The context of a request's keys.
    pub fn new(
        config: &'a Compiled,
        client: &'a Client,
        req: &'a RequestInfo,
        route_name: &'a str,
    ) -> Self {
        KeyContext {
            config,
            client,
            req,
            route_name,
        }
    }
}

/// What one limit's key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec<'a> {
    /// The limit's name: the seed of the key's hash.
    pub name: &'a str,
    /// Its key sources, in order.
    pub sources: &'a [KeySource],
    /// What a missing source does.
    pub missing: MissingKey,
}

impl<'a> From<&'a Limit> for KeySpec<'a> {
    fn from(limit: &'a Limit) -> Self {
        KeySpec {
            name: &limit.name,
            sources: &limit.key,
            missing: limit.missing_key,
        }
    }
}

/// The value of each key source of a limit (name, value, secret); `None` when a source is
/// missing and the limit skips such requests. Values already in the context (consumer, plan,
/// route) are borrowed, not copied.
pub(crate) fn values<'s, 'c>(
    host: &dyn Host,
    ctx: &KeyContext<'c>,
    spec: KeySpec<'s>,
) -> Option<Values<'s, 'c>> {
    let config = ctx.config;
    let mut out = Vec::with_capacity(spec.sources.len());
    for source in spec.sources {
        let header = |name: &str| {
            host.header(MapKind::RequestHeaders, name)
                .filter(|v| !v.trim().is_empty())
                .map(Cow::Owned)
        };
        let (name, value, secret) = match source {
            KeySource::Consumer => (
                "consumer",
                ctx.client.consumer.as_deref().map(Cow::Borrowed),
                false,
            ),
            KeySource::Plan => ("plan", ctx.client.plan.as_deref().map(Cow::Borrowed), false),
            KeySource::ApiKey => ("api_key", header(&config.api_key_header), true),
            KeySource::ClientIp => (
                "ip",
                client_ip(host, config.trusted_hops, config.ipv6_prefix).map(Cow::Owned),
                false,
            ),
            KeySource::Route => ("route", Some(Cow::Borrowed(ctx.route_name)), false),
            KeySource::Header(h) => (h.as_str(), header(h), true),
            KeySource::Query(q) => (
                q.as_str(),
                query_param(&ctx.req.query, q)
                    .filter(|v| !v.is_empty())
                    .map(Cow::Owned),
                true,
            ),
        };
        let value = match (value, spec.missing) {
            (Some(v), _) => v,
            (None, MissingKey::Shared) => Cow::Borrowed(""),
            (None, MissingKey::Skip) => return None,
        };
        out.push((name, value, secret));
    }
    Some(out)
}

/// A limit's key values for one request: (source name, value, secret), in the order of its
/// key sources.
pub(crate) type Values<'s, 'c> = Vec<(&'s str, Cow<'c, str>, bool)>;

/// The values alone, owned (a global limit's descriptor entries).
pub(crate) fn owned(values: Values<'_, '_>) -> Vec<String> {
    values.into_iter().map(|(_, v, _)| v.into_owned()).collect()
}

/// The hash of key values, seeded with the limit's name.
pub(crate) fn hash_values(name: &str, values: &[(&str, Cow<'_, str>, bool)]) -> u64 {
    hash_parts(name, values.iter().map(|(_, v, _)| v.as_bytes()))
}

/// The hash of a limit's key (what [`build`] computes, without the label): the per-request
/// path, which needs the label only to log a warning.
pub fn hash(host: &dyn Host, ctx: &KeyContext<'_>, spec: KeySpec<'_>) -> Option<u64> {
    let values = values(host, ctx, spec)?;
    Some(hash_values(spec.name, &values))
}

/// Build the key of a limit from its sources; `None` when a source is missing and the limit
/// skips such requests.
pub fn build(host: &dyn Host, ctx: &KeyContext<'_>, spec: KeySpec<'_>) -> Option<ClientKey> {
    let values = values(host, ctx, spec)?;
    let label: Vec<String> = values
        .iter()
        .map(|(name, value, secret)| {
            if *secret {
                format!("{name}={}", short_hash(value))
            } else {
                format!("{name}={}", clip(value))
            }
        })
        .collect();
    Some(ClientKey {
        hash: hash_values(spec.name, &values),
        label: label.join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::mem_host::MemHost;

    #[test]
    fn ports_are_stripped() {
        for (addr, ip) in [
            ("10.0.0.1:5555", "10.0.0.1"),
            ("10.0.0.1", "10.0.0.1"),
            ("[::1]:80", "::1"),
            ("::1", "::1"),
            (" 2001:db8::2 ", "2001:db8::2"),
        ] {
            assert_eq!(strip_port(addr), ip, "{addr}");
        }
    }

    #[test]
    fn client_ip_trusts_only_the_configured_hops() {
        let cases: &[(u32, Option<&str>, &str)] = &[
            (0, Some("1.1.1.1"), "192.0.2.9"),
            (1, Some("6.6.6.6, 1.1.1.1"), "1.1.1.1"),
            (1, Some("1.1.1.1"), "1.1.1.1"),
            (2, Some("6.6.6.6, 1.1.1.1, 10.0.0.2"), "1.1.1.1"),
            (2, Some("1.1.1.1"), "192.0.2.9"),
            (1, None, "192.0.2.9"),
            (1, Some(" , "), "192.0.2.9"),
            (1, Some("[2001:db8::1]:443"), "2001:db8::1"),
        ];
        for (hops, xff, want) in cases {
            let headers: Vec<(&str, &str)> =
                xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
            let mut h = MemHost::request("GET", "/", &headers);
            h.set_property(&["source", "address"], "192.0.2.9:40000");
            assert_eq!(
                client_ip(&h, *hops, 128).as_deref(),
                Some(*want),
                "{hops} {xff:?}"
            );
        }
        assert_eq!(client_ip(&MemHost::request("GET", "/", &[]), 0, 64), None);
    }

    #[test]
    fn addresses_are_normalized() {
        for (ip, prefix, want) in [
            ("10.0.0.1", 64, "10.0.0.1"),
            ("::ffff:10.0.0.1", 64, "10.0.0.1"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
            ("2001:db8::1", 128, "2001:db8::1"),
            ("2001:db8::1", 0, "::/0"),
            ("not-an-ip", 64, "not-an-ip"),
        ] {
            assert_eq!(normalize_ip(ip, prefix), want, "{ip}/{prefix}");
        }
        let mut h = MemHost::request("GET", "/", &[]);
        h.set_property(&["source", "address"], "[2001:db8:5:6::99]:4444");
        assert_eq!(client_ip(&h, 0, 64).as_deref(), Some("2001:db8:5:6::/64"));
    }

    fn key_of(
        sources: &str,
        missing: MissingKey,
        headers: &[(&str, &str)],
        path: &str,
    ) -> Option<ClientKey> {
        let config = Compiled::parse(b"{}").unwrap();
        let sources: Vec<KeySource> = serde_json::from_str(sources).unwrap();
        let mut h = MemHost::request("GET", path, headers);
        h.set_property(&["source", "address"], "10.9.8.7:1234");
        let req = RequestInfo::from_host(&h);
        let client = Client::read(&h, &config);
        let ctx = KeyContext {
            config: &config,
            client: &client,
            req: &req,
            route_name: "api",
        };
        let spec = KeySpec {
            name: "lim",
            sources: &sources,
            missing,
        };
        let key = build(&h, &ctx, spec);
        let hashed = hash(&h, &ctx, spec);
        assert_eq!(
            key.as_ref().map(|k| k.hash),
            hashed,
            "hash() is build()'s hash"
        );
        key
    }

    #[test]
    fn labels_clip_long_values() {
        let long = "é".repeat(500);
        let k = key_of(
            r#"["consumer"]"#,
            MissingKey::Skip,
            &[("x-tollgate-consumer", &long)],
            "/",
        )
        .unwrap();
        assert_eq!(
            k.label,
            format!("consumer={}…", "é".repeat(LABEL_VALUE_CHARS))
        );
        let short = key_of(
            r#"["consumer"]"#,
            MissingKey::Skip,
            &[("x-tollgate-consumer", "alice")],
            "/",
        )
        .unwrap();
        assert_eq!(short.label, "consumer=alice");
    }

    #[test]
    fn keys_combine_sources_and_hide_secrets() {
        let k = key_of(
            r#"["consumer","plan","api_key","client_ip","route",{"header":"x-tenant"},{"query":"t"}]"#,
            MissingKey::Skip,
            &[
                ("x-tollgate-consumer", "alice"),
                ("x-tollgate-plan", "pro"),
                ("x-api-key", "s3cret-key"),
                ("x-tenant", "acme"),
            ],
            "/a?t=blue",
        )
        .unwrap();
        assert!(
            k.label.starts_with("consumer=alice plan=pro api_key=#"),
            "{}",
            k.label
        );
        assert!(
            k.label.contains("ip=10.9.8.7 route=api x-tenant=#"),
            "{}",
            k.label
        );
        assert!(
            !k.label.contains("s3cret") && !k.label.contains("acme") && !k.label.contains("blue")
        );
        let other = key_of(
            r#"["consumer"]"#,
            MissingKey::Skip,
            &[("x-tollgate-consumer", "bob")],
            "/",
        )
        .unwrap();
        let same = key_of(
            r#"["consumer"]"#,
            MissingKey::Skip,
            &[("x-tollgate-consumer", "bob")],
            "/x",
        )
        .unwrap();
        assert_eq!(other, same);
        assert_ne!(other.hash, k.hash);
        // parts are separated: ("ab","c") and ("a","bc") differ
        let a = key_of(
            r#"[{"header":"x-a"},{"header":"x-b"}]"#,
            MissingKey::Skip,
            &[("x-a", "ab"), ("x-b", "c")],
            "/",
        )
        .unwrap();
        let b = key_of(
            r#"[{"header":"x-a"},{"header":"x-b"}]"#,
            MissingKey::Skip,
            &[("x-a", "a"), ("x-b", "bc")],
            "/",
        )
        .unwrap();
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn missing_sources_skip_or_share() {
        assert_eq!(key_of(r#"["consumer"]"#, MissingKey::Skip, &[], "/"), None);
        assert_eq!(
            key_of(r#"[{"query":"t"}]"#, MissingKey::Skip, &[], "/?t="),
            None
        );
        let a = key_of(r#"["consumer"]"#, MissingKey::Shared, &[], "/").unwrap();
        let b = key_of(
            r#"["consumer"]"#,
            MissingKey::Shared,
            &[("x-tollgate-consumer", " ")],
            "/",
        )
        .unwrap();
        assert_eq!(a.hash, b.hash);
    }

    #[test]
    fn a_consumer_counts_with_its_identity_source() {
        // #15 finding 4: a JWT `sub` equal to an API key's consumer has counters of its own.
        let key = |headers: &[(&str, &str)]| {
            key_of(r#"["consumer"]"#, MissingKey::Skip, headers, "/").unwrap()
        };
        let api = key(&[
            ("x-tollgate-consumer", "acme"),
            ("x-tollgate-identity-source", "api_key"),
        ]);
        let jwt = key(&[
            ("x-tollgate-consumer", "acme"),
            ("x-tollgate-identity-source", "jwt:demo"),
        ]);
        assert_ne!(api.hash, jwt.hash);
        assert_eq!(api.label, "consumer=api_key:acme");
        assert_eq!(
            key(&[("x-tollgate-consumer", "acme")]).label,
            "consumer=acme"
        );
        let off = Compiled::parse(br#"{"identity_source_header":null}"#).unwrap();
        let h = MemHost::request(
            "GET",
            "/",
            &[
                ("x-tollgate-consumer", "acme"),
                ("x-tollgate-identity-source", "api_key"),
            ],
        );
        assert_eq!(Client::read(&h, &off).consumer.as_deref(), Some("acme"));
    }
}
