//! Request handling of the aggregate filter.
//!
//! A request that matches a composite endpoint never reaches the router: `on_request_headers`
//! (or the end of the request body, when a call forwards it) starts every call whose inputs are
//! known, pauses, collects the answers in `on_call_response`, starts dependent calls as their
//! inputs arrive, and finally answers with the merged JSON (or a problem when a required call
//! failed). Hedged calls are woken by the root's tick. Requests that match no endpoint pass
//! through untouched.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use tollgate_common::fast_hash::FastMap;

use serde_json::{json, Map, Value};
use tollgate_common::metrics::Metrics;
use tollgate_common::route::RequestInfo;
use tollgate_common::{
    Body, CallResponse, ConfigError, Decision, Host, HttpCall, HttpFilter, LocalReply, MapKind,
    Problem, RootFilter, RouteParams,
};

use crate::breaker::{self, Admit, Transition};
use crate::config::{Call, Compiled, Config, Endpoint, Selector};
use crate::shape;
use crate::template::{Inputs, RenderError};

/// A timed-out callout answers at (or a hair before, by our clock) its timeout.
const TIMEOUT_SLACK: Duration = Duration::from_millis(25);
/// Tick period of the root while some call hedges.
const TICK: Duration = Duration::from_millis(10);

/// Per-VM state: the compiled configuration and metrics.
pub struct AggregateRoot {
    shared: Rc<Worker>,
    wakes: Rc<RefCell<Vec<WakeAt>>>,
}

/// What every request of a VM shares.
pub struct Worker {
    /// The compiled configuration.
    pub config: Compiled,
    /// The filter's metrics.
    pub metrics: Metrics,
}

/// A request to wake later (hedging): context id, when, and the reason (call index + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeAt {
    context_id: u32,
    at: SystemTime,
    reason: u32,
}

impl RootFilter for AggregateRoot {
    type Filter = AggregateFilter;
    const NAME: &'static str = "aggregate";
    // A composite request's body is read; the route's answer is held back while its calls are
    // out (a paused response gets no body chunk, so no response body hook). `on_done` cancels
    // the calls of a request that ended.
    const HOOKS: tollgate_common::filter::Hooks = tollgate_common::filter::Hooks {
        request_body: true,
        response_headers: true,
        done: true,
        ..tollgate_common::filter::Hooks::NONE
    };

    fn new(_context_id: u32) -> Self {
        AggregateRoot {
            shared: Rc::new(Worker {
                config: Compiled::default(),
                metrics: Metrics::new("aggregate"),
            }),
            wakes: Rc::default(),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config = Config::parse(configuration)?;
        for rule in &config.rules {
            for call in rule.endpoint.iter().flat_map(|ep| ep.calls.iter()) {
                if call.breaker.is_some() {
                    breaker::init(host, &call.cluster);
                }
            }
        }
        host.set_tick_period(if config.hedging { TICK } else { Duration::ZERO });
        self.shared = Rc::new(Worker {
            config,
            metrics: Metrics::new("aggregate"),
        });
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        let now = host.now();
        let due: Vec<WakeAt> = {
            let mut w = self.wakes.borrow_mut();
            let (due, keep): (Vec<_>, Vec<_>) = w.drain(..).partition(|x| x.at <= now);
            *w = keep;
            due
        };
        for w in due {
            if !host.wake(w.context_id, w.reason) {
                log::debug!("[{}] aggregate: request gone before its wake", w.context_id);
            }
        }
    }

    fn create_filter(&self, context_id: u32) -> AggregateFilter {
        AggregateFilter {
            context_id,
            shared: self.shared.clone(),
            wakes: self.wakes.clone(),
            active: None,
        }
    }
}

/// Per-request state.
pub struct AggregateFilter {
    context_id: u32,
    shared: Rc<Worker>,
    wakes: Rc<RefCell<Vec<WakeAt>>>,
    active: Option<Active>,
}

/// A composite request in progress.
struct Active {
    rule: usize,
    params: RouteParams,
    query: String,
    path: String,
    profile: Option<usize>,
    started: SystemTime,
    request_headers: Vec<(String, String)>,
    /// The caller's consumer id (the consumer header), when the request has one.
    consumer: Option<String>,
    /// The identity headers of the request (lower-case names, configuration order).
    identity: Vec<(String, String)>,
    calls: Vec<CallState>,
    tokens: FastMap<u32, usize>,
    finished: bool,
    /// The request body, once complete, for calls that forward it.
    body: Option<Vec<u8>>,
    /// The calls wait for the end of the request body.
    awaiting_body: bool,
}

enum CallState {
    /// Not part of the chosen profile.
    Skipped,
    /// Waiting for the answers it depends on.
    Waiting,
    InFlight(Flight),
    Done(Result<Part, Failure>),
}

struct Flight {
    path: String,
    attempts: Vec<Attempt>,
    hedged: bool,
    last_failure: Option<Failure>,
    /// This call is its breaker's probe (the id [`breaker::admit`] gave it).
    probe: Option<u64>,
}

struct Attempt {
    token: u32,
    started: SystemTime,
    timeout: Duration,
    live: bool,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
struct Part {
    value: Value,
    cache_control: Option<String>,
    vary: Option<String>,
}

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    Timeout,
    Status,
    Unreachable,
    NotJson,
    TooLarge,
    CircuitOpen,
    Dependency,
    MissingValue,
    BadValue,
    NotObject,
}

impl FailKind {
    fn as_str(self) -> &'static str {
        match self {
            FailKind::Timeout => "timeout",
            FailKind::Status => "status",
            FailKind::Unreachable => "unreachable",
            FailKind::NotJson => "not_json",
            FailKind::TooLarge => "too_large",
            FailKind::CircuitOpen => "circuit_open",
            FailKind::Dependency => "dependency",
            FailKind::MissingValue => "missing_value",
            FailKind::BadValue => "bad_value",
            FailKind::NotObject => "not_object",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    kind: FailKind,
    status: Option<u16>,
    detail: String,
}

impl Failure {
    fn new(kind: FailKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            status: None,
            detail: detail.into(),
        }
    }
}

fn endpoint(shared: &Worker, rule: usize) -> Option<&Endpoint> {
    shared.config.rules.get(rule)?.endpoint.as_ref()
}

fn elapsed(now: SystemTime, since: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

/// Classify a callout answer.
fn classify(
    call: &Call,
    response: &CallResponse,
    took: Duration,
    timeout: Duration,
) -> Result<Part, Failure> {
    let timed_out = took + TIMEOUT_SLACK >= timeout;
    let status = match response.status() {
        None if timed_out => {
            return Err(Failure::new(
                FailKind::Timeout,
                format!("no answer within {}ms", timeout.as_millis()),
            ))
        }
        None => {
            return Err(Failure::new(
                FailKind::Unreachable,
                "no answer (connection failed or reset, or no such cluster)",
            ))
        }
        // Envoy answers a callout that ran out of time with a 504 of its own: not the
        // backend's status, so none is reported.
        Some(504) if timed_out => {
            return Err(Failure::new(
                FailKind::Timeout,
                format!("no answer within {}ms", timeout.as_millis()),
            ))
        }
        Some(s) => s,
    };
    if let Some(f) = envoy_local_failure(status, &response.body, timeout) {
        return Err(f);
    }
    if !(200..300).contains(&status) {
        return Err(Failure {
            kind: FailKind::Status,
            status: Some(status),
            detail: format!("answered {status}"),
        });
    }
    let with_status = |kind, detail: String| Failure {
        kind,
        status: Some(status),
        detail,
    };
    if response.body.len() > call.max_response_bytes {
        return Err(with_status(
            FailKind::TooLarge,
            // The adapter copies at most one byte over the limit into the VM.
            format!(
                "the answer is over the limit of {} bytes",
                call.max_response_bytes
            ),
        ));
    }
    if let Some(ct) = response.header("content-type") {
        if !ct.to_ascii_lowercase().contains("json") {
            return Err(with_status(
                FailKind::NotJson,
                format!("answered `{ct}`, not JSON"),
            ));
        }
    }
    let value = if response.body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&response.body)
            .map_err(|e| with_status(FailKind::NotJson, format!("invalid JSON: {e}")))?
    };
    Ok(Part {
        value,
        cache_control: response.header("cache-control").map(str::to_string),
        vary: response.header("vary").map(str::to_string),
    })
}

/// Envoy answers a callout it could not complete with a local reply of its own (a 503 "upstream
/// connect error ..." or "no healthy upstream", a 504 "upstream request timeout"): that is not the
/// backend's status.
fn envoy_local_failure(status: u16, body: &[u8], timeout: Duration) -> Option<Failure> {
    let text = body.get(..body.len().min(120)).unwrap_or(&[]);
    let text = String::from_utf8_lossy(text);
    if status == 504 && text.starts_with("upstream request timeout") {
        return Some(Failure::new(
            FailKind::Timeout,
            format!("no answer within {}ms", timeout.as_millis()),
        ));
    }
    if (500..=503).contains(&status)
        && (text.starts_with("upstream connect error") || text.starts_with("no healthy upstream"))
    {
        return Some(Failure::new(
            FailKind::Unreachable,
            format!("no answer: {}", text.trim()),
        ));
    }
    None
}

/// Does the outcome say the backend is healthy, for its circuit breaker? Timeouts, failed
/// connections and 5xx answers count against it; a 4xx, or an answer the filter cannot use
/// (not JSON, too large), came from a working backend.
fn healthy(outcome: &Result<Part, Failure>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(f) => match f.kind {
            FailKind::Timeout | FailKind::Unreachable => false,
            FailKind::Status => f.status.is_none_or(|s| s < 500),
            _ => true,
        },
    }
}

/// The answer to a request without the identity its calls need: `401` without a consumer (no
/// authenticated caller), `403` when the caller's identity lacks a header a path uses.
fn identity_problem(
    identified: bool,
    missing: &str,
    consumer_header: &str,
    path: &str,
) -> LocalReply {
    let (status, kind, detail) = if identified {
        (
            403,
            "identity-incomplete",
            format!("this endpoint needs `{missing}` of the caller's identity, which has none"),
        )
    } else {
        (
            401,
            "identity-required",
            format!("this endpoint answers for the authenticated caller; the request has no `{consumer_header}`"),
        )
    };
    let mut reply = Problem::new(status)
        .typed(
            format!("https://tollgate.dev/problems/aggregate/{kind}"),
            tollgate_common::problem::reason_phrase(status),
        )
        .detail(detail)
        .instance(path)
        .into_reply();
    if !identified {
        reply = reply.with_header("www-authenticate", "Bearer");
    }
    reply
}

/// Select and shape a call's answer: pointer, allow, deny, rename (in that order).
fn shape_answer(call: &Call, value: &Value) -> Value {
    let selected = match &call.pointer {
        Some(p) => value.pointer(p).cloned().unwrap_or(Value::Null),
        None => value.clone(),
    };
    let mut v = shape::deny_fields(shape::allow_fields(selected, &call.allow), &call.deny);
    shape::rename(&mut v, &call.rename);
    v
}

impl AggregateFilter {
    fn metric(&self, host: &mut dyn Host, name: &str) {
        self.shared.metrics.count(host, name, 1);
    }

    /// Count per endpoint call and per backend (cluster).
    fn call_metric(&self, host: &mut dyn Host, ep: &Endpoint, call: &Call, what: &str) {
        let name = format!("ep.{}.call.{}.{what}", ep.name, call.name);
        self.shared.metrics.count(host, &name, 1);
        let name = format!("backend.{}.{what}", call.cluster);
        self.shared.metrics.count(host, &name, 1);
    }

    fn breaker_metric(&self, host: &mut dyn Host, cluster: &str, t: Option<Transition>) {
        let Some(t) = t else { return };
        let what = match t {
            Transition::Opened => "opened",
            Transition::HalfOpened => "half_opened",
            Transition::Closed => "closed",
        };
        log::info!(
            "[{}] aggregate: circuit breaker of backend `{cluster}` {what}",
            self.context_id
        );
        self.shared
            .metrics
            .count(host, &format!("breaker.{cluster}.{what}"), 1);
    }

    /// Start every waiting call whose inputs are known, then answer when possible.
    fn advance(&mut self, host: &mut dyn Host) -> Decision {
        let shared = self.shared.clone();
        let Some(rule) = self.active.as_ref().map(|a| a.rule) else {
            return Decision::Continue;
        };
        let Some(ep) = endpoint(&shared, rule) else {
            return Decision::Continue;
        };
        loop {
            let mut progressed = false;
            for (i, call) in ep.calls.iter().enumerate() {
                let Some(active) = self.active.as_mut() else {
                    return Decision::Continue;
                };
                if !matches!(active.calls.get(i), Some(CallState::Waiting)) {
                    continue;
                }
                let mut ready = true;
                let mut failed_dep = None;
                for d in &call.depends_on {
                    match active.calls.get(*d) {
                        Some(CallState::Done(Ok(_))) => {}
                        Some(CallState::Done(Err(_)) | CallState::Skipped) | None => {
                            failed_dep = Some(*d)
                        }
                        Some(CallState::Waiting | CallState::InFlight(_)) => ready = false,
                    }
                }
                if failed_dep.is_none() && !ready {
                    continue;
                }
                progressed = true;
                if let Some(d) = failed_dep {
                    let dep = ep.calls.get(d).map(|c| c.name.as_str()).unwrap_or("?");
                    let f = Failure::new(
                        FailKind::Dependency,
                        format!("call `{dep}`, whose answer it needs, failed"),
                    );
                    self.finish_call(host, ep, i, Err(f), false);
                    continue;
                }
                self.start_call(host, ep, i);
            }
            if !progressed {
                break;
            }
        }
        self.maybe_respond(host, ep)
    }

    fn start_call(&mut self, host: &mut dyn Host, ep: &Endpoint, i: usize) {
        let Some(call) = ep.calls.get(i) else { return };
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let path = match render_path(ep, active, call) {
            Ok(p) => p,
            Err(f) => return self.finish_call(host, ep, i, Err(f), false),
        };
        let probe = match self.admit_by_breaker(host, ep, call) {
            Ok(probe) => probe,
            Err(f) => return self.finish_call(host, ep, i, Err(f), false),
        };
        match self.dispatch(host, ep, i, &path) {
            Ok(attempt) => {
                let hedge = call.hedge_after.filter(|h| *h < attempt.timeout);
                if let Some(active) = self.active.as_mut() {
                    active.tokens.insert(attempt.token, i);
                    if let Some(slot) = active.calls.get_mut(i) {
                        *slot = CallState::InFlight(Flight {
                            path,
                            attempts: vec![attempt],
                            hedged: false,
                            last_failure: None,
                            probe,
                        });
                    }
                }
                if let Some(h) = hedge {
                    self.wakes.borrow_mut().push(WakeAt {
                        context_id: self.context_id,
                        at: host.now() + h,
                        reason: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    });
                }
            }
            Err(f) => {
                // The probe never went out: let the next call probe.
                if let (Some(b), Some(id)) = (&call.breaker, probe) {
                    breaker::release(host, &call.cluster, b, id);
                }
                self.finish_call(host, ep, i, Err(f), false)
            }
        }
    }

    /// Ask the call's circuit breaker (if any): `Ok(Some(id))` when the call is its probe,
    /// `Err` when the breaker is open.
    fn admit_by_breaker(
        &mut self,
        host: &mut dyn Host,
        ep: &Endpoint,
        call: &Call,
    ) -> Result<Option<u64>, Failure> {
        let Some(b) = &call.breaker else {
            return Ok(None);
        };
        // A probe may take its timeout (and a hedge's delay) before its outcome is known.
        let lease = call.timeout + call.hedge_after.unwrap_or_default() + breaker::LEASE_MARGIN;
        let (admit, t) = breaker::admit(host, &call.cluster, b, lease);
        self.breaker_metric(host, &call.cluster, t);
        match admit {
            Admit::Probe(id) => Ok(Some(id)),
            Admit::Reject => {
                self.call_metric(host, ep, call, "rejected");
                Err(Failure::new(
                    FailKind::CircuitOpen,
                    format!("circuit breaker of backend `{}` is open", call.cluster),
                ))
            }
            Admit::Allow => Ok(None),
        }
    }

    /// Dispatch one attempt of call `i`, bounded by the rest of the deadline.
    fn dispatch(
        &mut self,
        host: &mut dyn Host,
        ep: &Endpoint,
        i: usize,
        path: &str,
    ) -> Result<Attempt, Failure> {
        let (Some(call), Some(active)) = (ep.calls.get(i), self.active.as_ref()) else {
            return Err(Failure::new(FailKind::Unreachable, "no such call"));
        };
        let now = host.now();
        let timeout = attempt_timeout(ep, call, active, i, now)?;
        let headers = call_headers(call, active, path);
        let body = match (&active.body, call.forward_body) {
            (Some(b), true) if !b.is_empty() => Some(b.as_slice()),
            _ => None,
        };
        let req = HttpCall {
            cluster: &call.cluster,
            headers,
            body,
            timeout,
        };
        match host.http_call(&req) {
            Ok(token) => {
                self.call_metric(host, ep, call, "calls");
                Ok(Attempt {
                    token,
                    started: now,
                    timeout,
                    live: true,
                })
            }
            Err(e) => {
                log::warn!(
                    "[{}] aggregate: call `{}` to cluster `{}` could not start: {e}",
                    self.context_id,
                    call.name,
                    call.cluster
                );
                Err(Failure::new(
                    FailKind::Unreachable,
                    format!(
                        "the call could not start ({e}); is `{}` an Envoy cluster?",
                        call.cluster
                    ),
                ))
            }
        }
    }

    /// Settle call `i`: metrics, breaker (`to_backend`: the outcome came from the backend).
    fn finish_call(
        &mut self,
        host: &mut dyn Host,
        ep: &Endpoint,
        i: usize,
        outcome: Result<Part, Failure>,
        to_backend: bool,
    ) {
        let Some(call) = ep.calls.get(i) else { return };
        if let Err(f) = &outcome {
            self.call_metric(host, ep, call, "failures");
            if f.kind == FailKind::Timeout {
                self.call_metric(host, ep, call, "timeouts");
            }
            log::debug!(
                "[{}] aggregate: call `{}` failed: {}",
                self.context_id,
                call.name,
                f.detail
            );
        }
        if to_backend {
            if let Some(b) = &call.breaker {
                let probe = match self.active.as_ref().and_then(|a| a.calls.get(i)) {
                    Some(CallState::InFlight(f)) => f.probe,
                    _ => None,
                };
                let t = breaker::record(host, &call.cluster, b, healthy(&outcome), probe);
                self.breaker_metric(host, &call.cluster, t);
            }
        }
        if let Some(slot) = self.active.as_mut().and_then(|a| a.calls.get_mut(i)) {
            *slot = CallState::Done(outcome);
        }
    }

    fn maybe_respond(&mut self, host: &mut dyn Host, ep: &Endpoint) -> Decision {
        let Some(active) = self.active.as_ref() else {
            return Decision::Continue;
        };
        // A failed required call answers at once, whatever is still in flight.
        for (i, call) in ep.calls.iter().enumerate() {
            if let (true, Some(CallState::Done(Err(f)))) = (call.required, active.calls.get(i)) {
                let reply = self.problem(ep, call, f, &active.path);
                self.metric(host, &format!("ep.{}.failed", ep.name));
                return self.respond(host, ep, reply);
            }
        }
        let pending = active
            .calls
            .iter()
            .any(|c| matches!(c, CallState::Waiting | CallState::InFlight(_)));
        if pending {
            return Decision::Pause;
        }
        let (reply, complete) = self.merged(ep, active);
        let what = if complete { "complete" } else { "partial" };
        self.metric(host, &format!("ep.{}.{what}", ep.name));
        self.respond(host, ep, reply)
    }

    fn respond(&mut self, host: &mut dyn Host, ep: &Endpoint, reply: LocalReply) -> Decision {
        let now = host.now();
        if let Some(a) = self.active.as_mut() {
            a.finished = true;
            let ms = elapsed(now, a.started).as_millis();
            self.shared.metrics.record(
                host,
                &format!("ep.{}.latency_ms", ep.name),
                u64::try_from(ms).unwrap_or(u64::MAX),
            );
        }
        let id = self.context_id;
        self.wakes.borrow_mut().retain(|w| w.context_id != id);
        Decision::Respond(reply)
    }

    fn problem(&self, ep: &Endpoint, call: &Call, f: &Failure, path: &str) -> LocalReply {
        let status = if f.kind == FailKind::Timeout {
            504
        } else {
            502
        };
        log::warn!(
            "[{}] aggregate: endpoint `{}`: required call `{}` (backend `{}`) failed: {}",
            self.context_id,
            ep.name,
            call.name,
            call.cluster,
            f.detail
        );
        let mut p = Problem::new(status)
            .detail(format!(
                "required call `{}` to backend `{}` failed: {}",
                call.name, call.cluster, f.detail
            ))
            .instance(path)
            .extension("call", call.name.clone())
            .extension("backend", call.cluster.clone())
            .extension("error", f.kind.as_str());
        if let Some(s) = f.status {
            // `status` is the problem's own status (RFC 9457).
            p = p.extension("backend_status", s);
        }
        p.into_reply().with_header("x-aggregate-complete", "false")
    }

    fn merged(&self, ep: &Endpoint, active: &Active) -> (LocalReply, bool) {
        let mut out = Map::new();
        let mut errors = Vec::new();
        let mut cache_controls: Vec<Option<&str>> = Vec::new();
        let mut varies: Vec<Option<&str>> = Vec::new();
        let mut complete = true;
        // A reply built from the caller's identity is that caller's: no shared cache may keep it.
        let personal = ep.calls.iter().enumerate().any(|(i, c)| {
            !c.identity_vars.is_empty() && !matches!(active.calls.get(i), Some(CallState::Skipped))
        });
        for (i, call) in ep.calls.iter().enumerate() {
            let failure = match active.calls.get(i) {
                Some(CallState::Skipped) => continue,
                Some(CallState::Done(Ok(part))) => {
                    let v = shape_answer(call, &part.value);
                    match shape::merge_into(&mut out, call.merge, &call.key, Some(v)) {
                        Ok(()) => {
                            cache_controls.push(part.cache_control.as_deref());
                            varies.push(part.vary.as_deref());
                            continue;
                        }
                        Err(e) => Failure::new(FailKind::NotObject, e),
                    }
                }
                Some(CallState::Done(Err(f))) => f.clone(),
                _ => Failure::new(FailKind::Timeout, "unfinished"),
            };
            complete = false;
            let _ = shape::merge_into(&mut out, call.merge, &call.key, None);
            let mut e = json!({
                "call": call.name,
                "backend": call.cluster,
                "error": failure.kind.as_str(),
                "detail": failure.detail,
            });
            if let (Some(s), Some(obj)) = (failure.status, e.as_object_mut()) {
                obj.insert("status".into(), Value::from(s));
            }
            errors.push(e);
        }
        let mut merged = Value::Object(out);
        let profile = active.profile.and_then(|p| ep.profiles.get(p));
        if let Some(p) = profile {
            merged = shape::deny_fields(shape::allow_fields(merged, &p.allow), &p.deny);
        }
        if ep.errors {
            if let Some(obj) = merged.as_object_mut() {
                obj.insert("errors".into(), Value::Array(errors));
            }
        }
        let body = serde_json::to_vec(&merged).unwrap_or_else(|_| b"{}".to_vec());
        let mut reply = LocalReply::new(200)
            .with_header("content-type", "application/json")
            .with_header(
                "cache-control",
                shape::merged_cache_control(&cache_controls, complete, personal),
            )
            .with_header(
                "x-aggregate-complete",
                if complete { "true" } else { "false" },
            )
            .with_body(body);
        if let Some(p) = profile {
            reply = reply.with_header("x-aggregate-profile", p.name.clone());
        }
        // The reply depends on the headers that choose a profile, and on what the parts vary on.
        let profile_headers = ep.profiles.iter().filter_map(|p| match &p.selector {
            Selector::Header(name, _) => Some(name.as_str()),
            Selector::PathPrefix(_) => None,
        });
        if let Some(vary) = shape::merged_vary(varies, profile_headers) {
            reply = reply.with_header("vary", vary);
        }
        (reply, complete)
    }
}

/// The profile of the endpoint this request asks for (the first whose selector matches).
fn profile_of(ep: &Endpoint, request_headers: &[(String, String)], path: &str) -> Option<usize> {
    ep.profiles.iter().position(|p| match &p.selector {
        Selector::Header(name, value) => request_headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case(name) && v == value),
        Selector::PathPrefix(prefix) => path.starts_with(prefix.as_str()),
    })
}

/// Each call's state before any starts: waiting, or skipped when the profile leaves it out.
fn initial_calls(ep: &Endpoint, profile: Option<usize>) -> Vec<CallState> {
    let list = profile
        .and_then(|p| ep.profiles.get(p))
        .and_then(|p| p.calls.as_ref());
    (0..ep.calls.len())
        .map(|i| {
            if list.is_none_or(|list| list.contains(&i)) {
                CallState::Waiting
            } else {
                CallState::Skipped
            }
        })
        .collect()
}

/// The request's identity headers (configuration order, non-empty values only).
fn identity_of(config: &Compiled, request_headers: &[(String, String)]) -> Vec<(String, String)> {
    config
        .identity_headers
        .iter()
        .filter_map(|h| {
            request_headers
                .iter()
                .find(|(k, v)| k.eq_ignore_ascii_case(h) && !v.is_empty())
                .map(|(_, v)| (h.clone(), v.clone()))
        })
        .collect()
}

/// An identity header a call that will run needs in its path and the request lacks.
fn missing_identity<'e>(
    ep: &'e Endpoint,
    calls: &[CallState],
    identity: &[(String, String)],
) -> Option<&'e String> {
    ep.calls
        .iter()
        .zip(calls)
        .filter(|(_, state)| !matches!(*state, CallState::Skipped))
        .flat_map(|(c, _)| c.identity_vars.iter())
        .find(|h| !identity.iter().any(|(k, _)| k == *h))
}

/// How long attempt of `call` may take: what is left of the endpoint's deadline and of the
/// call's timeout (a hedge gets what is left of the first attempt's, not one of its own).
fn attempt_timeout(
    ep: &Endpoint,
    call: &Call,
    active: &Active,
    i: usize,
    now: SystemTime,
) -> Result<Duration, Failure> {
    let left = ep.deadline.saturating_sub(elapsed(now, active.started));
    if left < Duration::from_millis(1) {
        return Err(Failure::new(
            FailKind::Timeout,
            format!(
                "the deadline of {}ms passed before the call could start",
                ep.deadline.as_millis()
            ),
        ));
    }
    let first = match active.calls.get(i) {
        Some(CallState::InFlight(f)) => f.attempts.first().map(|a| a.started),
        _ => None,
    };
    let budget = match first {
        Some(t) => call.timeout.saturating_sub(elapsed(now, t)),
        None => call.timeout,
    };
    if budget < Duration::from_millis(1) {
        return Err(Failure::new(
            FailKind::Timeout,
            format!("no answer within {}ms", call.timeout.as_millis()),
        ));
    }
    Ok(budget.min(left))
}

/// The headers of a call: pseudo-headers, the forwarded request headers, the caller's identity
/// (the auth filter set it and removed any copy a client sent), then the call's own.
fn call_headers<'a>(call: &'a Call, active: &'a Active, path: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", call.method.as_str()),
        (":path", path),
        (":authority", call.authority.as_str()),
    ];
    for name in &call.forward_headers {
        for (k, v) in &active.request_headers {
            if k == name {
                headers.push((k.as_str(), v.as_str()));
            }
        }
    }
    if call.forward_identity {
        for (k, v) in &active.identity {
            if !call.forward_headers.contains(k) {
                headers.push((k.as_str(), v.as_str()));
            }
        }
    }
    for (k, v) in &call.headers {
        headers.push((k.as_str(), v.as_str()));
    }
    headers
}

/// The path of call `i`, rendered from the request and the answers so far.
fn render_path(ep: &Endpoint, active: &Active, call: &Call) -> Result<String, Failure> {
    let answer = |name: &str| -> Option<&Value> {
        let j = ep.calls.iter().position(|c| c.name == name)?;
        match active.calls.get(j) {
            Some(CallState::Done(Ok(p))) => Some(&p.value),
            _ => None,
        }
    };
    let inputs = Inputs {
        params: &active.params,
        query: &active.query,
        consumer: active.consumer.as_deref(),
        identity: &active.identity,
        answer: &answer,
    };
    call.path.render(&inputs).map_err(|e| match e {
        RenderError::Missing(e) => Failure::new(FailKind::MissingValue, e),
        RenderError::Unsafe(e) => Failure::new(FailKind::BadValue, e),
    })
}

impl HttpFilter for AggregateFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Decision {
        let req = RequestInfo::from_host(host);
        let shared = self.shared.clone();
        let found = shared
            .config
            .rules
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.route.matches(&req).map(|p| (i, r, p)));
        if let Some((_, rule, _)) = &found {
            if rule.disabled {
                self.metric(host, "skipped");
                return Decision::Continue;
            }
        }
        self.metric(host, "requests");
        let Some((index, rule, params)) = found else {
            return Decision::Continue;
        };
        let Some(ep) = rule.endpoint.as_ref() else {
            return Decision::Continue;
        };
        let request_headers = host.headers(MapKind::RequestHeaders);
        let profile = profile_of(ep, &request_headers, &req.path);
        let calls = initial_calls(ep, profile);
        let config = &shared.config;
        let identity = identity_of(config, &request_headers);
        let consumer = identity
            .iter()
            .find(|(k, _)| *k == config.consumer_header)
            .map(|(_, v)| v.clone());
        // Calls whose paths use the caller's identity need one: refuse before any call.
        if let Some(missing) = missing_identity(ep, &calls, &identity) {
            let path = host.path();
            self.metric(host, &format!("ep.{}.requests", ep.name));
            self.metric(host, &format!("ep.{}.no_identity", ep.name));
            return Decision::Respond(identity_problem(
                consumer.is_some(),
                missing,
                &config.consumer_header,
                &path,
            ));
        }
        self.active = Some(Active {
            rule: index,
            params,
            query: req.query.clone(),
            path: host.path(),
            profile,
            started: host.now(),
            request_headers,
            consumer,
            identity,
            calls,
            tokens: FastMap::default(),
            finished: false,
            body: None,
            awaiting_body: false,
        });
        self.metric(host, &format!("ep.{}.requests", ep.name));
        if ep.needs_body && !end_of_stream {
            // Envoy turns a pause at the request headers into StopAllIteration, so a filter
            // that pauses here never sees the body. To forward it, the headers go on (the
            // router opens the route's upstream request) while the body is held here; the
            // calls start at its end, and the local answer resets that upstream request.
            if let Some(a) = self.active.as_mut() {
                a.awaiting_body = true;
            }
            return Decision::Continue;
        }
        // Without a body to forward the calls start now; the router never sees the request.
        self.advance(host)
    }

    fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        let shared = self.shared.clone();
        let Some(active) = self.active.as_mut() else {
            return Decision::Continue;
        };
        // A composite request is answered locally: its body never goes upstream.
        if !active.awaiting_body || active.finished {
            return Decision::Pause;
        }
        let Some(ep) = endpoint(&shared, active.rule) else {
            return Decision::Pause;
        };
        if body_size > ep.max_request_bytes {
            log::info!(
                "[{}] aggregate: request body over {} bytes refused",
                self.context_id,
                ep.max_request_bytes
            );
            let reply = Problem::new(413)
                .detail(format!(
                    "the request body is larger than {} bytes",
                    ep.max_request_bytes
                ))
                .instance(&active.path)
                .into_reply();
            self.metric(host, &format!("ep.{}.refused", ep.name));
            return self.respond(host, ep, reply);
        }
        if !end_of_stream {
            return Decision::Pause;
        }
        active.body = Some(host.body(Body::Request, 0, body_size).unwrap_or_default());
        active.awaiting_body = false;
        self.advance(host)
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        let shared = self.shared.clone();
        let Some(active) = self.active.as_mut() else {
            return Decision::Continue;
        };
        if active.finished {
            return Decision::Continue;
        }
        if active.awaiting_body {
            // The router answered before the end of the request body (no route, a direct
            // response, no healthy upstream): Envoy then stops handing the body to the
            // filters, so the calls could never start. Let that answer through.
            active.finished = true;
            if let Some(ep) = endpoint(&shared, active.rule) {
                log::warn!(
                    "[{}] aggregate: endpoint `{}`: the route answered before the request body \
                     was complete; a composite endpoint that forwards the body needs a route to \
                     a live upstream",
                    self.context_id,
                    ep.name
                );
                self.metric(host, &format!("ep.{}.body_lost", ep.name));
            }
            return Decision::Continue;
        }
        // The route's upstream answered while the calls of a composite request (whose headers
        // went on, to read its body) are out: hold that answer back; the merged reply replaces
        // it.
        Decision::Pause
    }

    fn on_response_body(
        &mut self,
        _host: &mut dyn Host,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Decision {
        match &self.active {
            Some(a) if !a.finished => Decision::Pause,
            _ => Decision::Continue,
        }
    }

    fn on_call_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: CallResponse,
    ) -> Decision {
        let shared = self.shared.clone();
        let now = host.now();
        let Some(active) = self.active.as_mut() else {
            return Decision::Continue;
        };
        if active.finished {
            return Decision::Pause;
        }
        let Some(i) = active.tokens.remove(&token) else {
            return Decision::Pause;
        };
        let Some(ep) = endpoint(&shared, active.rule) else {
            return Decision::Pause;
        };
        let Some(call) = ep.calls.get(i) else {
            return Decision::Pause;
        };
        let Some(CallState::InFlight(flight)) = active.calls.get_mut(i) else {
            // The loser of a hedge: the call is already settled.
            return Decision::Pause;
        };
        let Some(attempt) = flight.attempts.iter_mut().find(|a| a.token == token) else {
            return Decision::Pause;
        };
        attempt.live = false;
        let outcome = classify(
            call,
            &response,
            elapsed(now, attempt.started),
            attempt.timeout,
        );
        let outcome = match outcome {
            Err(f) if flight.attempts.iter().any(|a| a.live) => {
                // A hedged twin is still out: wait for it.
                flight.last_failure = Some(f);
                return Decision::Pause;
            }
            other => other,
        };
        self.finish_call(host, ep, i, outcome, true);
        self.advance(host)
    }

    fn call_body_limit(&self, token: u32) -> Option<usize> {
        let active = self.active.as_ref()?;
        let i = *active.tokens.get(&token)?;
        let call = endpoint(&self.shared, active.rule)?.calls.get(i)?;
        Some(call.max_response_bytes)
    }

    fn on_wake(&mut self, host: &mut dyn Host, reason: u32) -> Decision {
        let shared = self.shared.clone();
        let Some(active) = self.active.as_ref() else {
            return Decision::Continue;
        };
        if active.finished {
            return Decision::Pause;
        }
        let Some(ep) = endpoint(&shared, active.rule) else {
            return Decision::Pause;
        };
        let i = reason.saturating_sub(1) as usize;
        let path = match active.calls.get(i) {
            Some(CallState::InFlight(f)) if !f.hedged => f.path.clone(),
            _ => return Decision::Pause,
        };
        let Some(call) = ep.calls.get(i) else {
            return Decision::Pause;
        };
        if let Ok(attempt) = self.dispatch(host, ep, i, &path) {
            self.call_metric(host, ep, call, "hedges");
            if let Some(active) = self.active.as_mut() {
                active.tokens.insert(attempt.token, i);
                if let Some(CallState::InFlight(f)) = active.calls.get_mut(i) {
                    f.hedged = true;
                    f.attempts.push(attempt);
                }
            }
        }
        Decision::Pause
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        let id = self.context_id;
        self.wakes.borrow_mut().retain(|w| w.context_id != id);
        // A probe still out will never be answered here (the request was reset, or answered
        // before the probe came back): release it so that the next call probes at once.
        let shared = self.shared.clone();
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let Some(ep) = endpoint(&shared, active.rule) else {
            return;
        };
        for (call, state) in ep.calls.iter().zip(&active.calls) {
            if let (Some(b), CallState::InFlight(f)) = (&call.breaker, state) {
                if let Some(probe) = f.probe {
                    log::debug!(
                        "[{}] aggregate: releasing the breaker probe of `{}`",
                        self.context_id,
                        call.cluster
                    );
                    breaker::release(host, &call.cluster, b, probe);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::mem_host::MemHost;
    use tollgate_common::testing::Driver;

    /// A VM (one Envoy worker) with the filter configured, driven like Envoy drives it.
    fn root(config: &str) -> Driver<AggregateRoot> {
        Driver::new(config).unwrap()
    }

    fn ok(body: &str, cc: Option<&str>) -> CallResponse {
        let mut headers = vec![
            (":status".to_string(), "200".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        if let Some(cc) = cc {
            headers.push(("cache-control".into(), cc.into()));
        }
        CallResponse {
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    fn status(s: u16) -> CallResponse {
        CallResponse {
            headers: vec![(":status".to_string(), s.to_string())],
            body: b"{}".to_vec(),
        }
    }

    fn reply(d: Decision) -> (LocalReply, Value) {
        match d {
            Decision::Respond(r) => {
                let v = serde_json::from_slice(&r.body).unwrap();
                (r, v)
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    const DASH: &str = r#"{"routes":[{"name":"dash","match":{"template":"/api/dashboard/{user}"},"errors":true,"calls":[
        {"name":"user","cluster":"users","path":"/users/{user}","required":true,"timeout":"1s"},
        {"name":"orders","cluster":"orders","path":"/orders?user={user}","pointer":"/items","allow":["id","total"]},
        {"name":"company","cluster":"products","path":"/products/{user.company_id}","rename":{"name":"title"}}],
        "profiles":[{"name":"mobile","header":{"name":"x-client","value":"mobile"},"calls":["user"],"allow":["user.name"]}]}]}"#;

    #[test]
    fn passes_traffic_and_counts_it() {
        let mut gw = root(r#"{"routes":[{"match":{"prefix":"/health"},"disabled":true}]}"#);
        let h = gw.request("GET", "/api/products/1", &[]);
        assert_eq!(gw.request_headers(h, true), Decision::Continue);
        let h2 = gw.request("GET", "/health", &[]);
        assert_eq!(gw.request_headers(h2, true), Decision::Continue);
        assert_eq!(gw.metric("tollgate.aggregate.requests"), Some(1));
        assert_eq!(gw.metric("tollgate.aggregate.skipped"), Some(1));
    }

    #[test]
    fn refuses_unknown_fields_naming_them() {
        let mut root = AggregateRoot::new(1);
        let e = root
            .configure(&mut MemHost::new(), br#"{"routes":[{"bogus":1}]}"#)
            .unwrap_err();
        assert_eq!(e.field, "routes[0].bogus");
    }

    #[test]
    fn fans_out_then_calls_dependents_and_merges() {
        let mut gw = root(DASH);
        let f = gw.request(
            "GET",
            "/api/dashboard/7",
            &[("x-request-id", "abc"), ("authorization", "secret")],
        );
        assert_eq!(gw.request_headers(f, true), Decision::Pause);
        // Independent calls start at once; the dependent one waits.
        let calls = gw.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].cluster, "users");
        assert_eq!(calls[0].header(":path"), Some("/users/7"));
        assert_eq!(calls[0].header("x-request-id"), Some("abc"));
        assert_eq!(calls[0].header("authorization"), None);
        assert_eq!(calls[1].header(":path"), Some("/orders?user=7"));
        let (t_user, t_orders) = (calls[0].token, calls[1].token);
        let orders = r#"{"items":[{"id":1,"total":5,"x":1},{"id":2,"total":6}]}"#;
        assert_eq!(
            gw.answer(t_orders, ok(orders, Some("no-cache"))),
            Decision::Pause
        );
        assert_eq!(
            gw.answer(
                t_user,
                ok(
                    r#"{"id":7,"name":"U","company_id":3}"#,
                    Some("private, max-age=30")
                )
            ),
            Decision::Pause
        );
        let calls = gw.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[2].header(":path"), Some("/products/3"));
        let t = calls[2].token;
        let (r, v) = reply(gw.answer(t, ok(r#"{"id":3,"name":"P"}"#, Some("public, max-age=60"))));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-aggregate-complete"), Some("true"));
        assert_eq!(r.header("cache-control"), Some("private, no-cache"));
        assert_eq!(
            v,
            json!({"user":{"id":7,"name":"U","company_id":3},
                   "orders":[{"id":1,"total":5},{"id":2,"total":6}],
                   "company":{"id":3,"title":"P"},
                   "errors":[]})
        );
        assert_eq!(gw.metric("tollgate.aggregate.ep.dash.complete"), Some(1));
        assert_eq!(gw.metric("tollgate.aggregate.ep.dash.latency_ms"), Some(0));
        assert_eq!(
            gw.metric("tollgate.aggregate.ep.dash.call.user.calls"),
            Some(1)
        );
    }

    const MINE: &str = r#"{"identity_headers":["x-tollgate-plan","x-org"],"routes":[{"name":"mine","match":{"exact":"/api/me"},"calls":[
        {"name":"user","cluster":"users","path":"/users/{consumer}","required":true},
        {"name":"org","cluster":"orgs","path":"/orgs/{identity.x-org}","forward_identity":false},
        {"name":"news","cluster":"news","path":"/news"}],
        "profiles":[{"name":"lite","header":{"name":"x-client","value":"lite"},"calls":["user","news"]}]}]}"#;

    #[test]
    fn calls_carry_the_callers_identity_and_paths_can_use_it() {
        let mut gw = root(MINE);
        let f = gw.request(
            "GET",
            "/api/me",
            &[
                ("x-tollgate-consumer", "demo/alice"),
                ("x-tollgate-plan", "pro"),
                ("x-org", "o1"),
                ("x-other", "not identity"),
            ],
        );
        assert_eq!(gw.request_headers(f, true), Decision::Pause);
        let calls = gw.calls();
        assert_eq!(calls.len(), 3);
        let (user, org, news) = (&calls[0], &calls[1], &calls[2]);
        assert_eq!(user.header(":path"), Some("/users/demo%2Falice"));
        assert_eq!(org.header(":path"), Some("/orgs/o1"));
        // By default every call carries the identity headers; `forward_identity: false` none.
        for c in [user, news] {
            assert_eq!(c.header("x-tollgate-consumer"), Some("demo/alice"));
            assert_eq!(c.header("x-tollgate-plan"), Some("pro"));
            assert_eq!(c.header("x-org"), Some("o1"));
            assert_eq!(c.header("x-other"), None);
        }
        assert_eq!(org.header("x-tollgate-consumer"), None);
        assert_eq!(org.header("x-org"), None);
        let t: Vec<u32> = calls.iter().map(|c| c.token).collect();
        gw.answer(t[1], ok("{}", Some("public, max-age=60")));
        gw.answer(t[2], ok("{}", Some("public, max-age=60")));
        let (r, _) = reply(gw.answer(t[0], ok("{}", Some("public, max-age=60"))));
        // Built from the caller's identity: for this caller only.
        assert_eq!(r.header("cache-control"), Some("private, max-age=60"));
    }

    #[test]
    fn a_request_without_the_identity_its_paths_use_is_refused_before_any_call() {
        let mut gw = root(MINE);
        // No consumer at all: 401.
        let h = gw.request("GET", "/api/me", &[("x-org", "o1")]);
        let (r, v) = reply(gw.request_headers(h, true));
        assert_eq!(r.status, 401);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            v["type"],
            "https://tollgate.dev/problems/aggregate/identity-required"
        );
        assert!(gw.host(h).unwrap().calls.is_empty());
        assert_eq!(gw.metric("tollgate.aggregate.ep.mine.no_identity"), Some(1));
        // A consumer without the x-org a path needs: 403.
        let h = gw.request("GET", "/api/me", &[("x-tollgate-consumer", "bob")]);
        let (r, v) = reply(gw.request_headers(h, true));
        assert_eq!(r.status, 403);
        assert!(v["detail"].as_str().unwrap().contains("x-org"), "{v}");
        assert!(gw.host(h).unwrap().calls.is_empty());
        // ... unless the profile leaves that call out.
        let h = gw.request(
            "GET",
            "/api/me",
            &[("x-tollgate-consumer", "bob"), ("x-client", "lite")],
        );
        assert_eq!(gw.request_headers(h, true), Decision::Pause);
        assert_eq!(gw.host(h).unwrap().calls.len(), 2);
        // An empty consumer header is no consumer.
        let h = gw.request("GET", "/api/me", &[("x-tollgate-consumer", "")]);
        let (r, _) = reply(gw.request_headers(h, true));
        assert_eq!(r.status, 401);
        // The value cannot climb out of the templated path.
        let h = gw.request(
            "GET",
            "/api/me",
            &[("x-tollgate-consumer", ".."), ("x-client", "lite")],
        );
        let (r, v) = reply(gw.request_headers(h, true));
        assert_eq!((r.status, v["error"].as_str()), (502, Some("bad_value")));
    }

    #[test]
    fn optional_failures_leave_null_and_errors() {
        let mut gw = root(DASH);
        let f = gw.request("GET", "/api/dashboard/7", &[]);
        gw.request_headers(f, true);
        let calls = gw.calls();
        let (t_user, t_orders) = (calls[0].token, calls[1].token);
        let garbage = CallResponse {
            headers: vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "text/html".into()),
            ],
            body: b"<html>".to_vec(),
        };
        gw.answer(t_orders, garbage);
        // The user has no company_id: the dependent call fails without being made.
        let (r, v) = reply(gw.answer(t_user, ok(r#"{"id":7}"#, None)));
        assert_eq!(gw.calls().len(), 2);
        assert_eq!(r.header("x-aggregate-complete"), Some("false"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(v["orders"], Value::Null);
        assert_eq!(v["company"], Value::Null);
        let errors = v["errors"].as_array().unwrap();
        assert_eq!(errors[0]["call"], "orders");
        assert_eq!(errors[0]["error"], "not_json");
        assert_eq!(errors[1]["error"], "missing_value");
        assert_eq!(gw.metric("tollgate.aggregate.ep.dash.partial"), Some(1));
    }

    #[test]
    fn required_failures_give_502_or_504() {
        for (resp, took, want, kind) in [
            (status(500), 10, 502, "status"),
            (CallResponse::default(), 10, 502, "unreachable"),
            (CallResponse::default(), 1000, 504, "timeout"),
            (status(504), 1000, 504, "timeout"),
        ] {
            let mut gw = root(DASH);
            let f = gw.request("GET", "/api/dashboard/7", &[]);
            gw.request_headers(f, true);
            gw.advance(Duration::from_millis(took));
            let t = gw.calls()[0].token;
            let (r, v) = reply(gw.answer(t, resp));
            assert_eq!(r.status, want, "{kind}");
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            assert_eq!(v["backend"], "users");
            assert_eq!(v["call"], "user");
            assert_eq!(v["error"], kind);
            // The late answer of the other call is ignored.
            let t2 = gw.calls()[1].token;
            assert_eq!(gw.answer(t2, ok("{}", None)), Decision::Pause);
        }
    }

    #[test]
    fn envoy_local_replies_are_not_backend_statuses() {
        let gw = root(DASH);
        let call = &endpoint(&gw.root().unwrap().shared, 0).unwrap().calls[1];
        let local = |status: u16, body: &str| CallResponse {
            headers: vec![
                (":status".into(), status.to_string()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: body.as_bytes().to_vec(),
        };
        let t = Duration::from_secs(2);
        let short = Duration::from_millis(5);
        let cases = [
            (local(503, "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"), FailKind::Unreachable, None),
            (local(503, "no healthy upstream"), FailKind::Unreachable, None),
            (local(504, "upstream request timeout"), FailKind::Timeout, None),
            (local(503, "busy"), FailKind::Status, Some(503)),
            (status(504), FailKind::Status, Some(504)),
        ];
        for (resp, kind, st) in cases {
            let f = classify(call, &resp, short, t).unwrap_err();
            assert_eq!((f.kind, f.status), (kind, st), "{resp:?}");
        }
    }

    #[test]
    fn profiles_choose_calls_and_fields() {
        let mut gw = root(DASH);
        let f = gw.request("GET", "/api/dashboard/7", &[("x-client", "mobile")]);
        gw.request_headers(f, true);
        assert_eq!(gw.calls().len(), 1);
        let t = gw.calls()[0].token;
        let (r, v) = reply(gw.answer(
            t,
            ok(
                r#"{"id":7,"name":"U","company_id":3}"#,
                Some("private, max-age=30"),
            ),
        ));
        assert_eq!(r.header("x-aggregate-profile"), Some("mobile"));
        assert_eq!(r.header("vary"), Some("x-client"));
        assert_eq!(r.header("cache-control"), Some("private, max-age=30"));
        assert_eq!(v, json!({"user":{"name":"U"},"errors":[]}));
    }

    #[test]
    fn circuit_breaker_fails_fast_and_recovers() {
        let cfg = r#"{"circuit_breaker":{"failures":2,"cool_down":"1s"},"routes":[{"name":"b","match":{"prefix":"/b"},"calls":[
            {"name":"u","cluster":"users","path":"/users/1"}]}]}"#;
        let mut gw = root(cfg);
        for _ in 0..2 {
            let f = gw.request("GET", "/b", &[]);
            assert_eq!(gw.request_headers(f, true), Decision::Pause);
            let t = gw.calls().last().unwrap().token;
            reply(gw.answer(t, status(503)));
        }
        assert_eq!(
            gw.metric("tollgate.aggregate.breaker.users.opened"),
            Some(1)
        );
        let made = gw.calls().len();
        let f = gw.request("GET", "/b", &[]);
        let (_, v) = reply(gw.request_headers(f, true));
        assert_eq!(gw.calls().len(), made, "no call while open");
        assert_eq!(v["u"], Value::Null);
        assert_eq!(
            gw.metric("tollgate.aggregate.ep.b.call.u.rejected"),
            Some(1)
        );
        gw.advance(Duration::from_millis(1100));
        let probe = gw.request("GET", "/b", &[]);
        assert_eq!(gw.request_headers(probe, true), Decision::Pause);
        // While the probe is out, others still fail fast.
        let other = gw.request("GET", "/b", &[]);
        reply(gw.request_headers(other, true));
        let t = gw.calls().last().unwrap().token;
        let (r, _) = reply(gw.answer(t, ok("{}", None)));
        assert_eq!(r.header("x-aggregate-complete"), Some("true"));
        assert_eq!(
            gw.metric("tollgate.aggregate.breaker.users.closed"),
            Some(1)
        );
        let f = gw.request("GET", "/b", &[]);
        assert_eq!(gw.request_headers(f, true), Decision::Pause);
    }

    #[test]
    fn client_errors_do_not_open_the_breaker() {
        let cfg = r#"{"circuit_breaker":{"failures":2,"cool_down":"10s"},"routes":[{"name":"b","match":{"prefix":"/b"},"calls":[
            {"name":"u","cluster":"users","path":"/users/1","timeout":"1s"}]}]}"#;
        let mut gw = root(cfg);
        let html = CallResponse {
            headers: vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "text/html".into()),
            ],
            body: b"<html>".to_vec(),
        };
        for resp in [status(404), status(400), html, status(404)] {
            let f = gw.request("GET", "/b", &[]);
            gw.request_headers(f, true);
            let t = gw.calls().last().unwrap().token;
            reply(gw.answer(t, resp));
        }
        assert_eq!(breaker::state(gw.vm(), "users"), breaker::State::Closed);
        for _ in 0..2 {
            let f = gw.request("GET", "/b", &[]);
            gw.request_headers(f, true);
            let t = gw.calls().last().unwrap().token;
            reply(gw.answer(t, status(503)));
        }
        assert_eq!(breaker::state(gw.vm(), "users"), breaker::State::Open);
    }

    #[test]
    fn a_probe_whose_request_goes_away_is_released() {
        let cfg = r#"{"circuit_breaker":{"failures":1,"cool_down":"10s"},"routes":[{"name":"b","match":{"prefix":"/b"},"calls":[
            {"name":"u","cluster":"users","path":"/users/1","timeout":"1s"}]}]}"#;
        let mut gw = root(cfg);
        let f = gw.request("GET", "/b", &[]);
        gw.request_headers(f, true);
        let t = gw.calls()[0].token;
        reply(gw.answer(t, status(500)));
        assert_eq!(breaker::state(gw.vm(), "users"), breaker::State::Open);
        gw.advance(Duration::from_secs(11));
        // The probe's request is reset before the probe answers.
        let probe = gw.request("GET", "/b", &[]);
        assert_eq!(gw.request_headers(probe, true), Decision::Pause);
        let made = gw.calls().len();
        let other = gw.request("GET", "/b", &[]);
        reply(gw.request_headers(other, true));
        assert_eq!(
            gw.calls().len(),
            made,
            "no second probe while the first is out"
        );
        gw.done(probe);
        // The next request probes at once, without another cool-down.
        let next = gw.request("GET", "/b", &[]);
        assert_eq!(gw.request_headers(next, true), Decision::Pause);
        assert_eq!(gw.calls().len(), made + 1);
        let t = gw.calls()[made].token;
        let (r, _) = reply(gw.answer(t, ok("{}", None)));
        assert_eq!(r.header("x-aggregate-complete"), Some("true"));
        assert_eq!(breaker::state(gw.vm(), "users"), breaker::State::Closed);
        assert_eq!(
            gw.metric("tollgate.aggregate.breaker.users.half_opened"),
            Some(2)
        );
    }

    #[test]
    fn hedging_sends_a_twin_and_the_first_success_wins() {
        let cfg = r#"{"routes":[{"name":"h","match":{"prefix":"/h"},"calls":[
            {"name":"u","cluster":"users","path":"/users/1","hedge_after":"50ms","timeout":"1s"}]}]}"#;
        let mut gw = root(cfg);
        assert_eq!(gw.tick_period(), Some(TICK));
        let f = gw.request("GET", "/h", &[]);
        assert_eq!(gw.request_headers(f, true), Decision::Pause);
        gw.tick();
        assert!(gw.woken().is_empty());
        gw.advance(Duration::from_millis(60));
        gw.tick();
        assert_eq!(gw.woken(), vec![(f, 1)]);
        assert_eq!(gw.wake_decision(f, 1), Some(Decision::Pause));
        let calls = gw.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].header(":path"), Some("/users/1"));
        assert!(calls[1].timeout <= Duration::from_millis(1000));
        // The first attempt fails, the twin succeeds.
        let (t1, t2) = (calls[0].token, calls[1].token);
        assert_eq!(gw.answer(t1, status(500)), Decision::Pause);
        let (r, v) = reply(gw.answer(t2, ok(r#"{"id":1}"#, None)));
        assert_eq!(r.header("x-aggregate-complete"), Some("true"));
        assert_eq!(v["u"]["id"], 1);
        assert_eq!(gw.metric("tollgate.aggregate.ep.h.call.u.hedges"), Some(1));
    }

    #[test]
    fn deadline_bounds_calls_and_requests_with_bodies_start_at_headers() {
        let cfg = r#"{"routes":[{"name":"p","match":{"prefix":"/p"},"deadline":"300ms","calls":[
            {"name":"a","cluster":"orders","method":"post","path":"/orders","timeout":"1s"}]}]}"#;
        let mut gw = root(cfg);
        let f = gw.request("POST", "/p", &[("content-type", "application/json")]);
        assert_eq!(gw.request_headers(f, false), Decision::Pause);
        let calls = gw.calls();
        assert_eq!(calls[0].header(":method"), Some("POST"));
        assert_eq!(calls[0].body, None);
        assert_eq!(calls[0].timeout, Duration::from_millis(300));
        assert_eq!(gw.request_body(f, b"{\"x\":1}", true), Decision::Pause);
        let other = gw.request("POST", "/elsewhere", &[]);
        assert_eq!(gw.request_headers(other, false), Decision::Continue);
        assert_eq!(
            gw.request_body(other, b"{\"x\":1}", true),
            Decision::Continue
        );
    }

    #[test]
    fn calls_that_forward_the_body_start_at_its_end() {
        let cfg = r#"{"routes":[{"name":"p","match":{"prefix":"/p"},"max_request_bytes":10,"calls":[
            {"name":"a","cluster":"orders","method":"post","path":"/orders","forward_body":true},
            {"name":"b","cluster":"users","path":"/users/1"}]}]}"#;
        let mut gw = root(cfg);
        let f = gw.request("POST", "/p", &[("content-type", "application/json")]);
        // The headers go on (Envoy would not hand a filter paused here the body).
        assert_eq!(gw.request_headers(f, false), Decision::Continue);
        assert!(gw.calls().is_empty());
        assert_eq!(gw.request_body(f, b"{\"x\"", false), Decision::Pause);
        assert_eq!(gw.request_body(f, b":1}", true), Decision::Pause);
        // An answer of the route's upstream is held back while the calls are out.
        assert_eq!(gw.response_headers(f, &[], false), Decision::Pause);
        // Its body does not reach the filter: in Envoy no chunk of a paused response does, and
        // the module exports no response body hook.
        assert_eq!(gw.response_body(f, b"12345", true), Decision::Continue);
        let calls = gw.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].body.as_deref(), Some(&br#"{"x":1}"#[..]));
        assert_eq!(calls[1].body, None);
        let (t0, t1) = (calls[0].token, calls[1].token);
        gw.answer(t1, ok("{}", None));
        let (r, v) = reply(gw.answer(t0, ok(r#"{"id":9}"#, None)));
        assert_eq!(r.status, 200);
        assert_eq!(v["a"]["id"], 9);
        // Our own reply passes our response hooks.
        assert_eq!(gw.response_headers(f, &[], true), Decision::Continue);
        // Without a body (end of stream at the headers) the calls start at once, bodiless.
        let g = gw.request("POST", "/p", &[]);
        assert_eq!(gw.request_headers(g, true), Decision::Pause);
        let calls = gw.host(g).unwrap().calls.clone();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].body, None);
        // Too large a body: 413 as problem+json, no call.
        let k = gw.request("POST", "/p", &[]);
        assert_eq!(gw.request_headers(k, false), Decision::Continue);
        let (r, v) = reply(gw.request_body(k, &[b'x'; 11], false));
        assert_eq!(r.status, 413);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert!(v["detail"].as_str().unwrap().contains("10 bytes"));
        assert!(gw.host(k).unwrap().calls.is_empty());
        // The route answered before the end of the body (no more body will come): let it go.
        let l = gw.request("POST", "/p", &[]);
        assert_eq!(gw.request_headers(l, false), Decision::Continue);
        assert_eq!(gw.response_headers(l, &[], false), Decision::Continue);
        assert_eq!(gw.response_body(l, b"abc", true), Decision::Continue);
        assert!(gw.host(l).unwrap().calls.is_empty());
        assert_eq!(gw.metric("tollgate.aggregate.ep.p.body_lost"), Some(1));
    }

    #[test]
    fn a_hedge_gets_what_is_left_of_the_call_timeout() {
        let cfg = r#"{"routes":[{"name":"h","match":{"prefix":"/h"},"calls":[
            {"name":"u","cluster":"users","path":"/users/1","hedge_after":"300ms","timeout":"1s"}]}]}"#;
        let mut gw = root(cfg);
        let f = gw.request("GET", "/h", &[]);
        gw.request_headers(f, true);
        gw.advance(Duration::from_millis(300));
        gw.tick();
        assert_eq!(gw.wake_decision(f, 1), Some(Decision::Pause));
        assert_eq!(gw.calls()[1].timeout, Duration::from_millis(700));
    }

    #[test]
    fn hostile_answers_fail_cleanly() {
        let agg = root(DASH);
        let call = &endpoint(&agg.root().unwrap().shared, 0).unwrap().calls[1];
        let t = Duration::from_secs(1);
        let short = Duration::from_millis(5);
        // Nesting deeper than serde_json's recursion limit (128) is refused, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let f = classify(call, &ok(&deep, None), short, t).unwrap_err();
        assert_eq!(f.kind, FailKind::NotJson, "{}", f.detail);
        assert!(f.detail.contains("recursion"), "{}", f.detail);
        // Over the size limit: refused before parsing.
        let big = format!("[{}1]", "1,".repeat(600_000));
        let f = classify(call, &ok(&big, None), short, t).unwrap_err();
        assert_eq!(f.kind, FailKind::TooLarge);
        // The dispatcher is told to copy no more than the limit (plus one byte) into the VM.
        let mut gw = root(DASH);
        let id = gw.request("GET", "/api/dashboard/7", &[]);
        gw.request_headers(id, true);
        let f = gw.filter(id).unwrap();
        assert_eq!(f.call_body_limit(gw.calls()[1].token), Some(1 << 20));
        assert_eq!(f.call_body_limit(9999), None);
        // Just under the recursion limit still parses and shapes.
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let part = classify(call, &ok(&fine, None), short, t).unwrap();
        let _ = shape_answer(call, &part.value);
    }

    #[test]
    fn merge_modes_and_large_answers() {
        let cfg = r#"{"routes":[{"match":{"prefix":"/m"},"errors":true,"calls":[
            {"name":"a","cluster":"c","path":"/a","merge":"root"},
            {"name":"b","cluster":"c","path":"/b","merge":"deep"},
            {"name":"c","cluster":"c","path":"/c","merge":"append","key":"list"},
            {"name":"d","cluster":"c","path":"/d","merge":"append","key":"list","max_response_bytes":10}]}]}"#;
        let mut gw = root(cfg);
        let f = gw.request("GET", "/m", &[]);
        gw.request_headers(f, true);
        let t: Vec<u32> = gw.calls().iter().map(|c| c.token).collect();
        gw.answer(t[3], ok(r#"{"this is":"too large"}"#, None));
        gw.answer(t[2], ok("[1,2]", None));
        gw.answer(t[1], ok(r#"{"n":{"y":2}}"#, None));
        let (_, v) = reply(gw.answer(t[0], ok(r#"{"a":1,"n":{"x":1}}"#, None)));
        assert_eq!(v["a"], 1);
        assert_eq!(v["n"], json!({"x":1,"y":2}));
        assert_eq!(v["list"], json!([1, 2]));
        assert_eq!(v["errors"][0]["error"], "too_large");
    }
}
