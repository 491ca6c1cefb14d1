//! Tollgate aggregate filter (proxy-wasm).
//!
//! Filter logic lives in [`filter`] and [`config`] and talks to the proxy only through
//! [`tollgate_common::Host`]; the module entry point is exported by
//! [`tollgate_common::export_filter!`].

pub mod config;
pub mod filter;

pub use filter::{AggregateFilter, AggregateRoot};

tollgate_common::export_filter!(AggregateRoot);
