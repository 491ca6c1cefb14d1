//! Call path templates: `/users/{user}?q={query.q}&company={user.company_id}`.
//!
//! A variable is a route variable (`{user}`, from the route's `match.template`), a query value
//! of the client's request (`{query.q}`), or a field of an earlier call's JSON answer
//! (`{user.company_id}`, `{orders.items.0.id}`). Values are percent-encoded.

use serde_json::Value;
use tollgate_common::request::{percent_decode, percent_encode, query_param};
use tollgate_common::RouteParams;

/// A template variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// A route variable.
    Route(String),
    /// A query parameter of the client's request.
    Query(String),
    /// A field of a call's answer: call name and the dotted path inside the answer.
    Field(String, Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(Var),
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pieces: Vec<Piece>,
}

/// What a rendering needs.
pub struct Inputs<'a> {
    /// Route variables.
    pub params: &'a RouteParams,
    /// The client's query string (without `?`).
    pub query: &'a str,
    /// The JSON answer of a call by name, when it succeeded.
    pub answer: &'a dyn Fn(&str) -> Option<&'a Value>,
}

impl PathTemplate {
    /// Parse a template; the reason of a refusal is returned.
    pub fn parse(t: &str) -> Result<PathTemplate, String> {
        if !t.starts_with('/') {
            return Err(format!("`{t}` must start with `/`"));
        }
        let mut pieces = Vec::new();
        let mut rest = t;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    pieces.push(Piece::Lit(rest.to_string()));
                    break;
                }
                Some(i) => {
                    if rest.get(i..i + 1) == Some("}") {
                        return Err(format!("`{t}`: `}}` without `{{`"));
                    }
                    if i > 0 {
                        pieces.push(Piece::Lit(rest.get(..i).unwrap_or("").to_string()));
                    }
                    let after = rest.get(i + 1..).unwrap_or("");
                    let Some(end) = after.find('}') else {
                        return Err(format!("`{t}`: `{{` without `}}`"));
                    };
                    let name = after.get(..end).unwrap_or("");
                    pieces.push(Piece::Var(
                        parse_var(name).map_err(|e| format!("`{t}`: {e}"))?,
                    ));
                    rest = after.get(end + 1..).unwrap_or("");
                }
            }
        }
        Ok(PathTemplate { pieces })
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            Piece::Lit(_) => None,
        })
    }

    /// Render with values; the error names a variable without a value.
    pub fn render(&self, inputs: &Inputs<'_>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(Var::Route(n)) => {
                    let v = inputs.params.get(n).unwrap_or("");
                    // Re-encode each segment (a `{*rest}` variable keeps its slashes).
                    let enc: Vec<String> = v
                        .split('/')
                        .map(|s| percent_encode(&percent_decode(s, false)))
                        .collect();
                    out.push_str(&enc.join("/"));
                }
                Piece::Var(Var::Query(n)) => {
                    let v = query_param(inputs.query, n).unwrap_or_default();
                    out.push_str(&percent_encode(&v));
                }
                Piece::Var(Var::Field(call, path)) => {
                    let missing = || format!("`{{{call}.{}}}` has no value", path.join("."));
                    let answer = (inputs.answer)(call).ok_or_else(missing)?;
                    let v = lookup(answer, path).ok_or_else(missing)?;
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return Err(missing()),
                    };
                    out.push_str(&percent_encode(&text));
                }
            }
        }
        Ok(out)
    }
}

fn parse_var(name: &str) -> Result<Var, String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("bad variable `{{{name}}}`"));
    }
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !parts.iter().all(|p| ok(p)) {
        return Err(format!(
            "bad variable `{{{name}}}`: use letters, digits, `_`, `-` and `.`"
        ));
    }
    match parts.as_slice() {
        [one] => Ok(Var::Route((*one).to_string())),
        ["query", q] => Ok(Var::Query((*q).to_string())),
        ["query", ..] => Err(format!("bad variable `{{{name}}}`: use `{{query.NAME}}`")),
        [head, rest @ ..] => Ok(Var::Field(
            (*head).to_string(),
            rest.iter().map(|s| s.to_string()).collect(),
        )),
        [] => Err("empty variable `{}`".into()),
    }
}

/// A value inside JSON by dotted path; numeric parts index arrays.
pub fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, part| match cur {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_and_render() {
        let t =
            PathTemplate::parse("/c/{user.company_id}/{id}?q={query.q}&x=1&o={orders.items.0.id}")
                .unwrap();
        assert_eq!(t.vars().count(), 4);
        let params = RouteParams(vec![("id".into(), "a b".into())]);
        let user = json!({"company_id": 3});
        let orders = json!({"items": [{"id": "x/y"}]});
        let answer = |n: &str| match n {
            "user" => Some(&user),
            "orders" => Some(&orders),
            _ => None,
        };
        let inputs = Inputs {
            params: &params,
            query: "q=h%C3%A9+llo",
            answer: &answer,
        };
        assert_eq!(
            t.render(&inputs).unwrap(),
            "/c/3/a%20b?q=h%C3%A9%20llo&x=1&o=x%2Fy"
        );
        let t2 = PathTemplate::parse("/p/{user.nope}").unwrap();
        assert!(t2.render(&inputs).unwrap_err().contains("{user.nope}"));
        let t3 = PathTemplate::parse("/p/{missing.id}").unwrap();
        assert!(t3.render(&inputs).is_err());
    }

    #[test]
    fn refuses_bad_templates() {
        for (t, why) in [
            ("x", "start with"),
            ("/a/{b", "without `}`"),
            ("/a/b}", "without `{`"),
            ("/a/{}", "bad variable"),
            ("/a/{a..b}", "bad variable"),
            ("/a/{a b}", "bad variable"),
            ("/a/{query.a.b}", "query.NAME"),
        ] {
            let e = PathTemplate::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }
}
