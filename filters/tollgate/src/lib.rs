//! `tollgate`: the four Tollgate filters in one proxy-wasm module — auth → ratelimit → cache →
//! aggregate in one VM, configured by one plugin configuration with an optional section per
//! filter:
//!
//! ```json
//! {"auth": {...}, "ratelimit": {...}, "cache": {...}, "aggregate": {...}}
//! ```
//!
//! Each section is exactly the configuration of the single filter (docs/filters/*.md); an absent
//! section leaves that filter out of the chain. A refused section refuses the whole
//! configuration, naming the section (`ratelimit.routes[0].match`).
//!
//! - [`root`]: the configuration, the filters' roots, their ticks and callouts.
//! - [`chain`]: one request through the filters, as Envoy would run separate filters.
//! - [`part`]: a filter behind trait objects and the host each filter's code talks to.
//!
//! The request headers are read from Envoy once per request and shared by the filters (the
//! dispatcher's per-request header cache); metric names (`tollgate.<filter>.*`) and log lines
//! (`tollgate-<filter>: ...`) are those of the single filters.

pub mod chain;
pub mod part;
pub mod root;

use tollgate_common::{CallResponse, ConfigError, GrpcResponse, HeaderReads, Host, RootFilter};

pub use chain::ChainFilter;
pub use root::{ChainRoot, Kind};

/// The filters of the combined module, in chain order.
pub const CATALOG: &[Kind] = &[
    Kind {
        name: "auth",
        make: |id| Box::new(<tollgate_auth::AuthRoot as RootFilter>::new(id)),
    },
    Kind {
        name: "ratelimit",
        make: |id| Box::new(<tollgate_ratelimit::RateLimitRoot as RootFilter>::new(id)),
    },
    Kind {
        name: "cache",
        make: |id| Box::new(<tollgate_cache::CacheRoot as RootFilter>::new(id)),
    },
    Kind {
        name: "aggregate",
        make: |id| Box::new(<tollgate_aggregate::AggregateRoot as RootFilter>::new(id)),
    },
];

/// The combined module's root.
pub struct TollgateRoot(ChainRoot);

impl TollgateRoot {
    /// The chain (configured filters, tick period).
    pub fn chain(&self) -> &ChainRoot {
        &self.0
    }
}

impl RootFilter for TollgateRoot {
    type Filter = ChainFilter;
    const NAME: &'static str = "tollgate";
    // What its children use (all of them: the cache the response body, the aggregator the
    // request body).
    const HOOKS: tollgate_common::filter::Hooks = <tollgate_auth::AuthRoot as RootFilter>::HOOKS
        .union(<tollgate_ratelimit::RateLimitRoot as RootFilter>::HOOKS)
        .union(<tollgate_cache::CacheRoot as RootFilter>::HOOKS)
        .union(<tollgate_aggregate::AggregateRoot as RootFilter>::HOOKS);

    fn new(context_id: u32) -> Self {
        TollgateRoot(ChainRoot::new(context_id, CATALOG))
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
    fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, response: GrpcResponse) {
        self.0.on_grpc_response(host, token, response)
    }
    fn create_filter(&self, context_id: u32) -> ChainFilter {
        self.0.create_filter(context_id)
    }
    fn request_header_reads(&self) -> HeaderReads {
        self.0.request_header_reads()
    }
    /// `tollgate: ...` (the filters' own lines keep their names: `tollgate-auth: ...`).
    fn log_name() -> String {
        "tollgate".to_string()
    }
}

tollgate_common::export_filter!(TollgateRoot);

#[cfg(test)]
mod tests;
