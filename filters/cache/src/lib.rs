//! Tollgate cache filter (proxy-wasm): an RFC 9111 shared cache in Envoy's shared data, with
//! conditional requests, stale serving, bounded memory and purge.
//!
//! Filter logic lives in [`filter`], [`config`], [`key`], [`freshness`], [`parse`] and [`store`] and talks to
//! the proxy only through [`tollgate_common::Host`]; the module entry point is exported by
//! [`tollgate_common::export_filter!`].

pub mod config;
pub mod filter;
pub mod freshness;
pub mod key;
pub mod parse;
pub mod store;

pub use filter::{CacheFilter, CacheRoot};

tollgate_common::export_filter!(CacheRoot, hooks(response_headers, response_body, done));
