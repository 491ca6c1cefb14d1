//! The test driver: the real [`Dispatcher`] over an in-memory proxy ([`MemProxy`], one
//! [`MemHost`] per context), so that filter unit tests run requests the way Envoy does:
//! pauses are resumed by the dispatcher, callout answers go to the context that started the
//! call, wakes are delivered to the woken request, ticks run the root.
//!
//! ```
//! use tollgate_common::testing::Driver;
//! # use tollgate_common::{ConfigError, Decision, Host, HttpFilter, RootFilter};
//! # struct Pass;
//! # impl HttpFilter for Pass {}
//! # struct PassRoot;
//! # impl RootFilter for PassRoot {
//! #     type Filter = Pass;
//! #     const NAME: &'static str = "pass";
//! #     fn new(_: u32) -> Self { PassRoot }
//! #     fn configure(&mut self, _: &mut dyn Host, _: &[u8]) -> Result<(), ConfigError> { Ok(()) }
//! #     fn create_filter(&self, _: u32) -> Pass { Pass }
//! # }
//! # fn main() -> Result<(), String> {
//! let mut d = Driver::<PassRoot>::new("{}")?;
//! let id = d.request("GET", "/x", &[("x-one", "1")]);
//! assert_eq!(d.request_headers(id, true), Decision::Continue);
//! d.done(id);
//! # Ok(())
//! # }
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::dispatch::{Dispatcher, Event, Level, Proxy, Stream};
use crate::filter::{CallResponse, Decision, GrpcResponse, RootFilter};
use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};
use crate::mem_host::{MemHost, RecordedCall, RecordedGrpcCall};
use crate::problem::LocalReply;

/// The root context id the driver uses.
pub const ROOT_ID: u32 = 1;

/// An in-memory proxy: the VM's host (roots, shared data, metrics, clock) and one
/// [`MemHost`] per request, all sharing one shared-data store, metrics and callout tokens.
/// It records what the dispatcher asked of the proxy.
#[derive(Debug)]
pub struct MemProxy {
    /// The roots' host: shared data, metrics, the root's callouts and tick period.
    pub vm: MemHost,
    /// Each live request's host.
    pub streams: BTreeMap<u32, MemHost>,
    /// Callouts made by requests that have ended.
    pub ended_calls: Vec<RecordedCall>,
    /// gRPC callouts made by requests that have ended.
    pub ended_grpc_calls: Vec<RecordedGrpcCall>,
    deleted: HashSet<u32>,
    effective: u32,
    /// The plugin configuration the next `on_configure` reads.
    pub configuration: Vec<u8>,
    answer: Option<CallResponse>,
    grpc_answer: Option<GrpcResponse>,
    /// Bytes of callout answer bodies copied into the VM so far.
    pub copied_bytes: usize,
    /// Streams resumed, in order.
    pub resumed: Vec<(u32, Stream)>,
    /// Local replies sent, in order.
    pub replies: Vec<(u32, LocalReply)>,
    /// Lines the dispatcher logged.
    pub logs: Vec<(Level, String)>,
    /// What ran for each request and what it decided, in order.
    pub events: Vec<(u32, Event, Decision)>,
    /// `set_effective_context` calls, in order.
    pub switches: Vec<u32>,
    /// When set, every call the VM makes to the proxy is recorded in [`MemProxy::host_calls`].
    pub count_host_calls: bool,
    /// The calls the VM made to the proxy (each is a hostcall in Envoy), by name, in order.
    pub host_calls: RefCell<Vec<&'static str>>,
    /// Bytes of header names and values the proxy handed to the VM (counted with the calls).
    pub header_bytes: std::cell::Cell<usize>,
}

impl MemProxy {
    /// A proxy whose roots use `vm`.
    pub fn new(vm: MemHost) -> Self {
        MemProxy {
            vm,
            streams: BTreeMap::new(),
            ended_calls: Vec::new(),
            ended_grpc_calls: Vec::new(),
            deleted: HashSet::new(),
            effective: 0,
            configuration: Vec::new(),
            answer: None,
            grpc_answer: None,
            copied_bytes: 0,
            resumed: Vec::new(),
            replies: Vec::new(),
            logs: Vec::new(),
            events: Vec::new(),
            switches: Vec::new(),
            count_host_calls: false,
            host_calls: RefCell::default(),
            header_bytes: std::cell::Cell::new(0),
        }
    }

    fn note(&self, call: &'static str) {
        if self.count_host_calls {
            self.host_calls.borrow_mut().push(call);
        }
    }

    /// The proxy calls into context `context_id` (the effective context is reset to it).
    pub fn enter(&mut self, context_id: u32) {
        self.effective = context_id;
    }

    /// The context operations act on.
    pub fn effective(&self) -> u32 {
        self.effective
    }

    /// The answer the next `call_response` reads.
    pub fn set_answer(&mut self, answer: CallResponse) {
        self.answer = Some(answer);
    }

    /// The answer the next `grpc_response` reads.
    pub fn set_grpc_answer(&mut self, answer: GrpcResponse) {
        self.grpc_answer = Some(answer);
    }

    fn current(&self) -> &MemHost {
        self.streams.get(&self.effective).unwrap_or(&self.vm)
    }

    fn current_mut(&mut self) -> &mut MemHost {
        self.streams
            .get_mut(&self.effective)
            .unwrap_or(&mut self.vm)
    }
}

impl Host for MemProxy {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        self.note("get_header_map_value");
        let v = self.current().header(map, name);
        if self.count_host_calls {
            let n = v.as_ref().map_or(0, String::len);
            self.header_bytes.set(self.header_bytes.get() + n);
        }
        v
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        self.note("get_header_map_pairs");
        let all = self.current().headers(map);
        if self.count_host_calls {
            let n: usize = all.iter().map(|(k, v)| k.len() + v.len()).sum();
            self.header_bytes.set(self.header_bytes.get() + n);
        }
        all
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.note("replace_header_map_value");
        self.current_mut().set_header(map, name, value)
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.note("add_header_map_value");
        self.current_mut().add_header(map, name, value)
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        self.note("remove_header_map_value");
        self.current_mut().remove_header(map, name)
    }
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        self.note("get_buffer_bytes");
        self.current().body(which, start, max)
    }
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        self.note("set_buffer_bytes");
        self.current_mut().set_body(which, start, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.note("get_property");
        self.current().property(path)
    }
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.note("get_shared_data");
        self.current().shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        self.note("set_shared_data");
        self.current_mut().shared_set(key, value, cas)
    }
    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        self.note("http_call");
        if self.vm.fail_calls {
            return Err(HostError::Failed("dispatch_http_call"));
        }
        self.current_mut().http_call(call)
    }
    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        self.note("grpc_call");
        if self.vm.fail_calls {
            return Err(HostError::Failed("dispatch_grpc_call"));
        }
        self.current_mut().grpc_call(call)
    }
    /// The effective context's clock (a test may move one request's clock alone).
    fn now(&self) -> SystemTime {
        self.note("get_current_time_nanoseconds");
        self.current().now
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.note("define_metric");
        self.vm.define_metric(kind, name)
    }
    fn increment_metric(&mut self, id: u32, delta: i64) {
        self.note("increment_metric");
        self.vm.increment_metric(id, delta)
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.note("record_metric");
        self.vm.record_metric(id, value)
    }
    /// The timer belongs to the root, whichever context asks.
    fn set_tick_period(&mut self, period: Duration) {
        self.note("set_tick_period_milliseconds");
        self.vm.set_tick_period(period)
    }
}

impl Proxy for MemProxy {
    fn host(&mut self) -> &mut dyn Host {
        self
    }

    fn set_effective_context(&mut self, context_id: u32) -> Result<(), HostError> {
        self.note("set_effective_context");
        self.switches.push(context_id);
        if context_id == ROOT_ID
            || (self.streams.contains_key(&context_id) && !self.deleted.contains(&context_id))
        {
            self.effective = context_id;
            Ok(())
        } else {
            Err(HostError::NotAvailable("set_effective_context"))
        }
    }

    fn resume(&mut self, stream: Stream) -> Result<(), HostError> {
        self.note("continue_stream");
        self.resumed.push((self.effective, stream));
        Ok(())
    }

    fn send_local_reply(&mut self, reply: &LocalReply) -> Result<(), HostError> {
        self.note("send_local_response");
        self.replies.push((self.effective, reply.clone()));
        Ok(())
    }

    fn call_response(
        &mut self,
        num_headers: usize,
        body_size: usize,
        limit: Option<usize>,
    ) -> CallResponse {
        if num_headers > 0 {
            self.note("get_header_map_pairs");
        }
        let answer = self.answer.take().unwrap_or_default();
        let take = limit.map_or(body_size, |l| body_size.min(l.saturating_add(1)));
        if take > 0 {
            self.note("get_buffer_bytes");
        }
        let body: Vec<u8> = answer.body.into_iter().take(take).collect();
        self.copied_bytes += body.len();
        CallResponse {
            headers: if num_headers > 0 {
                answer.headers
            } else {
                Vec::new()
            },
            body,
        }
    }

    fn grpc_response(&mut self, status: u32, size: usize) -> GrpcResponse {
        self.note(if status == 0 {
            "get_buffer_bytes"
        } else {
            "get_status"
        });
        let answer = self.grpc_answer.take().unwrap_or_default();
        GrpcResponse {
            status,
            message: if status == 0 { None } else { answer.message },
            body: if status == 0 {
                answer.body.into_iter().take(size).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn plugin_configuration(&mut self, size: usize) -> Vec<u8> {
        self.configuration.iter().copied().take(size).collect()
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }

    fn observe(&mut self, context_id: u32, event: Event, decision: &Decision) {
        self.events.push((context_id, event, decision.clone()));
    }
}

/// One VM (one Envoy worker) with one root configured, driven like Envoy drives it. Every
/// method returns what happened instead of panicking; tests assert on it.
pub struct Driver<R: RootFilter> {
    dispatcher: Dispatcher<R, MemProxy>,
    next_id: u32,
    /// Events seen by [`Driver::take_woken`].
    woken_seen: usize,
    /// Entries into the module for requests (see [`Driver::take_entries`]).
    entries: usize,
}

impl<R: RootFilter> Driver<R> {
    /// A VM whose root is configured with `config`; the error is the line the dispatcher
    /// logged when the configuration was refused.
    pub fn new(config: &str) -> Result<Self, String> {
        Self::with_vm(MemHost::new(), config.as_bytes())
    }

    /// A VM over `vm` (for example a [`MemHost::worker`] of another driver's VM, to model
    /// another worker of the same Envoy) configured with `config`.
    pub fn with_vm(vm: MemHost, config: &[u8]) -> Result<Self, String> {
        let mut proxy = MemProxy::new(vm);
        proxy.configuration = config.to_vec();
        let mut dispatcher = Dispatcher::new(proxy, "0.0.0-test");
        dispatcher.proxy_mut().enter(ROOT_ID);
        dispatcher.on_context_create(ROOT_ID, 0);
        dispatcher.on_vm_start();
        if !dispatcher.on_configure(ROOT_ID, config.len()) {
            let logs = &dispatcher.proxy().logs;
            return Err(logs
                .iter()
                .rev()
                .find(|(l, _)| *l == Level::Error)
                .map(|(_, m)| m.clone())
                .unwrap_or_default());
        }
        Ok(Driver {
            dispatcher,
            next_id: ROOT_ID + 1,
            woken_seen: 0,
            entries: 0,
        })
    }

    /// Another worker of the same Envoy: its own VM and root, the same shared data, metrics
    /// and clock (as it is now).
    pub fn worker(&self, config: &str) -> Result<Self, String> {
        let mut d = Self::with_vm(self.vm().worker(), config.as_bytes())?;
        d.next_id = 1000;
        Ok(d)
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher<R, MemProxy> {
        &self.dispatcher
    }

    /// The dispatcher, mutable (to call entries directly).
    pub fn dispatcher_mut(&mut self) -> &mut Dispatcher<R, MemProxy> {
        &mut self.dispatcher
    }

    /// The proxy.
    pub fn proxy(&self) -> &MemProxy {
        self.dispatcher.proxy()
    }

    fn proxy_mut(&mut self) -> &mut MemProxy {
        self.dispatcher.proxy_mut()
    }

    /// The root.
    pub fn root(&self) -> Option<&R> {
        self.dispatcher.root(ROOT_ID)
    }

    /// A live request's filter.
    pub fn filter(&self, id: u32) -> Option<&R::Filter> {
        self.dispatcher.filter(id)
    }

    /// The VM's host (shared data, metrics, clock, the root's callouts).
    pub fn vm(&self) -> &MemHost {
        &self.proxy().vm
    }

    /// The VM's host, mutable.
    pub fn vm_mut(&mut self) -> &mut MemHost {
        &mut self.proxy_mut().vm
    }

    /// A request's host (its headers, bodies, properties and callouts).
    pub fn host(&self, id: u32) -> Option<&MemHost> {
        self.proxy().streams.get(&id)
    }

    /// A request's host, mutable (to set a property or a header before a hook).
    pub fn host_mut(&mut self, id: u32) -> Option<&mut MemHost> {
        self.proxy_mut().streams.get_mut(&id)
    }

    /// A header of one of a request's maps, as it is now.
    pub fn header(&self, id: u32, map: MapKind, name: &str) -> Option<String> {
        self.host(id).and_then(|h| h.header(map, name))
    }

    /// A new request (its context is created; no hook runs yet). Returns its context id.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let host = self.vm().next_request(method, path, headers);
        let proxy = self.proxy_mut();
        proxy.streams.insert(id, host);
        proxy.enter(id);
        self.entries += 1;
        self.dispatcher.on_context_create(id, ROOT_ID);
        id
    }

    /// The decision observed for `event` on request `id` since event number `from`, or the
    /// local reply the dispatcher sent for it, or `Continue`.
    fn outcome(&self, id: u32, event: Event, from: usize, replies_from: usize) -> Decision {
        let p = self.proxy();
        if let Some((_, _, d)) = p
            .events
            .iter()
            .skip(from)
            .find(|(c, e, _)| *c == id && *e == event)
        {
            return d.clone();
        }
        match p.replies.iter().skip(replies_from).find(|(c, _)| *c == id) {
            Some((_, r)) => Decision::Respond(r.clone()),
            None => Decision::Continue,
        }
    }

    fn marks(&self) -> (usize, usize) {
        (self.proxy().events.len(), self.proxy().replies.len())
    }

    /// Run `on_request_headers`; the filter's decision.
    pub fn request_headers(&mut self, id: u32, end_of_stream: bool) -> Decision {
        let (e, r) = self.marks();
        self.proxy_mut().enter(id);
        self.entries += 1;
        self.dispatcher.on_request_headers(id, end_of_stream);
        self.outcome(id, Event::RequestHeaders, e, r)
    }

    /// Append `chunk` to the request body and run `on_request_body`; the filter's decision.
    /// When the filter does not use the hook (its module does not export it:
    /// [`RootFilter::HOOKS`]), the hook does not run and the chunk goes on (`Continue`), as in
    /// Envoy.
    pub fn request_body(&mut self, id: u32, chunk: &[u8], end_of_stream: bool) -> Decision {
        let size = self.append(id, Body::Request, chunk);
        if !R::HOOKS.request_body {
            return Decision::Continue;
        }
        self.entries += 1;
        let (e, r) = self.marks();
        self.proxy_mut().enter(id);
        self.dispatcher.on_request_body(id, size, end_of_stream);
        self.outcome(id, Event::RequestBody, e, r)
    }

    /// Set the response headers to `headers` and run `on_response_headers`; the decision
    /// (`Continue` without running it when the filter does not use the hook, as in Envoy).
    pub fn response_headers(
        &mut self,
        id: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Decision {
        if let Some(h) = self.host_mut(id) {
            h.set_map(MapKind::ResponseHeaders, headers);
        }
        if !R::HOOKS.response_headers {
            return Decision::Continue;
        }
        self.entries += 1;
        let (e, r) = self.marks();
        self.proxy_mut().enter(id);
        self.dispatcher.on_response_headers(id, end_of_stream);
        self.outcome(id, Event::ResponseHeaders, e, r)
    }

    /// Append `chunk` to the response body and run `on_response_body`; the decision
    /// (`Continue` without running it when the filter does not use the hook, as in Envoy).
    pub fn response_body(&mut self, id: u32, chunk: &[u8], end_of_stream: bool) -> Decision {
        let size = self.append(id, Body::Response, chunk);
        if !R::HOOKS.response_body {
            return Decision::Continue;
        }
        self.entries += 1;
        let (e, r) = self.marks();
        self.proxy_mut().enter(id);
        self.dispatcher.on_response_body(id, size, end_of_stream);
        self.outcome(id, Event::ResponseBody, e, r)
    }

    fn append(&mut self, id: u32, which: Body, chunk: &[u8]) -> usize {
        let Some(h) = self.host_mut(id) else {
            return chunk.len();
        };
        let mut all = h.body_bytes(which).to_vec();
        all.extend_from_slice(chunk);
        h.set_body_bytes(which, &all);
        all.len()
    }

    /// The request is complete: `on_done` (which forgets it: no module exports
    /// `proxy_on_delete`), when the filter's module exports it ([`RootFilter::HOOKS`]`.done`;
    /// without it the dispatcher has forgotten the request after its last hook, or forgets it
    /// when it finds the proxy no longer knows it, as in Envoy). Returns its host (its headers,
    /// bodies and callouts as they ended).
    pub fn done(&mut self, id: u32) -> Option<MemHost> {
        if R::HOOKS.done {
            self.proxy_mut().enter(id);
            self.entries += 1;
            self.dispatcher.on_done(id);
        }
        let proxy = self.proxy_mut();
        proxy.deleted.insert(id);
        let host = proxy.streams.remove(&id)?;
        proxy.ended_calls.extend(host.calls.iter().cloned());
        proxy
            .ended_grpc_calls
            .extend(host.grpc_calls.iter().cloned());
        Some(host)
    }

    /// The answer to HTTP callout `token` arrives; the decision of the request that owns it
    /// (`Continue` when a root owns it or it was dropped).
    pub fn answer(&mut self, token: u32, answer: CallResponse) -> Decision {
        let (e, r) = self.marks();
        let (headers, body) = (answer.headers.len(), answer.body.len());
        let proxy = self.proxy_mut();
        proxy.set_answer(answer);
        proxy.enter(ROOT_ID);
        self.dispatcher
            .on_http_call_response(ROOT_ID, token, headers, body);
        self.proxy_mut().answer = None;
        let owner = self
            .proxy()
            .events
            .iter()
            .skip(e)
            .find_map(|(c, ev, _)| (*ev == Event::CallResponse(token)).then_some(*c));
        owner.map_or(Decision::Continue, |c| {
            self.outcome(c, Event::CallResponse(token), e, r)
        })
    }

    /// The answer to gRPC callout `token` arrives (status 0: success with its message;
    /// otherwise a failure with the status message); the owning request's decision.
    pub fn answer_grpc(&mut self, token: u32, answer: GrpcResponse) -> Decision {
        let (e, r) = self.marks();
        let (status, size) = (answer.status, answer.body.len());
        let proxy = self.proxy_mut();
        proxy.set_grpc_answer(answer);
        proxy.enter(ROOT_ID);
        self.dispatcher.on_grpc_response(
            ROOT_ID,
            token,
            status,
            if status == 0 { size } else { 0 },
        );
        self.proxy_mut().grpc_answer = None;
        let owner = self
            .proxy()
            .events
            .iter()
            .skip(e)
            .find_map(|(c, ev, _)| (*ev == Event::GrpcResponse(token)).then_some(*c));
        owner.map_or(Decision::Continue, |c| {
            self.outcome(c, Event::GrpcResponse(token), e, r)
        })
    }

    /// One tick of the root.
    pub fn tick(&mut self) {
        self.proxy_mut().enter(ROOT_ID);
        self.dispatcher.on_tick(ROOT_ID);
    }

    /// Move the clock forward.
    pub fn advance(&mut self, by: Duration) {
        let proxy = self.proxy_mut();
        proxy.vm.advance(by);
        for h in proxy.streams.values_mut() {
            h.advance(by);
        }
    }

    /// The tick period last asked of the proxy.
    pub fn tick_period(&self) -> Option<Duration> {
        self.vm().tick_period
    }

    /// A metric's value by full name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.vm().metric(name)
    }

    /// Every HTTP callout made so far (by the root and by requests, ended ones too), in token
    /// order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        let p = self.proxy();
        let mut all: Vec<RecordedCall> =
            p.vm.calls
                .iter()
                .chain(p.ended_calls.iter())
                .chain(p.streams.values().flat_map(|h| h.calls.iter()))
                .cloned()
                .collect();
        all.sort_by_key(|c| c.token);
        all
    }

    /// Every gRPC callout made so far, in token order.
    pub fn grpc_calls(&self) -> Vec<RecordedGrpcCall> {
        let p = self.proxy();
        let mut all: Vec<RecordedGrpcCall> =
            p.vm.grpc_calls
                .iter()
                .chain(p.ended_grpc_calls.iter())
                .chain(p.streams.values().flat_map(|h| h.grpc_calls.iter()))
                .cloned()
                .collect();
        all.sort_by_key(|c| c.token);
        all
    }

    /// Every wake delivered so far: `(request, reason)`, in order (including those already
    /// returned by [`Driver::take_woken`]).
    pub fn woken(&self) -> Vec<(u32, u32)> {
        self.proxy()
            .events
            .iter()
            .filter_map(|(c, e, _)| match e {
                Event::Wake(r) => Some((*c, *r)),
                _ => None,
            })
            .collect()
    }

    /// The wakes delivered since the last call: `(request, reason)`, in order.
    pub fn take_woken(&mut self) -> Vec<(u32, u32)> {
        let events = &self.dispatcher.proxy().events;
        let new = events
            .iter()
            .skip(self.woken_seen)
            .filter_map(|(c, e, _)| match e {
                Event::Wake(r) => Some((*c, *r)),
                _ => None,
            })
            .collect();
        self.woken_seen = events.len();
        new
    }

    /// The decision of the last wake with `reason` delivered to request `id`.
    pub fn wake_decision(&self, id: u32, reason: u32) -> Option<Decision> {
        self.proxy()
            .events
            .iter()
            .rev()
            .find(|(c, e, _)| *c == id && *e == Event::Wake(reason))
            .map(|(_, _, d)| d.clone())
    }

    /// What ran for request `id` and what it decided, in order.
    pub fn decisions(&self, id: u32) -> Vec<(Event, Decision)> {
        self.proxy()
            .events
            .iter()
            .filter(|(c, _, _)| *c == id)
            .map(|(_, e, d)| (*e, d.clone()))
            .collect()
    }

    /// The local reply sent for request `id`, if any.
    pub fn reply(&self, id: u32) -> Option<&LocalReply> {
        self.proxy()
            .replies
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, r)| r)
    }

    /// The streams of request `id` the dispatcher resumed, in order.
    pub fn resumed(&self, id: u32) -> Vec<Stream> {
        self.proxy()
            .resumed
            .iter()
            .filter(|(c, _)| *c == id)
            .map(|(_, s)| *s)
            .collect()
    }

    /// The stream request `id` holds paused.
    pub fn paused(&self, id: u32) -> Option<Stream> {
        self.dispatcher.paused(id)
    }

    /// Lines the dispatcher logged.
    pub fn logs(&self) -> &[(Level, String)] {
        &self.proxy().logs
    }

    /// Record every call the VM makes to the proxy from now on (see [`Driver::take_host_calls`]).
    pub fn count_host_calls(&mut self, on: bool) {
        self.proxy_mut().count_host_calls = on;
    }

    /// The calls the VM made to the proxy since the last time (each is a hostcall in Envoy).
    pub fn take_host_calls(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut *self.proxy().host_calls.borrow_mut())
    }

    /// Entries into the module for requests since the last time: the exports Envoy would have
    /// called (context creation, request headers, each hook the filter uses, `proxy_on_done`);
    /// not counting `proxy_on_memory_allocate`, callout answers, wakes or ticks.
    pub fn take_entries(&mut self) -> usize {
        std::mem::take(&mut self.entries)
    }

    /// Bytes of header names and values the proxy handed to the VM since the last time (while
    /// counting host calls).
    pub fn take_header_bytes(&mut self) -> usize {
        self.proxy().header_bytes.replace(0)
    }
}

#[cfg(test)]
mod tests {
    use super::Driver;
    use crate::filter::Hooks;
    use crate::{ConfigError, Decision, Host, HttpFilter, RootFilter};

    /// Pauses in every hook, so that a hook that ran shows in the decision.
    struct Stop;
    impl HttpFilter for Stop {
        fn on_request_body(&mut self, _: &mut dyn Host, _: usize, _: bool) -> Decision {
            Decision::Pause
        }
        fn on_response_headers(&mut self, _: &mut dyn Host, _: bool) -> Decision {
            Decision::Pause
        }
        fn on_response_body(&mut self, _: &mut dyn Host, _: usize, _: bool) -> Decision {
            Decision::Pause
        }
    }

    struct StopRoot<const RESPONSE_HEADERS: bool>;
    impl<const RESPONSE_HEADERS: bool> RootFilter for StopRoot<RESPONSE_HEADERS> {
        type Filter = Stop;
        const NAME: &'static str = "stop";
        const HOOKS: Hooks = Hooks {
            response_headers: RESPONSE_HEADERS,
            ..Hooks::NONE
        };
        fn new(_: u32) -> Self {
            StopRoot
        }
        fn configure(&mut self, _: &mut dyn Host, _: &[u8]) -> Result<(), ConfigError> {
            Ok(())
        }
        fn create_filter(&self, _: u32) -> Stop {
            Stop
        }
    }

    #[test]
    fn hooks_the_filter_does_not_use_do_not_run_and_are_not_entries() {
        let mut d = Driver::<StopRoot<true>>::new("{}").unwrap();
        let id = d.request("POST", "/x", &[]);
        assert_eq!(d.request_headers(id, false), Decision::Continue);
        assert_eq!(d.request_body(id, b"abc", true), Decision::Continue);
        assert_eq!(
            d.response_headers(id, &[(":status", "200")], false),
            Decision::Pause
        );
        assert_eq!(d.response_body(id, b"{}", true), Decision::Continue);
        // The body went by all the same.
        assert_eq!(d.host(id).unwrap().body_bytes(crate::Body::Request), b"abc");
        d.done(id);
        // context create, request headers, response headers (no `proxy_on_done`: not `done`)
        assert_eq!(d.take_entries(), 3);

        let mut d = Driver::<StopRoot<false>>::new("{}").unwrap();
        let id = d.request("GET", "/x", &[]);
        d.request_headers(id, true);
        assert_eq!(
            d.response_headers(id, &[(":status", "200")], false),
            Decision::Continue
        );
        d.done(id);
        assert_eq!(d.take_entries(), 2);
    }

    #[test]
    fn hooks_union_and_exports() {
        let rl = Hooks {
            response_headers: true,
            ..Hooks::NONE
        };
        let cache = Hooks {
            response_body: true,
            ..rl
        };
        assert_eq!(rl.exports(), ["proxy_on_response_headers"]);
        assert!(Hooks::NONE.exports().is_empty());
        assert_eq!(rl.union(cache), cache);
        assert!(rl.union(Hooks::ALL).same(Hooks::ALL));
        assert!(!rl.same(cache));
        assert_eq!(
            Hooks::ALL.exports(),
            [
                "proxy_on_request_body",
                "proxy_on_response_headers",
                "proxy_on_response_body",
                "proxy_on_done"
            ]
        );
    }
}
