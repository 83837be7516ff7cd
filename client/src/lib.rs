//! Client for [keybroker](https://github.com/keybroker/keybroker), the gRPC key
//! broker for envelope encryption.
//!
//! - [`pb`]: the `keybroker.v1` API, generated from the proto files this crate
//!   carries under `proto/` (clients in other languages generate theirs from
//!   the same files). Server traits are behind the `server` feature.
//! - [`connect`]: an mTLS channel to a broker from PEM identity files.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keybroker_client::{connect, pb, TlsIdentity};
//! let tls = TlsIdentity::from_files("dev/tls/ca.pem", "dev/tls/client.pem", "dev/tls/client.key")?;
//! let channel = connect("https://127.0.0.1:50051", &tls).await?;
//! let mut broker = pb::key_broker_client::KeyBrokerClient::new(channel);
//! let wrapped = broker
//!     .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![7; 32], ..Default::default() })
//!     .await?
//!     .into_inner();
//! println!("wrapped under {} v{}", wrapped.key, wrapped.version);
//! # Ok(()) }
//! ```

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The generated `keybroker.v1` messages, clients and (feature `server`)
/// server traits.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod pb {
    include!("generated/keybroker.v1.rs");

    /// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/keybroker_v1_descriptor.bin");
}

/// The PEM material of an mTLS identity: the CA that signed the server and
/// this client's certificate and private key.
#[derive(Clone)]
pub struct TlsIdentity {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    domain: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("domain", &self.domain)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// An identity from PEM bytes. The server name checked against the server
    /// certificate defaults to `localhost`; see [`TlsIdentity::with_domain`].
    pub fn from_pem(ca_pem: impl Into<Vec<u8>>, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            domain: "localhost".to_owned(),
        }
    }

    /// An identity read from three PEM files.
    pub fn from_files(ca: impl AsRef<Path>, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> std::io::Result<Self> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        Ok(Self::from_pem(read(ca.as_ref())?, read(cert.as_ref())?, read(key.as_ref())?))
    }

    /// Checks the server certificate against `domain` instead of `localhost`.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    fn tls_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(self.domain.clone())
    }
}

/// Opens an mTLS channel to the broker at `url` (`https://host:port`).
pub async fn connect(url: &str, identity: &TlsIdentity) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_owned())?.tls_config(identity.tls_config())?.connect().await
}
