//! End-to-end tests of the real `keybroker` binary. One behaviour per file;
//! one test binary, so the suite links once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod access_policy;
mod audit_log;
mod automatic_rotation;
mod backend_conformance;
mod backend_material_identity;
mod backends_in_the_broker;
mod blob_encryption;
mod client_examples;
mod client_library;
mod configuration_reference;
mod crash_recovery;
mod deploy_files;
mod errors_and_limits;
mod fleet_jobs;
mod fleet_propagation;
mod generated_code_is_fresh;
mod grpcurl_reflection;
mod helm_chart;
mod live_migration;
mod load_limits;
mod mtls_identity;
mod no_secrets_in_logs;
mod observability;
mod offline_tools;
mod polyglot_clients;
mod readme_config_examples;
mod readme_walkthrough;
mod retiring_versions;
mod rewrap_pass;
mod rotation_and_lifecycle;
mod serve_configuration;
mod store_conformance;
mod tampering_is_rejected;
mod wrap_unwrap;
mod xks_proxy;
