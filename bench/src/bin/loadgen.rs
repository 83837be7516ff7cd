//! kb-loadgen: drives a keybroker (or the echo reference server) with one
//! RPC at a fixed number of requests in flight over a fixed number of mTLS
//! connections, and prints requests/s, DEKs/s, latency percentiles, the
//! server's CPU time per request (from /proc/PID/stat) and its peak RSS, as
//! a table and as JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use keybroker_bench::{cpu_seconds, rss_kib};
use keybroker_client::pb::key_admin_client::KeyAdminClient;
use keybroker_client::pb::key_broker_client::KeyBrokerClient;
use keybroker_client::{TlsIdentity, connect, pb};
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Rpc {
    Wrap,
    Unwrap,
    GenerateDataKey,
    BatchWrap,
    BatchUnwrap,
    Rewrap,
    BatchRewrap,
    /// The XKS proxy API's Encrypt (HTTPS/1.1, SigV4-signed by aws-sigv4).
    XksEncrypt,
    /// The Kubernetes KMS v2 plugin's Encrypt (gRPC on its Unix socket).
    KmsV2Encrypt,
    /// One ListKeys page (KeyAdmin, the dev admin identity) of `--page-size`
    /// keys matching `--key-prefix*`, from a random point with `--key-count`.
    ListKeys,
}

/// Load generator for keybroker.
#[derive(Debug, Parser)]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    url: String,
    /// `keybroker dev` data directory (its tls/ identities are used).
    #[arg(long, default_value = "./keybroker-dev")]
    dev_dir: std::path::PathBuf,
    /// Key to use.
    #[arg(long, default_value = "demo")]
    key: String,
    /// Many keys: each request uses a random one of `--key-count` keys named
    /// `--key-prefix` + a zero-padded number (`keybroker create-keys`).
    #[arg(long, default_value_t = 0)]
    key_count: usize,
    /// Prefix of the many keys.
    #[arg(long, default_value = "tenant-")]
    key_prefix: String,
    /// Digits of the many keys' numbers.
    #[arg(long, default_value_t = 7)]
    key_digits: usize,
    /// Keys per ListKeys page.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// RPC to drive.
    #[arg(long, value_enum, default_value = "wrap")]
    rpc: Rpc,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// mTLS connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds measured (after one second of warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Plaintext (DEK) bytes.
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// Items per batch request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Server process id, for CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label of this run in the output.
    #[arg(long, default_value = "keybroker")]
    label: String,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// XKS: the base URL with the path prefix (https://localhost:8443/kb).
    #[arg(long)]
    xks_url: Option<String>,
    /// XKS: the access key id.
    #[arg(long, default_value = "AKIAXKSBENCHCREDENTIAL")]
    xks_akid: String,
    /// XKS: the variable holding the secret access key.
    #[arg(long, default_value = "XKS_SECRET")]
    xks_secret_env: String,
    /// KMS v2: the plugin socket.
    #[arg(long)]
    kms_socket: Option<std::path::PathBuf>,
    /// Pace the load to this many requests per second in all (0: as fast
    /// as the server answers).
    #[arg(long, default_value_t = 0.0)]
    target_rate: f64,
    /// Connect over this Unix socket (the broker's sidecar listener, as the
    /// socket's uid) instead of mTLS.
    #[arg(long)]
    unix: Option<std::path::PathBuf>,
    /// Instead of a load: connect, make one Wrap (on `--key`, or a random
    /// one of the many keys), print the milliseconds it took and exit;
    /// retried until it succeeds or 30 s have passed.
    #[arg(long)]
    once: bool,
    /// Instead of a load: write this many sidecar files (`{key, version,
    /// wrapped_dek}` JSON, 1000 per folder) of DEKs wrapped under `--key`
    /// into `--sidecar-dir`, then rotate the key (the dev admin identity),
    /// for a `keybroker rewrap` pass to move.
    #[arg(long)]
    write_sidecars: Option<usize>,
    /// Where `--write-sidecars` writes.
    #[arg(long, default_value = "sidecars")]
    sidecar_dir: std::path::PathBuf,
    /// Instead of a load: open this many connections, make one call on
    /// each, hold them idle, and report the server's RSS per connection.
    #[arg(long)]
    hold_connections: Option<usize>,
}

/// The idle-connection memory measurement.
async fn hold(args: &Args, identity: &TlsIdentity, n: usize) -> anyhow::Result<()> {
    let pid = args.server_pid.ok_or_else(|| anyhow::anyhow!("--hold-connections needs --server-pid"))?;
    let before = rss_kib(pid).map(|r| r.0).unwrap_or(0);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = connect(&args.url, identity).await?;
        let mut client = KeyBrokerClient::new(channel.clone());
        client.wrap(pb::WrapRequest { key: args.key.clone(), plaintext: vec![7; 32], ..Default::default() }).await?;
        held.push(channel);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).map(|r| r.0).unwrap_or(0);
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "{:<12} {n} idle connections: server RSS {before} KiB -> {after} KiB, {per:.1} KiB per connection",
        args.label
    );
    let json = serde_json::json!({
        "label": args.label, "rpc": "idle-connections", "connections": n,
        "server_rss_before_kib": before, "server_rss_after_kib": after, "kib_per_connection": per,
    });
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(file, "{json}")?;
    } else {
        println!("{json}");
    }
    drop(held);
    Ok(())
}

#[derive(Debug, Serialize)]
struct Report {
    label: String,
    rpc: Rpc,
    concurrency: usize,
    connections: usize,
    payload: usize,
    batch: usize,
    seconds: f64,
    requests: u64,
    errors: u64,
    requests_per_second: f64,
    deks_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    server_cpu_us_per_request: Option<f64>,
    server_cpu_us_per_dek: Option<f64>,
    server_rss_kib: Option<u64>,
    server_peak_rss_kib: Option<u64>,
}

/// A small per-task random source (xorshift64*) for the key choice.
struct Pick(u64);

impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

/// The key of the next request: `--key`, or a random one of the many keys.
fn key_for(args: &Args, pick: &mut Pick) -> String {
    match args.key_count {
        0 => args.key.clone(),
        n => format!("{}{:0width$}", args.key_prefix, pick.next(n), width = args.key_digits),
    }
}

async fn one_request(
    client: &mut KeyBrokerClient<Channel>,
    admin: &mut Option<KeyAdminClient<Channel>>,
    pick: &mut Pick,
    rpc: Rpc,
    args: &Args,
    ciphertext: &[u8],
) -> Result<(), tonic::Status> {
    let key = key_for(args, pick);
    let wrap = || pb::WrapRequest { key: key.clone(), plaintext: vec![7; args.payload], ..Default::default() };
    let unwrap = || pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), ..Default::default() };
    let rewrap = || pb::RewrapRequest { ciphertext: ciphertext.to_vec(), ..Default::default() };
    match rpc {
        Rpc::Wrap => client.wrap(wrap()).await.map(|_| ()),
        Rpc::Unwrap => client.unwrap(unwrap()).await.map(|_| ()),
        Rpc::GenerateDataKey => client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: key.clone(),
                length: args.payload as u32,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Rpc::Rewrap => client.rewrap(rewrap()).await.map(|_| ()),
        Rpc::BatchWrap => {
            let r = client.batch_wrap(pb::BatchWrapRequest { items: vec![wrap(); args.batch] }).await?;
            check_batch(
                r.into_inner().results.iter().map(|r| matches!(r.result, Some(pb::batch_wrap_result::Result::Ok(_)))),
            )
        }
        Rpc::BatchUnwrap => {
            let r = client.batch_unwrap(pb::BatchUnwrapRequest { items: vec![unwrap(); args.batch] }).await?;
            check_batch(
                r.into_inner().results.iter().map(|r| matches!(r.result, Some(pb::batch_unwrap_result::Result::Ok(_)))),
            )
        }
        Rpc::BatchRewrap => {
            let r = client.batch_rewrap(pb::BatchRewrapRequest { items: vec![rewrap(); args.batch] }).await?;
            check_batch(
                r.into_inner().results.iter().map(|r| matches!(r.result, Some(pb::batch_rewrap_result::Result::Ok(_)))),
            )
        }
        Rpc::ListKeys => {
            let admin = admin.as_mut().ok_or_else(|| tonic::Status::internal("no admin client"))?;
            let after = match args.key_count {
                0 => String::new(),
                n => format!("{}{:0width$}", args.key_prefix, pick.next(n), width = args.key_digits),
            };
            let page = admin
                .list_keys(pb::ListKeysRequest {
                    pattern: format!("{}*", args.key_prefix),
                    page_size: args.page_size,
                    page_token: base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, after),
                })
                .await?
                .into_inner();
            if page.keys.is_empty() && args.key_count > args.page_size as usize * 2 {
                return Err(tonic::Status::internal("an empty page"));
            }
            Ok(())
        }
        Rpc::XksEncrypt | Rpc::KmsV2Encrypt => unreachable!("served by their own clients"),
    }
}

/// One HTTPS/1.1 keep-alive connection to the XKS listener.
struct XksConnection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
    url: url_parts::Parts,
    akid: String,
    secret: String,
}

mod url_parts {
    /// https://HOST:PORT/PREFIX split.
    #[derive(Clone)]
    pub struct Parts {
        pub host: String,
        pub port: u16,
        pub prefix: String,
    }

    pub fn parse(url: &str) -> anyhow::Result<Parts> {
        let rest = url.strip_prefix("https://").ok_or_else(|| anyhow::anyhow!("--xks-url must be https://"))?;
        let (authority, prefix) = rest.split_once('/').map_or((rest, String::new()), |(a, p)| (a, format!("/{p}")));
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--xks-url needs a port"))?;
        Ok(Parts { host: host.to_owned(), port: port.parse()?, prefix })
    }
}

impl XksConnection {
    async fn open(args: &Args, ca: &std::path::Path) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let url = url_parts::parse(args.xks_url.as_deref().ok_or_else(|| anyhow::anyhow!("--xks-url is required"))?)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(rustls::pki_types::ServerName::try_from(url.host.clone())?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let secret = std::env::var(&args.xks_secret_env)
            .map_err(|_| anyhow::anyhow!("set {} to the XKS secret access key", args.xks_secret_env))?;
        Ok(Self { sender, url, akid: args.xks_akid.clone(), secret })
    }

    async fn encrypt(&mut self, key: &str, plaintext: &[u8]) -> anyhow::Result<()> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        use base64::Engine;
        let body = serde_json::json!({
            "requestMetadata": {"awsPrincipalArn": "arn:aws:iam::123456789012:user/bench", "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/bench",
                                "kmsOperation": "Encrypt", "kmsRequestId": "bench"},
            "plaintext": base64::engine::general_purpose::STANDARD.encode(plaintext),
            "encryptionAlgorithm": "AES_GCM",
        })
        .to_string();
        let path = format!("{}/kms/xks/v1/keys/{key}/encrypt", self.url.prefix);
        let host = format!("{}:{}", self.url.host, self.url.port);
        let url = format!("https://{host}{path}");
        let identity = aws_credential_types::Credentials::new(&self.akid, &self.secret, None, None, "bench").into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("kms-xks-proxy")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()?
            .into();
        let headers = [("host", host.as_str()), ("content-type", "application/json")];
        let signable =
            SignableRequest::new("POST", &url, headers.iter().copied(), SignableBody::Bytes(body.as_bytes()))?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let mut request = hyper::Request::post(path).header("host", &host).header("content-type", "application/json");
        for (name, value) in instructions.headers() {
            request = request.header(name, value);
        }
        let request = request.body(http_body_util::Full::new(hyper::body::Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let _ = http_body_util::BodyExt::collect(response.into_body()).await?;
        anyhow::ensure!(status.is_success(), "XKS Encrypt answered {status}");
        Ok(())
    }
}

type KmsClient = keybroker_server::api::kms_v2::generated::key_management_service_client::KeyManagementServiceClient<
    tonic::transport::Channel,
>;

async fn kms_client(socket: &std::path::Path) -> anyhow::Result<KmsClient> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(KmsClient::new(channel))
}

fn check_batch(mut ok: impl Iterator<Item = bool>) -> Result<(), tonic::Status> {
    if ok.all(|b| b) { Ok(()) } else { Err(tonic::Status::internal("a batch item failed")) }
}

/// A cheaper allocator than glibc's for the generator's many small
/// allocations per call (the server's own, too): with glibc's, the
/// generator spent about an eighth of its CPU in malloc and free, and capped
/// the load it could put on a server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// On one CPU (the benchmark pins the generator to one core) a
/// single-threaded runtime: it sends the requests that are ready together,
/// so the generator saturates the server with less CPU of its own.
fn main() -> anyhow::Result<()> {
    use keybroker_server::server::{available_cpus, build_runtime};
    build_runtime(available_cpus())?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    // With no subscriber, every span of tonic, hyper and h2 goes to the
    // `log` crate's checks (about 0.3 µs per call here); with one filtering
    // at `warn`, they are off.
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Arc::new(Args::parse());
    let tls = args.dev_dir.join("tls");
    let tls = &tls;
    let identity = TlsIdentity::from_files(tls.join("ca.pem"), tls.join("client.pem"), tls.join("client.key"))?;
    if let Some(n) = args.hold_connections {
        return hold(&args, &identity, n).await;
    }
    if let Some(n) = args.write_sidecars {
        let mut client = KeyBrokerClient::new(connect(&args.url, &identity).await?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut written = 0;
        while written < n {
            let items = vec![
                pb::WrapRequest { key: args.key.clone(), plaintext: vec![7; 32], ..Default::default() };
                1000.min(n - written)
            ];
            let results = client.batch_wrap(pb::BatchWrapRequest { items }).await?.into_inner().results;
            for result in results {
                let w = match result.result {
                    Some(pb::batch_wrap_result::Result::Ok(w)) => w,
                    other => anyhow::bail!("a wrap failed: {other:?}"),
                };
                let folder = args.sidecar_dir.join(format!("{:04}", written / 1000));
                if written % 1000 == 0 {
                    std::fs::create_dir_all(&folder)?;
                }
                let sidecar = keybroker_client::blob::Sidecar {
                    key: w.key,
                    version: w.version,
                    wrapped_dek: w.ciphertext,
                    context: Default::default(),
                };
                std::fs::write(folder.join(format!("{written:07}.sidecar.json")), serde_json::to_vec(&sidecar)?)?;
                written += 1;
            }
        }
        let admin_identity = TlsIdentity::from_files(tls.join("ca.pem"), tls.join("admin.pem"), tls.join("admin.key"))?;
        let mut admin = KeyAdminClient::new(connect(&args.url, &admin_identity).await?);
        let key = admin.rotate(pb::RotateRequest { key: args.key.clone(), ..Default::default() }).await?.into_inner();
        println!("wrote {n} sidecars; {} is now at version {}", key.name, key.current_version);
        return Ok(());
    }
    if args.once {
        let started = Instant::now();
        let mut pick = Pick(started.elapsed().as_nanos() as u64 | 1);
        loop {
            let attempt = async {
                let mut client = KeyBrokerClient::new(connect(&args.url, &identity).await?);
                let req =
                    pb::WrapRequest { key: key_for(&args, &mut pick), plaintext: vec![7; 32], ..Default::default() };
                anyhow::Ok(client.wrap(req).await?)
            };
            match attempt.await {
                Ok(_) => {
                    println!("{:.1}", started.elapsed().as_secs_f64() * 1000.0);
                    return Ok(());
                }
                Err(err) if started.elapsed() > Duration::from_secs(30) => return Err(err),
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        match &args.unix {
            Some(path) => clients.push(keybroker_client::Client::unix(path).connect().await?.data_plane()),
            None => clients.push(KeyBrokerClient::new(connect(&args.url, &identity).await?)),
        }
    }
    // A ciphertext to unwrap / rewrap.
    let ciphertext = if matches!(args.rpc, Rpc::Unwrap | Rpc::BatchUnwrap | Rpc::Rewrap | Rpc::BatchRewrap) {
        let mut c = clients[0].clone();
        c.wrap(pb::WrapRequest { key: args.key.clone(), plaintext: vec![7; args.payload], ..Default::default() })
            .await?
            .into_inner()
            .ciphertext
    } else {
        Vec::new()
    };
    let ciphertext = Arc::new(ciphertext);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..args.concurrency.max(1) {
        let mut client =
            clients[i % clients.len()].clone().max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        let (args, ciphertext, measuring, stop) = (args.clone(), ciphertext.clone(), measuring.clone(), stop.clone());
        let ca = args.dev_dir.join("tls/ca.pem");
        let mut xks = match args.rpc {
            Rpc::XksEncrypt => Some(XksConnection::open(&args, &ca).await?),
            _ => None,
        };
        let mut admin = match args.rpc {
            Rpc::ListKeys => {
                let admin_identity = TlsIdentity::from_files(ca.clone(), tls.join("admin.pem"), tls.join("admin.key"))?;
                Some(KeyAdminClient::new(connect(&args.url, &admin_identity).await?))
            }
            _ => None,
        };
        let mut pick = Pick(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
        let mut kms = match (&args.rpc, &args.kms_socket) {
            (Rpc::KmsV2Encrypt, Some(socket)) => Some(kms_client(socket).await?),
            (Rpc::KmsV2Encrypt, None) => anyhow::bail!("--rpc kms-v2-encrypt needs --kms-socket"),
            _ => None,
        };
        tasks.push(tokio::spawn(async move {
            let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) else {
                return (Histogram::<u64>::new(1).unwrap_or_else(|_| unreachable!("1 significant digit is valid")), 0);
            };
            let mut errors = 0u64;
            // Each task's share of the target rate, as a fixed schedule.
            let mut pace = (args.target_rate > 0.0).then(|| {
                let period = Duration::from_secs_f64(args.concurrency.max(1) as f64 / args.target_rate);
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(tick) = &mut pace {
                    tick.tick().await;
                }
                let started = Instant::now();
                let result = match (&mut xks, &mut kms) {
                    (Some(x), _) => x
                        .encrypt(&args.key, &vec![7; args.payload])
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string())),
                    (_, Some(k)) => k
                        .encrypt(keybroker_server::api::kms_v2::EncryptRequest {
                            plaintext: vec![7; args.payload],
                            uid: "bench".into(),
                        })
                        .await
                        .map(|_| ()),
                    _ => one_request(&mut client, &mut admin, &mut pick, args.rpc, &args, &ciphertext).await,
                };
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    match result {
                        Ok(()) => {
                            let _ = histogram.record(started.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (histogram, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(cpu_seconds);
    let rss = args.server_pid.and_then(rss_kib);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        histogram.add(&h)?;
        errors += e;
    }
    let requests = histogram.len();
    let per_request = match args.rpc {
        Rpc::BatchWrap | Rpc::BatchUnwrap | Rpc::BatchRewrap => args.batch as f64,
        _ => 1.0,
    };
    let cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if requests > 0 => Some((a - b) * 1e6 / requests as f64),
        _ => None,
    };
    let report = Report {
        label: args.label.clone(),
        rpc: args.rpc,
        concurrency: args.concurrency,
        connections: args.connections,
        payload: args.payload,
        batch: if per_request > 1.0 { args.batch } else { 1 },
        seconds,
        requests,
        errors,
        requests_per_second: requests as f64 / seconds,
        deks_per_second: requests as f64 * per_request / seconds,
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        server_cpu_us_per_request: cpu,
        server_cpu_us_per_dek: cpu.map(|c| c / per_request),
        server_rss_kib: rss.map(|r| r.0),
        server_peak_rss_kib: rss.map(|r| r.1),
    };
    println!(
        "{:<12} {:<18} conc {:>4} conn {:>2}  {:>10.0} req/s {:>12.0} DEK/s  p50 {:>6} us  p99 {:>6} us  p99.9 {:>6} us  cpu/req {:>7} us  rss {:>7} KiB  errors {}",
        report.label,
        format!("{:?}", report.rpc),
        report.concurrency,
        report.connections,
        report.requests_per_second,
        report.deks_per_second,
        report.p50_us,
        report.p99_us,
        report.p999_us,
        report.server_cpu_us_per_request.map_or("-".into(), |c| format!("{c:.1}")),
        report.server_peak_rss_kib.map_or("-".into(), |r| r.to_string()),
        report.errors,
    );
    let json = serde_json::to_string(&report)?;
    if args.json.is_none() {
        println!("{json}");
    }
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(file, "{json}")?;
    }
    Ok(())
}
