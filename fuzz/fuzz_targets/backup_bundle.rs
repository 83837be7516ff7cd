//! The backup bundle reader.
//!
//! Under a fixed raw key (a passphrase bundle is refused before its
//! Argon2id would run): any bytes are refused with a message or open; never
//! a panic.
#![no_main]

use keybroker_server::tools::backup::{BundleKey, inspect_bundle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = BundleKey::Raw(zeroize::Zeroizing::new([7u8; 32]));
    let _ = inspect_bundle(data, &key);
});
