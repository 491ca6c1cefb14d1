//! Shaping and merging JSON answers: field paths for allow/deny lists, renames, the merge modes,
//! and the Cache-Control of a merged answer.

use serde_json::{Map, Value};

use crate::config::MergeMode;

/// A dotted field path (`user.address.city`); arrays on the way apply to each element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    /// Parse `a.b.c`.
    pub fn parse(s: &str) -> Result<FieldPath, String> {
        let parts: Vec<String> = s.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return Err(format!("`{s}`: a field path has no empty parts (`a.b.c`)"));
        }
        Ok(FieldPath(parts))
    }
}

/// Keep only the fields on the paths (and everything under them).
pub fn allow(v: &Value, paths: &[&[String]]) -> Value {
    if paths.is_empty() || paths.iter().any(|p| p.is_empty()) {
        return v.clone();
    }
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|x| allow(x, paths)).collect()),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                let subs: Vec<&[String]> = paths
                    .iter()
                    .filter(|p| p.first() == Some(k))
                    .map(|p| p.get(1..).unwrap_or(&[]))
                    .collect();
                if !subs.is_empty() {
                    out.insert(k.clone(), allow(x, &subs));
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Keep only the listed fields; an empty list keeps everything.
pub fn allow_fields(v: Value, list: &[FieldPath]) -> Value {
    if list.is_empty() {
        return v;
    }
    let paths: Vec<&[String]> = list.iter().map(|p| p.0.as_slice()).collect();
    allow(&v, &paths)
}

/// Remove the field on the path.
pub fn deny(v: &mut Value, path: &[String]) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|x| deny(x, path)),
        Value::Object(m) => match path {
            [] => {}
            [last] => {
                m.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(x) = m.get_mut(first) {
                    deny(x, rest);
                }
            }
        },
        _ => {}
    }
}

/// Remove the listed fields.
pub fn deny_fields(mut v: Value, list: &[FieldPath]) -> Value {
    for p in list {
        deny(&mut v, &p.0);
    }
    v
}

/// Rename top-level members of an object (arrays: of each element).
pub fn rename(v: &mut Value, renames: &[(String, String)]) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|x| rename(x, renames)),
        Value::Object(m) => {
            for (from, to) in renames {
                if let Some(x) = m.remove(from) {
                    m.insert(to.clone(), x);
                }
            }
        }
        _ => {}
    }
}

/// Deep merge: objects merge recursively, anything else replaces.
pub fn deep_merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, x) in b {
                match a.get_mut(&k) {
                    Some(existing) => deep_merge(existing, x),
                    None => {
                        a.insert(k, x);
                    }
                }
            }
        }
        (slot, x) => *slot = x,
    }
}

/// Put one call's (shaped) answer into the merged object. `None` is a failed call.
/// Returns an error text when the answer cannot be merged that way (root/deep need an object).
pub fn merge_into(
    out: &mut Map<String, Value>,
    mode: MergeMode,
    key: &str,
    value: Option<Value>,
) -> Result<(), String> {
    match (mode, value) {
        (MergeMode::Key, v) => {
            out.insert(key.to_string(), v.unwrap_or(Value::Null));
        }
        (MergeMode::Append, v) => {
            let slot = out
                .entry(key.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            if let (Value::Array(list), Some(v)) = (slot, v) {
                match v {
                    Value::Array(items) => list.extend(items),
                    other => list.push(other),
                }
            }
        }
        (MergeMode::Root | MergeMode::Deep, None) => {}
        (MergeMode::Root, Some(Value::Object(m))) => out.extend(m),
        (MergeMode::Deep, Some(Value::Object(m))) => {
            let mut root = Value::Object(std::mem::take(out));
            deep_merge(&mut root, Value::Object(m));
            if let Value::Object(m) = root {
                *out = m;
            }
        }
        (MergeMode::Root | MergeMode::Deep, Some(_)) => {
            return Err(
                "the answer is not a JSON object, so it cannot be merged at the root".into(),
            )
        }
    }
    Ok(())
}

/// The most restrictive Cache-Control of the parts. A part without Cache-Control, or any
/// incomplete answer, gives `no-store`. Shared caches get the smallest of each part's
/// `s-maxage` (else `max-age`) as `s-maxage` when it is below the merged `max-age`; any
/// `must-revalidate` is kept. A `personal` reply (built from the caller's identity) is at least
/// `private`.
pub fn merged_cache_control(parts: &[Option<&str>], complete: bool, personal: bool) -> String {
    if !complete || parts.is_empty() {
        return "no-store".into();
    }
    let mut private = personal;
    let mut no_cache = false;
    let mut must_revalidate = false;
    let mut max_age: Option<u64> = None;
    let mut shared_age: Option<u64> = None;
    let mut every_part_has_max_age = true;
    for part in parts {
        let Some(cc) = part else {
            return "no-store".into();
        };
        let mut this_max_age: Option<u64> = None;
        let mut this_s_maxage: Option<Option<u64>> = None;
        let mut seen_max_age = false;
        for d in cc.split(',') {
            let d = d.trim().to_ascii_lowercase();
            let (name, value) = match d.split_once('=') {
                Some((n, v)) => (
                    n.trim().to_string(),
                    Some(v.trim().trim_matches('"').to_string()),
                ),
                None => (d.clone(), None),
            };
            match name.as_str() {
                "no-store" => return "no-store".into(),
                "no-cache" => no_cache = true,
                "private" => private = true,
                // Repeated (RFC 9111 4.2.1: the first, or stale): the smallest; any
                // unreadable one: none.
                "max-age" => {
                    let v = value.and_then(|v| v.parse::<u64>().ok());
                    this_max_age = if seen_max_age {
                        this_max_age.zip(v).map(|(a, b)| a.min(b))
                    } else {
                        v
                    };
                    seen_max_age = true;
                }
                // An unreadable s-maxage: shared caches must not keep the part.
                "s-maxage" => {
                    let v = value.and_then(|v| v.parse::<u64>().ok());
                    this_s_maxage = Some(match this_s_maxage {
                        Some(prev) => prev.zip(v).map(|(a, b)| a.min(b)),
                        None => v,
                    });
                }
                "must-revalidate" | "proxy-revalidate" => must_revalidate = true,
                _ => {}
            }
        }
        match this_max_age {
            Some(a) => max_age = Some(max_age.map_or(a, |m| m.min(a))),
            None => every_part_has_max_age = false,
        }
        let this_shared = match this_s_maxage {
            Some(s) => s.unwrap_or(0),
            None => this_max_age.unwrap_or(0),
        };
        shared_age = Some(shared_age.map_or(this_shared, |m| m.min(this_shared)));
    }
    let scope = if private { "private" } else { "public" };
    let mut out = match max_age {
        Some(a) if !no_cache && every_part_has_max_age && a > 0 => {
            let mut out = format!("{scope}, max-age={a}");
            if let Some(s) = shared_age.filter(|s| !private && *s < a) {
                out.push_str(&format!(", s-maxage={s}"));
            }
            out
        }
        _ => format!("{scope}, no-cache"),
    };
    if must_revalidate {
        out.push_str(", must-revalidate");
    }
    out
}

/// The merged `Vary`: the union of the parts' `Vary` (a `*` wins) and the request headers that
/// choose a profile, as lower-case names; `None` when empty.
pub fn merged_vary<'a>(
    parts: impl IntoIterator<Item = Option<&'a str>>,
    profile_headers: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        let n = n.trim().to_ascii_lowercase();
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    };
    for v in parts.into_iter().flatten() {
        v.split(',').for_each(&mut add);
    }
    profile_headers.into_iter().for_each(&mut add);
    if names.iter().any(|n| n == "*") {
        return Some("*".into());
    }
    (!names.is_empty()).then(|| names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp(list: &[&str]) -> Vec<FieldPath> {
        list.iter().map(|s| FieldPath::parse(s).unwrap()).collect()
    }

    #[test]
    fn allow_and_deny_follow_paths_through_arrays() {
        let v = json!({"id":1,"name":"A","address":{"city":"X","zip":"1"},"items":[{"id":1,"p":2},{"id":2,"p":3}]});
        assert_eq!(
            allow_fields(v.clone(), &fp(&["name", "address.city", "items.id"])),
            json!({"name":"A","address":{"city":"X"},"items":[{"id":1},{"id":2}]})
        );
        assert_eq!(allow_fields(v.clone(), &[]), v);
        assert_eq!(
            deny_fields(v.clone(), &fp(&["address.zip", "items.p", "nope.x"])),
            json!({"id":1,"name":"A","address":{"city":"X"},"items":[{"id":1},{"id":2}]})
        );
        let mut r = json!({"name":"A","x":1});
        rename(&mut r, &[("name".into(), "full_name".into())]);
        assert_eq!(r, json!({"full_name":"A","x":1}));
        assert!(FieldPath::parse("a..b").is_err());
    }

    #[test]
    fn merge_modes() {
        let mut out = Map::new();
        merge_into(&mut out, MergeMode::Key, "user", Some(json!({"id":1}))).unwrap();
        merge_into(&mut out, MergeMode::Key, "orders", None).unwrap();
        merge_into(
            &mut out,
            MergeMode::Root,
            "",
            Some(json!({"a":1,"n":{"x":1}})),
        )
        .unwrap();
        merge_into(
            &mut out,
            MergeMode::Deep,
            "",
            Some(json!({"n":{"y":2},"b":2})),
        )
        .unwrap();
        merge_into(&mut out, MergeMode::Append, "all", Some(json!([1, 2]))).unwrap();
        merge_into(&mut out, MergeMode::Append, "all", Some(json!(3))).unwrap();
        merge_into(&mut out, MergeMode::Append, "none", None).unwrap();
        assert_eq!(
            Value::Object(out.clone()),
            json!({"user":{"id":1},"orders":null,"a":1,"n":{"x":1,"y":2},"b":2,"all":[1,2,3],"none":[]})
        );
        assert!(merge_into(&mut out, MergeMode::Root, "", Some(json!([1]))).is_err());
    }

    #[test]
    fn vary_is_the_union_of_the_parts_and_profile_headers() {
        assert_eq!(merged_vary([None, None], []), None);
        assert_eq!(
            merged_vary(
                [Some("Accept-Language, x-user"), None, Some("x-user")],
                ["X-Client"]
            ),
            Some("accept-language, x-user, x-client".into())
        );
        assert_eq!(merged_vary([Some("*")], ["x-client"]), Some("*".into()));
    }

    #[test]
    fn cache_control_is_the_most_restrictive() {
        let cases: &[(&[Option<&str>], bool, &str)] = &[
            (
                &[Some("public, max-age=60"), Some("private, max-age=30")],
                true,
                "private, max-age=30",
            ),
            (
                &[Some("public, max-age=60"), Some("max-age=120")],
                true,
                "public, max-age=60",
            ),
            (
                &[Some("public, max-age=60"), Some("no-store")],
                true,
                "no-store",
            ),
            (
                &[Some("public, max-age=60"), Some("no-cache")],
                true,
                "public, no-cache",
            ),
            (&[Some("public, max-age=60"), None], true, "no-store"),
            (
                &[Some("public, max-age=60"), Some("public")],
                true,
                "public, no-cache",
            ),
            (&[Some("public, max-age=60")], false, "no-store"),
            (
                &[Some("public, max-age=60, s-maxage=5"), Some("max-age=30")],
                true,
                "public, max-age=30, s-maxage=5",
            ),
            (
                &[Some("public, max-age=60, s-maxage=90"), Some("max-age=30")],
                true,
                "public, max-age=30",
            ),
            (
                &[Some("private, max-age=60, s-maxage=5")],
                true,
                "private, max-age=60",
            ),
            (
                &[
                    Some("max-age=60, s-maxage=x"),
                    Some("max-age=30, must-revalidate"),
                ],
                true,
                "public, max-age=30, s-maxage=0, must-revalidate",
            ),
            (&[], true, "no-store"),
        ];
        for (parts, complete, want) in cases {
            assert_eq!(
                merged_cache_control(parts, *complete, false),
                *want,
                "{parts:?}"
            );
        }
        // A reply built from the caller's identity is never for shared caches.
        assert_eq!(
            merged_cache_control(&[Some("public, max-age=60, s-maxage=5")], true, true),
            "private, max-age=60"
        );
        assert_eq!(
            merged_cache_control(&[Some("no-store")], true, true),
            "no-store"
        );
    }

    #[test]
    fn a_repeated_directive_counts_at_its_smallest() {
        // Found by the `shape` fuzz target: the last max-age used to win.
        let parts = [Some("max-age=5, max-age=70"), Some("max-age=60")];
        assert_eq!(
            merged_cache_control(&parts, true, false),
            "public, max-age=5"
        );
        let parts = [Some("max-age=60, s-maxage=30, s-maxage=10")];
        assert_eq!(
            merged_cache_control(&parts, true, false),
            "public, max-age=60, s-maxage=10"
        );
        let parts = [Some("max-age=60, max-age=x")];
        assert_eq!(
            merged_cache_control(&parts, true, false),
            "public, no-cache"
        );
    }
}
