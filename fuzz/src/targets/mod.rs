//! The targets, by name. Each takes arbitrary bytes and panics when an invariant breaks.

pub mod aggregate;
pub mod aggregate_request;
pub mod auth;
pub mod auth_remote;
pub mod cache;
pub mod combined;
pub mod common;
pub mod config;
pub mod jose;
pub mod ratelimit;
pub mod route;
pub mod verifiers;

use std::collections::HashSet;

use tollgate_common::mem_host::RecordedCall;

use crate::Target;

/// Every target: name (also the libFuzzer binary's name and the corpus directory), function,
/// and the number of seeded cases `cargo test` runs (fewer for the costly ones).
pub const ALL: &[(&str, Target, u32)] = &[
    ("route", route::route, 4000),
    ("request", common::request, 4000),
    ("scalars", common::scalars, 4000),
    ("abi_map", common::abi_map, 4000),
    ("config_json", config::config_json, 2000),
    ("config_values", config::config_values, 1500),
    ("combined_config", combined::combined_config, 1000),
    ("jws", jose::jws, 1500),
    ("b64_json", jose::b64_and_json, 4000),
    ("jwk", jose::jwk, 300),
    ("signature", jose::signature, 100),
    ("verifiers", verifiers::verifiers, 300),
    ("auth_request", auth::request, 1000),
    ("auth_remote", auth_remote::remote, 600),
    ("template", aggregate::template, 4000),
    ("shape", aggregate::shape, 3000),
    ("aggregate_request", aggregate_request::request, 600),
    ("ratelimit_request", ratelimit::request, 600),
    ("cache_headers", cache::parsers, 3000),
];

/// A target by name.
pub fn by_name(name: &str) -> Option<Target> {
    ALL.iter().find(|(n, _, _)| *n == name).map(|(_, t, _)| *t)
}

/// Run the target `name` on `data`; an unknown name is a broken build, so it fails loudly.
pub fn run(name: &str, data: &[u8]) {
    let target = by_name(name);
    assert!(target.is_some(), "no fuzz target `{name}`");
    if let Some(t) = target {
        t(data);
    }
}

/// The first call in `calls` not answered yet, now marked answered (the targets answer a
/// filter's callouts one by one, in the order it made them).
pub(crate) fn next_unanswered(
    calls: &[RecordedCall],
    answered: &mut HashSet<u32>,
) -> Option<RecordedCall> {
    let call = calls.iter().find(|c| !answered.contains(&c.token))?.clone();
    answered.insert(call.token);
    Some(call)
}
