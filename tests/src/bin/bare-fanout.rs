//! The limit: a bare WebSocket fan-out server, the least work a push server can do here. No auth,
//! no routing, no persistence: every connection gets every frame posted to `POST /publish`.
//! Sends a Herald-style `hello` first so the load generator treats it like a gateway. Buffers are
//! set small (as Herald's are), and each connection writes everything queued before one flush.
//!
//! `BARE_FANOUT_LISTEN` (default 127.0.0.1:8099). Stops on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Frames one connection may fall behind by before it is dropped (as a slow consumer).
const QUEUE: usize = 1024;
/// Frames written before a flush.
const WRITE_BATCH: usize = 64;
const HELLO: &str = r#"{"type":"hello","connection_id":"bare","gateway_id":"bare","heartbeat_interval_ms":15000,"max_frame_bytes":16384}"#;

struct Hub {
    frames: broadcast::Sender<Utf8Bytes>,
    /// Owns every connection task; they end on shutdown.
    sessions: TaskTracker,
    shutdown: CancellationToken,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::var("BARE_FANOUT_LISTEN").unwrap_or_else(|_| "127.0.0.1:8099".into()).parse()?;
    let shutdown = CancellationToken::new();
    let (frames, _) = broadcast::channel(QUEUE);
    let hub = Arc::new(Hub { frames, sessions: TaskTracker::new(), shutdown: shutdown.clone() });
    let app = Router::new()
        .route("/ws", get(connect))
        .route("/publish", post(publish))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::clone(&hub));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let term = shutdown.clone();
    if let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::spawn(async move {
            sigterm.recv().await;
            term.cancel();
        });
    }
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    hub.sessions.close();
    hub.sessions.wait().await;
    Ok(())
}

async fn publish(State(hub): State<Arc<Hub>>, body: String) -> &'static str {
    // No receivers is not an error: nothing is connected yet.
    let _ = hub.frames.send(Utf8Bytes::from(body));
    "ok"
}

async fn connect(State(hub): State<Arc<Hub>>, upgrade: WebSocketUpgrade) -> Response {
    let rx = hub.frames.subscribe();
    let shutdown = hub.shutdown.clone();
    let sessions = hub.sessions.clone();
    upgrade
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| sessions.track_future(session(socket, rx, shutdown)))
}

async fn session(socket: WebSocket, mut rx: broadcast::Receiver<Utf8Bytes>, shutdown: CancellationToken) {
    let (mut sink, mut stream) = socket.split();
    if sink.send(Message::Text(Utf8Bytes::from_static(HELLO))).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            frame = rx.recv() => {
                let first = match frame {
                    Ok(frame) => frame,
                    // Fell behind by a whole queue: a slow consumer, dropped as Herald would.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => break,
                };
                let mut batch = vec![first];
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(frame) => batch.push(frame),
                        Err(_) => break,
                    }
                }
                let mut failed = false;
                for frame in batch {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || sink.flush().await.is_err() {
                    break;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
}
