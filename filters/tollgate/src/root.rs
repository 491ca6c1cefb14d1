//! The chain's root: one configuration with a section per filter, one root per configured
//! filter, their ticks (one period for the VM, each child at its own period) and their
//! callouts.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tollgate_common::{CallResponse, ConfigError, GrpcResponse, HeaderReads, Host};

use crate::chain::{ChainFilter, Child};
use crate::part::{ChildHost, Owners, Part, Ticks, MAX_CHILDREN};

/// A filter the chain can hold: its section name and how to make its root.
#[derive(Clone, Copy)]
pub struct Kind {
    /// Section name in the configuration (and the filter's name), such as `auth`.
    pub name: &'static str,
    /// A root for a context.
    pub make: fn(u32) -> Box<dyn Part>,
}

/// One configured filter.
struct Slot {
    name: &'static str,
    part: Box<dyn Part>,
    /// When the child was last ticked.
    last_tick: Option<SystemTime>,
}

/// The sections of the configuration, in the order written, each exactly as written.
struct Sections(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Sections {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Sections;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with a section per filter")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Sections, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Sections(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A chain of filters over a catalog of kinds (in chain order).
pub struct ChainRoot {
    context_id: u32,
    catalog: &'static [Kind],
    slots: Vec<Slot>,
    owners: Owners,
    /// The children's tick periods (shared with the requests: a request may ask for its
    /// filter's root to tick).
    ticks: Rc<Ticks>,
}

impl ChainRoot {
    /// An unconfigured chain over `catalog`.
    pub fn new(context_id: u32, catalog: &'static [Kind]) -> Self {
        ChainRoot {
            context_id,
            catalog,
            slots: Vec::new(),
            owners: Owners::default(),
            ticks: Rc::new(Ticks::default()),
        }
    }

    /// The configured filters, in chain order.
    pub fn names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.name).collect()
    }

    /// The tick period of the VM (the greatest common divisor of the children's, in
    /// milliseconds).
    pub fn tick_period(&self) -> Duration {
        self.ticks.vm_period()
    }

    fn expected(&self) -> String {
        self.catalog
            .iter()
            .map(|k| format!("`{}`", k.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parse the configuration: one optional section per filter, each given to that filter as
    /// written. An error names the section (`ratelimit.routes[0].match`).
    pub fn configure(
        &mut self,
        host: &mut dyn Host,
        configuration: &[u8],
    ) -> Result<(), ConfigError> {
        let Sections(sections) = tollgate_common::config::parse(configuration)?;
        for (i, (name, _)) in sections.iter().enumerate() {
            if !self.catalog.iter().any(|k| k.name == name) {
                // A member with an empty name is named by the document it is in.
                let field = if name.is_empty() { "(root)" } else { name };
                return Err(ConfigError::new(
                    field,
                    format!(
                        "unknown field `{name}`, expected one of {}",
                        self.expected()
                    ),
                ));
            }
            if sections.iter().take(i).any(|(n, _)| n == name) {
                return Err(ConfigError::new(
                    name.clone(),
                    format!("duplicate field `{name}`"),
                ));
            }
        }
        let mut slots = Vec::new();
        let mut owners = Owners::default();
        // Periods asked for while configuring count only once the whole configuration is.
        let ticks = Ticks::default();
        for kind in self.catalog.iter().take(MAX_CHILDREN) {
            let Some((_, raw)) = sections.iter().find(|(n, _)| n == kind.name) else {
                continue;
            };
            let mut part = (kind.make)(self.context_id);
            let mut h = ChildHost {
                host: &mut *host,
                child: slots.len(),
                owners: &mut owners,
                ticks: &ticks,
                apply_ticks: false,
            };
            part.configure(&mut h, raw.get().as_bytes())
                .map_err(|e| e.within(kind.name))?;
            slots.push(Slot {
                name: kind.name,
                part,
                last_tick: None,
            });
        }
        self.slots = slots;
        self.owners = owners;
        self.ticks.copy_from(&ticks);
        self.ticks.apply(host);
        Ok(())
    }

    /// Tick each child whose own period has passed since its last tick (its first tick at once).
    pub fn on_tick(&mut self, host: &mut dyn Host) {
        let now = host.now();
        // A tick may come a little early: half the VM's period counts as on time.
        let slack = self.ticks.vm_period() / 2;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let period = self.ticks.get(i);
            if period.is_zero() {
                continue;
            }
            if let Some(last) = slot.last_tick {
                if now + slack < last + period {
                    continue;
                }
            }
            slot.last_tick = Some(now);
            let mut h = ChildHost {
                host: &mut *host,
                child: i,
                owners: &mut self.owners,
                ticks: &self.ticks,
                apply_ticks: true,
            };
            slot.part.on_tick(&mut h);
        }
    }

    /// Run `f` on child `i`'s root with a host that records its callouts and tick period.
    fn in_child(
        &mut self,
        host: &mut dyn Host,
        i: usize,
        f: impl FnOnce(&mut dyn Part, &mut dyn Host),
    ) {
        if let Some(slot) = self.slots.get_mut(i) {
            let mut h = ChildHost {
                host: &mut *host,
                child: i,
                owners: &mut self.owners,
                ticks: &self.ticks,
                apply_ticks: true,
            };
            f(slot.part.as_mut(), &mut h);
        }
    }

    /// An HTTP callout of a child's root answered.
    pub fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse) {
        let Some(i) = self.owners.http.remove(&token) else {
            log::debug!("[{}] callout {token} of no filter", self.context_id);
            return;
        };
        self.in_child(host, i, |part, h| part.on_call_response(h, token, response));
    }

    /// A gRPC callout of a child's root answered.
    pub fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, response: GrpcResponse) {
        let Some(i) = self.owners.grpc.remove(&token) else {
            log::debug!("[{}] gRPC callout {token} of no filter", self.context_id);
            return;
        };
        self.in_child(host, i, |part, h| part.on_grpc_response(h, token, response));
    }

    /// The request headers the configured filters read: the union of theirs (the whole map
    /// when one of them reads any).
    pub fn request_header_reads(&self) -> HeaderReads {
        self.slots.iter().fold(HeaderReads::NONE, |all, s| {
            all.and(s.part.request_header_reads())
        })
    }

    /// The chain for a new request: each configured filter's own filter.
    pub fn create_filter(&self, context_id: u32) -> ChainFilter {
        ChainFilter::new(
            self.slots
                .iter()
                .map(|s| Child {
                    filter: s.part.create_filter(context_id),
                    saw_request: false,
                })
                .collect(),
            self.ticks.clone(),
        )
    }
}
