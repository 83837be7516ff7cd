//! The `aws-kms` backend: each key version is an AWS KMS key (created on
//! rotation, or an existing key ARN the operator attaches). Wrap and Unwrap
//! are KMS `Encrypt` / `Decrypt` with the caller's encryption context passed
//! through, plus the envelope header under `keybroker:header`, so KMS itself
//! enforces both. Key material never leaves KMS: export is refused.
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity, instance role). Every call is bounded by `timeout_ms`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType, Tag};
use base64::Engine;
use zeroize::Zeroizing;

use super::{
    AWS_HEADER_CONTEXT_KEY, Aad, BackendError, BackendRef, BackendStats, KeyBackend, VersionRef, with_timeout,
};
use crate::core::envelope::Algorithm;

/// Settings of an `aws-kms` backend.
#[derive(Debug, Clone)]
pub struct AwsKmsSettings {
    /// AWS region.
    pub region: String,
    /// Endpoint override (an emulator, a VPC endpoint).
    pub endpoint: Option<String>,
    /// Deadline of every KMS call.
    pub timeout: Duration,
}

/// The AWS KMS backend.
pub struct AwsKmsBackend {
    name: String,
    client: aws_sdk_kms::Client,
    timeout: Duration,
    stats: BackendStats,
}

impl std::fmt::Debug for AwsKmsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsBackend").field("name", &self.name).finish_non_exhaustive()
    }
}

impl AwsKmsBackend {
    /// A backend called `name`; loads credentials from the AWS chain.
    pub async fn new(name: impl Into<String>, settings: &AwsKmsSettings) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(settings.timeout.min(Duration::from_millis(500)))
            .operation_attempt_timeout(settings.timeout)
            .operation_timeout(settings.timeout)
            .build();
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
            .load()
            .await;
        let mut builder = aws_sdk_kms::config::Builder::from(&shared);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            name: name.into(),
            client: aws_sdk_kms::Client::from_conf(builder.build()),
            timeout: settings.timeout,
            stats: BackendStats::default(),
        }
    }

    fn arn(&self, reference: &[u8]) -> Result<String, BackendError> {
        String::from_utf8(reference.to_vec()).map_err(|_| BackendError::Material {
            backend: self.name.clone(),
            key: String::new(),
            version: 0,
            reason: "stored KMS key ARN is not UTF-8".to_owned(),
        })
    }

    /// Turns an SDK failure into a backend error that names the KMS key.
    fn error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        operation: &str,
        key_id: &str,
        version: Option<VersionRef<'_>>,
        err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    ) -> BackendError {
        let backend = self.name.clone();
        let SdkError::ServiceError(service) = &err else {
            return BackendError::Unavailable {
                backend,
                reason: format!("{operation} on {key_id}: {}", DisplayErrorContext(&err)),
            };
        };
        let code = service.err().code().unwrap_or("Unknown");
        let message = service.err().message().unwrap_or_default();
        match code {
            "InvalidCiphertextException" | "IncorrectKeyException" => BackendError::AuthenticationFailed {
                key: version.map(|v| v.key.to_owned()).unwrap_or_default(),
                version: version.map_or(0, |v| v.version),
            },
            "ThrottlingException"
            | "LimitExceededException"
            | "DependencyTimeoutException"
            | "KMSInternalException"
            | "KeyUnavailableException" => BackendError::Unavailable {
                backend,
                reason: format!("{operation} on {key_id}: {code} ({message}); retry with backoff"),
            },
            "AccessDeniedException" => BackendError::Refused {
                backend,
                reason: format!(
                    "AWS KMS denied {operation} on {key_id} (check the broker's IAM permissions): {message}"
                ),
            },
            "DisabledException" | "KMSInvalidStateException" => BackendError::Refused {
                backend,
                reason: format!("KMS key {key_id} is disabled or pending deletion ({code}): {message}"),
            },
            "NotFoundException" => {
                BackendError::Refused { backend, reason: format!("KMS key {key_id} does not exist ({message})") }
            }
            _ => BackendError::Unavailable { backend, reason: format!("{operation} on {key_id}: {code}: {message}") },
        }
    }

    fn encryption_context(aad: Aad<'_>) -> HashMap<String, String> {
        let mut context: HashMap<String, String> = aad.context.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        context.insert(AWS_HEADER_CONTEXT_KEY.to_owned(), base64::engine::general_purpose::STANDARD.encode(aad.header));
        context
    }
}

#[async_trait]
impl KeyBackend for AwsKmsBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "aws-kms"
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::AwsKms
    }

    fn exportable(&self) -> bool {
        false
    }

    fn stats(&self) -> &BackendStats {
        &self.stats
    }

    async fn create_version(&self, key: &str, version: u32) -> Result<BackendRef, BackendError> {
        self.stats.count_remote_call();
        let tag = |k: &str, v: String| Tag::builder().tag_key(k).tag_value(v).build();
        let tags = [tag("keybroker:key", key.to_owned()), tag("keybroker:version", version.to_string())]
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackendError::Unavailable { backend: self.name.clone(), reason: e.to_string() })?;
        let call = self
            .client
            .create_key()
            .description(format!("keybroker key {key} version {version}"))
            .key_usage(KeyUsageType::EncryptDecrypt)
            .key_spec(KeySpec::SymmetricDefault)
            .set_tags(Some(tags))
            .send();
        let out = with_timeout(&self.name, self.timeout, async {
            call.await.map_err(|e| self.error("CreateKey", "(new key)", None, e))
        })
        .await?;
        let arn = out.key_metadata().and_then(|m| m.arn()).ok_or_else(|| BackendError::Unavailable {
            backend: self.name.clone(),
            reason: "CreateKey returned no key ARN".to_owned(),
        })?;
        Ok(BackendRef(arn.as_bytes().to_vec()))
    }

    async fn attach(&self, _key: &str, _version: u32, backend_key_id: &str) -> Result<BackendRef, BackendError> {
        self.stats.count_remote_call();
        let call = self.client.describe_key().key_id(backend_key_id).send();
        let out = with_timeout(&self.name, self.timeout, async {
            call.await.map_err(|e| self.error("DescribeKey", backend_key_id, None, e))
        })
        .await?;
        let meta = out.key_metadata().ok_or_else(|| BackendError::Refused {
            backend: self.name.clone(),
            reason: format!("KMS key {backend_key_id} has no metadata"),
        })?;
        if meta.key_usage() != Some(&KeyUsageType::EncryptDecrypt)
            || meta.key_spec() != Some(&KeySpec::SymmetricDefault)
        {
            return Err(BackendError::Refused {
                backend: self.name.clone(),
                reason: format!("KMS key {backend_key_id} is not a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key"),
            });
        }
        if meta.key_state() != Some(&KeyState::Enabled) {
            return Err(BackendError::Refused {
                backend: self.name.clone(),
                reason: format!("KMS key {backend_key_id} is not enabled"),
            });
        }
        Ok(BackendRef(meta.arn().unwrap_or(backend_key_id).as_bytes().to_vec()))
    }

    fn backend_key_id(&self, reference: &BackendRef) -> String {
        String::from_utf8_lossy(&reference.0).into_owned()
    }

    async fn wrap(
        &self,
        version: VersionRef<'_>,
        plaintext: &[u8],
        aad: Aad<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let arn = self.arn(version.reference)?;
        self.stats.count_remote_call();
        let call = self
            .client
            .encrypt()
            .key_id(&arn)
            .plaintext(Blob::new(plaintext))
            .set_encryption_context(Some(Self::encryption_context(aad)))
            .send();
        let result = with_timeout(&self.name, self.timeout, async {
            call.await.map_err(|e| self.error("Encrypt", &arn, Some(version), e))
        })
        .await?;
        let blob = result.ciphertext_blob().ok_or_else(|| BackendError::Unavailable {
            backend: self.name.clone(),
            reason: format!("Encrypt on {arn} returned no ciphertext"),
        })?;
        out.extend_from_slice(blob.as_ref());
        Ok(())
    }

    async fn unwrap(
        &self,
        version: VersionRef<'_>,
        payload: &[u8],
        aad: Aad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let arn = self.arn(version.reference)?;
        self.stats.count_remote_call();
        let call = self
            .client
            .decrypt()
            .key_id(&arn)
            .ciphertext_blob(Blob::new(payload))
            .set_encryption_context(Some(Self::encryption_context(aad)))
            .send();
        let result = with_timeout(&self.name, self.timeout, async {
            call.await.map_err(|e| self.error("Decrypt", &arn, Some(version), e))
        })
        .await?;
        let plaintext = result.plaintext.ok_or_else(|| BackendError::Unavailable {
            backend: self.name.clone(),
            reason: format!("Decrypt on {arn} returned no plaintext"),
        })?;
        Ok(Zeroizing::new(plaintext.into_inner()))
    }

    async fn export(&self, _version: VersionRef<'_>) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        Err(BackendError::NotExportable { backend: self.name.clone() })
    }

    async fn import(&self, _key: &str, _version: u32, _material: &[u8]) -> Result<BackendRef, BackendError> {
        Err(BackendError::NotExportable { backend: self.name.clone() })
    }

    async fn destroy_version(&self, version: VersionRef<'_>) -> Result<(), BackendError> {
        let arn = self.arn(version.reference)?;
        if arn.is_empty() {
            return Ok(());
        }
        self.stats.count_remote_call();
        // KMS never deletes at once: the shortest waiting period is 7 days.
        // The bare key id (after "key/") names the key as well as its ARN,
        // and also works with emulators that only look keys up by id.
        let key_id = arn.rsplit_once(":key/").map_or(arn.as_str(), |(_, id)| id);
        let call = self.client.schedule_key_deletion().key_id(key_id).pending_window_in_days(7).send();
        with_timeout(&self.name, self.timeout, async {
            call.await.map(|_| ()).map_err(|e| self.error("ScheduleKeyDeletion", &arn, Some(version), e))
        })
        .await
    }

    async fn health(&self) -> Result<(), BackendError> {
        self.stats.count_remote_call();
        let call = self.client.list_keys().limit(1).send();
        with_timeout(&self.name, self.timeout, async {
            call.await.map(|_| ()).map_err(|e| self.error("ListKeys", "(health check)", None, e))
        })
        .await
    }
}
