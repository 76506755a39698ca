//! Homing's store server: keeps every account's sealed objects and snapshots, which
//! it can never read, with quotas, resumable uploads and integrity checks.
//!
//! # Layout
//!
//! - [`backend`]: where object bytes live: append-only segments behind the
//!   [`Backend`](backend::Backend) trait (a local directory today), with a
//!   fault-injecting wrapper and a conformance suite every backend passes;
//! - [`objects`]: the per-account object store over a backend: uploads in pieces
//!   that survive restarts, the redb index, quotas, reads that verify, `check`;
//! - [`ca`]: the store's private CA: server certificate, client certificates per
//!   account (issued, or signed from a laptop's request), revocation list.
//!
//! - [`server`]: TLS 1.3 with client certificates from the CA, one protocol
//!   session per connection (the codec is `homing_transfer::proto`), revocation
//!   that takes effect while the server runs.
//!
//! Not built yet (the rest of the store-server issue): retention and garbage
//! collection.
//!
//! This crate links `homing-crypto` without its `keys` feature: it names objects by
//! [`ObjectId`](homing_crypto::ObjectId) and never holds a key.

pub mod backend;
pub mod ca;
mod error;
pub mod objects;
pub mod retention;
pub mod server;

pub use error::StoreError;
