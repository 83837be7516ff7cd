//! The `pkcs11` backend: any PKCS#11 HSM through `cryptoki`. Each key version
//! is a token object: a sensitive, non-extractable AES-256 key labelled
//! `keybroker:<key>:v<version>` for people, and found by a random 16-byte
//! CKA_ID that its backend reference records (`id:<hex>`): labels are not
//! unique on a token, IDs this backend makes are. It never creates an object
//! whose label exists already, never finds a version by a label that two
//! objects share, and the root key's sealing object lives under its own
//! label prefix (`keybroker-root:`), apart from every data key. Wrap and
//! Unwrap are CKM_AES_GCM inside the HSM (96-bit random nonce, 128-bit tag;
//! payload = nonce || ciphertext || tag, the same layout as the local
//! backend).
//!
//! PKCS#11 calls block, so they run on tokio's blocking pool, each bounded
//! by `timeout_ms`. Sessions are pooled (up to `sessions` at once), so
//! concurrent calls do not serialize on one session. When the token goes
//! away (removed, module error), the backend drops its context and
//! reconnects on a later call or health check: recovery needs no restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::Rng;
use zeroize::Zeroizing;

use super::local::open_payload;
use super::{Aad, BackendError, BackendRef, BackendStats, KeyBackend, VersionRef, with_timeout};
use crate::core::envelope::{Algorithm, GCM_NONCE_LEN, GCM_TAG_LEN};

/// Bytes of the random CKA_ID given to every object this backend makes.
const OBJECT_ID_LEN: usize = 16;
/// What a backend reference to an object's CKA_ID starts with.
const ID_PREFIX: &str = "id:";
/// Label prefix of the root key's sealing object (`create-remote-key`),
/// apart from the `keybroker:` labels of data keys.
pub const ROOT_LABEL_PREFIX: &str = "keybroker-root:";
/// Additional data of the round trip that checks imported material.
const IMPORT_CHECK_AAD: &[u8] = b"keybroker.pkcs11.import-check.v1";

/// Settings of a `pkcs11` backend.
#[derive(Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Token label to use (preferred: slot numbers change).
    pub token_label: Option<String>,
    /// Slot id, when no label is given.
    pub slot: Option<u64>,
    /// User PIN.
    pub pin: Zeroizing<String>,
    /// Most sessions open at once.
    pub sessions: usize,
    /// Deadline of every HSM call.
    pub timeout: Duration,
}

impl std::fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("slot", &self.slot)
            .field("pin", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why an operation inside a session failed.
enum OpError {
    /// A PKCS#11 call failed.
    Ck(&'static str, CkError),
    /// A failure the operation already classified.
    Backend(BackendError),
}

/// A connected token: the initialized module, its slot, and idle sessions.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    idle: Mutex<Vec<Session>>,
    /// Permits of sessions in use. A permit travels with the blocking call
    /// and is released when the call returns, not when its caller gives up
    /// waiting: a hung HSM cannot make the broker open sessions without bound.
    open: Arc<tokio::sync::Semaphore>,
    /// Object handles by backend reference.
    handles: Mutex<HashMap<Vec<u8>, ObjectHandle>>,
}

/// The PKCS#11 backend.
pub struct Pkcs11Backend {
    name: String,
    settings: Pkcs11Settings,
    token: Mutex<Option<Arc<Token>>>,
    /// When the last connection attempt failed, and why.
    last_failure: Mutex<Option<(Instant, String)>>,
    stats: BackendStats,
    sessions_opened: Arc<AtomicU64>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend").field("name", &self.name).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single take/put: a poisoned lock is consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a failed call shows that the token or module is gone.
fn token_lost(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::TokenNotPresent
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn,
            _
        )
    )
}

/// The label of a version's object.
pub fn object_label(key: &str, version: u32) -> String {
    format!("keybroker:{key}:v{version}")
}

/// How a backend reference names its object.
enum Locator {
    /// By CKA_ID: every object this backend made since IDs were introduced.
    Id(Vec<u8>),
    /// By label: references stored before, and operators' `attach` input.
    Label(Vec<u8>),
}

impl Locator {
    fn parse(reference: &[u8]) -> Self {
        match std::str::from_utf8(reference).ok().and_then(|s| s.strip_prefix(ID_PREFIX)) {
            Some(hex_id) => match hex::decode(hex_id) {
                Ok(id) if !id.is_empty() => Locator::Id(id),
                _ => Locator::Label(reference.to_vec()),
            },
            None => Locator::Label(reference.to_vec()),
        }
    }

    fn template(&self) -> Vec<Attribute> {
        let which = match self {
            Locator::Id(id) => Attribute::Id(id.clone()),
            Locator::Label(label) => Attribute::Label(label.clone()),
        };
        vec![Attribute::Class(ObjectClass::SECRET_KEY), which]
    }

    fn describe(&self) -> String {
        match self {
            Locator::Id(id) => format!("{ID_PREFIX}{}", hex::encode(id)),
            Locator::Label(label) => format!("label {:?}", String::from_utf8_lossy(label)),
        }
    }
}

/// The reference of an object with CKA_ID `id`.
fn id_reference(id: &[u8]) -> BackendRef {
    BackendRef(format!("{ID_PREFIX}{}", hex::encode(id)).into_bytes())
}

fn random_id() -> [u8; OBJECT_ID_LEN] {
    let mut id = [0u8; OBJECT_ID_LEN];
    rand::rng().fill_bytes(&mut id);
    id
}

impl Pkcs11Backend {
    /// A backend called `name`. It connects lazily: a missing token makes
    /// its keys `UNAVAILABLE`, not the broker fail to start.
    pub fn new(name: impl Into<String>, settings: Pkcs11Settings) -> Self {
        Self {
            name: name.into(),
            settings,
            token: Mutex::new(None),
            last_failure: Mutex::new(None),
            stats: BackendStats::default(),
            sessions_opened: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sessions opened on the token since this backend was made.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }

    fn unavailable(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Unavailable { backend: self.name.clone(), reason: reason.into() }
    }

    fn connect(&self) -> Result<Arc<Token>, BackendError> {
        // Held while connecting: calls that arrive together share one
        // connection instead of each initializing and logging in.
        let mut current = lock(&self.token);
        if let Some(token) = current.clone() {
            return Ok(token);
        }
        // Do not hammer a missing module or token: one attempt per 200 ms,
        // answering with the last failure in between.
        if let Some((at, why)) = lock(&self.last_failure).as_ref()
            && at.elapsed() < Duration::from_millis(200)
        {
            return Err(self.unavailable(format!("{why} (retrying)")));
        }
        match self.try_connect() {
            Ok(token) => {
                *current = Some(token.clone());
                Ok(token)
            }
            Err(err) => {
                if let BackendError::Unavailable { reason, .. } = &err {
                    *lock(&self.last_failure) = Some((Instant::now(), reason.clone()));
                }
                Err(err)
            }
        }
    }

    fn try_connect(&self) -> Result<Arc<Token>, BackendError> {
        let s = &self.settings;
        let ctx = Pkcs11::new(&s.module)
            .map_err(|e| self.unavailable(format!("loading module {}: {e}", s.module.display())))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(self.unavailable(format!("C_Initialize: {e}"))),
        }
        let slots = ctx.get_slots_with_token().map_err(|e| self.unavailable(format!("listing slots: {e}")))?;
        let slot = slots
            .into_iter()
            .find(|slot| match (&s.token_label, s.slot) {
                (Some(label), _) => ctx.get_token_info(*slot).is_ok_and(|info| info.label().trim() == label),
                (None, Some(id)) => slot.id() == id,
                (None, None) => false,
            })
            .ok_or_else(|| match &s.token_label {
                Some(label) => self.unavailable(format!("no token labelled {label:?}")),
                None => self.unavailable(format!("no token in slot {:?}", s.slot)),
            })?;
        let session = ctx.open_rw_session(slot).map_err(|e| self.unavailable(format!("opening a session: {e}")))?;
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
        match session.login(UserType::User, Some(&AuthPin::from(s.pin.as_str().to_owned()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => return Err(self.unavailable("login refused: wrong PIN")),
            Err(e) => return Err(self.unavailable(format!("login: {e}"))),
        }
        let token = Arc::new(Token {
            ctx,
            slot,
            idle: Mutex::new(vec![session]),
            open: Arc::new(tokio::sync::Semaphore::new(s.sessions.max(1))),
            handles: Mutex::new(HashMap::new()),
        });
        tracing::info!(backend = %self.name, "PKCS#11 token connected");
        Ok(token)
    }

    /// Forgets the connection, so the next call initializes the module again
    /// (a token that reappeared is only seen after re-initialization).
    fn disconnect(&self, why: &str) {
        if lock(&self.token).take().is_some() {
            tracing::warn!(backend = %self.name, error = %why, "PKCS#11 token lost; will reconnect");
        }
    }

    /// Runs `op` with a pooled session on the blocking pool, under the
    /// timeout. A PKCS#11 failure that shows the token is gone drops the
    /// connection.
    async fn run<T, F>(&self, op: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Token, &Session) -> Result<T, OpError> + Send + 'static,
    {
        self.stats.count_remote_call();
        let call = async {
            let token = self.connect()?;
            let permit =
                token.open.clone().acquire_owned().await.map_err(|_| self.unavailable("session pool closed"))?;
            let worker = token.clone();
            let opened = self.sessions_opened.clone();
            let result = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let session = match lock(&worker.idle).pop() {
                    Some(session) => session,
                    None => {
                        let session =
                            worker.ctx.open_rw_session(worker.slot).map_err(|e| OpError::Ck("C_OpenSession", e))?;
                        opened.fetch_add(1, Ordering::Relaxed);
                        session
                    }
                };
                let result = op(&worker, &session);
                lock(&worker.idle).push(session);
                result
            })
            .await
            .map_err(|e| self.unavailable(format!("HSM worker failed: {e}")))?;
            result.map_err(|e| match e {
                OpError::Backend(err) => err,
                // The token is gone: unavailable until it is back. Any other
                // PKCS#11 error is the HSM's answer to this call (SoftHSM, for
                // one, answers concurrent key generation with CKR_GENERAL_ERROR
                // now and then): the call fails, the backend is not down.
                OpError::Ck(what, err) if token_lost(&err) => {
                    self.disconnect(&err.to_string());
                    self.unavailable(format!("{what}: {err}"))
                }
                OpError::Ck(what, err) => {
                    BackendError::Refused { backend: self.name.clone(), reason: format!("{what}: {err}") }
                }
            })
        };
        with_timeout(&self.name, self.settings.timeout, call).await
    }

    /// The one object `reference` names, `None` when there is none. Two
    /// objects under one reference (a label shared by several objects) is
    /// an error: using or destroying either could be the wrong one.
    fn find(
        token: &Token,
        session: &Session,
        backend: &str,
        reference: &[u8],
    ) -> Result<Option<ObjectHandle>, OpError> {
        if let Some(handle) = lock(&token.handles).get(reference) {
            return Ok(Some(*handle));
        }
        let locator = Locator::parse(reference);
        let found = session.find_objects(&locator.template()).map_err(|e| OpError::Ck("C_FindObjects", e))?;
        match found.as_slice() {
            [] => Ok(None),
            [handle] => {
                lock(&token.handles).insert(reference.to_vec(), *handle);
                Ok(Some(*handle))
            }
            more => Err(OpError::Backend(BackendError::Refused {
                backend: backend.to_owned(),
                reason: format!("{} HSM objects match {}: refusing to pick one", more.len(), locator.describe()),
            })),
        }
    }

    fn find_version(
        token: &Token,
        session: &Session,
        backend: &str,
        key: &str,
        version: u32,
        reference: &[u8],
    ) -> Result<ObjectHandle, OpError> {
        Self::find(token, session, backend, reference)?.ok_or_else(|| {
            tracing::warn!(backend, key, version, object = %Locator::parse(reference).describe(),
                "the HSM object of a key version is missing");
            OpError::Backend(BackendError::Material {
                backend: backend.to_owned(),
                key: key.to_owned(),
                version,
                reason: "its HSM object is missing".to_owned(),
            })
        })
    }

    /// Refuses to create a second object labelled `label`.
    fn refuse_existing_label(session: &Session, backend: &str, label: &str) -> Result<(), OpError> {
        let found = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| OpError::Ck("C_FindObjects", e))?;
        if found.is_empty() {
            return Ok(());
        }
        Err(OpError::Backend(BackendError::Refused {
            backend: backend.to_owned(),
            reason: format!(
                "an HSM object labelled {label:?} exists already (left by a lost race, a crash or another broker \
                 on this token): not creating a second one; remove it after checking no key version uses it"
            ),
        }))
    }

    /// Generates a new AES-256 key object labelled `label` with a fresh
    /// CKA_ID, and returns its reference.
    async fn generate(&self, label: String) -> Result<BackendRef, BackendError> {
        let id = random_id();
        let backend = self.name.clone();
        let made = self
            .run(move |_, session| {
                Self::refuse_existing_label(session, &backend, &label)?;
                let mut template = Self::key_template(&label, &id);
                template.push(Attribute::ValueLen(32u64.into()));
                session.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| OpError::Ck("C_GenerateKey", e))
            })
            .await;
        self.abandon_on_timeout(&made, &id);
        made?;
        Ok(id_reference(&id))
    }

    /// When a call that may have created object `id` did not answer in
    /// time or failed part-way (PKCS#11 allows a failed call to have partly
    /// succeeded), the object, if the HSM made it after all, belongs to
    /// nobody: erase it once the HSM answers again, off the caller's path.
    fn abandon_on_timeout<T>(&self, result: &Result<T, BackendError>, id: &[u8]) {
        if !matches!(result, Err(BackendError::Unavailable { .. } | BackendError::Refused { .. })) {
            return;
        }
        let Some(token) = lock(&self.token).clone() else { return };
        let (id, backend) = (id.to_vec(), self.name.clone());
        tokio::spawn(async move {
            // Waits behind the call that timed out: it holds its permit until it returns.
            let Ok(permit) = token.open.clone().acquire_owned().await else { return };
            let _ = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let Ok(session) = token.ctx.open_rw_session(token.slot) else { return };
                let found = session.find_objects(&Locator::Id(id.clone()).template()).unwrap_or_default();
                for handle in found {
                    if session.destroy_object(handle).is_ok() {
                        tracing::info!(backend = %backend, object = %hex::encode(&id),
                            "erased an HSM object made by a call that timed out");
                    }
                }
            })
            .await;
        });
    }

    /// Whether the object `handle` holds `material`: it encrypts a random
    /// probe inside the HSM and the probe must open here under `material`.
    fn holds(session: &Session, handle: ObjectHandle, material: &[u8]) -> Result<bool, OpError> {
        let Some(cipher) = super::local::DekCipher::new(material) else {
            return Ok(false);
        };
        let mut probe = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(probe.as_mut_slice());
        let mut nonce = [0u8; GCM_NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut iv = nonce;
        let sealed = session
            .encrypt(&Mechanism::AesGcm(gcm_params(&mut iv, IMPORT_CHECK_AAD)?), handle, probe.as_slice())
            .map_err(|e| OpError::Ck("C_Encrypt", e))?;
        let mut payload = nonce.to_vec();
        payload.extend_from_slice(&sealed);
        Ok(open_payload(&cipher, &payload, IMPORT_CHECK_AAD)
            .is_some_and(|opened| opened.as_slice() == probe.as_slice()))
    }

    /// The CKA_ID of `handle` (empty when it has none).
    fn object_id(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, OpError> {
        let attributes = session
            .get_attributes(handle, &[cryptoki::object::AttributeType::Id])
            .map_err(|e| OpError::Ck("C_GetAttributeValue", e))?;
        Ok(attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::Id(id) => Some(id),
                _ => None,
            })
            .unwrap_or_default())
    }

    fn key_template(label: &str, id: &[u8]) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    }
}

fn gcm_params<'a>(nonce: &'a mut [u8], aad: &'a [u8]) -> Result<GcmParams<'a>, OpError> {
    GcmParams::new(nonce, aad, (GCM_TAG_LEN as u64 * 8).into()).map_err(|e| OpError::Ck("GCM parameters", e))
}

#[async_trait]
impl KeyBackend for Pkcs11Backend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::Aes256Gcm
    }

    fn exportable(&self) -> bool {
        false
    }

    fn importable(&self) -> bool {
        true
    }

    fn stats(&self) -> &BackendStats {
        &self.stats
    }

    async fn create_version(&self, key: &str, version: u32) -> Result<BackendRef, BackendError> {
        self.generate(object_label(key, version)).await
    }

    async fn create_root_key(&self, label: &str) -> Result<BackendRef, BackendError> {
        self.generate(format!("{ROOT_LABEL_PREFIX}{label}")).await
    }

    async fn attach(&self, _key: &str, _version: u32, backend_key_id: &str) -> Result<BackendRef, BackendError> {
        let given = backend_key_id.as_bytes().to_vec();
        let backend = self.name.clone();
        let id = self
            .run(move |token, session| {
                let handle = Self::find(token, session, &backend, &given)?.ok_or_else(|| {
                    OpError::Backend(BackendError::Refused {
                        backend: backend.clone(),
                        reason: format!("no secret key {} on the token", Locator::parse(&given).describe()),
                    })
                })?;
                let id = Self::object_id(session, handle)?;
                let sharing = if id.is_empty() {
                    0
                } else {
                    session
                        .find_objects(&Locator::Id(id.clone()).template())
                        .map_err(|e| OpError::Ck("C_FindObjects", e))?
                        .len()
                };
                if sharing != 1 {
                    return Err(OpError::Backend(BackendError::Refused {
                        backend: backend.clone(),
                        reason: format!(
                            "the secret key {} has {}: give it a CKA_ID no other key has, then attach it",
                            Locator::parse(&given).describe(),
                            if id.is_empty() {
                                "no CKA_ID".to_owned()
                            } else {
                                format!("a CKA_ID {sharing} keys share")
                            }
                        ),
                    }));
                }
                Ok(id)
            })
            .await?;
        Ok(id_reference(&id))
    }

    fn backend_key_id(&self, reference: &BackendRef) -> String {
        match Locator::parse(&reference.0) {
            Locator::Id(_) => String::from_utf8_lossy(&reference.0).into_owned(),
            Locator::Label(label) => String::from_utf8_lossy(&label).into_owned(),
        }
    }

    async fn wrap(
        &self,
        version: VersionRef<'_>,
        plaintext: &[u8],
        aad: Aad<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let (reference, key, v, backend) =
            (version.reference.to_vec(), version.key.to_owned(), version.version, self.name.clone());
        let aad = aad.bytes();
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let payload = self
            .run(move |token, session| {
                let handle = Self::find_version(token, session, &backend, &key, v, &reference)?;
                let mut nonce = [0u8; GCM_NONCE_LEN];
                rand::rng().fill_bytes(&mut nonce);
                let mut iv = nonce;
                let sealed = session
                    .encrypt(&Mechanism::AesGcm(gcm_params(&mut iv, &aad)?), handle, &plaintext)
                    .map_err(|e| OpError::Ck("C_Encrypt", e))?;
                let mut payload = nonce.to_vec();
                payload.extend_from_slice(&sealed);
                Ok(payload)
            })
            .await?;
        out.extend_from_slice(&payload);
        Ok(())
    }

    async fn unwrap(
        &self,
        version: VersionRef<'_>,
        payload: &[u8],
        aad: Aad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        if payload.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
            return Err(BackendError::AuthenticationFailed { key: version.key.to_owned(), version: version.version });
        }
        let (reference, key, v, backend) =
            (version.reference.to_vec(), version.key.to_owned(), version.version, self.name.clone());
        let aad = aad.bytes();
        let payload = payload.to_vec();
        self.run(move |token, session| {
            let handle = Self::find_version(token, session, &backend, &key, v, &reference)?;
            let (nonce, sealed) = payload.split_at(GCM_NONCE_LEN);
            let mut iv = nonce.to_vec();
            match session.decrypt(&Mechanism::AesGcm(gcm_params(&mut iv, &aad)?), handle, sealed) {
                Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                // SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR;
                // other modules use CKR_ENCRYPTED_DATA_INVALID.
                Err(CkError::Pkcs11(
                    RvError::GeneralError | RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Err(OpError::Backend(BackendError::AuthenticationFailed { key, version: v })),
                Err(e) => Err(OpError::Ck("C_Decrypt", e)),
            }
        })
        .await
    }

    async fn export(&self, _version: VersionRef<'_>) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        Err(BackendError::NotExportable { backend: self.name.clone() })
    }

    async fn import(&self, key: &str, version: u32, material: &[u8]) -> Result<BackendRef, BackendError> {
        if material.len() != 32 {
            return Err(BackendError::BadImport {
                backend: self.name.clone(),
                reason: format!("an AES-256 key is 32 bytes, got {}", material.len()),
            });
        }
        let label = object_label(key, version);
        let value = Zeroizing::new(material.to_vec());
        let backend = self.name.clone();
        let fresh = random_id();
        let imported = self
            .run(move |_, session| {
                // Importing again (a resumed migration) reuses an object
                // that holds the same material, and replaces nothing: an
                // object labelled so with other material is refused.
                let existing = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::Label(label.clone().into_bytes()),
                    ])
                    .map_err(|e| OpError::Ck("C_FindObjects", e))?;
                for handle in &existing {
                    let id = Self::object_id(session, *handle)?;
                    if !id.is_empty() && Self::holds(session, *handle, &value)? {
                        return Ok(id);
                    }
                }
                if !existing.is_empty() {
                    return Err(OpError::Backend(BackendError::Refused {
                        backend: backend.clone(),
                        reason: format!(
                            "an HSM object labelled {label:?} exists already with other material: not replacing it"
                        ),
                    }));
                }
                let id = fresh;
                let mut template = Self::key_template(&label, &id);
                template.push(Attribute::Value(value.to_vec()));
                let created = session.create_object(&template);
                for attribute in &mut template {
                    if let Attribute::Value(copy) = attribute {
                        zeroize::Zeroize::zeroize(copy);
                    }
                }
                let handle = created.map_err(|e| OpError::Ck("C_CreateObject", e))?;
                // The new object counts only once it is proven to hold the
                // material; otherwise it goes, and nothing else changed.
                if Self::holds(session, handle, &value)? {
                    Ok(id.to_vec())
                } else {
                    let _ = session.destroy_object(handle);
                    Err(OpError::Backend(BackendError::BadImport {
                        backend: backend.clone(),
                        reason: "the imported object does not round-trip the material".to_owned(),
                    }))
                }
            })
            .await;
        self.abandon_on_timeout(&imported, &fresh);
        Ok(id_reference(&imported?))
    }

    async fn destroy_version(&self, version: VersionRef<'_>) -> Result<(), BackendError> {
        let reference = version.reference.to_vec();
        if reference.is_empty() {
            return Ok(());
        }
        let backend = self.name.clone();
        self.run(move |token, session| {
            let handle = Self::find(token, session, &backend, &reference)?;
            lock(&token.handles).remove(&reference);
            match handle {
                Some(handle) => session.destroy_object(handle).map_err(|e| OpError::Ck("C_DestroyObject", e)),
                None => Ok(()),
            }
        })
        .await
    }

    async fn health(&self) -> Result<(), BackendError> {
        let result = self
            .run(|_, session| {
                let mut probe = [0u8; 1];
                session.generate_random_slice(&mut probe).map_err(|e| OpError::Ck("C_GenerateRandom", e))
            })
            .await;
        if let Err(err) = &result {
            self.disconnect(&err.to_string());
        }
        result
    }
}
