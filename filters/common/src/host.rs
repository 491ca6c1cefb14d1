//! The host trait: everything filter logic may ask of the proxy.

use std::time::{Duration, SystemTime};

/// Which header map a header operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapKind {
    /// Headers of the downstream request (includes `:method`, `:path`, `:authority`).
    RequestHeaders,
    /// Trailers of the downstream request.
    RequestTrailers,
    /// Headers of the upstream response (includes `:status`).
    ResponseHeaders,
    /// Trailers of the upstream response.
    ResponseTrailers,
    /// Headers of the answer to an HTTP callout, valid only while that answer is handled.
    CallResponseHeaders,
}

/// Which body buffer a body operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Body {
    /// The downstream request body seen so far.
    Request,
    /// The upstream response body seen so far.
    Response,
    /// The body of an HTTP callout answer, valid only while that answer is handled.
    CallResponse,
}

/// Kinds of metric a filter can define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// Distribution of recorded values.
    Histogram,
}

/// A host call failed; the adapter turns proxy statuses into these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The value is not available in this phase of the request (proxy status `BadArgument`).
    NotAvailable(&'static str),
    /// The proxy refused or failed the operation; the text names the operation.
    Failed(&'static str),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::NotAvailable(op) => write!(f, "{op}: not available in this phase"),
            HostError::Failed(op) => write!(f, "{op}: failed in the proxy"),
        }
    }
}

impl std::error::Error for HostError {}

/// Failure of a shared-data write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedError {
    /// Another writer changed the value since it was read: read again and retry.
    CasMismatch,
    /// Any other failure.
    Host(HostError),
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedError::CasMismatch => {
                f.write_str("shared data changed concurrently (CAS mismatch)")
            }
            SharedError::Host(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SharedError {}

/// An HTTP callout to an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall<'a> {
    /// Name of the Envoy cluster that receives the call.
    pub cluster: &'a str,
    /// Headers, including the pseudo-headers `:method`, `:path` and `:authority`.
    pub headers: Vec<(&'a str, &'a str)>,
    /// Optional request body.
    pub body: Option<&'a [u8]>,
    /// Time after which the proxy gives up on the call.
    pub timeout: Duration,
}

/// A unary gRPC callout to an Envoy cluster (for example Envoy's rate limit service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall<'a> {
    /// Name of the Envoy cluster that receives the call (it must speak HTTP/2).
    pub cluster: &'a str,
    /// Fully qualified service name, such as `envoy.service.ratelimit.v3.RateLimitService`.
    pub service: &'a str,
    /// Method name, such as `ShouldRateLimit`.
    pub method: &'a str,
    /// Initial metadata (request headers of the call).
    pub metadata: Vec<(&'a str, &'a [u8])>,
    /// The serialized request message (protobuf).
    pub message: &'a [u8],
    /// Time after which the proxy gives up on the call.
    pub timeout: Duration,
}

/// What filter logic may ask of the proxy. One implementation makes proxy-wasm hostcalls
/// ([`crate::adapter::ProxyWasm`]); another keeps everything in memory for unit tests
/// ([`crate::mem_host::MemHost`]).
pub trait Host {
    /// One header value (the first, if repeated); names are lower case.
    fn header(&self, map: MapKind, name: &str) -> Option<String>;
    /// All headers of a map, in order.
    fn headers(&self, map: MapKind) -> Vec<(String, String)>;
    /// Replace a header (every existing value) with one value.
    fn set_header(&mut self, map: MapKind, name: &str, value: &str);
    /// Add a header value, keeping existing ones.
    fn add_header(&mut self, map: MapKind, name: &str, value: &str);
    /// Remove every value of a header.
    fn remove_header(&mut self, map: MapKind, name: &str);

    /// Up to `max` bytes of a body buffer from `start`.
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>>;
    /// Replace `size` bytes at `start` of a body buffer with `data`.
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]);

    /// A property of the stream, such as `["source", "address"]` or `["xds", "route_name"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;

    /// A value in the proxy's shared data (shared by every worker of this VM id) and its CAS.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// Store a value; with `cas`, only if the value still has that CAS.
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError>;

    /// Start an HTTP callout; the answer arrives in `on_http_call_response` with the token.
    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError>;

    /// Start a unary gRPC callout; the answer arrives in `on_grpc_response` with the token.
    fn grpc_call(&mut self, _call: &GrpcCall<'_>) -> Result<u32, HostError> {
        Err(HostError::Failed("dispatch_grpc_call"))
    }

    /// Wall-clock time as the proxy sees it.
    fn now(&self) -> SystemTime;

    /// Define (or look up) a metric by its full name and get its id.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    /// Add to a counter or gauge.
    fn increment_metric(&mut self, id: u32, delta: i64);
    /// Set a gauge or record a histogram value.
    fn record_metric(&mut self, id: u32, value: u64);

    /// Ask for `on_tick` every `period` (root context only); zero stops the ticks.
    fn set_tick_period(&mut self, period: Duration);

    /// Wake the request whose HTTP context id is `context_id`: its filter's `on_wake` runs with
    /// `reason`, after the current hook returns (never inside it; see `dispatch` for when).
    /// Callouts that `on_wake` starts are answered to that request. Returns false when that
    /// request is gone (finished or reset). Typically called by a root that keeps a list of
    /// waiting requests (their ids come from `RootFilter::create_filter`).
    fn wake(&mut self, _context_id: u32, _reason: u32) -> bool {
        false
    }

    /// The request's method (`:method`), empty when missing.
    fn method(&self) -> String {
        self.header(MapKind::RequestHeaders, ":method")
            .unwrap_or_default()
    }
    /// The request's path with query (`:path`), empty when missing.
    fn path(&self) -> String {
        self.header(MapKind::RequestHeaders, ":path")
            .unwrap_or_default()
    }
    /// The request's authority (`:authority`, else `host`), empty when missing.
    fn authority(&self) -> String {
        self.header(MapKind::RequestHeaders, ":authority")
            .or_else(|| self.header(MapKind::RequestHeaders, "host"))
            .unwrap_or_default()
    }
    /// Seconds since the Unix epoch, as a float.
    fn now_secs(&self) -> f64 {
        self.now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}
