//! Every filter's configuration, `Config` → `Compiled`: from arbitrary bytes, and from the
//! bundled and documented configurations with values replaced, members removed or added and
//! parts moved. A configuration is accepted or refused with an error that names a field and
//! says why; nothing panics.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::Value;
use tollgate_common::mem_host::MemHost;
use tollgate_common::{ConfigError, RootFilter};

use crate::gen::{keys_of, mutate, strings_of};
use crate::seeds;

/// Parse and compile with one filter's configuration code.
pub fn compile(filter: &str, bytes: &[u8]) -> Result<(), ConfigError> {
    match filter {
        "auth" => tollgate_auth::config::Config::parse(bytes).map(drop),
        "ratelimit" => tollgate_ratelimit::config::Compiled::parse(bytes).map(drop),
        "cache" => tollgate_cache::config::Config::parse(bytes)
            .and_then(tollgate_cache::config::Config::compile)
            .map(drop),
        "aggregate" => tollgate_aggregate::config::Config::parse(bytes).map(drop),
        _ => tollgate_probe::ProbeRoot::new(1).configure(&mut MemHost::new(), bytes),
    }
}

fn check_error(filter: &str, doc: Option<&Value>, e: &ConfigError) {
    assert!(
        !e.field.is_empty() && !e.reason.is_empty(),
        "{filter}: an error without field or reason: {e:?}"
    );
    assert!(e.to_string().contains(&e.field), "{filter}: {e}");
    // The field names a member of the document (or the document itself). Keys may hold `.`
    // or `[`, so compare whole prefixes.
    if let Some(Value::Object(top)) = doc {
        let names_a_member = top.keys().any(|k| {
            e.field
                .strip_prefix(k.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        });
        assert!(
            e.field == "(root)" || names_a_member,
            "{filter}: the field `{}` is not in the configuration (reason: {})",
            e.field,
            e.reason
        );
    }
}

/// The keys and strings of every seed: what mutations put in.
pub(crate) fn dictionaries() -> &'static (Vec<&'static str>, Vec<&'static str>) {
    static CELL: OnceLock<(Vec<&'static str>, Vec<&'static str>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let (mut keys, mut strings) = (Vec::new(), Vec::new());
        for s in seeds::all() {
            if let Ok(v) = serde_json::from_str::<Value>(s) {
                keys_of(&v, &mut keys);
                strings_of(&v, &mut strings);
            }
        }
        let leak = |v: Vec<String>| -> Vec<&'static str> {
            v.into_iter()
                .map(|s| &*Box::leak(s.into_boxed_str()))
                .collect()
        };
        (leak(keys), leak(strings))
    })
}

/// Arbitrary bytes as every filter's configuration.
pub fn config_json(data: &[u8]) {
    let doc = serde_json::from_slice::<Value>(data).ok();
    for filter in seeds::FILTERS.iter().chain(&["probe"]) {
        match compile(filter, data) {
            Ok(()) => assert!(
                doc.as_ref().is_some_and(Value::is_object)
                    || data.iter().all(u8::is_ascii_whitespace),
                "{filter}: accepted a configuration that is not a JSON object"
            ),
            Err(e) => check_error(filter, doc.as_ref(), &e),
        }
    }
}

/// A seed configuration of one filter, mutated, through that filter's configuration code
/// (and, now and then, another filter's).
pub fn config_values(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check_values(&mut u);
}

fn check_values(u: &mut Unstructured<'_>) -> Result<()> {
    let filter = *u.choose(&seeds::FILTERS)?;
    let list = seeds::of(filter);
    let seed = *u.choose(&list)?;
    let Ok(mut doc) = serde_json::from_str::<Value>(seed) else {
        return Ok(());
    };
    let (keys, strings) = dictionaries();
    mutate(u, &mut doc, 6, keys, strings)?;
    let bytes = doc.to_string();
    let target = if u.ratio(1, 8)? {
        *u.choose(&seeds::FILTERS)?
    } else {
        filter
    };
    if let Err(e) = compile(target, bytes.as_bytes()) {
        check_error(target, Some(&doc), &e);
    }
    Ok(())
}
