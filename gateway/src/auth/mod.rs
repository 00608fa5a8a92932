//! Client authentication: a JWT from the `Authorization: Bearer` header or, for browsers that
//! cannot set headers, the `token` query parameter, verified with HS256 secrets (several during a
//! rotation), PEM public keys or an identity provider's JWKS. Decides who a connection belongs
//! to; what happens to a refused client is the HTTP layer's business. Which key fits a token is
//! `keys.rs`'s decision; keeping the JWKS fresh is `jwks.rs`'s.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use herald_proto::{TopicPattern, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, Validation};
use serde::Deserialize;

use herald_shared::config::JwtConfig;

mod jwks;
mod keys;

pub use jwks::{Refresher as JwksRefresher, FETCH_TIMEOUT as JWKS_FETCH_TIMEOUT, MAX_JWKS_BYTES, MAX_JWKS_KEYS};
pub use keys::KeyError;
use keys::VerifyKey;

/// Allowed clock skew between the token issuer and the gateway.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("the Authorization header is not a Bearer token")]
    NotBearer,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token has the wrong issuer or audience")]
    WrongIssuerOrAudience,
    #[error("invalid user id in `sub`")]
    InvalidSubject,
    #[error("the token names critical header extensions ({0}) this server does not understand")]
    CriticalExtension(String),
    #[error("the token is signed with a key this gateway does not know")]
    UnknownKey,
    #[error("the identity provider's keys are not loaded yet; try again shortly")]
    KeysUnavailable,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// Whether the same token may pass later (the gateway lacks keys), as opposed to a token
    /// that will never pass.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::KeysUnavailable)
    }
}

/// Why the gateway cannot check tokens as configured: a start-up error.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("HERALD_JWKS_URL: {0}")]
    JwksUrl(String),
    #[error("no key to verify tokens with: set HERALD_JWT_SECRET, HERALD_JWT_PUBLIC_KEYS or HERALD_JWKS_URL")]
    NoKeys,
}

/// Checks tokens against the configured keys, issuer and audience. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    /// Secrets and PEM keys: fixed for the life of the process.
    configured: Arc<[VerifyKey]>,
    /// The identity provider's keys, when a JWKS URL is configured; filled by its refresher.
    jwks: Option<Arc<jwks::Jwks>>,
    /// Issuer, audience, required claims; the algorithm is set per key.
    validation: Arc<Validation>,
}

/// Who the client is, and until when its token holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// Seconds since the epoch; the session is closed with 4401 then.
    pub expires_at: u64,
    /// The topics the token allows the connection to subscribe to (its `topics` claim).
    pub topics: Arc<[TopicPattern]>,
}

/// Entries of a `topics` claim read at most; the rest allow nothing. Bounds what matching a
/// subscribe costs, whatever the backend signed.
pub const MAX_TOPIC_PATTERNS: usize = 256;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Topic names and prefix patterns (`"news"`, `"sports.*"`). An entry outside the syntax
    /// allows nothing (it is not an error: the rest of the token still holds).
    #[serde(default)]
    topics: Vec<String>,
}

/// The patterns of a `topics` claim: those that parse, of the first [`MAX_TOPIC_PATTERNS`].
pub fn topic_patterns(entries: &[String]) -> Arc<[TopicPattern]> {
    entries.iter().take(MAX_TOPIC_PATTERNS).filter_map(|e| TopicPattern::parse(e)).collect()
}

/// How verifying with the keys held went: done, or waiting on a JWKS key not fetched yet.
enum Verified {
    Done(Result<Identity, AuthError>),
    KidUnknown { alg: Algorithm, kid: Option<String> },
}

/// How checking a token against the keys at hand went.
enum Attempt {
    Done(Result<Identity, AuthError>),
    /// No key verified its signature; `kid_unknown`: it names a kid the JWKS lacks.
    NoKey {
        kid_unknown: bool,
        reason: String,
    },
}

impl Authenticator {
    /// Loads the secrets and PEM keys. With a JWKS URL, also returns the task that fetches it,
    /// for the caller to own and run: JWKS tokens pass once its first fetch has succeeded.
    pub fn new(config: &JwtConfig) -> Result<(Self, Option<JwksRefresher>), AuthSetupError> {
        let mut configured = Vec::new();
        if !config.secret.is_empty() {
            configured.push(VerifyKey::secret("HERALD_JWT_SECRET", &config.secret)?);
        }
        if let Some(previous) = &config.previous_secret {
            configured.push(VerifyKey::secret("HERALD_JWT_SECRET_PREVIOUS", previous)?);
        }
        for path in &config.public_key_files {
            configured.push(VerifyKey::pem_file(path)?);
        }
        let (jwks, refresher) = match &config.jwks_url {
            Some(url) => {
                let url = reqwest::Url::parse(url).map_err(|e| AuthSetupError::JwksUrl(format!("{url:?}: {e}")))?;
                let (jwks, refresher) = jwks::Jwks::new(url, config.jwks_refresh, config.jwks_min_refetch)
                    .map_err(|e| AuthSetupError::JwksUrl(format!("HTTP client: {e}")))?;
                (Some(jwks), Some(refresher))
            }
            None if configured.is_empty() => return Err(AuthSetupError::NoKeys),
            None => (None, None),
        };

        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not just checked when present.
        let mut required = vec!["exp", "sub"];
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let auth = Self { configured: Arc::from(configured), jwks, validation: Arc::new(validation) };
        Ok((auth, refresher))
    }

    /// Whether tokens can be checked at all: some key is configured, or the JWKS has been
    /// fetched. A gateway whose only keys come from the JWKS is not ready until then.
    pub fn has_keys(&self) -> bool {
        !self.configured.is_empty() || self.jwks.as_ref().is_some_and(|jwks| jwks.is_loaded())
    }

    /// Authenticates a connect request: the header wins over the query parameter.
    pub async fn authenticate(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Identity, AuthError> {
        let token = match headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
                value.strip_prefix("Bearer ").ok_or(AuthError::NotBearer)?.trim()
            }
            None => query_token.ok_or(AuthError::Missing)?,
        };
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        self.verify(token).await
    }

    /// Verifies a token. One naming a `kid` the JWKS lacks may wait for one fetch of it (see
    /// `jwks::refetch_decision` for how often that may happen), at most the fetch timeout.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let (alg, kid) = match self.verify_with_keys_held(token) {
            Verified::Done(result) => return result,
            Verified::KidUnknown { alg, kid } => (alg, kid),
        };
        let Some(jwks) = &self.jwks else { return Err(AuthError::UnknownKey) };
        if jwks.refetch().await {
            if let Attempt::Done(result) = self.attempt(token, alg, kid.as_deref()) {
                return result;
            }
        }
        Err(self.unknown_key())
    }

    /// Verifies a token with the keys at hand, never waiting for a fetch: for a session's
    /// `refresh` frame, whose loop must not stall. A token naming a `kid` not yet fetched is
    /// refused (a connect with it would fetch).
    pub fn verify_cached(&self, token: &str) -> Result<Identity, AuthError> {
        match self.verify_with_keys_held(token) {
            Verified::Done(result) => result,
            Verified::KidUnknown { .. } => Err(self.unknown_key()),
        }
    }

    fn verify_with_keys_held(&self, token: &str) -> Verified {
        if let Err(e) = refuse_critical_extensions(token) {
            return Verified::Done(Err(e));
        }
        let header = match decode_header(token) {
            Ok(header) => header,
            Err(e) => return Verified::Done(Err(AuthError::Invalid(e.to_string()))),
        };
        match self.attempt(token, header.alg, header.kid.as_deref()) {
            Attempt::Done(result) => Verified::Done(result),
            // Only a JWKS can come to hold the key.
            Attempt::NoKey { kid_unknown: true, .. } if self.jwks.is_some() => {
                Verified::KidUnknown { alg: header.alg, kid: header.kid }
            }
            Attempt::NoKey { reason, .. } => Verified::Done(Err(AuthError::Invalid(reason))),
        }
    }

    /// Not "invalid": the key may exist, this gateway just does not have it (yet).
    fn unknown_key(&self) -> AuthError {
        match &self.jwks {
            Some(jwks) if !jwks.is_loaded() => AuthError::KeysUnavailable,
            _ => AuthError::UnknownKey,
        }
    }

    /// Checks `token` against each key that may verify it, until one does.
    fn attempt(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Attempt {
        let fetched = self.jwks.as_ref().map(|jwks| jwks.keys());
        let selection = keys::select(alg, kid, &self.configured, fetched.as_deref().unwrap_or_default());
        let mut reason = format!("no key for alg {alg:?}");
        for key in selection.keys {
            let mut validation = Validation::clone(&self.validation);
            validation.algorithms = vec![key.alg];
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let topics = topic_patterns(&data.claims.topics);
                    let identity = UserId::new(data.claims.sub)
                        .map(|user| Identity { user, expires_at: data.claims.exp, topics })
                        .map_err(|_| AuthError::InvalidSubject);
                    return Attempt::Done(identity);
                }
                // Not this key (or not a key of this shape): try the next.
                Err(e) if is_key_mismatch(e.kind()) => reason = e.to_string(),
                // The signature is good, or the token is bad whatever the key.
                Err(e) => return Attempt::Done(Err(claims_error(e.kind(), e.to_string()))),
            }
        }
        Attempt::NoKey { kid_unknown: selection.kid_unknown, reason }
    }
}

/// Errors that say only that this key did not verify the signature.
fn is_key_mismatch(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::Signing(_)
            | ErrorKind::Provider(_)
    )
}

fn claims_error(kind: &ErrorKind, message: String) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => AuthError::WrongIssuerOrAudience,
        _ => AuthError::Invalid(message),
    }
}

/// RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` header lists extensions it
/// does not understand, and this server understands none. jsonwebtoken ignores the field, so
/// the header is read here first.
fn refuse_critical_extensions(token: &str) -> Result<(), AuthError> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct Crit {
        crit: Option<serde_json::Value>,
    }
    let Some(header) = token.split('.').next() else { return Ok(()) };
    // Anything unreadable here is refused by the full decode that follows, with its reason.
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else { return Ok(()) };
    match serde_json::from_slice::<Crit>(&bytes) {
        Ok(Crit { crit: Some(crit) }) => Err(AuthError::CriticalExtension(crit.to_string())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123";

    fn auth(issuer: Option<&str>, audience: Option<&str>) -> Authenticator {
        let config = JwtConfig {
            secret: SECRET.into(),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            ..JwtConfig::default()
        };
        Authenticator::new(&config).unwrap().0
    }

    fn now() -> u64 {
        herald_shared::now_ms() / 1000
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn accepts_a_good_token_from_header_or_query() {
        let t = token(json!({"sub": "alice", "exp": now() + 60}), SECRET);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        assert_eq!(auth(None, None).authenticate(&headers, None).await.unwrap().user, "alice");
        assert_eq!(auth(None, None).authenticate(&HeaderMap::new(), Some(&t)).await.unwrap().user, "alice");
    }

    #[tokio::test]
    async fn refuses_bad_tokens_with_a_reason() {
        let a = auth(None, None);
        let none = HeaderMap::new();
        assert_eq!(a.authenticate(&none, None).await, Err(AuthError::Missing));
        let expired = token(json!({"sub": "a", "exp": now() - 120}), SECRET);
        assert_eq!(a.verify(&expired).await, Err(AuthError::Expired));
        let early = token(json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}), SECRET);
        assert_eq!(a.verify(&early).await, Err(AuthError::NotYetValid));
        let forged = token(json!({"sub": "a", "exp": now() + 60}), "another-secret-entirely");
        assert!(matches!(a.verify(&forged).await, Err(AuthError::Invalid(_))));
        let no_exp = token(json!({"sub": "a"}), SECRET);
        assert!(matches!(a.verify(&no_exp).await, Err(AuthError::Invalid(_))));
        let empty_sub = token(json!({"sub": "", "exp": now() + 60}), SECRET);
        assert_eq!(a.verify(&empty_sub).await, Err(AuthError::InvalidSubject));
        assert!(matches!(a.verify("not.a.jwt").await, Err(AuthError::Invalid(_))));
        let control = token(json!({"sub": "a\nb", "exp": now() + 60}), SECRET);
        assert_eq!(a.verify(&control).await, Err(AuthError::InvalidSubject));
    }

    #[tokio::test]
    async fn refuses_critical_header_extensions() {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        let claims = json!({"sub": "a", "exp": now() + 60});
        let plain = encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes()).unwrap()).unwrap();
        assert!(auth(None, None).verify(&plain).await.is_ok());
        // The same token with `crit` in its (signed) header.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(r#"{"alg":"HS256","typ":"JWT","crit":["exp-ext"],"exp-ext":1}"#);
        let body = b64.encode(serde_json::to_vec(&claims).unwrap());
        let signing_input = format!("{head}.{body}");
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        let critical = format!("{signing_input}.{signature}");
        assert!(matches!(auth(None, None).verify(&critical).await, Err(AuthError::CriticalExtension(_))));
    }

    #[tokio::test]
    async fn refuses_alg_none() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now() + 60));
        assert!(matches!(auth(None, None).verify(&format!("{header}.{claims}.")).await, Err(AuthError::Invalid(_))));
    }

    #[tokio::test]
    async fn checks_issuer_and_audience_when_configured() {
        let a = auth(Some("herald-tests"), Some("herald"));
        let good = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests", "aud": "herald"}), SECRET);
        assert!(a.verify(&good).await.is_ok());
        let wrong_aud = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests", "aud": "x"}), SECRET);
        assert_eq!(a.verify(&wrong_aud).await, Err(AuthError::WrongIssuerOrAudience));
        let wrong_iss = token(json!({"sub": "a", "exp": now() + 60, "iss": "x", "aud": "herald"}), SECRET);
        assert_eq!(a.verify(&wrong_iss).await, Err(AuthError::WrongIssuerOrAudience));
        let no_iss = token(json!({"sub": "a", "exp": now() + 60, "aud": "herald"}), SECRET);
        assert!(a.verify(&no_iss).await.is_err(), "a configured issuer is required");
        let no_aud = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests"}), SECRET);
        assert!(a.verify(&no_aud).await.is_err(), "a configured audience is required");
    }

    #[tokio::test]
    async fn accepts_the_secret_and_the_previous_one_during_a_rotation() {
        let config = JwtConfig {
            secret: "the-new-secret-0123456".into(),
            previous_secret: Some("the-old-secret,with,commas".into()),
            ..JwtConfig::default()
        };
        let (a, refresher) = Authenticator::new(&config).unwrap();
        assert!(refresher.is_none() && a.has_keys());
        let claims = json!({"sub": "a", "exp": now() + 60});
        assert!(a.verify(&token(claims.clone(), "the-new-secret-0123456")).await.is_ok());
        assert!(a.verify(&token(claims.clone(), "the-old-secret,with,commas")).await.is_ok());
        assert!(matches!(a.verify(&token(claims.clone(), "the-old-secret")).await, Err(AuthError::Invalid(_))));
        // Each secret as a whole: no part of one is a secret.
        assert!(a.verify(&token(claims, "with")).await.is_err());
    }

    #[tokio::test]
    async fn a_public_key_is_never_an_hmac_secret() {
        // RFC 8410's Ed25519 public key. The attack: sign HS256 with the public key's text
        // (or its DER) as the secret, hoping the verifier uses the key bytes as one.
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ed.pem");
        std::fs::write(&path, pem).unwrap();
        let config = JwtConfig { public_key_files: vec![path], ..JwtConfig::default() };
        let (a, _) = Authenticator::new(&config).unwrap();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode("MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=")
            .unwrap();
        let claims = json!({"sub": "mallory", "exp": now() + 60});
        for secret in [pem.as_bytes(), &der, &der[12..]] {
            let forged =
                encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret).unwrap()).unwrap();
            assert!(matches!(a.verify(&forged).await, Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn a_bad_key_source_is_a_start_up_error_naming_it() {
        let config = JwtConfig { public_key_files: vec!["/nonexistent/idp.pem".into()], ..JwtConfig::default() };
        let err = Authenticator::new(&config).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/idp.pem"), "{err}");
        let config = JwtConfig { jwks_url: Some("https://".into()), ..JwtConfig::default() };
        assert!(Authenticator::new(&config).err().unwrap().to_string().contains("HERALD_JWKS_URL"));
        assert!(matches!(Authenticator::new(&JwtConfig::default()), Err(AuthSetupError::NoKeys)));
    }
}
