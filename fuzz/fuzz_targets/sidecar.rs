//! The sidecar JSON reader.
//!
//! Any text parses or fails; what parses writes back to JSON that reads as
//! the same sidecar.
#![no_main]

use keybroker_client::blob::Sidecar;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(sidecar) = Sidecar::from_json(text)
    {
        let again = Sidecar::from_json(&sidecar.to_json()).expect("a sidecar's own JSON reads back");
        assert_eq!(again, sidecar);
    }
});
