//! Encoding. Nodes speak MessagePack (rmp-serde, structs as maps so that any payload can be
//! shown as JSON); the edge accepts JSON (the default) or MessagePack, chosen by the
//! `Content-Type` header, and replies in the format it was asked in.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::Error;

/// Header naming the body's format at the edge.
pub const CONTENT_TYPE: &str = "Content-Type";
/// `Content-Type` value for JSON bodies (the default).
pub const JSON: &str = "application/json";
/// `Content-Type` value for MessagePack bodies.
pub const MSGPACK: &str = "application/msgpack";

/// Largest start input or API request body accepted at the edge, in bytes.
pub const MAX_EDGE_BODY: usize = 1024 * 1024;

/// A body format at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `application/msgpack`.
    Msgpack,
}

impl Format {
    /// The format named by a `Content-Type` header value (absent means JSON).
    pub fn from_content_type(value: Option<&str>) -> Result<Format, Error> {
        match value.map(|v| v.split(';').next().unwrap_or("").trim()) {
            None | Some("") | Some(JSON) => Ok(Format::Json),
            Some(MSGPACK) | Some("application/x-msgpack") => Ok(Format::Msgpack),
            Some(other) => Err(Error::Decode(format!(
                "unsupported Content-Type {other:?}; use {JSON} or {MSGPACK}"
            ))),
        }
    }

    /// The format of a NATS message, from its headers.
    pub fn of_message(message: &async_nats::Message) -> Result<Format, Error> {
        let value = message
            .headers
            .as_ref()
            .and_then(|h| h.get(CONTENT_TYPE))
            .map(|v| v.as_str());
        Format::from_content_type(value)
    }

    /// Decodes an edge body.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, Error> {
        match self {
            Format::Json => serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string())),
            Format::Msgpack => decode(bytes),
        }
    }

    /// Encodes an edge body.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, Error> {
        match self {
            Format::Json => serde_json::to_vec(value).map_err(|e| Error::Encode(e.to_string())),
            Format::Msgpack => encode(value),
        }
    }
}

/// Encodes a value as MessagePack (structs as maps).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes a MessagePack value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
}

/// An opaque, MessagePack-encoded value: a workflow input or output, an activity input or
/// result. The transport never looks inside.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Payload {
    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Payload, Error> {
        encode(value).map(Payload)
    }

    /// Decodes the value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        decode(&self.0)
    }

    /// The value as JSON (for the edge, the CLI and histories).
    pub fn to_json(&self) -> serde_json::Value {
        self.decode::<serde_json::Value>()
            .unwrap_or_else(|e| serde_json::json!({ "undecodable_payload": e.to_string() }))
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the payload is empty (no value at all).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= 256 {
            write!(f, "Payload({})", self.to_json())
        } else {
            write!(f, "Payload({} bytes)", self.0.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        text: String,
        scores: Vec<f32>,
    }

    #[test]
    fn payload_round_trips_and_shows_as_json() {
        let s = Sample {
            text: "hi".into(),
            scores: vec![0.5, 0.25],
        };
        let p = Payload::encode(&s).unwrap();
        assert_eq!(p.decode::<Sample>().unwrap(), s);
        assert_eq!(
            p.to_json(),
            serde_json::json!({"text": "hi", "scores": [0.5, 0.25]})
        );
    }

    #[test]
    fn content_type_selects_the_format() {
        assert_eq!(Format::from_content_type(None).unwrap(), Format::Json);
        assert_eq!(
            Format::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            Format::from_content_type(Some(MSGPACK)).unwrap(),
            Format::Msgpack
        );
        assert!(Format::from_content_type(Some("text/xml")).is_err());
    }

    #[test]
    fn malformed_bytes_are_a_decode_error_not_a_panic() {
        assert!(Format::Json.decode::<Sample>(b"{not json").is_err());
        assert!(
            Format::Msgpack
                .decode::<Sample>(&[0xc1, 0xff, 0x00])
                .is_err()
        );
        assert!(decode::<Sample>(&[]).is_err());
    }

    #[test]
    fn json_inputs_convert_to_msgpack_payloads() {
        let v: serde_json::Value = serde_json::json!({"texts": ["a", "b"], "n": 3});
        let p = Payload::encode(&v).unwrap();
        assert_eq!(p.to_json(), v);
    }
}
