//! Server certificate rotation without a restart.
//!
//! The TLS listener's `ServerConfig` does not hold the certificate itself: it asks
//! [`ReloadingCert`] for it on every handshake. A reload reads `tls.cert` and `tls.key`
//! again, checks that the key matches the certificate, and swaps the pair in one step;
//! handshakes after the swap present the new certificate, connections already
//! established keep theirs (TLS never re-presents a certificate on a live connection), so
//! no vehicle is dropped.
//!
//! Reloads happen on SIGHUP and when either file's modification time, size or inode
//! changes (checked every [`POLL`]; a Kubernetes Secret volume swaps a symlink, which
//! shows up as a new inode). A pair that cannot be loaded (half-written, key not matching)
//! leaves the current certificate in place: logged as an error and counted in
//! `gateway_tls_cert_reloads_total{result="error"}`; the next change or SIGHUP tries
//! again.
//!
//! What is not reloaded: `tls.client_ca` (the CA bundle vehicles are verified against)
//! and the other `[tls]` settings; changing those needs a restart (see certs/README.md).

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Labeled;

/// How often the certificate files are checked for a change.
pub const POLL: Duration = Duration::from_secs(10);

/// The identity of a file's current content as far as a reload cares.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &str) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The server certificate and key presented to new handshakes.
pub struct ReloadingCert {
    cert_path: String,
    key_path: String,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: Mutex<(Stamp, Stamp)>,
    reloads: Labeled,
    not_after: prometheus::IntGauge,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair once (an error here stops the gateway from starting).
    pub fn load(
        cert_path: &str,
        key_path: &str,
        provider: Arc<CryptoProvider>,
        reloads: Labeled,
        not_after: prometheus::IntGauge,
    ) -> anyhow::Result<ReloadingCert> {
        let stamps = (stamp(cert_path), stamp(key_path));
        let key = certified_key(cert_path, key_path, &provider)?;
        not_after.set(expiry(&key).unwrap_or(0));
        Ok(ReloadingCert {
            cert_path: cert_path.to_string(),
            key_path: key_path.to_string(),
            provider,
            current: RwLock::new(Arc::new(key)),
            stamps: Mutex::new(stamps),
            reloads,
            not_after,
        })
    }

    /// Reads the files again and swaps the pair in when it is valid. `why` is logged.
    pub fn reload(&self, why: &str) -> anyhow::Result<()> {
        {
            let mut s = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
            *s = (stamp(&self.cert_path), stamp(&self.key_path));
        }
        match certified_key(&self.cert_path, &self.key_path, &self.provider) {
            Ok(key) => {
                let not_after = expiry(&key).unwrap_or(0);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                self.not_after.set(not_after);
                self.reloads.inc("ok");
                info!(cert = %self.cert_path, trigger = why, not_after, "TLS server certificate reloaded: new handshakes present it");
                Ok(())
            }
            Err(e) => {
                self.reloads.inc("error");
                error!(cert = %self.cert_path, key = %self.key_path, trigger = why, error = %format!("{e:#}"),
                    "TLS server certificate reload failed: still presenting the previous one");
                Err(e)
            }
        }
    }

    /// Whether either file changed since the last load.
    fn changed(&self) -> bool {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Reloads on SIGHUP and on a file change until `shutdown`.
    pub fn spawn_watch(self: &Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install the SIGHUP handler")?;
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The stat calls and the reload read files (a network volume, a
                // Kubernetes secret mount): on the blocking pool, never on a worker
                // that also drives sessions.
                let why = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = hup.recv() => Some("SIGHUP"),
                    _ = tick.tick() => None,
                };
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || match why {
                    Some(why) => drop(me.reload(why)),
                    None if me.changed() => drop(me.reload("file changed")),
                    None => {}
                })
                .await;
            }
        });
        Ok(())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(cert_path: &str, key_path: &str, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let certs = super::load_certs(cert_path)?;
    let key = super::load_key(key_path)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("tls.key: {key_path}: unsupported private key"))?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(e) => Err(anyhow!(
            "tls.cert/tls.key: certificate and key do not match ({e})"
        )),
    }
}

/// The end-entity certificate's notAfter, in seconds since the epoch.
fn expiry(key: &CertifiedKey) -> Option<i64> {
    let der = key.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}
