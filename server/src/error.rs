//! The one place where keybroker's errors become gRPC statuses.
//!
//! Every module has its own `thiserror` enum; each variant maps to one
//! [`ErrorCode`] of this small closed set, and [`ServiceError`] turns that into
//! a [`tonic::Status`]. Codes are never inferred from message text.

use tonic::{Code, Status};

/// The closed set of failure kinds a caller can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A key or version does not exist.
    NotFound,
    /// A key with that name exists already.
    AlreadyExists,
    /// The request itself is malformed: bad name, oversize input, malformed
    /// or truncated ciphertext, bad pattern.
    InvalidArgument,
    /// The request is well formed but the key's state refuses it: version
    /// disabled, destroyed or below `min_decryption_version`, or the
    /// ciphertext fails authentication (wrong context, tampering).
    FailedPrecondition,
    /// A compare-and-swap lost against a concurrent change.
    Aborted,
    /// The caller's identity may not do this.
    PermissionDenied,
    /// A backend or the store cannot be reached; retrying later may work.
    Unavailable,
    /// A limit was hit.
    ResourceExhausted,
    /// The RPC belongs to a part of keybroker not built yet.
    Unimplemented,
    /// A bug or a corrupted store; never carries key material.
    Internal,
}

impl ErrorCode {
    /// The gRPC code of this kind.
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }
}

/// An error on its way to a caller: a code and a message that names the key,
/// version, backend or setting involved, and never key material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    code: ErrorCode,
    message: String,
}

impl ServiceError {
    /// An error of kind `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The kind of this error.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message shown to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `NOT_FOUND` for an unknown key.
    pub fn key_not_found(key: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("key {key:?} not found"))
    }

    /// `INVALID_ARGUMENT`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// `FAILED_PRECONDITION`.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }

    /// `INTERNAL`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        Status::new(err.code.grpc(), err.message)
    }
}

/// A result whose error is a [`ServiceError`].
pub type ServiceResult<T> = Result<T, ServiceError>;
