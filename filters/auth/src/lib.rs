//! Tollgate authentication filter (proxy-wasm): JWT (inline or remote JWKS, OIDC discovery),
//! API keys stored as SHA-256 digests, OAuth 2.0 token introspection, and per-route scope,
//! claim and consumer authorization.
//!
//! Filter logic lives in [`filter`] and talks to the proxy only through
//! [`tollgate_common::Host`]; [`jose`] parses and verifies tokens, [`claims`] checks claims,
//! [`keyset`] keeps remote key sets and the verified-token cache, [`verdict`] holds the JWT
//! path's decisions as pure functions, [`config`] compiles the configuration. The module entry point is exported by [`tollgate_common::export_filter!`].

pub mod claims;
pub mod config;
pub mod crypto;
pub mod filter;
pub mod identity;
pub mod jose;
pub mod keyset;
pub mod verdict;

pub use filter::{AuthFilter, AuthRoot};

tollgate_common::export_filter!(AuthRoot, hooks());

#[cfg(test)]
mod tests;
