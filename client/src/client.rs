//! An ergonomic client over the generated one: mTLS or Unix socket, a
//! deadline on every call, and retries with exponential backoff and jitter on
//! `UNAVAILABLE` only (every other code is an answer, not a transient fault).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngExt;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::pb;
use crate::pb::key_admin_client::KeyAdminClient;
use crate::pb::key_broker_client::KeyBrokerClient;
use crate::tls::TlsIdentity;

/// An encryption context: sorted key/value pairs bound to a ciphertext.
pub type Context = std::collections::BTreeMap<String, String>;

/// When and how often to retry a call that got `UNAVAILABLE`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 disables retries).
    pub max_attempts: u32,
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 4, initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let base = self.initial_backoff.saturating_mul(1u32 << retry.min(16)).min(self.max_backoff);
        // Full jitter: spread the retries of many clients after an outage.
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[derive(Debug, Clone)]
enum Target {
    Tls { url: String, identity: TlsIdentity },
    Unix { path: PathBuf },
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    target: Target,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// Deadline of every call (sent to the broker as `grpc-timeout`);
    /// default 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Deadline of connection set-up; default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Retries on `UNAVAILABLE`; default 4 attempts, 50 ms to 2 s backoff.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let (url, tls) = match &self.target {
            Target::Tls { url, identity } => (url.clone(), Some(identity.tls_config())),
            // The URI of a Unix socket channel is never dialed; the connector is.
            Target::Unix { .. } => ("http://localhost".to_owned(), None),
        };
        let connect_err =
            |e: tonic::transport::Error| Error::Connect { endpoint: self.describe(), reason: e.to_string() };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(connect_err)?
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(connect_err)?;
        }
        Ok(endpoint)
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Tls { url, .. } => url.clone(),
            Target::Unix { path } => format!("unix:{}", path.display()),
        }
    }

    /// Connects now; fails when the broker cannot be reached.
    pub async fn connect(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        let channel = match &self.target {
            Target::Tls { .. } => endpoint.connect().await,
            Target::Unix { path } => endpoint.connect_with_connector(unix_connector(path.clone())).await,
        }
        .map_err(|e| Error::Connect { endpoint: self.describe(), reason: format!("{e} ({e:?})") })?;
        Ok(self.client(channel))
    }

    /// Connects on first use, so a client can be made while the broker is
    /// down; calls then retry per the [`RetryPolicy`].
    pub fn connect_lazy(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        let channel = match &self.target {
            Target::Tls { .. } => endpoint.connect_lazy(),
            Target::Unix { path } => endpoint.connect_with_connector_lazy(unix_connector(path.clone())),
        };
        Ok(self.client(channel))
    }

    fn client(self, channel: Channel) -> Client {
        Client {
            data: KeyBrokerClient::new(channel.clone()),
            admin: KeyAdminClient::new(channel),
            retry: self.retry,
            timeout: self.timeout,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }
}

fn unix_connector(
    path: PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    })
}

/// A wrapped data key and the key version that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The ciphertext envelope.
    pub ciphertext: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Key version.
    pub version: u32,
}

/// An unwrapped data key. The plaintext is zeroized on drop and redacted in
/// Debug.
pub struct Unwrapped {
    /// The data key.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Key name.
    pub key: String,
    /// Version the ciphertext was made with.
    pub version: u32,
    /// A newer version is current: rewrap when convenient.
    pub rewrap_advised: bool,
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field("plaintext", &"<redacted>")
            .field("key", &self.key)
            .field("version", &self.version)
            .field("rewrap_advised", &self.rewrap_advised)
            .finish()
    }
}

/// A fresh data key from GenerateDataKey.
pub struct DataKey {
    /// The plaintext DEK (empty when asked `without_plaintext`).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Its wrapped form.
    pub wrapped: Wrapped,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey").field("plaintext", &"<redacted>").field("wrapped", &self.wrapped).finish()
    }
}

/// A keybroker client. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    data: KeyBrokerClient<Channel>,
    admin: KeyAdminClient<Channel>,
    retry: RetryPolicy,
    timeout: Duration,
    calls: Arc<AtomicU64>,
}

impl Client {
    /// A client of the broker at `url` (`https://host:port`) over mTLS.
    pub fn mtls(url: impl Into<String>, identity: TlsIdentity) -> ClientBuilder {
        Self::builder(Target::Tls { url: url.into(), identity })
    }

    /// A client of the broker's Unix socket at `path` (the sidecar case; the
    /// broker identifies the caller by its uid).
    pub fn unix(path: impl Into<PathBuf>) -> ClientBuilder {
        Self::builder(Target::Unix { path: path.into() })
    }

    fn builder(target: Target) -> ClientBuilder {
        ClientBuilder {
            target,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    /// RPC attempts this client (and its clones) has made, retries included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The generated data-plane client, for RPCs this wrapper does not cover.
    pub fn data_plane(&self) -> KeyBrokerClient<Channel> {
        self.data.clone()
    }

    /// The generated admin-plane client.
    pub fn admin_plane(&self) -> KeyAdminClient<Channel> {
        self.admin.clone()
    }

    /// Runs `call` with the deadline, retrying on `UNAVAILABLE`.
    async fn retrying<M, T, F, Fut>(&self, message: M, mut call: F) -> Result<T>
    where
        M: Clone,
        F: FnMut(tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(self.timeout);
            match call(request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < self.retry.max_attempts => {
                    tokio::time::sleep(self.retry.backoff(attempt - 1)).await;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Wraps `plaintext` under the current version of `key`.
    pub async fn wrap(&self, key: &str, plaintext: &[u8], context: &Context) -> Result<Wrapped> {
        let message = pb::WrapRequest { key: key.to_owned(), plaintext: plaintext.to_vec(), context: context.clone() };
        let data = self.data.clone();
        let r = self
            .retrying(message, |req| {
                let mut c = data.clone();
                async move { c.wrap(req).await }
            })
            .await?;
        Ok(Wrapped { ciphertext: r.ciphertext, key: r.key, version: r.version })
    }

    /// Unwraps a ciphertext made with `context`.
    pub async fn unwrap(&self, ciphertext: &[u8], context: &Context) -> Result<Unwrapped> {
        let message = pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), context: context.clone() };
        let data = self.data.clone();
        let r = self
            .retrying(message, |req| {
                let mut c = data.clone();
                async move { c.unwrap(req).await }
            })
            .await?;
        Ok(Unwrapped {
            plaintext: Zeroizing::new(r.plaintext),
            key: r.key,
            version: r.version,
            rewrap_advised: r.rewrap_advised,
        })
    }

    /// A fresh DEK of `length` bytes (0 means 32) and its wrapped form.
    pub async fn generate_data_key(&self, key: &str, length: u32, context: &Context) -> Result<DataKey> {
        let message = pb::GenerateDataKeyRequest {
            key: key.to_owned(),
            length,
            context: context.clone(),
            without_plaintext: false,
        };
        let data = self.data.clone();
        let r = self
            .retrying(message, |req| {
                let mut c = data.clone();
                async move { c.generate_data_key(req).await }
            })
            .await?;
        Ok(DataKey {
            plaintext: Zeroizing::new(r.plaintext),
            wrapped: Wrapped { ciphertext: r.ciphertext, key: r.key, version: r.version },
        })
    }

    /// Rewraps a ciphertext under the current version of its key, or of
    /// `target_key` when given.
    pub async fn rewrap(&self, ciphertext: &[u8], context: &Context, target_key: Option<&str>) -> Result<Wrapped> {
        let message = pb::RewrapRequest {
            ciphertext: ciphertext.to_vec(),
            context: context.clone(),
            target_key: target_key.unwrap_or_default().to_owned(),
        };
        let data = self.data.clone();
        let r = self
            .retrying(message, |req| {
                let mut c = data.clone();
                async move { c.rewrap(req).await }
            })
            .await?;
        Ok(Wrapped { ciphertext: r.ciphertext, key: r.key, version: r.version })
    }

    /// Creates a key in `backend` (empty: the broker's default). Not retried:
    /// a lost answer would turn a success into `ALREADY_EXISTS`.
    pub async fn create_key(&self, key: &str, backend: &str) -> Result<pb::Key> {
        let message = pb::CreateKeyRequest { key: key.to_owned(), backend: backend.to_owned(), ..Default::default() };
        let admin = self.admin.clone();
        let no_retry = Self { retry: RetryPolicy::none(), ..self.clone() };
        no_retry
            .retrying(message, |req| {
                let mut c = admin.clone();
                async move { c.create_key(req).await }
            })
            .await
    }

    /// Returns a key with its versions.
    pub async fn get_key(&self, key: &str) -> Result<pb::Key> {
        let admin = self.admin.clone();
        self.retrying(pb::GetKeyRequest { key: key.to_owned() }, |req| {
            let mut c = admin.clone();
            async move { c.get_key(req).await }
        })
        .await
    }

    /// Rotates `key`. Retried on `UNAVAILABLE` only when
    /// `expected_current_version` is given: the compare-and-swap makes a
    /// repeated rotation impossible, while a blind retry could rotate twice.
    pub async fn rotate(&self, key: &str, expected_current_version: Option<u32>) -> Result<pb::Key> {
        let message = pb::RotateRequest { key: key.to_owned(), expected_current_version, ..Default::default() };
        let admin = self.admin.clone();
        let client = if expected_current_version.is_some() {
            self.clone()
        } else {
            Self { retry: RetryPolicy::none(), ..self.clone() }
        };
        client
            .retrying(message, |req| {
                let mut c = admin.clone();
                async move { c.rotate(req).await }
            })
            .await
    }
}
