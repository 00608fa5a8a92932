//! TLS client settings for Herald's dependencies (Redis, NATS, the OTLP collector): which CA
//! files to trust and which client certificate to present, read from PEM files, checked with the
//! configuration and turned into a rustls configuration on ring. MongoDB's TLS is its URI's
//! business (`tls=true&tlsCAFile=…`): the driver reads those files itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The variables that configure one dependency's TLS, so that every error names what the
/// operator set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsVars {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

pub const REDIS_TLS: TlsVars =
    TlsVars { ca: "HERALD_REDIS_TLS_CA_FILE", cert: "HERALD_REDIS_TLS_CERT_FILE", key: "HERALD_REDIS_TLS_KEY_FILE" };

pub const NATS_TLS: TlsVars =
    TlsVars { ca: "HERALD_NATS_TLS_CA_FILE", cert: "HERALD_NATS_TLS_CERT_FILE", key: "HERALD_NATS_TLS_KEY_FILE" };

/// The OpenTelemetry specification's names for the exporter's files.
pub const OTLP_TLS: TlsVars = TlsVars {
    ca: "OTEL_EXPORTER_OTLP_CERTIFICATE",
    cert: "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    key: "OTEL_EXPORTER_OTLP_CLIENT_KEY",
};

/// A client certificate (a PEM chain, leaf first) and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a client of one dependency does TLS. Only paths: the files are read when the
/// configuration is checked and again at connect, so a renewed certificate is picked up by a
/// restart without a configuration change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Presented to servers that ask for a client certificate (mutual TLS).
    pub client: Option<CertKey>,
}

/// A TLS file that cannot be used. Never quotes the file: it may hold a private key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{variable}: cannot read {}: {source}", .path.display())]
    Read {
        variable: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{variable}: {} {problem}", .path.display())]
    Bad { variable: &'static str, path: PathBuf, problem: &'static str },
    /// rustls refused the files together (a key that is not the certificate's, say).
    #[error("{variable}: {source}")]
    Rejected {
        variable: &'static str,
        #[source]
        source: rustls::Error,
    },
}

impl ClientTls {
    /// Whether any file is set: then the dependency must be reached over TLS.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client.is_some()
    }

    /// A rustls client configuration on ring that trusts the CA file (else the system's roots)
    /// and presents the client certificate, if any. Reads the files.
    pub fn rustls_config(&self, vars: &TlsVars) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rejected { variable: vars.ca, source })?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in certificates(path, vars.ca)? {
                    roots.add(cert).map_err(|source| TlsError::Rejected { variable: vars.ca, source })?;
                }
            }
            // A system store with a few unreadable entries still serves the rest.
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let builder = builder.with_root_certificates(roots);
        Ok(match &self.client {
            Some(files) => {
                let chain = certificates(&files.cert, vars.cert)?;
                let key = private_key(&files.key, vars.key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|source| TlsError::Rejected { variable: vars.key, source })?
            }
            None => builder.with_no_client_auth(),
        })
    }

    /// Reads and checks every file set, as the configuration does at start-up.
    pub fn check(&self, vars: &TlsVars) -> Result<(), TlsError> {
        if self.is_set() {
            self.rustls_config(vars)?;
        }
        Ok(())
    }
}

/// The certificates in a PEM file: at least one.
pub fn certificates(path: &Path, variable: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path, variable)?;
    let bad = |problem| TlsError::Bad { variable, path: path.to_owned(), problem };
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("is not a PEM file of certificates"))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, variable: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path, variable)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|_| TlsError::Bad {
        variable,
        path: path.to_owned(),
        problem: "holds no PEM private key",
    })
}

/// The raw bytes of a PEM file, for APIs that parse it themselves (tonic's).
pub fn read(path: &Path, variable: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { variable, path: path.to_owned(), source })
}

/// Whether `error` (or a cause of it) is a TLS peer refusing the other's certificate: ours
/// distrusting the server's (unknown CA, wrong name, expired), or the server refusing ours or
/// its absence. Waiting does not change a certificate, so start-up reports these at once
/// instead of retrying them as an outage.
pub fn is_certificate_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut next = Some(error);
    while let Some(e) = next {
        // An I/O error hides its inner error from `source()`: look inside.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            match candidate.downcast_ref::<rustls::Error>() {
                Some(rustls::Error::InvalidCertificate(_)) => return true,
                Some(rustls::Error::AlertReceived(
                    A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::CertificateRequired,
                )) => return true,
                _ => {}
            }
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("herald-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named_and_never_quoted() {
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n";
        let key = file(secret);
        let not_pem = file("hunter2 is not a certificate");
        let tls = ClientTls { ca_file: Some(not_pem.clone()), client: None };
        let e = tls.check(&REDIS_TLS).unwrap_err().to_string();
        assert!(e.starts_with("HERALD_REDIS_TLS_CA_FILE: ") && e.contains("holds no PEM certificate"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");

        let missing = std::env::temp_dir().join("herald-tls-missing.pem");
        let tls = ClientTls { ca_file: None, client: Some(CertKey { cert: missing, key: key.clone() }) };
        let e = tls.check(&NATS_TLS).unwrap_err().to_string();
        assert!(e.starts_with("HERALD_NATS_TLS_CERT_FILE: cannot read") && e.contains("herald-tls-missing.pem"), "{e}");

        let e = private_key(&not_pem, "K").unwrap_err().to_string();
        assert!(e.contains("holds no PEM private key") && !e.contains("hunter2"), "{e}");
        // A key file passed where certificates go: not quoted either.
        let e = certificates(&key, "C").unwrap_err().to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn nothing_set_needs_no_file_and_uses_the_system_roots() {
        let tls = ClientTls::default();
        assert!(!tls.is_set());
        assert!(tls.check(&REDIS_TLS).is_ok());
        assert!(tls.rustls_config(&REDIS_TLS).is_ok());
    }

    #[test]
    fn certificate_refusals_are_told_from_other_failures() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert!(is_certificate_refusal(&io));
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(is_certificate_refusal(&required));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!is_certificate_refusal(&reset));
        assert!(!is_certificate_refusal(&rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)));
    }
}
