//! The sidecar: what is kept beside encrypted data so its DEK can be
//! unwrapped again. Shared by the blob format ([`crate::blob`]), the DEK
//! cache and `keybroker rewrap`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::Context;
use crate::error::{Error, Result};

/// What is kept beside (or in front of) encrypted data: which key and
/// version wrapped its DEK, the wrapped DEK, and the encryption context it
/// was wrapped with. JSON, e.g.
/// `{"key":"demo","version":1,"wrapped_dek":"S0IBAQRk...","context":{"blob":"b1"}}`
/// (`wrapped_dek` in standard base64; `context` omitted when empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Key name.
    pub key: String,
    /// Key version that wrapped the DEK.
    pub version: u32,
    /// The wrapped DEK (a keybroker ciphertext envelope).
    #[serde(with = "base64_bytes")]
    pub wrapped_dek: Vec<u8>,
    /// Encryption context of the wrapped DEK.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: Context,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

impl Sidecar {
    /// The JSON form.
    pub fn to_json(&self) -> String {
        // A struct of strings, integers and a string map always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the JSON form.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Blob(format!("sidecar: {e}")))
    }
}
