//! The ciphertext envelope parser.
//!
//! Any bytes either parse into a header whose fields are within bounds, or
//! fail with an error; never a panic.
#![no_main]

use keybroker_server::core::envelope::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = parse(data) {
        assert!(envelope.header.len() <= data.len());
        assert!(envelope.payload.len() <= data.len());
        assert!(!envelope.key.is_empty());
    }
});
