//! `keybroker backup` / `keybroker restore`: an encrypted bundle of the
//! version table and the key material that is exportable (local keys); for
//! keys in a KMS or HSM, the bundle carries the reference (ARN, label), which
//! a restore into the same KMS account or HSM can use.
//!
//! Bundle layout (integers big endian):
//!
//! | offset | size | field                                                      |
//! |--------|------|------------------------------------------------------------|
//! | 0      | 6    | magic `KBBAK1`                                             |
//! | 6      | 1    | key source: 1 = Argon2id(passphrase), 2 = raw 32-byte key   |
//! | 7      | 16   | salt                                                       |
//! | 23     | 4    | Argon2 memory cost (KiB)                                   |
//! | 27     | 4    | Argon2 time cost                                           |
//! | 31     | 4    | Argon2 parallelism                                         |
//! | 35     | 12   | AES-GCM nonce                                              |
//! | 47     | ...  | AES-256-GCM ciphertext of the JSON body, then the tag      |
//!
//! The 47-byte header is the additional data, so no field can change. The
//! SHA-256 of the whole file is printed by `backup` and required by
//! `restore`, which checks it, decrypts, parses, and prepares every key
//! before it writes anything: a truncated or tampered bundle restores
//! nothing.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use zeroize::Zeroizing;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::backend::local::LocalBackend;
use crate::backend::root_key::RootKey;
use crate::backend::{Backends, VersionRef};
use crate::core::copy::{Side, commit, plan_copy};
use crate::store::{ConflictMode, KeyMode, KeyRecord, VersionRecord, VersionState};

const MAGIC: &[u8; 6] = b"KBBAK1";
const HEADER_LEN: usize = 47;
const FORMAT: &str = "keybroker-backup-v1";
/// Argon2id cost of a passphrase bundle: memory (KiB), passes, lanes. The
/// second recommended option of RFC 9106 (and OWASP's): 64 MiB, t = 3,
/// p = 4. A bundle holds every exportable KEK, so it gets at least that;
/// the parameters are in the authenticated header, so later bundles may
/// raise them and old ones still open.
pub const ARGON2_PARAMS: (u32, u32, u32) = (64 * 1024, 3, 4);

/// The secret a bundle is sealed under.
pub enum BundleKey {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
    /// 32 random bytes (base64 in a file).
    Raw(Zeroizing<[u8; 32]>),
}

impl BundleKey {
    /// Reads a passphrase file (first line) or a key file (base64 of 32 bytes).
    pub fn from_files(passphrase_file: Option<&Path>, key_file: Option<&Path>) -> Result<Self, String> {
        match (passphrase_file, key_file) {
            (Some(p), None) => {
                let text = Zeroizing::new(std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?);
                let line = text.lines().next().unwrap_or_default();
                if line.chars().count() < 12 {
                    return Err(format!("{}: a backup passphrase needs at least 12 characters", p.display()));
                }
                Ok(BundleKey::Passphrase(Zeroizing::new(line.to_owned())))
            }
            (None, Some(k)) => {
                let text = Zeroizing::new(std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?);
                let bytes = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map_err(|_| format!("{}: not base64", k.display()))?,
                );
                let key: [u8; 32] =
                    bytes.as_slice().try_into().map_err(|_| format!("{}: a backup key is 32 bytes", k.display()))?;
                Ok(BundleKey::Raw(Zeroizing::new(key)))
            }
            _ => Err("give exactly one of --passphrase-file and --key-file".to_owned()),
        }
    }

    fn derive(&self, salt: &[u8; 16], params: (u32, u32, u32)) -> Result<Zeroizing<[u8; 32]>, String> {
        match self {
            BundleKey::Raw(key) => Ok(key.clone()),
            BundleKey::Passphrase(p) => {
                let params = argon2::Params::new(params.0, params.1, params.2, Some(32)).map_err(|e| e.to_string())?;
                let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
                let mut out = Zeroizing::new([0u8; 32]);
                argon.hash_password_into(p.as_bytes(), salt, out.as_mut_slice()).map_err(|e| e.to_string())?;
                Ok(out)
            }
        }
    }

    fn source_id(&self) -> u8 {
        match self {
            BundleKey::Passphrase(_) => 1,
            BundleKey::Raw(_) => 2,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Body {
    format: String,
    created_at: i64,
    keys: Vec<BundledKey>,
}

#[derive(Serialize, Deserialize)]
struct BundledKey {
    name: String,
    backend: String,
    mode: String,
    current_version: u32,
    min_decryption_version: u32,
    deletion_allowed: bool,
    labels: BTreeMap<String, String>,
    rotation_period_secs: u64,
    max_wraps_per_version: u64,
    created_at: i64,
    versions: Vec<BundledVersion>,
}

#[derive(Serialize, Deserialize)]
struct BundledVersion {
    version: u32,
    state: String,
    backend: String,
    mode: String,
    created_at: i64,
    /// The KEK (base64), when the backend can export it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    material: Option<String>,
    /// The backend reference (base64), when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

impl Drop for BundledVersion {
    fn drop(&mut self) {
        // The base64 of a KEK is the KEK.
        if let Some(material) = &mut self.material {
            zeroize::Zeroize::zeroize(material);
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What a backup wrote.
#[derive(Debug)]
pub struct BackupReport {
    /// Keys in the bundle.
    pub keys: usize,
    /// Versions whose material is in the bundle.
    pub with_material: usize,
    /// Versions carried as references to a KMS / HSM.
    pub references: usize,
    /// SHA-256 of the bundle file, hex.
    pub sha256: String,
}

/// Writes an encrypted bundle of `side`'s keys to `out` (never overwrites).
pub async fn backup(side: &Side, out: &Path, key: &BundleKey) -> Result<BackupReport, String> {
    let records = side.store.load_all().await.map_err(|e| e.to_string())?;
    let (mut with_material, mut references) = (0, 0);
    let mut keys = Vec::new();
    for r in &records {
        let mut versions = Vec::new();
        for v in &r.versions {
            let (mut material, mut reference) = (None, None);
            if v.state != VersionState::Destroyed {
                let backend = side.backends.get_mode(&v.backend, v.mode).map_err(|e| e.to_string())?;
                if backend.exportable() {
                    let kek = backend
                        .export(VersionRef::new(&r.name, v.version, &v.backend_ref))
                        .await
                        .map_err(|e| e.to_string())?;
                    material = Some(b64(&kek));
                    with_material += 1;
                } else {
                    reference = Some(b64(&v.backend_ref.0));
                    references += 1;
                }
            }
            versions.push(BundledVersion {
                version: v.version,
                state: v.state.as_str().to_owned(),
                backend: v.backend.clone(),
                mode: v.mode.as_str().to_owned(),
                created_at: v.created_at,
                material,
                reference,
            });
        }
        keys.push(BundledKey {
            name: r.name.clone(),
            backend: r.backend.clone(),
            mode: r.mode.as_str().to_owned(),
            current_version: r.current_version,
            min_decryption_version: r.min_decryption_version,
            deletion_allowed: r.deletion_allowed,
            labels: r.labels.clone(),
            rotation_period_secs: r.rotation_period_secs,
            max_wraps_per_version: r.max_wraps_per_version,
            created_at: r.created_at,
            versions,
        });
    }
    let body = Zeroizing::new(
        serde_json::to_vec(&Body { format: FORMAT.to_owned(), created_at: crate::core::keyring::now(), keys })
            .map_err(|e| e.to_string())?,
    );
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut salt);
    rand::rng().fill_bytes(&mut nonce);
    let params = ARGON2_PARAMS;
    let mut bundle = Vec::with_capacity(HEADER_LEN + body.len() + 16);
    bundle.extend_from_slice(MAGIC);
    bundle.push(key.source_id());
    bundle.extend_from_slice(&salt);
    for p in [params.0, params.1, params.2] {
        bundle.extend_from_slice(&p.to_be_bytes());
    }
    bundle.extend_from_slice(&nonce);
    let cipher = Aes256Gcm::new(&(*key.derive(&salt, params)?).into());
    let sealed = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: &body, aad: &bundle[..HEADER_LEN] })
        .map_err(|_| "encryption failed".to_owned())?;
    bundle.extend_from_slice(&sealed);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    file.write_all(&bundle).and_then(|()| file.sync_all()).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(BackupReport { keys: records.len(), with_material, references, sha256: hex(&sha2::Sha256::digest(&bundle)) })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks and decrypts a bundle held in memory, and returns how many keys
/// it holds (for `cargo fuzz` and for tools that inspect a bundle). Errors
/// say what is wrong with it; nothing is written anywhere.
pub fn inspect_bundle(bundle: &[u8], key: &BundleKey) -> Result<usize, String> {
    open_bundle(bundle, key).map(|body| body.keys.len())
}

fn open_bundle(bundle: &[u8], key: &BundleKey) -> Result<Body, String> {
    const DAMAGED: &str = "the bundle is truncated or damaged";
    if bundle.len() < HEADER_LEN + 16 || &bundle[..6] != MAGIC {
        return Err(format!("{DAMAGED} (not a keybroker backup bundle)"));
    }
    if bundle[6] != key.source_id() {
        return Err("the bundle was sealed with the other kind of secret (passphrase vs key file)".to_owned());
    }
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&bundle[7..23]);
    let word = |at: usize| u32::from_be_bytes([bundle[at], bundle[at + 1], bundle[at + 2], bundle[at + 3]]);
    let params = (word(23), word(27), word(31));
    if params.0 > 4 * 1024 * 1024 || params.1 > 64 || params.2 > 64 {
        return Err(format!("{DAMAGED} (implausible key derivation parameters)"));
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bundle[35..47]);
    let cipher = Aes256Gcm::new(&(*key.derive(&salt, params)?).into());
    let body = Zeroizing::new(
        cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &bundle[HEADER_LEN..], aad: &bundle[..HEADER_LEN] })
            .map_err(|_| {
                "cannot decrypt the bundle: wrong passphrase or key, or the bundle was tampered with".to_owned()
            })?,
    );
    let body: Body = serde_json::from_slice(&body).map_err(|e| format!("{DAMAGED}: {e}"))?;
    if body.format != FORMAT {
        return Err(format!("unsupported bundle format {:?}", body.format));
    }
    Ok(body)
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Keys restored.
    pub restored: usize,
    /// Keys the target already had entirely (merge).
    pub skipped: usize,
}

/// Restores a bundle into `side`. Checks the SHA-256, decrypts, and checks
/// every key for conflicts before writing any.
pub async fn restore(
    side: &Side,
    bundle_path: &Path,
    expected_sha256: &str,
    key: &BundleKey,
    conflict: ConflictMode,
) -> Result<RestoreReport, String> {
    let bundle = std::fs::read(bundle_path).map_err(|e| format!("{}: {e}", bundle_path.display()))?;
    let actual = hex(&sha2::Sha256::digest(&bundle));
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(format!(
            "the bundle's SHA-256 is {actual}, not the expected {}: it was changed or truncated; nothing restored",
            expected_sha256.trim()
        ));
    }
    let body = open_bundle(&bundle, key)?;
    // Parse everything first.
    let mut prepared = Vec::new();
    for k in &body.keys {
        let bad = |what: &str| format!("the bundle holds an invalid {what} for key {:?}; nothing restored", k.name);
        let mut materials = BTreeMap::new();
        let mut versions = Vec::new();
        for v in &k.versions {
            let state = VersionState::parse(&v.state).ok_or_else(|| bad("version state"))?;
            let mode = KeyMode::parse(&v.mode).ok_or_else(|| bad("mode"))?;
            let decode = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| bad("base64 field"));
            let reference = match &v.reference {
                Some(r) => crate::backend::BackendRef(decode(r)?),
                None => Default::default(),
            };
            if let Some(m) = &v.material {
                materials.insert(v.version, Zeroizing::new(decode(m)?));
            }
            versions.push(VersionRecord::unused(v.version, state, v.backend.clone(), reference, mode, v.created_at));
        }
        let record = KeyRecord {
            name: k.name.clone(),
            backend: k.backend.clone(),
            mode: KeyMode::parse(&k.mode).ok_or_else(|| bad("mode"))?,
            current_version: k.current_version,
            min_decryption_version: k.min_decryption_version,
            deletion_allowed: k.deletion_allowed,
            labels: k.labels.clone(),
            rotation_period_secs: k.rotation_period_secs,
            max_wraps_per_version: k.max_wraps_per_version,
            created_at: k.created_at,
            updated_at: crate::core::keyring::now(),
            revision: 1,
            versions,
        };
        if conflict == ConflictMode::Fail && side.store.get(&record.name).await.map_err(|e| e.to_string())?.is_some() {
            return Err(format!(
                "key {:?} exists in the target (use --force to overwrite or --merge); nothing restored",
                record.name
            ));
        }
        prepared.push((record, materials));
    }
    // Then write. Bundled material is imported into an ephemeral local
    // backend (random in-memory root key) that plays the source: plan_copy
    // exports it, imports it into the target, and verifies both hold the
    // same key. References resolve in the target's backends of the same name.
    let mut ephemeral_root = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(ephemeral_root.as_mut_slice());
    let mut report = RestoreReport::default();
    let mut plans = Vec::new();
    for (mut record, materials) in prepared {
        let mut source = Backends::default();
        let names: BTreeSet<String> = record.versions.iter().map(|v| v.backend.clone()).collect();
        for name in &names {
            let bundled = record.versions.iter().any(|v| &v.backend == name && materials.contains_key(&v.version));
            if bundled {
                let root = RootKey::from_bytes(ephemeral_root.as_slice()).map_err(|e| e.to_string())?;
                source.insert(Arc::new(LocalBackend::new(name.clone(), root)));
            } else if let Ok(backend) = side.backends.get(name) {
                source.insert(backend.clone());
                if let Ok(h) = side.backends.get_mode(name, KeyMode::Hierarchy) {
                    source.insert_hierarchy(name, h.clone());
                }
            }
        }
        for v in record.versions.iter_mut() {
            if let Some(material) = materials.get(&v.version) {
                let local = source.get(&v.backend).map_err(|e| e.to_string())?;
                v.backend_ref = local.import(&record.name, v.version, material).await.map_err(|e| e.to_string())?;
                v.mode = KeyMode::Direct;
            }
        }
        let plan = plan_copy(&record, &source, side, conflict, false)
            .await
            .map_err(|e| format!("restoring key {:?}: {e}; nothing restored", record.name))?;
        if plan.write.is_none() {
            report.skipped += 1;
        } else {
            report.restored += 1;
        }
        plans.push(plan);
    }
    commit(side, &plans).await?;
    Ok(report)
}
