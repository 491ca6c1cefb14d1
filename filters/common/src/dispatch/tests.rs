//! The dispatcher on its own, over the in-memory proxy, with a scripted filter whose behaviour
//! is chosen by the request path.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::config::ConfigError;
use crate::testing::{Driver, ROOT_ID};

/// What the scripted filters of one VM share.
#[derive(Default)]
struct World {
    /// Requests waiting to be woken by the root's tick.
    waiting: Vec<u32>,
    /// Root ticks so far.
    ticks: u32,
    /// Bodies of answers to the root's own callouts.
    root_answers: Vec<Vec<u8>>,
    /// gRPC answers the root got.
    root_grpc: Vec<GrpcResponse>,
    /// The root's callout token.
    root_token: Option<u32>,
    /// Which request finished (on_done), in order.
    done: Vec<u32>,
}

struct TestRoot {
    world: Rc<RefCell<World>>,
    config: Value,
}

struct TestFilter {
    id: u32,
    world: Rc<RefCell<World>>,
    path: String,
    token: Option<u32>,
}

fn call<'a>(cluster: &'a str, path: &'a str) -> HttpCall<'a> {
    HttpCall {
        cluster,
        headers: vec![(":method", "GET"), (":path", path), (":authority", cluster)],
        body: None,
        timeout: Duration::from_secs(1),
    }
}

fn grpc(message: &[u8]) -> GrpcCall<'_> {
    GrpcCall {
        cluster: "rls",
        service: "svc.Limits",
        method: "Check",
        metadata: vec![],
        message,
        timeout: Duration::from_secs(1),
    }
}

impl RootFilter for TestRoot {
    type Filter = TestFilter;
    const NAME: &'static str = "test";

    fn new(_context_id: u32) -> Self {
        TestRoot {
            world: Rc::default(),
            config: Value::Null,
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config: Value = crate::config::parse(configuration)?;
        if config.get("bad").is_some() {
            return Err(ConfigError::new("bad", "not allowed"));
        }
        if let Some(ms) = config.get("tick_ms").and_then(Value::as_u64) {
            host.set_tick_period(Duration::from_millis(ms));
        }
        if config.get("fetch").is_some() {
            self.world.borrow_mut().root_token = host.http_call(&call("keys", "/keys")).ok();
        }
        if config.get("grpc").is_some() {
            self.world.borrow_mut().root_token = host.grpc_call(&grpc(b"root")).ok();
        }
        self.config = config;
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        let waiting = {
            let mut w = self.world.borrow_mut();
            w.ticks += 1;
            std::mem::take(&mut w.waiting)
        };
        let reason = self
            .config
            .get("wake_reason")
            .and_then(Value::as_u64)
            .unwrap_or(1) as u32;
        for id in waiting {
            host.wake(id, reason);
        }
    }

    fn on_call_response(&mut self, _host: &mut dyn Host, _token: u32, response: CallResponse) {
        self.world.borrow_mut().root_answers.push(response.body);
    }

    fn on_grpc_response(&mut self, _host: &mut dyn Host, _token: u32, response: GrpcResponse) {
        self.world.borrow_mut().root_grpc.push(response);
    }

    fn create_filter(&self, context_id: u32) -> TestFilter {
        TestFilter {
            id: context_id,
            world: self.world.clone(),
            path: String::new(),
            token: None,
        }
    }
}

impl TestFilter {
    fn start_call(&mut self, host: &mut dyn Host) -> Decision {
        match host.http_call(&call("users", "/u")) {
            Ok(t) => {
                self.token = Some(t);
                Decision::Pause
            }
            Err(_) => Decision::Respond(LocalReply::new(500)),
        }
    }
}

impl HttpFilter for TestFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        self.path = host.path();
        host.set_header(MapKind::RequestHeaders, "x-seen", "1");
        match self.path.as_str() {
            "/call" | "/big" => self.start_call(host),
            "/wait" | "/wait-call" | "/wait-reply" | "/wake-self-on-wake" => {
                self.world.borrow_mut().waiting.push(self.id);
                Decision::Pause
            }
            "/reply" => Decision::Respond(LocalReply::new(418)),
            "/wake-waiting" => {
                // A stream hook that wakes other requests, and then continues.
                let waiting = std::mem::take(&mut self.world.borrow_mut().waiting);
                for id in waiting {
                    host.wake(id, 1);
                }
                Decision::Continue
            }
            "/wake-self" => {
                host.wake(self.id, 7);
                Decision::Pause
            }
            "/wake-gone" => {
                let woke = host.wake(999, 1);
                host.set_header(MapKind::RequestHeaders, "x-woke", &woke.to_string());
                Decision::Continue
            }
            "/grpc" => match host.grpc_call(&grpc(b"hello")) {
                Ok(t) => {
                    self.token = Some(t);
                    Decision::Pause
                }
                Err(_) => Decision::Respond(LocalReply::new(500)),
            },
            "/body" => Decision::Continue,
            _ => Decision::Continue,
        }
    }

    fn on_request_body(&mut self, _host: &mut dyn Host, size: usize, eos: bool) -> Decision {
        if self.path == "/body" && (!eos || size < 4) {
            Decision::Pause
        } else {
            Decision::Continue
        }
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        if self.path == "/reply-twice" || host.header(MapKind::ResponseHeaders, "x-again").is_some()
        {
            return Decision::Respond(LocalReply::new(500));
        }
        if self.path == "/hold-response" {
            return self.start_call(host);
        }
        Decision::Continue
    }

    fn on_call_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: CallResponse,
    ) -> Decision {
        if self.token != Some(token) {
            return Decision::Pause;
        }
        host.set_header(
            MapKind::RequestHeaders,
            "x-answer-bytes",
            &response.body.len().to_string(),
        );
        match response.status() {
            Some(200) => Decision::Continue,
            Some(s) => Decision::Respond(LocalReply::new(s)),
            None => Decision::Respond(LocalReply::new(503)),
        }
    }

    fn on_grpc_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: GrpcResponse,
    ) -> Decision {
        if self.token != Some(token) {
            return Decision::Pause;
        }
        if response.status == 0 {
            let body = String::from_utf8_lossy(&response.body).into_owned();
            host.set_header(MapKind::RequestHeaders, "x-grpc", &body);
            Decision::Continue
        } else {
            Decision::Respond(
                LocalReply::new(503).with_body(response.message.unwrap_or_default().into_bytes()),
            )
        }
    }

    fn call_body_limit(&self, token: u32) -> Option<usize> {
        (self.path == "/big" && self.token == Some(token)).then_some(10)
    }

    fn on_wake(&mut self, host: &mut dyn Host, reason: u32) -> Decision {
        host.set_header(MapKind::RequestHeaders, "x-woken", &reason.to_string());
        match (self.path.as_str(), reason) {
            ("/wait-call", _) => self.start_call(host),
            ("/wait-reply", _) => Decision::Respond(LocalReply::new(429)),
            ("/wake-self-on-wake", 1) => {
                host.wake(self.id, 2);
                Decision::Pause
            }
            ("/wake-self-on-wake", _) => Decision::Continue,
            ("/ping-pong", _) => {
                // Wakes itself forever: the dispatcher must bound it.
                host.wake(self.id, reason + 1);
                Decision::Pause
            }
            _ => Decision::Continue,
        }
    }

    fn on_done(&mut self, _host: &mut dyn Host) {
        self.world.borrow_mut().done.push(self.id);
    }
}

fn ok(body: &str) -> CallResponse {
    CallResponse {
        headers: vec![(":status".into(), "200".into())],
        body: body.as_bytes().to_vec(),
    }
}

fn status(s: u16) -> CallResponse {
    CallResponse {
        headers: vec![(":status".into(), s.to_string())],
        body: Vec::new(),
    }
}

fn driver(config: &str) -> Driver<TestRoot> {
    Driver::new(config).unwrap()
}

fn world(d: &Driver<TestRoot>) -> std::cell::Ref<'_, World> {
    d.root().unwrap().world.borrow()
}

#[test]
fn pause_then_resume_after_a_callout() {
    let mut d = driver("{}");
    let id = d.request("GET", "/call", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    assert_eq!(d.paused(id), Some(Stream::Request));
    let token = d.calls()[0].token;
    assert_eq!(d.host(id).unwrap().calls.len(), 1, "made from the request");
    assert_eq!(d.answer(token, ok("fine")), Decision::Continue);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    assert_eq!(d.paused(id), None);
    // The answer was read while the request was the effective context.
    assert_eq!(d.proxy().switches, vec![id, ROOT_ID]);
    assert_eq!(
        d.header(id, MapKind::RequestHeaders, "x-answer-bytes")
            .as_deref(),
        Some("4")
    );
    assert_eq!(d.dispatcher().pending_callouts(), 0);
    d.done(id);
    assert_eq!(world(&d).done, vec![id]);
    assert!(!d.dispatcher().is_live(id));
}

#[test]
fn a_local_reply_after_a_pause_answers_and_does_not_resume() {
    let mut d = driver("{}");
    let id = d.request("GET", "/call", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    let token = d.calls()[0].token;
    assert_eq!(
        d.answer(token, status(403)),
        Decision::Respond(LocalReply::new(403))
    );
    assert_eq!(d.reply(id).map(|r| r.status), Some(403));
    assert!(d.resumed(id).is_empty());
    assert_eq!(d.paused(id), None);
    // Envoy runs the local reply's response through the filter: it goes on.
    assert_eq!(
        d.response_headers(id, &[(":status", "403")], true),
        Decision::Continue
    );
}

#[test]
fn a_failed_callout_answer_has_no_headers() {
    let mut d = driver("{}");
    let id = d.request("GET", "/call", &[]);
    d.request_headers(id, true);
    let token = d.calls()[0].token;
    assert_eq!(
        d.answer(token, CallResponse::default()),
        Decision::Respond(LocalReply::new(503))
    );
}

#[test]
fn a_local_reply_in_a_hook_pauses_and_only_one_reply_is_sent() {
    let mut d = driver("{}");
    let id = d.request("GET", "/reply", &[]);
    assert_eq!(
        d.request_headers(id, true),
        Decision::Respond(LocalReply::new(418))
    );
    assert_eq!(d.proxy().replies.len(), 1);
    // The filter answers again in the local reply's response hook: ignored, the reply goes on.
    assert_eq!(
        d.response_headers(id, &[(":status", "418"), ("x-again", "1")], true),
        Decision::Respond(LocalReply::new(500))
    );
    assert_eq!(
        d.proxy().replies.len(),
        1,
        "at most one local reply per request"
    );
}

#[test]
fn a_response_paused_for_a_callout_is_resumed() {
    let mut d = driver("{}");
    let id = d.request("GET", "/hold-response", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    assert_eq!(
        d.response_headers(id, &[(":status", "200")], false),
        Decision::Pause
    );
    assert_eq!(d.paused(id), Some(Stream::Response));
    let token = d.calls()[0].token;
    d.answer(token, ok(""));
    assert_eq!(d.resumed(id), vec![Stream::Response]);
}

#[test]
fn continue_without_a_pause_resumes_nothing() {
    let mut d = driver(r#"{"tick_ms": 10}"#);
    let id = d.request("GET", "/wait", &[]);
    d.request_headers(id, true);
    // Woken twice: the second Continue has nothing left to resume.
    d.tick();
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    world_mut(&d).waiting.push(id);
    d.tick();
    assert_eq!(d.woken(), vec![(id, 1), (id, 1)]);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
}

fn world_mut(d: &Driver<TestRoot>) -> std::cell::RefMut<'_, World> {
    d.root().unwrap().world.borrow_mut()
}

#[test]
fn a_root_tick_wakes_a_request_that_calls_out_and_gets_the_answer() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    assert_eq!(d.tick_period(), Some(Duration::from_millis(50)));
    let id = d.request("GET", "/wait-call", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    d.tick();
    assert_eq!(d.woken(), vec![(id, 1)]);
    assert_eq!(d.wake_decision(id, 1), Some(Decision::Pause));
    // The call was made by the woken request (its host), while it was the effective context.
    let calls = d.host(id).unwrap().calls.clone();
    assert_eq!(calls.len(), 1);
    assert!(d.vm().calls.is_empty());
    assert_eq!(
        d.header(id, MapKind::RequestHeaders, "x-woken").as_deref(),
        Some("1")
    );
    // Envoy answers it at the root; the dispatcher hands it to the request.
    assert_eq!(d.answer(calls[0].token, ok("ab")), Decision::Continue);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    assert!(world(&d).root_answers.is_empty(), "not the root's answer");
}

#[test]
fn a_woken_request_can_answer_locally() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    let id = d.request("GET", "/wait-reply", &[]);
    d.request_headers(id, true);
    d.tick();
    assert_eq!(d.reply(id).map(|r| r.status), Some(429));
    assert!(d.resumed(id).is_empty());
    // The reply went to the woken request's context, and the root's context came back.
    assert_eq!(d.proxy().switches, vec![id, ROOT_ID]);
}

#[test]
fn answers_and_wakes_for_a_request_that_ended_are_dropped_unread() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    let id = d.request("GET", "/call", &[]);
    d.request_headers(id, true);
    let token = d.calls()[0].token;
    let waiting = d.request("GET", "/wait", &[]);
    d.request_headers(waiting, true);
    // Both clients go away while paused.
    d.done(id);
    d.done(waiting);
    assert_eq!(world(&d).done, vec![id, waiting]);
    assert_eq!(d.answer(token, ok(&"x".repeat(1000))), Decision::Continue);
    assert_eq!(
        d.proxy().copied_bytes,
        0,
        "the answer of a gone request is not copied"
    );
    d.tick();
    assert!(d.woken().is_empty());
    assert!(d.resumed(id).is_empty() && d.resumed(waiting).is_empty());
    assert!(d.proxy().replies.is_empty());
    assert_eq!(d.dispatcher().pending_callouts(), 0);
}

#[test]
fn wake_of_an_unknown_request_returns_false() {
    let mut d = driver("{}");
    let id = d.request("GET", "/wake-gone", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    assert_eq!(
        d.header(id, MapKind::RequestHeaders, "x-woke").as_deref(),
        Some("false")
    );
    assert_eq!(d.dispatcher().pending_wakes(), 0);
}

#[test]
fn a_self_wake_from_a_hook_is_delivered_after_the_hook_on_a_borrowed_tick() {
    let mut d = driver("{}");
    assert_eq!(d.tick_period(), None);
    let id = d.request("GET", "/wake-self", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    // Not inside the hook: a local reply there would stop this very hook in Envoy.
    assert!(d.woken().is_empty());
    assert_eq!(d.dispatcher().pending_wakes(), 1);
    assert_eq!(d.tick_period(), Some(FAST_TICK));
    d.tick();
    assert_eq!(d.woken(), vec![(id, 7)]);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    // The root never asked for ticks: the borrowed tick is stopped and the root not ticked.
    assert_eq!(d.tick_period(), Some(Duration::ZERO));
    assert_eq!(world(&d).ticks, 0);
}

#[test]
fn a_hook_that_wakes_other_requests_defers_them_and_keeps_its_own_decision() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    let a = d.request("GET", "/wait-reply", &[]);
    let b = d.request("GET", "/wait", &[]);
    d.request_headers(a, true);
    d.request_headers(b, true);
    let c = d.request("GET", "/wake-waiting", &[]);
    assert_eq!(d.request_headers(c, true), Decision::Continue);
    assert!(
        d.proxy().replies.is_empty(),
        "no local reply inside c's hook"
    );
    assert_eq!(d.tick_period(), Some(FAST_TICK));
    d.tick();
    assert_eq!(d.woken(), vec![(a, 1), (b, 1)]);
    assert_eq!(d.reply(a).map(|r| r.status), Some(429));
    assert_eq!(d.resumed(b), vec![Stream::Request]);
    // The root has a period of its own: it is ticked and its period restored.
    assert_eq!(world(&d).ticks, 1);
    assert_eq!(d.tick_period(), Some(Duration::from_millis(50)));
}

#[test]
fn a_woken_request_that_wakes_itself_is_woken_again_in_the_same_entry() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    let id = d.request("GET", "/wake-self-on-wake", &[]);
    d.request_headers(id, true);
    d.tick();
    assert_eq!(d.woken(), vec![(id, 1), (id, 2)]);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
}

#[test]
fn endless_wakes_are_bounded_per_entry() {
    let mut d = driver(r#"{"tick_ms": 50}"#);
    let id = d.request("GET", "/ping-pong", &[]);
    d.request_headers(id, true);
    world_mut(&d).waiting.push(id);
    d.tick();
    assert_eq!(d.woken().len(), MAX_WAKES_PER_ENTRY);
    assert_eq!(d.dispatcher().pending_wakes(), 1, "the rest waits");
    assert_eq!(d.tick_period(), Some(FAST_TICK));
    // The client leaves; the next tick drops the wake and gives the root its period back.
    d.done(id);
    d.tick();
    assert_eq!(d.woken().len(), MAX_WAKES_PER_ENTRY);
    assert_eq!(d.dispatcher().pending_wakes(), 0);
    assert_eq!(d.tick_period(), Some(Duration::from_millis(50)));
}

#[test]
fn root_callouts_are_answered_to_the_root() {
    let mut d = driver(r#"{"fetch": true}"#);
    let token = world(&d).root_token.unwrap();
    assert_eq!(d.vm().calls.len(), 1);
    assert_eq!(d.answer(token, ok("keys")), Decision::Continue);
    assert_eq!(world(&d).root_answers, vec![b"keys".to_vec()]);
    assert!(
        d.proxy().switches.is_empty(),
        "no switch for the root's own answer"
    );
    // An unknown token is dropped.
    assert_eq!(d.answer(424242, ok("?")), Decision::Continue);
    assert_eq!(world(&d).root_answers.len(), 1);
}

#[test]
fn grpc_answers_go_to_their_owner_with_the_status_message() {
    let mut d = driver(r#"{"grpc": true}"#);
    let root_token = world(&d).root_token.unwrap();
    let ok_req = d.request("GET", "/grpc", &[]);
    let failing = d.request("GET", "/grpc", &[]);
    assert_eq!(d.request_headers(ok_req, true), Decision::Pause);
    assert_eq!(d.request_headers(failing, true), Decision::Pause);
    let calls = d.grpc_calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[1].message, b"hello");
    let answer = GrpcResponse {
        status: 0,
        message: None,
        body: b"OK-1".to_vec(),
    };
    assert_eq!(d.answer_grpc(calls[1].token, answer), Decision::Continue);
    assert_eq!(d.resumed(ok_req), vec![Stream::Request]);
    assert_eq!(
        d.header(ok_req, MapKind::RequestHeaders, "x-grpc")
            .as_deref(),
        Some("OK-1")
    );
    let failure = GrpcResponse {
        status: 14,
        message: Some("no healthy upstream".into()),
        body: Vec::new(),
    };
    let decision = d.answer_grpc(calls[2].token, failure);
    assert_eq!(
        decision,
        Decision::Respond(LocalReply::new(503).with_body(b"no healthy upstream".to_vec()))
    );
    // HTTP and gRPC tokens are separate spaces: an HTTP answer with a gRPC token is dropped.
    assert_eq!(d.answer(root_token, ok("")), Decision::Continue);
    let deadline = GrpcResponse {
        status: 4,
        message: None,
        body: Vec::new(),
    };
    d.answer_grpc(root_token, deadline);
    let got = world(&d).root_grpc.clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, 4);
}

#[test]
fn call_body_limit_copies_at_most_limit_plus_one_bytes() {
    let mut d = driver("{}");
    let id = d.request("GET", "/big", &[]);
    d.request_headers(id, true);
    let token = d.calls()[0].token;
    d.answer(token, ok(&"y".repeat(1 << 20)));
    assert_eq!(d.proxy().copied_bytes, 11);
    assert_eq!(
        d.header(id, MapKind::RequestHeaders, "x-answer-bytes")
            .as_deref(),
        Some("11")
    );
    // Without a limit the whole body is read.
    let id = d.request("GET", "/call", &[]);
    d.request_headers(id, true);
    let token = d.calls()[1].token;
    d.answer(token, ok("0123456789abcdef"));
    assert_eq!(d.proxy().copied_bytes, 11 + 16);
}

#[test]
fn a_refused_configuration_is_one_line_naming_the_field() {
    let e = Driver::<TestRoot>::new(r#"{"bad": 1}"#).err().unwrap();
    assert_eq!(
        e,
        "tollgate-test: invalid configuration: field `bad`: not allowed"
    );
    let e = Driver::<TestRoot>::new("[1]").err().unwrap();
    assert!(
        e.starts_with("tollgate-test: invalid configuration: field `(root)`"),
        "{e}"
    );
    let d = driver("{}");
    let lines: Vec<&str> = d.logs().iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        lines,
        vec![
            "tollgate-test 0.0.0-test: VM started",
            "tollgate-test 0.0.0-test: configuration accepted"
        ]
    );
}

#[test]
fn request_body_pauses_until_the_end_and_is_not_resumed_by_the_proxy() {
    let mut d = driver("{}");
    let id = d.request("POST", "/body", &[]);
    assert_eq!(d.request_headers(id, false), Decision::Continue);
    assert_eq!(d.request_body(id, b"ab", false), Decision::Pause);
    assert_eq!(d.paused(id), Some(Stream::Request));
    assert_eq!(d.request_body(id, b"cd", true), Decision::Continue);
    assert_eq!(
        d.paused(id),
        None,
        "a body hook that continues clears the pause"
    );
    assert!(d.resumed(id).is_empty());
}

#[test]
fn a_hook_for_an_unknown_request_fails_closed() {
    let mut d = driver("{}");
    d.dispatcher_mut().proxy_mut().enter(77);
    assert_eq!(
        d.dispatcher_mut().on_request_headers(77, true),
        Action::Pause
    );
    assert_eq!(d.proxy().replies[0].1.status, 503);
    assert_eq!(
        d.dispatcher_mut().on_response_headers(77, true),
        Action::Continue
    );
    assert!(d
        .logs()
        .iter()
        .any(|(l, m)| *l == Level::Error && m.contains("unknown request 77")));
    // A request of an unknown root is refused the same way.
    d.dispatcher_mut().on_context_create(78, 5);
    assert!(!d.dispatcher().is_live(78));
    d.dispatcher_mut().proxy_mut().enter(78);
    assert_eq!(
        d.dispatcher_mut().on_request_headers(78, true),
        Action::Pause
    );
}

#[test]
fn two_roots_in_one_vm_keep_their_requests_and_callouts_apart() {
    let mut d = driver(r#"{"fetch": true}"#);
    let first = world(&d).root_token.unwrap();
    {
        let disp = d.dispatcher_mut();
        disp.on_context_create(50, 0);
        disp.proxy_mut().configuration = br#"{"fetch": true}"#.to_vec();
        assert!(disp.on_configure(50, 15));
    }
    let second = d
        .dispatcher()
        .root(50)
        .unwrap()
        .world
        .borrow()
        .root_token
        .unwrap();
    assert_ne!(first, second);
    d.answer(second, ok("two"));
    assert!(world(&d).root_answers.is_empty());
    assert_eq!(
        d.dispatcher().root(50).unwrap().world.borrow().root_answers,
        vec![b"two".to_vec()]
    );
}

#[test]
fn on_done_forgets_a_request_and_a_root_without_on_delete() {
    // The module does not export `proxy_on_delete`: `on_done` alone must forget both.
    let mut d = driver("{}");
    let id = d.request("GET", "/plain", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    {
        let disp = d.dispatcher_mut();
        disp.on_context_create(50, 0);
        disp.proxy_mut().configuration = b"{}".to_vec();
        assert!(disp.on_configure(50, 2));
        assert!(disp.on_done(id));
        assert!(!disp.is_live(id));
        assert!(disp.root(50).is_some());
        assert!(disp.on_done(50));
        assert!(
            disp.root(50).is_none(),
            "the removed plugin's root is forgotten"
        );
    }
    assert!(d.root().is_some(), "the other root stays");
}

// ---- a module without `proxy_on_done` (rule 4) ----

/// The scripted root in a module that does not export `proxy_on_done`: request headers only
/// (`RESPONSE` false), or with the response headers hook.
struct Lean<const RESPONSE: bool>(TestRoot);

impl<const RESPONSE: bool> RootFilter for Lean<RESPONSE> {
    type Filter = TestFilter;
    const NAME: &'static str = "lean";
    const HOOKS: crate::filter::Hooks = crate::filter::Hooks {
        response_headers: RESPONSE,
        ..crate::filter::Hooks::NONE
    };

    fn new(context_id: u32) -> Self {
        Lean(TestRoot::new(context_id))
    }
    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        self.0.configure(host, configuration)
    }
    fn on_tick(&mut self, host: &mut dyn Host) {
        self.0.on_tick(host)
    }
    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse) {
        self.0.on_call_response(host, token, response)
    }
    fn create_filter(&self, context_id: u32) -> TestFilter {
        self.0.create_filter(context_id)
    }
}

#[test]
fn without_done_a_request_is_forgotten_after_its_last_hook() {
    let mut d = Driver::<Lean<false>>::new("{}").unwrap();
    let id = d.request("GET", "/", &[]);
    assert!(d.dispatcher().is_live(id));
    assert_eq!(d.request_headers(id, true), Decision::Continue);
    assert!(
        !d.dispatcher().is_live(id),
        "request headers were its last hook"
    );
    d.done(id);
    // Context creation and request headers: no `proxy_on_done`.
    assert_eq!(d.take_entries(), 2);

    let mut d = Driver::<Lean<true>>::new("{}").unwrap();
    let id = d.request("GET", "/", &[]);
    d.request_headers(id, true);
    assert!(
        d.dispatcher().is_live(id),
        "its response headers are to come"
    );
    d.response_headers(id, &[(":status", "200")], true);
    assert!(!d.dispatcher().is_live(id));
    // A local reply: the reply's response headers are its last hook.
    let id = d.request("GET", "/reply", &[]);
    d.request_headers(id, true);
    assert!(d.dispatcher().is_live(id));
    d.response_headers(id, &[(":status", "418")], true);
    assert!(!d.dispatcher().is_live(id));
    // A response held for a callout lives until the answer.
    let id = d.request("GET", "/hold-response", &[]);
    d.request_headers(id, true);
    assert_eq!(
        d.response_headers(id, &[(":status", "200")], false),
        Decision::Pause
    );
    assert!(d.dispatcher().is_live(id));
    let token = d.calls().last().unwrap().token;
    d.answer(token, ok(""));
    assert_eq!(d.resumed(id), vec![Stream::Response]);
    assert!(!d.dispatcher().is_live(id));
}

#[test]
fn without_done_a_paused_request_lives_until_its_callout_or_wake() {
    let mut d = Driver::<Lean<false>>::new(r#"{"tick_ms": 10}"#).unwrap();
    let id = d.request("GET", "/call", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    assert!(d.dispatcher().is_live(id));
    let token = d.calls()[0].token;
    assert_eq!(d.answer(token, ok("fine")), Decision::Continue);
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    assert!(!d.dispatcher().is_live(id));
    assert_eq!(d.dispatcher().pending_callouts(), 0);

    let id = d.request("GET", "/wait", &[]);
    assert_eq!(d.request_headers(id, true), Decision::Pause);
    assert!(d.dispatcher().is_live(id));
    d.tick();
    assert_eq!(d.resumed(id), vec![Stream::Request]);
    assert!(!d.dispatcher().is_live(id));
}

#[test]
fn without_done_a_request_that_ended_while_paused_is_forgotten_at_its_answer() {
    let mut d = Driver::<Lean<false>>::new("{}").unwrap();
    let id = d.request("GET", "/call", &[]);
    d.request_headers(id, true);
    let token = d.calls()[0].token;
    // The client went away: Envoy deletes the context and does not tell the module.
    d.done(id);
    assert!(d.dispatcher().is_live(id));
    assert_eq!(d.answer(token, ok("late")), Decision::Continue);
    assert!(!d.dispatcher().is_live(id), "the proxy no longer knows it");
    assert!(d.resumed(id).is_empty());
}

#[test]
fn without_done_requests_that_ended_early_are_swept() {
    let mut d = Driver::<Lean<true>>::new("{}").unwrap();
    let running = d.request("GET", "/", &[]);
    d.request_headers(running, true);
    // Requests whose client went away before the response: their last hook never runs.
    let ended: Vec<u32> = (1..SWEEP_MIN)
        .map(|_| {
            let id = d.request("GET", "/", &[]);
            d.request_headers(id, true);
            d.done(id);
            id
        })
        .collect();
    assert!(ended.iter().all(|&id| d.dispatcher().is_live(id)));
    // The next request finds SWEEP_MIN live requests and sweeps.
    let next = d.request("GET", "/", &[]);
    assert!(ended.iter().all(|&id| !d.dispatcher().is_live(id)));
    assert!(d.dispatcher().is_live(running));
    assert!(d.dispatcher().is_live(next));
    // The new request is the effective context again.
    assert_eq!(d.proxy().switches.last(), Some(&next));
    // Both still work to the end.
    for id in [running, next] {
        if id == next {
            d.request_headers(id, true);
        }
        let answer = d.response_headers(id, &[(":status", "200")], true);
        assert_eq!(answer, Decision::Continue);
        assert!(!d.dispatcher().is_live(id));
    }
}

#[test]
fn the_last_hook_of_a_request_follows_the_exported_hooks() {
    use crate::filter::Hooks;
    let headers_only = Hooks::NONE;
    assert!(is_last(headers_only, Event::RequestHeaders, false));
    let body = Hooks {
        request_body: true,
        ..Hooks::NONE
    };
    assert!(!is_last(body, Event::RequestHeaders, false));
    assert!(
        is_last(body, Event::RequestHeaders, true),
        "no body follows"
    );
    assert!(!is_last(body, Event::RequestBody, false));
    assert!(is_last(body, Event::RequestBody, true));
    let response = Hooks {
        response_headers: true,
        ..body
    };
    assert!(!is_last(response, Event::RequestHeaders, true));
    assert!(!is_last(response, Event::RequestBody, true));
    assert!(is_last(response, Event::ResponseHeaders, false));
    let response_body = Hooks {
        response_body: true,
        ..response
    };
    assert!(!is_last(response_body, Event::ResponseHeaders, false));
    assert!(is_last(response_body, Event::ResponseHeaders, true));
    assert!(is_last(response_body, Event::ResponseBody, true));
    assert!(!is_last(response_body, Event::Wake(1), true));
}
