//! Who is calling. An identity is typed by where it comes from, so a name
//! can never be taken from another kind: `spiffe://…` or `uri:…` (a URI SAN),
//! `dns:…` (a DNS SAN), `cn:…` (the subject common name), `spki-sha256:<hex>`
//! (SHA-256 of the certificate's public key, as KES names identities) and
//! `uid:<n>` (the peer of the Unix socket). A certificate never yields a
//! `uid:` identity and a socket peer never yields a certificate one. Which
//! certificate fields count is configured (`auth.certificate_identities`,
//! by default the URI SANs only). The identities of a connection are read
//! once, at accept time; what they may do is the [`super::policy`]'s
//! business, decided per call.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where an identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    /// A URI SAN of the client certificate (a SPIFFE ID, for example).
    Uri,
    /// A DNS SAN of the client certificate.
    Dns,
    /// The subject common name of the client certificate.
    Cn,
    /// SHA-256 of the client certificate's SubjectPublicKeyInfo, hex.
    #[serde(rename = "spki-sha256")]
    Spki256,
    /// The uid of the Unix socket's peer.
    Uid,
    /// An AWS principal ARN (`awsPrincipalArn` of an XKS request).
    Aws,
}

impl IdentityKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Uri => "uri:",
            Self::Dns => "dns:",
            Self::Cn => "cn:",
            Self::Spki256 => "spki-sha256:",
            Self::Uid => "uid:",
            Self::Aws => "aws:",
        }
    }
}

/// One typed identity, in its canonical form (`uri:spiffe://a/b`,
/// `dns:host`, `cn:name`, `spki-sha256:<64 hex>`, `uid:1000`). Shown as
/// written by operators: SPIFFE IDs bare, the others with their kind.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    kind: IdentityKind,
    value: String,
}

impl Identity {
    /// An identity of `kind` with `value`.
    pub fn new(kind: IdentityKind, value: impl Into<String>) -> Self {
        Self { kind, value: value.into() }
    }

    /// The identity of a Unix socket peer.
    pub fn uid(uid: u32) -> Self {
        Self::new(IdentityKind::Uid, uid.to_string())
    }

    /// The kind.
    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// Parses an identity as written in the configuration. Every entry says
    /// its kind; an untyped name is refused rather than guessed.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("spiffe://") {
            return Ok(Self::new(IdentityKind::Uri, text));
        }
        let kinds = [
            IdentityKind::Uri,
            IdentityKind::Dns,
            IdentityKind::Cn,
            IdentityKind::Spki256,
            IdentityKind::Uid,
            IdentityKind::Aws,
        ];
        let Some((kind, value)) = kinds.iter().find_map(|k| text.strip_prefix(k.prefix()).map(|v| (*k, v))) else {
            return Err(format!(
                "identity {text:?} does not say its kind: write spiffe://…, uri:…, dns:…, cn:…, \
                 spki-sha256:<64 hex digits>, uid:<number> or aws:<principal ARN>"
            ));
        };
        if value.is_empty() {
            return Err(format!("identity {text:?} is empty after its kind"));
        }
        match kind {
            IdentityKind::Uid if value.parse::<u32>().is_err() => Err(format!("identity {text:?}: a uid is a number")),
            IdentityKind::Spki256
                if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Err(format!("identity {text:?}: spki-sha256 takes 64 lower-case hex digits"))
            }
            IdentityKind::Uri if !value.contains(':') => Err(format!("identity {text:?}: not a URI")),
            _ => Ok(Self::new(kind, value)),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == IdentityKind::Uri && self.value.starts_with("spiffe://") {
            f.write_str(&self.value)
        } else {
            write!(f, "{}{}", self.kind.prefix(), self.value)
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// How the caller reached the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The mTLS listener.
    Tls,
    /// The pod-local Unix socket.
    Unix,
    /// The XKS proxy API (a SigV4-signed request).
    Xks,
}

/// The authenticated caller of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Every identity the connection speaks for, in the order of
    /// `auth.certificate_identities`; empty when the certificate carries
    /// none of the configured kinds.
    pub identities: Vec<Identity>,
    /// How it connected.
    pub transport: Transport,
    /// [`Peer::name`], made once per connection (every call's audit event,
    /// rate limit and span carry it).
    name: Arc<str>,
}

impl Peer {
    /// The peer that speaks for `identities`.
    pub fn new(identities: Vec<Identity>, transport: Transport) -> Self {
        let name = identities.first().map_or_else(|| "<no identity>".into(), |i| i.to_string().into());
        Self { identities, transport, name }
    }

    /// The identity shown in logs, audit events and errors: the first one,
    /// or `<no identity>`.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The peer of a Unix socket connection.
    pub fn unix(uid: u32) -> Self {
        Self::new(vec![Identity::uid(uid)], Transport::Unix)
    }
}

/// The caller of a request, placed in request extensions by the listener.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Who is calling.
    pub peer: Arc<Peer>,
    /// The connection's hold on its replies until their audit events are
    /// written; none where calls wait for their events themselves.
    pub replies: Option<Arc<crate::security::audit::ReplyGate>>,
}

/// The certificate fields that count as identities, in order.
#[derive(Debug, Clone)]
pub struct CertificateFields(Vec<IdentityKind>);

impl CertificateFields {
    /// The configured fields; `uid` is not a certificate field.
    pub fn new(kinds: &[IdentityKind]) -> Result<Self, String> {
        if kinds.contains(&IdentityKind::Uid) || kinds.contains(&IdentityKind::Aws) {
            return Err(
                "uid (the Unix socket's) and aws (an XKS request's) are never a certificate's identity".to_owned()
            );
        }
        if kinds.is_empty() {
            return Err("at least one certificate field must count (uri, dns, cn, spki-sha256)".to_owned());
        }
        Ok(Self(kinds.to_vec()))
    }

    /// The peer a verified end-entity certificate (DER) speaks for.
    pub fn identify(&self, cert_der: &[u8]) -> Peer {
        Peer::new(certificate_identities(cert_der, &self.0), Transport::Tls)
    }
}

impl Default for CertificateFields {
    fn default() -> Self {
        Self(vec![IdentityKind::Uri])
    }
}

/// The identities of `kinds` a certificate carries, in the order of `kinds`.
pub fn certificate_identities(cert_der: &[u8], kinds: &[IdentityKind]) -> Vec<Identity> {
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for kind in kinds {
        match kind {
            IdentityKind::Uri | IdentityKind::Dns => {
                if let Ok(Some(san)) = cert.subject_alternative_name() {
                    for name in &san.value.general_names {
                        match (kind, name) {
                            (IdentityKind::Uri, GeneralName::URI(u)) => out.push(Identity::new(*kind, *u)),
                            (IdentityKind::Dns, GeneralName::DNSName(d)) => out.push(Identity::new(*kind, *d)),
                            _ => {}
                        }
                    }
                }
            }
            IdentityKind::Cn => out.extend(
                cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(|cn| Identity::new(*kind, cn)),
            ),
            IdentityKind::Spki256 => {
                let digest = sha2::Sha256::digest(cert.public_key().raw);
                out.push(Identity::new(*kind, hex::encode(digest)));
            }
            IdentityKind::Uid | IdentityKind::Aws => {}
        }
    }
    out
}

/// The peer of a request, or `UNAUTHENTICATED` when the listener attached
/// none (never the case on the keybroker listeners).
pub fn peer<T>(request: &Request<T>) -> Result<Arc<Peer>, Status> {
    peer_info(request).map(|p| p.peer.clone())
}

/// The caller of a request and its connection's reply gate, or
/// `UNAUTHENTICATED` like [`peer`].
pub fn peer_info<T>(request: &Request<T>) -> Result<&PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::unauthenticated("no client identity on this connection"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::tls::pki::{Ca, ClientSpec};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    #[test]
    fn identities_are_typed_by_their_source() {
        let ca = Ca::generate("test").unwrap();
        let cert = ca.issue_client(&ClientSpec::new("uid:1000", Some("spiffe://kb/app"))).unwrap();
        let cert = der(&cert.cert_pem);
        // Default: the URI SAN only.
        let peer = CertificateFields::default().identify(&cert);
        assert_eq!(peer.identities, vec![Identity::parse("spiffe://kb/app").unwrap()]);
        assert_eq!(&**peer.name(), "spiffe://kb/app");
        // A CN that reads like a uid is a cn: identity, never the uid.
        let all = [IdentityKind::Uri, IdentityKind::Dns, IdentityKind::Cn, IdentityKind::Spki256];
        let peer = CertificateFields::new(&all).unwrap().identify(&cert);
        assert!(peer.identities.contains(&Identity::parse("cn:uid:1000").unwrap()));
        assert!(!peer.identities.contains(&Identity::uid(1000)));
        let spki = peer.identities.iter().find(|i| i.kind() == IdentityKind::Spki256).unwrap();
        assert_eq!(spki.to_string().len(), "spki-sha256:".len() + 64);
        assert!(CertificateFields::new(&[IdentityKind::Uid]).is_err());
        assert!(CertificateFields::default().identify(b"garbage").identities.is_empty());
    }

    #[test]
    fn configured_identities_must_say_their_kind() {
        assert_eq!(Identity::parse("uri:spiffe://a/b").unwrap(), Identity::parse("spiffe://a/b").unwrap());
        assert_eq!(Identity::parse("uid:1000").unwrap(), Identity::uid(1000));
        assert_eq!(Identity::parse("dns:app.example").unwrap().to_string(), "dns:app.example");
        for bad in ["billing", "uid:me", "spki-sha256:abc", "cn:", "uri:nocolon", "email:a@b"] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
