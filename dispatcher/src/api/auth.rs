//! Who may call what: bearer tokens with scopes. The admin token holds every scope; the publish
//! and read tokens (when configured) hold one each. Tokens are compared in constant time, and
//! every configured token is compared on every request, so the time taken says nothing about
//! which one (or how much of one) matched.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use herald_shared::config::ApiConfig;
use serde::Serialize;

use super::{ApiError, ApiState};

/// What a request needs its token to allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `POST /v1/publish`, `POST /v1/publish/batch`.
    Publish,
    /// Messages, pending, presence, rejections, dead letters, status.
    Read,
    /// The operator's actions: kick, cancel, forget. Only the admin token.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// The configured tokens, each with the scopes it grants.
pub struct Tokens {
    granted: Vec<(Vec<u8>, &'static [Scope])>,
}

impl Tokens {
    pub fn new(config: &ApiConfig) -> Self {
        let mut granted: Vec<(Vec<u8>, &'static [Scope])> =
            vec![(config.admin_token.clone().into_bytes(), &[Scope::Publish, Scope::Read, Scope::Admin])];
        if let Some(token) = &config.publish_token {
            granted.push((token.clone().into_bytes(), &[Scope::Publish]));
        }
        if let Some(token) = &config.read_token {
            granted.push((token.clone().into_bytes(), &[Scope::Read]));
        }
        Self { granted }
    }

    /// Whether `presented` is a known token (`None`: it is not) and, if so, whether it grants
    /// `scope`. Compares against every token, matching or not.
    pub fn check(&self, presented: &[u8], scope: Scope) -> Option<bool> {
        use subtle::ConstantTimeEq;
        let mut known = false;
        let mut allowed = false;
        for (token, scopes) in &self.granted {
            let matches: bool = token.as_slice().ct_eq(presented).into();
            known |= matches;
            allowed |= matches && scopes.contains(&scope);
        }
        known.then_some(allowed)
    }
}

/// The bearer token of a request, if it carries one.
fn bearer(request: &Request) -> Option<&[u8]> {
    let value = request.headers().get(header::AUTHORIZATION)?.as_bytes();
    value.strip_prefix(b"Bearer ")
}

/// Middleware: lets the request through only with a token that grants `scope`. 401 without a
/// known token, 403 with one that lacks the scope.
pub async fn authorize(
    State((state, scope)): State<(Arc<ApiState>, Scope)>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match bearer(&request).map(|token| state.tokens.check(token, scope)) {
        Some(Some(true)) => Ok(next.run(request).await),
        Some(Some(false)) => Err(ApiError::Forbidden(scope)),
        _ => Err(ApiError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(publish: Option<&str>, read: Option<&str>) -> Tokens {
        Tokens::new(&ApiConfig {
            admin_token: "admin-token-0123456789".into(),
            publish_token: publish.map(Into::into),
            read_token: read.map(Into::into),
            max_body_bytes: 1 << 20,
            max_batch: 10,
            cors_origins: vec![],
            max_backlog: 0,
        })
    }

    #[test]
    fn admin_implies_every_scope_and_the_others_one_each() {
        let t = tokens(Some("publish-token-0123456"), Some("read-token-0123456789"));
        for scope in [Scope::Publish, Scope::Read, Scope::Admin] {
            assert_eq!(t.check(b"admin-token-0123456789", scope), Some(true), "{scope:?}");
        }
        assert_eq!(t.check(b"publish-token-0123456", Scope::Publish), Some(true));
        assert_eq!(t.check(b"publish-token-0123456", Scope::Read), Some(false));
        assert_eq!(t.check(b"publish-token-0123456", Scope::Admin), Some(false));
        assert_eq!(t.check(b"read-token-0123456789", Scope::Read), Some(true));
        assert_eq!(t.check(b"read-token-0123456789", Scope::Publish), Some(false));
        for wrong in [&b""[..], b"admin-token-012345678", b"admin-token-0123456789x", b"read-token"] {
            assert_eq!(t.check(wrong, Scope::Read), None, "{wrong:?}");
        }
    }

    #[test]
    fn unset_tokens_grant_nothing() {
        let t = tokens(None, None);
        assert_eq!(t.check(b"", Scope::Publish), None);
        assert_eq!(t.check(b"admin-token-0123456789", Scope::Publish), Some(true));
    }
}
