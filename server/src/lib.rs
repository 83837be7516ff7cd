//! keybroker: a gRPC key broker for envelope encryption.
//!
//! The folder tree is the architecture, from the door inward: [`api`] (the
//! front doors: gRPC, and where connections come from), [`core`] (envelope,
//! data plane, cached version table and key lifecycle, migration),
//! [`backend`] (where KEKs live, one file per backend), [`store`] (the
//! version table, one file per database), [`security`] (mTLS, identities
//! and roles, policy, audit, limits), [`telemetry`] (logs, traces,
//! metrics), [`tools`] (commands that do not serve); then [`config`],
//! [`error`] (the one mapping to gRPC codes), [`material`] and [`breaker`]
//! (what backends and stores share) and [`server`] (assembly).

pub mod api;
pub mod backend;
pub mod breaker;
pub mod config;
pub mod core;
pub mod error;
pub mod material;
pub mod security;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tools;
