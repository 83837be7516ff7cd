//! Changes without a restart: on SIGHUP, and whenever the configuration file
//! or a TLS file changes (checked every `reload_check_interval_ms`), the
//! configuration is read again; its `[auth]` and `[policy]` replace the
//! policy in force, and the server certificate, key, client CA and CRL
//! replace the TLS configuration for new connections. Anything that does
//! not parse leaves the previous policy or certificates in force, and the
//! log says why. Other settings take effect at the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Environment};
use crate::security::policy::{Gate, Policy};
use crate::security::tls::{self, TlsHolder};

/// What reloads and from where.
pub struct Reloader {
    /// The configuration file, if the broker was started from one.
    pub path: Option<PathBuf>,
    /// The environment the configuration was read with.
    pub env: Environment,
    /// The policy in force.
    pub gate: Arc<Gate>,
    /// The TLS configuration in force.
    pub tls: Arc<TlsHolder>,
    /// How often files are checked; zero for SIGHUP only.
    pub interval: Duration,
}

struct Seen {
    file: Vec<u8>,
    tls: Vec<u8>,
    access: String,
}

fn access_of(config: &Config) -> String {
    serde_json::to_string(&(&config.auth, &config.policy)).unwrap_or_default()
}

impl Reloader {
    /// Watches for changes until the process ends.
    pub fn spawn(self, started_with: &Config) {
        let mut seen = Seen {
            file: self.path.as_ref().and_then(|p| std::fs::read(p).ok()).unwrap_or_default(),
            tls: tls::fingerprint(&started_with.tls),
            access: access_of(started_with),
        };
        let mut tls_config = started_with.tls.clone();
        tokio::spawn(async move {
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let period = if self.interval.is_zero() { Duration::from_secs(3600 * 24 * 365) } else { self.interval };
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match &mut hangup { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                if forced {
                    tracing::info!("SIGHUP: reloading the configuration and certificates");
                }
                let file = self.path.as_ref().and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
                let tls_now = tls::fingerprint(&tls_config);
                if !forced && file == seen.file && tls_now == seen.tls {
                    continue;
                }
                let tls_changed = tls_now != seen.tls || forced;
                seen.file = file;
                seen.tls = tls_now;
                let config = match Config::load(self.path.as_deref(), &self.env) {
                    Ok(config) => config,
                    Err(err) => {
                        tracing::error!(
                            error = %err,
                            "configuration reload refused; the previous policy and certificates stay in force"
                        );
                        continue;
                    }
                };
                let access = access_of(&config);
                if access != seen.access || forced {
                    match Policy::compile(&config.auth, &config.policy) {
                        Ok(policy) => {
                            self.gate.replace(policy);
                            if access != seen.access {
                                tracing::info!("policy reloaded");
                            }
                            seen.access = access;
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "policy reload refused; the previous policy stays in force")
                        }
                    }
                }
                match tls::server_config(&config.tls) {
                    Ok(server) => {
                        let changed = tls_changed || config.tls.crl != tls_config.crl;
                        self.tls.store(server);
                        tls_config = config.tls.clone();
                        seen.tls = tls::fingerprint(&tls_config);
                        if changed {
                            tracing::info!("TLS certificates reloaded; new connections use them");
                        }
                    }
                    Err(err) => tracing::error!(
                        error = %err,
                        "TLS reload refused; the previous certificates stay in force"
                    ),
                }
            }
        });
    }
}
