//! The only code that calls proxy-wasm: [`ProxyWasmHost`] implements [`Host`] with hostcalls,
//! and [`RootAdapter`] / [`HttpAdapter`] drive a [`RootFilter`] and its [`HttpFilter`]s from
//! the proxy-wasm context traits. [`crate::export_filter!`] wires them up in a filter crate.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::abi;
use crate::filter::{CallResponse, Decision, GrpcResponse, HttpFilter, RootFilter};
use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};
use crate::problem::LocalReply;

/// [`Host`] over proxy-wasm hostcalls. Header values are read as bytes and converted lossily,
/// because the SDK's string getters panic on non-UTF-8 values that Envoy accepts.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyWasmHost;

fn map_type(map: MapKind) -> MapType {
    match map {
        MapKind::RequestHeaders => MapType::HttpRequestHeaders,
        MapKind::RequestTrailers => MapType::HttpRequestTrailers,
        MapKind::ResponseHeaders => MapType::HttpResponseHeaders,
        MapKind::ResponseTrailers => MapType::HttpResponseTrailers,
        MapKind::CallResponseHeaders => MapType::HttpCallResponseHeaders,
    }
}

fn buffer_type(which: Body) -> BufferType {
    match which {
        Body::Request => BufferType::HttpRequestBody,
        Body::Response => BufferType::HttpResponseBody,
        Body::CallResponse => BufferType::HttpCallResponseBody,
    }
}

fn host_error(op: &'static str, status: Status) -> HostError {
    match status {
        Status::BadArgument | Status::NotFound => HostError::NotAvailable(op),
        _ => HostError::Failed(op),
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl Host for ProxyWasmHost {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        match abi::get_header(map_type(map), name) {
            Ok(v) => v.map(lossy),
            Err(s) => {
                log::debug!("read header {name}: status {s} (map not available in this phase)");
                None
            }
        }
    }

    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        match abi::get_headers(map_type(map)) {
            Ok(m) => m.into_iter().map(|(k, v)| (k, lossy(v))).collect(),
            Err(s) => {
                log::debug!("read headers: status {s} (map not available in this phase)");
                Vec::new()
            }
        }
    }

    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        if let Err(s) = abi::set_header(map_type(map), name, value) {
            log::debug!("set header {name}: status {s} (map not available in this phase)");
        }
    }

    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        if let Err(s) = abi::add_header(map_type(map), name, value) {
            log::debug!("add header {name}: status {s} (map not available in this phase)");
        }
    }

    fn remove_header(&mut self, map: MapKind, name: &str) {
        if let Err(s) = abi::remove_header(map_type(map), name) {
            log::debug!("remove header {name}: status {s} (map not available in this phase)");
        }
    }

    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        match abi::get_buffer(buffer_type(which), start, max) {
            Ok(b) => b,
            Err(s) => {
                log::debug!("read body: status {s} (buffer not available in this phase)");
                None
            }
        }
    }

    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        if let Err(s) = abi::set_buffer(buffer_type(which), start, size, data) {
            log::debug!("set body: status {s} (buffer not available in this phase)");
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Ok(Some((v, cas))),
            Ok((Some(v), None)) => Ok(Some((v, 0))),
            Ok((None, _)) => Ok(None),
            Err(s) => Err(host_error("get_shared_data", s)),
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedError::CasMismatch),
            Err(s) => Err(SharedError::Host(host_error("set_shared_data", s))),
        }
    }

    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        hostcalls::dispatch_http_call(
            call.cluster,
            call.headers.clone(),
            call.body,
            Vec::new(),
            call.timeout,
        )
        .inspect(|token| record_call_owner(*token))
        .map_err(|s| host_error("dispatch_http_call", s))
    }

    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        hostcalls::dispatch_grpc_call(
            call.cluster,
            call.service,
            call.method,
            call.metadata.clone(),
            Some(call.message),
            call.timeout,
        )
        .inspect(|token| record_call_owner(*token))
        .map_err(|s| host_error("dispatch_grpc_call", s))
    }

    fn now(&self) -> SystemTime {
        hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(t, name).map_err(|s| host_error("define_metric", s))
    }

    fn increment_metric(&mut self, id: u32, delta: i64) {
        let _ = hostcalls::increment_metric(id, delta);
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn set_tick_period(&mut self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        wake_context(context_id, reason)
    }
}

/// Install the logger (at `info` until the VM starts; hostcalls such as `get_log_level` are
/// refused while the module initializes).
pub fn init_logging() {
    proxy_wasm::set_log_level(LogLevel::Info);
}

/// Follow the proxy's log level, so disabled levels cost no hostcall.
fn follow_proxy_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

fn send_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Err(s) = abi::send_local_response(u32::from(reply.status), &headers, &reply.body) {
        log::warn!("send local reply {}: status {s}", reply.status);
    }
}

/// Read a callout answer. With `limit`, at most `limit + 1` bytes of the body are copied into
/// the VM (so that the filter can tell it was too large without a huge answer filling the VM's
/// memory).
fn call_response(num_headers: usize, body_size: usize, limit: Option<usize>) -> CallResponse {
    let host = ProxyWasmHost;
    let headers = if num_headers > 0 {
        host.headers(MapKind::CallResponseHeaders)
    } else {
        Vec::new()
    };
    let take = match limit {
        Some(l) => body_size.min(l.saturating_add(1)),
        None => body_size,
    };
    let body = if take > 0 {
        host.body(Body::CallResponse, 0, take).unwrap_or_default()
    } else {
        Vec::new()
    };
    CallResponse { headers, body }
}

/// Read a gRPC callout answer (its status, status message and, on success, the message).
fn grpc_response(status: u32, size: usize) -> GrpcResponse {
    // The status message is not read yet: the SDK's `get_grpc_status` panics on a message
    // that is not UTF-8.
    let message = None;
    let body = if status == 0 && size > 0 {
        abi::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    GrpcResponse {
        status,
        message,
        body,
    }
}

/// The body limit asked for by the HTTP context that will get the answer to `token`: the woken
/// request that started the call, if it was one, else `own`.
fn call_body_limit(token: u32, own: Option<&dyn Wakeable>) -> Option<usize> {
    match CALL_OWNERS.with(|m| m.borrow().get(&token).copied()) {
        Some(owner) => CONTEXTS
            .with(|m| m.borrow().get(&owner).and_then(Weak::upgrade))
            .and_then(|t| t.call_body_limit(token)),
        None => own.and_then(|t| t.call_body_limit(token)),
    }
}

thread_local! {
    /// Live HTTP contexts of this VM, so that [`Host::wake`] can reach them.
    static CONTEXTS: RefCell<HashMap<u32, Weak<dyn Wakeable>>> = RefCell::new(HashMap::new());
    /// The context the proxy is currently calling into (what `set_effective_context` restores).
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
    /// While a woken request runs, its id: callouts it starts are answered to it.
    static WAKING: Cell<Option<u32>> = const { Cell::new(None) };
    /// Callouts started by a woken request: token -> HTTP context id. The SDK registers them
    /// to the context that was active (the waker), whose adapter forwards the answer.
    static CALL_OWNERS: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
}

/// An HTTP context that can be woken or handed a forwarded callout answer.
trait Wakeable {
    fn wake(&self, reason: u32);
    fn call_response(&self, token: u32, response: CallResponse);
    fn grpc_response(&self, token: u32, response: GrpcResponse);
    fn call_body_limit(&self, token: u32) -> Option<usize>;
}

fn record_call_owner(token: u32) {
    if let Some(owner) = WAKING.with(Cell::get) {
        CALL_OWNERS.with(|m| m.borrow_mut().insert(token, owner));
    }
}

/// Run `f` on the live HTTP context `context_id` with the proxy's effective context switched
/// to it, then switch back. False when the context is gone or busy.
fn with_context(context_id: u32, f: impl FnOnce(&dyn Wakeable)) -> bool {
    let Some(target) = CONTEXTS.with(|m| m.borrow().get(&context_id).and_then(Weak::upgrade))
    else {
        return false;
    };
    let previous = ACTIVE.with(Cell::get);
    if hostcalls::set_effective_context(context_id).is_err() {
        return false;
    }
    ACTIVE.with(|a| a.set(context_id));
    let outer = WAKING.with(|w| w.replace(Some(context_id)));
    f(target.as_ref());
    WAKING.with(|w| w.set(outer));
    ACTIVE.with(|a| a.set(previous));
    let _ = hostcalls::set_effective_context(previous);
    true
}

fn wake_context(context_id: u32, reason: u32) -> bool {
    with_context(context_id, |t| t.wake(reason))
}

/// Deliver a gRPC answer to the woken request that started the call, if it was one.
fn forward_grpc_response(token: u32, response: GrpcResponse) -> Result<(), GrpcResponse> {
    let Some(owner) = CALL_OWNERS.with(|m| m.borrow_mut().remove(&token)) else {
        return Err(response);
    };
    let mut response = Some(response);
    with_context(owner, |t| {
        if let Some(r) = response.take() {
            t.grpc_response(token, r);
        }
    });
    Ok(())
}

/// Deliver a callout answer to the woken request that started the call, if it was one.
fn forward_call_response(token: u32, response: CallResponse) -> Result<(), CallResponse> {
    let Some(owner) = CALL_OWNERS.with(|m| m.borrow_mut().remove(&token)) else {
        return Err(response);
    };
    let mut response = Some(response);
    with_context(owner, |t| {
        if let Some(r) = response.take() {
            t.call_response(token, r);
        }
    });
    Ok(())
}

/// Drives a [`RootFilter`] from proxy-wasm's root context.
pub struct RootAdapter<R: RootFilter> {
    root: R,
    context_id: u32,
    version: &'static str,
}

impl<R: RootFilter> RootAdapter<R> {
    /// A root adapter; `version` is the filter crate's version, logged at VM start.
    pub fn new(context_id: u32, version: &'static str) -> Self {
        RootAdapter {
            root: R::new(context_id),
            context_id,
            version,
        }
    }

    fn enter(&self) {
        ACTIVE.with(|a| a.set(self.context_id));
    }
}

impl<R: RootFilter> Context for RootAdapter<R> {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        self.enter();
        let limit = call_body_limit(token, None);
        let response = call_response(num_headers, body_size, limit);
        if let Err(response) = forward_call_response(token, response) {
            self.root
                .on_call_response(&mut ProxyWasmHost, token, response);
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.enter();
        let response = grpc_response(status, size);
        if let Err(response) = forward_grpc_response(token, response) {
            self.root
                .on_grpc_response(&mut ProxyWasmHost, token, response);
        }
    }
}

impl<R: RootFilter> RootContext for RootAdapter<R> {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.enter();
        follow_proxy_log_level();
        log::info!("tollgate-{} {}: VM started", R::NAME, self.version);
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        self.enter();
        let bytes = if size > 0 {
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        match self.root.configure(&mut ProxyWasmHost, &bytes) {
            Ok(()) => {
                log::info!(
                    "tollgate-{} {}: configuration accepted",
                    R::NAME,
                    self.version
                );
                true
            }
            Err(e) => {
                log::error!("tollgate-{}: {e}", R::NAME);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.enter();
        self.root.on_tick(&mut ProxyWasmHost);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let inner = Rc::new(HttpInner {
            filter: RefCell::new(self.root.create_filter(context_id)),
            paused: Cell::new(None),
        });
        let weak: Weak<dyn Wakeable> = Rc::downgrade(&(inner.clone() as Rc<dyn Wakeable>));
        CONTEXTS.with(|m| m.borrow_mut().insert(context_id, weak));
        Some(Box::new(HttpAdapter { inner, context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Request,
    Response,
}

struct HttpInner<F: HttpFilter> {
    filter: RefCell<F>,
    paused: Cell<Option<Stream>>,
}

impl<F: HttpFilter> HttpInner<F> {
    /// Apply a decision taken inside a hook of `stream`.
    fn act(&self, stream: Stream, d: Decision) -> Action {
        match d {
            Decision::Continue => Action::Continue,
            Decision::Pause => {
                self.paused.set(Some(stream));
                Action::Pause
            }
            Decision::Respond(reply) => {
                self.paused.set(None);
                send_reply(&reply);
                Action::Pause
            }
        }
    }

    /// Apply a decision taken outside a stream hook (callout answer, wake).
    fn act_async(&self, d: Decision) {
        match d {
            Decision::Pause => {}
            Decision::Continue => match self.paused.take() {
                Some(Stream::Request) => {
                    let _ = hostcalls::resume_http_request();
                }
                Some(Stream::Response) => {
                    let _ = hostcalls::resume_http_response();
                }
                None => {}
            },
            Decision::Respond(reply) => {
                self.paused.set(None);
                send_reply(&reply);
            }
        }
    }

    fn hook(&self, stream: Stream, f: impl FnOnce(&mut F) -> Decision) -> Action {
        let d = match self.filter.try_borrow_mut() {
            Ok(mut filter) => f(&mut filter),
            Err(_) => return Action::Continue,
        };
        self.act(stream, d)
    }
}

impl<F: HttpFilter> Wakeable for HttpInner<F> {
    fn wake(&self, reason: u32) {
        let d = match self.filter.try_borrow_mut() {
            Ok(mut filter) => filter.on_wake(&mut ProxyWasmHost, reason),
            Err(_) => return,
        };
        self.act_async(d);
    }

    fn call_response(&self, token: u32, response: CallResponse) {
        let d = match self.filter.try_borrow_mut() {
            Ok(mut filter) => filter.on_call_response(&mut ProxyWasmHost, token, response),
            Err(_) => return,
        };
        self.act_async(d);
    }

    fn grpc_response(&self, token: u32, response: GrpcResponse) {
        let d = match self.filter.try_borrow_mut() {
            Ok(mut filter) => filter.on_grpc_response(&mut ProxyWasmHost, token, response),
            Err(_) => return,
        };
        self.act_async(d);
    }

    fn call_body_limit(&self, token: u32) -> Option<usize> {
        self.filter
            .try_borrow()
            .ok()
            .and_then(|f| f.call_body_limit(token))
    }
}

/// Drives one [`HttpFilter`] from proxy-wasm's HTTP context.
pub struct HttpAdapter<F: HttpFilter> {
    inner: Rc<HttpInner<F>>,
    context_id: u32,
}

impl<F: HttpFilter> HttpAdapter<F> {
    fn enter(&self) {
        ACTIVE.with(|a| a.set(self.context_id));
    }
}

impl<F: HttpFilter> Drop for HttpAdapter<F> {
    fn drop(&mut self) {
        CONTEXTS.with(|m| m.borrow_mut().remove(&self.context_id));
    }
}

impl<F: HttpFilter> Context for HttpAdapter<F> {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        self.enter();
        let limit = call_body_limit(token, Some(self.inner.as_ref() as &dyn Wakeable));
        let response = call_response(num_headers, body_size, limit);
        if let Err(response) = forward_call_response(token, response) {
            self.inner.call_response(token, response);
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.enter();
        let response = grpc_response(status, size);
        if let Err(response) = forward_grpc_response(token, response) {
            self.inner.grpc_response(token, response);
        }
    }

    fn on_done(&mut self) -> bool {
        self.enter();
        if let Ok(mut filter) = self.inner.filter.try_borrow_mut() {
            filter.on_done(&mut ProxyWasmHost);
        }
        CONTEXTS.with(|m| m.borrow_mut().remove(&self.context_id));
        true
    }
}

impl<F: HttpFilter> HttpContext for HttpAdapter<F> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.enter();
        self.inner.hook(Stream::Request, |f| {
            f.on_request_headers(&mut ProxyWasmHost, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.enter();
        self.inner.hook(Stream::Request, |f| {
            f.on_request_body(&mut ProxyWasmHost, body_size, end_of_stream)
        })
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.enter();
        self.inner.hook(Stream::Response, |f| {
            f.on_response_headers(&mut ProxyWasmHost, end_of_stream)
        })
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.enter();
        self.inner.hook(Stream::Response, |f| {
            f.on_response_body(&mut ProxyWasmHost, body_size, end_of_stream)
        })
    }
}

/// Export a [`RootFilter`] as a proxy-wasm module: `tollgate_common::export_filter!(AuthRoot);`
/// in the filter crate's `lib.rs`.
#[macro_export]
macro_rules! export_filter {
    ($root:ty) => {
        // Only the wasm module exports the entry point; host builds (unit tests, clippy) link
        // without the proxy's imports.
        #[cfg(target_arch = "wasm32")]
        mod __tollgate_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::proxy_wasm::main! {{
                $crate::adapter::init_logging();
                $crate::proxy_wasm::set_root_context(|context_id| {
                    Box::new($crate::adapter::RootAdapter::<$root>::new(
                        context_id,
                        env!("CARGO_PKG_VERSION"),
                    ))
                });
            }}
        }
    };
}
