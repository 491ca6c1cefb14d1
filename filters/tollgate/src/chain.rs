//! One request through the children, as Envoy would run separate filters:
//!
//! - Request hooks run the children in order; a child that pauses holds the later ones (they
//!   have not seen the event yet) until it continues, then the chain goes on from the next child
//!   with the same event; only when every child has continued does the request go on.
//! - A local reply from one child stops the chain: the later children never see the request.
//! - Response hooks run, in reverse order, for the children that saw the request; a pause holds
//!   the earlier children the same way.
//! - Callout answers and wakes go to the child that owns them (callout tokens are recorded per
//!   child, wake reasons carry the child's index); a child's `Continue` goes on with the chain only
//!   when that child was the one holding it.
//! - `on_done` runs for the children that saw the request.

use tollgate_common::{CallResponse, Decision, GrpcResponse, Host, HttpFilter};

use std::rc::Rc;

use crate::part::{unpack, ChildHost, Owners, Ticks};

/// One child of a request.
pub struct Child {
    /// The child's filter.
    pub filter: Box<dyn HttpFilter>,
    /// Its request hook ran (Envoy created its context).
    pub saw_request: bool,
}

/// An event of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Headers { end_of_stream: bool },
    Body { size: usize, end_of_stream: bool },
}

/// The children of one request.
pub struct ChainFilter {
    children: Vec<Child>,
    owners: Owners,
    /// The children's tick periods: a child's request may ask for its root to tick.
    ticks: Rc<Ticks>,
    /// The child holding the request stream, and the event it holds.
    request_held: Option<(usize, Event)>,
    /// The child holding the response stream, and the event it holds.
    response_held: Option<(usize, Event)>,
}

impl ChainFilter {
    /// A request through these children (in request order).
    pub fn new(children: Vec<Child>, ticks: Rc<Ticks>) -> Self {
        ChainFilter {
            children,
            owners: Owners::default(),
            ticks,
            request_held: None,
            response_held: None,
        }
    }

    /// The child holding the request stream, if any (for tests and logs).
    pub fn request_held_by(&self) -> Option<usize> {
        self.request_held.map(|(i, _)| i)
    }

    /// Run `f` on child `i` with its host.
    fn call(
        &mut self,
        host: &mut dyn Host,
        i: usize,
        f: &mut dyn FnMut(&mut dyn HttpFilter, &mut dyn Host) -> Decision,
    ) -> Option<Decision> {
        let child = self.children.get_mut(i)?;
        let mut h = ChildHost {
            host,
            child: i,
            owners: &mut self.owners,
            ticks: &self.ticks,
            apply_ticks: true,
        };
        Some(f(child.filter.as_mut(), &mut h))
    }

    fn run_event(
        &mut self,
        host: &mut dyn Host,
        i: usize,
        request: bool,
        event: Event,
    ) -> Option<Decision> {
        self.call(host, i, &mut |f, h| match (request, event) {
            (true, Event::Headers { end_of_stream }) => f.on_request_headers(h, end_of_stream),
            (
                true,
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => f.on_request_body(h, size, end_of_stream),
            (false, Event::Headers { end_of_stream }) => f.on_response_headers(h, end_of_stream),
            (
                false,
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => f.on_response_body(h, size, end_of_stream),
        })
    }

    /// Run the request event from child `from` on.
    fn run_request(&mut self, host: &mut dyn Host, from: usize, event: Event) -> Decision {
        self.request_held = None;
        for i in from..self.children.len() {
            if let Event::Headers { .. } = event {
                if let Some(c) = self.children.get_mut(i) {
                    c.saw_request = true;
                }
            } else if !self.children.get(i).is_some_and(|c| c.saw_request) {
                continue;
            }
            match self.run_event(host, i, true, event) {
                None | Some(Decision::Continue) => {}
                Some(Decision::Pause) => {
                    self.request_held = Some((i, event));
                    return Decision::Pause;
                }
                Some(Decision::Respond(reply)) => return self.respond(reply),
            }
        }
        Decision::Continue
    }

    /// Run the response event, in reverse order, for the children before `below` that saw the
    /// request.
    fn run_response(&mut self, host: &mut dyn Host, below: usize, event: Event) -> Decision {
        self.response_held = None;
        for i in (0..below.min(self.children.len())).rev() {
            if !self.children.get(i).is_some_and(|c| c.saw_request) {
                continue;
            }
            match self.run_event(host, i, false, event) {
                None | Some(Decision::Continue) => {}
                Some(Decision::Pause) => {
                    self.response_held = Some((i, event));
                    return Decision::Pause;
                }
                Some(Decision::Respond(reply)) => return self.respond(reply),
            }
        }
        Decision::Continue
    }

    /// A child answered locally: the chain stops (the dispatcher sends the reply).
    fn respond(&mut self, reply: tollgate_common::LocalReply) -> Decision {
        self.request_held = None;
        self.response_held = None;
        Decision::Respond(reply)
    }

    /// Child `i` decided `decision` on a callout answer or a wake.
    /// A callout answered: hand it to the child `owner` that made it (none: not this request's,
    /// keep waiting), then go on from that child's decision.
    fn answered(
        &mut self,
        host: &mut dyn Host,
        owner: Option<usize>,
        f: &mut dyn FnMut(&mut dyn HttpFilter, &mut dyn Host) -> Decision,
    ) -> Decision {
        let Some(i) = owner else {
            return Decision::Pause;
        };
        match self.call(host, i, f) {
            Some(d) => self.after_async(host, i, d),
            None => Decision::Pause,
        }
    }

    fn after_async(&mut self, host: &mut dyn Host, i: usize, decision: Decision) -> Decision {
        match decision {
            Decision::Respond(reply) => self.respond(reply),
            Decision::Pause => Decision::Pause,
            Decision::Continue => {
                if let Some((held, event)) = self.request_held {
                    if held == i {
                        return self.run_request(host, i + 1, event);
                    }
                }
                if let Some((held, event)) = self.response_held {
                    if held == i {
                        return self.run_response(host, i, event);
                    }
                }
                if self.request_held.is_some() || self.response_held.is_some() {
                    // Another child still holds the stream.
                    Decision::Pause
                } else {
                    Decision::Continue
                }
            }
        }
    }
}

impl HttpFilter for ChainFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Decision {
        self.run_request(host, 0, Event::Headers { end_of_stream })
    }

    fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        self.run_request(
            host,
            0,
            Event::Body {
                size: body_size,
                end_of_stream,
            },
        )
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Decision {
        let n = self.children.len();
        self.run_response(host, n, Event::Headers { end_of_stream })
    }

    fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        let n = self.children.len();
        self.run_response(
            host,
            n,
            Event::Body {
                size: body_size,
                end_of_stream,
            },
        )
    }

    fn on_call_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: CallResponse,
    ) -> Decision {
        let owner = self.owners.http.remove(&token);
        let mut response = Some(response);
        self.answered(host, owner, &mut |f, h| {
            f.on_call_response(h, token, response.take().unwrap_or_default())
        })
    }

    fn on_grpc_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: GrpcResponse,
    ) -> Decision {
        let owner = self.owners.grpc.remove(&token);
        let mut response = Some(response);
        self.answered(host, owner, &mut |f, h| {
            f.on_grpc_response(h, token, response.take().unwrap_or_default())
        })
    }

    fn call_body_limit(&self, token: u32) -> Option<usize> {
        let i = self.owners.http.get(&token)?;
        self.children.get(*i)?.filter.call_body_limit(token)
    }

    fn on_wake(&mut self, host: &mut dyn Host, reason: u32) -> Decision {
        let (i, reason) = unpack(reason);
        let d = self.call(host, i, &mut |f, h| f.on_wake(h, reason));
        match d {
            Some(d) => self.after_async(host, i, d),
            None => Decision::Pause,
        }
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        for i in 0..self.children.len() {
            if self.children.get(i).is_some_and(|c| c.saw_request) {
                self.call(host, i, &mut |f, h| {
                    f.on_done(h);
                    Decision::Continue
                });
            }
        }
    }
}
