//! Envelope-encrypt a file with a DEK from `keybroker dev`, then decrypt it.
//!
//! ```sh
//! cargo run -p keybroker-client --example seal_blob -- README.md
//! cargo run -p keybroker-client --example seal_blob -- FILE https://127.0.0.1:50051 ./keybroker-dev
//! ```
//! Writes `FILE.kbb` (header with the sidecar, then AES-256-GCM frames) and
//! `FILE.kbb.sidecar.json`, and checks that decrypting gives FILE back.

use keybroker_client::blob::{BlobEncryptor, read_sidecar};
use keybroker_client::{Client, Context, TlsIdentity};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = std::path::PathBuf::from(args.next().ok_or("usage: seal_blob FILE [URL] [DEV_DIR]")?);
    let url = args.next().unwrap_or_else(|| "https://127.0.0.1:50051".to_owned());
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "./keybroker-dev".to_owned()));
    let tls = TlsIdentity::from_files(dir.join("tls/ca.pem"), dir.join("tls/client.pem"), dir.join("tls/client.key"))?;
    let client = Client::mtls(url, tls).connect().await?;

    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("blob").to_owned();
    let context = Context::from([("file".to_owned(), name)]);
    let sealer = BlobEncryptor::new(client, "demo").with_context(context.clone());

    let sealed_path = input.with_extension("kbb");
    let mut reader = tokio::fs::File::open(&input).await?;
    let mut writer = tokio::fs::File::create(&sealed_path).await?;
    let n = sealer.seal_stream(&mut reader, &mut writer).await?;
    println!("sealed {n} bytes into {}", sealed_path.display());

    let sealed = tokio::fs::read(&sealed_path).await?;
    let sidecar = read_sidecar(&sealed).await?;
    let sidecar_path = sealed_path.with_extension("kbb.sidecar.json");
    tokio::fs::write(&sidecar_path, sidecar.to_json()).await?;
    println!("sidecar {}: key {} v{}", sidecar_path.display(), sidecar.key, sidecar.version);

    // Opening says which record it expects: a blob of another file is refused.
    let opened = sealer.open(&sealed, &context).await?;
    if opened.plaintext.as_slice() != tokio::fs::read(&input).await?.as_slice() {
        return Err("decrypted content differs".into());
    }
    println!("decrypted {} bytes under context {:?}: identical", opened.plaintext.len(), opened.context);
    Ok(())
}
