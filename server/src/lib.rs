//! keybroker: a gRPC key broker for envelope encryption.
//!
//! The folder tree is the architecture: [`envelope`] (ciphertext format),
//! [`backend`] (where KEKs live, one file per backend), [`store`] (the
//! version table, one file per database), [`keyring`] (cache + key lifecycle
//! rules), [`broker`] (data-plane operations), [`service`] (gRPC), [`tls`]
//! and [`auth`] (mTLS and roles), [`config`], [`error`] (the one mapping to
//! gRPC codes), [`server`] (assembly), [`dev`] (`keybroker dev`).

pub mod auth;
pub mod backend;
pub mod backup;
pub mod broker;
pub mod config;
pub mod dev;
pub mod envelope;
pub mod error;
pub mod keyring;
pub mod listener;
pub mod migration;
pub mod offline;
pub mod rewrap;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
