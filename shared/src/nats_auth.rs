//! NATS credentials: a user and password or a token in `HERALD_NATS_URL`, an nkey seed file or a
//! `.creds` file. Read and checked without connecting, so that the configuration can refuse a
//! missing file or a bad seed at once, naming the variable and the path and never the content.

use std::path::Path;

use crate::config::NatsAuth;
use crate::connect::{nats_seeds, NatsError};

/// What a Herald process presents to NATS, read from `HERALD_NATS_URL` and the file that
/// [`NatsAuth`] names. Holds secrets, hence no `Debug`.
pub(crate) enum NatsCredentials {
    None,
    /// `nats://user:password@host`.
    UserPassword {
        user: String,
        password: String,
    },
    /// `nats://token@host`: a user without a password is a token, as in every NATS client.
    Token(String),
    /// A `.creds` file's text: the user JWT and its nkey seed.
    Creds(String),
    /// A user nkey seed.
    Nkey(String),
}

/// Reads and checks the credentials `url` and `auth` give, without connecting. The configuration
/// calls it so that a missing file or a bad seed stops the start at once, naming the variable
/// and the path, instead of being retried for 20 s as if NATS were down.
pub fn check_nats_credentials(url: &str, auth: &NatsAuth) -> Result<(), NatsError> {
    nats_credentials(url, auth).map(|_| ())
}

/// The credentials of `url` and `auth`. async-nats parses a user and password in a server URL
/// but never sends them (0.51), so they are taken out here and given as options.
pub(crate) fn nats_credentials(url: &str, auth: &NatsAuth) -> Result<NatsCredentials, NatsError> {
    let mut in_url = None;
    for seed in nats_seeds(url)? {
        let this = seed.username().map(|user| (decoded(user), seed.password().map(decoded)));
        match (&in_url, this) {
            (_, None) => {}
            (None, Some(creds)) => in_url = Some(creds),
            (Some(seen), Some(creds)) if *seen != creds => return Err(NatsError::MixedCredentials),
            (Some(_), Some(_)) => {}
        }
    }
    let from_url = match in_url {
        None => NatsCredentials::None,
        Some((token, None)) => NatsCredentials::Token(token),
        Some((user, Some(password))) => NatsCredentials::UserPassword { user, password },
    };
    let read = |variable, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| NatsError::CredentialsFile {
            variable,
            path: path.to_owned(),
            source,
        })
    };
    let file_variable = match auth {
        NatsAuth::None => return Ok(from_url),
        NatsAuth::CredsFile(_) => CREDS_FILE_VAR,
        NatsAuth::NkeyFile(_) => NKEY_FILE_VAR,
    };
    if !matches!(from_url, NatsCredentials::None) {
        return Err(NatsError::TwoCredentials { variable: file_variable });
    }
    match auth {
        NatsAuth::None => Ok(NatsCredentials::None),
        NatsAuth::CredsFile(path) => {
            let text = read(CREDS_FILE_VAR, path)?;
            // The parse async-nats does when connecting: a user JWT and a seed between their markers.
            async_nats::ConnectOptions::new().credentials(&text).map_err(|_| NatsError::BadCredentials {
                variable: CREDS_FILE_VAR,
                path: path.clone(),
                problem: "is not a NATS .creds file (a user JWT and an nkey seed, each between its markers)",
            })?;
            Ok(NatsCredentials::Creds(text))
        }
        NatsAuth::NkeyFile(path) => {
            let text = read(NKEY_FILE_VAR, path)?;
            let bad = |problem| NatsError::BadCredentials { variable: NKEY_FILE_VAR, path: path.clone(), problem };
            // The file the nats tools write (`nsc`, `nk -gen user`) holds the seed on one line;
            // comments and blank lines around it are left out.
            let seed = text
                .lines()
                .map(str::trim)
                .find(|line| {
                    line.starts_with('S') && line.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
                })
                .ok_or(bad("holds no nkey seed (a line starting with SU)"))?;
            let key = nkeys::KeyPair::from_seed(seed).map_err(|_| bad("holds a seed that does not decode"))?;
            if key.key_pair_type() != nkeys::KeyPairType::User {
                return Err(bad("holds an nkey seed that is not a user's (SU…)"));
            }
            Ok(NatsCredentials::Nkey(seed.to_owned()))
        }
    }
}

const CREDS_FILE_VAR: &str = "HERALD_NATS_CREDS_FILE";
const NKEY_FILE_VAR: &str = "HERALD_NATS_NKEY_FILE";

/// The servers without their user and password: those go in the options, and async-nats logs
/// the addresses it connects to.
pub(crate) fn without_credentials(
    seeds: Vec<async_nats::ServerAddr>,
) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    seeds
        .into_iter()
        .map(|seed| {
            let mut url = seed.into_inner();
            // Fails only for URLs that cannot have a user (no host), which a NATS address has.
            let _ = url.set_password(None);
            let _ = url.set_username("");
            async_nats::ServerAddr::from_url(url.clone()).map_err(|_| NatsError::Address(url.to_string()))
        })
        .collect()
}

/// `options` with `credentials` given to them.
pub(crate) fn with_credentials(
    options: async_nats::ConnectOptions,
    credentials: NatsCredentials,
) -> Result<async_nats::ConnectOptions, NatsError> {
    Ok(match credentials {
        NatsCredentials::None => options,
        NatsCredentials::UserPassword { user, password } => options.user_and_password(user, password),
        NatsCredentials::Token(token) => options.token(token),
        NatsCredentials::Creds(text) => options.credentials(&text).map_err(|e| {
            NatsError::Connect(async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Authentication, e))
        })?,
        NatsCredentials::Nkey(seed) => options.nkey(seed),
    })
}

/// `%XX` escapes decoded, as a user or password in a URL needs them for `@`, `:` or `/`.
fn decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A file in the temporary directory holding `text`, removed by the test's end (or not: the
    /// name is unique).
    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("herald-connect-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn creds_text(seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn a_user_and_password_or_a_token_in_the_url_are_taken_out_and_decoded() {
        let auth = NatsAuth::None;
        let Ok(NatsCredentials::UserPassword { user, password }) =
            nats_credentials("nats://herald:p%40ss%3Aword@h:1, nats://herald:p%40ss%3Aword@h:2", &auth)
        else {
            panic!("expected a user and password")
        };
        assert_eq!((user.as_str(), password.as_str()), ("herald", "p@ss:word"));
        assert!(
            matches!(nats_credentials("nats://s3cr3t@h:1,nats://h:2", &auth), Ok(NatsCredentials::Token(t)) if t == "s3cr3t")
        );
        assert!(matches!(nats_credentials("nats://h:1", &auth), Ok(NatsCredentials::None)));
        assert!(matches!(nats_credentials("nats://a:b@h:1,nats://a:c@h:2", &auth), Err(NatsError::MixedCredentials)));
        let seeds = without_credentials(nats_seeds("nats://a:b@h:1").unwrap()).unwrap();
        assert!(!seeds[0].has_user_pass());
    }

    #[test]
    fn an_nkey_file_holds_a_user_seed() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let path = file(&format!("# herald-dispatcher\n\n  {seed}  \n"));
        let Ok(NatsCredentials::Nkey(read)) = nats_credentials("nats://h:1", &NatsAuth::NkeyFile(path)) else {
            panic!("expected the seed")
        };
        assert_eq!(read, seed);

        let account = nkeys::KeyPair::new_account().seed().unwrap();
        for (text, problem) in [
            (user.public_key(), "holds no nkey seed"),
            ("SUNOTASEED".to_owned(), "does not decode"),
            (account.clone(), "not a user's"),
        ] {
            let e = nats_credentials("nats://h:1", &NatsAuth::NkeyFile(file(&text))).err().unwrap();
            let shown = e.to_string();
            assert!(shown.starts_with("HERALD_NATS_NKEY_FILE: ") && shown.contains(problem), "{shown}");
            assert!(!shown.contains(&text), "the file's content stays out of errors: {shown}");
        }
        let missing = std::env::temp_dir().join("herald-no-such-file");
        let e = nats_credentials("nats://h:1", &NatsAuth::NkeyFile(missing.clone())).err().unwrap();
        assert!(
            matches!(&e, NatsError::CredentialsFile { variable: "HERALD_NATS_NKEY_FILE", path, .. } if *path == missing)
        );
        assert!(e.to_string().contains("herald-no-such-file"), "{e}");
    }

    /// The file is read, checked and wired into the options; tests/tests/nats_config.rs logs in
    /// with one to a server in operator mode.
    #[test]
    fn a_creds_file_holds_a_jwt_and_a_seed_and_is_wired_into_the_options() {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let text = creds_text(&seed);
        let Ok(NatsCredentials::Creds(read)) = nats_credentials("nats://h:1", &NatsAuth::CredsFile(file(&text))) else {
            panic!("expected the creds")
        };
        assert_eq!(read, text);
        assert!(with_credentials(async_nats::ConnectOptions::new(), NatsCredentials::Creds(read)).is_ok());

        for bad in ["", "just text", &creds_text("SUNOTASEED")] {
            let e = nats_credentials("nats://h:1", &NatsAuth::CredsFile(file(bad))).err().unwrap();
            assert!(
                e.to_string().starts_with("HERALD_NATS_CREDS_FILE: ") && e.to_string().contains("not a NATS .creds")
            );
        }
    }
}
