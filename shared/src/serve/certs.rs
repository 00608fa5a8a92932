//! The public listener's own TLS (wss://, `HERALD_TLS_CERT_FILE` and `HERALD_TLS_KEY_FILE`): the
//! certificate chain and key from PEM files, served through a resolver that holds the current
//! pair and is swapped whole when the files change. A change that does not load (bad PEM, a key
//! that does not fit the certificate) keeps the old pair in service, is logged once and counted.
//! The handshake itself, its timeout and its place in the connection budget, are `serve.rs`'s.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::ServerTls;

/// How often the files are read again to look for a change: certificates are renewed days
/// before they expire, so a few seconds late is nothing, and reading two small files is cheap.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The `result` label of `herald_gateway_tls_reloads_total`.
pub const RELOADED: &str = "loaded";
pub const RELOAD_FAILED: &str = "failed";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM certificate in it ({reason})")]
    NoCertificate { path: String, reason: String },
    #[error("{path}: no PEM private key in it ({reason})")]
    NoKey { path: String, reason: String },
    #[error("the key in {key} does not fit the certificate in {cert}: {source}")]
    Mismatch { cert: String, key: String, source: rustls::Error },
    #[error("TLS set-up: {0}")]
    Setup(rustls::Error),
}

/// The pair new handshakes get; replaced whole, never edited.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The certificate and key files, what was last read from them, and the pair in service.
pub struct Certs {
    files: ServerTls,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    /// The contents last tried (loaded or refused), so that each change is tried, logged and
    /// counted once however long it stays.
    seen: (Vec<u8>, Vec<u8>),
    /// New contents seen once: tried only if the next look finds them unchanged, so that a pair
    /// caught half-written (the new key beside the old certificate) is not taken for a bad one.
    settling: Option<(Vec<u8>, Vec<u8>)>,
}

impl Certs {
    /// Loads the pair: a file that cannot be read or parsed, or a key that does not fit, is an
    /// error (the service does not start with a broken TLS set-up).
    pub fn load(files: &ServerTls) -> Result<Self, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = read(files)?;
        let key = certified_key(files, &seen, &provider)?;
        let current = Arc::new(Current(RwLock::new(key)));
        Ok(Self { files: files.clone(), provider, current, seen, settling: None })
    }

    /// The acceptor for the listener: TLS 1.2 and 1.3, HTTP/1.1 (all Herald serves), and the
    /// pair current at each handshake.
    pub fn acceptor(&self) -> Result<TlsAcceptor, CertError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(CertError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&self.current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads the files every [`RELOAD_EVERY`] (and on SIGHUP) until `stop`, and swaps in each
    /// pair that changed, stayed so for one more look, and loads. Never fails: a bad change is logged, counted in `reloads`
    /// (`failed`) and ignored until the files change again.
    pub async fn watch(mut self, reloads: IntCounterVec, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "no SIGHUP handler; TLS files are polled only"))
            .ok();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = hup => {}
            }
            if let Some(result) = self.check() {
                reloads.with_label_values(&[result]).inc();
            }
        }
    }

    /// One look at the files: None when nothing was tried (no change, or one still settling),
    /// else whether the new pair was loaded.
    fn check(&mut self) -> Option<&'static str> {
        let contents = match read(&self.files) {
            Ok(contents) => contents,
            // Mid-replacement (a missing file, say): looked at again next time, not counted.
            Err(e) => {
                tracing::debug!(error = %e, "TLS files unreadable for now");
                return None;
            }
        };
        if contents == self.seen {
            self.settling = None;
            return None;
        }
        if self.settling.as_ref() != Some(&contents) {
            self.settling = Some(contents);
            return None;
        }
        self.settling = None;
        let loaded = certified_key(&self.files, &contents, &self.provider);
        self.seen = contents;
        match loaded {
            Ok(key) => {
                self.current.set(key);
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                Some(RELOADED)
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; still serving the previous certificate");
                Some(RELOAD_FAILED)
            }
        }
    }
}

fn read(files: &ServerTls) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| CertError::Read { path: shown(path), source });
    Ok((read(&files.cert_file)?, read(&files.key_file)?))
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// The chain and key in `contents` (certificate file, key file), checked to fit each other.
fn certified_key(
    files: &ServerTls,
    (cert_pem, key_pem): &(Vec<u8>, Vec<u8>),
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let (cert_path, key_path) = (shown(&files.cert_file), shown(&files.key_file));
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::NoCertificate { path: cert_path.clone(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate { path: cert_path, reason: "no BEGIN CERTIFICATE block".into() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| CertError::NoKey { path: key_path.clone(), reason: e.to_string() })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Mismatch {
        cert: cert_path,
        key: key_path,
        source,
    })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair for `localhost`, PEM: (certificate, key).
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(files: &ServerTls, (cert, key): &(String, String)) {
        std::fs::write(&files.cert_file, cert).unwrap();
        std::fs::write(&files.key_file, key).unwrap();
    }

    #[test]
    fn a_change_is_tried_once_it_settles_and_a_bad_one_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = ServerTls { cert_file: dir.path().join("tls.crt"), key_file: dir.path().join("tls.key") };
        let (first, second, third) = (pair(), pair(), pair());
        write(&files, &first);
        let mut certs = Certs::load(&files).unwrap();
        let served = |certs: &Certs| certs.current.get().cert[0].clone();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(served(&certs), der(&first.0));
        assert_eq!(certs.check(), None, "nothing changed");

        // Half-written (second's key beside first's certificate), then whole: one reload.
        std::fs::write(&files.key_file, &second.1).unwrap();
        assert_eq!(certs.check(), None, "seen once: settling");
        write(&files, &second);
        assert_eq!(certs.check(), None, "changed again: settling");
        assert_eq!(certs.check(), Some(RELOADED));
        assert_eq!(served(&certs), der(&second.0));
        assert_eq!(certs.check(), None);

        // A key that does not fit: refused once, the second pair stays.
        write(&files, &(second.0.clone(), third.1.clone()));
        assert_eq!((certs.check(), certs.check(), certs.check()), (None, Some(RELOAD_FAILED), None));
        assert_eq!(served(&certs), der(&second.0));
        // Missing files (mid-replacement) change nothing.
        std::fs::remove_file(&files.key_file).unwrap();
        assert_eq!((certs.check(), certs.check()), (None, None));
        assert_eq!(served(&certs), der(&second.0));

        // At start, the same problems are errors.
        write(&files, &(first.0.clone(), third.1.clone()));
        assert!(matches!(Certs::load(&files), Err(CertError::Mismatch { .. })));
        std::fs::write(&files.cert_file, "garbage").unwrap();
        assert!(matches!(Certs::load(&files), Err(CertError::NoCertificate { .. })));
    }
}
