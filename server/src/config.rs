//! Configuration: one typed tree read from a TOML file, with every setting
//! overridable from the environment.
//!
//! An environment variable `KEYBROKER_<PATH>` sets the setting at `<PATH>`,
//! lower-cased, with `__` between nested names: `KEYBROKER_LISTEN` sets
//! `listen`, `KEYBROKER_TLS__CLIENT_CA` sets `tls.client_ca`,
//! `KEYBROKER_LIMITS__MAX_PLAINTEXT_BYTES` sets `limits.max_plaintext_bytes`.
//! Values are read as TOML when they parse as TOML (numbers, booleans,
//! `["a","b"]` arrays) and as strings otherwise. The environment is read
//! through [`Environment`], so tests inject their own instead of touching the
//! process environment.
//!
//! A bad setting fails at start with a message that names it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use crate::security::audit::AuditConfig;
pub use crate::security::policy::{AuthConfig, PolicyConfig};
pub use crate::store::postgres::DatabaseUrl;

/// Prefix of every environment variable keybroker reads.
pub const ENV_PREFIX: &str = "KEYBROKER_";
/// The root key of the local backend itself (base64 of 32 bytes), as an
/// alternative to `root_key.file`. A secret, never a config setting.
pub const ENV_ROOT_KEY: &str = "KEYBROKER_ROOT_KEY";
/// Path of the configuration file, for `keybroker serve` without `--config`.
pub const ENV_CONFIG: &str = "KEYBROKER_CONFIG";

/// Threads that run calls (default: the CPUs this process may use, by
/// affinity and cgroup quota). With one, keybroker runs a single-threaded
/// runtime. Read before the configuration, so not a config setting.
pub const ENV_WORKER_THREADS: &str = "KEYBROKER_WORKER_THREADS";

/// Environment variables that are not settings of the tree.
const NOT_SETTINGS: &[&str] = &[ENV_ROOT_KEY, ENV_CONFIG, ENV_STORE_URL, ENV_WORKER_THREADS];
/// The PostgreSQL URL of `[store]` (the same as `KEYBROKER_STORE__URL`),
/// the name operators and platforms expect for a database secret.
pub const ENV_STORE_URL: &str = "KEYBROKER_STORE_URL";

/// The whole configuration of a broker.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the mTLS gRPC listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Log filter (`tracing` env-filter syntax), e.g. `info` or
    /// `keybroker=debug`; `RUST_LOG`, when set, takes precedence.
    #[serde(default = "default_log")]
    pub log: String,
    /// `text` (human-readable lines) or `json` (one object per line).
    #[serde(default)]
    pub log_format: crate::telemetry::LogFormat,
    /// Trace export over OTLP.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The Prometheus endpoint, `/healthz` and `/readyz`.
    #[serde(default)]
    pub metrics: crate::telemetry::metrics::MetricsConfig,
    /// On SIGTERM, in-flight calls get this many seconds to finish before
    /// the remaining connections are closed.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
    /// Server certificate and the CA that client certificates must chain to.
    pub tls: TlsConfig,
    /// The version table.
    pub store: StoreConfig,
    /// Root key that seals the local backend's KEKs.
    #[serde(default)]
    pub root_key: RootKeyConfig,
    /// Named backends; keys choose one by name.
    #[serde(default = "default_backends")]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Backend of keys created without naming one.
    #[serde(default = "default_backend_name")]
    pub default_backend: String,
    /// Which certificate fields name a caller, and the two shorthand roles.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Roles (RPCs on key-name globs) and the identities holding them.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The tamper-evident audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What the broker keeps in memory of the version table.
    #[serde(default)]
    pub cache: CacheConfig,
    /// A Unix socket listener for the sidecar case, besides the mTLS port.
    #[serde(default)]
    pub unix_socket: Option<UnixSocketConfig>,
    /// How often every backend's health is checked, in milliseconds.
    #[serde(default = "default_health_interval")]
    pub health_check_interval_ms: u64,
    /// A version unwrapped within this many seconds is not retired
    /// (min_decryption_version raised past it, or destroyed) without force.
    #[serde(default = "default_retirement_window")]
    pub retirement_window_seconds: u64,
    /// How often unwrap counts are written to the store, in milliseconds.
    #[serde(default = "default_usage_flush")]
    pub usage_flush_interval_ms: u64,
    /// How often the broker looks for changes other brokers made to the
    /// table, in milliseconds (PostgreSQL also notifies at once). A change
    /// reaches every broker within this interval plus one reload.
    #[serde(default = "default_propagation_interval")]
    pub propagation_interval_ms: u64,
    /// How often the broker looks for keys due for automatic rotation (by
    /// age or by wraps), in milliseconds. Every broker looks; the version
    /// table's compare-and-swap lets exactly one of them rotate each key.
    #[serde(default = "default_rotation_check_interval")]
    pub rotation_check_interval_ms: u64,
    /// How long a broker's lease on a migration job lasts without renewal,
    /// in milliseconds: when the broker running a job dies, another takes
    /// the job over after at most this long.
    #[serde(default = "default_migration_lease")]
    pub migration_lease_ms: u64,
    /// The Kubernetes KMS v2 plugin socket.
    #[serde(default)]
    pub kms_v2: Option<crate::api::kms_v2::KmsV2Config>,
    /// The AWS KMS External Key Store proxy API (HTTPS, SigV4).
    #[serde(default)]
    pub xks: Option<crate::api::xks::XksConfig>,
    /// A plain-text listener serving only the gRPC health service
    /// (`grpc.health.v1.Health`), for probes that cannot speak mTLS (the
    /// kubelet's native gRPC probes). Service `keybroker.liveness` is
    /// SERVING while the process runs; `""` follows readiness. Off when unset.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// How often the configuration file and the TLS files are checked for
    /// changes, in milliseconds (SIGHUP checks at once). `[auth]`,
    /// `[policy]` and the TLS certificate, key, client CA and CRL take
    /// effect without a restart; a file that does not parse leaves the
    /// previous ones in force. 0 checks on SIGHUP only.
    #[serde(default = "default_reload_check")]
    pub reload_check_interval_ms: u64,
}

fn default_reload_check() -> u64 {
    2_000
}

fn default_migration_lease() -> u64 {
    5_000
}

fn default_rotation_check_interval() -> u64 {
    1_000
}

fn default_propagation_interval() -> u64 {
    500
}

fn default_retirement_window() -> u64 {
    24 * 3600
}

fn default_usage_flush() -> u64 {
    1000
}

fn default_health_interval() -> u64 {
    1000
}

/// `[unix_socket]`: a pod-local listener, mode 0600. Callers are identified
/// as `uid:<uid>` from the socket's peer credentials; list those identities
/// in `[auth]` like certificate identities.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnixSocketConfig {
    /// Path of the socket; a stale socket there is replaced.
    pub path: PathBuf,
    /// File mode of the socket, octal. `0600` admits only the broker's own
    /// user; `0660` also admits the socket's group (in a Kubernetes pod, the
    /// pod's `fsGroup` on a shared emptyDir), for a sidecar whose
    /// application runs as another user. Callers are still identified and
    /// authorized by their uid.
    #[serde(default = "default_socket_mode")]
    pub mode: String,
}

fn default_socket_mode() -> String {
    "0600".to_owned()
}

impl UnixSocketConfig {
    /// The mode as a number; only owner and group bits are allowed.
    pub fn mode_bits(&self) -> Result<u32, String> {
        let bits = u32::from_str_radix(self.mode.trim_start_matches("0o"), 8)
            .map_err(|_| format!("{:?} is not an octal file mode such as \"0600\"", self.mode))?;
        if bits & 0o007 != 0 || bits & 0o600 != 0o600 || bits > 0o777 {
            return Err(format!(
                "{:?}: the owner needs read and write, and others may not connect (0600 or 0660)",
                self.mode
            ));
        }
        Ok(bits)
    }
}

/// `[tls]`: mTLS with rustls, TLS 1.3 only.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM server certificate chain.
    pub cert: PathBuf,
    /// PEM private key of the server certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// A client that has not finished its handshake after this many seconds
    /// is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// PEM certificate revocation list(s) of the client CA; a revoked
    /// client certificate is refused at the handshake. Reloaded like the
    /// certificates.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// `[store]`: where the version table lives.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StoreConfig {
    /// One SQLite file (the embedded default).
    Sqlite {
        /// Path of the database file; created when missing.
        path: PathBuf,
    },
    /// A PostgreSQL database shared by a fleet of brokers.
    Postgres {
        /// `postgres://user:password@host:port/database` (also
        /// `KEYBROKER_STORE_URL`); redacted wherever it is shown.
        url: DatabaseUrl,
        /// Most connections this broker opens.
        #[serde(default = "default_pool_size")]
        pool_size: u32,
        /// How long a call waits for a connection before the store counts
        /// as unavailable, in milliseconds.
        #[serde(default = "default_store_timeout")]
        timeout_ms: u64,
    },
}

fn default_pool_size() -> u32 {
    8
}

fn default_store_timeout() -> u64 {
    1_000
}

/// `[root_key]`: the local backend's root key, from one of: `file` (base64
/// of 32 bytes, mode 0600); `sealed_file` sealed by the remote backend
/// `sealed_by` under its key `sealed_by_key` (a KMS key ARN or an HSM object
/// label), so no plaintext root key is kept on disk (make one with
/// `keybroker seal-root-key`); or `KEYBROKER_ROOT_KEY`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RootKeyConfig {
    /// File holding the base64 of 32 random bytes; must be mode 0600.
    pub file: Option<PathBuf>,
    /// File holding the root key sealed by a remote backend.
    pub sealed_file: Option<PathBuf>,
    /// Name of the backend that sealed it (`aws-kms` or `pkcs11`).
    pub sealed_by: Option<String>,
    /// The remote key that sealed it: KMS key ARN or HSM object label.
    pub sealed_by_key: Option<String>,
}

/// `[backends.NAME]`: one backend instance, `type = "local" | "aws-kms" |
/// "pkcs11"`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BackendConfig {
    /// KEKs generated by keybroker, sealed under the root key in the store.
    Local {},
    /// AWS KMS; credentials from the standard AWS chain.
    AwsKms {
        /// AWS region.
        region: String,
        /// Endpoint override (VPC endpoint, emulator).
        #[serde(default)]
        endpoint: Option<String>,
        /// Deadline of every KMS call, in milliseconds.
        #[serde(default = "default_backend_timeout_ms")]
        timeout_ms: u64,
        /// How long hierarchy-mode KEKs stay unsealed in memory.
        #[serde(default = "default_hierarchy_ttl")]
        hierarchy_ttl_seconds: u64,
    },
    /// A PKCS#11 HSM.
    Pkcs11 {
        /// Path of the PKCS#11 module.
        module: PathBuf,
        /// Label of the token to use.
        #[serde(default)]
        token_label: Option<String>,
        /// Slot id, when no token label is given.
        #[serde(default)]
        slot: Option<u64>,
        /// File holding the user PIN (mode 0600).
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// Environment variable holding the user PIN.
        #[serde(default)]
        pin_env: Option<String>,
        /// Most sessions open at once.
        #[serde(default = "default_sessions")]
        sessions: usize,
        /// Deadline of every HSM call, in milliseconds.
        #[serde(default = "default_backend_timeout_ms")]
        timeout_ms: u64,
        /// How long hierarchy-mode KEKs stay unsealed in memory.
        #[serde(default = "default_hierarchy_ttl")]
        hierarchy_ttl_seconds: u64,
    },
}

fn default_backend_timeout_ms() -> u64 {
    1000
}
fn default_hierarchy_ttl() -> u64 {
    300
}
fn default_sessions() -> usize {
    8
}

/// `[cache]`: the broker starts serving at once and reads the version
/// table into memory behind it (a key used before its page arrives is read
/// on its own); these bound what it keeps.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most keys whose records (versions, states, counts) are held in
    /// memory, about 0.85 KiB each (BENCHMARKS.md "Many keys"). Beyond, the
    /// least recently used sixty-fourth is let go, and a key let go is read
    /// again from the store on its next use.
    #[serde(default = "default_cache_keys")]
    pub max_keys: usize,
    /// Most key versions whose unsealed KEK is held ready (an AES-256-GCM
    /// key schedule, about 1 KiB each) by the local backend, and by each
    /// hierarchy-mode backend (within its TTL); when full, an eighth chosen
    /// at random is let go. A version let go is unsealed again on use
    /// (locally about a microsecond; in hierarchy mode a remote call).
    #[serde(default = "default_cache_ciphers")]
    pub max_ciphers: usize,
    /// Read the whole table into the cache after start (in the background,
    /// while serving), up to `max_keys`; false reads keys on first use only.
    #[serde(default = "default_true")]
    pub warm: bool,
}

fn default_cache_keys() -> usize {
    crate::core::keyring::DEFAULT_MAX_CACHED_KEYS
}

fn default_cache_ciphers() -> usize {
    crate::backend::local::DEFAULT_MAX_CIPHERS
}

fn default_true() -> bool {
    true
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_keys: default_cache_keys(), max_ciphers: default_cache_ciphers(), warm: true }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest plaintext Wrap accepts and largest DEK GenerateDataKey makes.
    #[serde(default = "default_max_plaintext")]
    pub max_plaintext_bytes: usize,
    /// Largest encoded encryption context.
    #[serde(default = "default_max_context")]
    pub max_context_bytes: usize,
    /// Most items in one batch request.
    #[serde(default = "default_max_batch")]
    pub max_batch_items: usize,
    /// Largest gRPC message accepted.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Wraps one key version may make before it refuses to wrap: random
    /// 96-bit AES-GCM nonces are safe for 2^32 invocations under one key
    /// (NIST SP 800-38D), the default. Keys rotate long before (their
    /// rotation policy's `max_wraps_per_version`, by default 2^30).
    #[serde(default = "default_max_wraps")]
    pub max_wraps_per_version: u64,
    /// Most keybroker calls in flight at once, over every caller; more are
    /// refused with RESOURCE_EXHAUSTED at once, never queued. 0: no bound.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Calls one identity may make per second, sustained (a batch counts
    /// one per item); more are refused with RESOURCE_EXHAUSTED. 0: no rate.
    #[serde(default)]
    pub per_identity_rate: u32,
    /// Calls one identity may make at once above its rate; 0 means one
    /// second's worth.
    #[serde(default)]
    pub per_identity_burst: u32,
    /// Every call, batches included, is cut off with DEADLINE_EXCEEDED
    /// after this many milliseconds (or the caller's shorter deadline).
    #[serde(default = "default_call_deadline")]
    pub call_deadline_ms: u64,
}

fn default_max_in_flight() -> usize {
    4096
}

fn default_call_deadline() -> u64 {
    15_000
}

fn default_max_wraps() -> u64 {
    1 << 32
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_plaintext_bytes: default_max_plaintext(),
            max_context_bytes: default_max_context(),
            max_batch_items: default_max_batch(),
            max_message_bytes: default_max_message(),
            max_wraps_per_version: default_max_wraps(),
            max_in_flight: default_max_in_flight(),
            per_identity_rate: 0,
            per_identity_burst: 0,
            call_deadline_ms: default_call_deadline(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_log() -> String {
    "info".to_owned()
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_backend_name() -> String {
    "local".to_owned()
}
fn default_backends() -> BTreeMap<String, BackendConfig> {
    [("local".to_owned(), BackendConfig::Local {})].into()
}
fn default_max_plaintext() -> usize {
    4096
}
fn default_max_context() -> usize {
    8192
}
fn default_max_batch() -> usize {
    10_000
}
fn default_max_message() -> usize {
    16 * 1024 * 1024
}

/// Why a configuration was refused. Every message names the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting has the wrong type, an unknown name, or is missing.
    #[error("invalid setting `{setting}`{origin}: {message}")]
    Setting {
        /// Dotted path of the setting.
        setting: String,
        /// Where the value came from, if from the environment.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A setting parsed but its value is unusable.
    #[error("invalid setting `{setting}`: {message}")]
    Invalid {
        /// Dotted path of the setting.
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The environment keybroker reads: the process's, or one a test builds.
#[derive(Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, zeroize::Zeroizing<String>>,
    all: BTreeMap<String, zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be secrets (PINs, the root key): show names only.
        f.debug_struct("Environment").field("vars", &self.vars.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl Environment {
    /// The process environment (`KEYBROKER_*` variables are settings).
    pub fn from_process() -> Self {
        Self::from_vars(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))))
    }

    /// An environment from explicit variables.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let all: BTreeMap<String, zeroize::Zeroizing<String>> =
            vars.into_iter().map(|(k, v)| (k.into(), zeroize::Zeroizing::new(v.into()))).collect();
        let vars = all.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
        Self { vars, all }
    }

    /// The value of one variable.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|v| v.as_str())
    }

    /// Any variable of the environment this was read from (for settings
    /// that name a variable, like a pkcs11 backend's `pin_env`).
    pub fn get_any(&self, name: &str) -> Option<Zeroizing<String>> {
        self.all.get(name).cloned()
    }

    /// Reads the process environment, then erases `KEYBROKER_ROOT_KEY`
    /// from it: the value is overwritten where the kernel shows it
    /// (`/proc/PID/environ`) and the variable removed, so the root key
    /// lives on only in this zeroized copy. Call it before any other thread
    /// starts (first thing in `main`).
    pub fn take_from_process() -> Self {
        let env = Self::from_process();
        scrub_process_variable(ENV_ROOT_KEY);
        env
    }

    /// The root key secret from `KEYBROKER_ROOT_KEY`, if set.
    pub fn root_key_secret(&self) -> Option<Zeroizing<String>> {
        self.get(ENV_ROOT_KEY).map(|v| Zeroizing::new(v.to_owned()))
    }

    fn settings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Overwrites the value of environment variable `name` in place with zeros
/// and removes the variable.
#[allow(unsafe_code)]
fn scrub_process_variable(name: &str) {
    let Ok(c_name) = std::ffi::CString::new(name) else { return };
    // SAFETY: called while the process has one thread (the start of main),
    // so nothing reads or changes the environment meanwhile. getenv returns
    // a pointer into the environment block, valid and NUL-terminated until
    // the environment changes; the value's bytes are overwritten in place
    // (never past the NUL), which is what /proc/PID/environ shows, and only
    // then is the variable removed.
    unsafe {
        let value = libc::getenv(c_name.as_ptr());
        if !value.is_null() {
            let len = libc::strlen(value);
            std::ptr::write_bytes(value.cast::<u8>(), b'0', len);
        }
        std::env::remove_var(name);
    }
}

/// The environment variable that sets a dotted setting path.
pub fn env_var_for(setting: &str) -> String {
    format!("{ENV_PREFIX}{}", setting.replace('.', "__").to_uppercase())
}

impl Config {
    /// Reads `file` (if any), applies the environment's overrides, checks
    /// every value, and resolves relative paths against the file's folder.
    pub fn load(file: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|cause| ConfigError::Read { path: path.to_owned(), cause })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        let mut from_env = BTreeMap::new();
        for (name, value) in env.settings() {
            let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_lowercase).collect();
            from_env.insert(path.join("."), name.to_owned());
            set_path(&mut table, &path, parse_env_value(value)).map_err(|message| ConfigError::Setting {
                setting: path.join("."),
                origin: format!(" (from {name})"),
                message,
            })?;
        }
        if let Some(url) = env.get(ENV_STORE_URL) {
            let path = ["store".to_owned(), "url".to_owned()];
            from_env.insert("store.url".to_owned(), ENV_STORE_URL.to_owned());
            set_path(&mut table, &path, toml::Value::String(url.to_owned())).map_err(|message| {
                ConfigError::Setting {
                    setting: "store.url".to_owned(),
                    origin: format!(" (from {ENV_STORE_URL})"),
                    message,
                }
            })?;
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let setting = e.path().to_string();
            let origin = from_env.get(&setting).map(|v| format!(" (from {v})")).unwrap_or_default();
            // The deserializer appends "in `path`" on a line of its own: the
            // message names the setting already.
            let message = e.into_inner().to_string();
            let message = message.lines().next().unwrap_or_default().to_owned();
            ConfigError::Setting { setting, origin, message }
        })?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML with its secrets redacted (the database
    /// URL's password), for `keybroker serve --check-config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if let StoreConfig::Postgres { url, .. } = &mut shown.store {
            *url = DatabaseUrl::new(url.redacted());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        resolve(&mut self.tls.client_ca);
        if let Some(crl) = &mut self.tls.crl {
            resolve(crl);
        }
        if let Some(audit) = &mut self.audit.file {
            resolve(audit);
        }
        if let Some(kms) = &mut self.kms_v2 {
            resolve(&mut kms.socket);
        }
        if let Some(xks) = &mut self.xks {
            resolve(&mut xks.cert);
            resolve(&mut xks.key);
            if let Some(ca) = &mut xks.client_ca {
                resolve(ca);
            }
            for prefix in &mut xks.prefixes {
                for c in &mut prefix.credentials {
                    if let Some(f) = &mut c.secret_access_key_file {
                        resolve(f);
                    }
                }
            }
        }
        match &mut self.store {
            StoreConfig::Sqlite { path } => resolve(path),
            StoreConfig::Postgres { .. } => {}
        }
        if let Some(file) = &mut self.root_key.file {
            resolve(file);
        }
        if let Some(unix) = &mut self.unix_socket {
            resolve(&mut unix.path);
        }
        if let Some(sealed) = &mut self.root_key.sealed_file {
            resolve(sealed);
        }
        for backend in self.backends.values_mut() {
            if let BackendConfig::Pkcs11 { module, pin_file, .. } = backend {
                resolve(module);
                if let Some(pin) = pin_file {
                    resolve(pin);
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (setting, path) in
            [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key), ("tls.client_ca", &self.tls.client_ca)]
        {
            if !path.is_file() {
                return Err(ConfigError::Invalid {
                    setting,
                    message: format!("file {} does not exist", path.display()),
                });
            }
        }
        if let Some(unix) = &self.unix_socket {
            unix.mode_bits().map_err(|message| ConfigError::Invalid { setting: "unix_socket.mode", message })?;
        }
        crate::security::policy::Policy::compile(&self.auth, &self.policy)
            .map_err(|message| ConfigError::Invalid { setting: "policy", message })?;
        if !self.backends.contains_key(&self.default_backend) {
            return Err(ConfigError::Invalid {
                setting: "default_backend",
                message: format!(
                    "names backend {:?}, which is not configured (configured: {})",
                    self.default_backend,
                    self.backends.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if self.backends.keys().any(|name| !crate::core::envelope::is_valid_key_name(name)) {
            return Err(ConfigError::Invalid {
                setting: "backends",
                message: "backend names are 1..=128 characters of [A-Za-z0-9._-]".to_owned(),
            });
        }
        for (name, backend) in &self.backends {
            if let BackendConfig::Pkcs11 { token_label, slot, pin_file, pin_env, .. } = backend {
                if token_label.is_none() && slot.is_none() {
                    return Err(ConfigError::Invalid {
                        setting: "backends.*.token_label",
                        message: format!("pkcs11 backend {name:?} needs token_label or slot"),
                    });
                }
                if pin_file.is_none() && pin_env.is_none() {
                    return Err(ConfigError::Invalid {
                        setting: "backends.*.pin_file",
                        message: format!("pkcs11 backend {name:?} needs pin_file or pin_env"),
                    });
                }
            }
        }
        let sealed = &self.root_key;
        if sealed.sealed_file.is_some() != sealed.sealed_by.is_some()
            || sealed.sealed_by.is_some() != sealed.sealed_by_key.is_some()
        {
            return Err(ConfigError::Invalid {
                setting: "root_key.sealed_file",
                message: "root_key.sealed_file, sealed_by and sealed_by_key go together".to_owned(),
            });
        }
        if let Some(by) = &sealed.sealed_by {
            match self.backends.get(by) {
                Some(BackendConfig::AwsKms { .. } | BackendConfig::Pkcs11 { .. }) => {}
                _ => {
                    return Err(ConfigError::Invalid {
                        setting: "root_key.sealed_by",
                        message: format!("{by:?} is not a configured aws-kms or pkcs11 backend"),
                    });
                }
            }
        }
        if self.auth.admin_identities.is_empty()
            && self.auth.app_identities.is_empty()
            && self.policy.identities.is_empty()
        {
            return Err(ConfigError::Invalid {
                setting: "auth",
                message: "auth.admin_identities and auth.app_identities are both empty: no caller could \
                          do anything"
                    .to_owned(),
            });
        }
        if self.limits.max_plaintext_bytes == 0 || self.limits.max_plaintext_bytes > 64 * 1024 {
            return Err(ConfigError::Invalid {
                setting: "limits.max_plaintext_bytes",
                message: format!("{} is outside 1..=65536", self.limits.max_plaintext_bytes),
            });
        }
        if self.limits.max_batch_items == 0 {
            return Err(ConfigError::Invalid {
                setting: "limits.max_batch_items",
                message: "must be at least 1".to_owned(),
            });
        }
        if self.propagation_interval_ms == 0 || self.propagation_interval_ms > 1_500 {
            return Err(ConfigError::Invalid {
                setting: "propagation_interval_ms",
                message: format!(
                    "{} is outside 1..=1500: changes must reach every broker within 2 s",
                    self.propagation_interval_ms
                ),
            });
        }
        if self.migration_lease_ms < 200 {
            return Err(ConfigError::Invalid {
                setting: "migration_lease_ms",
                message: "must be at least 200 (a lease renewed before every key)".to_owned(),
            });
        }
        if self.rotation_check_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                setting: "rotation_check_interval_ms",
                message: "must be at least 1".to_owned(),
            });
        }
        if self.limits.max_wraps_per_version == 0 || self.limits.max_wraps_per_version > 1 << 32 {
            return Err(ConfigError::Invalid {
                setting: "limits.max_wraps_per_version",
                message: format!(
                    "{} is outside 1..=2^32 (the AES-GCM bound for random nonces under one key)",
                    self.limits.max_wraps_per_version
                ),
            });
        }
        if self.health_check_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                setting: "health_check_interval_ms",
                message: "must be at least 1 (0 would probe the backends in a busy loop)".to_owned(),
            });
        }
        Ok(())
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty setting name".to_owned());
    };
    let mut cursor = table;
    for part in parents {
        let entry = cursor.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    cursor.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_files(dir: &Path) {
        for f in ["server.pem", "server.key", "ca.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
    }

    const MINIMAL: &str = r#"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        [store]
        type = "sqlite"
        path = "kb.sqlite"
        [auth]
        app_identities = ["spiffe://example/app"]
    "#;

    #[test]
    fn loads_file_with_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let file = dir.path().join("kb.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let config = Config::load(Some(&file), &Environment::default()).unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.tls.cert, dir.path().join("server.pem"));
        assert_eq!(config.limits.max_plaintext_bytes, 4096);
        assert!(matches!(config.backends.get("local"), Some(BackendConfig::Local {})));
    }

    #[test]
    fn environment_overrides_nested_settings() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let file = dir.path().join("kb.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let env = Environment::from_vars([
            ("KEYBROKER_LISTEN", "127.0.0.1:7000"),
            ("KEYBROKER_LIMITS__MAX_PLAINTEXT_BYTES", "64"),
            ("KEYBROKER_AUTH__ADMIN_IDENTITIES", r#"["cn:ops"]"#),
            ("KEYBROKER_ROOT_KEY", "not-a-setting"),
            ("OTHER", "ignored"),
        ]);
        let config = Config::load(Some(&file), &env).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.limits.max_plaintext_bytes, 64);
        assert_eq!(config.auth.admin_identities, vec!["cn:ops".to_owned()]);
        assert_eq!(env.root_key_secret().as_deref().map(String::as_str), Some("not-a-setting"));
    }

    #[test]
    fn socket_modes_admit_the_owner_and_at_most_the_group() {
        let mode = |m: &str| UnixSocketConfig { path: "/x".into(), mode: m.into() }.mode_bits();
        assert_eq!(mode("0600"), Ok(0o600));
        assert_eq!(mode("0660"), Ok(0o660));
        for bad in ["0666", "0400", "0777", "rw", "9"] {
            assert!(mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let file = dir.path().join("kb.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let err = Config::load(Some(&file), &Environment::from_vars([("KEYBROKER_LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`") && err.contains("KEYBROKER_LISTEN"), "{err}");
        let err = Config::load(Some(&file), &Environment::from_vars([("KEYBROKER_LIMITS__TYPO", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("typo"), "{err}");
        std::fs::write(&file, MINIMAL.replace("ca.pem", "missing.pem")).unwrap();
        let err = Config::load(Some(&file), &Environment::default()).unwrap_err().to_string();
        assert!(err.contains("tls.client_ca") && err.contains("missing.pem"), "{err}");
        std::fs::write(&file, format!("default_backend = \"hsm\"\n{MINIMAL}")).unwrap();
        let err = Config::load(Some(&file), &Environment::default()).unwrap_err().to_string();
        assert!(err.contains("default_backend") && err.contains("hsm"), "{err}");
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_for("tls.client_ca"), "KEYBROKER_TLS__CLIENT_CA");
        assert_eq!(env_var_for("listen"), "KEYBROKER_LISTEN");
    }
}
