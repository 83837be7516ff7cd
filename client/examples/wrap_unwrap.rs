//! Wrap and unwrap a data key against `keybroker dev`.
//!
//! ```sh
//! cargo build --workspace --all-targets && ./target/debug/keybroker dev   # in one shell
//! cargo run -p keybroker-client --example wrap_unwrap      # in another
//! KEYBROKER_DEV_DIR=/path/to/keybroker-dev cargo run -p keybroker-client --example wrap_unwrap -- https://127.0.0.1:50051
//! ```
//! The application identity comes from the dev data directory:
//! `$KEYBROKER_DEV_DIR`, by default `./keybroker-dev`.

use keybroker_client::{Client, Context, TlsIdentity};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "https://127.0.0.1:50051".to_owned());
    let dir =
        std::path::PathBuf::from(std::env::var("KEYBROKER_DEV_DIR").unwrap_or_else(|_| "./keybroker-dev".to_owned()));
    let tls = TlsIdentity::from_files(dir.join("tls/ca.pem"), dir.join("tls/client.pem"), dir.join("tls/client.key"))?;
    let client = Client::mtls(url, tls).connect().await?;

    let context = Context::from([("tenant".to_owned(), "acme".to_owned())]);
    let data_key = client.generate_data_key("demo", 32, &context).await?;
    println!("data key wrapped under {} v{}", data_key.wrapped.key, data_key.wrapped.version);

    let unwrapped = client.unwrap(&data_key.wrapped.ciphertext, &context).await?;
    assert_eq!(unwrapped.plaintext, data_key.plaintext);
    println!("unwrapped: {} bytes, rewrap advised: {}", unwrapped.plaintext.len(), unwrapped.rewrap_advised);

    match client.wrap("no-such-key", b"x", &context).await {
        Err(err) if err.is_not_found() => println!("unknown key: {err}"),
        other => return Err(format!("expected NOT_FOUND, got {other:?}").into()),
    }
    Ok(())
}
