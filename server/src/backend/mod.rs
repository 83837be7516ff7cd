//! Where KEK material lives. Every backend implements [`KeyBackend`]; a key
//! version records which backend holds it and an opaque [`BackendRef`] that
//! backend gave out, so versions of one key may live in different backends.

pub mod local;
pub mod root_key;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::envelope::Algorithm;
use crate::error::{ErrorCode, ServiceError};

/// What a backend needs to find a version's material: for `local`, the KEK
/// sealed under the root key; for AWS KMS, a key ARN; for PKCS#11, an object
/// label. Opaque to everyone but the backend; its Debug is redacted.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BackendRef(pub Vec<u8>);

impl std::fmt::Debug for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendRef(<{} bytes>)", self.0.len())
    }
}

/// One key version as a backend sees it.
#[derive(Debug, Clone, Copy)]
pub struct VersionRef<'a> {
    /// Key name.
    pub key: &'a str,
    /// Version number.
    pub version: u32,
    /// What the backend returned from `create_version` or `import`.
    pub reference: &'a BackendRef,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
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
            BackendError::Unavailable { .. } => ErrorCode::Unavailable,
        }
    }
}

impl From<BackendError> for ServiceError {
    fn from(err: BackendError) -> Self {
        ServiceError::new(err.code(), err.to_string())
    }
}

/// A place where KEK versions live and where wraps happen.
///
/// Implementations never log, return or format key material.
#[async_trait]
pub trait KeyBackend: Send + Sync + 'static {
    /// The name this backend has in the configuration.
    fn name(&self) -> &str;

    /// The backend type (`local`, `aws-kms`, `pkcs11`).
    fn kind(&self) -> &'static str;

    /// The payload algorithm of the envelopes this backend makes.
    fn algorithm(&self) -> Algorithm;

    /// Creates the material of a new version and returns its reference.
    /// Returns `Unavailable` when the backend cannot be reached.
    async fn create_version(&self, key: &str, version: u32) -> Result<BackendRef, BackendError>;

    /// Encrypts `plaintext` with `aad` under the version and appends the
    /// payload to `out`. Returns `Material` when the version's material
    /// cannot be opened and `Unavailable` when the backend is down.
    async fn wrap(
        &self,
        version: VersionRef<'_>,
        plaintext: &[u8],
        aad: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError>;

    /// Decrypts a payload made by [`KeyBackend::wrap`]. Returns
    /// `AuthenticationFailed` when the payload or `aad` were altered or
    /// belong to another version, `Material` and `Unavailable` as `wrap`.
    async fn unwrap(
        &self,
        version: VersionRef<'_>,
        payload: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackendError>;

    /// Returns the raw KEK of a version, for migration and backup. Returns
    /// `NotExportable` when the backend keeps keys inside.
    async fn export(&self, version: VersionRef<'_>) -> Result<Zeroizing<Vec<u8>>, BackendError>;

    /// Stores raw KEK material as a version of this backend and returns its
    /// reference. Returns `BadImport` when the material has the wrong size.
    async fn import(&self, key: &str, version: u32, material: &[u8]) -> Result<BackendRef, BackendError>;

    /// Erases a version's material where the backend holds it, and forgets
    /// any cached copy. The caller erases the reference.
    async fn destroy_version(&self, version: VersionRef<'_>) -> Result<(), BackendError>;

    /// Checks that the backend can serve. Returns `Unavailable` otherwise.
    async fn health(&self) -> Result<(), BackendError>;
}

/// The configured backends, by name.
#[derive(Clone, Default)]
pub struct Backends {
    by_name: BTreeMap<String, Arc<dyn KeyBackend>>,
}

impl Backends {
    /// Adds a backend under its own name.
    pub fn insert(&mut self, backend: Arc<dyn KeyBackend>) {
        self.by_name.insert(backend.name().to_owned(), backend);
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
