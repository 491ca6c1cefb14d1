//! The route matcher every filter uses for per-route rules: host, path (prefix, exact or
//! template such as `/api/users/{id}`) and methods. Istio attaches a plugin to a whole workload,
//! not to a route, so the filters select their own rules with this.

use serde::{Deserialize, Serialize};

use crate::host::Host;

/// The parts of a request that routes match on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Method, upper case (`GET`).
    pub method: String,
    /// Host, lower case, without the port.
    pub host: String,
    /// Path without the query string.
    pub path: String,
    /// Query string without `?` (may be empty).
    pub query: String,
}

impl RequestInfo {
    /// Build from explicit values (`path` may carry a query string).
    pub fn new(method: &str, authority: &str, path_and_query: &str) -> Self {
        RequestInfo::from_parts(
            method.to_string(),
            authority.to_string(),
            path_and_query.to_string(),
        )
    }
    /// [`RequestInfo::new`] from owned values, reusing their buffers (no copy: the case is
    /// changed in place, the port and the query cut off; only a query gets its own string).
    pub fn from_parts(method: String, authority: String, path_and_query: String) -> Self {
        let mut method = method;
        method.make_ascii_uppercase();
        let mut host = authority;
        let kept = strip_port(&host).len();
        host.truncate(kept);
        host.make_ascii_lowercase();
        let mut path = path_and_query;
        // `split_query`'s path is a prefix of its input.
        let (kept, query) = {
            let (p, q) = crate::request::split_query(&path);
            (p.len(), q.to_string())
        };
        path.truncate(kept);
        RequestInfo {
            method,
            host,
            path,
            query,
        }
    }
    /// Read method, authority and path from the request headers.
    pub fn from_host(host: &dyn Host) -> Self {
        RequestInfo::from_parts(host.method(), host.authority(), host.path())
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // IPv6 literal: keep up to the closing bracket.
        return authority
            .find(']')
            .and_then(|i| authority.get(..=i))
            .unwrap_or(authority);
    }
    match authority.rfind(':') {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
        _ => authority,
    }
}

/// Values of the `{name}` variables of a path template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteParams(pub Vec<(String, String)>);

impl RouteParams {
    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a route matches a request, as written in configuration:
/// `{"prefix": "/api/", "methods": ["GET"], "hosts": ["*.example.com"]}`.
/// At most one of `prefix`, `exact` and `template`; none matches every path.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    /// Host names (`api.example.com`), suffix wildcards (`*.example.com`) or `*`; empty: any.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Methods (`GET`, `POST`, ...); empty: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path prefix, compared byte for byte like Envoy's `prefix`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Exact path (without query).
    #[serde(default)]
    pub exact: Option<String>,
    /// Path template: literal segments, `{name}` for one segment, and a final `{*name}` for
    /// the rest of the path.
    #[serde(default)]
    pub template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(String),
    Rest(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPattern {
    Any,
    Prefix(String),
    Exact(String),
    Template(Vec<Segment>),
}

/// A compiled route match. Deserializes from [`RouteMatchConfig`] and refuses bad patterns
/// at configuration time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RouteMatchConfig")]
pub struct RouteMatch {
    hosts: Vec<HostPattern>,
    methods: Vec<String>,
    path: PathPattern,
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch {
            hosts: Vec::new(),
            methods: Vec::new(),
            path: PathPattern::Any,
        }
    }
}

impl TryFrom<RouteMatchConfig> for RouteMatch {
    type Error = String;

    fn try_from(c: RouteMatchConfig) -> Result<Self, String> {
        let set = [c.prefix.is_some(), c.exact.is_some(), c.template.is_some()];
        if set.iter().filter(|b| **b).count() > 1 {
            return Err("give at most one of `prefix`, `exact` and `template`".into());
        }
        let hosts = c
            .hosts
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                if h.is_empty() {
                    Err("`hosts` has an empty entry".to_string())
                } else if h == "*" {
                    Ok(HostPattern::Any)
                } else if let Some(rest) = h.strip_prefix('*') {
                    if !rest.starts_with('.') || rest.contains('*') {
                        Err(format!("host `{h}`: a wildcard must be `*` or `*.domain`"))
                    } else {
                        Ok(HostPattern::Suffix(rest.to_string()))
                    }
                } else if h.contains('*') {
                    Err(format!("host `{h}`: a wildcard must be `*` or `*.domain`"))
                } else {
                    Ok(HostPattern::Exact(h))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let methods = c
            .methods
            .iter()
            .map(|m| {
                let m = m.trim().to_ascii_uppercase();
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    Err(format!("method `{m}` is not a method name"))
                } else {
                    Ok(m)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = if let Some(p) = c.prefix {
            check_path("prefix", &p)?;
            PathPattern::Prefix(p)
        } else if let Some(p) = c.exact {
            check_path("exact", &p)?;
            PathPattern::Exact(p)
        } else if let Some(t) = c.template {
            PathPattern::Template(compile_template(&t)?)
        } else {
            PathPattern::Any
        };
        Ok(RouteMatch {
            hosts,
            methods,
            path,
        })
    }
}

fn check_path(field: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("`{field}` must start with `/` (got `{p}`)"));
    }
    if p.contains('?') {
        return Err(format!(
            "`{field}` must not contain a query string (got `{p}`)"
        ));
    }
    Ok(())
}

/// Compile a path template such as `/api/users/{id}/orders/{*rest}`.
fn compile_template(t: &str) -> Result<Vec<Segment>, String> {
    check_path("template", t)?;
    let mut segments = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let parts: Vec<&str> = t[1..].split('/').collect();
    let last = parts.len().saturating_sub(1);
    for (i, part) in parts.iter().enumerate() {
        let seg = if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let (rest, name) = match inner.strip_prefix('*') {
                Some(n) => (true, n),
                None => (false, inner),
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("template `{t}`: bad variable name `{inner}`"));
            }
            if names.iter().any(|n| n == name) {
                return Err(format!("template `{t}`: variable `{name}` appears twice"));
            }
            names.push(name.to_string());
            if rest {
                if i != last {
                    return Err(format!(
                        "template `{t}`: `{{*{name}}}` must be the last segment"
                    ));
                }
                Segment::Rest(name.to_string())
            } else {
                Segment::Var(name.to_string())
            }
        } else if part.contains('{') || part.contains('}') {
            return Err(format!(
                "template `{t}`: a variable must be a whole segment, like `/users/{{id}}`"
            ));
        } else {
            Segment::Literal((*part).to_string())
        };
        segments.push(seg);
    }
    Ok(segments)
}

impl RouteMatch {
    /// A match for any request.
    pub fn any() -> Self {
        RouteMatch::default()
    }

    /// Does the request match? Returns the template variables when it does.
    pub fn matches(&self, req: &RequestInfo) -> Option<RouteParams> {
        if !self.methods.is_empty() && !self.methods.contains(&req.method) {
            return None;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| host_matches(h, &req.host)) {
            return None;
        }
        match &self.path {
            PathPattern::Any => Some(RouteParams::default()),
            PathPattern::Prefix(p) => req.path.starts_with(p.as_str()).then(RouteParams::default),
            PathPattern::Exact(p) => (req.path == *p).then(RouteParams::default),
            PathPattern::Template(segs) => match_template(segs, &req.path),
        }
    }

    /// It looks at the request's method (it lists methods): a filter whose routes never do
    /// need not read `:method`.
    pub fn uses_method(&self) -> bool {
        !self.methods.is_empty()
    }

    /// It looks at the request's host (it lists hosts): a filter whose routes never do need
    /// not read `:authority`.
    pub fn uses_host(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// The names of the template variables (empty for other path kinds).
    pub fn variables(&self) -> Vec<&str> {
        match &self.path {
            PathPattern::Template(segs) => segs
                .iter()
                .filter_map(|s| match s {
                    Segment::Var(n) | Segment::Rest(n) => Some(n.as_str()),
                    Segment::Literal(_) => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn host_matches(p: &HostPattern, host: &str) -> bool {
    match p {
        HostPattern::Any => true,
        HostPattern::Exact(h) => h == host,
        HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
    }
}

fn match_template(segs: &[Segment], path: &str) -> Option<RouteParams> {
    let rest_of = path.strip_prefix('/')?;
    let mut params = Vec::new();
    let mut remaining = rest_of;
    for (i, seg) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        if let Segment::Rest(name) = seg {
            params.push((name.clone(), remaining.to_string()));
            return Some(RouteParams(params));
        }
        let (part, tail) = match remaining.find('/') {
            Some(j) => (&remaining[..j], Some(&remaining[j + 1..])),
            None => (remaining, None),
        };
        match seg {
            Segment::Literal(l) if l == part => {}
            Segment::Var(name) if !part.is_empty() => params.push((name.clone(), part.to_string())),
            _ => return None,
        }
        match (tail, is_last) {
            (None, true) => return Some(RouteParams(params)),
            (None, false) => {
                // Path ended early: only a trailing catch-all may still match (empty).
                return match segs.get(i + 1) {
                    Some(Segment::Rest(name)) if i + 2 == segs.len() => {
                        params.push((name.clone(), String::new()));
                        Some(RouteParams(params))
                    }
                    _ => None,
                };
            }
            (Some(_), true) => return None,
            (Some(t), false) => remaining = t,
        }
    }
    None
}

/// A rule that applies to the requests its route matches.
pub trait Routed {
    /// The rule's route match.
    fn route(&self) -> &RouteMatch;
}

/// Per-route rules: the first rule whose route matches the request applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules<T>(pub Vec<T>);

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Rules(Vec::new())
    }
}

impl<T: Routed> Rules<T> {
    /// The first matching rule and its template variables.
    pub fn find(&self, req: &RequestInfo) -> Option<(&T, RouteParams)> {
        self.0
            .iter()
            .find_map(|r| r.route().matches(req).map(|p| (r, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rm(json: &str) -> Result<RouteMatch, String> {
        crate::config::parse::<RouteMatch>(json.as_bytes()).map_err(|e| e.reason)
    }

    fn req(method: &str, host: &str, path: &str) -> RequestInfo {
        RequestInfo::new(method, host, path)
    }

    #[test]
    fn from_parts_normalises_in_place() {
        for ((m, a, p), (method, host, path, query)) in [
            (
                ("get", "API.Example.com:8080", "/a/b?x=1&y=2#f"),
                ("GET", "api.example.com", "/a/b", "x=1&y=2"),
            ),
            (
                ("POST", "[::1]:443", "/a#frag"),
                ("POST", "[::1]", "/a", ""),
            ),
            (("Put", "[::1", "/a?"), ("PUT", "[::1", "/a", "")),
            (("GET", "host:abc", "/"), ("GET", "host:abc", "/", "")),
            (("", "", ""), ("", "", "", "")),
            (("GET", "h", "/p?q#f?g"), ("GET", "h", "/p", "q")),
        ] {
            let info = RequestInfo::from_parts(m.into(), a.into(), p.into());
            assert_eq!(
                (&*info.method, &*info.host, &*info.path, &*info.query),
                (method, host, path, query),
                "{m} {a} {p}"
            );
        }
    }

    #[test]
    fn what_a_match_looks_at() {
        for (json, method, host) in [
            (r#"{}"#, false, false),
            (r#"{"prefix":"/api/"}"#, false, false),
            (r#"{"methods":["GET"]}"#, true, false),
            (r#"{"hosts":["*.a.com"],"exact":"/x"}"#, false, true),
        ] {
            let m = rm(json).unwrap();
            assert_eq!((m.uses_method(), m.uses_host()), (method, host), "{json}");
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn table_of_matches() {
        let cases: &[(&str, &str, &str, &str, Option<&[(&str, &str)]>)] = &[
            (r#"{}"#, "GET", "a.com", "/x", Some(&[])),
            (
                r#"{"prefix":"/api/"}"#,
                "GET",
                "a.com",
                "/api/users",
                Some(&[]),
            ),
            (r#"{"prefix":"/api/"}"#, "GET", "a.com", "/apix", None),
            (
                r#"{"exact":"/health"}"#,
                "GET",
                "a.com",
                "/health?x=1",
                Some(&[]),
            ),
            (r#"{"exact":"/health"}"#, "GET", "a.com", "/health/", None),
            (
                r#"{"template":"/api/users/{id}"}"#,
                "GET",
                "a",
                "/api/users/42",
                Some(&[("id", "42")]),
            ),
            (
                r#"{"template":"/api/users/{id}"}"#,
                "GET",
                "a",
                "/api/users/42?q=1",
                Some(&[("id", "42")]),
            ),
            (
                r#"{"template":"/api/users/{id}"}"#,
                "GET",
                "a",
                "/api/users/",
                None,
            ),
            (
                r#"{"template":"/api/users/{id}"}"#,
                "GET",
                "a",
                "/api/users",
                None,
            ),
            (
                r#"{"template":"/api/users/{id}"}"#,
                "GET",
                "a",
                "/api/users/1/x",
                None,
            ),
            (
                r#"{"template":"/api/{svc}/{id}"}"#,
                "GET",
                "a",
                "/api/orders/7",
                Some(&[("svc", "orders"), ("id", "7")]),
            ),
            (
                r#"{"template":"/files/{*rest}"}"#,
                "GET",
                "a",
                "/files/a/b/c",
                Some(&[("rest", "a/b/c")]),
            ),
            (
                r#"{"template":"/files/{*rest}"}"#,
                "GET",
                "a",
                "/files",
                Some(&[("rest", "")]),
            ),
            (
                r#"{"template":"/files/{*rest}"}"#,
                "GET",
                "a",
                "/other/a",
                None,
            ),
            (r#"{"methods":["get","HEAD"]}"#, "HEAD", "a", "/", Some(&[])),
            (r#"{"methods":["GET"]}"#, "POST", "a", "/", None),
            (
                r#"{"hosts":["api.example.com"]}"#,
                "GET",
                "API.example.com:8080",
                "/",
                Some(&[]),
            ),
            (
                r#"{"hosts":["api.example.com"]}"#,
                "GET",
                "www.example.com",
                "/",
                None,
            ),
            (
                r#"{"hosts":["*.example.com"]}"#,
                "GET",
                "a.example.com",
                "/",
                Some(&[]),
            ),
            (
                r#"{"hosts":["*.example.com"]}"#,
                "GET",
                "example.com",
                "/",
                None,
            ),
            (r#"{"hosts":["*"]}"#, "GET", "anything", "/", Some(&[])),
            (
                r#"{"hosts":["[::1]"]}"#,
                "GET",
                "[::1]:10000",
                "/",
                Some(&[]),
            ),
        ];
        for (json, method, host, path, want) in cases {
            let m = rm(json).unwrap();
            let got = m.matches(&req(method, host, path));
            let want = want.map(|w| {
                RouteParams(
                    w.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            });
            assert_eq!(got, want, "{json} {method} {host} {path}");
        }
    }

    #[test]
    fn bad_patterns_are_refused_with_reasons() {
        let cases = [
            (r#"{"prefix":"/a","exact":"/a"}"#, "at most one"),
            (r#"{"prefix":"api"}"#, "must start with `/`"),
            (r#"{"exact":"/a?b=1"}"#, "query string"),
            (r#"{"template":"/a/{}"}"#, "bad variable name"),
            (r#"{"template":"/a/{id}/{id}"}"#, "appears twice"),
            (r#"{"template":"/a/{*rest}/b"}"#, "last segment"),
            (r#"{"template":"/a/x{id}"}"#, "whole segment"),
            (r#"{"hosts":["a.*.com"]}"#, "wildcard"),
            (r#"{"hosts":[""]}"#, "empty entry"),
            (r#"{"methods":["G E T"]}"#, "not a method"),
            (r#"{"path":"/a"}"#, "unknown field `path`"),
        ];
        for (json, reason) in cases {
            let e = rm(json).unwrap_err();
            assert!(e.contains(reason), "{json}: {e}");
        }
    }

    #[test]
    fn template_errors_carry_the_field_path() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Rule {
            #[serde(rename = "match")]
            route: RouteMatch,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct C {
            routes: Vec<Rule>,
        }
        let e =
            crate::config::parse::<C>(br#"{"routes":[{"match":{}},{"match":{"template":"/{x"}}]}"#)
                .unwrap_err();
        assert_eq!(e.field, "routes[1].match");
        assert!(e.reason.contains("whole segment"), "{}", e.reason);
    }

    #[test]
    fn rules_pick_the_first_match() {
        struct R(RouteMatch, &'static str);
        impl Routed for R {
            fn route(&self) -> &RouteMatch {
                &self.0
            }
        }
        let rules = Rules(vec![
            R(
                rm(r#"{"template":"/api/users/{id}","methods":["GET"]}"#).unwrap(),
                "user",
            ),
            R(rm(r#"{"prefix":"/api/"}"#).unwrap(), "api"),
        ]);
        let (r, p) = rules.find(&req("GET", "h", "/api/users/9")).unwrap();
        assert_eq!((r.1, p.get("id")), ("user", Some("9")));
        assert_eq!(
            rules.find(&req("POST", "h", "/api/users/9")).unwrap().0 .1,
            "api"
        );
        assert!(rules.find(&req("GET", "h", "/other")).is_none());
        assert_eq!(
            rm(r#"{"template":"/a/{x}/{*y}"}"#).unwrap().variables(),
            vec!["x", "y"]
        );
    }
}
