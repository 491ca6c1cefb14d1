//! The chain on its own (scripted filters, through the test driver), then the four filters in
//! one module.

use std::cell::RefCell;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tollgate_common::dispatch::Stream;
use tollgate_common::testing::Driver;
use tollgate_common::{
    CallResponse, ConfigError, Decision, GrpcCall, GrpcResponse, Host, HttpCall, HttpFilter,
    LocalReply, MapKind, RootFilter,
};

use super::*;

thread_local! {
    /// What the scripted filters did, in order (`a:request`, `b:response`, ...).
    static TRACE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn note(line: String) {
    TRACE.with(|t| t.borrow_mut().push(line));
}

fn trace() -> Vec<String> {
    TRACE.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

/// A scripted filter's section.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    /// At the request headers: `continue`, `call` (pause until its callout answers), `call-on`
    /// (start a callout and continue), `reply` (answer `status`), `wait` (pause until its root's
    /// tick wakes it), `grpc` (pause until a gRPC answer).
    #[serde(default)]
    request: String,
    /// At the response headers: `continue` or `call`.
    #[serde(default)]
    response: String,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    tick_ms: u64,
    /// The tick runs only while a request waits: a `wait` request starts it (`tick_ms`), the
    /// root's tick stops it.
    #[serde(default)]
    on_demand: bool,
    /// The root fetches something at configuration.
    #[serde(default)]
    fetch: bool,
    /// Refuse the section (as a filter refuses a bad field).
    #[serde(default)]
    bad: bool,
    /// Body limit asked for the callout answers.
    #[serde(default)]
    limit: Option<usize>,
}

struct ScriptRoot<const N: usize> {
    script: std::rc::Rc<Script>,
    waiting: std::rc::Rc<RefCell<Vec<u32>>>,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

struct ScriptFilter {
    name: &'static str,
    id: u32,
    script: std::rc::Rc<Script>,
    waiting: std::rc::Rc<RefCell<Vec<u32>>>,
    tokens: Vec<u32>,
}

fn call<'a>(cluster: &'a str) -> HttpCall<'a> {
    HttpCall {
        cluster,
        headers: vec![(":method", "GET"), (":path", "/"), (":authority", cluster)],
        body: None,
        timeout: Duration::from_secs(1),
    }
}

impl<const N: usize> RootFilter for ScriptRoot<N> {
    type Filter = ScriptFilter;
    const NAME: &'static str = "script";

    fn new(_: u32) -> Self {
        ScriptRoot {
            script: Default::default(),
            waiting: Default::default(),
        }
    }
    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let script: Script = tollgate_common::config::parse(configuration)?;
        if script.bad {
            return Err(ConfigError::new("bad", "refused"));
        }
        if script.tick_ms > 0 && !script.on_demand {
            host.set_tick_period(Duration::from_millis(script.tick_ms));
        }
        if script.fetch {
            host.http_call(&call(NAMES[N]))
                .map_err(|_| ConfigError::new("fetch", "no"))?;
        }
        self.script = std::rc::Rc::new(script);
        Ok(())
    }
    fn on_tick(&mut self, host: &mut dyn Host) {
        note(format!("{}:tick", NAMES[N]));
        for id in std::mem::take(&mut *self.waiting.borrow_mut()) {
            host.wake(id, 1);
        }
        if self.script.on_demand {
            host.set_tick_period(Duration::ZERO);
        }
    }
    fn on_call_response(&mut self, _: &mut dyn Host, _: u32, response: CallResponse) {
        note(format!(
            "{}:root-answer:{}",
            NAMES[N],
            String::from_utf8_lossy(&response.body)
        ));
    }
    fn create_filter(&self, id: u32) -> ScriptFilter {
        ScriptFilter {
            name: NAMES[N],
            id,
            script: self.script.clone(),
            waiting: self.waiting.clone(),
            tokens: Vec::new(),
        }
    }
}

impl ScriptFilter {
    fn start_call(&mut self, host: &mut dyn Host) -> bool {
        match host.http_call(&call(self.name)) {
            Ok(t) => {
                self.tokens.push(t);
                true
            }
            Err(_) => false,
        }
    }
}

impl HttpFilter for ScriptFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _eos: bool) -> Decision {
        note(format!("{}:request", self.name));
        host.add_header(MapKind::RequestHeaders, "x-seen-by", self.name);
        match self.script.request.as_str() {
            "call" => {
                self.start_call(host);
                Decision::Pause
            }
            "call-on" => {
                self.start_call(host);
                Decision::Continue
            }
            "reply" => Decision::Respond(LocalReply::new(self.script.status)),
            "wait" => {
                self.waiting.borrow_mut().push(self.id);
                if self.script.on_demand {
                    host.set_tick_period(Duration::from_millis(self.script.tick_ms));
                }
                Decision::Pause
            }
            "grpc" => {
                let call = GrpcCall {
                    cluster: self.name,
                    service: "s",
                    method: "m",
                    metadata: vec![],
                    message: b"",
                    timeout: Duration::from_secs(1),
                };
                if let Ok(t) = host.grpc_call(&call) {
                    self.tokens.push(t);
                }
                Decision::Pause
            }
            _ => Decision::Continue,
        }
    }
    fn on_request_body(&mut self, _: &mut dyn Host, size: usize, eos: bool) -> Decision {
        note(format!("{}:body:{size}:{eos}", self.name));
        Decision::Continue
    }
    fn on_response_headers(&mut self, host: &mut dyn Host, _eos: bool) -> Decision {
        note(format!("{}:response", self.name));
        if self.script.response == "call" {
            self.start_call(host);
            return Decision::Pause;
        }
        Decision::Continue
    }
    fn on_call_response(&mut self, _: &mut dyn Host, token: u32, r: CallResponse) -> Decision {
        note(format!("{}:answer:{}", self.name, r.body.len()));
        if !self.tokens.contains(&token) {
            return Decision::Respond(LocalReply::new(500));
        }
        match r.status() {
            Some(200) => Decision::Continue,
            _ => Decision::Respond(LocalReply::new(502)),
        }
    }
    fn on_grpc_response(&mut self, _: &mut dyn Host, token: u32, r: GrpcResponse) -> Decision {
        note(format!("{}:grpc:{}", self.name, r.status));
        if !self.tokens.contains(&token) {
            return Decision::Respond(LocalReply::new(500));
        }
        Decision::Continue
    }
    fn call_body_limit(&self, token: u32) -> Option<usize> {
        self.tokens.contains(&token).then_some(self.script.limit?)
    }
    fn on_wake(&mut self, _: &mut dyn Host, reason: u32) -> Decision {
        note(format!("{}:wake:{reason}", self.name));
        Decision::Continue
    }
    fn on_done(&mut self, _: &mut dyn Host) {
        note(format!("{}:done", self.name));
    }
}

const SCRIPTED: &[Kind] = &[
    Kind {
        name: "a",
        make: |id| Box::new(ScriptRoot::<0>::new(id)),
    },
    Kind {
        name: "b",
        make: |id| Box::new(ScriptRoot::<1>::new(id)),
    },
    Kind {
        name: "c",
        make: |id| Box::new(ScriptRoot::<2>::new(id)),
    },
];

struct Scripted(ChainRoot);

impl RootFilter for Scripted {
    type Filter = ChainFilter;
    const NAME: &'static str = "scripted";
    fn new(id: u32) -> Self {
        Scripted(ChainRoot::new(id, SCRIPTED))
    }
    fn configure(&mut self, host: &mut dyn Host, c: &[u8]) -> Result<(), ConfigError> {
        self.0.configure(host, c)
    }
    fn on_tick(&mut self, host: &mut dyn Host) {
        self.0.on_tick(host)
    }
    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, r: CallResponse) {
        self.0.on_call_response(host, token, r)
    }
    fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, r: GrpcResponse) {
        self.0.on_grpc_response(host, token, r)
    }
    fn create_filter(&self, id: u32) -> ChainFilter {
        self.0.create_filter(id)
    }
}

fn scripted(config: serde_json::Value) -> Driver<Scripted> {
    trace();
    Driver::new(&config.to_string()).unwrap()
}

fn ok(body: &str) -> CallResponse {
    CallResponse {
        headers: vec![(":status".into(), "200".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// The token of the callout made to `cluster` (each scripted filter calls its own name).
fn token_of(d: &Driver<Scripted>, cluster: &str) -> u32 {
    d.calls()
        .iter()
        .rev()
        .find(|c| c.cluster == cluster)
        .map(|c| c.token)
        .unwrap()
}

#[test]
fn requests_run_in_order_and_responses_in_reverse() {
    let mut d = scripted(json!({"c": {}, "a": {}, "b": {}}));
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, false), Decision::Continue);
    assert_eq!(d.request_body(id, b"xy", true), Decision::Continue);
    assert_eq!(
        d.response_headers(id, &[(":status", "200")], true),
        Decision::Continue
    );
    d.done(id);
    assert_eq!(
        trace(),
        [
            "a:request",
            "b:request",
            "c:request",
            "a:body:2:true",
            "b:body:2:true",
            "c:body:2:true",
            "c:response",
            "b:response",
            "a:response",
            "a:done",
            "b:done",
            "c:done"
        ]
    );
}

#[test]
fn an_absent_section_is_not_in_the_chain() {
    let mut d = scripted(json!({"b": {}}));
    assert_eq!(d.root().unwrap().0.names(), vec!["b"]);
    let id = d.request("GET", "/", &[]);
    d.request_headers(id, true);
    assert_eq!(trace(), ["b:request"]);
    let mut d = scripted(json!({}));
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    assert!(trace().is_empty());
}

#[test]
fn a_local_reply_stops_the_later_children() {
    let mut d = scripted(json!({"a": {}, "b": {"request": "reply", "status": 403}, "c": {}}));
    let id = d.request("GET", "/", &[]);
    assert_eq!(
        d.request_headers(id, true),
        Decision::Respond(LocalReply::new(403))
    );
    // The local reply's response goes through the children that saw the request.
    assert_eq!(
        d.response_headers(id, &[(":status", "403")], true),
        Decision::Continue
    );
    d.done(id);
    assert_eq!(
        trace(),
        [
            "a:request",
            "b:request",
            "b:response",
            "a:response",
            "a:done",
            "b:done"
        ]
    );
    assert_eq!(d.proxy().replies.len(), 1);
}

#[test]
fn a_paused_child_holds_the_later_ones_until_it_continues() {
    let mut d = scripted(json!({"a": {"request": "call"}, "b": {}, "c": {"request": "call"}}));
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    assert_eq!(trace(), ["a:request"]);
    assert_eq!(d.answer(token_of(&d, "a"), ok("k")), Decision::Pause);
    // a went on: b ran, then c paused in its turn.
    assert_eq!(trace(), ["a:answer:1", "b:request", "c:request"]);
    assert!(d.resumed(id).is_empty());
    assert_eq!(d.answer(token_of(&d, "c"), ok("")), Decision::Continue);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    // The headers b and c set were set before the request went on.
    assert_eq!(
        d.host(id)
            .unwrap()
            .headers(MapKind::RequestHeaders)
            .iter()
            .filter(|(k, _)| k == "x-seen-by")
            .count(),
        3
    );
}

#[test]
fn callouts_of_two_children_land_at_the_right_child() {
    let mut d = scripted(json!({"a": {"request": "call-on"}, "b": {"request": "call"}, "c": {}}));
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    let (ta, tb) = (token_of(&d, "a"), token_of(&d, "b"));
    trace();
    // a's answer goes to a; b still holds the request.
    assert_eq!(d.answer(ta, ok("aaa")), Decision::Pause);
    assert_eq!(trace(), ["a:answer:3"]);
    assert!(d.resumed(id).is_empty());
    assert_eq!(d.answer(tb, ok("b")), Decision::Continue);
    assert_eq!(trace(), ["b:answer:1", "c:request"]);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
}

#[test]
fn a_response_paused_by_a_child_holds_the_earlier_ones() {
    let mut d = scripted(json!({"a": {}, "b": {"response": "call"}, "c": {}}));
    let id = d.request("GET", "/", &[]);
    d.request_headers(id, true);
    trace();
    assert_eq!(
        d.response_headers(id, &[(":status", "200")], false),
        Decision::Pause
    );
    assert_eq!(trace(), ["c:response", "b:response"]);
    assert_eq!(d.answer(token_of(&d, "b"), ok("")), Decision::Continue);
    assert_eq!(trace(), ["b:answer:0", "a:response"]);
    assert_eq!(d.resumed(id), vec![Stream::Response]);
}

#[test]
fn wakes_and_ticks_go_to_their_child_at_its_own_period() {
    let mut d = scripted(json!({"a": {"tick_ms": 20}, "b": {"request": "wait", "tick_ms": 50}}));
    // One period for the VM: the greatest common divisor.
    assert_eq!(d.tick_period(), Some(Duration::from_millis(10)));
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    trace();
    // First tick: both children at once; b wakes its request.
    d.tick();
    assert_eq!(trace(), ["a:tick", "b:tick", "b:wake:1"]);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    let mut ticks = Vec::new();
    for _ in 0..10 {
        d.advance(Duration::from_millis(10));
        d.tick();
        ticks.extend(trace());
    }
    let count = |n: &str| ticks.iter().filter(|t| *t == n).count();
    assert_eq!((count("a:tick"), count("b:tick")), (5, 2));
}

#[test]
fn a_request_starts_its_roots_tick_and_the_root_stops_it() {
    // a ticks every 20 ms; b ticks (every 30 ms) only while one of its requests waits.
    let mut d = scripted(json!({
        "a": {"tick_ms": 20},
        "b": {"request": "wait", "tick_ms": 30, "on_demand": true}
    }));
    assert_eq!(d.tick_period(), Some(Duration::from_millis(20)));
    d.tick();
    assert_eq!(trace(), ["a:tick"]);
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    // The request asked for b's tick: the VM ticks at the common divisor.
    assert_eq!(d.tick_period(), Some(Duration::from_millis(10)));
    trace();
    d.advance(Duration::from_millis(10));
    d.tick();
    assert_eq!(trace(), ["b:tick", "b:wake:1"], "b at once, a not yet");
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    // b's root stopped its tick: a's period again.
    assert_eq!(d.tick_period(), Some(Duration::from_millis(20)));
    d.advance(Duration::from_millis(10));
    d.tick();
    assert_eq!(trace(), ["a:tick"]);
}

#[test]
fn root_callouts_and_grpc_answers_go_to_their_child() {
    let mut d =
        scripted(json!({"a": {"fetch": true}, "b": {"fetch": true}, "c": {"request": "grpc"}}));
    let (ta, tb) = (token_of(&d, "a"), token_of(&d, "b"));
    d.answer(tb, ok("for-b"));
    d.answer(ta, ok("for-a"));
    assert_eq!(trace(), ["b:root-answer:for-b", "a:root-answer:for-a"]);
    let id = d.request("GET", "/", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    let t = d.grpc_calls()[0].token;
    let answer = GrpcResponse {
        status: 0,
        message: None,
        body: b"x".to_vec(),
    };
    assert_eq!(d.answer_grpc(t, answer), Decision::Continue);
    assert_eq!(trace(), ["a:request", "b:request", "c:request", "c:grpc:0"]);
}

#[test]
fn the_body_limit_is_the_owning_childs() {
    let mut d =
        scripted(json!({"a": {"request": "call-on", "limit": 4}, "b": {"request": "call"}}));
    let id = d.request("GET", "/", &[]);
    d.request_headers(id, true);
    d.answer(token_of(&d, "a"), ok("0123456789"));
    assert_eq!(d.proxy().copied_bytes, 5);
    d.answer(token_of(&d, "b"), ok("0123456789"));
    assert_eq!(d.proxy().copied_bytes, 15);
}

#[test]
fn an_error_in_one_section_refuses_the_whole_configuration_naming_it() {
    let refused = |c: serde_json::Value| Driver::<Scripted>::new(&c.to_string()).err().unwrap();
    assert_eq!(
        refused(json!({"a": {}, "b": {"bad": true}})),
        "tollgate-scripted: invalid configuration: field `b.bad`: refused"
    );
    assert!(refused(json!({"b": {"nope": 1}})).contains("field `b.nope`: unknown field `nope`"));
    assert!(
        refused(json!({"b": null})).contains("field `b`: the configuration must be a JSON object")
    );
    assert!(refused(json!({"d": {}}))
        .contains("field `d`: unknown field `d`, expected one of `a`, `b`, `c`"));
    // A section without a name (found by the combined_config fuzz target: the error had no field).
    assert!(refused(json!({"": {}}))
        .contains("field `(root)`: unknown field ``, expected one of `a`, `b`, `c`"));
    let dup = Driver::<Scripted>::new(r#"{"a": {}, "a": {}}"#)
        .err()
        .unwrap();
    assert!(dup.contains("field `a`: duplicate field `a`"), "{dup}");
    assert!(Driver::<Scripted>::new("[]").is_err());
}

// ---- the four filters in one module ----

/// SHA-256 of `key-pro`.
const SHA_PRO: &str = "ac8df72d006a04bace645fec46e76f337f660acd245ba3f2289992acaf31c2af";

/// The four filters: API keys on /api/, a limit per consumer, cached products, one aggregate
/// route. `auth` entries are merged into the auth section.
fn four(auth_extra: serde_json::Value) -> serde_json::Value {
    let mut auth = json!({
        "api_keys": {"keys": [{"sha256": SHA_PRO, "consumer": "acme", "metadata": {"plan": "pro"}}]},
        "routes": [{"match": {"prefix": "/api/"}}]
    });
    if let Some(o) = auth_extra.as_object() {
        for (k, v) in o {
            auth[k] = v.clone();
        }
    }
    json!({
        "auth": auth,
        "ratelimit": {"limits": [{"name": "per-consumer", "quota": 100, "window": "1m", "key": ["consumer"]}],
                      "routes": [{"match": {"prefix": "/api/"}, "limits": ["per-consumer"]}]},
        "cache": {"routes": [{"match": {"prefix": "/api/products/"}}]},
        "aggregate": {"routes": [{"name": "dash", "match": {"template": "/api/dashboard/{u}"}, "calls": [
            {"name": "user", "cluster": "users", "path": "/users/{u}"}]}]}
    })
}

fn tollgate(config: serde_json::Value) -> Driver<TollgateRoot> {
    Driver::new(&config.to_string()).unwrap()
}

const PRODUCT: &[(&str, &str)] = &[
    (":status", "200"),
    ("cache-control", "public, max-age=60"),
    ("content-type", "application/json"),
];

#[test]
fn the_four_filters_run_in_order_in_one_vm() {
    let mut d = tollgate(four(json!({})));
    assert_eq!(
        d.root().unwrap().chain().names(),
        vec!["auth", "ratelimit", "cache", "aggregate"]
    );
    let id = d.request("GET", "/api/products/1", &[("x-api-key", "key-pro")]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    // auth identified the caller; ratelimit keyed its limit on that identity.
    assert_eq!(
        d.header(id, MapKind::RequestHeaders, "x-tollgate-consumer")
            .as_deref(),
        Some("acme")
    );
    assert_eq!(d.metric("tollgate.ratelimit.allowed"), Some(1));
    assert_eq!(d.response_headers(id, PRODUCT, false), Decision::Continue);
    assert_eq!(d.response_body(id, b"{\"id\":1}", true), Decision::Continue);
    let response = d.host(id).unwrap().headers(MapKind::ResponseHeaders);
    let has = |name: &str| response.iter().any(|(k, _)| k == name);
    assert!(has("ratelimit") && has("cache-status"), "{response:?}");
    d.done(id);
    // The second request is a cache hit, after auth and ratelimit.
    let id = d.request("GET", "/api/products/1", &[("x-api-key", "key-pro")]);
    let Decision::Respond(hit) = d.request_headers(id, true) else {
        panic!("a cache hit")
    };
    assert_eq!(hit.body, b"{\"id\":1}");
    assert_eq!(ratelimit_outcomes(&d), 2);
    assert_eq!(d.metric("tollgate.ratelimit.allowed"), Some(2));
    // Auth has no `requests` counter: one increment per request, its outcome.
    assert_eq!(d.metric("tollgate.auth.allowed.api_key"), Some(2));
    // the cache counts one outcome per request (no `requests` counter)
    assert_eq!(d.metric("tollgate.cache.misses"), Some(1));
    assert_eq!(d.metric("tollgate.cache.hits"), Some(1));
    assert_eq!(
        d.metric("tollgate.aggregate.requests"),
        Some(1),
        "a hit stops the chain"
    );
}

#[test]
fn a_local_reply_from_auth_stops_the_later_filters() {
    let mut d = tollgate(four(json!({})));
    let id = d.request("GET", "/api/products/1", &[("x-api-key", "wrong")]);
    let Decision::Respond(r) = d.request_headers(id, true) else {
        panic!("refused")
    };
    assert_eq!(r.status, 401);
    assert_eq!(
        d.response_headers(id, &[(":status", "401")], true),
        Decision::Continue
    );
    d.done(id);
    assert_eq!(d.metric("tollgate.auth.denied.invalid_api_key"), Some(1));
    for metric in ["cache.misses", "cache.hits", "aggregate.requests"] {
        let n = d.metric(&format!("tollgate.{metric}"));
        assert_eq!(n.unwrap_or(0), 0, "{metric}");
    }
    assert_eq!(ratelimit_outcomes(&d), 0);
}

/// The requests the rate limiter handled: the sum of its outcome counters (it has no
/// `requests` counter: one increment per request).
fn ratelimit_outcomes(d: &Driver<TollgateRoot>) -> i64 {
    ["skipped", "allowed", "limited"]
        .iter()
        .map(|m| d.metric(&format!("tollgate.ratelimit.{m}")).unwrap_or(0))
        .sum()
}

/// An ES256 token of `https://idp` with key id `k1` (its signature is never checked: the keys
/// never arrive).
const JWT: &str = "Bearer eyJhbGciOiAiRVMyNTYiLCAia2lkIjogImsxIiwgInR5cCI6ICJKV1QifQ.eyJpc3MiOiAiaHR0cHM6Ly9pZHAiLCAic3ViIjogImFsaWNlIiwgImV4cCI6IDQxMDI0NDQ4MDB9.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[test]
fn a_jwks_fetch_holds_the_later_filters() {
    let remote = json!({
        "providers": [{"name": "idp", "issuer": "https://idp", "algorithms": ["ES256"],
            "remote_jwks": {"cluster": "idp", "path": "/jwks", "cache_duration": "60s", "timeout": "1s"}}]
    });
    let mut config = four(remote);
    config["auth"].as_object_mut().unwrap().remove("api_keys");
    let mut d = tollgate(config);
    let ratelimited = ratelimit_outcomes;
    let id = d.request("GET", "/api/products/1", &[("authorization", JWT)]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    assert_eq!(ratelimited(&d), 0, "held behind auth");
    // The first tick fetches the keys; a failed fetch answers 503, and ratelimit never ran.
    d.tick();
    let fetch = d.calls()[0].clone();
    assert_eq!(fetch.cluster, "idp");
    let decision = d.answer(fetch.token, CallResponse::default());
    assert_eq!(decision, Decision::Continue, "the fetch is the root's");
    assert_eq!(d.reply(id).map(|r| r.status), Some(503));
    assert_eq!(ratelimited(&d), 0);
}

#[test]
fn aggregate_callouts_are_answered_to_aggregate_within_the_chain() {
    let mut d = tollgate(four(json!({})));
    let id = d.request("GET", "/api/dashboard/7", &[("x-api-key", "key-pro")]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    let call = d.calls()[0].clone();
    assert_eq!(
        (call.cluster.as_str(), call.header(":path")),
        ("users", Some("/users/7"))
    );
    let answer = CallResponse {
        headers: vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: br#"{"id":7}"#.to_vec(),
    };
    let Decision::Respond(r) = d.answer(call.token, answer) else {
        panic!("the merged answer")
    };
    assert_eq!(r.status, 200);
    assert_eq!(d.metric("tollgate.aggregate.ep.dash.complete"), Some(1));
}

#[test]
fn request_headers_are_read_from_the_proxy_once_per_request() {
    let mut d = tollgate(four(json!({})));
    let warm = d.request("GET", "/api/products/9", &[("x-api-key", "key-pro")]);
    d.request_headers(warm, true);
    d.done(warm);
    d.count_host_calls(true);
    let id = d.request("GET", "/api/products/1", &[("x-api-key", "key-pro")]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    let calls = d.take_host_calls();
    let n = |c: &str| calls.iter().filter(|x| **x == c).count();
    assert_eq!(n("get_header_map_pairs"), 1, "{calls:?}");
    assert_eq!(n("get_header_map_value"), 0, "{calls:?}");
}

#[test]
fn a_chain_reading_one_known_header_reads_it_alone_and_any_other_reads_the_map() {
    // The rate limiter alone, keyed by route, reads `:path` only: one value, not the map.
    let rl = json!({"ratelimit": {
        "limits": [{"name": "r", "quota": 100, "window": "1m", "key": ["route"]}],
        "routes": [{"match": {"prefix": "/api/"}, "limits": ["r"]}]}});
    let reads = |config: serde_json::Value| {
        let mut d = tollgate(config);
        d.count_host_calls(true);
        let id = d.request("GET", "/api/products/1", &[("x-api-key", "key-pro")]);
        assert_eq!(d.request_headers(id, true), Decision::Continue);
        d.take_host_calls()
            .into_iter()
            .filter(|c| c.starts_with("get_header_map"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        declared_reads(&rl),
        HeaderReads::only([":path"]),
        "the union of one child"
    );
    assert_eq!(reads(rl.clone()), ["get_header_map_value"]);
    // With auth (which reads any header) in the chain: the whole map, once.
    let mut both = four(json!({}));
    both["ratelimit"] = rl["ratelimit"].clone();
    assert_eq!(declared_reads(&both), HeaderReads::Any);
    assert_eq!(reads(both), ["get_header_map_pairs"]);
}

fn declared_reads(config: &serde_json::Value) -> HeaderReads {
    let d = tollgate(config.clone());
    d.root().unwrap().request_header_reads()
}

#[test]
fn a_bad_section_refuses_the_whole_configuration_naming_it() {
    let mut config = four(json!({}));
    config["ratelimit"]["routes"][0]["match"] = json!({"template": "/a/{*x}/b"});
    let e = Driver::<TollgateRoot>::new(&config.to_string())
        .err()
        .unwrap();
    assert!(
        e.starts_with("tollgate: invalid configuration: field `ratelimit.routes[0].match`"),
        "{e}"
    );
    let e = Driver::<TollgateRoot>::new(r#"{"cache": {"no_such_field": 1}}"#)
        .err()
        .unwrap();
    assert!(
        e.contains("field `cache.no_such_field`: unknown field"),
        "{e}"
    );
    // An empty configuration is an empty chain.
    let d = Driver::<TollgateRoot>::new("").unwrap();
    assert!(d.root().unwrap().chain().names().is_empty());
}
