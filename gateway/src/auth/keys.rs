//! Verification keys: what each one is (its algorithm, its `kid`), where it comes from (a secret,
//! a PEM file, a JWK), and which of them may verify a given token. Fetching the JWKS is
//! `jwks.rs`'s business; checking claims is the authenticator's.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// One key and the one algorithm it verifies. A token is checked against a key only when its
/// `alg` is the key's: an HS256 token is never checked with a public key as its secret (the
/// algorithm-confusion attack), nor an RS256 one against a key meant for PS256.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    /// From a JWK's `kid`; secrets and PEM keys have none.
    pub(crate) kid: Option<String>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// Why a configured key could not be loaded; each names the file or the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("HERALD_JWT_PUBLIC_KEYS: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("HERALD_JWT_PUBLIC_KEYS: {path} {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{0}: not a usable HS256 secret")]
    Secret(&'static str),
}

impl VerifyKey {
    /// An HS256 secret; `name` is its variable, for the error.
    pub(crate) fn secret(name: &'static str, secret: &str) -> Result<Self, KeyError> {
        let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|_| KeyError::Secret(name))?;
        Ok(Self { kid: None, alg: Algorithm::HS256, key })
    }

    /// The public key in a PEM file. Its type sets the algorithm: RSA → RS256, EC P-256 →
    /// ES256, EC P-384 → ES384, Ed25519 → EdDSA.
    pub(crate) fn pem_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        Self::pem(&text).map_err(|reason| KeyError::Pem { path: path.to_owned(), reason })
    }

    fn pem(text: &[u8]) -> Result<Self, String> {
        let label = pem_label(text).ok_or("holds no PEM block (-----BEGIN ...-----)")?;
        if label.contains("PRIVATE") {
            return Err(format!("holds a private key ({label}): give the gateway the public key only"));
        }
        if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
            return Err(format!("holds a {label}, not a PUBLIC KEY"));
        }
        let unsupported = || "is not an RSA, EC P-256/P-384 or Ed25519 public key".to_owned();
        if let Ok(key) = DecodingKey::from_rsa_pem(text) {
            return Ok(Self { kid: None, alg: Algorithm::RS256, key });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(text) {
            let alg = ec_algorithm(&key).ok_or_else(unsupported)?;
            return Ok(Self { kid: None, alg, key });
        }
        if let Ok(key) = DecodingKey::from_ed_pem(text) {
            return Ok(Self { kid: None, alg: Algorithm::EdDSA, key });
        }
        Err(unsupported())
    }

    /// A signing key of an identity provider's JWKS, or why it is left out. Symmetric (`oct`)
    /// keys are always left out: a JWKS is public, so a secret in it is no secret.
    pub(crate) fn from_jwk(jwk: &Jwk) -> Result<Self, &'static str> {
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return Err("not a signing key (use)");
        }
        let alg = jwk_algorithm(jwk)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| "malformed key parameters")?;
        if key.family() != alg.family() {
            return Err("alg does not fit the key type");
        }
        Ok(Self { kid: jwk.common.key_id.clone(), alg, key })
    }
}

/// The label of the first PEM block: `PUBLIC KEY` in `-----BEGIN PUBLIC KEY-----`.
fn pem_label(text: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(text).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")?;
    Some(text[start..start + end].trim().to_owned())
}

/// An EC key's algorithm from its curve, told by the length of its uncompressed point.
fn ec_algorithm(key: &DecodingKey) -> Option<Algorithm> {
    match key.try_get_as_bytes().ok()?.len() {
        65 => Some(Algorithm::ES256),
        97 => Some(Algorithm::ES384),
        _ => None,
    }
}

/// The algorithm a JWK verifies: its `alg`, else the one its key type implies.
fn jwk_algorithm(jwk: &Jwk) -> Result<Algorithm, &'static str> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err("unsupported curve"),
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key"),
        _ => return Err("unsupported key type"),
    };
    let Some(named) = jwk.common.key_algorithm else { return Ok(implied) };
    let named = match named {
        KeyAlgorithm::HS256 | KeyAlgorithm::HS384 | KeyAlgorithm::HS512 => return Err("an HMAC alg"),
        other => Algorithm::try_from(other).map_err(|_| "not a signing alg")?,
    };
    // ES256 on a P-384 key, or the like, would never verify: say so at load time.
    let curve_fits = named.family() != AlgorithmFamily::Ec || named == implied;
    if named.family() == implied.family() && curve_fits {
        Ok(named)
    } else {
        Err("alg does not fit the key type")
    }
}

/// The keys that may verify a token, and whether its `kid` is one the fetched keys lack.
#[derive(Debug)]
pub(crate) struct Selection<'a> {
    pub(crate) keys: Vec<&'a VerifyKey>,
    /// The token names a `kid` (with a public-key alg) that no fetched key has: the identity
    /// provider may have rotated its keys since the last fetch.
    pub(crate) kid_unknown: bool,
}

/// Which keys may verify a token with this `alg` and `kid`. Configured keys (secrets, PEM) have
/// no kid and are candidates by algorithm alone; fetched keys are candidates by kid when the
/// token names one, else by algorithm. Never a key of another algorithm.
pub(crate) fn select<'a>(
    alg: Algorithm,
    kid: Option<&str>,
    configured: &'a [VerifyKey],
    fetched: &'a [VerifyKey],
) -> Selection<'a> {
    let same_alg = |key: &&VerifyKey| key.alg == alg;
    let mut keys: Vec<&VerifyKey> = configured.iter().filter(same_alg).collect();
    let mut kid_unknown = false;
    match kid {
        Some(kid) => {
            let mut named = fetched.iter().filter(|key| key.kid.as_deref() == Some(kid)).peekable();
            // A JWKS holds no HMAC keys, so an HS256 token's kid is no reason to fetch.
            kid_unknown = named.peek().is_none() && alg.family() != AlgorithmFamily::Hmac;
            keys.extend(named.filter(same_alg));
        }
        None => keys.extend(fetched.iter().filter(same_alg)),
    }
    Selection { keys, kid_unknown }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: Option<&str>, alg: Algorithm, n: u8) -> VerifyKey {
        VerifyKey { kid: kid.map(Into::into), alg, key: DecodingKey::from_secret(&[n; 16]).unwrap() }
    }

    #[test]
    fn selects_by_algorithm_then_by_kid() {
        let configured =
            [key(None, Algorithm::HS256, 1), key(None, Algorithm::HS256, 2), key(None, Algorithm::RS256, 3)];
        let fetched =
            [key(Some("a"), Algorithm::RS256, 4), key(Some("b"), Algorithm::ES256, 5), key(None, Algorithm::RS256, 6)];
        let pick = |alg, kid| select(alg, kid, &configured, &fetched);
        // The same keys, by identity.
        let same = |got: &[&VerifyKey], want: &[&VerifyKey]| {
            got.len() == want.len() && got.iter().zip(want).all(|(a, b)| std::ptr::eq(*a, *b))
        };

        // Both secrets for HS256 (a rotation), whatever kid it names, and no refetch for it.
        let hs = pick(Algorithm::HS256, Some("zzz"));
        assert!(same(&hs.keys, &[&configured[0], &configured[1]]));
        assert!(!hs.kid_unknown);
        // RS256 with a known kid: the PEM key and that JWK only.
        assert!(same(&pick(Algorithm::RS256, Some("a")).keys, &[&configured[2], &fetched[0]]));
        // Without a kid: every key of the algorithm.
        assert!(same(&pick(Algorithm::RS256, None).keys, &[&configured[2], &fetched[0], &fetched[2]]));
        // A kid the JWKS lacks: the PEM key is still tried, and a refetch may help.
        let unknown = pick(Algorithm::RS256, Some("new"));
        assert!(same(&unknown.keys, &[&configured[2]]) && unknown.kid_unknown);
        // A known kid with another alg: never that key (alg confusion), and no refetch.
        let confused = pick(Algorithm::RS256, Some("b"));
        assert!(same(&confused.keys, &[&configured[2]]) && !confused.kid_unknown);
        // HS512 matches nothing: only HS256 secrets are configured.
        assert!(pick(Algorithm::HS512, None).keys.is_empty());
    }

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_jwk_verifies_only_the_algorithm_of_its_type() {
        // A P-256 point (any bytes parse; only verification would tell).
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let ec = |alg: Option<&str>, crv: &str| {
            let mut v = serde_json::json!({"kty": "EC", "crv": crv, "x": x, "y": y, "kid": "e"});
            if let Some(alg) = alg {
                v["alg"] = alg.into();
            }
            VerifyKey::from_jwk(&jwk(v)).map(|k| k.alg)
        };
        assert_eq!(ec(None, "P-256"), Ok(Algorithm::ES256));
        assert_eq!(ec(Some("ES256"), "P-256"), Ok(Algorithm::ES256));
        assert!(ec(Some("ES384"), "P-256").is_err(), "the curve sets the hash");
        assert!(ec(Some("RS256"), "P-256").is_err());
        assert!(ec(Some("HS256"), "P-256").is_err(), "never HMAC with a public key");
        let rsa = jwk(serde_json::json!({"kty": "RSA", "n": "sXch", "e": "AQAB", "alg": "PS256"}));
        assert_eq!(VerifyKey::from_jwk(&rsa).map(|k| k.alg), Ok(Algorithm::PS256));
        let ed = jwk(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x}));
        assert_eq!(VerifyKey::from_jwk(&ed).map(|k| k.alg), Ok(Algorithm::EdDSA));
        let oct = jwk(serde_json::json!({"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"}));
        assert!(VerifyKey::from_jwk(&oct).is_err(), "a secret in a public JWKS is no secret");
        let enc = jwk(serde_json::json!({"kty": "RSA", "n": "sXch", "e": "AQAB", "use": "enc"}));
        assert!(VerifyKey::from_jwk(&enc).is_err());
    }

    #[test]
    fn a_pem_file_must_hold_a_public_key() {
        let private = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert!(VerifyKey::pem(private).unwrap_err().contains("private key"));
        assert!(VerifyKey::pem(b"hello").unwrap_err().contains("no PEM block"));
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(VerifyKey::pem(cert).unwrap_err().contains("CERTIFICATE"));
        let garbage = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(VerifyKey::pem(garbage).is_err());
        // An Ed25519 public key (RFC 8410's example).
        let ed = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert_eq!(VerifyKey::pem(ed).unwrap().alg, Algorithm::EdDSA);
        let err = VerifyKey::pem_file(Path::new("/nonexistent/key.pem")).unwrap_err().to_string();
        assert!(err.contains("HERALD_JWT_PUBLIC_KEYS") && err.contains("/nonexistent/key.pem"), "{err}");
    }
}
