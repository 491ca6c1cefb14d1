//! The limits file: Limitador's format (YAML; JSON works too), so a file written for this service
//! also runs under `limitador-server` and the other way round.
//!
//! ```yaml
//! - namespace: tollgate            # the RLS `domain`
//!   name: global-api               # reported in logs
//!   max_value: 100                 # units per window
//!   seconds: 60                    # the window
//!   conditions: ["descriptors[0].limit == 'global-api'"]
//!   variables: ["descriptors[0].consumer"]   # one counter per consumer
//! ```
//!
//! `conditions` and `variables` are CEL expressions over `descriptors`, the request's
//! descriptors, each a map of its entries (`descriptors[0]['header.x-tenant']`).

use std::sync::Arc;

use limitador::limit::{Expression, Limit, Predicate};
use serde::Deserialize;

/// A limit ready to decide: limitador's limit, its conditions compiled, and a stable identity
/// for counter keys.
#[derive(Debug)]
pub struct LimitDef {
    /// The limit (namespace, window, max, variables).
    pub limit: Arc<Limit>,
    /// Its conditions: the limit applies when all are true.
    pub predicates: Vec<Predicate>,
    /// Namespace, name, window, conditions and variables as JSON: the same in every process that
    /// loads the same limit, so servers sharing a Redis share counters.
    pub id: String,
}

/// One limit as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    namespace: String,
    #[serde(default)]
    name: Option<String>,
    max_value: u64,
    seconds: u64,
    #[serde(default)]
    conditions: Vec<String>,
    #[serde(default)]
    variables: Vec<String>,
}

/// Parse a limits file's text into limits; the error names the limit and what is wrong.
pub fn parse(text: &str) -> Result<Vec<LimitDef>, String> {
    let raw: Vec<RawLimit> = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| compile(r).map_err(|e| format!("limit [{i}]: {e}")))
        .collect()
}

fn compile(r: RawLimit) -> Result<LimitDef, String> {
    if r.namespace.is_empty() {
        return Err("`namespace` must not be empty".into());
    }
    if r.seconds == 0 {
        return Err("`seconds` must be at least 1".into());
    }
    let conditions = r
        .conditions
        .iter()
        .map(|c| Predicate::parse(c).map_err(|e| format!("condition `{c}`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let variables = r
        .variables
        .iter()
        .map(|v| Expression::parse(v).map_err(|e| format!("variable `{v}`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sorted_conditions = r.conditions.clone();
    sorted_conditions.sort();
    let mut sorted_variables = r.variables.clone();
    sorted_variables.sort();
    let id = serde_json::to_string(&(
        &r.namespace,
        &r.name,
        r.seconds,
        sorted_conditions,
        sorted_variables,
    ))
    .map_err(|e| e.to_string())?;
    let mut limit = Limit::new(
        r.namespace.as_str(),
        r.max_value,
        r.seconds,
        conditions.iter().cloned(),
        variables,
    );
    if let Some(name) = r.name {
        limit.set_name(name);
    }
    Ok(LimitDef {
        limit: Arc::new(limit),
        predicates: conditions,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_limitadors_format() {
        let limits = parse(
            "- namespace: tollgate\n  name: a\n  max_value: 10\n  seconds: 60\n  \
             conditions: [\"descriptors[0].limit == 'a'\"]\n  variables: [\"descriptors[0].consumer\"]\n",
        )
        .unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0].limit.max_value(), 10);
        assert_eq!(limits[0].limit.seconds(), 60);
        assert_eq!(limits[0].limit.name(), Some("a"));
        assert_eq!(limits[0].predicates.len(), 1);
    }

    #[test]
    fn refuses_bad_limits_with_their_index() {
        for (text, want) in [
            (
                "- {namespace: n, max_value: 1, seconds: 0}",
                "limit [0]: `seconds`",
            ),
            (
                "- {namespace: '', max_value: 1, seconds: 1}",
                "limit [0]: `namespace`",
            ),
            (
                "- {namespace: n, max_value: 1, seconds: 1, conditions: ['((']}",
                "limit [0]: condition `((`",
            ),
            (
                "- {namespace: n, max_value: 1, seconds: 1, rate: 2}",
                "unknown field `rate`",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
