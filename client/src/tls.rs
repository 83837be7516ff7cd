//! The mTLS identity a client presents.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The PEM material of an mTLS identity: the CA that signed the broker's
/// certificate, and this client's certificate and private key. The key is
/// never shown by Debug.
#[derive(Clone)]
pub struct TlsIdentity {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
    /// The name the broker's certificate must carry; `None`: the host of
    /// the URL the client dials.
    domain: Option<String>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("domain", &self.domain).field("key_pem", &"<redacted>").finish()
    }
}

impl TlsIdentity {
    /// An identity from PEM bytes. The broker's certificate is checked
    /// against the host of the URL dialed (a DNS name or an IP address);
    /// see [`TlsIdentity::with_domain`] to check another name.
    pub fn from_pem(ca_pem: impl Into<Vec<u8>>, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: zeroize::Zeroizing::new(key_pem.into()),
            domain: None,
        }
    }

    /// An identity read from three PEM files; an error names the file.
    pub fn from_files(ca: impl AsRef<Path>, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> std::io::Result<Self> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        Ok(Self::from_pem(read(ca.as_ref())?, read(cert.as_ref())?, read(key.as_ref())?))
    }

    /// Checks the broker's certificate against `domain` instead of the
    /// host of the URL (for a broker reached through an address its
    /// certificate does not name, like a port-forward).
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    pub(crate) fn tls_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, self.key_pem.as_slice()));
        // Without a domain, tonic checks the certificate against the URI's host.
        match &self.domain {
            Some(domain) => config.domain_name(domain.clone()),
            None => config,
        }
    }
}
