//! The gateway's own TLS (issue 15): with HERALD_TLS_CERT_FILE and HERALD_TLS_KEY_FILE its
//! public port speaks wss://. A client that trusts only the test CA connects, authenticates and
//! receives; a replaced certificate is served to new connections while old ones stay up; a bad
//! replacement keeps the old one in service; a client that never sends a ClientHello is closed
//! at the handshake timeout, and such clients cannot crowd out real ones; bad files stop the
//! start with a clear message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_proto::ServerFrame;
use herald_shared::config::ServerTls;
use herald_tests::cluster::{gateway_config, Cluster, InProcess};
use herald_tests::eventually;
use herald_tests::test_ca::{CertFiles, TestCa};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);
/// The gateway's header timeout, which bounds the TLS handshake too.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1000);

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A gateway whose public port speaks TLS with `files`, and a dispatcher.
async fn start(cluster: &Cluster, files: &CertFiles, max_connections: usize) -> (InProcess, InProcess) {
    let dispatcher = cluster.dispatcher().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.tls = Some(ServerTls { cert_file: files.cert.clone(), key_file: files.key.clone() });
    config.common.http.header_timeout = HANDSHAKE_TIMEOUT;
    config.common.http.max_connections = max_connections;
    // The clients here read only when they wait for something, so they answer pings late.
    config.heartbeat_interval = Duration::from_secs(60);
    (cluster.gateway_with(config).await.unwrap(), dispatcher)
}

/// A TLS client that trusts only the certificates in `ca`.
fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects `user` over wss:// to `addr` (as `localhost`), trusting only `ca`. Returns the socket,
/// once the gateway's hello has come, and the certificate the server presented.
async fn connect(addr: SocketAddr, ca: &Path, token: &str) -> anyhow::Result<(Wss, CertificateDer<'static>)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector(ca).connect(ServerName::try_from("localhost")?, tcp).await?;
    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().expect("a certificate");
    let url = format!("wss://localhost:{}/v1/connect?token={token}", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await?;
    match next_frame(&mut ws).await {
        Some(ServerFrame::Hello(_)) => Ok((ws, peer)),
        other => anyhow::bail!("expected hello, got {other:?}"),
    }
}

async fn next_frame(ws: &mut Wss) -> Option<ServerFrame> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.ok()?? {
            Ok(Message::Text(text)) => return ServerFrame::decode(&text).ok(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// Publishes `id` to `user` and waits for it on `ws`.
async fn receives(cluster: &Cluster, ws: &mut Wss, user: &str, id: &str) {
    cluster.send(id, &[user]).await.unwrap();
    loop {
        match next_frame(ws).await {
            Some(ServerFrame::Notification(n)) if n.id.as_str() == id => return,
            Some(ServerFrame::Notification(_) | ServerFrame::Heartbeat) => {}
            other => panic!("{user}: waiting for {id}, got {other:?}"),
        }
    }
}

fn der(files: &CertFiles) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(&files.cert).unwrap()
}

/// Replaces the pair at `at` with `with`'s, each file by a rename (as a Secret volume's update).
fn replace(at: &CertFiles, cert: &[u8], key: &[u8]) {
    for (path, contents) in [(&at.key, key), (&at.cert, cert)] {
        let next = path.with_extension("next");
        std::fs::write(&next, contents).unwrap();
        std::fs::rename(&next, path).unwrap();
    }
}

fn reloads(text: &str, result: &str) -> f64 {
    let series = format!("herald_gateway_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok()).unwrap_or(-1.0)
}

async fn scrape(gateway: &InProcess) -> String {
    reqwest::get(format!("http://{}/metrics", gateway.internal)).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_gets_its_messages_over_wss_and_renewed_certificates_are_served() {
    let cluster = Cluster::start().await.unwrap();
    let mut ca = TestCa::new("herald wss test CA");
    let served = ca.server(&[]);
    let (gateway, dispatcher) = start(&cluster, &served, 1024).await;
    let first = der(&served);

    let (mut alice, peer) = connect(gateway.addr, &ca.ca_file, &cluster.token("alice")).await.unwrap();
    assert_eq!(peer, first, "the certificate from HERALD_TLS_CERT_FILE");
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    receives(&cluster, &mut alice, "alice", "over-wss").await;
    // Plain HTTP on the TLS port gets nowhere.
    assert!(reqwest::get(format!("http://{}/v1/connect", gateway.addr)).await.is_err());

    // Renewed: new connections get the new certificate; alice's connection stays up.
    let renewed = ca.server(&[]);
    replace(&served, &std::fs::read(&renewed.cert).unwrap(), &std::fs::read(&renewed.key).unwrap());
    let second = der(&renewed);
    assert_ne!(first, second);
    let token = cluster.token("bob");
    let (mut bob, _) = eventually(WAIT, Duration::from_millis(200), || async {
        let (ws, peer) = connect(gateway.addr, &ca.ca_file, &token).await.map_err(|e| e.to_string())?;
        if peer == second {
            Ok((ws, peer))
        } else {
            Err("still the old certificate".to_owned())
        }
    })
    .await
    .unwrap();
    cluster.wait_presence(dispatcher.addr, "bob", true).await.unwrap();
    receives(&cluster, &mut bob, "bob", "after-the-renewal").await;
    receives(&cluster, &mut alice, "alice", "still-connected").await;
    assert_eq!(reloads(&scrape(&gateway).await, "loaded"), 1.0);

    // A bad replacement (a key that does not fit the certificate) is refused once, counted, and
    // the renewed certificate stays in service.
    let stranger = ca.server(&[]);
    replace(&served, &std::fs::read(&renewed.cert).unwrap(), &std::fs::read(&stranger.key).unwrap());
    eventually(WAIT, Duration::from_millis(200), || async {
        match reloads(&scrape(&gateway).await, "failed") {
            1.0 => Ok(()),
            n => Err(format!("{n} failed reloads")),
        }
    })
    .await
    .unwrap();
    let (_carol, peer) = connect(gateway.addr, &ca.ca_file, &cluster.token("carol")).await.unwrap();
    assert_eq!(peer, second, "the last good certificate");
    // Garbage too; it stays refused (counted once) until the files change again.
    replace(&served, b"not a certificate", b"not a key");
    eventually(WAIT, Duration::from_millis(200), || async {
        match reloads(&scrape(&gateway).await, "failed") {
            2.0 => Ok(()),
            n => Err(format!("{n} failed reloads")),
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(herald_shared::serve::certs::RELOAD_EVERY * 2).await;
    assert_eq!(reloads(&scrape(&gateway).await, "failed"), 2.0, "each bad change is counted once");
    let (_dave, peer) = connect(gateway.addr, &ca.ca_file, &cluster.token("dave")).await.unwrap();
    assert_eq!(peer, second);
    receives(&cluster, &mut alice, "alice", "through-the-bad-files").await;

    // A client that does not trust the CA is refused by its own side of the handshake.
    let other = TestCa::new("another CA");
    assert!(connect(gateway.addr, &other.ca_file, &cluster.token("eve")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_a_client_hello_is_closed_at_the_handshake_timeout_and_crowds_no_one_out() {
    let cluster = Cluster::start().await.unwrap();
    let mut ca = TestCa::new("herald wss test CA");
    let served = ca.server(&[]);
    // A budget of 8 unauthenticated connections.
    let (gateway, _dispatcher) = start(&cluster, &served, 8).await;

    let opened = Instant::now();
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("closed by the server");
    let after = opened.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        after >= HANDSHAKE_TIMEOUT - Duration::from_millis(50) && after < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "closed after {after:?}"
    );
    let text = scrape(&gateway).await;
    let timeouts = r#"herald_http_connections_shed_total{listener="public",reason="tls_handshake_timeout"} "#;
    assert!(text.contains(timeouts), "{timeouts} missing");

    // Far more silent sockets than the budget: they give way to a real client, which connects.
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(TcpStream::connect(gateway.addr).await.unwrap());
    }
    let (mut erin, _) = connect(gateway.addr, &ca.ca_file, &cluster.token("erin")).await.unwrap();
    receives(&cluster, &mut erin, "erin", "past-the-silent-sockets").await;
    // And every one of them is closed, by the timeout or to make room.
    for mut socket in held {
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(3), socket.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "still open: {read:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_bad_tls_files_does_not_start_and_says_why() {
    let cluster = Cluster::start().await.unwrap();
    let mut ca = TestCa::new("herald wss test CA");
    let good = ca.server(&[]);
    let other = ca.server(&[]);
    let garbage = ca.dir().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let (cert, key, garbage) = (good.cert.to_str().unwrap(), other.key.to_str().unwrap(), garbage.to_str().unwrap());
    let cases = [
        (cert, key, "does not fit the certificate"),
        (garbage, key, "no PEM certificate"),
        (cert, garbage, "no PEM private key"),
        (cert, "/nonexistent/tls.key", "/nonexistent/tls.key"),
        (cert, "", "set both"),
    ];
    for (cert_file, key_file, why) in cases {
        let extra = [("HERALD_TLS_CERT_FILE", cert_file), ("HERALD_TLS_KEY_FILE", key_file)];
        let (status, output) = cluster.gateway_process_exit(&extra, None, WAIT).await.unwrap();
        assert!(status.is_some_and(|s| !s.success()), "started with {extra:?}: {output}");
        assert!(output.contains(why) && output.contains("HERALD_TLS"), "{why:?} missing:\n{output}");
    }
}
