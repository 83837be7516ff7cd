//! The KBB1 blob reader.
//!
//! With a fixed DEK: the header, the sidecar inside it and every frame are
//! checked; any bytes are refused or open; never a panic, and memory stays
//! bounded by the frame size.
#![no_main]

use std::sync::OnceLock;

use keybroker_client::blob::open_with_dek;
use libfuzzer_sys::fuzz_target;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let runtime = RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a runtime"));
    let _ = runtime.block_on(open_with_dek(&[7u8; 32], data));
});
