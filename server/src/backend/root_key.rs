//! The root key of the local backend: 32 bytes that seal every local KEK in
//! the store. Read from a file that only its owner may read (mode 0600), or
//! from `KEYBROKER_ROOT_KEY`; both hold the base64 of the 32 bytes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::local::DekCipher;
use base64::Engine;
use rand::Rng;
use zeroize::Zeroizing;

/// The name the root key's sealing key goes by in a remote backend; no
/// data key may take it.
pub const ROOT_KEY_NAME: &str = "keybroker-root-key";

/// Why a secret file could not be read.
#[derive(Debug)]
pub enum PrivateFileError {
    /// It cannot be read.
    Io(std::io::Error),
    /// Others than its owner may read or write it: the mode found.
    Permissions(u32),
}

impl std::fmt::Display for PrivateFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivateFileError::Io(e) => write!(f, "{e}"),
            PrivateFileError::Permissions(mode) => {
                write!(f, "it has mode {mode:o}: it must be readable by its owner only (chmod 600)")
            }
        }
    }
}

/// Reads a file that holds a secret (root key, HSM PIN) into a zeroized
/// buffer, refusing one that others than its owner may read or write.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<String>, PrivateFileError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(PrivateFileError::Io)?;
    let meta = file.metadata().map_err(PrivateFileError::Io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Permissions(mode));
    }
    // Sized up front, so the buffer is never reallocated (a reallocation
    // would leave a copy of the secret behind, not zeroized).
    let mut text = Zeroizing::new(String::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1));
    file.read_to_string(&mut text).map_err(PrivateFileError::Io)?;
    Ok(text)
}

/// Length of a root key in bytes.
pub const ROOT_KEY_LEN: usize = 32;

/// Why a root key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootKeyError {
    /// The file could not be read or written.
    #[error("root key file {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The file is readable by others than its owner.
    #[error("root key file {path} has mode {mode:o}: it must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The content is not the base64 of 32 bytes.
    #[error("root key from {source_name} is not the base64 of {ROOT_KEY_LEN} bytes")]
    Format {
        /// Which file or variable.
        source_name: String,
    },
    /// Neither a file nor the environment variable provides a root key.
    #[error("no root key: set root_key.file (KEYBROKER_ROOT_KEY__FILE) or KEYBROKER_ROOT_KEY")]
    Missing,
}

/// A loaded root key, as a ready cipher (AWS-LC's, like the opened KEKs'):
/// its key schedule is wiped on drop and never printed.
pub struct RootKey {
    cipher: DekCipher,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

impl RootKey {
    /// Reads a root key file, refusing one that group or others can access.
    pub fn from_file(path: &Path) -> Result<Self, RootKeyError> {
        let text = read_private_file(path).map_err(|e| match e {
            PrivateFileError::Io(cause) => RootKeyError::Io { path: path.to_owned(), cause },
            PrivateFileError::Permissions(mode) => RootKeyError::Permissions { path: path.to_owned(), mode },
        })?;
        Self::from_base64(&text, &path.display().to_string())
    }

    /// Decodes the base64 of 32 bytes; `source_name` names where it came from
    /// in the error.
    pub fn from_base64(text: &str, source_name: &str) -> Result<Self, RootKeyError> {
        let format = || RootKeyError::Format { source_name: source_name.to_owned() };
        let bytes =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|_| format())?);
        let key: &[u8; ROOT_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| format())?;
        Self::of(key).ok_or_else(format)
    }

    fn of(key: &[u8; ROOT_KEY_LEN]) -> Option<Self> {
        Some(Self { cipher: DekCipher::new(key)? })
    }

    /// A root key from its 32 raw bytes (as unsealed by a remote backend).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RootKeyError> {
        let format = || RootKeyError::Format { source_name: "the sealed root key".to_owned() };
        let key: &[u8; ROOT_KEY_LEN] = bytes.try_into().map_err(|_| format())?;
        Self::of(key).ok_or_else(format)
    }

    /// Writes a new random root key to `path` with mode 0600; fails if the
    /// file exists (a root key is never overwritten).
    pub fn generate_file(path: &Path) -> Result<(), RootKeyError> {
        let io = |cause| RootKeyError::Io { path: path.to_owned(), cause };
        let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut_slice());
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_slice()));
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The AES-256-GCM cipher of the root key.
    pub(crate) fn cipher(&self) -> &DekCipher {
        &self.cipher
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_file_is_private_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        RootKey::generate_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        RootKey::from_file(&path).unwrap();
        assert!(RootKey::generate_file(&path).is_err(), "an existing root key was overwritten");
    }

    #[test]
    fn refuses_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        RootKey::generate_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RootKey::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("644") && err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn refuses_wrong_lengths_without_echoing_the_value() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let err = RootKey::from_base64(&short, "KEYBROKER_ROOT_KEY").unwrap_err().to_string();
        assert!(err.contains("KEYBROKER_ROOT_KEY") && !err.contains(&short), "{err}");
        assert!(RootKey::from_base64("%%%", "x").is_err());
    }
}
