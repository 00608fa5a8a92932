//! Client JWTs for tests: good ones (HS256 with the test secret, or any key an identity provider
//! would sign with) and each kind of bad one.
//!
//! Bad tokens are bad by a wide margin (an hour), so that no validation leeway (jsonwebtoken
//! allows 60 s by default) can make them pass.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

const HOUR: i64 = 3600;

/// The claims of a test token; build with [`Claims::new`], adjust, then [`Claims::sign`].
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The topics the token allows (names and `prefix.*` patterns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

impl Claims {
    /// Issued now, valid for `ttl`.
    pub fn new(user: &str, ttl: Duration) -> Self {
        let now = now();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        Self { sub: user.to_owned(), iat: now, exp: now + ttl, nbf: None, iss: None, aud: None, topics: None }
    }

    pub fn issuer(mut self, iss: &str) -> Self {
        self.iss = Some(iss.to_owned());
        self
    }

    pub fn audience(mut self, aud: &str) -> Self {
        self.aud = Some(aud.to_owned());
        self
    }

    /// Allows subscribing to these topics (`topics` claim).
    pub fn topics(mut self, topics: &[&str]) -> Self {
        self.topics = Some(topics.iter().map(|t| (*t).to_owned()).collect());
        self
    }

    /// Valid only from `nbf` (seconds since the epoch).
    pub fn not_before(mut self, nbf: i64) -> Self {
        self.nbf = Some(nbf);
        self
    }

    /// Signed with HS256 and `secret`, as the gateway expects.
    pub fn sign(&self, secret: &str) -> String {
        self.sign_with(Algorithm::HS256, secret)
    }

    /// Signed with any key and header (a public-key algorithm, a `kid`), as an identity provider
    /// would.
    pub fn sign_with_key(&self, header: &Header, key: &EncodingKey) -> String {
        jsonwebtoken::encode(header, self, key).expect("a key that fits the header's alg")
    }

    /// Signed with another HMAC algorithm (HS384, HS512), for algorithm-confusion tests.
    pub fn sign_with(&self, algorithm: Algorithm, secret: &str) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).expect("a non-empty HMAC secret");
        jsonwebtoken::encode(&Header::new(algorithm), self, &key).expect("HMAC signing cannot fail")
    }
}

/// A good token for `user`, valid for `ttl`.
pub fn mint(secret: &str, user: &str, ttl: Duration) -> String {
    Claims::new(user, ttl).sign(secret)
}

/// Expired an hour ago.
pub fn expired(secret: &str, user: &str) -> String {
    let mut claims = Claims::new(user, Duration::ZERO);
    claims.iat -= 2 * HOUR;
    claims.exp -= HOUR;
    claims.sign(secret)
}

/// Signed with a secret the gateway does not know.
pub fn wrong_signature(user: &str) -> String {
    mint("not-the-gateway-secret-at-all", user, Duration::from_secs(3600))
}

/// Valid only from an hour from now.
pub fn not_yet_valid(secret: &str, user: &str) -> String {
    Claims::new(user, Duration::from_secs(3 * 3600)).not_before(now() + HOUR).sign(secret)
}

/// Signed with the right secret but HS512: the gateway must accept HS256 only.
pub fn wrong_algorithm(secret: &str, user: &str) -> String {
    Claims::new(user, Duration::from_secs(3600)).sign_with(Algorithm::HS512, secret)
}

/// `alg: none` with an empty signature: a valid-looking token anyone can forge.
pub fn alg_none(user: &str) -> String {
    let header = serde_json::json!({ "alg": "none", "typ": "JWT" });
    let claims = Claims::new(user, Duration::from_secs(3600));
    let encode = |json: Vec<u8>| URL_SAFE_NO_PAD.encode(json);
    format!(
        "{}.{}.",
        encode(serde_json::to_vec(&header).expect("json")),
        encode(serde_json::to_vec(&claims).expect("json"))
    )
}

fn now() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX / 2)
}
