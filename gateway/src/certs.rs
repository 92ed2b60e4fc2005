//! `gateway certs init`: a development PKI made with rcgen, so that TLS and mutual TLS
//! can be tried without OpenSSL. Never for production: the CA key sits next to the
//! certificates it signs.
//!
//! What it writes (the same names as `certs/gen-dev-certs.sh`):
//!
//! * `ca.pem`, `ca.key`: a self-signed CA (P-256), `tls.client_ca` for the gateway and the
//!   trust anchor a vehicle uses for the server;
//! * `server.pem`, `server.key`: CN `gateway`, the `--san` names (DNS names, or IP
//!   addresses when they parse as one), extended key usage serverAuth; `tls.cert` /
//!   `tls.key`;
//! * `vehicle-<id>.pem`, `vehicle-<id>.key`: CN = the client id, extended key usage
//!   clientAuth. Under `tls.identity = "cn"` or `"cn_or_san"` (the default) with
//!   `tls.require_client_id_match` the vehicle must connect with exactly that client id.
//!
//! Private keys are created with mode 0600 (never world-readable, not even for an
//! instant); existing files are kept unless `force` is set, so a second run cannot
//! replace a CA that already signed certificates by accident.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Why a PKI could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} exists (pass --force to overwrite it)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid vehicle id {0:?}: it must be non-empty without '/', '+', '#' or control characters")]
    InvalidId(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub out: PathBuf,
    /// Subject alternative names of the server certificate.
    pub sans: Vec<String>,
    /// Vehicle ids, each getting a client certificate with CN = id.
    pub vehicles: Vec<String>,
    /// Validity of every certificate, from one day before now (clock skew).
    pub days: u32,
    /// Overwrite existing files.
    pub force: bool,
}

/// The vehicle ids `--vehicles N --id-prefix P` stand for: `P0001` … `PN` (four digits
/// at least, as the dev script's `VIN0001`).
pub fn vehicle_ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// The files written, in order.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.files {
            writeln!(f, "wrote {}", p.display())?;
        }
        Ok(())
    }
}

pub fn init(opts: &InitOptions) -> Result<Written, CertsError> {
    for id in &opts.vehicles {
        if id.is_empty() || id.chars().any(|c| matches!(c, '/' | '+' | '#') || c.is_control()) {
            return Err(CertsError::InvalidId(id.clone()));
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(|source| CertsError::Io {
        path: opts.out.clone(),
        source,
    })?;
    let mut names = vec![
        "ca.pem".to_string(),
        "ca.key".into(),
        "server.pem".into(),
        "server.key".into(),
    ];
    for id in &opts.vehicles {
        names.push(format!("vehicle-{id}.pem"));
        names.push(format!("vehicle-{id}.key"));
    }
    if !opts.force {
        // Check all first: a refused run writes nothing.
        for n in &names {
            let p = opts.out.join(n);
            if p.exists() {
                return Err(CertsError::Exists(p));
            }
        }
    }
    let mut w = Written::default();
    let now = SystemTime::now();
    let not_before = now - Duration::from_secs(86_400);
    let not_after = now + Duration::from_secs(86_400 * u64::from(opts.days));

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edge-gateway dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before.into();
    ca_params.not_after = not_after.into();
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    write_pair(&opts.out, "ca", &ca, &ca_key, &mut w)?;

    // rcgen takes a SAN that parses as an IP address as an IP SAN, else a DNS name.
    let mut server = CertificateParams::new(opts.sans.clone())?;
    server.distinguished_name.push(DnType::CommonName, "gateway");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.not_before = not_before.into();
    server.not_after = not_after.into();
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca, &ca_key)?;
    write_pair(&opts.out, "server", &cert, &key, &mut w)?;

    for id in &opts.vehicles {
        let mut v = CertificateParams::new(Vec::<String>::new())?;
        v.distinguished_name.push(DnType::CommonName, id.as_str());
        v.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        v.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        v.not_before = not_before.into();
        v.not_after = not_after.into();
        let key = KeyPair::generate()?;
        let cert = v.signed_by(&key, &ca, &ca_key)?;
        write_pair(&opts.out, &format!("vehicle-{id}"), &cert, &key, &mut w)?;
    }
    Ok(w)
}

fn write_pair(
    dir: &Path,
    name: &str,
    cert: &Certificate,
    key: &KeyPair,
    w: &mut Written,
) -> Result<(), CertsError> {
    let pem = dir.join(format!("{name}.pem"));
    write_file(&pem, cert.pem().as_bytes(), 0o644)?;
    w.files.push(pem);
    let k = dir.join(format!("{name}.key"));
    write_file(&k, key.serialize_pem().as_bytes(), 0o600)?;
    w.files.push(k);
    Ok(())
}

/// Writes `bytes` to `path` with `mode`: a new file is created with it, an existing one
/// (`--force`) has it set before its content is replaced.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tls::CertIdentity;

    fn opts(out: &Path) -> InitOptions {
        InitOptions {
            out: out.to_path_buf(),
            sans: vec!["localhost".into(), "127.0.0.1".into(), "mqtt.example.com".into()],
            vehicles: vehicle_ids("VIN", 2),
            days: 30,
            force: false,
        }
    }

    #[test]
    fn writes_a_ca_a_server_and_vehicles_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let w = init(&opts(dir.path())).unwrap();
        assert_eq!(w.files.len(), 8);
        for f in &w.files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            let want = if f.extension().unwrap() == "key" {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode, want, "{}", f.display());
        }
        let der = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).unwrap();
            let der = rustls_pemfile::certs(&mut pem.as_slice())
                .next()
                .unwrap()
                .unwrap();
            der.as_ref().to_vec()
        };
        let v = CertIdentity::from_der(&der("vehicle-VIN0002.pem")).unwrap();
        assert!(v.matches("VIN0002", "cn_or_san"));
        let server_der = der("server.pem");
        let (_, server) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        let sans = format!("{:?}", server.subject_alternative_name().unwrap().unwrap().value);
        for want in ["localhost", "mqtt.example.com", "127"] {
            assert!(sans.contains(want), "{want} in {sans}");
        }
        // A second run keeps what is there; --force replaces it.
        assert!(matches!(init(&opts(dir.path())), Err(CertsError::Exists(_))));
        let mut o = opts(dir.path());
        o.force = true;
        init(&o).unwrap();
    }

    #[test]
    fn refuses_ids_that_cannot_be_client_ids_in_a_topic() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.vehicles = vec!["a/b".into()];
        assert!(matches!(init(&o), Err(CertsError::InvalidId(_))));
        assert!(!dir.path().join("ca.pem").exists());
    }
}
