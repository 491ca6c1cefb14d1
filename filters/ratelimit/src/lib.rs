//! Tollgate ratelimit filter (proxy-wasm): exact limits across all Envoy workers, kept in
//! proxy-wasm shared data.
//!
//! - [`algo`]: GCRA and fixed windows, pure functions of a state, parameters and the time.
//! - [`table`]: the counter store, a fixed table of slots per limit in shared data, updated
//!   with compare-and-swap (bounded memory, exact across workers).
//! - [`client`]: client keys (consumer, plan, API key, client IP, route, header, query).
//! - [`config`]: configuration, parsed then compiled.
//! - [`filter`]: request handling, answers and headers.
//!
//! Filter logic talks to the proxy only through [`tollgate_common::Host`]; the module entry
//! point is exported by [`tollgate_common::export_filter!`].

pub mod algo;
pub mod client;
pub mod config;
pub mod filter;
pub mod lease;
pub mod rls;
pub mod table;

pub use filter::{RateLimitFilter, RateLimitRoot};

tollgate_common::export_filter!(RateLimitRoot, hooks(response_headers));
