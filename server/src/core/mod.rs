//! What every front door calls: the ciphertext [`envelope`], the data plane
//! ([`broker`]), the cached version table and the key lifecycle
//! ([`keyring`]), live [`migration`] between backends, and the copying of
//! keys between version tables ([`copy`]) that offline migration and
//! restore share.

pub mod broker;
pub mod copy;
pub mod envelope;
pub mod keyring;
pub mod migration;
