//! The client's error type: keeps the gRPC code and message of every broker
//! answer, so callers branch on codes, never on text.

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered with a gRPC error (after retries, when the code
    /// was `UNAVAILABLE`).
    #[error("keybroker answered {code:?}: {message}")]
    Status {
        /// The gRPC code.
        code: tonic::Code,
        /// The broker's message (names the key, version, backend or setting).
        message: String,
    },
    /// The connection could not be set up.
    #[error("cannot connect to keybroker at {endpoint}: {reason}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A blob or sidecar is malformed, truncated or was tampered with.
    #[error("invalid blob: {0}")]
    Blob(String),
    /// Reading or writing a blob stream failed.
    #[error("blob I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The gRPC code, when the broker answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the key or version does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    /// Whether the ciphertext failed authentication or the version refuses
    /// to unwrap (disabled, destroyed, below min_decryption_version).
    pub fn is_failed_precondition(&self) -> bool {
        self.code() == Some(tonic::Code::FailedPrecondition)
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status { code: status.code(), message: status.message().to_owned() }
    }
}

/// A result whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
