//! The dispatcher: drives a [`RootFilter`] and its per-request [`HttpFilter`]s over a small
//! [`Proxy`] trait, independent of proxy-wasm. The proxy-wasm adapter ([`crate::adapter`]) and the
//! in-memory test proxy ([`crate::testing::MemProxy`]) both implement [`Proxy`], so the code that
//! decides which context runs, which stream is paused, who owns a callout and when a wake is
//! delivered is the same in Envoy and in unit tests.
//!
//! # What it owns
//! - The context registry: root contexts (one per plugin configuration in the VM) and request
//!   contexts, each with its filter, the stream it paused and whether it sent a local reply.
//! - Callout owners: every HTTP or gRPC callout is registered to the context whose code started
//!   it (a request hook, a woken request, a request handling a callout answer, or a root). Envoy
//!   registers every callout to the *root* context and answers it there; the dispatcher hands
//!   the answer to the owner, with the proxy's effective context switched to it.
//! - Wakes ([`Host::wake`]): a queue, never a nested call (rules below).
//! - Ticks: each root's own tick period, and a borrowed 1 ms tick to deliver deferred wakes.
//!
//! # Rules
//! 1. **One entry at a time.** The proxy calls in (an *entry*: a hook, a tick, a callout answer,
//!    ...); the dispatcher runs the filter code for it and applies its [`Decision`]. Envoy never
//!    calls into the VM while the VM is running (resumes, local replies and callout answers
//!    that happen during a hostcall are deferred by Envoy until the VM returns), so an entry is
//!    never nested in another.
//! 2. **Wakes only queue.** `Host::wake(id, reason)` returns false when request `id` is not a
//!    live request of this VM; otherwise it appends `(id, reason)` to the queue and returns true.
//!    It never runs another filter inside the caller's hook. A wake of the request that is
//!    running (itself) is delivered after its hook returns.
//! 3. **When the queue is drained.** At the end of every entry that returns nothing to the
//!    proxy (tick, callout answer, configuration, `on_done`), the queue is drained in order;
//!    wakes requested by woken requests are appended and delivered in the same drain (at most
//!    [`MAX_WAKES_PER_ENTRY`] per entry; the rest wait, as below). Each delivery switches the
//!    proxy's effective context to the woken request, runs its `on_wake` and applies the
//!    decision; the effective context is restored at the end of the entry.
//!    Wakes requested during a *stream hook* (request/response headers or body) are not
//!    delivered in that entry: in Envoy a local reply sets a VM-wide "stop" flag that would
//!    turn the hook's own `Continue` into a stop (and drop a body chunk), so a woken request
//!    must not answer inside another request's hook. They are delivered on the next tick of
//!    that request's root; the dispatcher asks for a 1 ms tick until the queue is empty, then
//!    restores the root's own period. (A root's `on_tick` may therefore run earlier than its
//!    period, never later.)
//! 4. **Gone contexts.** A wake, callout answer or gRPC answer for a request that has ended
//!    (`on_done`) is dropped (a callout answer without copying its body into the VM); a wake of
//!    a request id that is not live returns false at once. A module whose filter has no
//!    `on_done` does not export `proxy_on_done` (`Hooks::done`: one entry into the VM fewer per
//!    request); its dispatcher forgets a request once the last hook the module exports has run
//!    (a body hook: with the end of the stream) and the request waits for nothing (no paused
//!    stream, no callout of its own), or once a callout answer or wake finds that Envoy no
//!    longer knows it. Requests Envoy ended before their last hook (a client that went away) and
//!    roots Envoy removed (after a configuration change) are found by a sweep: when the live
//!    requests reach twice their number at the last sweep (at least [`SWEEP_MIN`]), and every
//!    [`ROOT_CHECK_EVERY`] requests while the VM has several roots, the dispatcher asks the proxy
//!    to switch to each known context and forgets those it refuses.
//! 5. **Decisions.** From a stream hook: `Continue` goes on (and clears a pause of that
//!    stream), `Pause` holds the stream, `Respond` sends the local reply and stops. From a
//!    callout answer or a wake: `Continue` resumes the stream this request paused (nothing if
//!    none), `Pause` changes nothing, `Respond` sends the local reply. A request sends at most
//!    one local reply; a second `Respond` is ignored (logged at debug).
//! 6. **Unknown contexts fail closed.** A request hook for a context the dispatcher does not
//!    know (its root was never created) answers 503 and logs an error; it is never let through.
//!
//! Nothing here panics: every lookup that can miss is handled, and every proxy operation
//! returns a `Result` that is logged, never unwrapped.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use crate::fast_hash::FastMap;
use crate::filter::{CallResponse, Decision, GrpcResponse, Hooks, HttpFilter, RootFilter};
use crate::header_cache::{self, Cached, HeaderCache};
use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};
use crate::problem::{LocalReply, Problem};

/// Most wakes delivered in one entry; more wait for the next tick (a guard against two
/// requests that keep waking each other).
pub const MAX_WAKES_PER_ENTRY: usize = 1024;

/// The tick period the dispatcher borrows while wakes wait for delivery.
pub const FAST_TICK: Duration = Duration::from_millis(1);

/// Without `proxy_on_done`: the fewest live requests at which the dispatcher sweeps the
/// requests Envoy has ended (rule 4).
pub const SWEEP_MIN: usize = 256;

/// Without `proxy_on_done`: while the VM has several roots, every this many requests the
/// dispatcher checks which roots Envoy still has (rule 4).
pub const ROOT_CHECK_EVERY: u32 = 4096;

/// Rule 4: no hook the module exports (`hooks`) comes after `event` for its request. A body hook
/// is last only with the end of its stream; request headers that end the request are followed
/// by no request body hook.
fn is_last(hooks: Hooks, event: Event, end_of_stream: bool) -> bool {
    let response = hooks.response_headers || hooks.response_body;
    match event {
        Event::RequestHeaders => !response && (end_of_stream || !hooks.request_body),
        Event::RequestBody => !response && end_of_stream,
        Event::ResponseHeaders => end_of_stream || !hooks.response_body,
        Event::ResponseBody => end_of_stream,
        Event::CallResponse(_) | Event::GrpcResponse(_) | Event::Wake(_) => false,
    }
}

/// One direction of an HTTP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The downstream request (decoding).
    Request,
    /// The upstream response (encoding).
    Response,
}

/// What a stream hook returns to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next filter.
    Continue,
    /// Hold the stream (also after a local reply).
    Pause,
}

/// A log level of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
    /// Critical.
    Critical,
}

/// What the dispatcher ran for a request, reported to [`Proxy::observe`] with the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `on_request_headers`.
    RequestHeaders,
    /// `on_request_body`.
    RequestBody,
    /// `on_response_headers`.
    ResponseHeaders,
    /// `on_response_body`.
    ResponseBody,
    /// `on_call_response` for this token.
    CallResponse(u32),
    /// `on_grpc_response` for this token.
    GrpcResponse(u32),
    /// `on_wake` with this reason.
    Wake(u32),
}

/// The proxy operations the dispatcher needs, besides the [`Host`] that filter code uses.
/// Operations act on the proxy's *effective context* (see [`Proxy::set_effective_context`]).
pub trait Proxy {
    /// The host filter code talks to (headers, bodies, shared data, callouts, ...), acting on
    /// the effective context.
    fn host(&mut self) -> &mut dyn Host;
    /// Make `context_id` the context later operations act on. Fails when the proxy does not
    /// know that context.
    fn set_effective_context(&mut self, context_id: u32) -> Result<(), HostError>;
    /// Resume a paused stream of the effective context.
    fn resume(&mut self, stream: Stream) -> Result<(), HostError>;
    /// Answer the effective context's client with a local reply.
    fn send_local_reply(&mut self, reply: &LocalReply) -> Result<(), HostError>;
    /// Read the answer to the HTTP callout being handled: its headers (when `num_headers` is
    /// not zero) and at most `limit + 1` bytes of its `body_size`-byte body.
    fn call_response(
        &mut self,
        num_headers: usize,
        body_size: usize,
        limit: Option<usize>,
    ) -> CallResponse;
    /// Read the answer to the gRPC callout being handled: with `status` 0 its `size`-byte
    /// message, otherwise the proxy's status message.
    fn grpc_response(&mut self, status: u32, size: usize) -> GrpcResponse;
    /// The plugin configuration being applied (`size` bytes).
    fn plugin_configuration(&mut self, size: usize) -> Vec<u8>;
    /// Log a line as is.
    fn log(&mut self, level: Level, message: &str);
    /// Told what ran for a request and what it decided (for tests and tracing); default:
    /// nothing.
    fn observe(&mut self, _context_id: u32, _event: Event, _decision: &Decision) {}
}

/// A root context.
struct RootSlot<R> {
    /// `None` while its code runs.
    root: Option<R>,
    /// The tick period the root asked for.
    own_period: Duration,
    /// The dispatcher borrowed this root's tick ([`FAST_TICK`]) to deliver wakes.
    fast: bool,
    /// The request headers its requests read value by value (`header_cache::singles` of what
    /// the root declared after its configuration); `None`: the whole map.
    singles: Option<Rc<[String]>>,
}

/// A request context.
struct StreamSlot<F> {
    root: u32,
    /// `None` while its code runs.
    filter: Option<F>,
    paused: Option<Stream>,
    replied: bool,
    /// The last hook the module exports has run (used without `proxy_on_done`, rule 4).
    last_ran: bool,
    /// The request's headers, once read (taken out while its code runs).
    cache: HeaderCache,
}

/// Bookkeeping that filter code may change while it runs (through [`Scope`]).
#[derive(Debug, Default)]
struct Book {
    /// The context whose code runs; callouts are registered to it.
    current: u32,
    /// The proxy's effective context as last set (0: the entry's own context).
    effective: u32,
    /// HTTP callout token -> owning context.
    http_owners: FastMap<u32, u32>,
    /// gRPC callout token -> owning context.
    grpc_owners: FastMap<u32, u32>,
    /// Wakes waiting for delivery.
    wakes: VecDeque<(u32, u32)>,
    /// Tick periods asked for by roots while their code ran.
    periods: Vec<(u32, Duration)>,
}

/// The [`Host`] filter code gets from the dispatcher: the proxy's host, except that callouts
/// are registered to the running context, wakes are queued and tick periods are recorded.
struct Scope<'a, F> {
    host: &'a mut dyn Host,
    book: &'a mut Book,
    streams: &'a FastMap<u32, StreamSlot<F>>,
}

impl<F> Host for Scope<'_, F> {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        self.host.header(map, name)
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        self.host.headers(map)
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.set_header(map, name, value)
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.add_header(map, name, value)
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        self.host.remove_header(map, name)
    }
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        self.host.body(which, start, max)
    }
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        self.host.set_body(which, start, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.host.property(path)
    }
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.host.shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        self.host.shared_set(key, value, cas)
    }
    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        let token = self.host.http_call(call)?;
        self.book.http_owners.insert(token, self.book.current);
        Ok(token)
    }
    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        let token = self.host.grpc_call(call)?;
        self.book.grpc_owners.insert(token, self.book.current);
        Ok(token)
    }
    fn now(&self) -> SystemTime {
        self.host.now()
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.host.define_metric(kind, name)
    }
    fn increment_metric(&mut self, id: u32, delta: i64) {
        self.host.increment_metric(id, delta)
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.host.record_metric(id, value)
    }
    fn set_tick_period(&mut self, period: Duration) {
        self.book.periods.push((self.book.current, period));
        self.host.set_tick_period(period)
    }
    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        if !self.streams.contains_key(&context_id) {
            return false;
        }
        self.book.wakes.push_back((context_id, reason));
        true
    }
}

/// Drives one VM's roots and requests over a [`Proxy`]. See the module documentation for the
/// rules.
pub struct Dispatcher<R: RootFilter, P: Proxy> {
    proxy: P,
    version: &'static str,
    roots: FastMap<u32, RootSlot<R>>,
    streams: FastMap<u32, StreamSlot<R::Filter>>,
    book: Book,
    cache_headers: bool,
    /// Without `proxy_on_done`: live requests at which the next sweep runs (rule 4).
    sweep_at: usize,
    /// Without `proxy_on_done`: requests created so far (for the root check, rule 4).
    created: u32,
}

/// How a request's hook is run.
type Run<'a, F> = &'a mut dyn FnMut(&mut F, &mut dyn Host) -> Decision;

impl<R: RootFilter, P: Proxy> Dispatcher<R, P> {
    /// A dispatcher over `proxy`; `version` is the filter's version, logged at VM start.
    pub fn new(proxy: P, version: &'static str) -> Self {
        Dispatcher {
            proxy,
            version,
            roots: FastMap::default(),
            streams: FastMap::default(),
            book: Book::default(),
            cache_headers: true,
            sweep_at: SWEEP_MIN,
            created: 0,
        }
    }

    /// Serve each request's header reads from one read of the whole map (the default; see
    /// `header_cache`), or read each header from the proxy.
    pub fn set_header_cache(&mut self, on: bool) {
        self.cache_headers = on;
    }

    /// The proxy.
    pub fn proxy(&self) -> &P {
        &self.proxy
    }

    /// The proxy, mutable.
    pub fn proxy_mut(&mut self) -> &mut P {
        &mut self.proxy
    }

    /// A root, when it exists (and is not running).
    pub fn root(&self, root_id: u32) -> Option<&R> {
        self.roots.get(&root_id).and_then(|s| s.root.as_ref())
    }

    /// A live request's filter (not while it runs).
    pub fn filter(&self, context_id: u32) -> Option<&R::Filter> {
        self.streams
            .get(&context_id)
            .and_then(|s| s.filter.as_ref())
    }

    /// The stream request `context_id` holds paused, if any.
    pub fn paused(&self, context_id: u32) -> Option<Stream> {
        self.streams.get(&context_id).and_then(|s| s.paused)
    }

    /// True while request `context_id` is live (created, not yet done; without
    /// `proxy_on_done`: not yet forgotten, rule 4).
    pub fn is_live(&self, context_id: u32) -> bool {
        self.streams.contains_key(&context_id)
    }

    /// Wakes waiting for delivery.
    pub fn pending_wakes(&self) -> usize {
        self.book.wakes.len()
    }

    /// Callouts whose answer has not arrived yet (HTTP and gRPC).
    pub fn pending_callouts(&self) -> usize {
        self.book.http_owners.len() + self.book.grpc_owners.len()
    }

    fn log(&mut self, level: Level, message: &str) {
        self.proxy.log(level, message);
    }

    // ---- entries ----

    /// `proxy_on_context_create`: a root when `parent` is 0, else a request of root `parent`.
    pub fn on_context_create(&mut self, context_id: u32, parent: u32) {
        if parent == 0 {
            if self.roots.contains_key(&context_id) {
                self.log(
                    Level::Error,
                    &format!("{}: root context {context_id} created twice", R::log_name()),
                );
                return;
            }
            self.roots.insert(
                context_id,
                RootSlot {
                    root: Some(R::new(context_id)),
                    own_period: Duration::ZERO,
                    fast: false,
                    singles: None,
                },
            );
            return;
        }
        let Some((root, singles)) = self
            .roots
            .get(&parent)
            .and_then(|s| Some((s.root.as_ref()?, s.singles.clone())))
        else {
            self.log(
                Level::Error,
                &format!(
                    "{}: request {context_id} of unknown root {parent}: it will be refused",
                    R::log_name()
                ),
            );
            return;
        };
        let filter = root.create_filter(context_id);
        if !R::HOOKS.done {
            self.created = self.created.wrapping_add(1);
            if self.streams.len() >= self.sweep_at
                || (self.roots.len() > 1 && self.created % ROOT_CHECK_EVERY == 0)
            {
                self.sweep(context_id);
            }
        }
        self.streams.insert(
            context_id,
            StreamSlot {
                root: parent,
                filter: Some(filter),
                paused: None,
                replied: false,
                last_ran: false,
                cache: HeaderCache::with_singles(singles),
            },
        );
    }

    /// Without `proxy_on_done` (rule 4): forget the requests and roots the proxy no longer
    /// knows (it refuses to switch to them), then make `context_id` (the entry's own context)
    /// effective again.
    fn sweep(&mut self, context_id: u32) {
        let ids: Vec<u32> = self
            .streams
            .keys()
            .chain(self.roots.keys())
            .copied()
            .collect();
        let mut gone = 0usize;
        for id in ids {
            if self.proxy.set_effective_context(id).is_err() {
                self.streams.remove(&id);
                self.roots.remove(&id);
                gone += 1;
            }
        }
        if let Err(e) = self.proxy.set_effective_context(context_id) {
            log::debug!("[{context_id}] restoring the effective context after a sweep: {e}");
        }
        self.book.effective = 0;
        self.sweep_at = SWEEP_MIN.max(2 * self.streams.len());
        log::debug!("sweep: {gone} ended contexts forgotten");
    }

    /// Without `proxy_on_done` (rule 4): forget request `context_id` if its last exported hook
    /// has run and it waits for nothing (a paused stream, a callout of its own).
    fn forget_if_idle(&mut self, context_id: u32) {
        if R::HOOKS.done {
            return;
        }
        let Some(slot) = self.streams.get(&context_id) else {
            return;
        };
        if !slot.last_ran || slot.paused.is_some() {
            return;
        }
        let owns = |owners: &FastMap<u32, u32>| owners.values().any(|&o| o == context_id);
        if owns(&self.book.http_owners) || owns(&self.book.grpc_owners) {
            return;
        }
        self.streams.remove(&context_id);
    }

    /// `proxy_on_vm_start`: logs that the VM started.
    pub fn on_vm_start(&mut self) -> bool {
        let line = format!("{} {}: VM started", R::log_name(), self.version);
        self.log(Level::Info, &line);
        true
    }

    /// `proxy_on_configure`: read and apply the plugin configuration; false refuses it.
    pub fn on_configure(&mut self, root_id: u32, size: usize) -> bool {
        let bytes = if size > 0 {
            self.proxy.plugin_configuration(size)
        } else {
            Vec::new()
        };
        let result = self.with_root(root_id, &mut |root, host| root.configure(host, &bytes));
        let ok = match result {
            Some(Ok(())) => {
                if let Some(slot) = self.roots.get_mut(&root_id) {
                    slot.singles = slot
                        .root
                        .as_ref()
                        .and_then(|r| header_cache::singles(r.request_header_reads()));
                }
                let line = format!("{} {}: configuration accepted", R::log_name(), self.version);
                self.log(Level::Info, &line);
                true
            }
            Some(Err(e)) => {
                self.log(Level::Error, &format!("{}: {e}", R::log_name()));
                false
            }
            None => {
                let line = format!(
                    "{}: configuration for unknown root {root_id}",
                    R::log_name()
                );
                self.log(Level::Error, &line);
                false
            }
        };
        self.finish_entry(root_id, Some(root_id), true);
        ok
    }

    /// `proxy_on_tick`.
    pub fn on_tick(&mut self, root_id: u32) {
        let Some(slot) = self.roots.get_mut(&root_id) else {
            return;
        };
        let was_fast = std::mem::replace(&mut slot.fast, false);
        let own = slot.own_period;
        if was_fast {
            // Give the root its own period back (zero stops the borrowed tick).
            self.proxy.host().set_tick_period(own);
        }
        if !own.is_zero() || !was_fast {
            self.with_root(root_id, &mut |root, host| root.on_tick(host));
        }
        self.finish_entry(root_id, Some(root_id), true);
    }

    /// `proxy_on_request_headers`.
    pub fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action {
        self.stream_hook(
            context_id,
            Stream::Request,
            Event::RequestHeaders,
            end_of_stream,
            &mut |f, h| f.on_request_headers(h, end_of_stream),
        )
    }

    /// `proxy_on_request_body`.
    pub fn on_request_body(
        &mut self,
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        self.stream_hook(
            context_id,
            Stream::Request,
            Event::RequestBody,
            end_of_stream,
            &mut |f, h| f.on_request_body(h, body_size, end_of_stream),
        )
    }

    /// `proxy_on_response_headers`.
    pub fn on_response_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action {
        self.stream_hook(
            context_id,
            Stream::Response,
            Event::ResponseHeaders,
            end_of_stream,
            &mut |f, h| f.on_response_headers(h, end_of_stream),
        )
    }

    /// `proxy_on_response_body`.
    pub fn on_response_body(
        &mut self,
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        self.stream_hook(
            context_id,
            Stream::Response,
            Event::ResponseBody,
            end_of_stream,
            &mut |f, h| f.on_response_body(h, body_size, end_of_stream),
        )
    }

    /// `proxy_on_http_call_response`, delivered by the proxy to root `root_id`.
    pub fn on_http_call_response(
        &mut self,
        root_id: u32,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        match self.book.http_owners.remove(&token) {
            Some(owner) if self.roots.contains_key(&owner) => {
                let mut response = Some(self.proxy.call_response(num_headers, body_size, None));
                self.with_root(owner, &mut |root, host| {
                    root.on_call_response(host, token, response.take().unwrap_or_default())
                });
            }
            Some(owner) => match self.streams.get(&owner).and_then(|s| s.filter.as_ref()) {
                Some(filter) => {
                    let limit = filter.call_body_limit(token);
                    let response = self.proxy.call_response(num_headers, body_size, limit);
                    let mut response = Some(response);
                    self.deliver(owner, Event::CallResponse(token), &mut |f, h| {
                        f.on_call_response(h, token, response.take().unwrap_or_default())
                    });
                }
                None => log::debug!(
                    "callout {token} answered after request {owner} ended: dropped unread"
                ),
            },
            None => log::debug!("callout {token} has no owner: dropped unread"),
        }
        self.finish_entry(root_id, Some(root_id), true);
    }

    /// `proxy_on_grpc_receive` (a unary call succeeded) and `proxy_on_grpc_close` (it failed,
    /// with a non-zero `status`), delivered by the proxy to root `root_id`.
    pub fn on_grpc_response(&mut self, root_id: u32, token: u32, status: u32, size: usize) {
        match self.book.grpc_owners.remove(&token) {
            Some(owner) if self.roots.contains_key(&owner) => {
                let mut response = Some(self.proxy.grpc_response(status, size));
                self.with_root(owner, &mut |root, host| {
                    root.on_grpc_response(host, token, response.take().unwrap_or_default())
                });
            }
            Some(owner) if self.streams.contains_key(&owner) => {
                let mut response = Some(self.proxy.grpc_response(status, size));
                self.deliver(owner, Event::GrpcResponse(token), &mut |f, h| {
                    f.on_grpc_response(h, token, response.take().unwrap_or_default())
                });
            }
            Some(owner) => log::debug!(
                "gRPC callout {token} answered after request {owner} ended: dropped unread"
            ),
            None => log::debug!("gRPC callout {token} has no owner: dropped unread"),
        }
        self.finish_entry(root_id, Some(root_id), true);
    }

    /// `proxy_on_done`: the request is complete; its filter's `on_done` runs and the request
    /// is forgotten (later wakes and answers for it are dropped). For a root (the plugin is
    /// being removed; Envoy deletes a root right after its `on_done` says it is done), the root
    /// is forgotten: the module does not export `proxy_on_delete`, so that Envoy makes no entry
    /// into the VM for it on every request.
    pub fn on_done(&mut self, context_id: u32) -> bool {
        let root = self.streams.get(&context_id).map(|s| s.root);
        if root.is_some() {
            self.run_stream(context_id, &mut |f, h| {
                f.on_done(h);
                Decision::Continue
            });
            self.streams.remove(&context_id);
        }
        self.finish_entry(context_id, root, true);
        if root.is_none() {
            self.roots.remove(&context_id);
        }
        true
    }

    /// `proxy_on_delete` (not exported; see [`Dispatcher::on_done`]): forget the context.
    pub fn on_delete(&mut self, context_id: u32) {
        self.streams.remove(&context_id);
        self.roots.remove(&context_id);
    }

    // ---- running code ----

    /// Run `f` on root `root_id` with a [`Scope`]; `None` when the root is unknown or busy.
    fn with_root<T>(
        &mut self,
        root_id: u32,
        f: &mut dyn FnMut(&mut R, &mut dyn Host) -> T,
    ) -> Option<T> {
        let mut root = self.roots.get_mut(&root_id)?.root.take()?;
        if self.book.effective != 0 && self.book.effective != root_id {
            match self.proxy.set_effective_context(root_id) {
                Ok(()) => self.book.effective = root_id,
                Err(e) => log::debug!("[{root_id}] switching back to the root: {e}"),
            }
        }
        let previous = std::mem::replace(&mut self.book.current, root_id);
        let out = {
            let mut scope = Scope {
                host: self.proxy.host(),
                book: &mut self.book,
                streams: &self.streams,
            };
            f(&mut root, &mut scope)
        };
        self.book.current = previous;
        if let Some(slot) = self.roots.get_mut(&root_id) {
            slot.root = Some(root);
        }
        self.take_periods();
        Some(out)
    }

    /// Record tick periods asked for (by a root, or by a request for its root).
    fn take_periods(&mut self) {
        if self.book.periods.is_empty() {
            return;
        }
        for (id, period) in std::mem::take(&mut self.book.periods) {
            let root = self.streams.get(&id).map_or(id, |s| s.root);
            if let Some(slot) = self.roots.get_mut(&root) {
                slot.own_period = period;
                slot.fast = false;
            }
        }
    }

    /// Run `f` on request `context_id`'s filter; `None` when it is gone or busy.
    fn run_stream(&mut self, context_id: u32, f: Run<'_, R::Filter>) -> Option<Decision> {
        let slot = self.streams.get_mut(&context_id)?;
        let mut filter = slot.filter.take()?;
        let mut cache = std::mem::take(&mut slot.cache);
        let previous = std::mem::replace(&mut self.book.current, context_id);
        let decision = {
            let host = self.proxy.host();
            let mut cached;
            let host: &mut dyn Host = if self.cache_headers {
                cached = Cached::new(host, &mut cache);
                &mut cached
            } else {
                host
            };
            let mut scope = Scope {
                host,
                book: &mut self.book,
                streams: &self.streams,
            };
            f(&mut filter, &mut scope)
        };
        self.book.current = previous;
        if let Some(slot) = self.streams.get_mut(&context_id) {
            slot.filter = Some(filter);
            slot.cache = cache;
        }
        self.take_periods();
        Some(decision)
    }

    /// Run a stream hook (`end_of_stream`: of the stream it belongs to).
    fn stream_hook(
        &mut self,
        context_id: u32,
        stream: Stream,
        event: Event,
        end_of_stream: bool,
        f: Run<'_, R::Filter>,
    ) -> Action {
        let root = self.streams.get(&context_id).map(|s| s.root);
        self.book.effective = 0;
        let action = match self.run_stream(context_id, f) {
            Some(decision) => {
                self.proxy.observe(context_id, event, &decision);
                let action = self.apply_in_hook(context_id, stream, decision);
                if !R::HOOKS.done && is_last(R::HOOKS, event, end_of_stream) {
                    if let Some(slot) = self.streams.get_mut(&context_id) {
                        slot.last_ran = true;
                    }
                    self.forget_if_idle(context_id);
                }
                action
            }
            None => self.unknown_context(context_id, stream),
        };
        self.finish_entry(context_id, root, false);
        action
    }

    /// A hook for a request the dispatcher does not know: refuse it (fail closed).
    fn unknown_context(&mut self, context_id: u32, stream: Stream) -> Action {
        let line = format!(
            "{}: hook for unknown request {context_id}: answered 503",
            R::log_name()
        );
        self.log(Level::Error, &line);
        if stream == Stream::Response {
            return Action::Continue;
        }
        let reply = Problem::new(503)
            .detail("the gateway filter has no state for this request")
            .into_reply();
        if let Err(e) = self.proxy.send_local_reply(&reply) {
            log::warn!("[{context_id}] local reply 503: {e}");
        }
        Action::Pause
    }

    /// Apply a stream hook's decision.
    fn apply_in_hook(&mut self, context_id: u32, stream: Stream, decision: Decision) -> Action {
        let Some(slot) = self.streams.get_mut(&context_id) else {
            return Action::Continue;
        };
        match decision {
            Decision::Continue => {
                if slot.paused == Some(stream) {
                    slot.paused = None;
                }
                Action::Continue
            }
            Decision::Pause => {
                slot.paused = Some(stream);
                Action::Pause
            }
            Decision::Respond(reply) => {
                if slot.replied {
                    log::debug!("[{context_id}] a second local reply was ignored");
                    return Action::Continue;
                }
                slot.replied = true;
                slot.paused = None;
                if let Err(e) = self.proxy.send_local_reply(&reply) {
                    log::warn!("[{context_id}] local reply {}: {e}", reply.status);
                }
                Action::Pause
            }
        }
    }

    /// Run an asynchronous event (callout answer, wake) on a live request, with the proxy's
    /// effective context switched to it, and apply its decision.
    fn deliver(&mut self, context_id: u32, event: Event, f: Run<'_, R::Filter>) {
        if !self.streams.contains_key(&context_id) {
            return;
        }
        if self.book.effective != context_id {
            if let Err(e) = self.proxy.set_effective_context(context_id) {
                log::debug!("[{context_id}] cannot switch to the request ({e}): event dropped");
                if !R::HOOKS.done {
                    // The proxy ended it (rule 4).
                    self.streams.remove(&context_id);
                }
                return;
            }
            self.book.effective = context_id;
        }
        let Some(decision) = self.run_stream(context_id, f) else {
            return;
        };
        self.proxy.observe(context_id, event, &decision);
        self.apply_delivered(context_id, decision);
        self.forget_if_idle(context_id);
    }

    /// Apply the decision of an asynchronous event (rule 5).
    fn apply_delivered(&mut self, context_id: u32, decision: Decision) {
        let Some(slot) = self.streams.get_mut(&context_id) else {
            return;
        };
        match decision {
            Decision::Pause => {}
            Decision::Continue => {
                if let Some(stream) = slot.paused.take() {
                    if let Err(e) = self.proxy.resume(stream) {
                        log::warn!("[{context_id}] resume {stream:?}: {e}");
                    }
                }
            }
            Decision::Respond(reply) => {
                if slot.replied {
                    log::debug!("[{context_id}] a second local reply was ignored");
                    return;
                }
                slot.replied = true;
                slot.paused = None;
                if let Err(e) = self.proxy.send_local_reply(&reply) {
                    log::warn!("[{context_id}] local reply {}: {e}", reply.status);
                }
            }
        }
    }

    /// Deliver queued wakes (at most [`MAX_WAKES_PER_ENTRY`]).
    fn drain_wakes(&mut self) {
        for _ in 0..MAX_WAKES_PER_ENTRY {
            let Some((id, reason)) = self.book.wakes.pop_front() else {
                return;
            };
            if !self.streams.contains_key(&id) {
                log::debug!("[{id}] woken after it ended: wake dropped");
                continue;
            }
            self.deliver(id, Event::Wake(reason), &mut |f, h| f.on_wake(h, reason));
        }
    }

    /// End of an entry for `context_id` (of root `root`): deliver wakes when allowed, restore
    /// the effective context, and borrow the root's tick when wakes still wait.
    fn finish_entry(&mut self, context_id: u32, root: Option<u32>, drain: bool) {
        if drain {
            self.drain_wakes();
        }
        if self.book.effective != 0 && self.book.effective != context_id {
            if let Err(e) = self.proxy.set_effective_context(context_id) {
                log::debug!("[{context_id}] restoring the effective context: {e}");
            }
        }
        self.book.effective = 0;
        if self.book.wakes.is_empty() {
            return;
        }
        let Some(slot) = root.and_then(|r| self.roots.get_mut(&r)) else {
            return;
        };
        if !slot.fast {
            slot.fast = true;
            self.proxy.host().set_tick_period(FAST_TICK);
        }
    }
}

#[cfg(test)]
mod tests;
