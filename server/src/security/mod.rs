//! Who may call, over what: mTLS and the dev PKI ([`tls`]), and the
//! caller's identity and roles ([`identity`]).

pub mod identity;
pub mod tls;
