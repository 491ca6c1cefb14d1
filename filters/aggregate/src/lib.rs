//! Tollgate aggregate filter (proxy-wasm): one request fans out to several services in
//! parallel and is answered with one merged JSON reply.
//!
//! Filter logic lives in [`filter`] and [`config`] and talks to the proxy only through
//! [`tollgate_common::Host`]; the module entry point is exported by
//! [`tollgate_common::export_filter!`].

pub mod breaker;
pub mod config;
pub mod filter;
pub mod shape;
pub mod template;

pub use filter::{AggregateFilter, AggregateRoot};

tollgate_common::export_filter!(AggregateRoot, hooks(request_body, response_headers, done));
