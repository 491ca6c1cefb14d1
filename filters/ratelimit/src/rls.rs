//! Calls to a rate limit service (Envoy's RLS protocol, `ShouldRateLimit`): the descriptor of a
//! global limit for one request, the encoded call, and what an answer means.
//!
//! The descriptor of a limit is `("limit", <name>)` followed by one entry per key source, in
//! the order of its `key`: `consumer`, `plan`, `api_key` (a hash, never the key), `client_ip`,
//! `route`, `header.<name>`, `query.<name>`.

use std::time::Duration;

use tollgate_common::GrpcResponse;
use tollgate_rls_proto::{
    Code, Entry, RateLimitDescriptor, RateLimitRequest, RateLimitResponse, METHOD, SERVICE,
};

use crate::config::KeySource;
use crate::table::hash_parts;

/// gRPC service and method of every call.
pub const RLS_SERVICE: &str = SERVICE;
/// The method.
pub const RLS_METHOD: &str = METHOD;

/// The descriptor key of a key source.
pub fn entry_key(source: &KeySource) -> String {
    match source {
        KeySource::Consumer => "consumer".into(),
        KeySource::Plan => "plan".into(),
        KeySource::ApiKey => "api_key".into(),
        KeySource::ClientIp => "client_ip".into(),
        KeySource::Route => "route".into(),
        KeySource::Header(h) => format!("header.{}", h.as_str()),
        KeySource::Query(q) => format!("query.{q}"),
    }
}

/// The descriptor value of a key source: API keys travel as a hash (the service only needs to
/// tell keys apart; a credential has no business in its logs or in Redis).
pub fn entry_value(source: &KeySource, value: String) -> String {
    match source {
        KeySource::ApiKey => format!("{:016x}", hash_parts("api_key", [value.as_bytes()])),
        _ => value,
    }
}

/// The encoded `RateLimitRequest` for one limit's descriptor.
pub fn request(domain: &str, limit: &str, entries: &[(String, String)], hits: u64) -> Vec<u8> {
    let mut all = Vec::with_capacity(entries.len() + 1);
    all.push(Entry {
        key: "limit".into(),
        value: limit.into(),
    });
    all.extend(entries.iter().map(|(k, v)| Entry {
        key: k.clone(),
        value: v.clone(),
    }));
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor { entries: all }],
        hits_addend: u32::try_from(hits).unwrap_or(u32::MAX),
    }
    .to_bytes()
}

/// What the service said about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Admitted (the units were taken).
    Ok {
        /// Units left in the window, when the service said.
        remaining: Option<u64>,
        /// Time until the window ends, when the service said.
        reset: Option<Duration>,
    },
    /// Over the limit (nothing was taken by servers that check before counting).
    OverLimit {
        /// Units left, when the service said.
        remaining: Option<u64>,
        /// Time until the window ends, when the service said.
        reset: Option<Duration>,
    },
    /// No usable answer: an error status (unavailable, timeout, ...), a message that does not
    /// decode, or `UNKNOWN`.
    Failed(Failure),
}

/// Why a call gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A gRPC status other than OK (4: timed out, 14: unavailable, ...).
    Status(u32),
    /// The message did not decode, or said `UNKNOWN`.
    Garbage,
    /// The call could not be started (no such cluster).
    Dispatch,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(4) => f.write_str("timed out"),
            Failure::Status(14) => f.write_str("unavailable"),
            Failure::Status(s) => write!(f, "gRPC status {s}"),
            Failure::Garbage => f.write_str("an answer that is not a RateLimitResponse"),
            Failure::Dispatch => f.write_str("the call could not be started"),
        }
    }
}

/// Read a `ShouldRateLimit` answer (one descriptor was sent).
pub fn answer(response: &GrpcResponse) -> Answer {
    if response.status != 0 {
        return Answer::Failed(Failure::Status(response.status));
    }
    let Some(r) = RateLimitResponse::from_bytes(&response.body) else {
        return Answer::Failed(Failure::Garbage);
    };
    // The descriptor's status when there is one with a limit; a server may send none
    // (Limitador) or one without a limit (no limit applied).
    let status = r.statuses.first().filter(|s| s.current_limit.is_some());
    let remaining = status.map(|s| u64::from(s.limit_remaining));
    let reset = status
        .and_then(|s| s.duration_until_reset)
        .map(|d| Duration::from_millis(d.as_millis_ceil()));
    match Code::try_from(r.overall_code) {
        Ok(Code::Ok) => Answer::Ok { remaining, reset },
        Ok(Code::OverLimit) => Answer::OverLimit { remaining, reset },
        _ => Answer::Failed(Failure::Garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tollgate_rls_proto::DescriptorStatus;

    fn grpc(r: &RateLimitResponse) -> GrpcResponse {
        GrpcResponse {
            status: 0,
            message: None,
            body: r.encode_to_vec(),
        }
    }

    #[test]
    fn requests_carry_the_limit_and_the_key_entries() {
        let bytes = request(
            "tollgate",
            "fleet",
            &[("client_ip".into(), "10.0.0.1".into())],
            3,
        );
        let r = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.domain, "tollgate");
        assert_eq!(r.hits_addend, 3);
        let e = &r.descriptors[0].entries;
        assert_eq!((e[0].key.as_str(), e[0].value.as_str()), ("limit", "fleet"));
        assert_eq!(
            (e[1].key.as_str(), e[1].value.as_str()),
            ("client_ip", "10.0.0.1")
        );
        assert_eq!(
            entry_key(&KeySource::Header(
                tollgate_common::config::HeaderName::from_static("x-tenant")
            )),
            "header.x-tenant"
        );
        let hashed = entry_value(&KeySource::ApiKey, "s3cret".into());
        assert_eq!(hashed.len(), 16);
        assert!(!hashed.contains("s3cret"));
    }

    #[test]
    fn answers_map_to_ok_over_limit_or_failure() {
        let mut r = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(Default::default()),
                limit_remaining: 0,
                duration_until_reset: Some(tollgate_rls_proto::Duration::from_millis(2500)),
            }],
            response_headers_to_add: vec![],
            request_headers_to_add: vec![],
        };
        assert_eq!(
            answer(&grpc(&r)),
            Answer::OverLimit {
                remaining: Some(0),
                reset: Some(Duration::from_millis(2500))
            }
        );
        // Limitador sends no statuses
        r.overall_code = Code::Ok as i32;
        r.statuses.clear();
        assert_eq!(
            answer(&grpc(&r)),
            Answer::Ok {
                remaining: None,
                reset: None
            }
        );
        r.overall_code = Code::Unknown as i32;
        assert_eq!(answer(&grpc(&r)), Answer::Failed(Failure::Garbage));
        let garbage = GrpcResponse {
            status: 0,
            message: None,
            body: vec![0xff, 0xff, 0xff],
        };
        assert_eq!(answer(&garbage), Answer::Failed(Failure::Garbage));
        let down = GrpcResponse {
            status: 14,
            message: None,
            body: vec![],
        };
        assert_eq!(answer(&down), Answer::Failed(Failure::Status(14)));
    }
}
