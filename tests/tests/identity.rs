//! Production identity: tokens signed by an identity provider (RS256, ES256, EdDSA) and checked
//! against its JWKS or against PEM public keys, HS256 secrets during a rotation, the JWKS cache's
//! behaviour when keys rotate, when kids are random and when the provider is down, and the
//! attacks on algorithms. Keys are generated here and the JWKS is served here, on 127.0.0.1:
//! no network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use herald_shared::config::{GatewayConfig, JwtConfig};
use herald_tests::client::TestClient;
use herald_tests::cluster::{gateway_config, ws_url, Cluster, InProcess, JWT_SECRET};
use herald_tests::tokens::{self, Claims};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const HOUR: Duration = Duration::from_secs(3600);

/// A signing key of the identity provider: its private half signs tokens, its public half is
/// served in the JWKS or written to a PEM file.
struct IdpKey {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    jwk: Value,
    public_pem: String,
}

impl IdpKey {
    fn rsa(kid: &str) -> Self {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::EncodePublicKey as _;
        use rsa::Generate as _;
        let key = rsa::PrivateKey::generate();
        let private = EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes());
        let public = key.to_public_key().to_public_key_der().unwrap();
        Self::new(kid, Algorithm::RS256, private, public.as_bytes())
    }

    fn es256(kid: &str) -> Self {
        use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        let key = p256::ecdsa::SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
        let private = EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes());
        let public = key.verifying_key().to_public_key_der().unwrap();
        Self::new(kid, Algorithm::ES256, private, public.as_bytes())
    }

    fn ed25519(kid: &str) -> Self {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let private = EncodingKey::from_ed_der(key.to_pkcs8_der().unwrap().as_bytes());
        let public = key.verifying_key().to_public_key_der().unwrap();
        // jsonwebtoken derives JWKs from PKCS#8 v1 only; ed25519-dalek writes v2: by hand.
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let jwk = serde_json::from_value(json!({"kty": "OKP", "crv": "Ed25519", "x": x})).unwrap();
        Self::with_jwk(kid, Algorithm::EdDSA, private, jwk, public.as_bytes())
    }

    fn new(kid: &str, alg: Algorithm, private: EncodingKey, public_der: &[u8]) -> Self {
        let jwk = Jwk::from_encoding_key(&private, alg).unwrap();
        Self::with_jwk(kid, alg, private, jwk, public_der)
    }

    fn with_jwk(kid: &str, alg: Algorithm, private: EncodingKey, mut jwk: Jwk, public_der: &[u8]) -> Self {
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.key_algorithm = Some(alg.into());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        let body = base64::engine::general_purpose::STANDARD.encode(public_der);
        let lines: Vec<&str> = body.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
        let public_pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"));
        Self { kid: kid.to_owned(), alg, private, jwk: serde_json::to_value(jwk).unwrap(), public_pem }
    }

    /// A good token for `user`, with this key's `kid` in its header.
    fn token(&self, user: &str) -> String {
        self.token_with_kid(user, Some(&self.kid))
    }

    fn token_with_kid(&self, user: &str, kid: Option<&str>) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(Into::into);
        Claims::new(user, HOUR).sign_with_key(&header, &self.private)
    }
}

/// HS256 signed with `secret` bytes: the algorithm-confusion attack when they are a public key.
fn hs256_with(secret: &[u8], user: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(Into::into);
    Claims::new(user, HOUR).sign_with_key(&header, &EncodingKey::from_secret(secret).unwrap())
}

/// The identity provider's JWKS endpoint, served on 127.0.0.1 for one test.
struct Idp {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    /// While set, the endpoint answers 503 (the provider is down).
    down: Arc<AtomicBool>,
    server: JoinHandle<()>,
}

#[derive(Clone)]
struct IdpState {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Idp {
    async fn start(keys: &[&IdpKey]) -> Self {
        let state = IdpState {
            keys: Arc::new(Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect())),
            fetches: Arc::default(),
            down: Arc::default(),
        };
        async fn jwks(State(state): State<IdpState>) -> Response {
            state.fetches.fetch_add(1, Ordering::SeqCst);
            if state.down.load(Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let keys = state.keys.lock().unwrap().clone();
            ([("cache-control", "public, max-age=3600")], Json(json!({ "keys": keys }))).into_response()
        }
        let app =
            axum::Router::new().route("/.well-known/jwks.json", axum::routing::get(jwks)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}/.well-known/jwks.json"),
            keys: state.keys,
            fetches: state.fetches,
            down: state.down,
            server,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn publish(&self, keys: &[&IdpKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A gateway configuration whose only keys are the JWKS at `url`.
fn jwks_only(cluster: &Cluster, url: &str, min_refetch: Duration) -> GatewayConfig {
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt = JwtConfig { jwks_url: Some(url.to_owned()), jwks_min_refetch: min_refetch, ..JwtConfig::default() };
    config
}

/// The HTTP status of a connect with `token`: 101 when it got as far as the `hello`.
async fn connect_status(addr: SocketAddr, token: &str) -> u16 {
    match TestClient::connect(&ws_url(addr), token).await {
        Ok(client) => {
            drop(client);
            101
        }
        Err(e) => e.status().unwrap_or_else(|| panic!("connect failed without a status: {e}")),
    }
}

/// `/readyz` of the internal listener at `addr`.
async fn readyz(addr: SocketAddr) -> u16 {
    reqwest::get(format!("http://{addr}/readyz")).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_es256_and_eddsa_tokens_verify_against_the_jwks() {
    let cluster = Cluster::start().await.unwrap();
    let (rsa, ec, ed) = (IdpKey::rsa("rsa-1"), IdpKey::es256("ec-1"), IdpKey::ed25519("ed-1"));
    let idp = Idp::start(&[&rsa, &ec, &ed]).await;
    let gateway = cluster.gateway_with(jwks_only(&cluster, &idp.url, Duration::from_secs(10))).await.unwrap();

    for key in [&rsa, &ec, &ed] {
        assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101, "{:?}", key.alg);
        // Without a kid, the keys of the token's algorithm are tried.
        assert_eq!(connect_status(gateway.addr, &key.token_with_kid("alice", None)).await, 101, "{:?}", key.alg);
    }
    let client = TestClient::connect(&ws_url(gateway.addr), &ed.token("bob")).await.unwrap();
    assert_eq!(client.hello().gateway_id.as_str(), gateway.id, "a session like any other");

    // A token naming one key's kid but signed by another of another algorithm.
    assert_eq!(connect_status(gateway.addr, &ec.token_with_kid("mallory", Some("rsa-1"))).await, 401);
    // A key the provider never published, under a published kid.
    let stranger = IdpKey::es256("ec-1");
    assert_eq!(connect_status(gateway.addr, &stranger.token("mallory")).await, 401);
    refuses_the_algorithm_attacks(gateway.addr, &[&rsa, &ec, &ed]).await;
    assert_eq!(idp.fetches(), 1, "nothing above needed another fetch within the interval");
}

/// HS256 with a public key (its PEM text, its DER, its JWK's `n` or `x`) as the secret, with
/// and without the key's kid, and `alg: none`: every one refused.
async fn refuses_the_algorithm_attacks(addr: SocketAddr, keys: &[&IdpKey]) {
    for key in keys {
        let pem_body: String = key.public_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(&pem_body).unwrap();
        let component = key.jwk.get("n").or(key.jwk.get("x")).and_then(Value::as_str).unwrap().to_owned();
        for secret in [key.public_pem.as_bytes(), &der, component.as_bytes()] {
            for kid in [Some(key.kid.as_str()), None] {
                let forged = hs256_with(secret, "mallory", kid);
                assert_eq!(connect_status(addr, &forged).await, 401, "HS256 with {:?}'s public key", key.alg);
            }
        }
    }
    assert_eq!(connect_status(addr, &tokens::alg_none("mallory")).await, 401, "alg none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pem_public_keys_verify_their_own_algorithm_only() {
    let cluster = Cluster::start().await.unwrap();
    let (rsa, ec, ed) = (IdpKey::rsa("rsa-pem"), IdpKey::es256("ec-pem"), IdpKey::ed25519("ed-pem"));
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for key in [&rsa, &ec, &ed] {
        let path = dir.path().join(format!("{}.pem", key.kid));
        std::fs::write(&path, &key.public_pem).unwrap();
        files.push(path);
    }
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt.public_key_files = files;
    let gateway = cluster.gateway_with(config).await.unwrap();

    for key in [&rsa, &ec, &ed] {
        // PEM keys have no kid: whatever kid the token names, the key of its algorithm is tried.
        assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101, "{:?}", key.alg);
        assert_eq!(connect_status(gateway.addr, &key.token_with_kid("alice", None)).await, 101, "{:?}", key.alg);
    }
    // The HS256 secret still works beside them.
    assert_eq!(connect_status(gateway.addr, &cluster.token("alice")).await, 101);
    let unknown = IdpKey::ed25519("ed-pem");
    assert_eq!(connect_status(gateway.addr, &unknown.token("mallory")).await, 401);
    refuses_the_algorithm_attacks(gateway.addr, &[&rsa, &ec, &ed]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pem_file_stops_the_start_naming_it() {
    let cluster = Cluster::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-key.pem");
    std::fs::write(&path, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt.public_key_files = vec![path];
    let gateway = cluster.start_gateway_with(config).await.unwrap();
    let err = gateway.stop().await.unwrap_err().to_string();
    assert!(err.contains("HERALD_JWT_PUBLIC_KEYS") && err.contains("not-a-key.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_secrets_rotate_without_refusing_anyone() {
    let cluster = Cluster::start().await.unwrap();
    let new_secret = "the-new-secret, with a comma, 0123";
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.jwt.secret = new_secret.into();
    config.jwt.previous_secret = Some(JWT_SECRET.into());
    let gateway = cluster.gateway_with(config).await.unwrap();

    let user = |secret: &str| tokens::mint(secret, "alice", HOUR);
    assert_eq!(connect_status(gateway.addr, &user(new_secret)).await, 101, "signed with the new secret");
    assert_eq!(connect_status(gateway.addr, &user(JWT_SECRET)).await, 101, "signed with the old one");
    assert_eq!(connect_status(gateway.addr, &user("neither-of-the-two-secrets")).await, 401);
    assert_eq!(connect_status(gateway.addr, &user("the-new-secret")).await, 401, "a part of a secret is none");
    assert_eq!(connect_status(gateway.addr, &tokens::expired(JWT_SECRET, "alice")).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_fetches_the_jwks_again_and_then_verifies() {
    let cluster = Cluster::start().await.unwrap();
    let old = IdpKey::es256("2026-01");
    let idp = Idp::start(&[&old]).await;
    let min_refetch = Duration::from_millis(500);
    let gateway = cluster.gateway_with(jwks_only(&cluster, &idp.url, min_refetch)).await.unwrap();
    assert_eq!(connect_status(gateway.addr, &old.token("alice")).await, 101);
    assert_eq!(idp.fetches(), 1);

    // The provider rotates: a new key, published before it signs anything.
    let new = IdpKey::rsa("2026-02");
    idp.publish(&[&old, &new]);
    tokio::time::sleep(min_refetch).await;
    assert_eq!(connect_status(gateway.addr, &new.token("alice")).await, 101, "one fetch, then it verifies");
    assert_eq!(idp.fetches(), 2);
    // Both keys are cached now: no further fetch.
    assert_eq!(connect_status(gateway.addr, &new.token("bob")).await, 101);
    assert_eq!(connect_status(gateway.addr, &old.token("bob")).await, 101);
    assert_eq!(idp.fetches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kids_cost_the_provider_a_bounded_number_of_fetches() {
    let cluster = Cluster::start().await.unwrap();
    let key = IdpKey::es256("real");
    let idp = Idp::start(&[&key]).await;
    let min_refetch = Duration::from_secs(2);
    let gateway = cluster.gateway_with(jwks_only(&cluster, &idp.url, min_refetch)).await.unwrap();
    let started = tokio::time::Instant::now();

    // An attacker's tokens, each naming a kid no one has, from 8 clients at once for ~3 s.
    let (key, addr) = (&key, gateway.addr);
    let attack = move |n: usize| async move {
        let mut refused = 0;
        for i in 0..40 {
            let kid = format!("random-{n}-{i}-{}", rand::random::<u64>());
            if connect_status(addr, &key.token_with_kid("mallory", Some(&kid))).await == 401 {
                refused += 1;
            }
            tokio::time::sleep(Duration::from_millis(75)).await;
        }
        refused
    };
    let refused: usize = futures::future::join_all((0..8).map(attack)).await.into_iter().sum();
    assert_eq!(refused, 320, "every token with an unknown kid is refused");
    let elapsed = started.elapsed();
    // One fetch at start, then at most one per interval (and one more at its edge).
    let allowed = 2 + (elapsed.as_millis() / min_refetch.as_millis()) as usize;
    assert!(idp.fetches() <= allowed, "{} fetches in {elapsed:?}, at most {allowed} allowed", idp.fetches());
    assert!(idp.fetches() >= 2, "an unknown kid does cause a fetch");
    // The real key still works.
    assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_outlive_the_provider() {
    let cluster = Cluster::start().await.unwrap();
    let key = IdpKey::rsa("k1");
    let idp = Idp::start(&[&key]).await;
    let mut config = jwks_only(&cluster, &idp.url, Duration::from_millis(200));
    // Periodic fetches every 400 ms (the provider's max-age is longer; this bound wins).
    config.jwt.jwks_refresh = Duration::from_millis(400);
    let gateway = cluster.gateway_with(config).await.unwrap();
    assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101);

    idp.down.store(true, Ordering::SeqCst);
    let failed_from = idp.fetches();
    herald_tests::eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        if idp.fetches() >= failed_from + 3 {
            Ok(())
        } else {
            Err(format!("{} fetches", idp.fetches()))
        }
    })
    .await
    .unwrap();
    assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101, "the cached key still verifies");
    assert_eq!(readyz(gateway.internal).await, 200, "and the gateway stays ready");
    let unknown = IdpKey::rsa("k2");
    assert_eq!(connect_status(gateway.addr, &unknown.token("alice")).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_only_a_jwks_is_ready_once_it_has_fetched_it() {
    let cluster = Cluster::start().await.unwrap();
    let key = IdpKey::ed25519("k1");
    let idp = Idp::start(&[&key]).await;
    idp.down.store(true, Ordering::SeqCst);
    let gateway: InProcess =
        cluster.start_gateway_with(jwks_only(&cluster, &idp.url, Duration::from_millis(200))).await.unwrap();
    herald_tests::eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        if idp.fetches() >= 1 {
            Ok(())
        } else {
            Err("no fetch yet")
        }
    })
    .await
    .unwrap();
    assert_eq!(readyz(gateway.internal).await, 503, "no keys yet");
    // Not 401: the token may be good; this gateway cannot tell yet.
    assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 503);

    idp.down.store(false, Ordering::SeqCst);
    cluster.wait_ready(gateway.internal).await.unwrap();
    assert_eq!(connect_status(gateway.addr, &key.token("alice")).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_connect_only_from_the_allowed_origins() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let cluster = Cluster::start().await.unwrap();
    let mut config = gateway_config(&cluster.stack, &cluster.options);
    config.allowed_origins = vec!["https://app.example.com".into(), "http://127.0.0.1:8080".into()];
    let gateway = cluster.gateway_with(config).await.unwrap();
    let token = cluster.token("alice");
    let connect = |origin: Option<&'static str>| {
        let mut request = format!("{}?token={token}", ws_url(gateway.addr)).into_client_request().unwrap();
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse().unwrap());
        }
        async move {
            match TestClient::connect_request(request, false).await {
                Ok(_) => (101, String::new()),
                Err(e) => (e.status().unwrap(), e.to_string()),
            }
        }
    };
    assert_eq!(connect(Some("https://app.example.com")).await.0, 101);
    assert_eq!(connect(Some("http://127.0.0.1:8080")).await.0, 101);
    assert_eq!(connect(None).await.0, 101, "no Origin: not a browser, let through");
    for origin in ["https://evil.example", "null", "https://app.example.com.evil.example"] {
        let (status, body) = connect(Some(origin)).await;
        assert_eq!(status, 403, "{origin}");
        assert!(body.contains("origin_not_allowed"), "{body}");
    }
    // Refused before the token is even looked at.
    let mut request = ws_url(gateway.addr).into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    assert_eq!(TestClient::connect_request(request, false).await.err().and_then(|e| e.status()), Some(403));

    // Without a list, any origin may connect, as before.
    let open = cluster.gateway().await.unwrap();
    let mut request = format!("{}?token={token}", ws_url(open.addr)).into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    assert!(TestClient::connect_request(request, false).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_keeps_the_connection_open_past_the_first_tokens_expiry() {
    use herald_proto::{ClientFrame, ErrorCode, ServerFrame};
    use herald_tests::client::Frame;
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let url = ws_url(gateway.addr);
    let short = Claims::new("alice", Duration::from_secs(3));
    let mut refreshed = TestClient::connect(&url, &short.sign(JWT_SECRET)).await.unwrap();
    let mut control = TestClient::connect(&url, &short.sign(JWT_SECRET)).await.unwrap();
    assert_eq!(refreshed.hello().token_expires_at_ms, short.exp as u64 * 1000, "hello says when the token ends");

    let long = Claims::new("alice", HOUR);
    refreshed.send_frame(&ClientFrame::Refresh { token: long.sign(JWT_SECRET) }).await.unwrap();
    match refreshed.next_frame(Duration::from_secs(5)).await {
        Frame::Server(ServerFrame::Refreshed { token_expires_at_ms }) => {
            assert_eq!(token_expires_at_ms, long.exp as u64 * 1000)
        }
        other => panic!("expected refreshed, got {other:?}"),
    }
    // The first token's expiry passes: the control is closed with 4401, the refreshed one stays.
    let close_of = |frame: Frame| match frame {
        Frame::Close { code, .. } => Some(code),
        _ => None,
    };
    let mut control_error = None;
    let control_close = loop {
        match control.next_frame(Duration::from_secs(8)).await {
            Frame::Server(ServerFrame::Error { code, .. }) => control_error = Some(code),
            frame => break close_of(frame),
        }
    };
    assert_eq!((control_close, control_error), (Some(4401), Some(ErrorCode::TokenExpired)));
    assert!(matches!(refreshed.next_frame(Duration::from_secs(2)).await, Frame::Timeout), "still open");

    // A refresh with another user's token, or a bad one, ends the connection with 4401.
    for token in [Claims::new("bob", HOUR).sign(JWT_SECRET), tokens::wrong_signature("alice"), "garbage".into()] {
        let mut client = TestClient::connect(&url, &cluster.token("alice")).await.unwrap();
        client.send_frame(&ClientFrame::Refresh { token }).await.unwrap();
        let mut error = None;
        let close = loop {
            match client.next_frame(Duration::from_secs(5)).await {
                Frame::Server(ServerFrame::Error { code, .. }) => error = Some(code),
                frame => break close_of(frame),
            }
        };
        assert_eq!((close, error), (Some(4401), Some(ErrorCode::TokenRefused)));
    }
    refreshed.close().await.unwrap();
}
