//! A small certificate authority built on rcgen: the dev PKI of
//! `keybroker dev`, and the certificates the tests need (another CA, expired
//! or wrong-usage certificates). Everything is EC P-256.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// A certificate and its private key, both PEM. The key's Debug is redacted.
pub struct IssuedCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// What a client certificate says.
#[derive(Debug, Clone)]
pub struct ClientSpec<'a> {
    /// Subject common name.
    pub common_name: &'a str,
    /// URI SAN (e.g. a SPIFFE ID).
    pub uri: Option<&'a str>,
    /// Validity window relative to now, in days (negative: in the past).
    pub valid_days: (i64, i64),
    /// Extended key usage: clientAuth when true, serverAuth otherwise.
    pub client_auth: bool,
    /// Leave the extended key usage extension out altogether.
    pub no_eku: bool,
    /// DNS SAN.
    pub dns: Option<&'a str>,
}

impl<'a> ClientSpec<'a> {
    /// A valid client certificate for `common_name` with an optional URI SAN.
    pub fn new(common_name: &'a str, uri: Option<&'a str>) -> Self {
        Self { common_name, uri, valid_days: (-1, 3650), client_auth: true, no_eku: false, dns: None }
    }
}

/// A certificate authority that can issue server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(<redacted>)")
    }
}

fn validity(params: &mut CertificateParams, days: (i64, i64)) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now + Duration::days(days.0);
    params.not_after = now + Duration::days(days.1);
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid ten years.
    pub fn generate(common_name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, (-1, 3650));
        let cert = params.self_signed(&key)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Self { issuer: Issuer::new(params, key), cert_pem: cert.pem(), key_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A server certificate for DNS names and IP addresses (`names`), EKU
    /// serverAuth.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("keybroker"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, (-1, 3650));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// A client certificate as `spec` describes it.
    pub fn issue_client(&self, spec: &ClientSpec<'_>) -> Result<IssuedCert, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, spec.common_name);
        if let Some(uri) = spec.uri {
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        if let Some(dns) = spec.dns {
            params.subject_alt_names.push(SanType::DnsName(dns.try_into()?));
        }
        if !spec.no_eku {
            params.extended_key_usages = vec![if spec.client_auth {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, spec.valid_days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

impl Ca {
    /// A CRL of this CA revoking the certificates `revoked` (PEM), valid a
    /// day.
    pub fn crl(&self, revoked: &[&str]) -> Result<String, rcgen::Error> {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
        use x509_parser::prelude::{FromDer, X509Certificate};
        let mut revoked_certs = Vec::new();
        for pem in revoked {
            let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
                .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            let (_, cert) = X509Certificate::from_der(&der).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: OffsetDateTime::now_utc() - Duration::minutes(1),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}
