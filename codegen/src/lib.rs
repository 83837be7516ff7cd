//! Produces `keybroker-client`'s checked-in code from `proto/` with protox
//! (a pure-Rust protobuf compiler, so no system `protoc`).
//!
//! The output is a list of files relative to the workspace root. The binary
//! writes them; the drift test in `tests/` compares them with what is checked
//! in, so the proto files and the client can never disagree.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// The proto files of the API, relative to `proto/`.
pub const PROTO_FILES: &[&str] =
    &["keybroker/v1/types.proto", "keybroker/v1/key_broker.proto", "keybroker/v1/key_admin.proto"];

/// Messages with a plaintext field: their generated Debug is skipped and
/// the client crate implements one that redacts the plaintext (the batch
/// messages hold these as items, so they are redacted too).
pub const PLAINTEXT_MESSAGES: &[&str] =
    &[".keybroker.v1.WrapRequest", ".keybroker.v1.UnwrapResponse", ".keybroker.v1.GenerateDataKeyResponse"];

/// Where the generated Rust module goes, relative to the workspace root.
pub const GENERATED_RS: &str = "client/src/generated/keybroker.v1.rs";
/// Where the encoded `FileDescriptorSet` (served by reflection) goes.
pub const DESCRIPTOR_BIN: &str = "client/src/generated/keybroker_v1_descriptor.bin";
/// The Kubernetes KMS v2 plugin API, relative to `proto/`.
pub const KMS_V2_PROTO: &str = "kubernetes/kms/v2/api.proto";
/// Where its generated code goes (the server crate; the client half is for
/// the benchmarks).
pub const KMS_V2_RS: &str = "server/src/api/kms_v2/generated.rs";

/// Where the proto files are copied so the published crate carries them.
pub const CLIENT_PROTO_DIR: &str = "client/proto";

/// One generated file: its path relative to the workspace root and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Path relative to the workspace root.
    pub path: PathBuf,
    /// Full content.
    pub contents: Vec<u8>,
}

/// Compiles `<root>/proto` and returns every file the client crate must hold.
pub fn generate(root: &Path) -> Result<Vec<GeneratedFile>> {
    let proto_dir = root.join("proto");
    let fds = protox::compile(PROTO_FILES, [&proto_dir])
        .with_context(|| format!("compiling the proto files under {}", proto_dir.display()))?;
    let descriptor = fds.encode_to_vec();

    let out = tempfile::tempdir().context("creating a temporary output directory")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .server_mod_attribute(".", "#[cfg(feature = \"server\")]")
        .btree_map(".")
        // Messages that carry a plaintext DEK get a hand-written Debug that
        // redacts it (client/src/redact.rs), so a `{:?}` never logs a key.
        .skip_debug(PLAINTEXT_MESSAGES.iter().copied())
        .out_dir(out.path())
        .compile_fds(fds)
        .context("generating Rust code from the descriptor set")?;
    let rust = std::fs::read(out.path().join("keybroker.v1.rs")).context("reading the generated keybroker.v1.rs")?;

    let kms = protox::compile([KMS_V2_PROTO], [&proto_dir]).context("compiling the KMS v2 proto")?;
    let kms_out = tempfile::tempdir().context("creating a temporary output directory")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .btree_map(".")
        // Plaintext data keys: no derived Debug (the server writes one).
        .skip_debug([".v2.EncryptRequest", ".v2.DecryptResponse"])
        .out_dir(kms_out.path())
        .compile_fds(kms)
        .context("generating the KMS v2 server code")?;
    let kms_rust = std::fs::read(kms_out.path().join("v2.rs")).context("reading the generated v2.rs")?;

    let mut files = vec![
        GeneratedFile { path: GENERATED_RS.into(), contents: rust },
        GeneratedFile { path: DESCRIPTOR_BIN.into(), contents: descriptor },
        GeneratedFile { path: KMS_V2_RS.into(), contents: kms_rust },
    ];
    for proto in PROTO_FILES {
        let contents = std::fs::read(proto_dir.join(proto)).with_context(|| format!("reading proto/{proto}"))?;
        files.push(GeneratedFile { path: Path::new(CLIENT_PROTO_DIR).join(proto), contents });
    }
    Ok(files)
}

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}
