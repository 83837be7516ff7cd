//! The front doors: each translates its protocol into `core` calls and
//! `core` errors back, and never reaches a backend or the store directly.
//! [`grpc`] serves `keybroker.v1` (KeyBroker, KeyAdmin); [`listener`] is
//! where connections come from (mTLS TCP, the sidecar's Unix socket);
//! [`xks`] serves the AWS KMS External Key Store proxy API; [`kms_v2`] the
//! Kubernetes KMS v2 plugin API.

pub mod grpc;
pub mod kms_v2;
pub mod listener;
pub mod xks;
