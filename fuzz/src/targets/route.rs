//! The route matcher: compiling arbitrary route configurations, and matching arbitrary
//! methods, hosts and paths against compiled routes.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::Value;
use tollgate_common::route::{RequestInfo, RouteMatchConfig, Routed};
use tollgate_common::{RouteMatch, Rules};

use crate::gen::{near, text};

const PATH_TOKENS: &[&str] = &[
    "/api/", "/api", "users", "{id}", "{*rest}", "{*", "{}", "{a-b}", "{a.b}", "/{x}", "/{*x}",
    "orders", "?q=1", "%2F", "..", "//",
];
const HOST_TOKENS: &[&str] = &[
    "*",
    "*.",
    ".example.com",
    "example.com",
    "API",
    ":443",
    "[::1]",
    "]",
    "[",
    "*.*",
    "localhost",
];
const METHOD_TOKENS: &[&str] = &[
    "GET", "get", "POST", "Head", "DELETE", "PATCH", "G E T", "ÄÖ",
];

fn route_config(u: &mut Unstructured<'_>) -> Result<RouteMatchConfig> {
    let mut c = RouteMatchConfig::default();
    for _ in 0..u.int_in_range(0..=2)? {
        c.hosts.push(text(u, HOST_TOKENS, 4)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        c.methods.push(text(u, METHOD_TOKENS, 2)?);
    }
    match u.int_in_range(0..=4u8)? {
        0 => {}
        1 => c.prefix = Some(text(u, PATH_TOKENS, 6)?),
        2 => c.exact = Some(text(u, PATH_TOKENS, 6)?),
        3 => c.template = Some(text(u, PATH_TOKENS, 8)?),
        _ => {
            c.prefix = u.arbitrary::<bool>()?.then(|| "/a".to_string());
            c.template = Some(format!("/{}", text(u, PATH_TOKENS, 6)?));
        }
    }
    Ok(c)
}

/// A request near the route: its own prefix, exact path or template filled in, or random.
fn request(u: &mut Unstructured<'_>, c: &RouteMatchConfig) -> Result<RequestInfo> {
    let method = match c.methods.first() {
        Some(m) if u.arbitrary()? => m.clone(),
        _ => text(u, METHOD_TOKENS, 2)?,
    };
    let host = match c.hosts.first() {
        Some(h) if u.arbitrary()? => near(u, &h.replace('*', "a"), HOST_TOKENS)?,
        _ => text(u, HOST_TOKENS, 4)?,
    };
    let base = c
        .prefix
        .clone()
        .or_else(|| c.exact.clone())
        .or_else(|| c.template.clone())
        .unwrap_or_default();
    let mut path = near(u, &base, PATH_TOKENS)?;
    if u.arbitrary()? {
        // Fill template variables with values (possibly empty, possibly with slashes).
        while let (Some(a), Some(b)) = (path.find('{'), path.find('}')) {
            if b < a {
                break;
            }
            let v = text(u, PATH_TOKENS, 3)?;
            path.replace_range(a..=b, &v);
        }
    }
    Ok(RequestInfo::new(&method, &host, &path))
}

/// What a template match must give back: the path rebuilt from the template's literal
/// segments and the variables' values.
fn rebuild(template: &str, params: &tollgate_common::RouteParams) -> Option<String> {
    let mut segs = Vec::new();
    for part in template.get(1..)?.split('/') {
        let seg = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(inner) => params.get(inner.trim_start_matches('*'))?.to_string(),
            None => part.to_string(),
        };
        segs.push(seg);
    }
    Some(format!("/{}", segs.join("/")))
}

struct Rule(RouteMatch);

impl Routed for Rule {
    fn route(&self) -> &RouteMatch {
        &self.0
    }
}

/// The route matches of the seed configurations, compiled.
fn seeded_routes() -> &'static [(RouteMatchConfig, RouteMatch)] {
    static CELL: OnceLock<Vec<(RouteMatchConfig, RouteMatch)>> = OnceLock::new();
    CELL.get_or_init(|| {
        fn collect(v: &Value, out: &mut Vec<Value>) {
            match v {
                Value::Object(m) => {
                    if let Some(x) = m.get("match") {
                        out.push(x.clone());
                    }
                    m.values().for_each(|x| collect(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        for s in crate::seeds::all() {
            if let Ok(v) = serde_json::from_str::<Value>(s) {
                collect(&v, &mut found);
            }
        }
        found
            .into_iter()
            .filter_map(|v| {
                let c: RouteMatchConfig = serde_json::from_value(v).ok()?;
                let m = RouteMatch::try_from(c.clone()).ok()?;
                Some((c, m))
            })
            .collect()
    })
}

/// Routes and requests. The bytes are used twice: as a request (`path`, or `path\nhost\nmethod`)
/// against every route of the seed configurations, and to build a random route and requests
/// near it.
pub fn route(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut lines = text.splitn(3, '\n');
        let path = lines.next().unwrap_or_default();
        let host = lines.next().unwrap_or("gateway.test");
        let method = lines.next().unwrap_or("GET");
        let req = RequestInfo::new(method, host, path);
        for (c, m) in seeded_routes() {
            check_match(c, m, &req);
        }
    }
    let mut u = Unstructured::new(data);
    let _ = check(&mut u);
}

fn check(u: &mut Unstructured<'_>) -> Result<()> {
    let c = route_config(u)?;
    let compiled = RouteMatch::try_from(c.clone());
    // The same configuration through serde (as every filter reads it) gives the same verdict.
    let json = serde_json::json!({
        "hosts": c.hosts, "methods": c.methods,
        "prefix": c.prefix, "exact": c.exact, "template": c.template,
    });
    let via_serde = serde_json::from_value::<RouteMatch>(json);
    assert_eq!(compiled.is_ok(), via_serde.is_ok(), "{c:?}");
    let m = match compiled {
        Ok(m) => m,
        Err(reason) => {
            assert!(!reason.is_empty(), "a refusal says why: {c:?}");
            return Ok(());
        }
    };
    for p in c.prefix.iter().chain(&c.exact).chain(&c.template) {
        assert!(p.starts_with('/') && !p.contains('?'), "accepted {p:?}");
    }
    for _ in 0..u.int_in_range(1..=8)? {
        let req = request(u, &c)?;
        check_match(&c, &m, &req);
    }
    Ok(())
}

/// What a match must agree with: the configuration it was compiled from.
fn check_match(c: &RouteMatchConfig, m: &RouteMatch, req: &RequestInfo) {
    let got = m.matches(req);
    let methods: Vec<String> = c
        .methods
        .iter()
        .map(|m| m.trim().to_ascii_uppercase())
        .collect();
    let method_ok = methods.is_empty() || methods.contains(&req.method);
    if !method_ok {
        assert!(got.is_none(), "{req:?} matched {c:?} with another method");
    }
    if let Some(p) = &c.prefix {
        let expect = method_ok && req.path.starts_with(p.as_str());
        if !expect {
            assert!(got.is_none(), "{req:?} matched prefix {p:?}");
        }
        if c.hosts.is_empty() {
            assert_eq!(got.is_some(), expect, "{req:?} against prefix {p:?}");
        }
    }
    if let Some(e) = &c.exact {
        if got.is_some() {
            assert_eq!(&req.path, e, "{req:?} matched exact {e:?}");
        }
    }
    if let (Some(t), Some(params)) = (&c.template, &got) {
        let names: Vec<&str> = params.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, m.variables(), "{req:?} against {t:?}");
        let rebuilt = rebuild(t, params).unwrap_or_default();
        // An empty `{*rest}` also matches the path without its last slash.
        let ok = rebuilt == req.path
            || (t.rsplit('/').next().is_some_and(|s| s.starts_with("{*"))
                && rebuilt == format!("{}/", req.path));
        assert!(
            ok,
            "{t:?} with {params:?} rebuilt {rebuilt:?}, not {:?}",
            req.path
        );
        for (k, v) in &params.0 {
            let is_rest = t.contains(&format!("{{*{k}}}"));
            if !is_rest {
                assert!(!v.is_empty() && !v.contains('/'), "{t:?}: {k}={v:?}");
            }
        }
    }
    if got.is_some() && !c.hosts.is_empty() {
        let host_ok = c.hosts.iter().any(|h| {
            let h = h.trim().to_ascii_lowercase();
            h == "*"
                || h == req.host
                || h.strip_prefix('*')
                    .is_some_and(|s| req.host.len() > s.len() && req.host.ends_with(s))
        });
        assert!(host_ok, "{req:?} matched hosts {:?}", c.hosts);
    }
    // Rules: the first matching rule wins.
    let never = RouteMatch::try_from(RouteMatchConfig {
        prefix: Some("/never/".into()),
        ..RouteMatchConfig::default()
    })
    .unwrap_or_default();
    let rules = Rules(vec![Rule(m.clone()), Rule(never)]);
    let found = rules.find(req).map(|(r, p)| (r.0.clone(), p));
    match (&got, found) {
        (Some(p), Some((r, q))) => assert!(r == *m && *p == q),
        (None, Some((r, _))) => assert!(r != *m, "{req:?}"),
        (Some(_), None) => unreachable!("a matching rule was not found: {req:?}"),
        (None, None) => {}
    }
}
