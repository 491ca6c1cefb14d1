//! Signature verification arithmetic written for wasm32 (V8 as Envoy runs it): RSA with
//! Montgomery multiplication on 32-bit limbs ([`rsa`]) and ECDSA on P-256 / P-384 with
//! precomputed fixed-base tables ([`ec`]), over the Montgomery fields of [`field`].
//!
//! Verification only: every input is public, so nothing here tries to be constant-time; what
//! it must be is correct (see the differential tests against the `p256`, `p384` and `rsa`
//! crates in `tests`, the Wycheproof vectors in `jose`, and the fuzz crate's `verifiers`
//! target).

pub mod ec;
pub mod field;
pub mod rsa;

#[cfg(test)]
mod tests;
