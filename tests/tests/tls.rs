//! TLS to every dependency, each against a real server started with a test CA's certificates:
//! Redis (`rediss://`, mutual TLS), NATS (`tls://`, mutual TLS), MongoDB (through a
//! TLS-terminating proxy, nx-27017 having no TLS) and the OTLP collector (https and gRPC).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use herald_shared::config::NatsAuth;
use herald_shared::connect::{self, ConnectError, NatsError, STARTUP_TIMEOUT};
use herald_shared::tls::{CertKey, ClientTls};
use herald_tests::bin_path;
use herald_tests::cluster::{dispatcher_config, gateway_config, Cluster, Options};
use herald_tests::otlp::{OtlpReceiver, Span};
use herald_tests::otlp_grpc::GrpcReceiver;
use herald_tests::services::{nats_tls_config, Mongo, Nats, Redis, Stack};
use herald_tests::test_ca::{CertFiles, TestCa};
use herald_tests::tls_proxy::{mongo_tls_uri, TlsProxy};

const WAIT: Duration = Duration::from_secs(10);

/// Trust `ca`, present `client` (if any).
fn client_tls(ca: &TestCa, client: Option<&CertFiles>) -> ClientTls {
    ClientTls {
        ca_file: Some(ca.ca_file.clone()),
        client: client.map(|c| CertKey { cert: c.cert.clone(), key: c.key.clone() }),
    }
}

fn tls_url(nats: &Nats) -> String {
    format!("tls://127.0.0.1:{}", nats.port())
}

/// (a) A gateway and a dispatcher that reach Redis over `rediss://` and NATS over `tls://`, both
/// requiring client certificates, and MongoDB only through a TLS proxy that requires one too,
/// deliver a message end to end and the receipt says delivered. heraldctl publishes over the
/// same TLS with the same variables (and is refused without them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_tls_to_every_dependency_delivers_a_message() {
    let mut ca = TestCa::new("Herald test CA");
    let server = ca.server(&[]);
    let herald = ca.client("herald");
    let tls = client_tls(&ca, Some(&herald));

    let nats_config = nats_tls_config(&server, &ca.ca_file, true);
    let (redis, nats, mongo) = tokio::try_join!(
        Redis::start_tls(&server, &ca.ca_file, true),
        Nats::start_with_config(&nats_config),
        Mongo::start(),
    )
    .unwrap();
    let mongo_tls = TlsProxy::start(mongo.host_port().unwrap(), &server, Some(&ca.ca_file)).await.unwrap();
    let stack = Stack::of(redis, nats, mongo).await.unwrap();

    // The test's own NATS client goes through the same options as Herald's.
    let nats_url = tls_url(&stack.nats);
    let (seeds, options) = connect::nats_options(&nats_url, &NatsAuth::None, &tls).unwrap();
    let test_client = options.connect(seeds).await.unwrap();
    let cluster = Cluster::with_nats(stack, Options::default(), test_client).await.unwrap();

    let mut common = cluster.stack.common_config();
    common.redis_url = cluster.stack.redis.tls_url();
    common.redis_tls = tls.clone();
    common.nats_url = nats_url.clone();
    common.nats_tls = tls.clone();
    let mut dispatcher = dispatcher_config(&cluster.stack, &cluster.options);
    dispatcher.common = common.clone();
    dispatcher.mongodb_uri = mongo_tls_uri(&mongo_tls, &ca.ca_file, &herald, ca.dir()).unwrap();
    let mut gateway = gateway_config(&cluster.stack, &cluster.options);
    gateway.common = common;

    let dispatcher = cluster.dispatcher_with(dispatcher).await.unwrap();
    let gateway = cluster.gateway_with(gateway).await.unwrap();
    let mut tess = cluster.connect(gateway.addr, "tess").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "tess", true).await.unwrap();

    cluster.send("tls-1", &["tess"]).await.unwrap();
    let n = tess.next_notification(WAIT).await.expect("notification");
    assert_eq!(n.id, "tls-1");
    tess.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("tls-1", "tess", "delivered").await.unwrap();

    // heraldctl reaches the same NATS with the same variables, and not without them.
    let heraldctl = |tls_vars: bool| {
        let mut command = tokio::process::Command::new(bin_path("heraldctl").unwrap());
        command.env_clear().env("HERALD_NATS_URL", &nats_url).env("HERALD_PREFIX", cluster.stack.names().prefix());
        if tls_vars {
            command
                .env("HERALD_NATS_TLS_CA_FILE", &ca.ca_file)
                .env("HERALD_NATS_TLS_CERT_FILE", &herald.cert)
                .env("HERALD_NATS_TLS_KEY_FILE", &herald.key);
        }
        command.args(["publish", "--to", "tess", "{}", "--id", "tls-2"]).kill_on_drop(true).output()
    };
    let refused = tokio::time::timeout(WAIT, heraldctl(false)).await.unwrap().unwrap();
    assert!(!refused.status.success(), "no CA, no client certificate: refused");
    let published = tokio::time::timeout(WAIT, heraldctl(true)).await.unwrap().unwrap();
    assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    let n = tess.next_notification(WAIT).await.expect("the notification heraldctl published");
    assert_eq!(n.id, "tls-2");
}

/// (b) Servers whose certificate another CA signed are refused at once, with the certificate
/// named as the cause: waiting would not make it trusted, so start-up does not retry it as an
/// outage (it would, for [`STARTUP_TIMEOUT`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_the_client_does_not_trust_is_refused_at_start_up() {
    let mut ours = TestCa::new("Herald test CA");
    let mut impostor = TestCa::new("Impostor CA");
    let server = impostor.server(&[]);
    let herald = ours.client("herald");
    let tls = client_tls(&ours, Some(&herald));
    let nats_config = nats_tls_config(&server, &impostor.ca_file, false);
    let (redis, nats) =
        tokio::try_join!(Redis::start_tls(&server, &impostor.ca_file, false), Nats::start_with_config(&nats_config),)
            .unwrap();

    let started = tokio::time::Instant::now();
    let error = tokio::time::timeout(WAIT, connect::nats_with_tls(&tls_url(&nats), &NatsAuth::None, &tls, "t"))
        .await
        .expect("refused at once, not retried")
        .unwrap_err();
    let ConnectError::Nats { source: NatsError::Connect(cause), .. } = &error else { panic!("{error:?}") };
    assert!(herald_shared::tls::is_certificate_refusal(cause), "{error:?}");
    let shown = herald_shared::telemetry::one_line(&error);
    assert!(shown.contains("invalid peer certificate"), "the log line says why: {shown}");

    let error = tokio::time::timeout(WAIT, connect::redis_with_tls(&redis.tls_url(), &tls))
        .await
        .expect("refused at once, not retried")
        .unwrap_err();
    let shown = herald_shared::telemetry::one_line(&error);
    assert!(matches!(error, ConnectError::CertificateRefused { dependency: "redis", .. }), "{shown}");
    assert!(shown.contains("redis at rediss://127.0.0.1") && shown.contains("invalid peer certificate"), "{shown}");
    assert!(started.elapsed() < STARTUP_TIMEOUT / 2, "took {:?}", started.elapsed());
}

/// (c) A NATS server that requires client certificates refuses a client without one, at once;
/// the same client with its certificate gets in. Redis likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_requiring_client_certificates_refuses_a_client_without_one() {
    let mut ca = TestCa::new("Herald test CA");
    let server = ca.server(&[]);
    let herald = ca.client("herald");
    let nats_config = nats_tls_config(&server, &ca.ca_file, true);
    let (redis, nats) =
        tokio::try_join!(Redis::start_tls(&server, &ca.ca_file, true), Nats::start_with_config(&nats_config)).unwrap();
    let url = tls_url(&nats);

    let without = client_tls(&ca, None);
    let error = tokio::time::timeout(WAIT, connect::nats_with_tls(&url, &NatsAuth::None, &without, "t"))
        .await
        .expect("refused at once, not retried")
        .unwrap_err();
    let shown = herald_shared::telemetry::one_line(&error);
    let ConnectError::Nats { source: NatsError::Connect(cause), .. } = &error else { panic!("{shown}") };
    assert!(herald_shared::tls::is_certificate_refusal(cause), "{shown}");
    assert!(shown.contains("tls://127.0.0.1"), "{shown}");

    let error = tokio::time::timeout(WAIT, connect::redis_with_tls(&redis.tls_url(), &without))
        .await
        .expect("refused at once, not retried")
        .unwrap_err();
    assert!(matches!(error, ConnectError::CertificateRefused { .. }), "{error}");

    let with = client_tls(&ca, Some(&herald));
    let client = connect::nats_with_tls(&url, &NatsAuth::None, &with, "t").await.unwrap();
    client.flush().await.unwrap();
    connect::redis_with_tls(&redis.tls_url(), &with).await.unwrap();
}

/// TLS with the rest of the NATS options: a seed list (one seed down) and an nkey user, on a
/// server that requires both a client certificate and the nkey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_works_with_a_seed_list_and_an_nkey() {
    let mut ca = TestCa::new("Herald test CA");
    let server = ca.server(&[]);
    let herald = ca.client("herald");
    let user = nkeys::KeyPair::new_user();
    let config = format!(
        "{}authorization {{ users = [ {{ nkey: {:?} }} ] }}\n",
        nats_tls_config(&server, &ca.ca_file, true),
        user.public_key()
    );
    let nats = Nats::start_with_config(&config).await.unwrap();
    let seed_file = ca.dir().join("herald.nk");
    std::fs::write(&seed_file, user.seed().unwrap()).unwrap();

    let down = herald_tests::services::free_port().unwrap();
    let url = format!("tls://127.0.0.1:{down},{}", tls_url(&nats));
    let auth = NatsAuth::NkeyFile(seed_file);
    let client = connect::nats_with_tls(&url, &auth, &client_tls(&ca, Some(&herald)), "t").await.unwrap();
    client.flush().await.unwrap();
}

/// (d) Spans from a dispatcher and a gateway (processes, as deployed) reach a collector over
/// https, and over gRPC with TLS, each requiring a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_https_and_over_grpc_with_mutual_tls() {
    let mut ca = TestCa::new("Herald test CA");
    let server = ca.server(&[]);
    let herald = ca.client("herald");
    let https = OtlpReceiver::start_https(&server, Some(&ca.ca_file)).await.unwrap();
    let grpc = GrpcReceiver::start_tls(&server, Some(&ca.ca_file)).await.unwrap();
    let (ca_file, cert, key) =
        (ca.ca_file.display().to_string(), herald.cert.display().to_string(), herald.key.display().to_string());

    for (protocol, endpoint) in [("http/protobuf", https.https_endpoint()), ("grpc", grpc.endpoint())] {
        let options = Options { otlp_endpoint: Some(endpoint), ..Options::default() };
        let cluster = Cluster::new(Stack::start().await.unwrap(), options).await.unwrap();
        let extra = [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.as_str()),
        ];
        let dispatcher = cluster.dispatcher_process_with(&extra, None).await.unwrap();
        let gateway = cluster.gateway_process_with(&extra, None).await.unwrap();
        let user = format!("otel-{}", protocol.replace('/', "-"));
        let mut client = cluster.connect(gateway.addr, &user).await.unwrap();
        cluster.wait_presence(dispatcher.addr, &user, true).await.unwrap();
        let id = format!("traced-{}", protocol.replace('/', "-"));
        cluster.send(&id, &[&user]).await.unwrap();
        let n = client.next_notification(WAIT).await.expect("notification");
        client.ack([n.id.as_str()]).await.unwrap();

        let arrived = |spans: &[Span]| {
            let has = |service: &str, name: &str| spans.iter().any(|s| s.service == service && s.name == name);
            has("herald-dispatcher", "herald.job") && has("herald-gateway", "herald.deliver")
        };
        let timeout = Duration::from_secs(20);
        match protocol {
            "grpc" => grpc.wait_for(timeout, arrived).await.map(drop),
            _ => https.wait_for(timeout, arrived).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{protocol}: {e}"));
    }
}
