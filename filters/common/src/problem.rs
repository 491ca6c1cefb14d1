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
    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and a map of JSON values cannot fail; fall back to a
        // minimal body rather than panic.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            format!("{{\"type\":\"about:blank\",\"status\":{}}}", self.status).into_bytes()
        })
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
    fn plain_problem_uses_about_blank_and_reason() {
        let v: Value = serde_json::from_slice(&Problem::new(401).to_json()).unwrap();
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Unauthorized");
        assert!(v.get("detail").is_none());
        assert_eq!(Problem::new(599).title, "Error");
    }
}
