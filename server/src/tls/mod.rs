//! The mTLS listener: rustls, TLS 1.3 only, client certificates verified
//! against the configured CA. Handshakes run concurrently with a timeout;
//! each accepted connection carries its caller's [`Peer`], computed once.

pub mod pki;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::auth::{Authorizer, Peer, PeerInfo};
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
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
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

/// An accepted mTLS connection and the caller it speaks for.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener`, runs each TLS handshake in its own
/// task (a slow client cannot stall others), and yields the connections that
/// complete it in time. Refused handshakes are logged with the peer address.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    authorizer: Arc<Authorizer>,
    handshake_timeout: Duration,
) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let authorizer = authorizer.clone();
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .map(|cert| authorizer.identify(cert))
                            .unwrap_or_else(|| Peer { identity: "<none>".to_owned(), admin: false, app: false });
                        tracing::debug!(%remote, identity = %peer.identity, "mTLS connection accepted");
                        let _ = conn_tx.send(Ok(PeerStream { inner: stream, peer: PeerInfo(Arc::new(peer)) })).await;
                    }
                    Ok(Err(err)) => tracing::info!(%remote, %err, "TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}
