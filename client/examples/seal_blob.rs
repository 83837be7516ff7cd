//! Envelope-encrypt a file with a DEK from `keybroker dev`, then decrypt it.
//!
//! ```sh
//! cargo run -p keybroker-client --example seal_blob -- README.md /tmp/readme.kbb
//! KEYBROKER_DEV_DIR=/path/to/keybroker-dev cargo run -p keybroker-client --example seal_blob -- IN OUT [URL]
//! ```
//! Writes OUT (a header carrying the sidecar, then AES-256-GCM frames) and
//! `OUT.sidecar.json`, never overwriting either, and checks that decrypting
//! OUT gives IN back. The application identity comes from the dev data
//! directory: `$KEYBROKER_DEV_DIR`, by default `./keybroker-dev`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keybroker_client::blob::{BlobEncryptor, read_sidecar};
use keybroker_client::{Client, Context, TlsIdentity};

type Error = Box<dyn std::error::Error>;

/// The error of an operation on `path`, naming it.
fn on(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| format!("{}: {e}", path.display()).into()
}

async fn create_new(path: &Path) -> Result<tokio::fs::File, Error> {
    tokio::fs::OpenOptions::new().write(true).create_new(true).open(path).await.map_err(on(path))
}

async fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: seal_blob INPUT OUTPUT [URL]  (identity from $KEYBROKER_DEV_DIR, default ./keybroker-dev)";
    let input = PathBuf::from(args.next().ok_or(usage)?);
    let output = PathBuf::from(args.next().ok_or(usage)?);
    let url = args.next().unwrap_or_else(|| "https://127.0.0.1:50051".to_owned());
    let dir = PathBuf::from(std::env::var("KEYBROKER_DEV_DIR").unwrap_or_else(|_| "./keybroker-dev".to_owned()));
    let tls = TlsIdentity::from_files(dir.join("tls/ca.pem"), dir.join("tls/client.pem"), dir.join("tls/client.key"))?;
    let client = Client::mtls(url, tls).connect().await?;

    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("blob").to_owned();
    let context = Context::from([("file".to_owned(), name)]);
    let sealer = BlobEncryptor::new(client, "demo").with_context(context.clone());

    let mut reader = tokio::fs::File::open(&input).await.map_err(on(&input))?;
    let mut writer = create_new(&output).await?;
    let n = sealer.seal_stream(&mut reader, &mut writer).await?;
    println!("sealed {n} bytes into {}", output.display());

    let sealed = tokio::fs::read(&output).await.map_err(on(&output))?;
    let sidecar = read_sidecar(&sealed).await?;
    let mut sidecar_path = output.clone().into_os_string();
    sidecar_path.push(".sidecar.json");
    let sidecar_path = PathBuf::from(sidecar_path);
    use tokio::io::AsyncWriteExt;
    create_new(&sidecar_path).await?.write_all(sidecar.to_json().as_bytes()).await.map_err(on(&sidecar_path))?;
    println!("sidecar {}: key {} v{}", sidecar_path.display(), sidecar.key, sidecar.version);

    // Opening says which record it expects: a blob of another file is refused.
    let opened = sealer.open(&sealed, &context).await?;
    if opened.plaintext.as_slice() != tokio::fs::read(&input).await.map_err(on(&input))?.as_slice() {
        return Err("decrypted content differs".into());
    }
    println!("decrypted {} bytes under context {:?}: identical", opened.plaintext.len(), opened.context);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("seal_blob: {err}");
            ExitCode::FAILURE
        }
    }
}
