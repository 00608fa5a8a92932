//! A TLS-terminating proxy in front of one plain upstream (nx-27017, which has no TLS of its
//! own), so that a dispatcher can be tested against a MongoDB URI with `tls=true`,
//! `tlsCAFile=…` and `tlsCertificateKeyFile=…` as it would reach a TLS-only server.
//!
//! Owns its listener and every proxied connection: the accept task, which holds the connection
//! tasks in a `JoinSet`, is aborted on drop and they end with it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::test_ca::CertFiles;

pub struct TlsProxy {
    addr: SocketAddr,
    /// The accept loop; aborting it (on drop) ends the connections it owns.
    accept: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on a free port of 127.0.0.1 with `server`'s certificate and forwards the
    /// decrypted bytes to `upstream` (`host:port`). With `client_ca`, a client must present a
    /// certificate that CA signed.
    pub async fn start(upstream: String, server: &CertFiles, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in herald_shared::tls::certificates(ca, "client CA")? {
                    roots.add(cert)?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = herald_shared::tls::certificates(&server.cert, "server certificate")?;
        let key = herald_shared::tls::private_key(&server.key, "server key")?;
        let config = builder.with_single_cert(chain, key).context("the proxy's certificate")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(accept_loop(listener, TlsAcceptor::from(Arc::new(config)), upstream));
        Ok(Self { addr, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, upstream: String) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        // Reap finished connections so the set does not grow with every one ever made.
        while connections.try_join_next().is_some() {}
        let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
        connections.spawn(async move {
            // A refused handshake (an untrusted client) just ends this connection.
            let Ok(mut tls) = acceptor.accept(client).await else { return };
            let Ok(mut plain) = TcpStream::connect(&upstream).await else { return };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// A MongoDB URI that reaches `proxy` over TLS, trusting `ca_file` and presenting `client` (its
/// certificate and key written together into `dir`, as `tlsCertificateKeyFile` wants them).
pub fn mongo_tls_uri(proxy: &TlsProxy, ca_file: &Path, client: &CertFiles, dir: &Path) -> anyhow::Result<String> {
    let combined = dir.join("mongo-client-cert-and-key.pem");
    let pem = std::fs::read_to_string(&client.cert)? + &std::fs::read_to_string(&client.key)?;
    std::fs::write(&combined, pem)?;
    Ok(format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&tls=true&tlsCAFile={}&tlsCertificateKeyFile={}",
        proxy.addr().port(),
        ca_file.display(),
        combined.display()
    ))
}
