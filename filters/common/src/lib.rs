//! Shared foundation of the Tollgate filters.
//!
//! Filter logic never calls proxy-wasm directly. It is written against the [`Host`] trait and
//! the [`HttpFilter`] / [`RootFilter`] traits of [`filter`]. The [`dispatch::Dispatcher`] drives
//! roots and requests over a small [`dispatch::Proxy`] trait; the adapter in [`adapter`] (with
//! the hostcalls of `abi`) implements it for proxy-wasm and exports the ABI, and is the only
//! code that makes hostcalls. [`mem_host::MemHost`] implements [`Host`] in memory, and
//! [`testing::Driver`] runs the same dispatcher over an in-memory proxy, so that filter logic
//! is unit tested on the build machine the way Envoy runs it.
//!
//! Also here: configuration parsing with field paths ([`config`]), the route matcher every filter
//! uses for per-route rules ([`route`]), RFC 9457 problem replies ([`problem`]), request helpers
//! ([`request`]), named metrics ([`metrics`]), a cheap hasher for internal maps ([`fast_hash`]) and log lines limited to one per interval
//! ([`log_limit`]), and failed-credential throttling per client in shared data ([`throttle`]).

mod abi;
pub mod adapter;
pub mod config;
pub mod decimal;
pub mod dispatch;
pub mod fast_hash;
pub mod filter;
pub mod header_cache;
pub mod host;
pub mod http_date;
pub mod log_limit;
pub mod mem_host;
pub mod metrics;
pub mod problem;
pub mod request;
pub mod route;
pub mod testing;
pub mod throttle;

/// The proxy-wasm map format (header maps, local-reply headers), public so that the fuzz
/// targets can feed it arbitrary bytes.
pub use abi::{deserialize_map, serialize_map};
pub use config::ConfigError;
pub use filter::{CallResponse, Decision, GrpcResponse, HeaderReads, HttpFilter, RootFilter};
pub use host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};
pub use problem::{LocalReply, Problem};
pub use route::{RouteMatch, RouteParams, Rules};
