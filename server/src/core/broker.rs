//! The data plane: Wrap, Unwrap, GenerateDataKey and Rewrap, independent of
//! gRPC so that single and batch RPCs share one code path.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::Rng;
use zeroize::Zeroizing;

use crate::backend::{Aad, WrapItem};
use crate::config::LimitsConfig;
use crate::core::envelope::{self, write_header};
use crate::core::keyring::{CachedKey, Count, Keyring, check_key_name};
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::store::VersionRecord;

/// Context keys keybroker reserves for itself (the AWS KMS backend adds
/// `keybroker:header`).
pub const RESERVED_CONTEXT_PREFIX: &str = "keybroker:";

/// A DEK's length when GenerateDataKey is asked for length 0.
pub const DEFAULT_DEK_LEN: usize = 32;

/// Whether opening a ciphertext counts as a use of its key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Counted,
    NotCounted,
}

/// What [`Broker::wrap_run`] made: the version and backend of the run, and
/// each item's ciphertext or error, in the items' order.
#[derive(Debug)]
pub struct WrappedRun {
    /// Version the run wrapped under.
    pub version: u32,
    /// Its backend.
    pub backend: String,
    /// Per item.
    pub ciphertexts: Vec<ServiceResult<Vec<u8>>>,
}

/// A ciphertext and the key version that made it.
#[derive(Debug, Clone)]
pub struct Wrapped {
    /// The envelope.
    pub ciphertext: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Key version.
    pub version: u32,
    /// Backend holding the version.
    pub backend: String,
}

/// A plaintext and where it came from. The plaintext is zeroized on drop.
pub struct Unwrapped {
    /// The DEK.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Key name.
    pub key: String,
    /// Key version the ciphertext was made with.
    pub version: u32,
    /// Whether a newer version is current.
    pub rewrap_advised: bool,
    /// Backend holding the version.
    pub backend: String,
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field("key", &self.key)
            .field("version", &self.version)
            .field("plaintext", &"<redacted>")
            .finish()
    }
}

/// The data-plane operations over a keyring.
pub struct Broker {
    keyring: Arc<Keyring>,
    limits: LimitsConfig,
}

impl Broker {
    /// A broker over `keyring`, enforcing `limits`.
    pub fn new(keyring: Arc<Keyring>, limits: LimitsConfig) -> Self {
        Self { keyring, limits }
    }

    /// The keyring.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// The limits.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    fn check_context(&self, context: &BTreeMap<String, String>) -> ServiceResult<()> {
        if let Some(reserved) = context.keys().find(|k| k.starts_with(RESERVED_CONTEXT_PREFIX)) {
            return Err(ServiceError::invalid(format!(
                "encryption context key {reserved:?} is reserved (keys starting with {RESERVED_CONTEXT_PREFIX:?})"
            )));
        }
        let len = envelope::context_len(context);
        if len > self.limits.max_context_bytes {
            return Err(ServiceError::invalid(format!(
                "encryption context is {len} bytes encoded; the limit is {} (limits.max_context_bytes)",
                self.limits.max_context_bytes
            )));
        }
        Ok(())
    }

    /// Wraps `plaintext` under the current version of `key`.
    pub async fn wrap(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> ServiceResult<Wrapped> {
        self.wrap_as(key, plaintext, context, Some(Count::Wraps)).await
    }

    /// Wraps without counting a DEK (a health probe's round trip).
    pub async fn wrap_uncounted(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> ServiceResult<Wrapped> {
        self.wrap_as(key, plaintext, context, None).await
    }

    /// Unwraps without counting a use of the version (a health probe).
    pub async fn unwrap_uncounted(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> ServiceResult<Unwrapped> {
        self.open(ciphertext, context, Usage::NotCounted).await.map(|(unwrapped, _)| unwrapped)
    }

    /// Wraps, counting the new DEK under the version as `count` (a wrap,
    /// or a rewrap into it; none for a probe).
    async fn wrap_as(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
        count: Option<Count>,
    ) -> ServiceResult<Wrapped> {
        self.check_plaintext(plaintext)?;
        self.check_context(context)?;
        check_key_name(key)?;
        let cached = self.keyring.key(key).await?;
        let current = cached.current_version()?;
        let made = cached.total(current, Count::Wraps) + cached.total(current, Count::RewrapsIn);
        if made >= self.limits.max_wraps_per_version {
            return Err(self.wraps_exhausted(key, current, made));
        }
        let backend = cached.backend(current, self.keyring.backends())?;
        let mut header = Vec::with_capacity(13 + key.len());
        write_header(&mut header, backend.algorithm(), key, current);
        let mut ciphertext = Vec::with_capacity(header.len() + plaintext.len() + 64);
        ciphertext.extend_from_slice(&header);
        let version = cached.version_ref(current)?;
        backend
            .wrap(version, plaintext, Aad { header: &header, context }, &mut ciphertext)
            .await
            .map_err(|e| e.for_caller(key, current))?;
        if let Some(count) = count {
            cached.count(current, count);
        }
        Ok(Wrapped { ciphertext, key: key.to_owned(), version: current, backend: backend.name().to_owned() })
    }

    /// Wraps a run of a batch's items under one key: the key, its current
    /// version, the header and the backend are resolved once, and the
    /// backend seals all of them in one call. An item over a limit gets its
    /// own error; the run fails as a whole only when the key does.
    pub async fn wrap_run(&self, key: &str, items: &[WrapItem<'_>]) -> ServiceResult<WrappedRun> {
        check_key_name(key)?;
        let cached = self.keyring.key(key).await?;
        let current = cached.current_version()?;
        let made = cached.total(current, Count::Wraps) + cached.total(current, Count::RewrapsIn);
        let mut room = self.limits.max_wraps_per_version.saturating_sub(made);
        let mut checked = Vec::with_capacity(items.len());
        let mut valid = Vec::with_capacity(items.len());
        for item in items {
            let check = self.check_plaintext(item.plaintext).and_then(|()| self.check_context(item.context));
            let check = check.and_then(|()| match room {
                0 => Err(self.wraps_exhausted(key, current, made)),
                _ => {
                    room -= 1;
                    Ok(())
                }
            });
            if check.is_ok() {
                valid.push(*item);
            }
            checked.push(check);
        }
        let backend = cached.backend(current, self.keyring.backends())?;
        let mut header = Vec::with_capacity(13 + key.len());
        write_header(&mut header, backend.algorithm(), key, current);
        let version = cached.version_ref(current)?;
        let mut sealed = backend.wrap_many(version, &header, &valid).await.into_iter();
        let ciphertexts: Vec<ServiceResult<Vec<u8>>> = checked
            .into_iter()
            .map(|check| {
                check?;
                match sealed.next() {
                    Some(result) => result.map_err(|e| e.for_caller(key, current)),
                    None => Err(ServiceError::internal(format!(
                        "backend {:?} answered fewer items than it was given for key {key:?} version {current}",
                        backend.name()
                    ))),
                }
            })
            .collect();
        let wrapped = ciphertexts.iter().filter(|r| r.is_ok()).count();
        cached.count_n(current, Count::Wraps, wrapped as u64);
        Ok(WrappedRun { version: current, backend: backend.name().to_owned(), ciphertexts })
    }

    fn check_plaintext(&self, plaintext: &[u8]) -> ServiceResult<()> {
        if plaintext.is_empty() {
            return Err(ServiceError::invalid("plaintext is empty"));
        }
        if plaintext.len() > self.limits.max_plaintext_bytes {
            return Err(ServiceError::invalid(format!(
                "plaintext is {} bytes; the limit is {} (limits.max_plaintext_bytes)",
                plaintext.len(),
                self.limits.max_plaintext_bytes
            )));
        }
        Ok(())
    }

    fn wraps_exhausted(&self, key: &str, version: u32, made: u64) -> ServiceError {
        ServiceError::new(
            ErrorCode::ResourceExhausted,
            format!(
                "version {version} of key {key:?} has made {made} wraps, its limit (limits.max_wraps_per_version = {}): \
                 it refuses to wrap until the key rotates (automatically, or with Rotate)",
                self.limits.max_wraps_per_version
            ),
        )
    }

    /// Unwraps a ciphertext, routing by the (key, version) of its header
    /// through the version table.
    pub async fn unwrap(&self, ciphertext: &[u8], context: &BTreeMap<String, String>) -> ServiceResult<Unwrapped> {
        self.open(ciphertext, context, Usage::Counted).await.map(|(unwrapped, _)| unwrapped)
    }

    /// Opens a ciphertext; returns it with the cached key it was made under.
    /// `usage` says whether this is a use of the version (an application
    /// reading its data) or a move off it (Rewrap): only uses keep a version
    /// from being retired.
    async fn open(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        usage: Usage,
    ) -> ServiceResult<(Unwrapped, Arc<CachedKey>)> {
        self.check_context(context)?;
        let env = envelope::parse(ciphertext).map_err(|e| ServiceError::invalid(e.to_string()))?;
        let cached = self.keyring.key_for_version(env.key, env.version).await?;
        cached.unwrappable(env.version)?;
        let backend = cached.backend(env.version, self.keyring.backends())?;
        if backend.algorithm() != env.algorithm {
            return Err(ServiceError::invalid(format!(
                "ciphertext payload algorithm {:?} does not match version {} of key {:?} ({:?})",
                env.algorithm,
                env.version,
                env.key,
                backend.algorithm()
            )));
        }
        let version = cached.version_ref(env.version)?;
        let plaintext = backend
            .unwrap(version, env.payload, Aad { header: env.header, context })
            .await
            .map_err(|e| e.for_caller(env.key, env.version))?;
        if usage == Usage::Counted {
            cached.count_unwrap(env.version, crate::core::keyring::now());
        }
        let unwrapped = Unwrapped {
            plaintext,
            key: env.key.to_owned(),
            version: env.version,
            rewrap_advised: env.version != cached.record.current_version,
            backend: backend.name().to_owned(),
        };
        Ok((unwrapped, cached))
    }

    /// A fresh random DEK of `length` bytes (0 means 32) and its wrapped form.
    pub async fn generate_data_key(
        &self,
        key: &str,
        length: u32,
        context: &BTreeMap<String, String>,
    ) -> ServiceResult<(Zeroizing<Vec<u8>>, Wrapped)> {
        let length = if length == 0 { DEFAULT_DEK_LEN } else { length as usize };
        if length > self.limits.max_plaintext_bytes {
            return Err(ServiceError::invalid(format!(
                "data key length {length} is above the limit of {} bytes (limits.max_plaintext_bytes)",
                self.limits.max_plaintext_bytes
            )));
        }
        let mut dek = Zeroizing::new(vec![0u8; length]);
        rand::rng().fill_bytes(dek.as_mut_slice());
        let wrapped = self.wrap(key, &dek, context).await?;
        Ok((dek, wrapped))
    }

    /// Re-encrypts a ciphertext under the current version of its own key or
    /// of `target_key`; the DEK never leaves the broker.
    pub async fn rewrap(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        target_key: &str,
    ) -> ServiceResult<Wrapped> {
        // A rewrap moves data off its version: not a use that should keep the
        // version from being retired once the rewrap pass is done.
        let (unwrapped, source) = self.open(ciphertext, context, Usage::NotCounted).await?;
        let target = if target_key.is_empty() { unwrapped.key.as_str() } else { target_key };
        let wrapped = self.wrap_as(target, &unwrapped.plaintext, context, Some(Count::RewrapsIn)).await?;
        // The DEK moved off its version: one fewer outstanding there.
        source.count(unwrapped.version, Count::RewrapsOut);
        Ok(wrapped)
    }
}

/// A payload sealed by a version's backend with the caller's own additional
/// data: for front doors whose protocol carries the IV, ciphertext and tag
/// apart (the XKS proxy API). Only AES-256-GCM backends (local, pkcs11,
/// hierarchy mode) can: their payload is `nonce(12) || ciphertext || tag(16)`.
#[derive(Debug)]
pub struct Detached {
    /// The key version that sealed it.
    pub version: u32,
    /// Its backend.
    pub backend: String,
    /// `nonce || ciphertext || tag`.
    pub payload: Vec<u8>,
}

/// Why a detached open failed.
#[derive(Debug)]
pub enum OpenFailure {
    /// The payload, nonce, tag or additional data does not authenticate.
    Authentication,
    /// Anything else (unknown key, disabled version, backend down).
    Service(ServiceError),
}

impl From<ServiceError> for OpenFailure {
    fn from(err: ServiceError) -> Self {
        OpenFailure::Service(err)
    }
}

/// The payload shape of the AES-GCM backends.
pub const GCM_NONCE_LEN: usize = 12;
/// The tag length of the AES-GCM backends.
pub const GCM_TAG_LEN: usize = 16;

impl Broker {
    fn gcm_backend<'a>(
        &'a self,
        cached: &'a CachedKey,
        version: &VersionRecord,
    ) -> ServiceResult<&'a Arc<dyn crate::backend::KeyBackend>> {
        let b = cached.backend(version.version, self.keyring.backends())?;
        let backend = &version.backend;
        if version.mode == crate::store::KeyMode::Direct && b.kind() == "aws-kms" {
            return Err(ServiceError::new(
                ErrorCode::Unimplemented,
                format!(
                    "backend {backend:?} (aws-kms, direct mode) does not expose AES-GCM; use a local, pkcs11 or hierarchy-mode key"
                ),
            ));
        }
        Ok(b)
    }

    /// Seals `plaintext` under the current version of `key` with
    /// `aad_for(version)` as additional data (a protocol may bind the
    /// version); counted as a wrap.
    pub async fn seal_detached(
        &self,
        key: &str,
        plaintext: &[u8],
        aad_for: impl FnOnce(u32) -> Vec<u8>,
    ) -> ServiceResult<Detached> {
        check_key_name(key)?;
        let cached = self.keyring.key(key).await?;
        let current = cached.current()?;
        let backend = self.gcm_backend(&cached, current)?;
        let version = cached.version_ref(current.version)?;
        let context = BTreeMap::new();
        let aad = aad_for(current.version);
        let mut payload = Vec::with_capacity(plaintext.len() + GCM_NONCE_LEN + GCM_TAG_LEN);
        backend
            .wrap(version, plaintext, Aad { header: &aad, context: &context }, &mut payload)
            .await
            .map_err(|e| e.for_caller(key, current.version))?;
        cached.count(current.version, Count::Wraps);
        Ok(Detached { version: current.version, backend: backend.name().to_owned(), payload })
    }

    /// Opens a payload sealed by [`Broker::seal_detached`] under `version` of
    /// `key`; counted as an unwrap.
    pub async fn open_detached(
        &self,
        key: &str,
        version: u32,
        payload: &[u8],
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, String), OpenFailure> {
        check_key_name(key)?;
        let cached = self.keyring.key_for_version(key, version).await?;
        let record = cached.unwrappable(version)?;
        let backend = self.gcm_backend(&cached, record)?;
        let v = cached.version_ref(version)?;
        let context = BTreeMap::new();
        match backend.unwrap(v, payload, Aad { header: aad, context: &context }).await {
            Ok(plaintext) => {
                cached.count_unwrap(version, crate::core::keyring::now());
                Ok((plaintext, backend.name().to_owned()))
            }
            Err(crate::backend::BackendError::AuthenticationFailed { .. }) => Err(OpenFailure::Authentication),
            Err(e) => Err(OpenFailure::Service(e.for_caller(key, version))),
        }
    }
}
