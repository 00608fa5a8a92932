//! A certificate authority made for one test: a CA certificate, and server and client
//! certificates it signs, written as PEM files into a temporary directory that lives as long as
//! the [`TestCa`]. Servers started by the harness (redis-server, nats-server, a TLS proxy, a
//! gateway's `wss` listener) and Herald's clients load them like any operator's files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM): what clients and servers are told to trust.
    pub ca_file: PathBuf,
    issued: usize,
}

impl TestCa {
    /// A new CA, named `name` in its certificate.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the test CA");
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("a self-signed CA certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write the CA certificate");
        Self { dir, issuer: Issuer::new(params, key), ca_file, issued: 0 }
    }

    /// The directory the files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `localhost` and 127.0.0.1 (and any further `names`: DNS names
    /// or IP addresses).
    pub fn server(&mut self, names: &[&str]) -> CertFiles {
        let mut all = vec!["localhost", "127.0.0.1"];
        all.extend_from_slice(names);
        self.issue("server", &all, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose common name is `name` (servers that map certificates to users,
    /// such as nats-server with `verify_and_map`, read it).
    pub fn client(&mut self, name: &str) -> CertFiles {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A certificate with any common name and SANs, for one purpose: writes `<n>-<cn>.pem` and its
    /// key next to the CA.
    pub fn issue(&mut self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("a DNS name")),
            })
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate signed by the test CA");
        self.issued += 1;
        let stem = format!("{}-{}", self.issued, common_name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let files = CertFiles {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write a certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write a key");
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_certificate_names_localhost_and_is_signed_by_the_ca() {
        let mut ca = TestCa::new("Herald test CA");
        let server = ca.server(&["redis.test"]);
        let pem = std::fs::read_to_string(&server.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        assert!(std::fs::read_to_string(&server.key).unwrap().contains("PRIVATE KEY"));
        let client = ca.client("herald");
        assert_ne!(client.cert, server.cert, "each certificate gets its own file");
        assert!(ca.ca_file.exists());
    }
}
