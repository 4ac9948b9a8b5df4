use thiserror::Error;

/// Errors of the transport layer.
#[derive(Debug, Error)]
pub enum Error {
    /// A message could not be encoded.
    #[error("encode error: {0}")]
    Encode(String),
    /// A message could not be decoded (malformed bytes, wrong shape).
    #[error("decode error: {0}")]
    Decode(String),
    /// A payload is larger than the limit that applies to it.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the payload in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A NATS or JetStream call failed.
    #[error("nats: {0}")]
    Nats(String),
}

impl Error {
    pub(crate) fn nats(e: impl std::fmt::Display) -> Self {
        Error::Nats(e.to_string())
    }
}
