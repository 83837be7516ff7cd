//! The end-to-end harness: starts the real `keybroker` binary on 127.0.0.1
//! with an ephemeral port, talks to it over real mTLS with the client crate,
//! and stops it by pid. Real components only; a missing one fails the test
//! with the command that installs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use keybroker_client::pb::key_admin_client::KeyAdminClient;
use keybroker_client::pb::key_broker_client::KeyBrokerClient;
use keybroker_client::{TlsIdentity, connect};
use tonic::transport::Channel;

pub use keybroker_client::pb;

/// Overrides where the `keybroker` binary is looked for.
pub const ENV_TEST_BIN: &str = "KB_TEST_BIN";

/// The `keybroker` binary built from this workspace.
pub fn keybroker_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os(ENV_TEST_BIN) {
        return PathBuf::from(bin);
    }
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe.parent().and_then(Path::parent).expect("target profile dir").join("keybroker");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p keybroker-server --bin keybroker` \
         (the README's test command does)",
        bin.display()
    );
    bin
}

/// A running broker process.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub stderr_path: PathBuf,
    /// The metrics listener, when on (`keybroker dev` turns it on).
    pub metrics: Option<SocketAddr>,
}

impl Broker {
    /// `keybroker dev --data-dir DIR --listen 127.0.0.1:0`.
    pub fn start_dev(data_dir: &Path) -> Broker {
        let args = ["dev", "--data-dir", data_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"];
        Self::start(&args, &[], data_dir)
    }

    /// `keybroker dev` with extra environment `env` (settings to try).
    pub fn start_dev_with(data_dir: &Path, env: &[(&str, &str)]) -> Broker {
        let args = ["dev", "--data-dir", data_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"];
        Self::start(&args, env, data_dir)
    }

    /// Starts the binary with `args` and extra environment `env`, and waits
    /// for its "keybroker listening on ADDR" line.
    pub fn start(args: &[&str], env: &[(&str, &str)], data_dir: &Path) -> Broker {
        match Self::try_start(args, env, data_dir) {
            Ok(broker) => broker,
            Err(failure) => panic!("keybroker did not start: {failure}"),
        }
    }

    /// Like [`Broker::start`], but a start that fails returns the exit status
    /// and stderr instead of panicking.
    pub fn try_start(args: &[&str], env: &[(&str, &str)], data_dir: &Path) -> Result<Broker, StartFailure> {
        let log_dir = data_dir.parent().unwrap_or(data_dir);
        std::fs::create_dir_all(log_dir).unwrap();
        let stderr_path = log_dir.join(format!(
            "{}-stderr-{}.log",
            data_dir.file_name().and_then(|n| n.to_str()).unwrap_or("broker"),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut command = Command::new(keybroker_bin());
        command
            .args(args)
            .env("KEYBROKER_LOG", "info,keybroker::audit=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawning keybroker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut metrics = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("keybroker metrics on http://") {
                    metrics = url.trim().trim_end_matches("/metrics").parse::<SocketAddr>().ok();
                }
                if !sent && let Some(addr) = line.strip_prefix("keybroker listening on ") {
                    let _ = tx.send(addr.trim().parse::<SocketAddr>().ok().map(|a| (a, metrics)));
                    sent = true;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Some((addr, metrics))) => {
                    return Ok(Broker {
                        child: Some(child),
                        addr,
                        data_dir: data_dir.to_owned(),
                        stderr_path,
                        metrics,
                    });
                }
                Ok(None) => panic!("unparsable listening line"),
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        return Err(StartFailure { code: status.code(), stderr });
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = child.kill();
                        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        panic!("keybroker did not listen within 30 s; stderr:\n{stderr}");
                    }
                }
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `keybroker serve --config FILE` with extra environment; the data
    /// directory `data_dir` must hold a dev PKI (`tls/`).
    pub fn serve(config: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Broker {
        Self::start(&["serve", "--config", config.to_str().unwrap()], env, data_dir)
    }

    /// Sends SIGKILL (kill -9) and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as libc::pid_t;
            let rc = unsafe_kill(pid, libc::SIGKILL);
            assert_eq!(rc, 0, "kill -9 {pid} failed");
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits (without blocking the async runtime, whose
    /// client connections must close for the drain to end) for the process
    /// to exit; returns its exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id() as libc::pid_t, libc::SIGTERM);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// GETs `path` on the metrics listener: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.metrics.expect("this broker has no metrics listener");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    /// The value of the series `name{labels}` (labels exactly as written,
    /// e.g. `rpc="Wrap",code="OK"`) in a scrape, if present.
    pub fn metric(scrape: &str, series: &str) -> Option<f64> {
        scrape.lines().find_map(|l| {
            l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
    }

    /// Everything the broker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The dev PKI identity `who` (`client` or `admin`).
    pub fn identity(&self, who: &str) -> TlsIdentity {
        let tls = self.data_dir.join("tls");
        TlsIdentity::from_files(tls.join("ca.pem"), tls.join(format!("{who}.pem")), tls.join(format!("{who}.key")))
            .unwrap()
    }

    /// A channel as `who`.
    pub async fn channel(&self, who: &str) -> Channel {
        connect(&self.url(), &self.identity(who)).await.unwrap()
    }

    /// A data-plane client with the application identity.
    pub async fn app(&self) -> KeyBrokerClient<Channel> {
        KeyBrokerClient::new(self.channel("client").await)
    }

    /// An admin-plane client with the admin identity.
    pub async fn admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel("admin").await)
    }

    /// grpcurl arguments for mTLS as `who`.
    pub fn grpcurl_tls_args(&self, who: &str) -> Vec<String> {
        let tls = self.data_dir.join("tls");
        vec![
            "-cacert".into(),
            tls.join("ca.pem").display().to_string(),
            "-cert".into(),
            tls.join(format!("{who}.pem")).display().to_string(),
            "-key".into(),
            tls.join(format!("{who}.key")).display().to_string(),
        ]
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe_kill(child.id() as libc::pid_t, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// How a start failed.
#[derive(Debug)]
pub struct StartFailure {
    pub code: Option<i32>,
    pub stderr: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {:?}; stderr:\n{}", self.code, self.stderr)
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: libc::pid_t, signal: libc::c_int) -> libc::c_int {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is a child
    // process this harness spawned and has not reaped yet.
    unsafe { libc::kill(pid, signal) }
}

/// A real component's executable on PATH, or a failure that says how to
/// install it.
pub fn require_tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {install} (the README's test command installs it)"))
}

/// A data directory with the dev PKI and root key of `keybroker dev`,
/// made without starting a broker.
pub fn dev_pki(dir: &Path) -> PathBuf {
    let dev = dir.join("dev");
    keybroker_server::tools::dev::prepare(&dev, "127.0.0.1:0".parse().unwrap()).unwrap();
    dev
}

/// The TOML of an `aws-kms` backend called `name` on `moto`.
pub fn aws_backend_toml(name: &str, moto: &Moto) -> String {
    format!(
        "[backends.{name}]\ntype = \"aws-kms\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\ntimeout_ms = 1000\n",
        moto.endpoint()
    )
}

/// The TOML of a `pkcs11` backend called `name` on token `label`, PIN from
/// `KB_TEST_HSM_PIN`.
pub fn hsm_backend_toml(name: &str, label: &str) -> String {
    format!(
        "[backends.{name}]\ntype = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"{label}\"\n\
         pin_env = \"KB_TEST_HSM_PIN\"\ntimeout_ms = 1000\n"
    )
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kb-test-").tempdir().unwrap()
}

/// A BTreeMap context from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real AWS KMS emulator: `moto_server` from PyPI `moto[server]`, on
/// 127.0.0.1 with an ephemeral port, stopped by pid on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
}

impl Moto {
    /// Starts moto_server and waits until it answers.
    pub fn start() -> Moto {
        let bin = require_tool("moto_server", "pip install 'moto[server]'");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning moto_server");
        let moto = Moto { child: Some(child), port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto_server did not listen on {port} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for an AWS SDK client of this emulator.
    pub fn env() -> [(&'static str, &'static str); 3] {
        [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_EC2_METADATA_DISABLED", "true")]
    }

    /// SIGSTOP: the server stops answering (an outage), keeping its state.
    pub fn freeze(&self) {
        assert_eq!(unsafe_kill(self.pid(), libc::SIGSTOP), 0);
    }

    /// SIGCONT: the server answers again.
    pub fn thaw(&self) {
        assert_eq!(unsafe_kill(self.pid(), libc::SIGCONT), 0);
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map(|c| c.id() as libc::pid_t).unwrap_or(0)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe_kill(child.id() as libc::pid_t, libc::SIGCONT);
            unsafe_kill(child.id() as libc::pid_t, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// The SoftHSM2 PKCS#11 module from Debian `softhsm2`.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const SOFTHSM_PIN: &str = "pin-canary-4c1e9a";

/// A SoftHSM2 token store in a folder of its own: a `softhsm2.conf` whose
/// tokens live under `dir/tokens`.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub tokens: PathBuf,
}

impl SoftHsm {
    /// A token store in `dir` with one initialized token labelled `label`.
    pub fn new(dir: &Path, label: &str) -> SoftHsm {
        let util = require_tool("softhsm2-util", "apt-get install -y softhsm2");
        assert!(Path::new(SOFTHSM_MODULE).is_file(), "{SOFTHSM_MODULE} is missing: apt-get install -y softhsm2");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .unwrap();
        let hsm = SoftHsm { conf, tokens };
        let out = Command::new(util)
            .args(["--init-token", "--free", "--label", label, "--pin", SOFTHSM_PIN, "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &hsm.conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        hsm
    }

    /// The environment a process using this token store needs.
    pub fn env(&self) -> (&'static str, String) {
        ("SOFTHSM2_CONF", self.conf.display().to_string())
    }
}

/// Writes a broker configuration in `dir` that reuses the dev PKI of
/// `dev_dir` and has the given extra backends (TOML), and returns its path.
pub fn config_with_backends(dir: &Path, dev_dir: &Path, default_backend: &str, backends_toml: &str) -> PathBuf {
    let root = format!("[root_key]\nfile = \"{}/root.key\"\n", dev_dir.display());
    config_with(dir, dev_dir, default_backend, &root, backends_toml)
}

/// Like [`config_with_backends`], with the version table in PostgreSQL at
/// `url` and extra top-level settings `settings` (TOML lines).
pub fn config_with_postgres(dir: &Path, dev_dir: &Path, url: &str, settings: &str, backends_toml: &str) -> PathBuf {
    let path = config_with_backends(dir, dev_dir, "local", backends_toml);
    let text = std::fs::read_to_string(&path).unwrap();
    let sqlite = format!("[store]\ntype = \"sqlite\"\npath = \"{}/keybroker.sqlite\"\n", dir.display());
    assert!(text.contains(&sqlite));
    let text = text.replace(&sqlite, &format!("[store]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4\n"));
    std::fs::write(&path, format!("{settings}\n{text}")).unwrap();
    path
}

/// Like [`config_with_backends`] with an explicit `[root_key]` section.
pub fn config_with(
    dir: &Path,
    dev_dir: &Path,
    default_backend: &str,
    root_key_toml: &str,
    backends_toml: &str,
) -> PathBuf {
    let tls = dev_dir.join("tls");
    let text = format!(
        r#"listen = "127.0.0.1:0"
default_backend = "{default_backend}"
health_check_interval_ms = 200

[tls]
cert = "{tls}/server.pem"
key = "{tls}/server.key"
client_ca = "{tls}/ca.pem"

[store]
type = "sqlite"
path = "{dir}/keybroker.sqlite"

{root_key_toml}

[backends.local]
type = "local"

{backends_toml}

[auth]
admin_identities = ["spiffe://keybroker.dev/admin"]
app_identities = ["spiffe://keybroker.dev/app"]
"#,
        tls = tls.display(),
        dir = dir.display(),
    );
    let path = dir.join("keybroker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A real PostgreSQL server (Debian `postgresql`) of its own: initdb into a
/// temporary folder as an unprivileged user, listening on 127.0.0.1 with
/// an ephemeral port, password (SCRAM) authentication over TCP, one role
/// and database `kb`; stopped by its postmaster's pid on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The password of role `kb` (so tests can check it never leaks).
    pub password: String,
}

/// The password of the test role: distinctive, to search logs for.
pub const POSTGRES_TEST_PASSWORD: &str = "pg-Secret-7f3a9c";

impl Postgres {
    /// Creates the cluster and starts the server (about 3 s).
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                dirs.filter_map(|d| d.ok()).map(|d| d.path().join("bin")).filter(|b| b.join("initdb").is_file()).max()
            })
            .unwrap_or_else(|| {
                panic!(
                    "PostgreSQL is not installed: apt-get install -y postgresql (the README's test command installs it)"
                )
            });
        let dir = tempdir();
        let root = unsafe_geteuid() == 0;
        let data = dir.path().join("data");
        let socket = dir.path().join("socket");
        for d in [&data, &socket] {
            std::fs::create_dir_all(d).unwrap();
        }
        if root {
            // initdb refuses root: the cluster belongs to the `postgres` user.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres", data.to_str().unwrap(), socket.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown to postgres failed");
        }
        let pw_file = dir.path().join("pw");
        std::fs::write(&pw_file, POSTGRES_TEST_PASSWORD).unwrap();
        let pg = Postgres { dir, bin, port: free_port(), password: POSTGRES_TEST_PASSWORD.to_owned() };
        pg.run_pg(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"],
        );
        pg.start_server();
        pg.psql(&format!("CREATE ROLE kb LOGIN PASSWORD '{POSTGRES_TEST_PASSWORD}'"));
        pg.psql("CREATE DATABASE kb OWNER kb");
        pg
    }

    fn run_pg(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut command = if unsafe_geteuid() == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = command.args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs one SQL statement as the superuser over the Unix socket.
    pub fn psql(&self, sql: &str) -> String {
        let socket = self.dir.path().join("socket");
        let out = self.run_pg(
            "psql",
            &[
                "-h",
                socket.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let data = self.dir.path().join("data");
        let socket = self.dir.path().join("socket");
        let options = format!("-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off", self.port, socket.display());
        let log = self.dir.path().join("socket").join("server.log");
        self.run_pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-w", "-l", log.to_str().unwrap(), "-o", &options, "start"],
        );
    }

    /// What the server logged so far (statements too, once
    /// `log_statement` is on).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("socket").join("server.log")).unwrap_or_default()
    }

    /// Logs every statement from now on (to count the queries a broker makes).
    pub fn log_statements(&self) {
        self.psql("ALTER SYSTEM SET log_statement = 'all'");
        self.psql("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(200));
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stops the server by its pid (fast shutdown: SIGINT) and waits until
    /// it is gone.
    pub fn stop_server(&self) {
        let Some(pid) = self.pid() else { return };
        unsafe_kill(pid, libc::SIGINT);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while unsafe_kill(pid, 0) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `postgres://kb:PASSWORD@127.0.0.1:PORT/kb`.
    pub fn url(&self) -> String {
        format!("postgres://kb:{}@127.0.0.1:{}/kb", self.password, self.port)
    }

    /// A fresh empty database owned by `kb`, and its URL.
    pub fn new_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE {name} OWNER kb"));
        format!("postgres://kb:{}@127.0.0.1:{}/{name}", self.password, self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}

#[allow(unsafe_code)]
fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
