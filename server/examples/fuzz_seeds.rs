//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/`):
//! valid inputs made with the real code, which the fuzzers then mutate.
//! `cargo run -p keybroker-server --example fuzz_seeds` from the repository
//! root (the backup bundle seed comes from `keybroker backup`, see
//! CONTRIBUTING.md).

#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use keybroker_client::blob::{Sidecar, seal_with_dek};
use keybroker_server::backend::local::LocalBackend;
use keybroker_server::backend::root_key::RootKey;
use keybroker_server::backend::{Aad, KeyBackend, VersionRef};
use keybroker_server::core::envelope::{Algorithm, write_header};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let root = RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "seed").expect("root key");
    let local = LocalBackend::new("local", root);
    for (name, context) in
        [("plain", BTreeMap::new()), ("context", BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]))]
    {
        let reference = local.create_version("orders", 3).await.expect("version");
        let mut envelope = Vec::new();
        write_header(&mut envelope, Algorithm::Aes256Gcm, "orders", 3);
        let header = envelope.clone();
        let version = VersionRef::new("orders", 3, &reference);
        local.wrap(version, &[9u8; 32], Aad { header: &header, context: &context }, &mut envelope).await.expect("wrap");
        write("envelope", name, &envelope);
        let sidecar =
            Sidecar { key: "orders".into(), version: 3, wrapped_dek: envelope.clone(), context: context.clone() };
        write("sidecar", name, sidecar.to_json().as_bytes());
        let blob = seal_with_dek(&[7u8; 32], sidecar, 64, &[5u8; 300]).await.expect("blob");
        write("blob", name, &blob);
    }
    println!("wrote the seeds under fuzz/corpus/");
}
