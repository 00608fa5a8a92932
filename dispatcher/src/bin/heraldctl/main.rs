//! `heraldctl`: a developer's command line for a running Herald. It mints client tokens and
//! publishes jobs the way a backend would; it knows only the wire contract and shared naming, not
//! the dispatcher's internals.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use herald_proto::PublishJob;
use herald_shared::config::{is_token, CommonConfig, Env};
use herald_shared::naming::Names;
use serde::Serialize;
use serde_json::value::RawValue;

#[derive(Debug, Parser)]
#[command(name = "heraldctl", version, about = "Mint Herald client tokens and publish jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an HS256 client token (JWT) for a user.
    Token {
        /// The user id, the token's `sub`.
        #[arg(long)]
        user: String,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// Sets `iss`; needed when the gateway runs with HERALD_JWT_ISSUER.
        #[arg(long)]
        issuer: Option<String>,
        /// Sets `aud`; needed when the gateway runs with HERALD_JWT_AUDIENCE.
        #[arg(long)]
        audience: Option<String>,
        /// The gateway's HS256 secret.
        #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Publish a job to the jobs stream, as a backend would. NATS comes from HERALD_NATS_URL and
    /// the naming prefix from HERALD_PREFIX.
    Publish {
        /// Recipient user ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        /// The notification payload: any JSON value, delivered to clients as is.
        #[arg(long)]
        payload: String,
        /// Job id: the idempotency key, also sent as `Nats-Msg-Id` so JetStream drops a repeat.
        #[arg(long)]
        id: Option<String>,
        /// Seconds the message may wait for an offline user (the dispatcher's default if unset).
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Last token of the publish subject (`<prefix>.publish.<topic>`).
        #[arg(long, default_value = "default")]
        topic: String,
    },
}

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

fn main() -> ExitCode {
    // Errors are printed as one chain of causes; a backtrace would only bury the message.
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heraldctl: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text its parent already shows.
fn message(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Token { user, ttl_secs, issuer, audience, secret } => {
            let token = token(&secret, &user, ttl_secs, issuer.as_deref(), audience.as_deref())?;
            println!("{token}");
            Ok(())
        }
        Command::Publish { to, payload, id, ttl_secs, topic } => {
            let job = job(to, &payload, id, ttl_secs)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(publish(job, &topic))
        }
    }
}

fn token(
    secret: &str,
    user: &str,
    ttl_secs: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    if user.is_empty() {
        bail!("--user must not be empty");
    }
    let iat = SystemTime::now().duration_since(UNIX_EPOCH).context("system clock is before 1970")?.as_secs();
    let claims = Claims { sub: user, iat, exp: iat.saturating_add(ttl_secs), iss: issuer, aud: audience };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).context("signing the token")
}

fn job(to: Vec<String>, payload: &str, id: Option<String>, ttl_secs: Option<u64>) -> anyhow::Result<PublishJob> {
    let to: Vec<String> = to.into_iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
    if to.is_empty() {
        bail!("--to needs at least one user id");
    }
    let payload: Box<RawValue> = serde_json::from_str(payload).context("--payload is not valid JSON")?;
    Ok(PublishJob { id, to, payload, ttl_secs })
}

async fn publish(job: PublishJob, topic: &str) -> anyhow::Result<()> {
    if !is_token(topic) {
        bail!("--topic {topic:?} must be 1-64 of [A-Za-z0-9_-]");
    }
    let mut env = Env::from_process();
    let common = CommonConfig::from_env(&mut env);
    let common = env.finish(common)?;
    let names = Names::new(&common.prefix);

    let client = herald_shared::connect::nats(&common.nats_url, "heraldctl").await?;
    let js = jetstream::new(client.clone());
    herald_shared::streams::ensure(&js, &names, common.jetstream_replicas).await?;

    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = &job.id {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    }
    let body = serde_json::to_vec(&job).context("encoding the job")?;
    let subject = names.publish_subject(topic);
    let ack = js
        .publish_with_headers(subject.clone(), headers, body.into())
        .await
        .with_context(|| format!("publishing on {subject}"))?
        .await
        .with_context(|| format!("waiting for JetStream to store the job on {subject}"))?;
    println!("stream={} seq={} duplicate={}", ack.stream, ack.sequence, ack.duplicate);
    client.flush().await.context("flushing the NATS connection")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_must_be_json_and_recipients_are_trimmed() {
        assert!(job(vec!["a".into()], "{not json", None, None).is_err());
        assert!(job(vec![" ".into()], "{}", None, None).is_err());
        let job = job(vec![" alice".into(), "".into(), "bob".into()], r#"{"title":"hi"}"#, None, Some(5)).unwrap();
        assert_eq!(job.to, ["alice", "bob"]);
        assert_eq!(job.payload.get(), r#"{"title":"hi"}"#);
    }

    #[test]
    fn token_round_trips_with_the_secret() {
        let secret = "0123456789abcdef";
        let t = token(secret, "alice", 60, Some("me"), None).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["me"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "alice");
    }
}
