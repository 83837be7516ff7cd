//! What the backends and the version table both speak of, below both: how
//! a version holds its material ([`KeyMode`]) and the backend's opaque
//! reference to it ([`BackendRef`]).

/// What a backend needs to find a version's material: for `local`, the KEK
/// sealed under the root key; for AWS KMS, a key ARN; for PKCS#11, the object's
/// CKA_ID (`id:<hex>`). Opaque to everyone but the backend; its Debug is
/// redacted.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BackendRef(pub Vec<u8>);

impl std::fmt::Debug for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendRef(<{} bytes>)", self.0.len())
    }
}

/// How a version holds its material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyMode {
    /// Wraps happen inside the backend.
    #[default]
    Direct,
    /// A keybroker-generated KEK sealed by the backend; wraps happen locally.
    Hierarchy,
}

impl KeyMode {
    /// The name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Direct => "direct",
            KeyMode::Hierarchy => "hierarchy",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(KeyMode::Direct),
            "hierarchy" => Some(KeyMode::Hierarchy),
            _ => None,
        }
    }
}
