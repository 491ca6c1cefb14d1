//! Cache keys: the URL part (scheme, host, path, normalised query) that selects a set and that
//! invalidation works on, and the variant part (configured key headers and the values of the
//! headers the response's `Vary` names).

use tollgate_common::request::{percent_encode, query_pairs, split_query};
use tollgate_common::{Host, MapKind};

use crate::config::Rule;

/// FNV-1a, 64 bits: stable across workers and builds (std's hasher is randomly seeded).
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // separator, so that ("ab","c") and ("a","bc") differ
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The request's URL identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlKey {
    /// Host (lower case, port kept).
    pub host: String,
    /// Path without the query.
    pub path: String,
    /// `scheme://host/path?normalised-query`.
    pub url: String,
    /// Hash of `url`.
    pub hash: u64,
}

/// Normalise a query: filter parameters, optionally lower-case, sort by name (stable), and
/// re-encode.
pub fn normalise_query(query: &str, rule: &Rule) -> String {
    let mut pairs: Vec<(String, String)> = query_pairs(query)
        .into_iter()
        .map(|(k, v)| {
            if rule.query_ignore_case {
                (k.to_lowercase(), v.to_lowercase())
            } else {
                (k, v)
            }
        })
        .filter(|(k, _)| rule.query_include.is_empty() || rule.query_include.contains(k))
        .filter(|(k, _)| !rule.query_exclude.contains(k))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The URL key of a path-with-query on a host.
pub fn url_key(scheme: &str, authority: &str, path_and_query: &str, rule: &Rule) -> UrlKey {
    let (path, query) = split_query(path_and_query);
    let host = authority.to_ascii_lowercase();
    // `scheme://host/path?query`, built without the formatting machinery (once per request).
    let q = if query.is_empty() {
        String::new()
    } else {
        normalise_query(query, rule)
    };
    let mut url = String::with_capacity(scheme.len() + 3 + host.len() + path.len() + 1 + q.len());
    url.push_str(scheme);
    url.make_ascii_lowercase();
    url.push_str("://");
    url.push_str(&host);
    url.push_str(path);
    if !q.is_empty() {
        url.push('?');
        url.push_str(&q);
    }
    let hash = fnv64(&[url.as_bytes()]);
    UrlKey {
        host,
        path: path.to_string(),
        url,
        hash,
    }
}

/// The URL key of a request from its header map (names lower case), read by the filter once:
/// the same values as [`request_url_key`] without a host call or a copy per header.
pub fn url_key_of(request: &[(String, String)], rule: &Rule) -> UrlKey {
    let get = |name: &str| {
        request
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let scheme = get(":scheme").unwrap_or("http");
    let authority = get(":authority").or_else(|| get("host")).unwrap_or("");
    url_key(scheme, authority, get(":path").unwrap_or(""), rule)
}

/// The URL key of the current request.
pub fn request_url_key(host: &dyn Host, rule: &Rule) -> UrlKey {
    let scheme = host
        .header(MapKind::RequestHeaders, ":scheme")
        .unwrap_or_else(|| "http".into());
    url_key(&scheme, &host.authority(), &host.path(), rule)
}

/// All values of a request header joined with `, ` (empty when absent).
pub fn header_values(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Normalise an `Accept`-like value for variant selection: members lower-cased and without
/// whitespace, `q=0` members dropped, ordered by preference (`q`, highest first) then name,
/// duplicates removed; `q` kept when below 1 (`fr;q=0.5`).
pub fn normalise_accept(value: &str) -> String {
    let mut items: Vec<(u16, String)> = Vec::new();
    for member in value.split(',') {
        let mut parts = member.split(';');
        let token: String = parts
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        if token.is_empty() {
            continue;
        }
        let mut q = 1000;
        let mut params = Vec::new();
        for p in parts {
            let p: String = p
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_lowercase();
            match p.strip_prefix("q=").map(qvalue) {
                Some(Some(v)) => q = v,
                _ if p.is_empty() => {}
                _ => params.push(p),
            }
        }
        if q == 0 {
            continue;
        }
        let item = if params.is_empty() {
            token
        } else {
            format!("{token};{}", params.join(";"))
        };
        items.push((q, item));
    }
    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    items.dedup_by(|a, b| a.1 == b.1);
    items
        .iter()
        .map(|(q, t)| match *q {
            1000 => t.clone(),
            q => format!("{t};q=0.{}", format!("{q:03}").trim_end_matches('0')),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A qvalue (RFC 9110 12.4.2) in thousandths; `None` when invalid.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Request headers with the values of the `normalise` fields normalised (several lines of a
/// field joined first), for variant selection.
pub fn normalise_request(request: &mut Vec<(String, String)>, normalise: &[String]) {
    for name in normalise {
        let joined = header_values(request, name);
        if request.iter().any(|(k, _)| k == name) {
            request.retain(|(k, _)| k != name);
            request.push((name.clone(), normalise_accept(&joined)));
        }
    }
}

/// The header names a `Vary` value lists, lower case, sorted, deduplicated; `None` for `*`.
pub fn vary_names(vary: &[&str]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for v in vary {
        for n in v.split(',') {
            let n = n.trim().to_ascii_lowercase();
            if n == "*" {
                return None;
            }
            if !n.is_empty() && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort();
    Some(names)
}

/// The variant hash: configured key headers, then each varying header's name and value.
pub fn variant_hash(request: &[(String, String)], key_headers: &[String], vary: &[String]) -> u64 {
    let mut parts: Vec<String> = Vec::new();
    for h in key_headers {
        parts.push(format!("k:{h}={}", header_values(request, h)));
    }
    for h in vary {
        parts.push(format!("v:{h}={}", header_values(request, h)));
    }
    let refs: Vec<&[u8]> = parts.iter().map(|s| s.as_bytes()).collect();
    fnv64(&refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rule(json: &str) -> Rule {
        let c = Config::parse(format!(r#"{{"routes":[{json}]}}"#).as_bytes())
            .unwrap()
            .compile()
            .unwrap();
        c.rules.0.into_iter().next().unwrap()
    }

    #[test]
    fn query_normalisation_table() {
        let cases = [
            (r#"{}"#, "b=2&a=1", "a=1&b=2"),
            (r#"{}"#, "a=%41&a=b", "a=A&a=b"),
            (r#"{}"#, "", ""),
            (r#"{"key":{"query_exclude":["utm"]}}"#, "utm=x&id=1", "id=1"),
            (
                r#"{"key":{"query_include":["id"]}}"#,
                "utm=x&id=1&z=2",
                "id=1",
            ),
            (r#"{"key":{"query_ignore_case":true}}"#, "ID=Ab", "id=ab"),
            (
                r#"{"key":{"query_ignore_case":true,"query_exclude":["UTM"]}}"#,
                "Utm=1&x=2",
                "x=2",
            ),
            (r#"{}"#, "q=a+b", "q=a%20b"),
        ];
        for (r, q, want) in cases {
            assert_eq!(normalise_query(q, &rule(r)), want, "{r} {q}");
        }
    }

    #[test]
    fn url_keys_ignore_parameter_order_and_host_case() {
        let r = rule("{}");
        let a = url_key("http", "Gateway.Test", "/p?b=1&a=2", &r);
        let b = url_key("http", "gateway.test", "/p?a=2&b=1", &r);
        assert_eq!(a, b);
        assert_eq!(a.url, "http://gateway.test/p?a=2&b=1");
        assert_ne!(
            a.hash,
            url_key("https", "gateway.test", "/p?a=2&b=1", &r).hash
        );
        assert_ne!(
            a.hash,
            url_key("http", "gateway.test", "/q?a=2&b=1", &r).hash
        );
    }

    #[test]
    fn accept_normalisation_table() {
        let cases = [
            ("en-US, fr;q=0.5", "en-us,fr;q=0.5"),
            ("FR;Q=0.5 ,  en-us", "en-us,fr;q=0.5"),
            ("gzip, br", "br,gzip"),
            ("br , GZIP", "br,gzip"),
            ("gzip;q=0, br", "br"),
            ("de;q=0.25, en;q=0.250, fr;q=1.0", "fr,de;q=0.25,en;q=0.25"),
            (
                "text/html;level=1, */*;q=0.1",
                "text/html;level=1,*/*;q=0.1",
            ),
            ("a, a, b;q=x", "a,b;q=x"),
            ("", ""),
            (" , ;q=1", ""),
        ];
        for (v, want) in cases {
            assert_eq!(normalise_accept(v), want, "{v:?}");
        }
        let mut req = vec![
            ("accept-language".to_string(), "FR;q=0.5".to_string()),
            ("x".to_string(), "1".to_string()),
            ("accept-language".to_string(), "en-US".to_string()),
        ];
        normalise_request(
            &mut req,
            &["accept-language".to_string(), "accept".to_string()],
        );
        assert_eq!(header_values(&req, "accept-language"), "en-us,fr;q=0.5");
        assert_eq!(req.len(), 2);
    }

    #[test]
    fn vary_lists_and_variants() {
        assert_eq!(
            vary_names(&["Accept-Language, accept", "ACCEPT"]),
            Some(vec!["accept".to_string(), "accept-language".to_string()])
        );
        assert_eq!(vary_names(&["accept, *"]), None);
        let req = |v: &str| vec![("accept-language".to_string(), v.to_string())];
        let vary = vec!["accept-language".to_string()];
        assert_eq!(
            variant_hash(&req("en"), &[], &vary),
            variant_hash(&req("en"), &[], &vary)
        );
        assert_ne!(
            variant_hash(&req("en"), &[], &vary),
            variant_hash(&req("fr"), &[], &vary)
        );
        assert_ne!(
            variant_hash(&req("en"), &["accept-language".into()], &[]),
            variant_hash(&req("en"), &[], &vary)
        );
    }
}
