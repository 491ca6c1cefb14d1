//! The messages of Envoy's rate limit service protocol, `envoy.service.ratelimit.v3`
//! (`RateLimitService/ShouldRateLimit`), written by hand as `prost` structs from Envoy's
//! `rls.proto`, `ratelimit.proto` and `base.proto`, with the same field numbers. Only the fields a
//! rate limit client and a simple server use are declared; a decoder skips the others
//! (`raw_body`, `dynamic_metadata`, `quota`, per-descriptor `limit` overrides), so answers from
//! servers that send them still decode. No `protoc` is needed, and the crate builds for
//! wasm32-wasip1 (the ratelimit filter encodes requests and decodes answers with it).

use prost::Message;

/// The gRPC service name.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// The one method of the service.
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    /// The namespace of the limits (`domain` in envoyproxy/ratelimit, the namespace in Limitador).
    #[prost(string, tag = "1")]
    pub domain: String,
    /// What to limit on; the server limits on all of them and answers `OVER_LIMIT` if any is
    /// over.
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// Units this request takes; 0 means 1.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    /// Ordered key/value entries.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    /// Descriptor key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Descriptor value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    /// The overall answer: [`Code::OverLimit`] if any descriptor is over its limit.
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    /// One status per descriptor of the request, in order (a server may send none).
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    /// Headers the server wants on the client's answer.
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<HeaderValue>,
    /// Headers the server wants on the upstream request.
    #[prost(message, repeated, tag = "4")]
    pub request_headers_to_add: Vec<HeaderValue>,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    /// The server could not decide (Envoy's filter treats it as OK).
    Unknown = 0,
    /// Under the limit.
    Ok = 1,
    /// Over the limit.
    OverLimit = 2,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    /// The answer for this descriptor.
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    /// The limit that applied; absent when none did.
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    /// Units left in the current window.
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    /// Time until the current window ends.
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimit {
    /// Units per `unit`.
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// The window.
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
    /// A name for the limit.
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    /// Not one of the others.
    Unknown = 0,
    /// A second.
    Second = 1,
    /// A minute.
    Minute = 2,
    /// An hour.
    Hour = 3,
    /// A day.
    Day = 4,
    /// A month.
    Month = 5,
    /// A year.
    Year = 6,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderValue {
    /// Header name.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Header value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Duration {
    /// Whole seconds.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds, 0 to 999,999,999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Duration {
    /// Milliseconds, rounded up; negative durations are 0.
    pub fn as_millis_ceil(&self) -> u64 {
        let secs = u64::try_from(self.seconds).unwrap_or(0);
        let nanos = u64::try_from(self.nanos).unwrap_or(0);
        secs.saturating_mul(1000)
            .saturating_add(nanos.div_ceil(1_000_000))
    }

    /// A duration of `ms` milliseconds.
    pub fn from_millis(ms: u64) -> Self {
        Duration {
            seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
        }
    }
}

impl RateLimitRequest {
    /// The request as protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

impl RateLimitResponse {
    /// Decode an answer; `None` when the bytes are not a valid message.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::decode(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encodes_with_envoys_field_numbers() {
        let req = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "k".into(),
                    value: "v".into(),
                }],
            }],
            hits_addend: 3,
        };
        // field 1 "d", field 2 { field 1 { field 1 "k", field 2 "v" } }, field 3 = 3
        assert_eq!(
            req.to_bytes(),
            vec![0x0a, 1, b'd', 0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 3]
        );
    }

    #[test]
    fn response_decodes_and_skips_unknown_fields() {
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(RateLimit {
                    requests_per_unit: 10,
                    unit: Unit::Minute as i32,
                    name: String::new(),
                }),
                limit_remaining: 0,
                duration_until_reset: Some(Duration::from_millis(1500)),
            }],
            response_headers_to_add: vec![],
            request_headers_to_add: vec![],
        };
        let mut bytes = resp.encode_to_vec();
        // an unknown field 5 (raw_body) as bytes
        bytes.extend_from_slice(&[0x2a, 2, b'h', b'i']);
        let back = RateLimitResponse::from_bytes(&bytes);
        assert_eq!(back.as_ref(), Some(&resp));
        assert_eq!(
            back.and_then(|r| r.statuses[0].duration_until_reset)
                .map(|d| d.as_millis_ceil()),
            Some(1500)
        );
        assert!(RateLimitResponse::from_bytes(&[0xff, 0xff]).is_none());
    }
}
