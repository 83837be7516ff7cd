//! The `keybroker` binary.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keybroker_server::config::{Config, ENV_CONFIG, Environment};
use keybroker_server::server;
use keybroker_server::store::ConflictMode;
use keybroker_server::tools::{backup, dev, offline};
use tracing_subscriber::EnvFilter;

/// mimalloc: faster small allocations on the request path than the system
/// allocator (batch Wrap about 15% more DEKs per second here; musl's, in the
/// static image, is slower still). The benchmarks' echo server uses it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// keybroker: a gRPC key broker for envelope encryption.
#[derive(Debug, Parser)]
#[command(
    name = "keybroker",
    version,
    about = "keybroker: a gRPC key broker for envelope encryption. Applications wrap and unwrap data keys under \
             versioned key-encryption keys in a local keystore, AWS KMS or a PKCS#11 HSM, over mTLS."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a broker with embedded defaults: local backend, SQLite, a dev
    /// PKI and a key named "demo", all in the data directory.
    Dev {
        /// Data directory (created when missing, reused otherwise).
        #[arg(long, default_value = "./keybroker-dev")]
        data_dir: PathBuf,
        /// Listen address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
    },
    /// Serve from a configuration file; every setting can also come from a
    /// KEYBROKER_* environment variable.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Check this configuration file (with the environment's overrides)
        /// and print the effective configuration, secrets redacted, instead
        /// of serving.
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        check_config: Option<PathBuf>,
    },
    /// Print the configuration reference (Markdown, docs/CONFIGURATION.md).
    ConfigReference,
    /// Work with the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Create a new random root key, seal it with the remote backend named
    /// by root_key.sealed_by under root_key.sealed_by_key, and write
    /// root_key.sealed_file (mode 0600; never overwritten).
    SealRootKey {
        /// Configuration file (TOML).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
    },
    /// Rewrap every sidecar file under DIR whose DEK is below its key's
    /// current version (resumable; see the README).
    Rewrap {
        /// Directory of sidecar files.
        dir: PathBuf,
        /// Broker address.
        #[arg(long, default_value = "https://127.0.0.1:50051")]
        url: String,
        /// Use the application identity of a `keybroker dev` data directory.
        #[arg(long)]
        dev_dir: Option<PathBuf>,
        /// CA certificate (PEM) of the broker.
        #[arg(long, required_unless_present = "dev_dir")]
        ca: Option<PathBuf>,
        /// Client certificate (PEM).
        #[arg(long, required_unless_present = "dev_dir")]
        cert: Option<PathBuf>,
        /// Client private key (PEM).
        #[arg(long, required_unless_present = "dev_dir")]
        key: Option<PathBuf>,
        /// Sidecar files end with this.
        #[arg(long, default_value = ".sidecar.json")]
        suffix: String,
        /// Sidecars per BatchRewrap call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Attempts for a sidecar that failed with UNAVAILABLE.
        #[arg(long, default_value_t = 6)]
        attempts: u32,
        /// Stop after this many files (0 = all); a rerun continues.
        #[arg(long, default_value_t = 0)]
        max_files: usize,
    },
    /// Copy keys from one broker's configuration to another's, offline
    /// (names, versions, states and policy preserved; each key verified).
    Migrate {
        /// Configuration of the source broker.
        #[arg(long)]
        from: PathBuf,
        /// Configuration of the target broker.
        #[arg(long)]
        to: PathBuf,
        /// Glob of the keys to copy.
        #[arg(default_value = "*")]
        pattern: String,
        /// Overwrite keys the target has.
        #[arg(long, conflicts_with = "merge")]
        force: bool,
        /// Take only the versions the target lacks.
        #[arg(long)]
        merge: bool,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write an encrypted bundle of the version table and the exportable key
    /// material; prints its SHA-256.
    Backup {
        /// Configuration of the broker to back up.
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Bundle file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// File whose first line is the passphrase (Argon2id).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// File holding the base64 of a 32-byte key.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Restore a bundle written by `backup`, after checking its SHA-256.
    Restore {
        /// The bundle.
        bundle: PathBuf,
        /// Configuration of the broker to restore into.
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// The SHA-256 `backup` printed.
        #[arg(long)]
        sha256: String,
        /// File whose first line is the passphrase.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// File holding the base64 of a 32-byte key.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Overwrite keys the target has.
        #[arg(long, conflicts_with = "merge")]
        force: bool,
        /// Take only the versions the target lacks.
        #[arg(long)]
        merge: bool,
    },
    /// Create COUNT keys named PREFIX<number> (numbers from --first, zero-
    /// padded to --digits) in the configuration's default backend, in
    /// transactions of 1000: provisioning many tenants at once, beside a
    /// running broker or offline.
    CreateKeys {
        /// Configuration file (TOML).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Name prefix, e.g. `tenant-`.
        #[arg(long)]
        prefix: String,
        /// How many keys.
        #[arg(long)]
        count: usize,
        /// First number.
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Digits of the number (zero-padded).
        #[arg(long, default_value_t = 7)]
        digits: usize,
        /// Backend (default: the configuration's default backend).
        #[arg(long, default_value = "")]
        backend: String,
    },
    /// Create a key in a remote backend (an AWS KMS key, an HSM object with
    /// the given label) and print its id, e.g. for root_key.sealed_by_key.
    CreateRemoteKey {
        /// Configuration file (TOML).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Backend name from the configuration.
        #[arg(long)]
        backend: String,
        /// Label (HSM object label prefix; KMS key description).
        #[arg(long, default_value = keybroker_server::backend::root_key::ROOT_KEY_NAME)]
        label: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain and report the first removed, reordered or
    /// edited line. One file: its rotated predecessors (FILE.<UTC time>)
    /// are checked first. Several files: checked in the order given.
    Verify {
        /// Audit log file(s).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn conflict(force: bool, merge: bool) -> ConflictMode {
    match (force, merge) {
        (true, _) => ConflictMode::Force,
        (_, true) => ConflictMode::Merge,
        _ => ConflictMode::Fail,
    }
}

/// The async runtime: one worker thread per CPU this process may use
/// (`KEYBROKER_WORKER_THREADS` overrides); single-threaded with one (see
/// [`server::build_runtime`]).
fn build_runtime() -> Result<tokio::runtime::Runtime, String> {
    let workers = match std::env::var(keybroker_server::config::ENV_WORKER_THREADS) {
        Ok(v) => v.trim().parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            format!("{}={v:?}: give a number of threads, 1 or more", keybroker_server::config::ENV_WORKER_THREADS)
        })?,
        Err(_) => server::available_cpus(),
    };
    server::build_runtime(workers).map_err(|e| e.to_string())
}

fn config_path(config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    config.ok_or_else(|| anyhow::anyhow!("give --config (or set {ENV_CONFIG})"))
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("invalid setting `log`: {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn announce(addr: SocketAddr, metrics: Option<SocketAddr>, banner: Option<String>) {
    let mut out = std::io::stdout().lock();
    // Harnesses and scripts wait for these exact lines.
    if let Some(metrics) = metrics {
        let _ = writeln!(out, "keybroker metrics on http://{metrics}/metrics");
    }
    let _ = writeln!(out, "keybroker listening on {addr}");
    if let Some(banner) = banner {
        let _ = writeln!(out, "{banner}");
    }
    let _ = out.flush();
}

async fn start(cli: Cli, env: Environment) -> anyhow::Result<()> {
    let (config, options, data_dir) = match cli.command {
        Command::Dev { data_dir, listen } => {
            let path = dev::prepare(&data_dir, listen)?;
            let config = Config::load(Some(&path), &env)?;
            let options =
                server::RunOptions { ensure_keys: vec![dev::DEV_KEY.to_owned()], config_path: Some(path.clone()) };
            (config, options, Some(data_dir))
        }
        Command::Audit { command: AuditCommand::Verify { files } } => {
            let report = keybroker_server::tools::audit::verify(&files).map_err(anyhow::Error::msg)?;
            println!("{report}");
            return Ok(());
        }
        Command::ConfigReference => {
            print!("{}", keybroker_server::tools::config_reference::markdown());
            return Ok(());
        }
        Command::Serve { check_config: Some(file), .. } => {
            let config = Config::load(Some(&file), &env)?;
            println!("# {}: valid; the effective configuration (secrets redacted):", file.display());
            print!("{}", config.to_redacted_toml());
            return Ok(());
        }
        Command::Serve { config, check_config: None } => {
            let loaded = Config::load(config.as_deref(), &env).map_err(|e| match &config {
                Some(_) => anyhow::Error::new(e),
                None => anyhow::anyhow!(
                    "{e} (no configuration file was given: pass --config FILE or set {ENV_CONFIG}; every setting \
                     can also come from a KEYBROKER_* variable)"
                ),
            })?;
            (loaded, server::RunOptions { config_path: config, ..Default::default() }, None)
        }
        Command::SealRootKey { config } => {
            let config = Config::load(config.as_deref(), &env)?;
            init_logging(&config.log)?;
            let path = server::seal_root_key(&config, &env).await?;
            println!("sealed a new root key into {}", path.display());
            return Ok(());
        }
        Command::Migrate { from, to, pattern, force, merge, dry_run } => {
            init_logging("warn")?;
            let from = server::open_offline(&from, &env).await?;
            let to = server::open_offline(&to, &env).await?;
            let summary =
                offline::migrate(&from, &to, &pattern, conflict(force, merge), dry_run, &mut std::io::stdout())
                    .await
                    .map_err(anyhow::Error::msg)?;
            if !summary.failed.is_empty() {
                anyhow::bail!("{} keys were not copied", summary.failed.len());
            }
            return Ok(());
        }
        Command::CreateKeys { config, prefix, count, first, digits, backend } => {
            init_logging("warn")?;
            let side = server::open_offline(&config_path(config)?, &env).await?;
            let keyring =
                keybroker_server::core::keyring::Keyring::new(side.store, side.backends, side.default_backend);
            let names: Vec<String> = (first..first + count).map(|i| format!("{prefix}{i:0digits$}")).collect();
            let spec = keybroker_server::core::keyring::NewKey { backend, ..Default::default() };
            let started = std::time::Instant::now();
            let mut last_report = started;
            let created = keyring
                .create_many(&names, &spec, |n| {
                    if last_report.elapsed().as_secs() >= 5 {
                        last_report = std::time::Instant::now();
                        eprintln!("{n} of {count} keys created");
                    }
                })
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let secs = started.elapsed().as_secs_f64();
            println!("created {created} keys in {secs:.1} s ({:.0} keys/s)", created as f64 / secs.max(1e-9));
            return Ok(());
        }
        Command::Backup { config, out, passphrase_file, key_file } => {
            init_logging("warn")?;
            let key = backup::BundleKey::from_files(passphrase_file.as_deref(), key_file.as_deref())
                .map_err(anyhow::Error::msg)?;
            let side = server::open_offline(&config_path(config)?, &env).await?;
            let report = backup::backup(&side, &out, &key).await.map_err(anyhow::Error::msg)?;
            println!(
                "backup written to {}: {} keys, {} versions with material, {} references to a KMS or HSM",
                out.display(),
                report.keys,
                report.with_material,
                report.references
            );
            println!("sha256 {}", report.sha256);
            return Ok(());
        }
        Command::Restore { bundle, config, sha256, passphrase_file, key_file, force, merge } => {
            init_logging("warn")?;
            let key = backup::BundleKey::from_files(passphrase_file.as_deref(), key_file.as_deref())
                .map_err(anyhow::Error::msg)?;
            let side = server::open_offline(&config_path(config)?, &env).await?;
            let report = backup::restore(&side, &bundle, &sha256, &key, conflict(force, merge))
                .await
                .map_err(anyhow::Error::msg)?;
            println!("restored {} keys ({} already complete)", report.restored, report.skipped);
            return Ok(());
        }
        Command::Rewrap { dir, url, dev_dir, ca, cert, key, suffix, batch, attempts, max_files } => {
            let (ca, cert, key) = match (dev_dir, ca, cert, key) {
                (Some(d), ..) => (d.join("tls/ca.pem"), d.join("tls/client.pem"), d.join("tls/client.key")),
                (None, Some(ca), Some(cert), Some(key)) => (ca, cert, key),
                _ => anyhow::bail!("give --dev-dir, or --ca, --cert and --key"),
            };
            let identity = keybroker_client::TlsIdentity::from_files(ca, cert, key)?;
            let client = keybroker_client::Client::mtls(url, identity).connect_lazy()?;
            let options = keybroker_server::tools::rewrap::RewrapOptions {
                dir,
                suffix,
                batch,
                attempts,
                max_files,
                progress: std::io::stderr().is_terminal(),
            };
            let summary =
                keybroker_server::tools::rewrap::rewrap_dir(&client, &options).await.map_err(anyhow::Error::msg)?;
            print!("{summary}");
            if !summary.failed.is_empty() {
                anyhow::bail!("{} sidecars were not rewrapped (rerun to retry them)", summary.failed.len());
            }
            return Ok(());
        }
        Command::CreateRemoteKey { config, backend, label } => {
            let config = Config::load(config.as_deref(), &env)?;
            init_logging(&config.log)?;
            println!("{}", server::create_remote_key(&config, &env, &backend, &label).await?);
            return Ok(());
        }
    };
    let _telemetry = keybroker_server::telemetry::init(&config.log, config.log_format, &config.telemetry)
        .map_err(anyhow::Error::msg)?;
    server::run(config, &env, options, |addr, metrics| {
        let runtime = tokio::runtime::Handle::current();
        tracing::info!(
            worker_threads = runtime.metrics().num_workers(),
            runtime = match runtime.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => "single-threaded",
                _ => "multi-threaded",
            },
            "serving"
        );
        announce(addr, metrics, data_dir.map(|d| dev::banner(&d, addr)))
    })
    .await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: the root key leaves the process environment.
    let env = Environment::take_from_process();
    // Two rustls crypto providers are linked (tonic's and sqlx's): pick one
    // before anything builds a TLS config, or rustls refuses to choose.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match build_runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("keybroker: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(cli, env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keybroker: {err:#}");
            ExitCode::from(2)
        }
    }
}
