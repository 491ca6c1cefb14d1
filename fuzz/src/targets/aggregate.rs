//! The aggregate filter's parsers: call path templates (parsed from configuration, rendered
//! with values from the client and from backends' answers), field paths, JSON pointers, the
//! shaping and merging of answers, and the merged Cache-Control and Vary.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};
use tollgate_aggregate::config::MergeMode;
use tollgate_aggregate::shape::{
    allow_fields, deep_merge, deny_fields, merge_into, merged_cache_control, merged_vary, rename,
    FieldPath,
};
use tollgate_aggregate::template::{lookup, Inputs, PathTemplate, Var};
use tollgate_common::RouteParams;

use crate::gen::{json as random_json, text};

const TEMPLATE_TOKENS: &[&str] = &[
    "/",
    "{",
    "}",
    "{user}",
    "{id}",
    "{*rest}",
    "{query.q}",
    "{query.q.x}",
    "{consumer}",
    "{identity.x-tollgate-plan}",
    "{identity.X-Org}",
    "{user.company_id}",
    "{orders.items.0.id}",
    "{a..b}",
    "{.}",
    "?",
    "&",
    "=",
    "#",
    ".",
    "..",
    "users",
    "%2e",
];
const VALUE_TOKENS: &[&str] = &[
    ".", "..", "%2e", "%2E%2e", "/", "a/b", "a/../b", "", " ", "?", "&", "=", "#", "%", "é", "%2F",
];
const KEYS: &[&str] = &[
    "company_id",
    "items",
    "0",
    "id",
    "user",
    "orders",
    "name",
    "email",
    "q",
    "x-tollgate-plan",
];

fn segments_that_climb(path: &str) -> usize {
    path.split('/').filter(|s| *s == "." || *s == "..").count()
}

/// A template parsed and rendered with values from the request and the answers. The bytes
/// are used twice: as a template (rendered with fixed, hostile values), and to build a
/// template and its values from tokens.
pub fn template(data: &[u8]) {
    if let Ok(t) = std::str::from_utf8(data) {
        if let Ok(parsed) = PathTemplate::parse(t) {
            let params = RouteParams(vec![
                ("user".into(), "..".into()),
                ("id".into(), String::new()),
                ("rest".into(), "a/./b/".into()),
            ]);
            let identity = vec![("x-tollgate-plan".to_string(), ".".to_string())];
            let user = serde_json::json!({"company_id": "", "dot": ".", "items": [{"id": "x/y"}]});
            let answer = |n: &str| (n == "user").then_some(&user);
            let inputs = Inputs {
                params: &params,
                query: "q=&a=..&b=%2e",
                consumer: Some(""),
                identity: &identity,
                answer: &answer,
            };
            check_render(t, &parsed, &inputs);
        }
    }
    let mut u = Unstructured::new(data);
    let _ = check_template(&mut u);
}

fn check_template(u: &mut Unstructured<'_>) -> Result<()> {
    let t = if u.ratio(3, 4)? {
        format!("/{}", text(u, TEMPLATE_TOKENS, 10)?)
    } else {
        text(u, TEMPLATE_TOKENS, 10)?
    };
    let parsed = match PathTemplate::parse(&t) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.is_empty());
            return Ok(());
        }
    };
    let mut params = Vec::new();
    let mut identity = Vec::new();
    for v in parsed.vars() {
        match v {
            Var::Route(n) if u.ratio(4, 5)? => params.push((n.clone(), text(u, VALUE_TOKENS, 3)?)),
            Var::Identity(h) if u.ratio(4, 5)? => {
                identity.push((h.clone(), text(u, VALUE_TOKENS, 3)?))
            }
            _ => {}
        }
    }
    let params = RouteParams(params);
    let query = text(u, &["q=", "&", "%2e%2e", "..", "q=.", "q"], 6)?;
    let consumer = if u.arbitrary()? {
        Some(text(u, VALUE_TOKENS, 3)?)
    } else {
        None
    };
    let user = random_json(u, 3, KEYS, VALUE_TOKENS)?;
    let orders = random_json(u, 3, KEYS, VALUE_TOKENS)?;
    let answer = |n: &str| match n {
        "user" => Some(&user),
        "orders" => Some(&orders),
        _ => None,
    };
    let inputs = Inputs {
        params: &params,
        query: &query,
        consumer: consumer.as_deref(),
        identity: &identity,
        answer: &answer,
    };
    check_render(&t, &parsed, &inputs);
    Ok(())
}

/// A rendering adds no structure: values add no `?`, `&`, `#` or `=`, and no `.` or `..`
/// segment that the template does not have itself.
fn check_render(t: &str, parsed: &PathTemplate, inputs: &Inputs<'_>) {
    assert!(t.starts_with('/'));
    let Ok(out) = parsed.render(inputs) else {
        return;
    };
    for c in ['?', '&', '#', '='] {
        assert_eq!(
            out.matches(c).count(),
            t.matches(c).count(),
            "`{c}` from a value: {t:?} rendered {out:?}"
        );
    }
    let (out_path, t_path) = (
        out.split('?').next().unwrap_or_default(),
        t.split('?').next().unwrap_or_default(),
    );
    let literal_dots = t_path
        .split('/')
        .filter(|s| (*s == "." || *s == "..") && !s.contains('{'))
        .count();
    assert!(
        segments_that_climb(out_path) <= literal_dots,
        "{t:?} rendered {out:?} with {:?} {:?} consumer {:?} query {:?}",
        inputs.params,
        inputs.identity,
        inputs.consumer,
        inputs.query
    );
    assert!(out.starts_with('/'));
}

fn subset(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .all(|(k, v)| y.get(k).is_some_and(|w| subset(v, w))),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| subset(v, w))
        }
        _ => a == b,
    }
}

fn present(v: &Value, path: &[String]) -> bool {
    match (v, path) {
        (_, []) => true,
        (Value::Array(items), _) => items.iter().any(|x| present(x, path)),
        (Value::Object(m), [first, rest @ ..]) => m.get(first).is_some_and(|x| present(x, rest)),
        _ => false,
    }
}

/// Field paths, allow and deny lists, renames, merges and JSON pointers on arbitrary JSON;
/// the merged Cache-Control and Vary of arbitrary parts.
/// The bytes are used twice: as a backend's Cache-Control (or, when JSON, its answer), and to
/// build values, paths and headers.
pub fn shape(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        for (complete, personal) in [(true, false), (true, true)] {
            check_merged(&[Some(text), Some("max-age=60")], complete, personal);
        }
        let _ = merged_vary([Some(text)], ["x-client"]);
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            let _ = v.pointer("/items/0");
            let paths = [FieldPath(vec!["items".into(), "id".into()])];
            assert!(subset(&allow_fields(v.clone(), &paths), &v));
            assert!(subset(&deny_fields(v.clone(), &paths), &v));
        }
    }
    let mut u = Unstructured::new(data);
    let _ = check_shape(&mut u);
}

fn check_shape(u: &mut Unstructured<'_>) -> Result<()> {
    let v = random_json(u, 4, KEYS, VALUE_TOKENS)?;
    let mut paths = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        if let Ok(p) = FieldPath::parse(&text(u, &["id", "items", ".", "name", "0"], 4)?) {
            assert!(!p.0.is_empty() && p.0.iter().all(|s| !s.is_empty()));
            paths.push(p);
        }
    }
    let allowed = allow_fields(v.clone(), &paths);
    assert!(
        subset(&allowed, &v),
        "allow added something: {v} -> {allowed}"
    );
    let denied = deny_fields(v.clone(), &paths);
    assert!(subset(&denied, &v), "deny added something: {v} -> {denied}");
    for p in &paths {
        assert!(
            !present(&denied, &p.0) || p.0.is_empty(),
            "{p:?} still in {denied}"
        );
    }
    let mut renamed = v.clone();
    let renames = vec![
        (text(u, KEYS, 1)?, text(u, KEYS, 1)?),
        (text(u, KEYS, 1)?, text(u, KEYS, 1)?),
    ];
    rename(&mut renamed, &renames);
    let other = random_json(u, 3, KEYS, VALUE_TOKENS)?;
    let mut merged = v.clone();
    deep_merge(&mut merged, other.clone());
    if !other.is_object() {
        assert_eq!(merged, other);
    } else if let Value::Object(m) = &other {
        for k in m.keys() {
            assert!(merged.get(k).is_some(), "deep merge lost `{k}`");
        }
    }
    let mode = *u.choose(&[
        MergeMode::Key,
        MergeMode::Append,
        MergeMode::Root,
        MergeMode::Deep,
    ])?;
    let mut out = v.as_object().cloned().unwrap_or_else(Map::new);
    let value = if u.arbitrary()? {
        Some(other.clone())
    } else {
        None
    };
    let r = merge_into(&mut out, mode, "k", value.clone());
    match (mode, &value) {
        (MergeMode::Root | MergeMode::Deep, Some(x)) if !x.is_object() => assert!(r.is_err()),
        (MergeMode::Key, _) => assert_eq!(out.get("k"), Some(&value.unwrap_or(Value::Null))),
        _ => assert!(r.is_ok()),
    }
    let pointer = text(u, &["/", "items", "0", "~0", "~1", "~", "-", "/0"], 6)?;
    let _ = v.pointer(&pointer);
    let dotted: Vec<String> = text(u, KEYS, 3)?.split('.').map(str::to_string).collect();
    let _ = lookup(&v, &dotted);
    check_cache_control(u)
}

const CC_TOKENS: &[&str] = &[
    "max-age=60",
    "max-age=0",
    "s-maxage=10",
    "s-maxage",
    "max-age=\"5\"",
    "no-store",
    "NO-STORE",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "max-age=18446744073709551616",
    "max-age=-1",
    ",",
    ", ",
    "=",
    "\"",
    "stale-while-revalidate=5",
];

fn max_ages(cc: &str) -> Vec<u64> {
    cc.split(',')
        .filter_map(|d| {
            let d = d.trim().to_ascii_lowercase();
            let (n, v) = d.split_once('=')?;
            (n.trim() == "max-age")
                .then(|| v.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .collect()
}

/// The merged Cache-Control: `no-store` when any part says so (or is missing, or the answer
/// is incomplete), `private` for a personal answer, a max-age no larger than any part's.
fn check_merged(parts: &[Option<&str>], complete: bool, personal: bool) {
    let cc = merged_cache_control(parts, complete, personal);
    assert!(!cc.chars().any(char::is_control), "{cc:?}");
    let no_store = !complete
        || parts.is_empty()
        || parts.iter().any(|p| {
            p.is_none_or(|p| {
                p.split(',').any(|d| {
                    let name = d.split('=').next().unwrap_or_default();
                    name.trim().eq_ignore_ascii_case("no-store")
                })
            })
        });
    if no_store {
        assert_eq!(cc, "no-store", "{parts:?}");
    } else {
        assert_ne!(cc, "no-store", "{parts:?}");
    }
    if personal && cc != "no-store" {
        assert!(cc.starts_with("private"), "{cc:?}");
    }
    if let Some(merged) = max_ages(&cc).first() {
        for p in parts.iter().flatten() {
            for a in max_ages(p) {
                assert!(*merged <= a, "{cc:?} from {parts:?}");
            }
        }
    }
}

fn check_cache_control(u: &mut Unstructured<'_>) -> Result<()> {
    let mut owned = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        owned.push(if u.ratio(1, 8)? {
            None
        } else {
            Some(text(u, CC_TOKENS, 5)?)
        });
    }
    let parts: Vec<Option<&str>> = owned.iter().map(Option::as_deref).collect();
    let (complete, personal) = (u.arbitrary()?, u.arbitrary()?);
    check_merged(&parts, complete, personal);
    let vary: Vec<String> = (0..u.int_in_range(0..=3)?)
        .map(|_| text(u, &["Accept", "*", ",", " ", "X-Client", ""], 4))
        .collect::<Result<_>>()?;
    let merged = merged_vary(vary.iter().map(|s| Some(s.as_str())), ["x-client"]);
    if let Some(m) = merged {
        assert!(
            m == "*"
                || m.split(", ")
                    .all(|n| !n.is_empty() && n == n.to_ascii_lowercase())
        );
    }
    Ok(())
}
