//! Generators of structured input from [`Unstructured`] bytes: text built from tokens that
//! matter to the parsers, random JSON, and mutations of a valid JSON document (values replaced,
//! members removed or added, subtrees moved), so that both random and nearly valid input reach
//! the code under test.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// Characters that parsers of paths, headers, queries, cookies and JSON treat specially.
pub const SPECIAL: &[char] = &[
    '/', '?', '#', '%', '{', '}', '*', '.', ':', '[', ']', '=', ';', ',', '"', '\\', ' ', '\t',
    '\r', '\n', '\0', '+', '&', '-', '_', '~', '@', '!', '$', '\'', '(', ')', 'a', 'Z', '0', '9',
    'é', 'ß', '€', '😀', '\u{fffd}', '\u{7f}', '\u{202e}',
];

/// Tokens useful in most text inputs.
pub const COMMON_TOKENS: &[&str] = &[
    "",
    "/",
    "//",
    "..",
    ".",
    "%",
    "%2F",
    "%2e",
    "%2E%2E",
    "%00",
    "%zz",
    "%C3%A9",
    "%ff",
    "?",
    "&",
    "=",
    "#",
    ";",
    "{",
    "}",
    "{x}",
    "{*rest}",
    "*",
    "*.",
    "GET",
    "get",
    "POST",
    "HEAD",
    "api",
    "users",
    "Bearer ",
    "bearer",
    "ApiKey ",
    "\"",
    "\\",
    " ",
    "\t",
    "\r\n",
    ":",
    "[::1]",
    "[::1]:80",
    "example.com",
    "*.example.com",
    ":8080",
    "é",
    "😀",
    "\u{0}",
];

/// Text of up to `max_pieces` pieces, each a token of `dict`, a special character or a short
/// arbitrary string.
pub fn text(u: &mut Unstructured<'_>, dict: &[&str], max_pieces: usize) -> Result<String> {
    let pieces = u.int_in_range(0..=max_pieces)?;
    let mut out = String::new();
    for _ in 0..pieces {
        match u.int_in_range(0..=9u8)? {
            0..=3 if !dict.is_empty() => out.push_str(u.choose(dict)?),
            4..=6 => out.push(*u.choose(SPECIAL)?),
            7 => out.push_str(u.choose(COMMON_TOKENS)?),
            _ => {
                let s: &str = u.arbitrary()?;
                out.extend(s.chars().take(12));
            }
        }
    }
    Ok(out)
}

/// Text that is sometimes derived from `base` (the base itself, with a suffix, or cut short)
/// and otherwise new: the matchers see near misses as well as random text.
pub fn near(u: &mut Unstructured<'_>, base: &str, dict: &[&str]) -> Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => base.to_string(),
        1 => format!("{base}{}", text(u, dict, 4)?),
        2 => {
            let cut = u.int_in_range(0..=base.len())?;
            base.get(..cut).unwrap_or(base).to_string()
        }
        3 => format!("{}{base}", text(u, dict, 2)?),
        _ => text(u, dict, 8)?,
    })
}

/// Numbers at the edges: zero, negatives, huge, fractional, the limits of the integer types.
pub fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=11u8)? {
        0 => Value::from(0),
        1 => Value::from(1),
        2 => Value::from(-1),
        3 => Value::from(u64::MAX),
        4 => Value::from(i64::MIN),
        5 => Value::from(u32::MAX),
        6 => Value::from(u64::from(u32::MAX) + 1),
        7 => Number::from_f64(0.5).map_or(Value::Null, Value::Number),
        8 => Number::from_f64(1e300).map_or(Value::Null, Value::Number),
        9 => Number::from_f64(-1e-9).map_or(Value::Null, Value::Number),
        10 => Value::from(u.arbitrary::<i64>()?),
        _ => Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
    })
}

/// A random JSON value, at most `depth` levels deep; strings from `strings` or [`text`].
pub fn json(
    u: &mut Unstructured<'_>,
    depth: u32,
    keys: &[&str],
    strings: &[&str],
) -> Result<Value> {
    let top = if depth == 0 { 4 } else { 6 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 | 4 => Value::String(if u.arbitrary()? && !strings.is_empty() {
            (*u.choose(strings)?).to_string()
        } else {
            text(u, strings, 6)?
        }),
        5 => {
            let n = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(json(u, depth - 1, keys, strings)?);
            }
            Value::Array(items)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut m = Map::new();
            for _ in 0..n {
                let k = if u.arbitrary()? && !keys.is_empty() {
                    (*u.choose(keys)?).to_string()
                } else {
                    text(u, keys, 2)?
                };
                m.insert(k, json(u, depth - 1, keys, strings)?);
            }
            Value::Object(m)
        }
    })
}

/// Every path (object keys and array indices) of a value, the root first.
fn paths(v: &Value, at: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(PathStep::Key(k.clone()));
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                at.push(PathStep::Index(i));
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn get_mut<'v>(v: &'v mut Value, path: &[PathStep]) -> Option<&'v mut Value> {
    let mut cur = v;
    for step in path {
        cur = match (cur, step) {
            (Value::Object(m), PathStep::Key(k)) => m.get_mut(k)?,
            (Value::Array(a), PathStep::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// The keys of every object in a value (a dictionary for mutations).
pub fn keys_of(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if !out.contains(k) {
                    out.push(k.clone());
                }
                keys_of(x, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| keys_of(x, out)),
        _ => {}
    }
}

/// The string values in a value (a dictionary for mutations).
pub fn strings_of(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if !out.contains(s) => out.push(s.clone()),
        Value::Object(m) => m.values().for_each(|x| strings_of(x, out)),
        Value::Array(items) => items.iter().for_each(|x| strings_of(x, out)),
        _ => {}
    }
}

/// Mutations stop once a document is this large.
pub const MAX_DOC_BYTES: usize = 64 << 10;

/// Apply up to `max` mutations to `doc`: a value replaced by a random one or by a copy of
/// another part of the document, a member or element removed, a member added (often with a
/// known key), an element duplicated. Keys and strings for new values come from the
/// dictionaries.
pub fn mutate(
    u: &mut Unstructured<'_>,
    doc: &mut Value,
    max: usize,
    keys: &[&str],
    strings: &[&str],
) -> Result<()> {
    let n = u.int_in_range(1..=max.max(1))?;
    for _ in 0..n {
        // Copies of subtrees into themselves grow a document exponentially: keep it small.
        if doc.to_string().len() > MAX_DOC_BYTES {
            break;
        }
        let mut all = Vec::new();
        paths(doc, &mut Vec::new(), &mut all);
        let path = u.choose(&all)?.clone();
        let op = u.int_in_range(0..=7u8)?;
        match op {
            // Replace with a random value.
            0 | 1 => {
                let new = json(u, 2, keys, strings)?;
                if let Some(slot) = get_mut(doc, &path) {
                    *slot = new;
                }
            }
            // Replace with a copy of another part of the document.
            2 => {
                let from = u.choose(&all)?.clone();
                let copy = get_mut(doc, &from).map(|v| v.clone());
                if let (Some(copy), Some(slot)) = (copy, get_mut(doc, &path)) {
                    *slot = copy;
                }
            }
            // Remove this member or element.
            3 => {
                if let Some((last, parent)) = path.split_last() {
                    match (get_mut(doc, parent), last) {
                        (Some(Value::Object(m)), PathStep::Key(k)) => {
                            m.remove(k);
                        }
                        (Some(Value::Array(a)), PathStep::Index(i)) if *i < a.len() => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            // Add a member to an object, or an element to an array.
            4 | 5 => {
                let key = if u.arbitrary()? && !keys.is_empty() {
                    (*u.choose(keys)?).to_string()
                } else {
                    text(u, keys, 2)?
                };
                let value = json(u, 2, keys, strings)?;
                match get_mut(doc, &path) {
                    Some(Value::Object(m)) => {
                        m.insert(key, value);
                    }
                    Some(Value::Array(a)) => a.push(value),
                    _ => {}
                }
            }
            // Duplicate an array element, or wrap a value in an array.
            6 => match get_mut(doc, &path) {
                Some(Value::Array(a)) if !a.is_empty() => {
                    let i = u.choose_index(a.len())?;
                    let copy = a[i].clone();
                    a.push(copy);
                }
                Some(slot) => *slot = Value::Array(vec![slot.clone()]),
                None => {}
            },
            // A string at its edges: empty, very long, or changed a little.
            _ => {
                if let Some(Value::String(s)) = get_mut(doc, &path) {
                    let base = s.clone();
                    *s = match u.int_in_range(0..=2u8)? {
                        0 => String::new(),
                        1 => base.repeat(u.int_in_range(2..=64)?.min(4096 / base.len().max(1))),
                        _ => near(u, &base, strings)?,
                    };
                }
            }
        }
    }
    Ok(())
}
