//! `heraldctl`: an operator's and developer's command line for a running Herald. It mints client
//! tokens, publishes jobs the way a backend would (through `herald-publish`, so a bad job fails
//! here with its rejection code and a wrong prefix is an error, never a new stream), and asks
//! the dispatcher's API what happened and to act (kick, cancel, forget). It knows the wire
//! contract, the shared naming and the API, not the dispatcher's internals.
//!
//! Human output by default; `--json` prints what the API answered (one JSON document per line).

use std::io::Read as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use herald_shared::config::{is_token, job_limits, Env};
use herald_shared::naming::Names;
use serde::Serialize;

mod client;
mod render;

use client::Api;

#[derive(Debug, Parser)]
#[command(name = "heraldctl", version, about = "Publish to, inspect and operate a running Herald")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Where Herald is, and how to prove who we are.
#[derive(Debug, Clone, Args)]
struct Global {
    /// NATS with JetStream (publish, rejections, dead letters).
    #[arg(long, global = true, env = "HERALD_NATS_URL", default_value = "nats://127.0.0.1:14222")]
    nats_url: String,
    /// The deployment's naming prefix.
    #[arg(long, global = true, env = "HERALD_PREFIX", default_value = "herald")]
    prefix: String,
    /// The dispatcher's public HTTP API (publish, message, pending, presence).
    #[arg(long, global = true, env = "HERALD_API_URL", default_value = "http://127.0.0.1:8090")]
    api_url: String,
    /// The dispatcher's internal listener, for the operator's commands (status, kick, cancel,
    /// forget): a port only the cluster reaches (`HERALD_DISPATCHER_INTERNAL_LISTEN`).
    #[arg(long, global = true, env = "HERALD_ADMIN_URL", default_value = "http://127.0.0.1:8190")]
    admin_url: String,
    /// Bearer token for the API (admin, or read for the questions); HERALD_ADMIN_TOKEN when unset.
    #[arg(long, global = true, env = "HERALD_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (what the API answered) instead of text.
    #[arg(long, global = true)]
    json: bool,
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
    /// Validate a job and publish it to the jobs stream (through NATS), as a backend would.
    Publish(PublishArgs),
    /// A message and its receipts.
    Message {
        id: String,
        /// At most this many receipts.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A user's pending messages.
    Pending {
        user: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Whether a user is connected, and where.
    Presence { user: String },
    /// Jobs rejected by validation (herald.rejected).
    Rejections(ReadArgs),
    /// Jobs dead-lettered after failing to be stored (herald.dead).
    DeadLetters(ReadArgs),
    /// Streams and consumer lag, live gateways, dependencies.
    Status,
    /// Close every connection of a user (close code 4403).
    Kick { user: String },
    /// Cancel a message: its pending receipts become `cancelled`, and it is never sent again.
    Cancel { id: String },
    /// Delete a user's receipts and the messages sent to them alone (a data-protection request).
    Forget { user: String },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Recipient user ids, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "topic", conflicts_with = "topic")]
    to: Vec<String>,
    /// Publish to the subscribers of this topic instead of to users (the job's `topic`).
    #[arg(long)]
    topic: Option<String>,
    /// The payload (any JSON value); `-` reads it from stdin. Or use --file, or --payload.
    #[arg(conflicts_with_all = ["payload", "file"])]
    payload_arg: Option<String>,
    /// The payload, as a flag.
    #[arg(long, conflicts_with = "file")]
    payload: Option<String>,
    /// Read the payload from this file (`-`: stdin).
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Job id: the message id and idempotency key, also sent as `Nats-Msg-Id`.
    #[arg(long)]
    id: Option<String>,
    /// Seconds the message may wait for an offline user (the dispatcher's default if unset).
    #[arg(long, visible_alias = "ttl-secs")]
    ttl: Option<u64>,
    /// The subject suffix: last token of the publish subject (`<prefix>.publish.<suffix>`), a
    /// label for your monitoring. (Before topics existed this flag was `--topic`.)
    #[arg(long, default_value = "default")]
    subject: String,
    /// Then follow the receipts through the API until none is pending, for at most this many
    /// seconds (30 when given without a value). Users' receipts only: a topic message has one
    /// aggregate receipt, shown by `heraldctl message <id>`.
    #[arg(long, num_args = 0..=1, default_missing_value = "30", value_name = "SECS", conflicts_with = "topic")]
    wait: Option<u64>,
}

#[derive(Debug, Args)]
struct ReadArgs {
    /// From this long ago (`30s`, `15m`, `2h`, `7d`) or this Unix time in ms. Default: 1h, or
    /// only new entries with --follow.
    #[arg(long)]
    since: Option<String>,
    /// Keep printing entries as they arrive (Ctrl-C stops).
    #[arg(long)]
    follow: bool,
    /// At most this many (without --follow).
    #[arg(long, default_value_t = 100)]
    limit: usize,
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
    let cli = Cli::parse();
    // Errors are printed as one chain of causes; a backtrace would only bury the message.
    match run(cli) {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    if let Command::Token { user, ttl_secs, issuer, audience, secret } = &command {
        println!("{}", token(secret, user, *ttl_secs, issuer.as_deref(), audience.as_deref())?);
        return Ok(());
    }
    if !is_token(&global.prefix) {
        bail!("--prefix {:?} must be 1-64 of [A-Za-z0-9_-]", global.prefix);
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(operate(global, command))
}

async fn operate(global: Global, command: Command) -> anyhow::Result<()> {
    let json = global.json;
    let api = || Api::new(&global.api_url, global.token.clone());
    let admin = || Api::new(&global.admin_url, global.token.clone());
    match command {
        Command::Token { .. } => Ok(()),
        Command::Publish(args) => publish(&global, args).await,
        Command::Message { id, limit } => {
            let path = format!("/v1/messages/{}{}", client::segment(&id), limit_query(limit));
            show(json, &api()?.get(&path).await?, render::message)
        }
        Command::Pending { user, limit } => {
            let path = format!("/v1/users/{}/pending{}", client::segment(&user), limit_query(limit));
            show(json, &api()?.get(&path).await?, render::pending)
        }
        Command::Presence { user } => {
            show(json, &api()?.get(&format!("/v1/users/{}/presence", client::segment(&user))).await?, render::presence)
        }
        Command::Status => show(json, &admin()?.get("/v1/status").await?, render::status),
        Command::Kick { user } => {
            show(json, &admin()?.post(&format!("/v1/users/{}/kick", client::segment(&user))).await?, render::kick)
        }
        Command::Cancel { id } => {
            show(json, &admin()?.post(&format!("/v1/messages/{}/cancel", client::segment(&id))).await?, render::cancel)
        }
        Command::Forget { user } => {
            show(json, &admin()?.delete(&format!("/v1/users/{}", client::segment(&user))).await?, render::forget)
        }
        Command::Rejections(args) => read_back(&global, args, |n| n.rejected_subject()).await,
        Command::DeadLetters(args) => read_back(&global, args, |n| n.dead_letter_subject()).await,
    }
}

fn limit_query(limit: Option<usize>) -> String {
    limit.map(|n| format!("?limit={n}")).unwrap_or_default()
}

fn show(json: bool, body: &serde_json::Value, human: fn(&serde_json::Value) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(body)?);
    } else {
        print!("{}", human(body));
    }
    Ok(())
}

/// Connects as the services do: the seed list of `HERALD_NATS_URL`, its credentials or
/// `HERALD_NATS_CREDS_FILE` / `HERALD_NATS_NKEY_FILE`, and `HERALD_NATS_TLS_*`.
async fn nats(global: &Global) -> anyhow::Result<async_nats::jetstream::Context> {
    let mut env = Env::from_process();
    let (auth, tls) = (herald_shared::config::nats_auth(&mut env), herald_shared::config::nats_tls(&mut env));
    env.finish(())?;
    let shown = herald_shared::connect::redact_url(&global.nats_url);
    let (seeds, options) = herald_shared::connect::nats_options(&global.nats_url, &auth, &tls)
        .with_context(|| format!("NATS at {shown}"))?;
    let client = options
        .name("heraldctl")
        .connection_timeout(Duration::from_secs(3))
        .connect(seeds)
        .await
        .with_context(|| format!("connecting to NATS at {shown}"))?;
    Ok(async_nats::jetstream::new(client))
}

async fn publish(global: &Global, args: PublishArgs) -> anyhow::Result<()> {
    if !is_token(&args.subject) {
        bail!("--subject {:?} must be 1-64 of [A-Za-z0-9_-]", args.subject);
    }
    let payload = read_payload(&args)?;
    let body = job_body(args.to, args.topic, &payload, args.id, args.ttl)?;
    // The dispatcher's limits, from the same variables it reads (defaults otherwise).
    let mut env = Env::from_process();
    let (max_payload_bytes, max_recipients, default_ttl, max_ttl) = job_limits(&mut env);
    env.finish(())?;
    let limits = herald_publish::validate::Limits { max_payload_bytes, max_recipients, default_ttl, max_ttl };
    let names = Names::new(&global.prefix);
    let subject = names.publish_subject(&args.subject);
    // Validation first: a bad job fails here, before NATS is even asked.
    let prepared = herald_publish::prepare(&body, None, &subject, &limits).map_err(|invalid| {
        anyhow::anyhow!(
            "rejected ({}): {}; nothing was published",
            herald_publish::code_str(invalid.code),
            invalid.reason
        )
    })?;
    let js = nats(global).await?;
    let destination = herald_publish::Destination { stream: names.jobs_stream(), subject };
    let publisher = herald_publish::Publisher::new(js.clone(), destination, limits).await?;
    let published = publisher.send(&prepared, None).await?;
    js.client().flush().await.context("flushing the NATS connection")?;
    if global.json {
        println!("{}", serde_json::to_string(&published)?);
    } else {
        println!(
            "id={} stream={} seq={} duplicate={}",
            published.id, published.stream, published.seq, published.duplicate
        );
    }
    match args.wait {
        Some(secs) => {
            let api = Api::new(&global.api_url, global.token.clone())?;
            client::follow_receipts(&api, published.id.as_str(), Duration::from_secs(secs), global.json).await
        }
        None => Ok(()),
    }
}

fn read_payload(args: &PublishArgs) -> anyhow::Result<String> {
    let from_stdin = || {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the payload from stdin")?;
        Ok::<_, anyhow::Error>(text)
    };
    match (&args.payload_arg, &args.payload, &args.file) {
        (Some(p), _, _) | (None, Some(p), _) if p == "-" => from_stdin(),
        (Some(p), _, _) | (None, Some(p), _) => Ok(p.clone()),
        (None, None, Some(path)) if path.as_os_str() == "-" => from_stdin(),
        (None, None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading the payload from {}", path.display()))
        }
        (None, None, None) => bail!("no payload: give it as an argument, with --payload, --file, or `-` for stdin"),
    }
}

/// The job as JSON, with the payload's text kept byte for byte (trailing whitespace aside).
fn job_body(
    to: Vec<String>,
    topic: Option<String>,
    payload: &str,
    id: Option<String>,
    ttl_secs: Option<u64>,
) -> anyhow::Result<Vec<u8>> {
    let to: Vec<String> = to.into_iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
    if to.is_empty() && topic.is_none() {
        bail!("--to needs at least one user id");
    }
    let payload: Box<serde_json::value::RawValue> =
        serde_json::from_str(payload.trim()).context("the payload is not valid JSON")?;
    let to = topic.is_none().then_some(to);
    let job = herald_proto::PublishJob { id, to, topic, payload, ttl_secs };
    serde_json::to_vec(&job).context("encoding the job")
}

async fn read_back(global: &Global, args: ReadArgs, subject: fn(&Names) -> String) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use herald_publish::rejections::{self, Source, Start};
    let names = Names::new(&global.prefix);
    let source = Source { stream: names.rejected_stream(), subject: subject(&names) };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("system clock is before 1970")?.as_millis() as u64;
    let start = match (&args.since, args.follow) {
        (Some(since), _) => Start::Since(since_ms(since, now)?),
        (None, true) => Start::New,
        (None, false) => Start::Since(now.saturating_sub(3_600_000)),
    };
    let js = nats(global).await?;
    let print = |entry: &rejections::Entry| -> anyhow::Result<()> {
        match (&entry.rejection, global.json) {
            (Some(r), true) => println!("{}", serde_json::to_string(r)?),
            (Some(r), false) => println!("{}", render::rejection(r)),
            (None, _) => eprintln!("heraldctl: stream entry {} is not a rejection; skipped", entry.stream_seq),
        }
        Ok(())
    };
    if args.follow {
        let entries = rejections::follow(&js, &source, start).await?;
        futures::pin_mut!(entries);
        while let Some(entry) = entries.next().await {
            print(&entry?)?;
        }
        return Ok(());
    }
    let (entries, truncated) = rejections::read(&js, &source, start, args.limit.max(1)).await?;
    for entry in &entries {
        print(entry)?;
    }
    if truncated {
        eprintln!("heraldctl: more than {} entries; showing the oldest (use --since or --limit)", args.limit);
    } else if entries.is_empty() && !global.json {
        eprintln!("heraldctl: none");
    }
    Ok(())
}

/// `--since`: a duration ago (`30s`, `15m`, `2h`, `7d`) or a Unix time in ms.
fn since_ms(since: &str, now_ms: u64) -> anyhow::Result<u64> {
    if let Ok(ms) = since.parse::<u64>() {
        return Ok(ms);
    }
    let split = since.find(|c: char| !c.is_ascii_digit()).unwrap_or(since.len());
    let (number, unit) = since.split_at(split);
    let n: u64 = number.parse().with_context(|| format!("--since {since:?}: expected 15m, 2h, 7d or Unix ms"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("--since {since:?}: the unit must be s, m, h or d"),
    };
    Ok(now_ms.saturating_sub(n.saturating_mul(unit_ms)))
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
    // An empty secret is refused here (jsonwebtoken 12), with the reason.
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).context("the signing secret")?;
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).context("signing the token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_must_be_json_and_recipients_are_trimmed() {
        assert!(job_body(vec!["a".into()], None, "{not json", None, None).is_err());
        assert!(job_body(vec![" ".into()], None, "{}", None, None).is_err());
        let body =
            job_body(vec![" alice".into(), "".into(), "bob".into()], None, "{\"title\":\"hi\"}\n", None, Some(5))
                .unwrap();
        let job: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(job["to"], serde_json::json!(["alice", "bob"]));
        assert_eq!(job["ttl_secs"], 5);
        assert_eq!(String::from_utf8(body).unwrap(), r#"{"to":["alice","bob"],"payload":{"title":"hi"},"ttl_secs":5}"#);
    }

    #[test]
    fn since_takes_durations_and_unix_millis() {
        assert_eq!(since_ms("15m", 1_000_000_000).unwrap(), 1_000_000_000 - 900_000);
        assert_eq!(since_ms("2h", 10_000_000).unwrap(), 10_000_000 - 7_200_000);
        assert_eq!(since_ms("1764169630456", 0).unwrap(), 1_764_169_630_456);
        assert_eq!(since_ms("30d", 5).unwrap(), 0, "never before 1970");
        for bad in ["", "m", "15x", "1.5h", "-1h"] {
            assert!(since_ms(bad, 1_000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_round_trips_with_the_secret() {
        let secret = "0123456789abcdef";
        let t = token(secret, "alice", 60, Some("me"), None).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["me"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "alice");
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let waiting_on_a_topic = Cli::try_parse_from(["heraldctl", "publish", "--topic", "news", "{}", "--wait"]);
        assert!(waiting_on_a_topic.is_err(), "a topic message has no users' receipts to follow");
        let cli = Cli::try_parse_from(["heraldctl", "--json", "publish", "--to", "a,b", "{}", "--ttl", "5", "--wait"])
            .unwrap();
        let Command::Publish(args) = cli.command else { panic!("not publish") };
        assert_eq!(
            (args.to.len(), args.ttl, args.wait, args.payload_arg.as_deref()),
            (2, Some(5), Some(30), Some("{}"))
        );
        assert!(cli.global.json);
        assert!(Cli::try_parse_from(["heraldctl", "publish", "--to", "a", "{}", "--file", "x"]).is_err());
        let cli = Cli::try_parse_from(["heraldctl", "rejections", "--since", "15m", "--follow"]).unwrap();
        assert!(matches!(cli.command, Command::Rejections(ReadArgs { follow: true, .. })));
    }
}
