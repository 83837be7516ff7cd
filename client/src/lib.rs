//! Client for [keybroker](https://github.com/keybroker/keybroker), the gRPC
//! key broker for envelope encryption.
//!
//! - [`Client`]: connect over mTLS ([`Client::mtls`]) or a Unix socket
//!   ([`Client::unix`]); every call has a deadline and is retried with
//!   backoff on `UNAVAILABLE` only; errors keep the gRPC code ([`Error`]).
//! - [`blob::BlobEncryptor`]: envelope encryption of blobs of any size
//!   (GenerateDataKey, local AES-256-GCM in frames, the wrapped DEK in a
//!   sidecar), with an optional DEK cache ([`CachePolicy`]).
//! - [`pb`]: the generated `keybroker.v1` API, from the proto files this
//!   crate carries under `proto/` (clients in other languages generate
//!   theirs from the same files). Server traits need the `server` feature.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keybroker_client::Error> {
//! use keybroker_client::{Client, Context, TlsIdentity};
//! let tls = TlsIdentity::from_files("keybroker-dev/tls/ca.pem", "keybroker-dev/tls/client.pem", "keybroker-dev/tls/client.key")?;
//! let client = Client::mtls("https://127.0.0.1:50051", tls).connect().await?;
//! let context = Context::from([("tenant".to_owned(), "acme".to_owned())]);
//! let wrapped = client.wrap("demo", &[7u8; 32], &context).await?;
//! let dek = client.unwrap(&wrapped.ciphertext, &context).await?;
//! assert_eq!(dek.plaintext.as_slice(), &[7u8; 32]);
//! # Ok(()) }
//! ```

pub mod blob;
mod cache;
mod client;
mod error;
mod redact;
mod sidecar;
mod tls;

pub use cache::CachePolicy;
pub use client::{Client, ClientBuilder, Context, DataKey, RetryPolicy, Unwrapped, Wrapped};
pub use error::{Error, Result};
pub use tls::TlsIdentity;

/// The generated `keybroker.v1` messages, clients and (feature `server`)
/// server traits.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod pb {
    include!("generated/keybroker.v1.rs");

    /// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/keybroker_v1_descriptor.bin");
}

/// Opens an mTLS channel to the broker at `url` for the generated clients
/// in [`pb`]. Most callers want [`Client`] instead.
pub async fn connect(
    url: &str,
    identity: &TlsIdentity,
) -> std::result::Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(url.to_owned())?.tls_config(identity.tls_config())?.connect().await
}
