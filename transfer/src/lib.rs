//! Homing's transfer layer: chunking, the sealed object format, the sealing
//! pipeline, the wire protocol codec ([`proto`]), the metered stream and the
//! client side of the protocol over TLS.
//!
//! - [`Chunker`] cuts a stream with FastCDC (2020) under a key-seeded gear table
//!   and the pinned [`ChunkerParams::V1`];
//! - [`Sealer`] turns a plaintext into a [`SealedObject`]: zstd when it helps, then
//!   [`homing_crypto`]'s sealing; [`open_object`] reverses it and verifies the id;
//! - [`seal_stream`] runs both over a reader on several threads, in bounded memory;
//! - [`proto`] encodes and decodes the frames of the wire protocol;
//! - `stream` (feature `stream`, default) meters, counts and rate-limits every byte
//!   of a client's connection;
//! - `client` (feature `client`) connects to the store over TLS through the metered
//!   stream and runs queries, resumable uploads, commits and fetches, pipelined.
//!
//! Everything but [`proto`] needs the `sealing` feature (on by default), which
//! brings the owner's keys; the store server builds without it.
//!
//! # Example
//!
//! ```
//! use homing_crypto::{MasterKey, ObjectKind};
//! use homing_transfer::{PipelineOptions, open_object, seal_stream};
//!
//! let keys = MasterKey::generate()?.key_ring();
//! let file = vec![7_u8; 300_000];
//! let mut objects = Vec::new();
//! let summary = seal_stream::<_, homing_transfer::Error, _>(
//!     &file[..],
//!     &keys,
//!     PipelineOptions::default(),
//!     |chunk| Ok(objects.extend(chunk.object)),
//! )?;
//! assert_eq!(summary.bytes_read, 300_000);
//! let mut restored = Vec::new();
//! for object in &objects {
//!     restored.extend(open_object(&keys, ObjectKind::Chunk, &object.id, &object.bytes)?);
//! }
//! assert_eq!(restored, file);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "client")]
pub mod client;
pub mod proto;
#[cfg(feature = "stream")]
pub mod stream;

#[cfg(feature = "sealing")]
mod chunker;
#[cfg(feature = "sealing")]
mod error;
#[cfg(feature = "sealing")]
mod object;
#[cfg(feature = "sealing")]
mod pipeline;
#[cfg(feature = "sealing")]
mod segments;

#[cfg(feature = "sealing")]
pub use chunker::{ChunkSpan, Chunker, ChunkerParams};
#[cfg(feature = "sealing")]
pub use error::Error;
#[cfg(feature = "sealing")]
pub use object::{DEFAULT_ZSTD_LEVEL, MAX_OBJECT_PLAINTEXT, SealedObject, Sealer, open_object};
#[cfg(feature = "sealing")]
pub use pipeline::{PipelineOptions, SealedChunk, StreamSummary, seal_new_chunks, seal_stream};
