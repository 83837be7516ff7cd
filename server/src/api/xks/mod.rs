//! The AWS KMS External Key Store proxy API, version 1: an HTTPS listener
//! (HTTP/1.1; TLS 1.2 or 1.3 with the specification's cipher suites;
//! optional mTLS restricted to configured subject names) serving
//! `POST [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/{metadata,encrypt,decrypt}`
//! and `POST [/<prefix>]/kms/xks/v1/health`. Every request is SigV4-signed
//! (service `kms-xks-proxy`) with a credential of its path prefix (two at
//! once for rotation). An `externalKeyId` is a keybroker key name; its
//! versions stay invisible to AWS: the `ciphertextMetadata` of every
//! ciphertext names the version that made it, so a rotated or migrated key
//! keeps decrypting. Optionally the request's `awsPrincipalArn` is
//! authorized by the policy (identity `aws:<arn>`: Encrypt as Wrap, Decrypt
//! as Unwrap, GetKeyMetadata as GetKey). Every call is audited with its
//! request metadata; plaintext is never logged.

pub mod sigv4;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use zeroize::Zeroizing;

use crate::config::Environment;
use crate::core::broker::{Broker, GCM_NONCE_LEN, GCM_TAG_LEN, OpenFailure};
use crate::error::{ErrorCode, ServiceError};
use crate::security::audit::{AuditLog, Record};
use crate::security::identity::{Identity, IdentityKind, Peer, Transport};
use crate::security::policy::{Gate, Rpc};
use sigv4::Credential;

/// `[xks]`: the XKS proxy API listener.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XksConfig {
    /// Address of the HTTPS listener.
    pub listen: SocketAddr,
    /// PEM server certificate chain (AWS KMS requires a public CA's).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA of client certificates: set to require mTLS (AWS KMS presents
    /// `CN=cks.kms.<region>.amazonaws.com`).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the subject common names admitted.
    #[serde(default)]
    pub client_cns: Vec<String>,
    /// Path prefixes (the part of `XksProxyUriPath` before `/kms/xks/v1`)
    /// and the SigV4 credentials of each.
    pub prefixes: Vec<XksPrefix>,
    /// Authorize each request's `awsPrincipalArn` (`aws:<arn>` in
    /// `[policy.identities]`) for the key: Encrypt as Wrap, Decrypt as
    /// Unwrap, GetKeyMetadata as GetKey.
    #[serde(default)]
    pub authorize_principals: bool,
    /// Largest distance between a request's X-Amz-Date and the server's
    /// clock, in seconds.
    #[serde(default = "default_skew")]
    pub max_skew_seconds: i64,
}

fn default_skew() -> i64 {
    300
}

/// One path prefix and the credentials that may sign for it.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XksPrefix {
    /// `""` or `/something` (letters, digits, `/`, `-`, `_`).
    #[serde(default)]
    pub path: String,
    /// One or two credentials (two while rotating).
    pub credentials: Vec<XksCredential>,
    /// Requests per second this prefix may make (a burst of one second's
    /// worth); more are answered ThrottlingException. 0: no quota.
    #[serde(default)]
    pub requests_per_second: u32,
}

/// A SigV4 credential; the secret comes from a file or a variable.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XksCredential {
    /// 20-30 characters of A-Z and 2-7.
    pub access_key_id: String,
    /// File holding the secret access key (mode 0600).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Environment variable holding the secret access key.
    #[serde(default)]
    pub secret_access_key_env: Option<String>,
}

/// The XKS names of errors, with their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum XksError {
    Validation,
    InvalidState,
    InvalidCiphertext,
    InvalidKeyUsage,
    AuthenticationFailed,
    AccessDenied,
    KeyNotFound,
    InvalidUriPath,
    Throttling,
    UnsupportedOperation,
    DependencyTimeout,
    Internal,
}

impl XksError {
    /// The status and `errorName`.
    pub fn parts(self) -> (StatusCode, &'static str) {
        match self {
            XksError::Validation => (StatusCode::BAD_REQUEST, "ValidationException"),
            XksError::InvalidState => (StatusCode::BAD_REQUEST, "InvalidStateException"),
            XksError::InvalidCiphertext => (StatusCode::BAD_REQUEST, "InvalidCiphertextException"),
            XksError::InvalidKeyUsage => (StatusCode::BAD_REQUEST, "InvalidKeyUsageException"),
            XksError::AuthenticationFailed => (StatusCode::UNAUTHORIZED, "AuthenticationFailedException"),
            XksError::AccessDenied => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            XksError::KeyNotFound => (StatusCode::NOT_FOUND, "KeyNotFoundException"),
            XksError::InvalidUriPath => (StatusCode::NOT_FOUND, "InvalidUriPathException"),
            XksError::Throttling => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
            XksError::UnsupportedOperation => (StatusCode::NOT_IMPLEMENTED, "UnsupportedOperationException"),
            XksError::DependencyTimeout => (StatusCode::SERVICE_UNAVAILABLE, "DependencyTimeoutException"),
            XksError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalException"),
        }
    }

    /// The XKS error for a keybroker error.
    fn of(err: &ServiceError) -> Self {
        match err.code() {
            ErrorCode::NotFound => XksError::KeyNotFound,
            ErrorCode::FailedPrecondition => XksError::InvalidState,
            ErrorCode::InvalidArgument => XksError::Validation,
            ErrorCode::PermissionDenied => XksError::AccessDenied,
            ErrorCode::ResourceExhausted => XksError::Throttling,
            ErrorCode::Unavailable => XksError::DependencyTimeout,
            ErrorCode::Unimplemented => XksError::InvalidKeyUsage,
            _ => XksError::Internal,
        }
    }
}

/// An error answer: status, name, and a printable-ASCII message under 512
/// characters.
struct Failure(XksError, String);

impl Failure {
    fn of(err: &ServiceError) -> Self {
        Failure(XksError::of(err), err.message().to_owned())
    }
}

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Plaintext and ciphertext sizes the specification requires.
const MAX_DATA: usize = 4300;
/// Additional authenticated data size the specification requires.
const MAX_AAD: usize = 8192;
/// The version of the metadata format: `[1, version (u32 BE)]`.
const METADATA_FORMAT: u8 = 1;

struct Prefix {
    path: String,
    credentials: Vec<Credential>,
    quota: Option<governor::DefaultDirectRateLimiter>,
    quota_setting: u32,
}

/// What the XKS front door works with.
pub struct XksService {
    broker: Arc<Broker>,
    gate: Arc<Gate>,
    audit: Arc<AuditLog>,
    prefixes: Vec<Prefix>,
    authorize: bool,
    max_skew: time::Duration,
}

impl std::fmt::Debug for XksService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksService").field("prefixes", &self.prefixes.len()).finish_non_exhaustive()
    }
}

fn valid_prefix(path: &str) -> bool {
    path.is_empty()
        || (path.starts_with('/')
            && !path.ends_with('/')
            && path.len() <= 128
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_')))
}

fn valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

impl XksService {
    /// The service of `config`; secrets are read now. Every problem names
    /// the setting.
    pub fn new(
        config: &XksConfig,
        env: &Environment,
        broker: Arc<Broker>,
        gate: Arc<Gate>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, String> {
        let mut prefixes = Vec::new();
        for p in &config.prefixes {
            if !valid_prefix(&p.path) {
                return Err(format!("xks.prefixes.path {:?}: \"\" or /segments of A-Z a-z 0-9 - _", p.path));
            }
            if p.credentials.is_empty() {
                return Err(format!("xks.prefixes {:?}: no credentials", p.path));
            }
            let mut credentials = Vec::new();
            for c in &p.credentials {
                if !valid_access_key_id(&c.access_key_id) {
                    return Err(format!(
                        "xks.prefixes.credentials.access_key_id {:?}: 20-30 characters of A-Z and 2-7",
                        c.access_key_id
                    ));
                }
                let secret = match (&c.secret_access_key_file, &c.secret_access_key_env) {
                    (Some(file), None) => crate::backend::root_key::read_private_file(file)
                        .map(|s| Zeroizing::new(s.trim().to_owned()))
                        .map_err(|e| {
                            format!("xks.prefixes.credentials.secret_access_key_file: {}: {e}", file.display())
                        })?,
                    (None, Some(var)) => env.get_any(var).ok_or_else(|| {
                        format!("xks.prefixes.credentials.secret_access_key_env: variable {var} is not set")
                    })?,
                    _ => {
                        return Err(format!(
                            "xks credential {:?}: give secret_access_key_file or secret_access_key_env",
                            c.access_key_id
                        ));
                    }
                };
                if secret.len() < 43 {
                    return Err(format!(
                        "xks credential {:?}: the secret access key needs at least 256 bits (43+ base64 characters)",
                        c.access_key_id
                    ));
                }
                credentials.push(Credential { access_key_id: c.access_key_id.clone(), secret });
            }
            let quota = std::num::NonZeroU32::new(p.requests_per_second)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)));
            prefixes.push(Prefix { path: p.path.clone(), credentials, quota, quota_setting: p.requests_per_second });
        }
        // Longest prefix first, so /a/b is not taken for /a.
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.path.len()));
        Ok(Self {
            broker,
            gate,
            audit,
            prefixes,
            authorize: config.authorize_principals,
            max_skew: time::Duration::seconds(config.max_skew_seconds),
        })
    }
}

/// What a path names.
enum Route<'a> {
    Health,
    Key { id: &'a str, op: Op },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Metadata,
    Encrypt,
    Decrypt,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Metadata => "XksGetKeyMetadata",
            Op::Encrypt => "XksEncrypt",
            Op::Decrypt => "XksDecrypt",
        }
    }

    fn rpc(self) -> Rpc {
        match self {
            Op::Metadata => Rpc::GetKey,
            Op::Encrypt => Rpc::Wrap,
            Op::Decrypt => Rpc::Unwrap,
        }
    }
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl XksService {
    fn route<'a>(&self, path: &'a str) -> Option<(&Prefix, Route<'a>)> {
        for prefix in &self.prefixes {
            let Some(rest) = path.strip_prefix(prefix.path.as_str()).and_then(|r| r.strip_prefix("/kms/xks/v1/"))
            else {
                continue;
            };
            if rest == "health" {
                return Some((prefix, Route::Health));
            }
            let mut parts = rest.split('/');
            let (Some("keys"), Some(id), Some(op), None) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            let op = match op {
                "metadata" => Op::Metadata,
                "encrypt" => Op::Encrypt,
                "decrypt" => Op::Decrypt,
                _ => return None,
            };
            return valid_key_id(id).then_some((prefix, Route::Key { id, op }));
        }
        None
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestMetadata {
    #[serde(default)]
    aws_principal_arn: Option<String>,
    #[serde(default)]
    aws_source_vpc: Option<String>,
    #[serde(default)]
    aws_source_vpce: Option<String>,
    #[serde(default)]
    kms_key_arn: Option<String>,
    kms_operation: String,
    kms_request_id: String,
    #[serde(default)]
    kms_via_service: Option<String>,
}

impl RequestMetadata {
    /// The audit detail: every field of the request metadata.
    fn detail(&self) -> String {
        let mut parts =
            vec![format!("kmsRequestId={}", self.kms_request_id), format!("kmsOperation={}", self.kms_operation)];
        for (k, v) in [
            ("kmsKeyArn", &self.kms_key_arn),
            ("kmsViaService", &self.kms_via_service),
            ("awsSourceVpc", &self.aws_source_vpc),
            ("awsSourceVpce", &self.aws_source_vpce),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        }
        parts.join(" ")
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyRequest {
    request_metadata: RequestMetadata,
    #[serde(default)]
    plaintext: Option<String>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    ciphertext_metadata: Option<String>,
    #[serde(default)]
    encryption_algorithm: Option<String>,
    #[serde(default)]
    additional_authenticated_data: Option<String>,
    #[serde(default)]
    ciphertext_data_integrity_value_algorithm: Option<String>,
    #[serde(default)]
    initialization_vector: Option<String>,
    #[serde(default)]
    authentication_tag: Option<String>,
}

fn b64(field: &str, value: &Option<String>, required: bool, max: usize) -> Result<Option<Vec<u8>>, Failure> {
    match value {
        None if required => Err(Failure(XksError::Validation, format!("{field} is required"))),
        None => Ok(None),
        Some(text) => {
            let bytes =
                B64.decode(text).map_err(|_| Failure(XksError::Validation, format!("{field} is not valid Base64")))?;
            if bytes.len() > max {
                return Err(Failure(
                    XksError::UnsupportedOperation,
                    format!("{field} is {} bytes; this proxy accepts up to {max}", bytes.len()),
                ));
            }
            Ok(Some(bytes))
        }
    }
}

/// The AES-GCM additional data: the specification's
/// `len16(aad) || aad || len8(metadata) || metadata`.
fn gcm_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    out.extend_from_slice(&u16::try_from(aad.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(u8::try_from(metadata.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(metadata);
    out
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn error_response(failure: &Failure) -> Response<Full<Bytes>> {
    let (status, name) = failure.0.parts();
    let message: String = failure.1.chars().filter(|c| (' '..='~').contains(c)).take(500).collect();
    json(status, &serde_json::json!({ "errorName": name, "errorMessage": message }))
}

impl XksService {
    /// Answers one HTTP request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = std::time::Instant::now();
        let path = request.uri().path().to_owned();
        let Some((prefix, route)) = self.route(&path) else {
            return error_response(&Failure(XksError::InvalidUriPath, format!("no XKS API at {path}")));
        };
        if request.method() != Method::POST {
            let mut response = error_response(&Failure(XksError::Validation, "use POST".to_owned()));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response.headers_mut().insert("allow", hyper::header::HeaderValue::from_static("POST"));
            return response;
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return error_response(&Failure(
                    XksError::UnsupportedOperation,
                    format!("the request body is larger than {MAX_BODY} bytes"),
                ));
            }
        };
        let header = |name: &str| -> Vec<String> {
            parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect()
        };
        let signed = sigv4::Signed {
            method: parts.method.as_str(),
            path: &path,
            query: parts.uri.query().unwrap_or(""),
            header: &header,
            body: &body,
        };
        let credential =
            match sigv4::verify(&signed, &prefix.credentials, time::OffsetDateTime::now_utc(), self.max_skew) {
                Ok(c) => c.access_key_id.clone(),
                Err(refused) => {
                    tracing::warn!(path = %path, reason = %refused.0, "XKS request refused: bad SigV4 signature");
                    return error_response(&Failure(XksError::AuthenticationFailed, refused.0));
                }
            };
        let caller = format!(
            "xks:{}{}",
            credential,
            if prefix.path.is_empty() { String::new() } else { format!("@{}", prefix.path) }
        );
        if let Some(quota) = &prefix.quota
            && quota.check().is_err()
        {
            return error_response(&Failure(
                XksError::Throttling,
                format!(
                    "path prefix {:?} is over its quota of {} requests per second",
                    prefix.path, prefix.quota_setting
                ),
            ));
        }
        let (result, record) = match route {
            Route::Health => (self.health(&body).await, None),
            Route::Key { id, op } => {
                let mut record = Record {
                    identity: caller.into(),
                    rpc: op.name(),
                    key: id.to_owned(),
                    count: 1,
                    ..Record::default()
                };
                let result = self.key_call(id, op, &body, &mut record).await;
                (result, Some(record))
            }
        };
        if let Some(mut record) = record {
            record.latency_us = started.elapsed().as_micros() as u64;
            if let Err(failure) = &result {
                let (_, name) = failure.0.parts();
                record.code = Some(match failure.0 {
                    XksError::KeyNotFound => ErrorCode::NotFound,
                    XksError::AccessDenied => ErrorCode::PermissionDenied,
                    XksError::InvalidState | XksError::InvalidCiphertext => ErrorCode::FailedPrecondition,
                    XksError::Validation | XksError::UnsupportedOperation => ErrorCode::InvalidArgument,
                    XksError::Throttling => ErrorCode::ResourceExhausted,
                    XksError::DependencyTimeout => ErrorCode::Unavailable,
                    XksError::InvalidKeyUsage => ErrorCode::Unimplemented,
                    _ => ErrorCode::Internal,
                });
                record.detail = format!("{name}: {} {}", failure.1, record.detail);
            }
            if let Err(err) = self.audit.record(record).await {
                return error_response(&Failure(XksError::DependencyTimeout, err.message().to_owned()));
            }
        }
        match result {
            Ok(value) => json(StatusCode::OK, &value),
            Err(failure) => error_response(&failure),
        }
    }

    async fn health(&self, body: &[u8]) -> Result<serde_json::Value, Failure> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Health {
            #[allow(dead_code)]
            request_metadata: HealthMetadata,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct HealthMetadata {
            #[allow(dead_code)]
            kms_request_id: String,
            #[allow(dead_code)]
            kms_operation: String,
        }
        serde_json::from_slice::<Health>(body)
            .map_err(|e| Failure(XksError::Validation, format!("invalid request body: {e}")))?;
        let backends = self.broker.keyring().backends();
        let mut details = Vec::new();
        for (name, backend) in backends.iter().take(10) {
            let status = if backend.health().await.is_ok() { "ACTIVE" } else { "UNAVAILABLE" };
            details.push(serde_json::json!({ "id": name, "model": format!("keybroker {} backend", backend.kind()), "healthStatus": status }));
        }
        Ok(serde_json::json!({
            "xksProxyFleetSize": 1,
            "xksProxyVendor": "keybroker",
            "xksProxyModel": format!("keybroker {}", env!("CARGO_PKG_VERSION")),
            "ekmVendor": "keybroker",
            "ekmFleetDetails": details,
        }))
    }

    async fn key_call(&self, id: &str, op: Op, body: &[u8], record: &mut Record) -> Result<serde_json::Value, Failure> {
        let request: KeyRequest = serde_json::from_slice(body)
            .map_err(|e| Failure(XksError::Validation, format!("invalid request body: {e}")))?;
        let meta = &request.request_metadata;
        record.detail = meta.detail();
        let principal = meta
            .aws_principal_arn
            .clone()
            .ok_or_else(|| Failure(XksError::Validation, "requestMetadata.awsPrincipalArn is required".to_owned()))?;
        record.detail = format!("awsPrincipalArn={principal} {}", record.detail);
        if op != Op::Metadata && meta.kms_key_arn.is_none() {
            return Err(Failure(XksError::Validation, "requestMetadata.kmsKeyArn is required".to_owned()));
        }
        if self.authorize {
            let peer = Peer::new(vec![Identity::new(IdentityKind::Aws, principal.clone())], Transport::Xks);
            if let Err(err) = self.gate.check(&peer, op.rpc(), id) {
                tracing::info!(principal = %principal, key = id, kms_operation = %meta.kms_operation, "XKS request denied by the policy");
                return Err(Failure::of(&err));
            }
        }
        if op != Op::Metadata && request.encryption_algorithm.as_deref() != Some("AES_GCM") {
            return Err(Failure(XksError::Validation, "encryptionAlgorithm must be AES_GCM".to_owned()));
        }
        match op {
            Op::Metadata => {
                let key = self.broker.keyring().key(id).await.map_err(|e| Failure::of(&e))?;
                let current = key.current().map_err(|e| Failure::of(&e))?;
                record.version = current.version;
                record.backend = current.backend.clone();
                let enabled = current.state == crate::store::VersionState::Active;
                Ok(serde_json::json!({
                    "keySpec": "AES_256",
                    "keyUsage": ["ENCRYPT", "DECRYPT"],
                    "keyStatus": if enabled { "ENABLED" } else { "DISABLED" },
                }))
            }
            Op::Encrypt => {
                let plaintext =
                    Zeroizing::new(b64("plaintext", &request.plaintext, true, MAX_DATA)?.unwrap_or_default());
                let aad = b64("additionalAuthenticatedData", &request.additional_authenticated_data, false, MAX_AAD)?;
                let cdiv = match request.ciphertext_data_integrity_value_algorithm.as_deref() {
                    None => false,
                    Some("SHA_256") => true,
                    Some(other) => {
                        return Err(Failure(
                            XksError::Validation,
                            format!("ciphertextDataIntegrityValueAlgorithm {other:?} is not SHA_256"),
                        ));
                    }
                };
                // The metadata names the version that seals, and is bound
                // into the additional data.
                let metadata_of = |version: u32| {
                    let mut metadata = vec![METADATA_FORMAT];
                    metadata.extend_from_slice(&version.to_be_bytes());
                    metadata
                };
                let aad = aad.unwrap_or_default();
                let sealed = self
                    .broker
                    .seal_detached(id, &plaintext, |version| gcm_aad(&aad, &metadata_of(version)))
                    .await
                    .map_err(|e| Failure::of(&e))?;
                let metadata = metadata_of(sealed.version);
                record.version = sealed.version;
                record.backend = sealed.backend.clone();
                let p = &sealed.payload;
                let (iv, rest) = p.split_at(GCM_NONCE_LEN);
                let (ciphertext, tag) = rest.split_at(rest.len() - GCM_TAG_LEN);
                let mut response = serde_json::json!({
                    "ciphertext": B64.encode(ciphertext),
                    "ciphertextMetadata": B64.encode(&metadata),
                    "initializationVector": B64.encode(iv),
                    "authenticationTag": B64.encode(tag),
                });
                if cdiv {
                    // SHA-256 over aad || metadata || iv || ciphertext || tag
                    // (Appendix C).
                    let mut hash = sha2::Sha256::new();
                    for part in [aad.as_slice(), &metadata, iv, ciphertext, tag] {
                        hash.update(part);
                    }
                    response["ciphertextDataIntegrityValue"] = serde_json::Value::String(B64.encode(hash.finalize()));
                }
                Ok(response)
            }
            Op::Decrypt => {
                let ciphertext = b64("ciphertext", &request.ciphertext, true, MAX_DATA)?.unwrap_or_default();
                let aad = b64("additionalAuthenticatedData", &request.additional_authenticated_data, false, MAX_AAD)?;
                let iv = b64("initializationVector", &request.initialization_vector, true, 16)?.unwrap_or_default();
                let tag = b64("authenticationTag", &request.authentication_tag, true, 16)?.unwrap_or_default();
                let metadata = b64("ciphertextMetadata", &request.ciphertext_metadata, false, 20)?.unwrap_or_default();
                if iv.len() != 12 && iv.len() != 16 {
                    return Err(Failure(
                        XksError::Validation,
                        "initializationVector must be 12 or 16 bytes".to_owned(),
                    ));
                }
                if tag.len() != GCM_TAG_LEN {
                    return Err(Failure(XksError::Validation, "authenticationTag must be 16 bytes".to_owned()));
                }
                // keybroker makes 12-byte IVs and always writes metadata.
                let version = match metadata[..] {
                    [METADATA_FORMAT, a, b, c, d] if iv.len() == GCM_NONCE_LEN => u32::from_be_bytes([a, b, c, d]),
                    _ => {
                        return Err(Failure(
                            XksError::InvalidCiphertext,
                            "the ciphertext metadata or IV was not made by this proxy".to_owned(),
                        ));
                    }
                };
                record.version = version;
                let mut payload = iv.clone();
                payload.extend_from_slice(&ciphertext);
                payload.extend_from_slice(&tag);
                let aad = aad.unwrap_or_default();
                match self.broker.open_detached(id, version, &payload, &gcm_aad(&aad, &metadata)).await {
                    Ok((plaintext, backend)) => {
                        record.backend = backend;
                        Ok(serde_json::json!({ "plaintext": B64.encode(plaintext.as_slice()) }))
                    }
                    Err(OpenFailure::Authentication) => Err(Failure(
                        XksError::InvalidCiphertext,
                        "the ciphertext, IV, tag, metadata or additional authenticated data does not authenticate"
                            .to_owned(),
                    )),
                    Err(OpenFailure::Service(err)) if err.code() == ErrorCode::NotFound => {
                        // The key exists but not that version: a forged metadata.
                        match self.broker.keyring().key(id).await {
                            Ok(_) => {
                                Err(Failure(XksError::InvalidCiphertext, format!("no version {version} of this key")))
                            }
                            Err(e) => Err(Failure::of(&e)),
                        }
                    }
                    Err(OpenFailure::Service(err)) => Err(Failure::of(&err)),
                }
            }
        }
    }
}

/// The TLS configuration of the XKS listener: TLS 1.2 and 1.3 with the
/// specification's cipher suites, HTTP/1.1, optional client certificates.
pub fn tls_config(config: &XksConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let provider = Arc::new(provider);
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("invalid setting `xks.cert`: {}: {e}", config.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| format!("invalid setting `xks.key`: {}: {e}", config.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("invalid setting `xks.client_ca`: {}: {e}", ca.display()))?
            {
                roots.add(cert).map_err(|e| format!("invalid setting `xks.client_ca`: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| format!("xks.cert and xks.key: {e}"))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// Serves the XKS API on `listener` until the process ends.
pub fn serve(
    service: Arc<XksService>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    client_cns: Vec<String>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, service, client_cns) = (acceptor.clone(), service.clone(), client_cns.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::warn!(%remote, %err, "XKS TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                if !client_cns.is_empty() {
                    let cn = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|der| crate::security::identity::certificate_identities(der, &[IdentityKind::Cn]))
                        .unwrap_or_default();
                    if !cn.iter().any(|i| client_cns.iter().any(|allowed| i.to_string() == format!("cn:{allowed}"))) {
                        tracing::warn!(%remote, "XKS client certificate has a subject name not in xks.client_cns");
                        return;
                    }
                }
                let svc = hyper::service::service_fn(move |request| {
                    let service = service.clone();
                    async move { Ok::<_, std::convert::Infallible>(service.handle(request).await) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%remote, %err, "XKS connection ended");
                }
            });
        }
    });
}
