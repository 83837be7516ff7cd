//! Where KEK material lives. Every backend implements [`KeyBackend`]; a key
//! version records which backend holds it and an opaque [`BackendRef`] that
//! backend gave out, so versions of one key may live in different backends.

pub mod aws_kms;
pub mod guarded;
pub mod health;
pub mod hierarchy;
pub mod local;
pub mod pkcs11;
pub mod root_key;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::core::envelope::{Algorithm, additional_data};
use crate::error::{ErrorCode, ServiceError};
pub use crate::material::{BackendRef, KeyMode};

/// The additional authenticated data of a wrap: the envelope header and the
/// caller's encryption context. AES-GCM backends authenticate
/// [`Aad::bytes`] (header + canonical context); AWS KMS receives the context
/// itself as its EncryptionContext, with the header added under
/// [`AWS_HEADER_CONTEXT_KEY`], so the context is enforced by KMS too.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// Envelope header (or another domain-separating prefix).
    pub header: &'a [u8],
    /// The caller's encryption context.
    pub context: &'a BTreeMap<String, String>,
}

/// One plaintext of [`KeyBackend::wrap_many`], with its context.
#[derive(Debug, Clone, Copy)]
pub struct WrapItem<'a> {
    /// The DEK.
    pub plaintext: &'a [u8],
    /// The caller's encryption context.
    pub context: &'a BTreeMap<String, String>,
}

/// The EncryptionContext entry that carries the envelope header to AWS KMS.
pub const AWS_HEADER_CONTEXT_KEY: &str = "keybroker:header";

impl Aad<'_> {
    /// The canonical byte form: header, then the length-prefixed context.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        additional_data(&mut out, self.header, self.context);
        out
    }
}

/// Counts of what a backend did, for `ListBackends` and the hierarchy-mode
/// proof that wraps stop reaching the KMS.
#[derive(Debug, Default)]
pub struct BackendStats {
    remote_calls: AtomicU64,
}

impl BackendStats {
    /// Counts one call to the remote KMS or HSM.
    pub fn count_remote_call(&self) {
        self.remote_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Remote calls so far.
    pub fn remote_calls(&self) -> u64 {
        self.remote_calls.load(Ordering::Relaxed)
    }
}

/// Runs a backend call with a deadline; a call that does not finish in time
/// is `Unavailable`, naming the backend. This is what bounds the failure of
/// a backend that is down to its own keys and to `timeout`.
pub async fn with_timeout<T>(
    backend: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Unavailable {
            backend: backend.to_owned(),
            reason: format!("no answer within {} ms", timeout.as_millis()),
        }),
    }
}

/// One key version as a backend sees it.
#[derive(Debug, Clone, Copy)]
pub struct VersionRef<'a> {
    /// Key name.
    pub key: &'a str,
    /// Version number.
    pub version: u32,
    /// What the backend returned from `create_version` or `import` (the
    /// bytes of its [`BackendRef`]).
    pub reference: &'a [u8],
    /// Where the caller keeps the KEK the backend opened for this version
    /// last, so the next call reaches it without the backend's lookup
    /// (`None`: the backend looks it up).
    pub opened: Option<&'a OpenedKek>,
}

impl<'a> VersionRef<'a> {
    /// Version `version` of `key`, held by the backend as `reference`.
    pub fn new(key: &'a str, version: u32, reference: &'a BackendRef) -> Self {
        Self { key, version, reference: &reference.0, opened: None }
    }
}

/// The KEK a backend opened for a key version, kept by the caller beside
/// its record of the version (the keyring's cached key). Weak: the
/// backend's bounded cache owns every opened KEK, so one it lets go, or
/// drops when the version is destroyed, is gone from here too, and its key
/// schedule is wiped as before.
///
/// It also counts the times a full cache opened the KEK for a call without
/// keeping it (see [`local::KEEP_ON_OPEN`]).
#[derive(Default)]
pub struct OpenedKek {
    kek: std::sync::Mutex<std::sync::Weak<local::DekCipher>>,
    passed_over: std::sync::atomic::AtomicU32,
    /// The KEK kept last was let go (its weak reference is dropped once
    /// seen dead: it held the allocation, and reading its count again is a
    /// cache miss at every call on a key out of the cipher cache).
    let_go: std::sync::atomic::AtomicBool,
}

impl OpenedKek {
    /// What is kept here: the KEK, one that was let go since (or opened
    /// without being kept), or none.
    pub fn kept(&self) -> Kept {
        let mut weak = self.kek.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cipher) = weak.upgrade() {
            return Kept::Open(cipher);
        }
        // `Weak::new()` (nothing kept, or a KEK let go and seen) points at
        // no allocation; any other is a KEK let go since it was kept.
        if !weak.ptr_eq(&std::sync::Weak::new()) {
            *weak = std::sync::Weak::new();
            self.let_go.store(true, std::sync::atomic::Ordering::Relaxed);
            return Kept::LetGo;
        }
        if self.passed_over() == 0 && !self.let_go.load(std::sync::atomic::Ordering::Relaxed) {
            Kept::Nothing
        } else {
            Kept::LetGo
        }
    }

    /// Keeps `cipher` (a weak reference to it).
    pub fn set(&self, cipher: &Arc<local::DekCipher>) {
        *self.kek.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::downgrade(cipher);
        self.passed_over.store(0, std::sync::atomic::Ordering::Relaxed);
        self.let_go.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a weak reference is held (a test's view of the allocation
    /// a KEK let go keeps until its reference is dropped).
    #[cfg(test)]
    pub(crate) fn holds_reference(&self) -> bool {
        !self.kek.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ptr_eq(&std::sync::Weak::new())
    }

    /// Counts one more call that opened the KEK without keeping it, and
    /// says whether that makes `times` since it was last kept.
    pub(crate) fn pass_over(&self, times: u32) -> bool {
        self.passed_over.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= times
    }

    fn passed_over(&self) -> u32 {
        self.passed_over.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What an [`OpenedKek`] holds.
#[derive(Debug)]
pub enum Kept {
    /// The KEK, still held by its backend's cache.
    Open(Arc<local::DekCipher>),
    /// A KEK the backend's cache has let go (or dropped with its version)
    /// since: that cache holds none for the version, as a rule (only
    /// another caller's call may have opened it again meanwhile).
    LetGo,
    /// Nothing was kept yet.
    Nothing,
}

impl Kept {
    /// The KEK, if it is still held.
    pub fn open(self) -> Option<Arc<local::DekCipher>> {
        match self {
            Kept::Open(cipher) => Some(cipher),
            _ => None,
        }
    }
}

impl std::fmt::Debug for OpenedKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenedKek(..)")
    }
}

/// Why a backend operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The payload failed authentication: wrong context, tampered ciphertext,
    /// or a ciphertext made under another version.
    #[error(
        "ciphertext authentication failed (wrong context or tampered ciphertext) for key {key:?} version {version}"
    )]
    AuthenticationFailed {
        /// Key name.
        key: String,
        /// Version.
        version: u32,
    },
    /// The stored material cannot be opened: a wrong root key or a corrupted
    /// store. Never a caller's fault.
    #[error("backend {backend:?} cannot open the material of key {key:?} version {version}: {reason}")]
    Material {
        /// Backend name.
        backend: String,
        /// Key name.
        key: String,
        /// Version.
        version: u32,
        /// Why (never key bytes).
        reason: String,
    },
    /// The backend keeps its keys inside (HSM, cloud KMS): export refused.
    #[error("backend {backend:?} does not allow exporting key material")]
    NotExportable {
        /// Backend name.
        backend: String,
    },
    /// The backend refused the operation because of the remote key's state
    /// (disabled, pending deletion) or its permissions.
    #[error("backend {backend:?}: {reason}")]
    Refused {
        /// Backend name.
        backend: String,
        /// What the backend said, naming the remote key.
        reason: String,
    },
    /// The operation does not apply to this backend (attaching material to
    /// the local backend, hierarchy mode on the local backend).
    #[error("backend {backend:?}: {reason}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// Imported material has the wrong shape.
    #[error("backend {backend:?} cannot import this material: {reason}")]
    BadImport {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// The backend cannot be reached.
    #[error("backend {backend:?} is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
}

impl BackendError {
    /// The kind of failure a caller sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::AuthenticationFailed { .. } => ErrorCode::FailedPrecondition,
            BackendError::Material { .. } => ErrorCode::Internal,
            BackendError::NotExportable { .. } => ErrorCode::FailedPrecondition,
            BackendError::BadImport { .. } => ErrorCode::InvalidArgument,
            BackendError::Refused { .. } => ErrorCode::FailedPrecondition,
            BackendError::Unsupported { .. } => ErrorCode::InvalidArgument,
            BackendError::Unavailable { .. } => ErrorCode::Unavailable,
        }
    }
}

impl BackendError {
    /// The error an application caller of the data plane sees. What a KMS
    /// or HSM said (principal and key ARNs, object labels) stays in the
    /// broker's log; the caller gets the code and a message naming the
    /// backend, the key and the version.
    pub fn for_caller(self, key: &str, version: u32) -> ServiceError {
        let (backend, what) = match &self {
            BackendError::AuthenticationFailed { .. } => return self.into(),
            BackendError::Unavailable { backend, .. } => (backend, "is unavailable"),
            BackendError::Refused { backend, .. } => (backend, "refused the operation"),
            BackendError::Material { backend, .. } => (backend, "cannot use the key material"),
            BackendError::NotExportable { backend } => (backend, "does not export key material"),
            BackendError::Unsupported { backend, .. } => (backend, "does not support the operation"),
            BackendError::BadImport { backend, .. } => (backend, "cannot import the material"),
        };
        tracing::warn!(key, version, error = %self, "backend call failed");
        ServiceError::new(
            self.code(),
            format!("backend {backend:?} {what} for key {key:?} version {version} (details in the broker's log)"),
        )
    }
}

impl From<BackendError> for ServiceError {
    fn from(err: BackendError) -> Self {
        ServiceError::new(err.code(), err.to_string())
    }
}

/// A place where KEK versions live and where wraps happen.
///
/// Implementations never log, return or format key material. Every remote
/// call is bounded by the backend's timeout and fails with `Unavailable`
/// naming the backend.
#[async_trait]
pub trait KeyBackend: Send + Sync + 'static {
    /// The name this backend has in the configuration.
    fn name(&self) -> &str;

    /// The backend type (`local`, `aws-kms`, `pkcs11`).
    fn kind(&self) -> &'static str;

    /// The payload algorithm of the envelopes this backend makes.
    fn algorithm(&self) -> Algorithm;

    /// Whether [`KeyBackend::export`] can succeed.
    fn exportable(&self) -> bool;

    /// Whether [`KeyBackend::import`] can succeed.
    fn importable(&self) -> bool {
        self.exportable()
    }

    /// What the backend has done.
    fn stats(&self) -> &BackendStats;

    /// Creates the material of a new version and returns its reference.
    /// Returns `Unavailable` when the backend cannot be reached.
    async fn create_version(&self, key: &str, version: u32) -> Result<BackendRef, BackendError>;

    /// Creates the key that seals the root key (`create-remote-key`), named
    /// for people by `label`, apart from every data key's material.
    async fn create_root_key(&self, label: &str) -> Result<BackendRef, BackendError> {
        self.create_version(label, 1).await
    }

    /// Uses material the operator brings (a KMS key ARN, an HSM object
    /// label) as a version. Returns `Refused` when it does not exist or is
    /// unusable, `Unsupported` for the local backend.
    async fn attach(&self, key: &str, version: u32, backend_key_id: &str) -> Result<BackendRef, BackendError>;

    /// The backend's own name for a version's material (ARN, label), for
    /// display; empty when it has none.
    fn backend_key_id(&self, reference: &BackendRef) -> String;

    /// Encrypts `plaintext` bound to `aad` under the version and appends the
    /// payload to `out`. Returns `Material` when the version's material
    /// cannot be opened, `Refused` when the remote key refuses, and
    /// `Unavailable` when the backend is down.
    async fn wrap(
        &self,
        version: VersionRef<'_>,
        plaintext: &[u8],
        aad: Aad<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError>;

    /// Wraps every item under the version, each after the same `header`
    /// (one key and version): each result is `header || payload`. A batch
    /// calls it once per run of items of one key; the local backend opens
    /// the KEK once for all of them.
    async fn wrap_many(
        &self,
        version: VersionRef<'_>,
        header: &[u8],
        items: &[WrapItem<'_>],
    ) -> Vec<Result<Vec<u8>, BackendError>> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let mut out = Vec::with_capacity(header.len() + item.plaintext.len() + 64);
            out.extend_from_slice(header);
            let aad = Aad { header, context: item.context };
            results.push(self.wrap(version, item.plaintext, aad, &mut out).await.map(|()| out));
        }
        results
    }

    /// Decrypts a payload made by [`KeyBackend::wrap`]. Returns
    /// `AuthenticationFailed` when the payload or `aad` were altered or
    /// belong to another version, and the errors of `wrap` otherwise.
    async fn unwrap(
        &self,
        version: VersionRef<'_>,
        payload: &[u8],
        aad: Aad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError>;

    /// Returns the raw KEK of a version, for migration and backup. Returns
    /// `NotExportable` when the backend keeps keys inside.
    async fn export(&self, version: VersionRef<'_>) -> Result<Zeroizing<Vec<u8>>, BackendError>;

    /// Stores raw KEK material (32 bytes) as a version of this backend and
    /// returns its reference. Returns `BadImport` when the material has the
    /// wrong size and `NotExportable` when the backend cannot take material.
    async fn import(&self, key: &str, version: u32, material: &[u8]) -> Result<BackendRef, BackendError>;

    /// Erases a version's material where the backend holds it (a KMS key is
    /// scheduled for deletion), and forgets any cached copy.
    async fn destroy_version(&self, version: VersionRef<'_>) -> Result<(), BackendError>;

    /// Checks that the backend can serve. Returns `Unavailable` otherwise.
    async fn health(&self) -> Result<(), BackendError>;
}

/// The configured backends, by name, and their hierarchy-mode wrappers.
#[derive(Clone, Default)]
pub struct Backends {
    by_name: BTreeMap<String, Arc<dyn KeyBackend>>,
    hierarchy: BTreeMap<String, Arc<dyn KeyBackend>>,
}

impl Backends {
    /// Adds a backend under its own name, behind a circuit breaker
    /// ([`guarded::GuardedBackend`]).
    pub fn insert(&mut self, backend: Arc<dyn KeyBackend>) {
        self.by_name.insert(backend.name().to_owned(), Arc::new(guarded::GuardedBackend::new(backend)));
    }

    /// Adds the hierarchy-mode wrapper of the backend `name`, behind a
    /// circuit breaker.
    pub fn insert_hierarchy(&mut self, name: &str, wrapper: Arc<dyn KeyBackend>) {
        self.hierarchy.insert(name.to_owned(), Arc::new(guarded::GuardedBackend::new(wrapper)));
    }

    /// The backend that serves versions of `mode` held by backend `name`.
    pub fn get_mode(&self, name: &str, mode: KeyMode) -> Result<&Arc<dyn KeyBackend>, ServiceError> {
        match mode {
            KeyMode::Direct => self.get(name),
            KeyMode::Hierarchy => self.hierarchy.get(name).ok_or_else(|| {
                if self.by_name.contains_key(name) {
                    ServiceError::invalid(format!(
                        "backend {name:?} has no hierarchy mode (only remote backends, aws-kms and pkcs11, do)"
                    ))
                } else {
                    ServiceError::precondition(format!("backend {name:?} is not configured on this broker"))
                }
            }),
        }
    }

    /// The backend called `name`, or `FAILED_PRECONDITION` naming it (a key
    /// that refers to a backend removed from the configuration).
    pub fn get(&self, name: &str) -> Result<&Arc<dyn KeyBackend>, ServiceError> {
        self.by_name
            .get(name)
            .ok_or_else(|| ServiceError::precondition(format!("backend {name:?} is not configured on this broker")))
    }

    /// Whether a backend of that name is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every backend, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<dyn KeyBackend>)> {
        self.by_name.iter()
    }
}
