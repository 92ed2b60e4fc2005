//! TLS for simulated vehicles: trust the broker's CA, and for mTLS give every vehicle
//! its own certificate (CN = client id) signed by a CA the broker trusts.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};

pub struct VehicleTls {
    roots: Arc<RootCertStore>,
    /// CA that signs per-vehicle certificates (mTLS).
    signer: Option<(rcgen::Certificate, KeyPair)>,
    shared: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl VehicleTls {
    pub fn new(ca: &str, client_ca: Option<(&str, &str)>) -> anyhow::Result<VehicleTls> {
        let mut roots = RootCertStore::empty();
        let pem = std::fs::read(ca).with_context(|| format!("--ca {ca}"))?;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots
                .add(cert.context("--ca: bad PEM")?)
                .context("--ca: bad certificate")?;
        }
        let roots = Arc::new(roots);
        let signer = match client_ca {
            None => None,
            Some((cert, key)) => {
                let cert_pem =
                    std::fs::read_to_string(cert).with_context(|| format!("--client-ca-cert {cert}"))?;
                let key_pem =
                    std::fs::read_to_string(key).with_context(|| format!("--client-ca-key {key}"))?;
                let key = KeyPair::from_pem(&key_pem).context("--client-ca-key")?;
                // Re-creating the CA from its parameters and key yields the same issuer
                // name and key, which is all a verifier checks.
                let params = CertificateParams::from_ca_cert_pem(&cert_pem).context("--client-ca-cert")?;
                let ca = params.self_signed(&key).context("client CA")?;
                Some((ca, key))
            }
        };
        let shared = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        );
        Ok(VehicleTls {
            roots,
            signer,
            shared,
        })
    }

    /// The client configuration for one vehicle.
    pub fn for_vehicle(&self, id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let Some((ca, ca_key)) = &self.signer else {
            return Ok(self.shared.clone());
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, id);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, ca, ca_key)?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|e| anyhow!("vehicle certificate: {e}"))?;
        Ok(Arc::new(cfg))
    }
}
