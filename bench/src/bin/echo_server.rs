//! The limit: a bare tonic server over the same mTLS setup as keybroker
//! (the dev PKI, client certificates required) that answers Wrap with a
//! fixed 60-byte ciphertext and Unwrap with 32 bytes: no auth, no store, no
//! crypto. It implements keybroker's own `KeyBroker` service so the load
//! generator drives both with the same client and messages.
//!
//! usage: kb-echo-server DEV_DIR [LISTEN]   (prints "listening on ADDR")
//!
//! It runs on the async runtime keybroker would choose on the same CPUs,
//! and logs as the benchmarked brokers do (`log = "warn"`): without a
//! subscriber, every span tonic, hyper and h2 open per request would go to
//! the `log` crate's checks instead (about 0.4 µs per request here), a cost
//! no deployed server pays.

use std::io::Write;

use keybroker_client::pb;
use keybroker_client::pb::key_broker_server::{KeyBroker, KeyBrokerServer};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The allocator keybroker uses, so the comparison is of the servers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Echo;

fn unsupported() -> Status {
    Status::unimplemented("the echo server answers Wrap and Unwrap only")
}

#[tonic::async_trait]
impl KeyBroker for Echo {
    async fn wrap(&self, request: Request<pb::WrapRequest>) -> Result<Response<pb::WrapResponse>, Status> {
        let key = request.into_inner().key;
        Ok(Response::new(pb::WrapResponse { ciphertext: vec![0x42; 60], key, version: 1 }))
    }
    async fn unwrap(&self, _request: Request<pb::UnwrapRequest>) -> Result<Response<pb::UnwrapResponse>, Status> {
        Ok(Response::new(pb::UnwrapResponse {
            plaintext: vec![7; 32],
            key: "demo".into(),
            version: 1,
            rewrap_advised: false,
        }))
    }
    async fn generate_data_key(
        &self,
        _r: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        Err(unsupported())
    }
    async fn rewrap(&self, _r: Request<pb::RewrapRequest>) -> Result<Response<pb::RewrapResponse>, Status> {
        Err(unsupported())
    }
    async fn batch_wrap(&self, _r: Request<pb::BatchWrapRequest>) -> Result<Response<pb::BatchWrapResponse>, Status> {
        Err(unsupported())
    }
    async fn batch_unwrap(
        &self,
        _r: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        Err(unsupported())
    }
    async fn batch_rewrap(
        &self,
        _r: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        Err(unsupported())
    }
}

/// The runtime keybroker chooses (a single-threaded one when the process
/// may use one CPU, as on the benchmark's pinned core), so the comparison
/// is of the servers, not of their runtimes.
fn main() -> anyhow::Result<()> {
    use keybroker_server::server::{available_cpus, build_runtime};
    build_runtime(available_cpus())?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let dir =
        std::path::PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: kb-echo-server DEV_DIR [LISTEN]"))?);
    let listen: std::net::SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:0".into()).parse()?;
    let read = |f: &str| std::fs::read(dir.join("tls").join(f));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.pem")?, read("server.key")?))
        .client_ca_root(Certificate::from_pem(read("ca.pem")?));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    Server::builder()
        .tls_config(tls)?
        .add_service(KeyBrokerServer::new(Echo))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
