//! The combined module's configuration (`filters/tollgate`: one optional section per filter):
//! from arbitrary bytes, and from the filters' seeds put together as sections (some left out,
//! an unknown or duplicated one now and then) and mutated. A configuration is accepted only as
//! a JSON object whose sections are the configured filters, or refused with an error that names
//! a section (`ratelimit.routes[0].match`) or the document; nothing panics.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};
use tollgate::TollgateRoot;
use tollgate_common::mem_host::MemHost;
use tollgate_common::RootFilter;

use crate::gen::mutate;
use crate::seeds;
use crate::targets::config::dictionaries;

/// Configure the combined module with `bytes` and check the outcome against `doc` (the bytes
/// as JSON, when they are).
fn check(bytes: &[u8], doc: Option<&Value>) {
    let mut root = TollgateRoot::new(1);
    match root.configure(&mut MemHost::new(), bytes) {
        Ok(()) => {
            let blank = bytes.iter().all(u8::is_ascii_whitespace);
            assert!(
                blank || doc.is_some_and(Value::is_object),
                "accepted a configuration that is not a JSON object"
            );
            for name in root.chain().names() {
                assert!(
                    doc.and_then(|d| d.get(name)).is_some(),
                    "`{name}` is configured without a section of that name"
                );
            }
        }
        Err(e) => {
            assert!(
                !e.field.is_empty() && !e.reason.is_empty(),
                "an error without field or reason: {e:?}"
            );
            assert!(e.to_string().contains(&e.field), "{e}");
            if let Some(Value::Object(top)) = doc {
                let names_a_section = top.keys().any(|k| {
                    e.field
                        .strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
                });
                assert!(
                    e.field == "(root)" || names_a_section,
                    "the field `{}` names no section (reason: {})",
                    e.field,
                    e.reason
                );
            }
        }
    }
}

/// The target.
pub fn combined_config(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if u.ratio(1, 4).unwrap_or(false) {
        let bytes = u.take_rest();
        let doc = serde_json::from_slice::<Value>(bytes).ok();
        check(bytes, doc.as_ref());
        return;
    }
    let _ = sections(&mut u);
}

fn sections(u: &mut Unstructured<'_>) -> Result<()> {
    let mut top = Map::new();
    for filter in seeds::FILTERS {
        if !u.ratio(2, 3)? {
            continue;
        }
        let list = seeds::of(filter);
        let seed = *u.choose(&list)?;
        if let Ok(section) = serde_json::from_str::<Value>(seed) {
            top.insert(filter.to_string(), section);
        }
    }
    if u.ratio(1, 16)? {
        top.insert(
            (*u.choose(&["probe", "Auth", "rate_limit", ""])?).to_string(),
            Value::Object(Map::new()),
        );
    }
    let mut doc = Value::Object(top);
    if u.ratio(1, 2)? {
        let (keys, strings) = dictionaries();
        mutate(u, &mut doc, 6, keys, strings)?;
    }
    let mut bytes = doc.to_string();
    // A section written twice (serde_json's Value keeps one of them, the module must refuse).
    if u.ratio(1, 16)? {
        let filter = *u.choose(&seeds::FILTERS)?;
        if let Some(rest) = bytes.strip_prefix('{') {
            let sep = if rest.starts_with('}') { "" } else { "," };
            bytes = format!("{{\"{filter}\":{{}}{sep}{rest}");
        }
    }
    let parsed = serde_json::from_str::<Value>(&bytes).ok();
    check(bytes.as_bytes(), parsed.as_ref());
    Ok(())
}
