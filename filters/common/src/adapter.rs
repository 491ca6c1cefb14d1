//! The proxy-wasm adapter: the only code that talks to the proxy. [`ProxyWasm`] implements
//! [`Host`] and the dispatcher's [`Proxy`] with the hostcalls of [`crate::abi`]; this module
//! also exports the proxy-wasm ABI 0.2.1 entry points (`proxy_on_context_create`,
//! `proxy_on_request_headers`, ..., `proxy_on_memory_allocate`, `proxy_abi_version_0_2_1`),
//! which hand each call to the module's [`Dispatcher`]. No proxy-wasm SDK is involved.
//!
//! Nothing here panics: every hostcall status comes back as a value (an error, "absent", or a
//! logged no-op). A panic anywhere else in the module is logged at critical level by the panic
//! hook that [`start`] installs, before the VM aborts.
//!
//! [`crate::export_filter!`] in a filter crate defines `_initialize`, which calls [`start`].

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::abi::{self, buffer, map};
use crate::dispatch::{Action, Dispatcher, Level, Proxy, Stream};
use crate::filter::{CallResponse, GrpcResponse, RootFilter};
use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};
use crate::problem::{LocalReply, Problem};

/// [`Host`] and [`Proxy`] over proxy-wasm hostcalls. Header values are read as bytes and
/// converted lossily (Envoy accepts header values that are not UTF-8); a header map or body
/// that is not available in this phase (status `BadArgument`) reads as absent.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyWasm;

fn map_type(map: MapKind) -> u32 {
    match map {
        MapKind::RequestHeaders => map::REQUEST_HEADERS,
        MapKind::RequestTrailers => map::REQUEST_TRAILERS,
        MapKind::ResponseHeaders => map::RESPONSE_HEADERS,
        MapKind::ResponseTrailers => map::RESPONSE_TRAILERS,
        MapKind::CallResponseHeaders => map::CALL_RESPONSE_HEADERS,
    }
}

fn buffer_type(which: Body) -> u32 {
    match which {
        Body::Request => buffer::REQUEST_BODY,
        Body::Response => buffer::RESPONSE_BODY,
        Body::CallResponse => buffer::CALL_RESPONSE_BODY,
    }
}

fn host_error(op: &'static str, status: u32) -> HostError {
    match status {
        abi::BAD_ARGUMENT | abi::NOT_FOUND => HostError::NotAvailable(op),
        _ => HostError::Failed(op),
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Host for ProxyWasm {
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
        match abi::get_property(path) {
            Ok(v) => v,
            Err(s) => {
                log::debug!("read property {path:?}: status {s}");
                None
            }
        }
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        abi::get_shared_data(key).map_err(|s| host_error("get_shared_data", s))
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        match abi::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(abi::CAS_MISMATCH) => Err(SharedError::CasMismatch),
            Err(s) => Err(SharedError::Host(host_error("set_shared_data", s))),
        }
    }

    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        abi::http_call(call.cluster, &call.headers, call.body, millis(call.timeout))
            .map_err(|s| host_error("dispatch_http_call", s))
    }

    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        abi::grpc_call(
            call.cluster,
            call.service,
            call.method,
            &call.metadata,
            call.message,
            millis(call.timeout),
        )
        .map_err(|s| host_error("dispatch_grpc_call", s))
    }

    fn now(&self) -> SystemTime {
        match abi::now_nanos() {
            Ok(n) => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
            Err(_) => SystemTime::UNIX_EPOCH,
        }
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        abi::define_metric(t, name).map_err(|s| host_error("define_metric", s))
    }

    fn increment_metric(&mut self, id: u32, delta: i64) {
        if let Err(s) = abi::increment_metric(id, delta) {
            log::debug!("increment metric {id}: status {s}");
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        if let Err(s) = abi::record_metric(id, value) {
            log::debug!("record metric {id}: status {s}");
        }
    }

    fn set_tick_period(&mut self, period: Duration) {
        if let Err(s) = abi::set_tick_period_ms(millis(period)) {
            log::warn!("set tick period: status {s}");
        }
    }
}

impl Proxy for ProxyWasm {
    fn host(&mut self) -> &mut dyn Host {
        self
    }

    fn set_effective_context(&mut self, context_id: u32) -> Result<(), HostError> {
        abi::set_effective_context(context_id).map_err(|s| host_error("set_effective_context", s))
    }

    fn resume(&mut self, stream: Stream) -> Result<(), HostError> {
        let which = match stream {
            Stream::Request => abi::stream::REQUEST,
            Stream::Response => abi::stream::RESPONSE,
        };
        abi::continue_stream(which).map_err(|s| host_error("continue_stream", s))
    }

    fn send_local_reply(&mut self, reply: &LocalReply) -> Result<(), HostError> {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        abi::send_local_response(u32::from(reply.status), &headers, &reply.body)
            .map_err(|s| host_error("send_local_response", s))
    }

    fn call_response(
        &mut self,
        num_headers: usize,
        body_size: usize,
        limit: Option<usize>,
    ) -> CallResponse {
        let headers = if num_headers > 0 {
            self.headers(MapKind::CallResponseHeaders)
        } else {
            Vec::new()
        };
        let take = limit.map_or(body_size, |l| body_size.min(l.saturating_add(1)));
        let body = if take > 0 {
            self.body(Body::CallResponse, 0, take).unwrap_or_default()
        } else {
            Vec::new()
        };
        CallResponse { headers, body }
    }

    fn grpc_response(&mut self, status: u32, size: usize) -> GrpcResponse {
        if status == 0 {
            let body = match abi::get_buffer(buffer::GRPC_RECEIVE, 0, size) {
                Ok(b) => b.unwrap_or_default(),
                Err(s) => {
                    log::debug!("read gRPC answer: status {s}");
                    Vec::new()
                }
            };
            return GrpcResponse {
                status,
                message: None,
                body,
            };
        }
        // The status message is read as bytes: it need not be UTF-8.
        let message = match abi::get_status() {
            Ok((_, m)) if !m.is_empty() => Some(lossy(m)),
            Ok(_) => None,
            Err(s) => {
                log::debug!("read gRPC status: status {s}");
                None
            }
        };
        GrpcResponse {
            status,
            message,
            body: Vec::new(),
        }
    }

    fn plugin_configuration(&mut self, size: usize) -> Vec<u8> {
        match abi::get_buffer(buffer::PLUGIN_CONFIGURATION, 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                log::warn!("read plugin configuration: status {s}");
                Vec::new()
            }
        }
    }

    fn log(&mut self, level: Level, message: &str) {
        if level == Level::Critical || to_log_level(level) <= log::max_level() {
            let _ = abi::log(level_number(level), message);
        }
    }
}

// ---- logging ----

fn level_number(level: Level) -> u32 {
    match level {
        Level::Trace => 0,
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
        Level::Critical => abi::level::CRITICAL,
    }
}

fn to_log_level(level: Level) -> log::LevelFilter {
    match level {
        Level::Trace => log::LevelFilter::Trace,
        Level::Debug => log::LevelFilter::Debug,
        Level::Info => log::LevelFilter::Info,
        Level::Warn => log::LevelFilter::Warn,
        Level::Error | Level::Critical => log::LevelFilter::Error,
    }
}

/// The module's log name (`tollgate-auth`, `tollgate`), set by [`start`].
static NAME: OnceLock<String> = OnceLock::new();

/// Sends `log` records to the proxy, each line starting with the name of the filter crate
/// that logged it (`tollgate-auth: ...`), or the module's name for shared code.
struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => 2,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        let krate = record.target().split("::").next().unwrap_or_default();
        let line = match krate.strip_prefix("tollgate_") {
            Some(filter) if filter != "common" => format!("tollgate-{filter}: {}", record.args()),
            _ => format!(
                "{}: {}",
                NAME.get().map_or("tollgate", String::as_str),
                record.args()
            ),
        };
        let _ = abi::log(level, &line);
    }

    fn flush(&self) {}
}

/// Follow the proxy's log level, so that disabled levels cost no hostcall (and no formatting).
pub fn follow_proxy_log_level() {
    if let Ok(level) = abi::log_level() {
        log::set_max_level(match level {
            0 => log::LevelFilter::Trace,
            1 => log::LevelFilter::Debug,
            2 => log::LevelFilter::Info,
            3 => log::LevelFilter::Warn,
            4 => log::LevelFilter::Error,
            _ => log::LevelFilter::Off,
        });
    }
}

/// Log a panic at critical level through the proxy before the VM aborts.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let name = NAME.get().map_or("tollgate", String::as_str);
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let line = match info.location() {
        Some(l) => format!(
            "{name}: panicked at {}:{}:{}: {message}",
            l.file(),
            l.line(),
            l.column()
        ),
        None => format!("{name}: panicked: {message}"),
    };
    let _ = abi::log(abi::level::CRITICAL, &line);
}

// ---- the module's dispatcher ----

/// The entries of the module's dispatcher, object-safe so that the exports need no generics.
pub trait Vm {
    /// `proxy_on_context_create`.
    fn on_context_create(&mut self, context_id: u32, parent: u32);
    /// `proxy_on_vm_start`.
    fn on_vm_start(&mut self) -> bool;
    /// `proxy_on_configure`.
    fn on_configure(&mut self, root_id: u32, size: usize) -> bool;
    /// `proxy_on_tick`.
    fn on_tick(&mut self, root_id: u32);
    /// `proxy_on_request_headers`.
    fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action;
    /// `proxy_on_request_body`.
    fn on_request_body(&mut self, context_id: u32, size: usize, end_of_stream: bool) -> Action;
    /// `proxy_on_response_headers`.
    fn on_response_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action;
    /// `proxy_on_response_body`.
    fn on_response_body(&mut self, context_id: u32, size: usize, end_of_stream: bool) -> Action;
    /// `proxy_on_http_call_response`.
    fn on_http_call_response(&mut self, root_id: u32, token: u32, headers: usize, body: usize);
    /// `proxy_on_grpc_receive` / `proxy_on_grpc_close`.
    fn on_grpc_response(&mut self, root_id: u32, token: u32, status: u32, size: usize);
    /// `proxy_on_done`.
    fn on_done(&mut self, context_id: u32) -> bool;
    /// `proxy_on_delete`.
    fn on_delete(&mut self, context_id: u32);
}

impl<R: RootFilter> Vm for Dispatcher<R, ProxyWasm> {
    fn on_context_create(&mut self, context_id: u32, parent: u32) {
        Dispatcher::on_context_create(self, context_id, parent)
    }
    fn on_vm_start(&mut self) -> bool {
        Dispatcher::on_vm_start(self)
    }
    fn on_configure(&mut self, root_id: u32, size: usize) -> bool {
        Dispatcher::on_configure(self, root_id, size)
    }
    fn on_tick(&mut self, root_id: u32) {
        Dispatcher::on_tick(self, root_id)
    }
    fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action {
        Dispatcher::on_request_headers(self, context_id, end_of_stream)
    }
    fn on_request_body(&mut self, context_id: u32, size: usize, end_of_stream: bool) -> Action {
        Dispatcher::on_request_body(self, context_id, size, end_of_stream)
    }
    fn on_response_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action {
        Dispatcher::on_response_headers(self, context_id, end_of_stream)
    }
    fn on_response_body(&mut self, context_id: u32, size: usize, end_of_stream: bool) -> Action {
        Dispatcher::on_response_body(self, context_id, size, end_of_stream)
    }
    fn on_http_call_response(&mut self, root_id: u32, token: u32, headers: usize, body: usize) {
        Dispatcher::on_http_call_response(self, root_id, token, headers, body)
    }
    fn on_grpc_response(&mut self, root_id: u32, token: u32, status: u32, size: usize) {
        Dispatcher::on_grpc_response(self, root_id, token, status, size)
    }
    fn on_done(&mut self, context_id: u32) -> bool {
        Dispatcher::on_done(self, context_id)
    }
    fn on_delete(&mut self, context_id: u32) {
        Dispatcher::on_delete(self, context_id)
    }
}

thread_local! {
    /// The module's dispatcher, installed by [`start`].
    static VM: RefCell<Option<Box<dyn Vm>>> = const { RefCell::new(None) };
}

/// Run `f` on the module's dispatcher; `default` when there is none (or, which Envoy never
/// does, when the VM is entered again while it runs).
pub fn with_vm<T>(default: T, f: impl FnOnce(&mut dyn Vm) -> T) -> T {
    VM.with(|vm| match vm.try_borrow_mut() {
        Ok(mut slot) => match slot.as_mut() {
            Some(vm) => f(vm.as_mut()),
            None => default,
        },
        Err(_) => default,
    })
}

/// Start the module with `R` as its filter: run the module's static constructors (WASI), then
/// install the logger (at `info` until the VM starts: the proxy refuses `get_log_level` while
/// the module initializes), the panic hook and the dispatcher. Called once, from the
/// `_initialize` export that [`crate::export_filter!`] defines.
pub fn start<R: RootFilter>(version: &'static str) {
    #[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
    {
        extern "C" {
            fn __wasm_call_ctors();
        }
        // SAFETY: the linker's constructor function, called once before anything else runs.
        unsafe { __wasm_call_ctors() };
    }
    let _ = NAME.set(R::log_name());
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    std::panic::set_hook(Box::new(log_panic));
    VM.with(|vm| {
        if let Ok(mut slot) = vm.try_borrow_mut() {
            *slot = Some(Box::new(Dispatcher::<R, ProxyWasm>::new(
                ProxyWasm, version,
            )));
        }
    });
}

/// Refuse a request the module cannot handle (no dispatcher): 503, never let through.
fn refuse() -> u32 {
    let reply = Problem::new(503)
        .detail("the gateway filter is not initialized")
        .into_reply();
    let _ = ProxyWasm.send_local_reply(&reply);
    action(Action::Pause)
}

fn action(a: Action) -> u32 {
    match a {
        Action::Continue => 0,
        Action::Pause => 1,
    }
}

/// The proxy-wasm ABI 0.2.1 exports. They are exported (`no_mangle`) only in the wasm module;
/// on the build machine they are plain functions.
pub mod exports {
    use super::{action, follow_proxy_log_level, refuse, with_vm, Action};

    /// Marks the module as built for proxy-wasm ABI 0.2.1.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    /// Memory for values the proxy hands to the module.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        crate::abi::allocate(size)
    }

    /// A root (`parent` 0) or a request context was created.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_context_create(context_id: u32, parent: u32) {
        with_vm((), |vm| vm.on_context_create(context_id, parent))
    }

    /// The VM started.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: u32) -> u32 {
        follow_proxy_log_level();
        u32::from(with_vm(false, |vm| vm.on_vm_start()))
    }

    /// Apply the plugin configuration; 0 refuses it.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_configure(root_id: u32, size: u32) -> u32 {
        follow_proxy_log_level();
        u32::from(with_vm(false, |vm| vm.on_configure(root_id, size as usize)))
    }

    /// A root's tick.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_tick(root_id: u32) {
        with_vm((), |vm| vm.on_tick(root_id))
    }

    /// Request headers; 0 continues, 1 pauses.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_request_headers(id: u32, _headers: u32, eos: u32) -> u32 {
        with_vm(None, |vm| Some(vm.on_request_headers(id, eos != 0))).map_or_else(refuse, action)
    }

    /// A request body chunk. Exported by [`crate::export_filter!`] only for a filter that uses
    /// it (like the response hooks below).
    pub extern "C" fn proxy_on_request_body(id: u32, size: u32, eos: u32) -> u32 {
        action(with_vm(Action::Continue, |vm| {
            vm.on_request_body(id, size as usize, eos != 0)
        }))
    }

    /// Response headers. Exported by [`crate::export_filter!`] only for a filter that uses
    /// them: Envoy does not enter a module for a hook it does not export.
    pub extern "C" fn proxy_on_response_headers(id: u32, _headers: u32, eos: u32) -> u32 {
        action(with_vm(Action::Continue, |vm| {
            vm.on_response_headers(id, eos != 0)
        }))
    }

    /// A response body chunk. Exported like [`proxy_on_response_headers`].
    pub extern "C" fn proxy_on_response_body(id: u32, size: u32, eos: u32) -> u32 {
        action(with_vm(Action::Continue, |vm| {
            vm.on_response_body(id, size as usize, eos != 0)
        }))
    }

    /// The answer to an HTTP callout (delivered to the root that made it).
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_http_call_response(
        root_id: u32,
        token: u32,
        headers: u32,
        body_size: u32,
        _trailers: u32,
    ) {
        with_vm((), |vm| {
            vm.on_http_call_response(root_id, token, headers as usize, body_size as usize)
        })
    }

    /// A unary gRPC callout succeeded.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_grpc_receive(root_id: u32, token: u32, size: u32) {
        with_vm((), |vm| {
            vm.on_grpc_response(root_id, token, 0, size as usize)
        })
    }

    /// A gRPC callout failed with `status`.
    #[cfg_attr(target_arch = "wasm32", no_mangle)]
    pub extern "C" fn proxy_on_grpc_close(root_id: u32, token: u32, status: u32) {
        with_vm((), |vm| vm.on_grpc_response(root_id, token, status, 0))
    }

    /// A context is complete. Exported by `export_filter!` only for a filter whose `HOOKS`
    /// has `done` (each export Envoy calls is an entry into the VM per request).
    pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
        u32::from(with_vm(true, |vm| vm.on_done(context_id)))
    }

    /// A context is deleted. Not exported: `proxy_on_done` (or, in a module without it, the
    /// dispatcher's own bookkeeping: `dispatch`, rule 4) already forgets a request or a root,
    /// and Envoy makes no entry into the VM for a hook the module does not export (one entry
    /// fewer per request).
    pub extern "C" fn proxy_on_delete(context_id: u32) {
        with_vm((), |vm| vm.on_delete(context_id))
    }
}

/// Export a [`RootFilter`] as a proxy-wasm module, in the filter crate's `lib.rs`:
///
/// ```ignore
/// tollgate_common::export_filter!(CacheRoot, hooks(response_headers, response_body, done));
/// ```
///
/// It defines the module's `_initialize` and the optional hooks listed in `hooks(...)`
/// (`request_body`, `response_headers`, `response_body`, `done`: `proxy_on_request_body`, ...,
/// `proxy_on_done`), only when
/// building the wasm module with the crate's `export` feature (on by default: a crate that links
/// several filters into one module turns it off for them). The list must be the filter's
/// [`RootFilter::HOOKS`](crate::RootFilter::HOOKS) (checked when compiling); `hooks()` exports
/// none. `export_filter!(Root)` exports all four, for a filter whose `HOOKS` is
/// [`Hooks::ALL`](crate::filter::Hooks::ALL). The other entry points (context creation, request
/// headers, callouts, ticks, ...) are exported by
/// [`adapter::exports`](crate::adapter::exports) for every module.
///
/// Envoy never enters the module for a hook it does not export: each one left out is one V8
/// entry fewer per request (per body chunk for the body hooks). Without `done`, the dispatcher
/// forgets a request after its last exported hook (`dispatch`, rule 4).
#[macro_export]
macro_rules! export_filter {
    (@initialize $root:ty) => {
        /// The module's initializer (WASI reactor): installs the filter.
        #[cfg(all(target_arch = "wasm32", feature = "export"))]
        #[no_mangle]
        pub extern "C" fn _initialize() {
            $crate::adapter::start::<$root>(env!("CARGO_PKG_VERSION"));
        }
    };
    (@hook request_body) => {
        /// A request body chunk (proxy-wasm ABI 0.2.1).
        #[cfg(all(target_arch = "wasm32", feature = "export"))]
        #[no_mangle]
        pub extern "C" fn proxy_on_request_body(id: u32, size: u32, eos: u32) -> u32 {
            $crate::adapter::exports::proxy_on_request_body(id, size, eos)
        }
    };
    (@hook response_headers) => {
        /// Response headers (proxy-wasm ABI 0.2.1).
        #[cfg(all(target_arch = "wasm32", feature = "export"))]
        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(id: u32, headers: u32, eos: u32) -> u32 {
            $crate::adapter::exports::proxy_on_response_headers(id, headers, eos)
        }
    };
    (@hook done) => {
        /// The request (or a root) is complete (proxy-wasm ABI 0.2.1).
        #[cfg(all(target_arch = "wasm32", feature = "export"))]
        #[no_mangle]
        pub extern "C" fn proxy_on_done(id: u32) -> u32 {
            $crate::adapter::exports::proxy_on_done(id)
        }
    };
    (@hook response_body) => {
        /// A response body chunk (proxy-wasm ABI 0.2.1).
        #[cfg(all(target_arch = "wasm32", feature = "export"))]
        #[no_mangle]
        pub extern "C" fn proxy_on_response_body(id: u32, size: u32, eos: u32) -> u32 {
            $crate::adapter::exports::proxy_on_response_body(id, size, eos)
        }
    };
    ($root:ty) => {
        $crate::export_filter!($root, hooks(request_body, response_headers, response_body, done));
    };
    ($root:ty, hooks($($hook:ident),* $(,)?)) => {
        // An unknown hook name does not compile (each is a field of `Hooks`).
        const _: () = {
            let listed = $crate::filter::Hooks::NONE;
            $(let listed = $crate::filter::Hooks { $hook: true, ..listed };)*
            assert!(
                listed.same(<$root as $crate::RootFilter>::HOOKS),
                "export_filter!(.., hooks(..)) must list exactly the filter's RootFilter::HOOKS"
            );
        };
        $crate::export_filter!(@initialize $root);
        $($crate::export_filter!(@hook $hook);)*
    };
}
