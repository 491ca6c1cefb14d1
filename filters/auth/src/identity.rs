//! An authenticated caller and the identity headers that forward it, built once where it can be:
//! per API key when the configuration is compiled, per token when it enters the verified-token
//! cache. A request with a known API key or a cached JWT only clones an `Rc` and writes the
//! headers (docs/filters/auth.md, "Cost").

use std::rc::Rc;

use serde_json::{Map, Value};

use crate::claims::header_safe;

/// The names of the headers that carry the identity (`consumer_header`, `plan_header`,
/// `identity_source_header`).
#[derive(Debug, Clone, Copy)]
pub struct HeaderNames<'a> {
    /// Receives the consumer id.
    pub consumer: &'a str,
    /// Receives the plan.
    pub plan: &'a str,
    /// Receives where the identity comes from (`None`: not set).
    pub source: Option<&'a str>,
}

/// An authenticated caller.
#[derive(Debug, Default)]
pub struct Identity {
    /// The consumer id (authorization: `consumers`, path bindings).
    pub consumer: Option<String>,
    /// The claims authorization reads.
    pub claims: Rc<Map<String, Value>>,
    /// The request headers that forward it, in the order they are set, values safe for a
    /// header (control characters replaced).
    pub headers: Vec<(String, String)>,
}

impl Identity {
    /// The identity of a caller: `headers` (claim, metadata or payload headers, values already
    /// safe) followed by the consumer, plan and source headers.
    pub fn new(
        names: HeaderNames<'_>,
        source: &str,
        consumer: Option<String>,
        plan: Option<&str>,
        claims: Rc<Map<String, Value>>,
        mut headers: Vec<(String, String)>,
    ) -> Identity {
        let mut push = |name: &str, value: &str| {
            headers.push((name.to_string(), header_safe(value).into_owned()));
        };
        if let Some(c) = &consumer {
            push(names.consumer, c);
        }
        if let Some(p) = plan {
            push(names.plan, p);
        }
        if let Some(h) = names.source {
            push(h, source);
        }
        Identity {
            consumer,
            claims,
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_in_order_and_safe() {
        let names = HeaderNames {
            consumer: "x-c",
            plan: "x-p",
            source: Some("x-s"),
        };
        let id = Identity::new(
            names,
            "api_key",
            Some("a\nb".into()),
            Some("pro"),
            Rc::default(),
            vec![("x-m".into(), "v".into())],
        );
        assert_eq!(
            id.headers,
            [
                ("x-m".to_string(), "v".to_string()),
                ("x-c".into(), "a b".into()),
                ("x-p".into(), "pro".into()),
                ("x-s".into(), "api_key".into()),
            ]
        );
        let none = Identity::new(
            HeaderNames {
                source: None,
                ..names
            },
            "api_key",
            None,
            None,
            Rc::default(),
            Vec::new(),
        );
        assert!(none.headers.is_empty());
    }
}
