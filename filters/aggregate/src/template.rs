//! Call path templates: `/users/{user}?q={query.q}&company={user.company_id}`.
//!
//! A variable is a route variable (`{user}`, from the route's `match.template`), a query value
//! of the client's request (`{query.q}`), the caller's verified identity (`{consumer}`, or an
//! identity header the auth filter set: `{identity.x-tollgate-plan}`), or a field of an earlier
//! call's JSON answer (`{user.company_id}`, `{orders.items.0.id}`). Values are percent-encoded; in
//! the path part (before `?`) a value (or, for a `{*rest}` route variable, a segment of it) that is
//! `.` or `..` is refused, so that no input (least of all a backend's answer) can climb out of the
//! templated path.

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
    /// The caller's consumer id (`{consumer}`): the auth filter's consumer header.
    Consumer,
    /// An identity header the auth filter set (`{identity.NAME}`), lower case.
    Identity(String),
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
    /// The caller's consumer id, when the request has one.
    pub consumer: Option<&'a str>,
    /// The identity headers of the request (lower-case names).
    pub identity: &'a [(String, String)],
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

    /// Render with values; the error names a variable without a usable value.
    pub fn render(&self, inputs: &Inputs<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for p in &self.pieces {
            let in_path = !out.contains('?');
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(Var::Route(n)) => {
                    let v = inputs.params.get(n).unwrap_or("");
                    // Re-encode each segment (a `{*rest}` variable keeps its slashes).
                    let mut enc = Vec::new();
                    for seg in v.split('/') {
                        let seg = percent_decode(seg, false);
                        if in_path {
                            no_dot_segment(n, &seg)?;
                        }
                        enc.push(percent_encode(&seg));
                    }
                    out.push_str(&enc.join("/"));
                }
                Piece::Var(var) => {
                    let (name, v) = var_value(var, inputs)?;
                    if in_path {
                        no_dot_segment(&name, &v)?;
                    }
                    out.push_str(&percent_encode(&v));
                }
            }
        }
        // A value next to a literal can still make a dot segment: an empty `{query.a}` in
        // `/x/{query.a}..` gives `/x/..`. Refuse any the template's own literals do not have.
        let path = out.split('?').next().unwrap_or("");
        if dot_segments(path) > self.literal_dot_segments() {
            return Err(RenderError::Unsafe(format!(
                "the values make a `.` or `..` segment in `{path}`, which is not allowed"
            )));
        }
        Ok(out)
    }

    /// The `.` and `..` segments the template's path part has as whole literal segments.
    fn literal_dot_segments(&self) -> usize {
        let mut text = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => text.push_str(s),
                Piece::Var(_) => text.push_str("{}"),
            }
        }
        dot_segments(text.split('?').next().unwrap_or(""))
    }
}

fn dot_segments(path: &str) -> usize {
    path.split('/').filter(|s| *s == "." || *s == "..").count()
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// A call's answer has no usable value for a variable.
    Missing(String),
    /// A value would change the path's structure (`.` or `..`).
    Unsafe(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Missing(s) | RenderError::Unsafe(s) => f.write_str(s),
        }
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
        ["consumer"] => Ok(Var::Consumer),
        [one] => Ok(Var::Route((*one).to_string())),
        ["query", q] => Ok(Var::Query((*q).to_string())),
        ["query", ..] => Err(format!("bad variable `{{{name}}}`: use `{{query.NAME}}`")),
        ["identity", h] => Ok(Var::Identity(h.to_ascii_lowercase())),
        ["identity", ..] => Err(format!(
            "bad variable `{{{name}}}`: use `{{identity.HEADER}}`"
        )),
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

/// A value that would be a whole `.` or `..` path segment is refused.
fn no_dot_segment(name: &str, v: &str) -> Result<(), RenderError> {
    if v == "." || v == ".." {
        Err(RenderError::Unsafe(format!(
            "`{{{name}}}` is `{v}`, which is not allowed in a path"
        )))
    } else {
        Ok(())
    }
}

/// The value of a variable other than a route variable, and its name for errors.
fn var_value(var: &Var, inputs: &Inputs<'_>) -> Result<(String, String), RenderError> {
    match var {
        Var::Route(n) => Ok((n.clone(), inputs.params.get(n).unwrap_or("").to_string())),
        Var::Consumer => {
            let v = inputs.consumer.ok_or_else(|| {
                RenderError::Missing("`{consumer}`: the request has no consumer".into())
            })?;
            Ok(("consumer".into(), v.to_string()))
        }
        Var::Identity(h) => {
            let v = inputs
                .identity
                .iter()
                .find(|(k, _)| k == h)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    RenderError::Missing(format!("`{{identity.{h}}}`: the request has no `{h}`"))
                })?;
            Ok((format!("identity.{h}"), v))
        }
        Var::Query(n) => Ok((
            format!("query.{n}"),
            query_param(inputs.query, n).unwrap_or_default(),
        )),
        Var::Field(call, path) => {
            let missing =
                || RenderError::Missing(format!("`{{{call}.{}}}` has no value", path.join(".")));
            let answer = (inputs.answer)(call).ok_or_else(missing)?;
            let text = match lookup(answer, path).ok_or_else(missing)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(missing()),
            };
            Ok((format!("{call}.{}", path.join(".")), text))
        }
    }
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
            consumer: None,
            identity: &[],
            answer: &answer,
        };
        assert_eq!(
            t.render(&inputs).unwrap(),
            "/c/3/a%20b?q=h%C3%A9%20llo&x=1&o=x%2Fy"
        );
        let t2 = PathTemplate::parse("/p/{user.nope}").unwrap();
        assert!(t2
            .render(&inputs)
            .unwrap_err()
            .to_string()
            .contains("{user.nope}"));
        let t3 = PathTemplate::parse("/p/{missing.id}").unwrap();
        assert!(t3.render(&inputs).is_err());
    }

    #[test]
    fn dot_segments_are_refused_in_the_path_only() {
        let params = RouteParams(vec![
            ("id".into(), "..".into()),
            ("rest".into(), "a/%2E%2E/b".into()),
            ("ok".into(), "a/b..c".into()),
        ]);
        let user = json!({"company_id": "..", "dot": "."});
        let answer = |n: &str| (n == "user").then_some(&user);
        let identity = vec![("x-org".to_string(), "..".to_string())];
        let inputs = Inputs {
            params: &params,
            query: "q=..",
            consumer: Some(".."),
            identity: &identity,
            answer: &answer,
        };
        for t in [
            "/c/{id}",
            "/c/{rest}",
            "/c/{query.q}",
            "/c/{user.company_id}",
            "/c/{user.dot}/x",
            "/c/{consumer}",
            "/c/{identity.x-org}",
        ] {
            let e = PathTemplate::parse(t).unwrap().render(&inputs).unwrap_err();
            assert!(matches!(e, RenderError::Unsafe(_)), "{t}: {e:?}");
        }
        let t = PathTemplate::parse("/c/{ok}?q={query.q}&c={user.company_id}&i={id}").unwrap();
        assert_eq!(t.render(&inputs).unwrap(), "/c/a/b..c?q=..&c=..&i=..");
    }

    #[test]
    fn values_next_to_dots_cannot_make_a_dot_segment() {
        // Found by the `template` fuzz target: an empty value beside a literal dot.
        let params = RouteParams(vec![("rest".into(), "x/".into())]);
        let none = |_: &str| None;
        let inputs = Inputs {
            params: &params,
            query: "a=&b=",
            consumer: None,
            identity: &[],
            answer: &none,
        };
        for t in [
            "/{query.a}.",
            "/x/{query.a}.{query.b}.",
            "/a{rest}.",
            "/{query.a}..?x=1",
        ] {
            let e = PathTemplate::parse(t).unwrap().render(&inputs).unwrap_err();
            assert!(matches!(e, RenderError::Unsafe(_)), "{t}: {e:?}");
        }
        // Dot segments the template writes itself, and dots inside a segment, stay allowed.
        for (t, want) in [
            ("/a/../{query.a}b", "/a/../b"),
            ("/{query.a}.json", "/.json"),
        ] {
            assert_eq!(
                PathTemplate::parse(t).unwrap().render(&inputs).unwrap(),
                want
            );
        }
    }

    #[test]
    fn the_identity_fills_consumer_and_identity_variables() {
        let t = PathTemplate::parse("/users/{consumer}?org={identity.X-Org}").unwrap();
        assert_eq!(
            t.vars().cloned().collect::<Vec<_>>(),
            vec![Var::Consumer, Var::Identity("x-org".into())]
        );
        let params = RouteParams(vec![("consumer".into(), "mallory".into())]);
        let none = |_: &str| None;
        let identity = vec![("x-org".to_string(), "o 1".to_string())];
        let mut inputs = Inputs {
            params: &params,
            query: "",
            consumer: Some("demo/alice"),
            identity: &identity,
            answer: &none,
        };
        assert_eq!(t.render(&inputs).unwrap(), "/users/demo%2Falice?org=o%201");
        inputs.consumer = None;
        let e = t.render(&inputs).unwrap_err();
        assert!(matches!(e, RenderError::Missing(_)), "{e:?}");
        inputs.consumer = Some("alice");
        inputs.identity = &[];
        assert!(t.render(&inputs).unwrap_err().to_string().contains("x-org"));
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
            ("/a/{identity.a.b}", "identity.HEADER"),
        ] {
            let e = PathTemplate::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }
}
