//! A WebSocket client speaking Herald's client protocol, for tests: connects with a token, keeps
//! the `hello`, hands over what the gateway sends, and sends acks, reads or anything hostile.
//!
//! Owns one connection and the task reading it. Deduplication, reconnection and ordering are
//! left to the tests, which check exactly those.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use herald_proto::client::{ClientFrame, Hello, Notification, ServerFrame};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// How long `connect` waits for the `hello` frame.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket receive buffer of a paused client: small, so the gateway's queue for it fills soon
/// instead of after megabytes of kernel buffering.
const PAUSED_RECV_BUFFER: u32 = 4 * 1024;

type Ws = WebSocketStream<TcpStream>;

/// Why a connection did not get as far as the `hello` frame.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The gateway answered the upgrade with an HTTP error (bad token, too many connections...).
    #[error("upgrade refused: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("no hello frame: {0}")]
    NoHello(String),
    #[error(transparent)]
    WebSocket(#[from] tungstenite::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ConnectError {
    /// The HTTP status of a refused upgrade.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One thing read from the connection (pings and pongs are answered, counted and not shown).
#[derive(Debug)]
pub enum Frame {
    /// A text frame that decodes as a server frame.
    Server(ServerFrame),
    /// A text frame that does not.
    Text(String),
    Binary(Vec<u8>),
    /// The gateway's close frame; 1005 when it carried no code.
    Close {
        code: u16,
        reason: String,
    },
    /// The connection failed (e.g. reset without a close frame).
    Error(String),
    /// Nothing more will come: the connection has ended (after any `Close` or `Error`).
    Closed,
    /// Nothing arrived in time.
    Timeout,
}

/// A connected client that has received its `hello`.
///
/// Its socket is read continuously by a background task (so pings are answered even while the
/// test is busy elsewhere), unless paused. Dropping it drops the connection without a close
/// frame, as a vanished client would; [`TestClient::close`] closes cleanly.
pub struct TestClient {
    hello: Hello,
    sink: SplitSink<Ws, Message>,
    /// Filled by `reader`; ends when the connection does.
    frames: mpsc::UnboundedReceiver<Frame>,
    paused: watch::Sender<bool>,
    pings: Arc<AtomicU64>,
    /// Owned by this client, aborted on drop.
    reader: JoinHandle<()>,
}

impl TestClient {
    /// Connects to `url` (`ws://host:port/path`) with `Authorization: Bearer <token>`.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ConnectError> {
        Self::connect_request(bearer_request(url, token)?, false).await
    }

    /// Connects with the token in the `token` query parameter, as a browser must.
    pub async fn connect_with_query_token(url: &str, token: &str) -> Result<Self, ConnectError> {
        let separator = if url.contains('?') { '&' } else { '?' };
        let request = format!("{url}{separator}token={token}").into_client_request()?;
        Self::connect_request(request, false).await
    }

    /// Connects like [`TestClient::connect`], but never reads past the `hello` until
    /// [`TestClient::resume_reading`]: a slow consumer, with a small receive buffer.
    pub async fn connect_paused(url: &str, token: &str) -> Result<Self, ConnectError> {
        Self::connect_request(bearer_request(url, token)?, true).await
    }

    /// Connects like [`TestClient::connect`] from the local address `source` (any of
    /// 127.0.0.0/8 on loopback), as a client on another host would.
    pub async fn connect_from(url: &str, token: &str, source: IpAddr) -> Result<Self, ConnectError> {
        let request = bearer_request(url, token)?;
        let stream = tcp_connect(&request, false, Some(source)).await?;
        Self::handshake(request, stream, false).await
    }

    /// Connects with any request: no token, odd headers, other paths.
    pub async fn connect_request(request: Request, paused: bool) -> Result<Self, ConnectError> {
        let stream = tcp_connect(&request, paused, None).await?;
        Self::handshake(request, stream, paused).await
    }

    async fn handshake(request: Request, stream: TcpStream, paused: bool) -> Result<Self, ConnectError> {
        let (mut ws, _response) = match tokio_tungstenite::client_async(request, stream).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                return Err(ConnectError::Refused { status, body });
            }
            Err(e) => return Err(e.into()),
        };
        let hello = read_hello(&mut ws).await?;
        let (sink, stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let (paused, paused_rx) = watch::channel(paused);
        let pings = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_frames(stream, tx, paused_rx, pings.clone()));
        Ok(Self { hello, sink, frames, paused, pings, reader })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Pings received from the gateway (each answered with a pong while reading).
    pub fn pings_received(&self) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }

    /// Stops reading the socket: the gateway's writes back up, and pings go unanswered.
    pub fn pause_reading(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume_reading(&self) {
        self.paused.send_replace(false);
    }

    /// The next frame, whatever it is.
    pub async fn next_frame(&mut self, timeout: Duration) -> Frame {
        match tokio::time::timeout(timeout, self.frames.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => Frame::Closed,
            Err(_) => Frame::Timeout,
        }
    }

    /// The next notification, or `None` if none arrives within `timeout`.
    ///
    /// Panics on any other frame (an error, a close...): a test expecting notifications has
    /// failed then, and the panic says what came instead.
    pub async fn next_notification(&mut self, timeout: Duration) -> Option<Notification> {
        match self.next_frame(timeout).await {
            Frame::Server(ServerFrame::Notification(n)) => Some(n),
            Frame::Timeout => None,
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    /// Notifications until `count` have arrived or `timeout` has passed: fewer than `count`
    /// means the deadline passed. Panics on any other frame, like `next_notification`.
    pub async fn notifications_until(&mut self, count: usize, timeout: Duration) -> Vec<Notification> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            match self.next_notification(deadline.saturating_duration_since(Instant::now())).await {
                Some(n) => received.push(n),
                None => break,
            }
        }
        received
    }

    /// Acknowledges delivery of these messages.
    /// Any string goes, so that a test can send ids a real client never would.
    pub async fn ack<I: AsRef<str>>(&mut self, ids: impl IntoIterator<Item = I>) -> Result<(), tungstenite::Error> {
        self.send_ids("ack", ids).await
    }

    /// Marks these messages read.
    pub async fn read<I: AsRef<str>>(&mut self, ids: impl IntoIterator<Item = I>) -> Result<(), tungstenite::Error> {
        self.send_ids("read", ids).await
    }

    async fn send_ids<I: AsRef<str>>(
        &mut self,
        kind: &str,
        ids: impl IntoIterator<Item = I>,
    ) -> Result<(), tungstenite::Error> {
        let ids: Vec<String> = ids.into_iter().map(|i| i.as_ref().to_owned()).collect();
        self.send_text(serde_json::json!({ "type": kind, "ids": ids }).to_string()).await
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), tungstenite::Error> {
        let text = serde_json::to_string(frame).expect("client frames serialize");
        self.send_text(text).await
    }

    /// Sends any text, valid or not.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), tungstenite::Error> {
        self.sink.send(Message::text(text.into())).await
    }

    pub async fn send_binary(&mut self, data: impl Into<Vec<u8>>) -> Result<(), tungstenite::Error> {
        self.sink.send(Message::binary(data.into())).await
    }

    /// Closes cleanly (code 1000) and waits up to 5 s for the gateway to close its side.
    pub async fn close(mut self) -> Result<(), tungstenite::Error> {
        self.resume_reading();
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        self.sink.send(Message::Close(Some(frame))).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.next_frame(deadline.saturating_duration_since(Instant::now())).await {
                Frame::Closed | Frame::Timeout => return Ok(()),
                _ => {}
            }
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn bearer_request(url: &str, token: &str) -> Result<Request, ConnectError> {
    let mut request = url.into_client_request()?;
    let value = format!("Bearer {token}").parse().map_err(|e| tungstenite::Error::HttpFormat(Into::into(e)))?;
    request.headers_mut().insert(AUTHORIZATION, value);
    Ok(request)
}

/// A plain TCP connection to the request's host (tests never use TLS); for a paused client, with
/// a small receive buffer, which must be set before connecting to take effect.
async fn tcp_connect(request: &Request, small_buffer: bool, source: Option<IpAddr>) -> Result<TcpStream, ConnectError> {
    let uri = request.uri();
    let host = uri.host().unwrap_or("127.0.0.1").trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    if !small_buffer && source.is_none() {
        return Ok(TcpStream::connect((host, port)).await?);
    }
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address")))?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if small_buffer {
        socket.set_recv_buffer_size(PAUSED_RECV_BUFFER)?;
    }
    if let Some(source) = source {
        socket.bind(std::net::SocketAddr::new(source, 0))?;
    }
    Ok(socket.connect(addr).await?)
}

async fn read_hello(ws: &mut Ws) -> Result<Hello, ConnectError> {
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(ConnectError::NoHello(format!("nothing within {HELLO_TIMEOUT:?}"))),
            Ok(None) => return Err(ConnectError::NoHello("connection ended".to_owned())),
            Ok(Some(message)) => message?,
        };
        match message {
            Message::Text(text) => {
                return match ServerFrame::decode(&text) {
                    Ok(ServerFrame::Hello(hello)) => Ok(hello),
                    _ => Err(ConnectError::NoHello(format!("first frame was {text}"))),
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => return Err(ConnectError::NoHello(format!("first frame was {other:?}"))),
        }
    }
}

/// Forwards what the connection carries to `tx` until it ends; holds off while `paused`.
async fn read_frames(
    mut stream: SplitStream<Ws>,
    tx: mpsc::UnboundedSender<Frame>,
    mut paused: watch::Receiver<bool>,
    pings: Arc<AtomicU64>,
) {
    // After a close or an error the connection only winds down: nothing more is forwarded.
    let mut ended = false;
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let next = tokio::select! {
            next = stream.next() => next,
            // `next` is cancel-safe: a message half-read stays buffered in the stream.
            _ = paused.wait_for(|p| *p) => continue,
        };
        let frame = match next {
            None => return,
            Some(Ok(Message::Text(text))) => match ServerFrame::decode(&text) {
                Ok(frame) => Frame::Server(frame),
                Err(_) => Frame::Text(text.to_string()),
            },
            Some(Ok(Message::Binary(data))) => Frame::Binary(data.to_vec()),
            Some(Ok(Message::Ping(_))) => {
                pings.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close.map_or((1005, String::new()), |c| (u16::from(c.code), c.reason.to_string()));
                Frame::Close { code, reason }
            }
            Some(Err(e)) => Frame::Error(e.to_string()),
        };
        let failed = matches!(frame, Frame::Error(_));
        if !ended {
            ended = failed || matches!(frame, Frame::Close { .. });
            // The client may be gone already; then nobody is listening.
            let _ = tx.send(frame);
        }
        // After an error the stream yields nothing more; after a close, reading on lets
        // tungstenite complete the closing handshake.
        if failed {
            return;
        }
    }
}
