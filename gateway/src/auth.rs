//! Client authentication: an HS256 JWT from the `Authorization: Bearer` header or, for browsers
//! that cannot set headers, the `token` query parameter. Decides who a connection belongs to;
//! what happens to a refused client is the HTTP layer's business.

use axum::http::{header, HeaderMap};
use herald_proto::UserId;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use herald_shared::config::JwtConfig;

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
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Checks tokens against the configured secret, issuer and audience.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

/// Who the client is, and until when its token holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// Seconds since the epoch; the session is closed with 4401 then.
    pub expires_at: u64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl Authenticator {
    pub fn new(config: &JwtConfig) -> Self {
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
        Self { key: DecodingKey::from_secret(config.secret.as_bytes()), validation }
    }

    /// Authenticates a connect request: the header wins over the query parameter.
    pub fn authenticate(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Identity, AuthError> {
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
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        refuse_critical_extensions(token)?;
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => AuthError::WrongIssuerOrAudience,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let user = UserId::new(data.claims.sub).map_err(|_| AuthError::InvalidSubject)?;
        Ok(Identity { user, expires_at: data.claims.exp })
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
        Authenticator::new(&JwtConfig {
            secret: SECRET.into(),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
        })
    }

    fn now() -> u64 {
        herald_shared::now_ms() / 1000
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn accepts_a_good_token_from_header_or_query() {
        let t = token(json!({"sub": "alice", "exp": now() + 60}), SECRET);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        assert_eq!(auth(None, None).authenticate(&headers, None).unwrap().user, "alice");
        assert_eq!(auth(None, None).authenticate(&HeaderMap::new(), Some(&t)).unwrap().user, "alice");
    }

    #[test]
    fn refuses_bad_tokens_with_a_reason() {
        let a = auth(None, None);
        let none = HeaderMap::new();
        assert_eq!(a.authenticate(&none, None), Err(AuthError::Missing));
        let expired = token(json!({"sub": "a", "exp": now() - 120}), SECRET);
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        let early = token(json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}), SECRET);
        assert_eq!(a.verify(&early), Err(AuthError::NotYetValid));
        let forged = token(json!({"sub": "a", "exp": now() + 60}), "another-secret-entirely");
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        let no_exp = token(json!({"sub": "a"}), SECRET);
        assert!(matches!(a.verify(&no_exp), Err(AuthError::Invalid(_))));
        let empty_sub = token(json!({"sub": "", "exp": now() + 60}), SECRET);
        assert_eq!(a.verify(&empty_sub), Err(AuthError::InvalidSubject));
        assert!(matches!(a.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
        let control = token(json!({"sub": "a\nb", "exp": now() + 60}), SECRET);
        assert_eq!(a.verify(&control), Err(AuthError::InvalidSubject));
    }

    #[test]
    fn refuses_critical_header_extensions() {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        let claims = json!({"sub": "a", "exp": now() + 60});
        let plain = encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
        assert!(auth(None, None).verify(&plain).is_ok());
        // The same token with `crit` in its (signed) header.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(r#"{"alg":"HS256","typ":"JWT","crit":["exp-ext"],"exp-ext":1}"#);
        let body = b64.encode(serde_json::to_vec(&claims).unwrap());
        let signing_input = format!("{head}.{body}");
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        let critical = format!("{signing_input}.{signature}");
        assert!(matches!(auth(None, None).verify(&critical), Err(AuthError::CriticalExtension(_))));
    }

    #[test]
    fn refuses_alg_none() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now() + 60));
        assert!(matches!(auth(None, None).verify(&format!("{header}.{claims}.")), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let a = auth(Some("herald-tests"), Some("herald"));
        let good = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests", "aud": "herald"}), SECRET);
        assert!(a.verify(&good).is_ok());
        let wrong_aud = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests", "aud": "x"}), SECRET);
        assert_eq!(a.verify(&wrong_aud), Err(AuthError::WrongIssuerOrAudience));
        let wrong_iss = token(json!({"sub": "a", "exp": now() + 60, "iss": "x", "aud": "herald"}), SECRET);
        assert_eq!(a.verify(&wrong_iss), Err(AuthError::WrongIssuerOrAudience));
        let no_iss = token(json!({"sub": "a", "exp": now() + 60, "aud": "herald"}), SECRET);
        assert!(a.verify(&no_iss).is_err(), "a configured issuer is required");
        let no_aud = token(json!({"sub": "a", "exp": now() + 60, "iss": "herald-tests"}), SECRET);
        assert!(a.verify(&no_aud).is_err(), "a configured audience is required");
    }
}
