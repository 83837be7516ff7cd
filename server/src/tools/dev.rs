//! `keybroker dev`: a working broker from nothing. The data directory gets a
//! dev PKI (`tls/`), a root key, a SQLite version table and a generated
//! `keybroker.toml`; a restart on the same directory reuses all of it.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::backend::root_key::RootKey;
use crate::security::tls::pki::{Ca, ClientSpec};

/// Identity (URI SAN) of the dev admin certificate.
pub const DEV_ADMIN_IDENTITY: &str = "spiffe://keybroker.dev/admin";
/// Identity (URI SAN) of the dev application certificate.
pub const DEV_APP_IDENTITY: &str = "spiffe://keybroker.dev/app";
/// The key `keybroker dev` creates.
pub const DEV_KEY: &str = "demo";

/// Files of the dev PKI, relative to the data directory.
pub const PKI_FILES: &[&str] = &[
    "tls/ca.pem",
    "tls/server.pem",
    "tls/server.key",
    "tls/client.pem",
    "tls/client.key",
    "tls/admin.pem",
    "tls/admin.key",
];

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A file or folder could not be written.
    #[error("{path}: {cause}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The PKI is half there.
    #[error("incomplete dev PKI in {dir}: {missing} is missing; remove {dir} to generate a new PKI")]
    PartialPki {
        /// The tls folder.
        dir: PathBuf,
        /// First missing file.
        missing: String,
    },
    /// Certificate generation failed.
    #[error("generating the dev PKI: {0}")]
    Pki(#[from] rcgen::Error),
    /// The root key could not be created.
    #[error(transparent)]
    RootKey(#[from] crate::backend::root_key::RootKeyError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |cause| DevError::Io { path: path.to_owned(), cause }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), DevError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))
}

fn ensure_pki(dir: &Path) -> Result<(), DevError> {
    let tls = dir.join("tls");
    let present: Vec<bool> = PKI_FILES.iter().map(|f| dir.join(f).is_file()).collect();
    if present.iter().all(|p| *p) {
        return Ok(());
    }
    if let Some(i) = present.iter().position(|p| !*p).filter(|_| present.iter().any(|p| *p)) {
        return Err(DevError::PartialPki { dir: tls, missing: PKI_FILES[i].to_owned() });
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&tls).map_err(io(&tls))?;
    let ca = Ca::generate("keybroker dev CA")?;
    let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let client = ca.issue_client(&ClientSpec::new("keybroker-dev-app", Some(DEV_APP_IDENTITY)))?;
    let admin = ca.issue_client(&ClientSpec::new("keybroker-dev-admin", Some(DEV_ADMIN_IDENTITY)))?;
    write_file(&tls.join("ca.pem"), ca.cert_pem(), 0o644)?;
    for (name, cert) in [("server", &server), ("client", &client), ("admin", &admin)] {
        write_file(&tls.join(format!("{name}.pem")), &cert.cert_pem, 0o644)?;
        write_file(&tls.join(format!("{name}.key")), &cert.key_pem, 0o600)?;
    }
    Ok(())
}

/// Creates (or reuses) everything in `dir` and writes `dir/keybroker.toml`
/// for `listen`; returns the path of that configuration file.
pub fn prepare(dir: &Path, listen: SocketAddr) -> Result<PathBuf, DevError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    ensure_pki(dir)?;
    let root_key = dir.join("root.key");
    if !root_key.exists() {
        RootKey::generate_file(&root_key)?;
    }
    let config_path = dir.join("keybroker.toml");
    // The sidecar socket admits the user running the dev broker (it is mode
    // 0600: nobody else can connect anyway) as an application identity.
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(dir).map_err(io(dir))?.uid();
    let config = format!(
        r#"# Written by `keybroker dev` at every start; edit a copy for `keybroker serve`.
listen = "{listen}"
default_backend = "local"

[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"

[store]
type = "sqlite"
path = "keybroker.sqlite"

[root_key]
file = "root.key"

[backends.local]
type = "local"

[unix_socket]
path = "keybroker.sock"

[auth]
admin_identities = ["{DEV_ADMIN_IDENTITY}"]
app_identities = ["{DEV_APP_IDENTITY}", "uid:{uid}"]

[audit]
file = "audit.log"

[metrics]
listen = "127.0.0.1:0"  # /metrics, /healthz, /readyz; the address is printed at start
"#
    );
    write_file(&config_path, &config, 0o600)?;
    Ok(config_path)
}

/// The grpcurl commands that work against a dev broker at `addr` whose data
/// directory is `dir`.
pub fn banner(dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    let admin = format!("grpcurl -cacert {d}/tls/ca.pem -cert {d}/tls/admin.pem -key {d}/tls/admin.key");
    let app = format!("grpcurl -cacert {d}/tls/ca.pem -cert {d}/tls/client.pem -key {d}/tls/client.key");
    format!(
        r#"keybroker dev is ready: data in {d}, key "{DEV_KEY}" exists.

List the services (reflection):
  {admin} {addr} list
Create a key and show it (admin identity):
  {admin} -d '{{"key":"orders"}}' {addr} keybroker.v1.KeyAdmin/CreateKey
Wrap a 32-byte data key (application identity):
  {app} -d '{{"key":"{DEV_KEY}","plaintext":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}}' {addr} keybroker.v1.KeyBroker/Wrap
Unwrap it (paste the ciphertext from the Wrap answer):
  {app} -d '{{"ciphertext":"<ciphertext>"}}' {addr} keybroker.v1.KeyBroker/Unwrap
Rotate, then list keys:
  {admin} -d '{{"key":"{DEV_KEY}"}}' {addr} keybroker.v1.KeyAdmin/Rotate
  {admin} -d '{{"pattern":"*"}}' {addr} keybroker.v1.KeyAdmin/ListKeys
"#
    )
}
