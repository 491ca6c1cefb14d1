//! The traits filter logic implements. Hooks take `&mut dyn Host` and return a [`Decision`];
//! the adapter turns decisions into proxy actions.

use crate::config::ConfigError;
use crate::host::Host;
use crate::problem::LocalReply;

/// What the proxy should do after a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on to the next filter.
    Continue,
    /// Hold the stream (for example, until a callout answers); resumed by a later decision.
    Pause,
    /// Stop and answer the client with this local reply.
    Respond(LocalReply),
}

/// The answer to an HTTP callout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResponse {
    /// Response headers, including `:status`; empty when the call failed (reset, timeout, no
    /// healthy upstream).
    pub headers: Vec<(String, String)>,
    /// Response body, possibly empty.
    pub body: Vec<u8>,
}

impl CallResponse {
    /// The HTTP status, or `None` when the call failed before any answer.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }
    /// A response header by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The answer to a unary gRPC callout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcResponse {
    /// gRPC status code: 0 is OK; 4 is a deadline exceeded (the callout timed out), 14 is
    /// unavailable (no healthy upstream, connection failure), and so on.
    pub status: u32,
    /// The status message, when the proxy or the server gave one.
    pub message: Option<String>,
    /// The serialized response message (protobuf); empty unless `status` is 0.
    pub body: Vec<u8>,
}

/// The optional per-request stream hooks a filter uses: each is a `proxy_on_*` export of its
/// module, and each export Envoy calls is one entry into the VM (about 4 µs; see
/// docs/benchmarks.md). Request headers and context creation are always exported (every
/// request needs them); `proxy_on_done` only for a filter with an `on_done` (`done`). Request
/// and response trailers, metadata, `proxy_on_log` and `proxy_on_delete` are never exported: no
/// filter uses them.
///
/// A filter that pauses its request headers does not need the request body hook to hold the
/// body: proxy-wasm-cpp-host turns a `Pause` from a headers hook into Envoy's
/// `StopAllIterationAndWatermark`, so no body chunk reaches the filter, or passes it, until the
/// stream is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    /// `proxy_on_request_body` (each request body chunk).
    pub request_body: bool,
    /// `proxy_on_response_headers`.
    pub response_headers: bool,
    /// `proxy_on_response_body` (each response body chunk).
    pub response_body: bool,
    /// `proxy_on_done` (the request is complete): needed by a filter with an
    /// [`HttpFilter::on_done`]. Without it Envoy makes one entry fewer per request, and the
    /// dispatcher forgets a request once its last exported hook has run and it waits for
    /// nothing (`dispatch`, rule 4).
    pub done: bool,
}

impl Hooks {
    /// Every optional hook.
    pub const ALL: Hooks = Hooks {
        request_body: true,
        response_headers: true,
        response_body: true,
        done: true,
    };
    /// No optional hook: request headers only (and no `proxy_on_done`).
    pub const NONE: Hooks = Hooks {
        request_body: false,
        response_headers: false,
        response_body: false,
        done: false,
    };

    /// The same hooks as `other` (usable in constants, where `==` is not).
    pub const fn same(self, other: Hooks) -> bool {
        self.request_body == other.request_body
            && self.response_headers == other.response_headers
            && self.response_body == other.response_body
            && self.done == other.done
    }

    /// The hooks of either (a module that runs several filters exports the union).
    pub const fn union(self, other: Hooks) -> Hooks {
        Hooks {
            request_body: self.request_body || other.request_body,
            response_headers: self.response_headers || other.response_headers,
            response_body: self.response_body || other.response_body,
            done: self.done || other.done,
        }
    }

    /// The exported names (`proxy_on_request_body`, ...), in ABI order.
    pub fn exports(self) -> Vec<&'static str> {
        [
            (self.request_body, "proxy_on_request_body"),
            (self.response_headers, "proxy_on_response_headers"),
            (self.response_body, "proxy_on_response_body"),
            (self.done, "proxy_on_done"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// The request headers a root's filters read, declared after configuration
/// ([`RootFilter::request_header_reads`]). The request's header cache reads a small known set
/// value by value (one `proxy_get_header_map_value` each) instead of copying the whole map: in
/// Envoy one value costs about half the map of a plain request (docs/architecture.md, rule 7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HeaderReads {
    /// Any header, in any hook: the first read fetches the whole map.
    #[default]
    Any,
    /// At most these (lower-case names), in any hook; a read of another header still works (it
    /// fetches the whole map), so a missing name costs time, never a wrong answer — except in a
    /// response hook, where Envoy refuses to read the request headers and an undeclared header
    /// not read before reads as absent.
    Only(Vec<String>),
}

impl HeaderReads {
    /// No request header at all.
    pub const NONE: HeaderReads = HeaderReads::Only(Vec::new());

    /// Only `names` (lower-cased, each once).
    pub fn only<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> HeaderReads {
        HeaderReads::NONE.with(names)
    }

    /// What either reads (a module that runs several filters reads the union): `Any` when
    /// either reads any.
    pub fn and(self, other: HeaderReads) -> HeaderReads {
        match other {
            HeaderReads::Only(names) => self.with(names),
            HeaderReads::Any => HeaderReads::Any,
        }
    }

    /// These and `names`.
    pub fn with<S: AsRef<str>>(self, names: impl IntoIterator<Item = S>) -> HeaderReads {
        let HeaderReads::Only(mut all) = self else {
            return HeaderReads::Any;
        };
        for n in names {
            let n = n.as_ref().to_ascii_lowercase();
            if !all.contains(&n) {
                all.push(n);
            }
        }
        HeaderReads::Only(all)
    }
}

/// Per-request filter logic. Every hook defaults to [`Decision::Continue`].
pub trait HttpFilter {
    /// Request headers arrived.
    fn on_request_headers(&mut self, _host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        Decision::Continue
    }
    /// A piece of the request body arrived; `body_size` is the total buffered so far.
    fn on_request_body(
        &mut self,
        _host: &mut dyn Host,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Decision {
        Decision::Continue
    }
    /// Response headers arrived.
    fn on_response_headers(&mut self, _host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        Decision::Continue
    }
    /// A piece of the response body arrived; `body_size` is the total buffered so far.
    fn on_response_body(
        &mut self,
        _host: &mut dyn Host,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Decision {
        Decision::Continue
    }
    /// An HTTP callout started by this request answered (or failed). `Continue` resumes the
    /// paused stream, `Respond` answers the client, `Pause` keeps waiting.
    fn on_call_response(
        &mut self,
        _host: &mut dyn Host,
        _token: u32,
        _response: CallResponse,
    ) -> Decision {
        Decision::Continue
    }
    /// A gRPC callout started by this request answered (or failed). Decisions are applied as
    /// for HTTP callout answers.
    fn on_grpc_response(
        &mut self,
        _host: &mut dyn Host,
        _token: u32,
        _response: GrpcResponse,
    ) -> Decision {
        Decision::Continue
    }
    /// The largest body of the answer to callout `token` this filter wants: a longer body is
    /// cut to `limit + 1` bytes before it is copied into the VM, so the filter sees that it is
    /// too large without a huge answer filling the VM's memory. Default: no limit.
    fn call_body_limit(&self, _token: u32) -> Option<usize> {
        None
    }
    /// Another context (usually the root, for example when a key fetch this request waits
    /// for has finished, or on a timer in `on_tick`) woke this request with [`Host::wake`].
    /// Decisions are applied as for callout answers: `Continue` resumes a paused stream.
    fn on_wake(&mut self, _host: &mut dyn Host, _reason: u32) -> Decision {
        Decision::Continue
    }
    /// The stream is complete (access-log time). Runs only for a root whose
    /// [`RootFilter::HOOKS`] has `done` (its module exports `proxy_on_done`).
    fn on_done(&mut self, _host: &mut dyn Host) {}
}

/// Per-VM (per worker) logic: configuration, background work, and creating request filters.
pub trait RootFilter: Sized + 'static {
    /// The per-request filter this root creates.
    type Filter: HttpFilter + 'static;
    /// Filter name used in logs and metric names, such as `auth`.
    const NAME: &'static str;
    /// The optional stream hooks this filter uses, hence the ones its module exports
    /// (`export_filter!(Root, hooks(...))` lists the same, checked when compiling). Envoy never
    /// enters a module for a hook it does not export, and the test driver does not run one
    /// either. Default: all of them.
    const HOOKS: Hooks = Hooks::ALL;

    /// A root for a new VM context.
    fn new(context_id: u32) -> Self;
    /// Parse and compile the plugin configuration. An error refuses the configuration; the
    /// adapter logs it as one line.
    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError>;
    /// Periodic work, when a tick period was set.
    fn on_tick(&mut self, _host: &mut dyn Host) {}
    /// An HTTP callout started by the root answered (or failed).
    fn on_call_response(&mut self, _host: &mut dyn Host, _token: u32, _response: CallResponse) {}
    /// A gRPC callout started by the root answered (or failed).
    fn on_grpc_response(&mut self, _host: &mut dyn Host, _token: u32, _response: GrpcResponse) {}
    /// A filter for a new request.
    fn create_filter(&self, context_id: u32) -> Self::Filter;
    /// The request headers this root's filters read, in any hook, under the configuration in
    /// force (asked after each accepted configuration). Default: any ([`HeaderReads::Any`]).
    fn request_header_reads(&self) -> HeaderReads {
        HeaderReads::Any
    }
    /// How the dispatcher's log lines for this filter start (VM start, configuration accepted or
    /// refused): `tollgate-<NAME>`.
    fn log_name() -> String {
        format!("tollgate-{}", Self::NAME)
    }
}
