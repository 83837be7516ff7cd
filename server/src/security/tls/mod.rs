//! mTLS with rustls: TLS 1.3 only, client certificates verified against the
//! configured CA (and CRL), clientAuth usage required. The configuration is
//! held in a [`TlsHolder`] so new certificates take effect for new
//! connections without a restart. The listener that uses it is in
//! [`crate::api::listener`].

pub mod pki;

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::TlsConfig;

/// Why the TLS setup was refused. Messages name the setting and file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("invalid setting `{setting}`: {path}: {reason}")]
    Pem {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration refused: {0}")]
    Rustls(String),
}

fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem { setting, path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}

/// The rustls server configuration: TLS 1.3, client certificate required,
/// ALPN h2.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in read_certs("tls.client_ca", &config.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            setting: "tls.client_ca",
            path: config.client_ca.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(crl) = &config.crl {
        let pem_err = |reason: String| TlsError::Pem { setting: "tls.crl", path: crl.display().to_string(), reason };
        let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(crl)
            .map_err(|e| pem_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        if crls.is_empty() {
            return Err(pem_err("no PEM X509 CRL in the file".to_owned()));
        }
        verifier = verifier.with_crls(crls);
    }
    // webpki refuses a client certificate whose extended key usage lacks
    // clientAuth, but accepts one without the extension: require it.
    let verifier: Arc<dyn ClientCertVerifier> =
        Arc::new(RequireClientAuth(verifier.build().map_err(|e| TlsError::Rustls(e.to_string()))?));
    let chain = read_certs("tls.cert", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Pem {
        setting: "tls.key",
        path: config.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("tls.cert and tls.key do not form a usable pair: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// The TLS configuration in force, swapped whole when the files change.
pub type TlsHolder = arc_swap::ArcSwap<rustls::ServerConfig>;

/// The bytes of every TLS file of `config`, to tell when one changed.
pub fn fingerprint(config: &TlsConfig) -> Vec<u8> {
    let mut all = Vec::new();
    for path in
        [Some(&config.cert), Some(&config.key), Some(&config.client_ca), config.crl.as_ref()].into_iter().flatten()
    {
        let bytes = std::fs::read(path).unwrap_or_default();
        all.extend_from_slice(&sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &bytes)));
    }
    all
}

/// Client certificates must name the clientAuth extended key usage; then
/// webpki verifies them as usual.
#[derive(Debug)]
struct RequireClientAuth(Arc<dyn ClientCertVerifier>);

/// Whether a certificate (DER) has an extended key usage extension that
/// lists clientAuth.
pub fn has_client_auth_usage(der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, cert)| cert.extended_key_usage().ok().flatten().map(|eku| eku.value.client_auth))
        .unwrap_or(false)
}

impl ClientCertVerifier for RequireClientAuth {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !has_client_auth_usage(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurposeContext {
                required: rustls::ExtendedKeyPurpose::ClientAuth,
                presented: Vec::new(),
            }));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
