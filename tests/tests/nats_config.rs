//! NATS as production runs it, against a real `nats-server`: users that must authenticate (an
//! nkey, a user and password in the URL), and the jobs and events streams' limits: a full jobs
//! stream refuses new jobs and keeps every one it took, and limits configured later reach a
//! stream that exists already.
//!
//! A `.creds` file (a user JWT and its seed) needs a server in operator mode: the test makes an
//! operator, an account with JetStream and a user, signs their JWTs itself ([`jwt`]), and starts
//! nats-server with them preloaded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use herald_shared::config::{CommonConfig, Env, NatsAuth};
use herald_shared::connect::{self, ConnectError, NatsError};
use herald_shared::naming::Names;
use herald_shared::streams::{self, Limits, StreamError, StreamLimits};
use herald_tests::services::Nats;
use herald_tests::{init_test_logging, unique_name};

/// The common configuration from these variables, as a process would load it.
fn common(vars: &[(&str, &str)]) -> Result<CommonConfig, herald_shared::config::ConfigError> {
    let mut env = Env::from_pairs(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = CommonConfig::from_env(&mut env);
    env.finish(config)
}

#[tokio::test]
async fn herald_connects_as_an_nkey_user_and_is_refused_at_once_without_the_seed() {
    init_test_logging();
    let user = nkeys::KeyPair::new_user();
    let nats =
        Nats::start_with_config(&format!("authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n", user.public_key()))
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("herald.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();

    let config =
        common(&[("HERALD_NATS_URL", &nats.url()), ("HERALD_NATS_NKEY_FILE", seed_file.to_str().unwrap())]).unwrap();
    assert_eq!(config.nats_auth, NatsAuth::NkeyFile(seed_file.clone()));
    let client = connect::nats(&config.nats_url, &config.nats_auth, "nkey-user").await.unwrap();
    // JetStream answers this user: Herald can make its streams.
    let names = Names::new(&unique_name("t"));
    streams::ensure(&jetstream::new(client), &names, 1, &StreamLimits::default()).await.unwrap();

    // Without the seed the server refuses, and start-up says so now rather than after 20 s.
    let started = Instant::now();
    let error = connect::nats(&nats.url(), &NatsAuth::None, "anonymous").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "refused credentials are not retried: {:?}", started.elapsed());
    assert!(matches!(&error, ConnectError::Nats { source: NatsError::Connect(_), .. }), "{error:?}");
    assert!(error.to_string().contains("authorization violation"), "{error}");

    // Another user's seed is refused the same way.
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let error = connect::nats(&nats.url(), &NatsAuth::NkeyFile(stranger), "stranger").await.unwrap_err();
    assert!(error.to_string().contains("authorization violation"), "{error}");

    // A seed file that is not there stops the configuration, naming the variable and the path.
    let missing = dir.path().join("missing.nk");
    let error = common(&[("HERALD_NATS_URL", &nats.url()), ("HERALD_NATS_NKEY_FILE", missing.to_str().unwrap())])
        .unwrap_err()
        .to_string();
    assert!(error.contains("HERALD_NATS_NKEY_FILE: cannot read") && error.contains("missing.nk"), "{error}");
}

/// async-nats reads a user and password in a server URL but does not send them; Herald does.
#[tokio::test]
async fn a_user_and_password_in_the_url_log_in() {
    init_test_logging();
    let nats = Nats::start_with_config("authorization { user: herald, password: \"p@ss/word\" }\n").await.unwrap();
    let port = nats.port();
    let url = format!("nats://herald:p%40ss%2Fword@127.0.0.1:{port}");
    let config = common(&[("HERALD_NATS_URL", &url)]).unwrap();
    connect::nats(&config.nats_url, &config.nats_auth, "password-user").await.unwrap();

    let error = connect::nats(&format!("nats://herald:wrong@127.0.0.1:{port}"), &NatsAuth::None, "wrong")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("authorization violation") && !error.contains("wrong@"), "{error}");
}

/// Invariant 1 under a full jobs stream: a publish beyond the limit is refused (the publisher
/// learns, and retries), and no job taken before is dropped to make room.
#[tokio::test]
async fn a_full_jobs_stream_refuses_new_jobs_and_keeps_every_job_it_took() {
    init_test_logging();
    let nats = Nats::start().await.unwrap();
    let client = connect::nats(&nats.url(), &NatsAuth::None, "full-stream").await.unwrap();
    let js = jetstream::new(client);
    let names = Names::new(&unique_name("t"));
    // Far below what the configuration allows (1 MiB), so a few jobs fill it.
    let limits = StreamLimits { jobs: Limits { max_age: None, max_bytes: Some(16 * 1024) }, ..Default::default() };
    streams::ensure(&js, &names, 1, &limits).await.unwrap();

    let job = |n: usize| format!(r#"{{"to":["bob"],"payload":{{"n":{n},"pad":"{}"}}}}"#, "x".repeat(900));
    let subject = names.publish_subject("full");
    let mut accepted = 0;
    let refusal = loop {
        assert!(accepted < 100, "16 KiB took 100 jobs of 1 KiB");
        let published = async { js.publish(subject.clone(), job(accepted).into()).await?.await };
        match published.await {
            Ok(ack) => {
                accepted += 1;
                assert_eq!(ack.sequence, accepted as u64);
            }
            Err(e) => break e,
        }
    };
    assert!(accepted >= 5, "took only {accepted} jobs before refusing");
    assert!(refusal.to_string().contains("maximum bytes exceeded"), "{refusal}");
    // Refused every time, not just once.
    assert!(js.publish(subject.clone(), job(999).into()).await.unwrap().await.is_err());

    // Every job taken is still there, the first one included.
    let mut stream = js.get_stream(names.jobs_stream()).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!((info.state.messages, info.state.first_sequence), (accepted as u64, 1), "{:?}", info.state);
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(first.payload, job(0).into_bytes());

    // Once a dispatcher takes a job, there is room again.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config { durable_name: Some("d".into()), ..Default::default() })
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(3).messages().await.unwrap();
    for _ in 0..3 {
        batch.next().await.unwrap().unwrap().double_ack().await.unwrap();
    }
    js.publish(subject, job(accepted).into()).await.unwrap().await.unwrap();
}

/// A stream created by an older Herald (no limits, discard Old) gets the configured limits and
/// the discard policy they need, keeps its messages and replicas; a stream that stores other
/// subjects or keeps messages otherwise is reported at once, not changed.
#[tokio::test]
async fn ensure_applies_configured_limits_to_an_existing_stream_and_refuses_an_incompatible_one() {
    init_test_logging();
    let nats = Nats::start().await.unwrap();
    let client = connect::nats(&nats.url(), &NatsAuth::None, "limits").await.unwrap();
    let js = jetstream::new(client);
    let names = Names::new(&unique_name("t"));
    // What the previous version's ensure created.
    js.create_stream(stream::Config {
        name: names.jobs_stream(),
        subjects: vec![names.jobs_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: streams::DUPLICATE_WINDOW,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish(names.publish_subject("old"), "kept".into()).await.unwrap().await.unwrap();

    // Unset limits leave it as it is.
    streams::ensure(&js, &names, 1, &StreamLimits::default()).await.unwrap();
    let config = js.get_stream(names.jobs_stream()).await.unwrap().info().await.unwrap().config.clone();
    assert_eq!((config.max_bytes, config.max_age, config.discard), (-1, Duration::ZERO, stream::DiscardPolicy::Old));

    // As a process started with the limits set loads them.
    let limits = common(&[
        ("HERALD_PREFIX", "unused"),
        ("HERALD_JOBS_MAX_AGE_SECS", "2592000"),
        ("HERALD_JOBS_MAX_BYTES", "1073741824"),
        ("HERALD_EVENTS_MAX_AGE_SECS", "3600"),
        ("HERALD_EVENTS_MAX_BYTES", "104857600"),
    ])
    .unwrap()
    .stream_limits;
    streams::ensure_at_startup(&js, &names, 1, &limits).await.unwrap();
    let mut jobs = js.get_stream(names.jobs_stream()).await.unwrap();
    let info = jobs.info().await.unwrap().clone();
    assert_eq!(info.config.max_bytes, 1 << 30);
    assert_eq!(info.config.max_age, Duration::from_secs(2_592_000));
    assert_eq!(info.config.discard, stream::DiscardPolicy::New);
    assert_eq!(info.config.duplicate_window, streams::DUPLICATE_WINDOW);
    assert_eq!(info.state.messages, 1, "the update keeps what the stream holds");
    let events = js.get_stream(names.events_stream()).await.unwrap().info().await.unwrap().config.clone();
    assert_eq!((events.max_bytes, events.max_age), (100 << 20, Duration::from_secs(3600)));
    assert_eq!(events.discard, stream::DiscardPolicy::New);

    // 0 removes a limit again.
    let unlimited = StreamLimits { jobs: Limits { max_age: Some(Duration::ZERO), max_bytes: Some(0) }, ..limits };
    streams::ensure(&js, &names, 1, &unlimited).await.unwrap();
    let config = jobs.info().await.unwrap().config.clone();
    assert_eq!((config.max_bytes, config.max_age), (-1, Duration::ZERO));

    // A jobs stream someone made with Limits retention: an error, and the stream is untouched.
    let other = Names::new(&unique_name("t"));
    js.create_stream(stream::Config {
        name: other.jobs_stream(),
        subjects: vec![other.jobs_subjects()],
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let error = streams::ensure_at_startup(&js, &other, 1, &limits).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "not retried: {:?}", started.elapsed());
    assert!(matches!(&error, StreamError::Incompatible { stream, .. } if *stream == other.jobs_stream()), "{error:?}");
    assert!(error.to_string().contains("retention Limits, Herald needs WorkQueue"), "{error}");
    let config = js.get_stream(other.jobs_stream()).await.unwrap().info().await.unwrap().config.clone();
    assert_eq!((config.retention, config.max_bytes), (stream::RetentionPolicy::Limits, -1));
}

/// NATS decentralised auth as `nsc` would set it up, made in the test: JWTs (header, claims,
/// ed25519 signature by the issuer's nkey, each part base64url) for an operator, an account that
/// may use JetStream, and a user of it.
mod jwt {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};

    fn encode(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({ "typ": "JWT", "alg": "ed25519-nkey" }).to_string());
        let claims = json!({
            "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
            "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signature = issuer.sign(format!("{header}.{claims}").as_bytes()).unwrap();
        format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    pub(super) struct Operator {
        pub(super) server_config: String,
        pub(super) creds: String,
    }

    /// A server configuration that trusts one operator and knows one account, and a `.creds`
    /// file's text for a user of that account.
    pub(super) fn operator_account_user() -> Operator {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        // JetStream in operator mode needs a system account.
        let system = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let operator_jwt =
            encode(&operator, &operator.public_key(), "herald-test", json!({ "type": "operator", "version": 2 }));
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
            "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let account_jwt = encode(
            &operator,
            &account.public_key(),
            "herald",
            json!({ "limits": unlimited, "type": "account", "version": 2 }),
        );
        let system_jwt = encode(&operator, &system.public_key(), "SYS", json!({ "type": "account", "version": 2 }));
        let user_jwt = encode(
            &account,
            &user.public_key(),
            "herald-dispatcher",
            json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
        );
        let server_config = format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}\n",
            account.public_key(),
            sys = system.public_key(),
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        );
        Operator { server_config, creds }
    }
}

/// A `.creds` file logs in to a server in operator mode and JetStream answers its user; without
/// it, or with a user that another account signed, the server refuses at once.
#[tokio::test]
async fn herald_logs_in_with_a_creds_file_to_a_server_in_operator_mode() {
    init_test_logging();
    let setup = jwt::operator_account_user();
    let nats = Nats::start_with_config(&setup.server_config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds_file = dir.path().join("herald.creds");
    std::fs::write(&creds_file, &setup.creds).unwrap();

    let config =
        common(&[("HERALD_NATS_URL", &nats.url()), ("HERALD_NATS_CREDS_FILE", creds_file.to_str().unwrap())]).unwrap();
    assert_eq!(config.nats_auth, NatsAuth::CredsFile(creds_file.clone()));
    let client = connect::nats(&config.nats_url, &config.nats_auth, "creds-user").await.unwrap();
    let names = Names::new(&unique_name("t"));
    let js = jetstream::new(client);
    streams::ensure(&js, &names, 1, &StreamLimits::default()).await.unwrap();
    js.publish(names.publish_subject("creds"), "job".into()).await.unwrap().await.unwrap();

    let started = Instant::now();
    let error = connect::nats(&nats.url(), &NatsAuth::None, "anonymous").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "refused credentials are not retried: {:?}", started.elapsed());
    assert!(error.to_string().contains("authorization violation"), "{error}");

    // A well-formed creds file of a user whose account this server does not know.
    let stranger = dir.path().join("stranger.creds");
    std::fs::write(&stranger, jwt::operator_account_user().creds).unwrap();
    let error = connect::nats(&nats.url(), &NatsAuth::CredsFile(stranger), "stranger").await.unwrap_err();
    assert!(error.to_string().contains("authorization violation"), "{error}");
}
