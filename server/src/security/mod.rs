//! Who may call, what they may do, and the record of it: mTLS and the dev
//! PKI ([`tls`]), typed caller identities ([`identity`]), per-key roles
//! ([`policy`]), the hash-chained audit log ([`audit`]), load shedding
//! ([`limits`]) and changes without a restart ([`reload`]).

pub mod audit;
pub mod identity;
pub mod limits;
pub mod policy;
pub mod reload;
pub mod tls;
