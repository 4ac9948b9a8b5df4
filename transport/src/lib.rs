//! Baton's transport layer: wire types, the MessagePack/JSON codec, subject names, ID
//! validation and the NATS JetStream setup (streams and consumers).
//!
//! **Architecture invariant:** this crate knows nothing of actors or workflows. It moves
//! opaque [`Payload`]s and small envelopes; what they mean is decided by `baton-actors`.
//!
//! # Layout
//! - [`subject`]: every subject name Baton uses, in one place.
//! - [`codec`]: MessagePack for node-to-node traffic, JSON or MessagePack at the edge.
//! - [`wire`]: the envelopes: start/API requests and replies, activity tasks and reports.
//! - [`ids`]: the character set and length limits of workflow IDs and type names.
//! - [`jetstream`]: stream and consumer definitions, created idempotently.
//! - [`faults`]: injected NATS failures (chaos tests only; off unless a process turns them on).

pub mod codec;
mod error;
pub mod faults;
pub mod ids;
pub mod jetstream;
pub mod subject;
pub mod wire;

pub use codec::{Format, Payload};
pub use error::Error;
