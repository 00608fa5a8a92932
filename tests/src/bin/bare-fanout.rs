//! The limit: a bare WebSocket server, the least work a push server can do here. No auth, no
//! routing, no persistence. Two ways in:
//!
//! - `POST /publish`: every connection gets the frame (the delivery stage's broadcast);
//! - `POST /send`: lines of `user<TAB>frame`, each frame to the connection that opened with
//!   `?user=<user>` (the cost scenario's unicast, with the client's ack read and counted as
//!   Herald's gateway reads it; `GET /stats` says how many client frames were read).
//!
//! Sends a Herald-style `hello` first so the load generator treats it like a gateway. Buffers are
//! set small (as Herald's are), and each connection writes everything queued before one flush.
//!
//! `BARE_FANOUT_LISTEN` (default 127.0.0.1:8099). Stops on SIGTERM or Ctrl-C.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Frames one connection may fall behind by before it is dropped (as a slow consumer).
const QUEUE: usize = 1024;
/// Frames written before a flush.
const WRITE_BATCH: usize = 64;
const HELLO: &str = r#"{"type":"hello","connection_id":"bare","gateway_id":"bare","heartbeat_interval_ms":15000,"max_frame_bytes":16384}"#;

struct Hub {
    frames: broadcast::Sender<Utf8Bytes>,
    /// The connections that named their user, for `POST /send`.
    users: Mutex<HashMap<String, mpsc::Sender<Utf8Bytes>>>,
    /// Frames read from clients (their acks), for `GET /stats`.
    frames_in: AtomicU64,
    /// Owns every connection task; they end on shutdown.
    sessions: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(serde::Deserialize)]
struct Connect {
    user: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    herald_shared::fdlimit::raise_to_hard();
    let listen: SocketAddr = std::env::var("BARE_FANOUT_LISTEN").unwrap_or_else(|_| "127.0.0.1:8099".into()).parse()?;
    let shutdown = CancellationToken::new();
    let (frames, _) = broadcast::channel(QUEUE);
    let hub = Arc::new(Hub {
        frames,
        users: Mutex::default(),
        frames_in: AtomicU64::new(0),
        sessions: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let app = Router::new()
        .route("/ws", get(connect))
        .route("/publish", post(publish))
        .route("/send", post(send))
        .route("/users", get(users))
        .route("/stats", get(stats))
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

/// Queues each line's frame for its user; answers how many were queued (a user not connected
/// here, or one whose queue is full, gets nothing).
async fn send(State(hub): State<Arc<Hub>>, body: String) -> String {
    let users = hub.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let queued = body
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(user, frame)| users.get(*user).is_some_and(|tx| tx.try_send(Utf8Bytes::from(*frame)).is_ok()))
        .count();
    queued.to_string()
}

async fn users(State(hub): State<Arc<Hub>>) -> String {
    let users = hub.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    users.keys().map(|u| format!("{u}\n")).collect()
}

async fn stats(State(hub): State<Arc<Hub>>) -> String {
    hub.frames_in.load(Ordering::Relaxed).to_string()
}

async fn connect(State(hub): State<Arc<Hub>>, Query(query): Query<Connect>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.read_buffer_size(4096).write_buffer_size(4096).max_message_size(64 * 1024).on_upgrade(move |socket| {
        let sessions = hub.sessions.clone();
        sessions.track_future(session(socket, hub, query.user))
    })
}

async fn session(socket: WebSocket, hub: Arc<Hub>, user: Option<String>) {
    let mut rx = hub.frames.subscribe();
    // A queue of its own only for a connection that named its user: the idle scenario's
    // connections (no user) cost what they did before `/send`.
    let (mine, mut own) = match &user {
        Some(user) => {
            let (tx, own) = mpsc::channel::<Utf8Bytes>(QUEUE);
            hub.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(user.clone(), tx.clone());
            (Some(tx), Some(own))
        }
        None => (None, None),
    };
    let (mut sink, mut stream) = socket.split();
    if sink.send(Message::Text(Utf8Bytes::from_static(HELLO))).await.is_ok() {
        loop {
            let alive = tokio::select! {
                _ = hub.shutdown.cancelled() => break,
                frame = rx.recv() => match frame {
                    Ok(first) => write_batch(&mut sink, first, || rx.try_recv().ok()).await,
                    // Fell behind by a whole queue: a slow consumer, dropped as Herald would.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(first) = recv(&mut own) => {
                    write_batch(&mut sink, first, || own.as_mut().and_then(|own| own.try_recv().ok())).await
                }
                message = stream.next() => match message {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(Message::Text(_))) => {
                        hub.frames_in.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Some(Ok(_)) => true,
                },
            };
            if !alive {
                break;
            }
        }
    }
    if let (Some(user), Some(mine)) = (user, mine) {
        let mut users = hub.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A reconnect of the same user may have taken the entry already.
        if users.get(&user).is_some_and(|current| current.same_channel(&mine)) {
            users.remove(&user);
        }
    }
}

/// The next frame sent to this connection's user; never, for a connection without one.
async fn recv(own: &mut Option<mpsc::Receiver<Utf8Bytes>>) -> Option<Utf8Bytes> {
    match own {
        Some(own) => own.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `first` and whatever `next` has queued, up to a batch, with one flush.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Utf8Bytes,
    mut next: impl FnMut() -> Option<Utf8Bytes>,
) -> bool {
    let mut frame = Some(first);
    let mut written = 0;
    while let Some(f) = frame.take() {
        if sink.feed(Message::Text(f)).await.is_err() {
            return false;
        }
        written += 1;
        if written < WRITE_BATCH {
            frame = next();
        }
    }
    sink.flush().await.is_ok()
}
