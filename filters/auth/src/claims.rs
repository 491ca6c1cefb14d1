//! Claims: time and audience checks, claim lookup, header values and authorization.

use serde_json::{Map, Value};

use tollgate_common::RouteParams;

use crate::config::{Provider, Rule};

/// Why verified claims are refused. `Display` is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// The payload is not a JSON object, or a registered claim has the wrong type.
    Malformed(String),
    /// `exp` is missing and required.
    MissingExp,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iat` is in the future.
    IssuedInFuture,
    /// `exp` is too far from `iat`.
    LifetimeTooLong,
    /// No accepted audience.
    WrongAudience,
    /// Header `typ` does not match.
    WrongType,
}

impl ClaimError {
    /// Short reason used in metric names.
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimError::Malformed(_) => "malformed",
            ClaimError::MissingExp => "missing_exp",
            ClaimError::Expired => "expired",
            ClaimError::NotYetValid => "not_yet_valid",
            ClaimError::IssuedInFuture => "issued_in_future",
            ClaimError::LifetimeTooLong => "lifetime_too_long",
            ClaimError::WrongAudience => "wrong_audience",
            ClaimError::WrongType => "wrong_type",
        }
    }
}

impl std::fmt::Display for ClaimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimError::Malformed(why) => write!(f, "the token's claims are malformed: {why}"),
            ClaimError::MissingExp => f.write_str("the token has no expiry (`exp`)"),
            ClaimError::Expired => f.write_str("the token has expired"),
            ClaimError::NotYetValid => f.write_str("the token is not valid yet (`nbf`)"),
            ClaimError::IssuedInFuture => f.write_str("the token was issued in the future (`iat`)"),
            ClaimError::LifetimeTooLong => f.write_str("the token's lifetime is too long"),
            ClaimError::WrongAudience => f.write_str("the token is not for this audience"),
            ClaimError::WrongType => f.write_str("the token's type (`typ`) is not accepted"),
        }
    }
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ClaimError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or_else(|| ClaimError::Malformed(format!("`{name}` is not a number"))),
        Some(_) => Err(ClaimError::Malformed(format!("`{name}` is not a number"))),
    }
}

/// Does `typ` match the required one (RFC 8725: compared case-insensitively, with or
/// without the `application/` prefix)?
fn typ_matches(required: &str, got: Option<&str>) -> bool {
    let norm = |s: &str| {
        let l = s.to_ascii_lowercase();
        l.strip_prefix("application/")
            .map(str::to_string)
            .unwrap_or(l)
    };
    got.is_some_and(|g| norm(g) == norm(required))
}

/// Check the time claims only (also on a cache hit).
pub fn check_times(p: &Provider, claims: &Map<String, Value>, now: f64) -> Result<(), ClaimError> {
    let exp = time_claim(claims, "exp")?;
    let nbf = time_claim(claims, "nbf")?;
    let iat = time_claim(claims, "iat")?;
    match exp {
        None if p.require_exp => return Err(ClaimError::MissingExp),
        Some(e) if now > e + p.skew => return Err(ClaimError::Expired),
        _ => {}
    }
    if nbf.is_some_and(|n| n > now + p.skew) {
        return Err(ClaimError::NotYetValid);
    }
    if iat.is_some_and(|i| i > now + p.skew) {
        return Err(ClaimError::IssuedInFuture);
    }
    if let Some(max) = p.max_lifetime {
        match exp {
            None => return Err(ClaimError::MissingExp),
            Some(e) => {
                let start = iat.unwrap_or(now);
                if e - start > max + p.skew {
                    return Err(ClaimError::LifetimeTooLong);
                }
            }
        }
    }
    Ok(())
}

/// Check every claim rule of a provider (`iss` was used to choose it).
pub fn check_claims(
    p: &Provider,
    typ: Option<&str>,
    claims: &Map<String, Value>,
    now: f64,
) -> Result<(), ClaimError> {
    if let Some(req) = &p.typ {
        if !typ_matches(req, typ) {
            return Err(ClaimError::WrongType);
        }
    }
    for name in ["sub", "jti"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(ClaimError::Malformed(format!("`{name}` is not a string")));
        }
    }
    check_times(p, claims, now)?;
    if !p.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => p.audiences.contains(a),
            Some(Value::Array(list)) => list.iter().any(|a| {
                a.as_str()
                    .is_some_and(|a| p.audiences.iter().any(|x| x == a))
            }),
            None => false,
            Some(_) => return Err(ClaimError::Malformed("`aud` is not a string".into())),
        };
        if !ok {
            return Err(ClaimError::WrongAudience);
        }
    }
    Ok(())
}

/// The value at a dot-separated path.
pub fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for part in rest {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

/// A claim as a header value: strings as they are, arrays comma-separated, objects as JSON.
/// Control characters are replaced with spaces (they cannot go in a header).
pub fn header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    // The string itself unless a control character had to be replaced (no second copy).
    let replaced = match header_safe(&s) {
        std::borrow::Cow::Owned(o) => Some(o),
        std::borrow::Cow::Borrowed(_) => None,
    };
    Some(replaced.unwrap_or(s))
}

/// A string as a header value: control characters become spaces; borrowed when there are none.
pub fn header_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A claim as a plain string (strings only; numbers are written out).
pub fn string_claim(claims: &Map<String, Value>, path: &[String]) -> Option<String> {
    match lookup(claims, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The granted scopes: `scope` (space-separated string) and `scp` (array or string).
pub fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(a)) => {
                out.extend(a.iter().filter_map(|v| v.as_str().map(str::to_string)))
            }
            _ => {}
        }
    }
    out
}

/// Why an authenticated request is not authorized. `Display` is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzError {
    /// Missing scopes (all listed).
    InsufficientScope(Vec<String>),
    /// A claim lacks every accepted value.
    ClaimMismatch(String),
    /// The consumer is not in the route's list.
    ConsumerNotAllowed,
    /// A path variable bound to the identity names someone else (the variable, and the scopes
    /// that would lift the binding).
    IdentityMismatch(String, Vec<String>),
}

impl AuthzError {
    /// Short reason used in metric names.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthzError::InsufficientScope(_) => "insufficient_scope",
            AuthzError::ClaimMismatch(_) => "claim_mismatch",
            AuthzError::ConsumerNotAllowed => "consumer_not_allowed",
            AuthzError::IdentityMismatch(..) => "identity_mismatch",
        }
    }
}

impl std::fmt::Display for AuthzError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthzError::InsufficientScope(s) => write!(f, "missing scope: {}", s.join(" ")),
            AuthzError::ClaimMismatch(c) => write!(f, "claim `{c}` does not have a required value"),
            AuthzError::ConsumerNotAllowed => f.write_str("this consumer may not use this route"),
            AuthzError::IdentityMismatch(p, _) => {
                write!(f, "the path's `{p}` is not the caller's own")
            }
        }
    }
}

/// Check a route's scopes, claims, consumers and path bindings (`params`: the route
/// template's variables).
pub fn authorize(
    rule: &Rule,
    claims: &Map<String, Value>,
    consumer: Option<&str>,
    params: &RouteParams,
) -> Result<(), AuthzError> {
    if !rule.scopes.is_empty() {
        let granted = scopes(claims);
        let missing: Vec<String> = rule
            .scopes
            .iter()
            .filter(|s| !granted.contains(s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(AuthzError::InsufficientScope(rule.scopes.clone()));
        }
    }
    for (path, any_of) in &rule.claims {
        let ok = match lookup(claims, path) {
            Some(Value::String(s)) => any_of.contains(s),
            Some(Value::Array(a)) => a
                .iter()
                .any(|v| v.as_str().is_some_and(|s| any_of.iter().any(|x| x == s))),
            Some(Value::Bool(b)) => any_of.contains(&b.to_string()),
            Some(Value::Number(n)) => any_of.contains(&n.to_string()),
            _ => false,
        };
        if !ok {
            return Err(AuthzError::ClaimMismatch(path.join(".")));
        }
    }
    if !rule.consumers.is_empty()
        && !consumer.is_some_and(|c| rule.consumers.iter().any(|x| x == c))
    {
        return Err(AuthzError::ConsumerNotAllowed);
    }
    check_bindings(rule, claims, consumer, params)
}

/// Each bound path variable must equal the identity (byte for byte, as the path has it),
/// unless one of the binding's scopes is granted.
fn check_bindings(
    rule: &Rule,
    claims: &Map<String, Value>,
    consumer: Option<&str>,
    params: &RouteParams,
) -> Result<(), AuthzError> {
    if rule.bind.is_empty() {
        return Ok(());
    }
    let granted = scopes(claims);
    for b in &rule.bind {
        if b.unless_scopes.iter().any(|s| granted.contains(s)) {
            continue;
        }
        let own = match &b.claim {
            Some(path) => string_claim(claims, path),
            None => consumer.map(str::to_string),
        };
        let named = params.get(&b.param);
        if own.is_none() || own.as_deref() != named {
            return Err(AuthzError::IdentityMismatch(
                b.param.clone(),
                b.unless_scopes.clone(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn header_values() {
        assert_eq!(header_value(&json!("a")).unwrap(), "a");
        assert_eq!(header_value(&json!(["a", "b", 3])).unwrap(), "a,b,3");
        assert_eq!(header_value(&json!({"k": 1})).unwrap(), r#"{"k":1}"#);
        assert_eq!(header_value(&json!(true)).unwrap(), "true");
        assert_eq!(header_value(&json!("a\r\nb")).unwrap(), "a  b");
        assert_eq!(header_value(&Value::Null), None);
        let c = obj(json!({"org": {"id": "o1", "tags": ["x"]}}));
        let p = |s: &str| s.split('.').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(lookup(&c, &p("org.id")), Some(&json!("o1")));
        assert_eq!(lookup(&c, &p("org.nope")), None);
        assert_eq!(lookup(&c, &p("org.id.deeper")), None);
    }

    #[test]
    fn scope_sources() {
        assert_eq!(scopes(&obj(json!({"scope": "a b"}))), vec!["a", "b"]);
        assert_eq!(scopes(&obj(json!({"scp": ["a", "b"]}))), vec!["a", "b"]);
        assert_eq!(scopes(&obj(json!({"scp": "a"}))), vec!["a"]);
        assert!(scopes(&obj(json!({"scope": 1}))).is_empty());
    }

    #[test]
    fn typ_rules() {
        assert!(typ_matches("at+jwt", Some("application/at+JWT")));
        assert!(typ_matches("JWT", Some("jwt")));
        assert!(!typ_matches("at+jwt", Some("JWT")));
        assert!(!typ_matches("at+jwt", None));
    }
}
