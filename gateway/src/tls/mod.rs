//! TLS for the vehicle listener (rustls 0.23): server certificate, optional client
//! certificates (mTLS), and the vehicle identity read from a verified certificate.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSection;

pub mod reload;
pub mod stream;

pub use reload::ReloadingCert;

fn load_certs(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut r = BufReader::new(File::open(path).with_context(|| format!("tls: cannot open {path}"))?);
    let certs = rustls_pemfile::certs(&mut r)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls: {path}"))?;
    if certs.is_empty() {
        return Err(anyhow!("tls: no PEM certificate in {path}"));
    }
    Ok(certs)
}

fn load_key(path: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let mut r = BufReader::new(File::open(path).with_context(|| format!("tls.key: cannot open {path}"))?);
    rustls_pemfile::private_key(&mut r)
        .with_context(|| format!("tls.key: {path}"))?
        .ok_or_else(|| anyhow!("tls.key: no PEM private key in {path}"))
}

/// Builds the acceptor; with `client_ca` set every client must present a certificate
/// signed by one of those CAs. The server certificate comes from the returned
/// [`ReloadingCert`], which can swap it for new handshakes (see [`reload`]).
pub fn acceptor(
    cfg: &TlsSection,
    reloads: crate::metrics::Labeled,
    not_after: prometheus::IntGauge,
) -> anyhow::Result<(TlsAcceptor, Arc<ReloadingCert>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?;
    let builder = if cfg.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for c in load_certs(&cfg.client_ca)? {
            roots.add(c).context("tls.client_ca: invalid CA certificate")?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("tls.client_ca")?;
        builder.with_client_cert_verifier(verifier)
    };
    let cert = Arc::new(ReloadingCert::load(
        &cfg.cert, &cfg.key, provider, reloads, not_after,
    )?);
    let mut server = builder.with_cert_resolver(cert.clone());
    server.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(server)), cert))
}

/// Names a verified client certificate gives the vehicle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    pub common_name: Option<String>,
    /// DNS and URI subject alternative names.
    pub sans: Vec<String>,
}

impl CertIdentity {
    pub fn from_der(der: &[u8]) -> Option<CertIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(String::from);
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(s) => sans.push(s.to_string()),
                    x509_parser::extensions::GeneralName::URI(s) => sans.push(s.to_string()),
                    _ => {}
                }
            }
        }
        Some(CertIdentity { common_name, sans })
    }

    /// Whether `client_id` is this certificate's identity under the `tls.identity` rule.
    pub fn matches(&self, client_id: &str, rule: &str) -> bool {
        let cn = self.common_name.as_deref() == Some(client_id);
        let san = self.sans.iter().any(|s| s == client_id);
        match rule {
            "cn" => cn,
            "san" => san,
            _ => cn || san,
        }
    }

    /// The id to use when the client sent an empty client id.
    pub fn preferred(&self, rule: &str) -> Option<&str> {
        match rule {
            "san" => self.sans.first().map(String::as_str),
            _ => self
                .common_name
                .as_deref()
                .or_else(|| self.sans.first().map(String::as_str)),
        }
    }
}
