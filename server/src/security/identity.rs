//! Who is calling, and whether they may. The identity comes from the client
//! certificate, read once per connection at the handshake; the minimal role
//! split (admin plane / data plane) is enforced per RPC. Deny by default:
//! an identity in no list can call nothing but health and reflection.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::AuthConfig;

/// The authenticated caller of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The identity shown in logs and errors: the first URI SAN, else the
    /// first DNS SAN, else the subject CN.
    pub identity: String,
    /// May call `KeyAdmin`.
    pub admin: bool,
    /// May call `KeyBroker`.
    pub app: bool,
}

/// The caller of a request, placed in request extensions by the listener.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Arc<Peer>);

/// Maps certificate identities to roles.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    admin: HashSet<String>,
    app: HashSet<String>,
}

impl Authorizer {
    /// Roles from the `[auth]` configuration.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            admin: config.admin_identities.iter().cloned().collect(),
            app: config.app_identities.iter().cloned().collect(),
        }
    }

    /// The peer a verified end-entity certificate (DER) speaks for. Every
    /// URI SAN, DNS SAN and the CN are candidate identities; a role is held
    /// when any candidate is listed for it.
    pub fn identify(&self, cert_der: &[u8]) -> Peer {
        let names = certificate_identities(cert_der);
        let identity = names.first().cloned().unwrap_or_else(|| "<no identity>".to_owned());
        Peer {
            admin: names.iter().any(|n| self.admin.contains(n)),
            app: names.iter().any(|n| self.app.contains(n)),
            identity,
        }
    }
}

impl Authorizer {
    /// The peer of a Unix socket connection: identity `uid:<uid>`, listed in
    /// the same `auth.*_identities` as certificate identities.
    pub fn identify_unix(&self, uid: u32) -> Peer {
        let identity = format!("uid:{uid}");
        Peer { admin: self.admin.contains(&identity), app: self.app.contains(&identity), identity }
    }
}

/// URI SANs, then DNS SANs, then the subject CN of a certificate.
pub fn certificate_identities(cert_der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let cn = cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_owned);
    uris.into_iter().chain(dns).chain(cn).collect()
}

/// The plane an RPC belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// `keybroker.v1.KeyAdmin`.
    Admin,
    /// `keybroker.v1.KeyBroker`.
    Data,
}

/// The peer of a request, or `UNAUTHENTICATED` when the listener attached
/// none (never the case on the mTLS listener).
pub fn peer<T>(request: &Request<T>) -> Result<Arc<Peer>, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.0.clone())
        .ok_or_else(|| Status::unauthenticated("no client identity on this connection"))
}

/// A tonic interceptor admitting only peers that hold the plane's role.
pub fn require(plane: Plane) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let peer = peer(&request)?;
        let (allowed, service, list) = match plane {
            Plane::Admin => (peer.admin, "keybroker.v1.KeyAdmin", "auth.admin_identities"),
            Plane::Data => (peer.app, "keybroker.v1.KeyBroker", "auth.app_identities"),
        };
        if allowed {
            Ok(request)
        } else {
            tracing::warn!(target: "keybroker::audit", identity = %peer.identity, service, result = "permission_denied", "policy decision");
            Err(Status::permission_denied(format!(
                "identity {:?} may not call {service} (not listed in {list})",
                peer.identity
            )))
        }
    }
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
    fn roles_come_from_uri_san_or_cn() {
        let ca = Ca::generate("test").unwrap();
        let auth = Authorizer::new(&AuthConfig {
            admin_identities: vec!["spiffe://kb/admin".into()],
            app_identities: vec!["billing".into()],
        });
        let admin = ca.issue_client(&ClientSpec::new("ops", Some("spiffe://kb/admin"))).unwrap();
        let peer = auth.identify(&der(&admin.cert_pem));
        assert_eq!(peer, Peer { identity: "spiffe://kb/admin".into(), admin: true, app: false });
        let app = ca.issue_client(&ClientSpec::new("billing", None)).unwrap();
        let peer = auth.identify(&der(&app.cert_pem));
        assert_eq!(peer, Peer { identity: "billing".into(), admin: false, app: true });
        let nobody = ca.issue_client(&ClientSpec::new("stranger", None)).unwrap();
        let peer = auth.identify(&der(&nobody.cert_pem));
        assert!(!peer.admin && !peer.app);
        assert!(!auth.identify(b"garbage").app);
    }
}
