//! Tollgate cache filter (proxy-wasm).
//!
//! Filter logic lives in [`filter`] and [`config`] and talks to the proxy only through
//! [`tollgate_common::Host`]; the module entry point is exported by
//! [`tollgate_common::export_filter!`].

pub mod config;
pub mod filter;

pub use filter::{CacheFilter, CacheRoot};

tollgate_common::export_filter!(CacheRoot);
