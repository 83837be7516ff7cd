//! Where connections come from: the mTLS TCP listener and, for the sidecar
//! case, a Unix domain socket (mode 0600) whose callers are identified by
//! their peer credentials. Each accepted connection carries its caller's
//! [`Peer`], computed once at accept time, into every request's extensions.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::security::audit::{AuditLog, ReplyGate};
use crate::security::identity::{Peer, PeerInfo, Transport};
use crate::security::policy::Gate;
use crate::security::tls::TlsHolder;

/// The byte stream of an accepted connection.
enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// An accepted connection and the caller it speaks for.
pub struct Connection {
    io: Io,
    peer: PeerInfo,
}

impl Connection {
    fn new(io: Io, peer: Peer, audit: Option<&Arc<AuditLog>>) -> Self {
        let replies = audit.and_then(ReplyGate::new);
        Self { io, peer: PeerInfo { peer: Arc::new(peer), replies } }
    }

    /// Holds the bytes about to be written until the audit events of the
    /// calls answered so far are written.
    fn gate(&self) -> io::Result<()> {
        self.peer.replies.as_ref().map_or(Ok(()), |gate| gate.before_write())
    }
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Tls(s) => {
                let $io = Pin::new(s.as_mut());
                $call
            }
            Io::Unix(s) => {
                let $io = Pin::new(s);
                $call
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.gate()?;
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.gate()?;
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// The stream of accepted connections from every listener.
pub struct Incoming {
    tx: mpsc::Sender<io::Result<Connection>>,
    rx: mpsc::Receiver<io::Result<Connection>>,
    gate: Arc<Gate>,
    /// The audit log whose events hold each connection's replies.
    audit: Option<Arc<AuditLog>>,
}

/// Refused TLS handshakes, logged at WARN with the peer and the reason, each
/// reason at most once a second (a scanner or a misconfigured fleet must
/// not flood the log); the refusals in between are counted in the next line.
#[derive(Default)]
struct Refusals {
    total: std::sync::atomic::AtomicU64,
    /// By reason: when it was last logged, and how many since.
    last: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

impl Refusals {
    fn report(&self, remote: std::net::SocketAddr, reason: &str) {
        if let Some(m) = crate::telemetry::metrics::get() {
            m.handshake_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let total = self.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, suppressed)) = last.get_mut(reason)
            && at.elapsed() < Duration::from_secs(1)
        {
            *suppressed += 1;
            return;
        }
        if last.len() >= 64 {
            last.clear();
        }
        let suppressed = last.insert(reason.to_owned(), (std::time::Instant::now(), 0)).map_or(0, |(_, n)| n);
        tracing::warn!(%remote, reason, suppressed, total, "TLS handshake refused");
    }
}

impl Incoming {
    /// An empty set of listeners whose callers are named by the
    /// certificate fields of `gate`'s policy. With `audit`, each
    /// connection holds its replies until their calls' events are written
    /// (calls queue their events without waiting).
    pub fn new(gate: Arc<Gate>, audit: Option<Arc<AuditLog>>) -> Self {
        let (tx, rx) = mpsc::channel(128);
        Self { tx, rx, gate, audit }
    }

    /// Accepts mTLS connections on `listener`. Each handshake runs in its own
    /// task (a slow client cannot stall others) under `handshake_timeout`;
    /// refused handshakes are logged with the peer address and the reason.
    /// Each handshake uses the TLS configuration in force when it starts.
    pub fn add_tls(&self, listener: TcpListener, tls: Arc<TlsHolder>, handshake_timeout: Duration) {
        let tx = self.tx.clone();
        let gate = self.gate.clone();
        let audit = self.audit.clone();
        let refusals = Arc::new(Refusals::default());
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (tcp, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tune(&tcp);
                let acceptor = TlsAcceptor::from(tls.load_full());
                let (gate, tx, audit) = (gate.clone(), tx.clone(), audit.clone());
                let refusals = refusals.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let peer = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .map(|cert| gate.policy().certificate_fields().identify(cert))
                                .unwrap_or_else(|| Peer::new(Vec::new(), Transport::Tls));
                            tracing::debug!(%remote, identity = %peer.name(), "mTLS connection accepted");
                            let connection = Connection::new(Io::Tls(Box::new(stream)), peer, audit.as_ref());
                            let _ = tx.send(Ok(connection)).await;
                        }
                        Ok(Err(err)) => refusals.report(remote, &err.to_string()),
                        Err(_) => refusals.report(remote, "no complete handshake within the timeout"),
                    }
                });
            }
        });
    }

    /// Accepts connections on a Unix socket; the caller is `uid:<uid>` from
    /// the socket's peer credentials.
    pub fn add_unix(&self, listener: UnixListener) {
        let tx = self.tx.clone();
        let audit = self.audit.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(%err, "unix socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer::unix(cred.uid()),
                    Err(err) => {
                        tracing::info!(%err, "unix socket peer without credentials refused");
                        continue;
                    }
                };
                tracing::debug!(identity = %peer.name(), "unix socket connection accepted");
                let connection = Connection::new(Io::Unix(stream), peer, audit.as_ref());
                if tx.send(Ok(connection)).await.is_err() {
                    break;
                }
            }
        });
    }

    /// The connections, for `serve_with_incoming`.
    pub fn into_stream(self) -> ReceiverStream<io::Result<Connection>> {
        ReceiverStream::new(self.rx)
    }
}

/// How long an accepted TCP connection may be silent before the kernel
/// probes it, then the gap between probes and how many go unanswered before
/// it is dropped: a peer that died without closing is let go after about
/// a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// Socket options of an accepted TCP connection: replies go out at once
/// (no Nagle delay), and dead peers are found by the kernel's keepalive
/// probes (HTTP/2 PINGs would do the same at the cost of a clock read per
/// received frame).
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(err) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%err, "TCP keepalive not set");
    }
}

/// Binds a Unix socket at `path` with file mode `mode` (0600: the broker's
/// user only), replacing a stale socket left by a previous run.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"));
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_are_probed_by_tcp_keepalive_and_skip_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune(&accepted);
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }
}
