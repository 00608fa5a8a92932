//! The HTTP/1.1 handshake that turns a request into a [`WebSocket`] (RFC 6455 §4.2), and the
//! transport under it: the plain TCP socket itself where there is one, hyper's upgraded
//! connection otherwise (TLS).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{Limits, WebSocket};

/// A request to upgrade to a WebSocket, its headers checked.
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request to `/v1/connect` is not a WebSocket handshake this server can answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UpgradeRefusal {
    #[error("a WebSocket handshake is a GET request")]
    NotGet,
    #[error("a WebSocket handshake is HTTP/1.1")]
    Version,
    #[error("the request must carry `Connection: upgrade` and `Upgrade: websocket`")]
    NotAnUpgrade,
    #[error("Sec-WebSocket-Version must be 13")]
    WebSocketVersion,
    #[error("Sec-WebSocket-Key is missing")]
    NoKey,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRefusal {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRefusal::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRefusal::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, Json(json!({ "error": "not_a_websocket_handshake", "reason": self.to_string() }))).into_response()
    }
}

/// The handshake's headers as §4.2.1 asks a server to check them.
fn check(method: &Method, version: Version, headers: &HeaderMap) -> Result<HeaderValue, UpgradeRefusal> {
    if method != Method::GET {
        return Err(UpgradeRefusal::NotGet);
    }
    if version != Version::HTTP_11 {
        return Err(UpgradeRefusal::Version);
    }
    let connection_upgrade = has_token(headers, header::CONNECTION, "upgrade");
    let upgrade_websocket = has_token(headers, header::UPGRADE, "websocket");
    if !connection_upgrade || !upgrade_websocket {
        return Err(UpgradeRefusal::NotAnUpgrade);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(UpgradeRefusal::WebSocketVersion);
    }
    headers.get(header::SEC_WEBSOCKET_KEY).cloned().ok_or(UpgradeRefusal::NoKey)
}

/// Whether a comma-separated header lists `token`, in any case (RFC 9110 §5.6.1).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRefusal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = check(&parts.method, parts.version, &parts.headers)?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(UpgradeRefusal::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// The `101 Switching Protocols` answer; once the client has it, `start` is given the
    /// socket. If the connection goes away first, `start` is dropped uncalled.
    pub(crate) fn on_upgrade<F>(self, limits: Limits, start: F) -> Response
    where
        F: FnOnce(WebSocket) + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        // A task of its own, as hyper hands the connection over only after the response is
        // written. It ends as the session starts (`start` spawns it), holding nothing after.
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => start(WebSocket::from_upgraded(upgraded, limits)),
                Err(e) => tracing::debug!(error = %e, "the upgrade failed before the session began"),
            }
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

impl WebSocket {
    fn from_upgraded(upgraded: Upgraded, limits: Limits) -> Self {
        match herald_shared::serve::into_tcp(upgraded) {
            Ok((tcp, read)) => WebSocket::new(Transport::Tcp(tcp), read.to_vec(), limits),
            Err(upgraded) => WebSocket::new(Transport::Upgraded(Box::new(TokioIo::new(upgraded))), Vec::new(), limits),
        }
    }
}

/// What a WebSocket reads and writes: the TCP socket, or hyper's upgraded connection when there
/// is more between (TLS); hyper then keeps what it read past the request itself. Boxed, that
/// one: every plain connection's future would be as large as it otherwise.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Upgraded(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Upgraded(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_flush(cx),
            Transport::Upgraded(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Upgraded(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        headers
    }

    #[test]
    fn a_handshake_is_checked_as_the_rfc_asks() {
        let key = check(&Method::GET, Version::HTTP_11, &handshake());
        assert_eq!(key, Ok(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==")));
        assert_eq!(check(&Method::POST, Version::HTTP_11, &handshake()), Err(UpgradeRefusal::NotGet));
        assert_eq!(check(&Method::GET, Version::HTTP_10, &handshake()), Err(UpgradeRefusal::Version));
        let without = |name: header::HeaderName| {
            let mut headers = handshake();
            headers.remove(name);
            check(&Method::GET, Version::HTTP_11, &headers)
        };
        assert_eq!(without(header::CONNECTION), Err(UpgradeRefusal::NotAnUpgrade));
        assert_eq!(without(header::UPGRADE), Err(UpgradeRefusal::NotAnUpgrade));
        assert_eq!(without(header::SEC_WEBSOCKET_VERSION), Err(UpgradeRefusal::WebSocketVersion));
        assert_eq!(without(header::SEC_WEBSOCKET_KEY), Err(UpgradeRefusal::NoKey));
        let mut old = handshake();
        old.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(check(&Method::GET, Version::HTTP_11, &old), Err(UpgradeRefusal::WebSocketVersion));
    }

    #[test]
    fn a_refusal_says_why_with_the_status_a_client_expects() {
        let status = |refusal: UpgradeRefusal| refusal.into_response().status();
        assert_eq!(status(UpgradeRefusal::NotGet), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(status(UpgradeRefusal::NotUpgradable), StatusCode::UPGRADE_REQUIRED);
        for refusal in [UpgradeRefusal::Version, UpgradeRefusal::NotAnUpgrade, UpgradeRefusal::NoKey] {
            assert_eq!(status(refusal), StatusCode::BAD_REQUEST);
        }
        let response = UpgradeRefusal::WebSocketVersion.into_response();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn the_accept_key_is_the_rfcs_example() {
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
