//! RFC 9457 problem details and local replies.

use serde::Serialize;
use serde_json::{Map, Value};

/// Media type of problem replies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A local reply the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status code.
    pub status: u16,
    /// Headers of the reply (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl LocalReply {
    /// A reply with a status, no headers and no body.
    pub fn new(status: u16) -> Self {
        LocalReply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    /// Add a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Set the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// A header value by name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An RFC 9457 problem: `type`, `title`, `status`, `detail`, `instance` and extension members.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// URI that identifies the problem type; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short, human-readable summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Explanation specific to this occurrence; never contains a credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// URI reference of this occurrence (usually the request path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Extension members, serialized at the top level.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

impl Problem {
    /// A problem with `type` `about:blank` and the status's reason phrase as title.
    pub fn new(status: u16) -> Self {
        Problem {
            type_uri: "about:blank".into(),
            title: reason_phrase(status).into(),
            status,
            detail: None,
            instance: None,
            extensions: Map::new(),
        }
    }
    /// Set the problem type URI and title.
    pub fn typed(mut self, type_uri: impl Into<String>, title: impl Into<String>) -> Self {
        self.type_uri = type_uri.into();
        self.title = title.into();
        self
    }
    /// Set the detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    /// Set the instance.
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }
    /// Add an extension member.
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }
    /// The JSON body: the members in the order of the struct, then the extensions, written
    /// straight into one buffer (the same bytes as `serde_json::to_vec`, without serde's
    /// flattening, which cost a 429 of the rate limiter about half its own work).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(
            96 + self.type_uri.len()
                + self.title.len()
                + self.detail.as_ref().map_or(0, String::len)
                + self.instance.as_ref().map_or(0, String::len),
        );
        out.push_str("{\"type\":");
        push_json_str(&mut out, &self.type_uri);
        out.push_str(",\"title\":");
        push_json_str(&mut out, &self.title);
        out.push_str(",\"status\":");
        crate::decimal::push_u64(&mut out, u64::from(self.status));
        for (name, value) in [("detail", &self.detail), ("instance", &self.instance)] {
            if let Some(v) = value {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_json_str(&mut out, v);
            }
        }
        for (name, value) in &self.extensions {
            out.push(',');
            push_json_str(&mut out, name);
            out.push(':');
            push_json_value(&mut out, value);
        }
        out.push('}');
        out.into_bytes()
    }

    /// The local reply: status, `content-type: application/problem+json`, JSON body.
    pub fn into_reply(self) -> LocalReply {
        let body = self.to_json();
        LocalReply::new(self.status)
            .with_header("content-type", PROBLEM_JSON)
            .with_header("cache-control", "no-store")
            .with_body(body)
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it: `"`, `\\` and the control
/// characters (`\b \f \n \r \t` by name, the others as `\u00XX`); everything else as is.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(s.get(plain..i).unwrap_or(""));
        plain = i + 1;
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escaped);
        }
    }
    out.push_str(s.get(plain..).unwrap_or(""));
    out.push('"');
}

/// A JSON value as serde_json writes it (compact).
fn push_json_value(out: &mut String, value: &Value) {
    match value {
        Value::String(s) => push_json_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(out, k);
                out.push(':');
                push_json_value(out, v);
            }
            out.push('}');
        }
        // null, booleans and numbers: their JSON text is their display.
        other => {
            use std::fmt::Write as _;
            let _ = write!(out, "{other}");
        }
    }
}

/// The reason phrase of common status codes (RFC 9110), `Error` for others.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_reply_has_media_type_and_members() {
        let reply = Problem::new(429)
            .typed(
                "https://iana.org/assignments/http-problem-types#quota-exceeded",
                "Quota Exceeded",
            )
            .detail("10 requests per second")
            .instance("/api/users/1")
            .extension("retry_after", 3)
            .into_reply();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("Content-Type"), Some(PROBLEM_JSON));
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            v["type"],
            "https://iana.org/assignments/http-problem-types#quota-exceeded"
        );
        assert_eq!(v["title"], "Quota Exceeded");
        assert_eq!(v["status"], 429);
        assert_eq!(v["detail"], "10 requests per second");
        assert_eq!(v["instance"], "/api/users/1");
        assert_eq!(v["retry_after"], 3);
    }

    #[test]
    fn the_body_is_what_serde_json_writes() {
        let awkward = "q\"b\\s/\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f} é ✓ 😀 </script>";
        let problems = [
            Problem::new(401),
            Problem::new(503).detail("the rate limit service is unavailable"),
            Problem::new(429)
                .typed("https://example/t", awkward)
                .detail(awkward)
                .instance("/a?b=\"c\"")
                .extension("violated-policies", vec!["a", awkward])
                .extension("retry", 3)
                .extension("ratio", 0.5)
                .extension("none", Value::Null)
                .extension("flag", true)
                .extension(awkward, serde_json::json!({"k": [1, "v", {"z": false}]})),
        ];
        for p in problems {
            let body = p.to_json();
            assert_eq!(
                String::from_utf8(body).unwrap(),
                String::from_utf8(serde_json::to_vec(&p).unwrap()).unwrap()
            );
        }
    }

    #[test]
    fn plain_problem_uses_about_blank_and_reason() {
        let v: Value = serde_json::from_slice(&Problem::new(401).to_json()).unwrap();
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Unauthorized");
        assert!(v.get("detail").is_none());
        assert_eq!(Problem::new(599).title, "Error");
    }
}
