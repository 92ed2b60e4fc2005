//! Test PKI generated per run with rcgen: a CA, a server certificate for 127.0.0.1 and
//! localhost, vehicle certificates (CN = vehicle id), and a second, untrusted CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub cert_path: PathBuf,
}

pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let cert_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write ca");
        Ca { cert, key, cert_path }
    }

    fn issue(&self, dir: &Path, file: &str, cn: &str, sans: Vec<SanType>) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let pair = Pair {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }

    pub fn server(&self, dir: &Path) -> Pair {
        let sans = vec![
            SanType::DnsName("localhost".try_into().expect("dns")),
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
        ];
        self.issue(dir, "server", "gateway", sans)
    }

    pub fn vehicle(&self, dir: &Path, id: &str) -> Pair {
        self.issue(dir, &format!("vehicle-{id}"), id, Vec::new())
    }
}
