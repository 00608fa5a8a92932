//! A TCP proxy in front of one upstream address, to cut a dependency off and restore it while
//! the dependency itself keeps running (e.g. a MongoDB outage as Herald sees it).
//!
//! Owns the listening socket and every proxied connection. It knows one thing of MongoDB's wire
//! protocol, for one fault: [`TcpProxy::refuse_inserts_containing`] makes the store refuse a
//! marked document every time (as a schema validator would), which nx-27017 cannot do itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Live connections are closed; new ones are accepted and closed at once (like a refusal).
    Cut,
    /// Live connections stay open but carry nothing; new ones are accepted and then ignored
    /// (like a partition: the client only learns of it from its own timeouts).
    Blackhole,
}

/// A proxy listening on a free port of 127.0.0.1, forwarding to `upstream`.
pub struct TcpProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections currently held (forwarding or blackholed).
    live: Arc<AtomicUsize>,
    /// Bytes that make an insert's document refused (see `refuse_inserts_containing`).
    refuse: Refusal,
    /// Milliseconds each reply from upstream is held back (see `delay_replies`).
    delay_ms: Arc<AtomicU64>,
    /// The accept loop, which owns the connection tasks: aborting it (on drop) ends them all.
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// `upstream` is `host:port`, resolved at each new connection.
    pub async fn start(upstream: impl Into<String>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Forward);
        let live = Arc::new(AtomicUsize::new(0));
        let refuse = Refusal::default();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream.into(),
            mode.subscribe(),
            live.clone(),
            refuse.clone(),
            delay_ms.clone(),
        ));
        Ok(Self { addr, mode, live, refuse, delay_ms, accept })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every live connection and every new one until [`TcpProxy::restore`]. Returns once
    /// the live connections are closed.
    pub async fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
        while self.live_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops carrying bytes, without closing anything, until [`TcpProxy::restore`].
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards again. Connections held by a blackhole are closed (what they carried is lost).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    /// From now on, a MongoDB `insert` whose document contains `marker` gets that document
    /// refused with write error 121 (document failed validation), every time, while the rest of
    /// the insert goes through. The request itself still reaches the server (the reply is what
    /// changes), so the refused document may exist there; what the client sees is a store that
    /// will never accept it. Applies to connections opened after the call.
    pub fn refuse_inserts_containing(&self, marker: &str) {
        *self.refuse.marker.lock().unwrap() = Some((marker.as_bytes().to_vec(), Refuse::Document));
    }

    /// From now on, a MongoDB `insert` any of whose documents contains `marker` is refused as a
    /// whole (`ok: 0`, code 2, as a server answers a command it cannot run), every time, and
    /// never reaches the server: none of its documents is written. An insert without the marker
    /// goes through. Applies to connections opened after the call.
    pub fn refuse_commands_containing(&self, marker: &str) {
        *self.refuse.marker.lock().unwrap() = Some((marker.as_bytes().to_vec(), Refuse::Command));
    }

    /// Holds back every chunk the upstream sends by `delay` (zero: none), on live connections
    /// too: a store that answers, slowly.
    pub fn delay_replies(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Connections currently held by the proxy.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    mode: watch::Receiver<Mode>,
    live: Arc<AtomicUsize>,
    refuse: Refusal,
    delay_ms: Arc<AtomicU64>,
) {
    // Dropped with this task, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) if *mode.borrow() == Mode::Cut => drop(inbound),
                Ok((inbound, _)) => {
                    let guard = LiveGuard::new(&live);
                    let refuse = refuse.marker.lock().unwrap().clone();
                    connections.spawn(proxy_connection(inbound, upstream.clone(), mode.clone(), guard, refuse, delay_ms.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn proxy_connection(
    mut inbound: TcpStream,
    upstream: String,
    mut mode: watch::Receiver<Mode>,
    _live: LiveGuard,
    refuse: Option<Marker>,
    delay_ms: Arc<AtomicU64>,
) {
    if *mode.borrow() == Mode::Forward {
        let mut outbound = match TcpStream::connect(&upstream).await {
            Ok(s) => s,
            // The upstream is down: the client sees its connection closed, as it would directly.
            Err(_) => return,
        };
        let carry = async {
            match &refuse {
                None => {
                    let (mut client_read, mut client_write) = inbound.split();
                    let (mut server_read, server_write) = outbound.split();
                    let mut server_write = server_write;
                    tokio::select! {
                        _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
                        _ = delayed_copy(&mut server_read, &mut client_write, &delay_ms) => {}
                    }
                }
                Some((marker, how)) => {
                    let (client_read, client_write) = inbound.split();
                    let (server_read, server_write) = outbound.split();
                    let refused = Mutex::new(HashMap::new());
                    tokio::select! {
                        _ = requests(client_read, server_write, marker, *how, &refused) => {}
                        _ = replies(server_read, client_write, &refused) => {}
                    }
                }
            }
        };
        let changed = tokio::select! {
            _ = carry => return,
            changed = mode.wait_for(|m| *m != Mode::Forward) => changed.map(|m| *m),
        };
        // Both sockets stay open through a blackhole (held by this frame), closed on return.
        if matches!(changed, Ok(Mode::Blackhole)) {
            let _ = mode.wait_for(|m| *m != Mode::Blackhole).await;
        }
        drop(outbound);
    } else {
        let _ = mode.wait_for(|m| *m != Mode::Blackhole).await;
    }
}

/// Copies `from` to `to`, holding each chunk back by the current delay.
async fn delayed_copy(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    delay_ms: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Counts a connection as live for as long as it is held.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The marker that makes inserted documents refused, and how, shared with the accept loop.
#[derive(Clone, Default)]
struct Refusal {
    marker: Arc<Mutex<Option<Marker>>>,
}

/// The bytes that mark an insert, and what it then gets.
type Marker = (Vec<u8>, Refuse);

/// What a marked insert gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuse {
    /// A write error for the marked document; the rest of the insert is the server's.
    Document,
    /// The whole command refused (`ok: 0`), and the server never sees it.
    Command,
}

/// What the reply to a marked insert becomes.
#[derive(Debug, Clone, Copy)]
enum Refused {
    Document(usize),
    Command,
}

/// MongoDB `OP_MSG`, the only opcode a current driver sends.
const OP_MSG: i32 = 2013;

/// Reads one wire-protocol message (length-prefixed).
async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let total = usize::try_from(i32::from_le_bytes(len)).unwrap_or(0).max(4);
    let mut message = vec![0u8; total];
    message[..4].copy_from_slice(&len);
    stream.read_exact(&mut message[4..]).await?;
    Ok(message)
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Client → server: forwards every message; notes the inserts that carry the marker, by
/// request id, with the index of the marked document. An insert refused as a whole goes to the
/// server as a `ping` of the same id, whose reply then stands for the refusal.
async fn requests(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    marker: &[u8],
    how: Refuse,
    refused: &Mutex<HashMap<i32, Refused>>,
) {
    while let Ok(mut message) = read_message(&mut from).await {
        if let Some(marked) = marked_insert(&message, marker) {
            let refusal = match how {
                Refuse::Document => Refused::Document(marked.index),
                Refuse::Command => {
                    let ping = mongodb::bson::doc! { "ping": 1, "$db": marked.db };
                    message = op_msg(marked.request_id, 0, &ping);
                    Refused::Command
                }
            };
            refused.lock().unwrap().insert(marked.request_id, refusal);
        }
        if to.write_all(&message).await.is_err() {
            return;
        }
    }
}

/// Server → client: forwards every reply, replacing the reply to a marked insert with one that
/// refuses the marked document.
async fn replies(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    refused: &Mutex<HashMap<i32, Refused>>,
) {
    while let Ok(message) = read_message(&mut from).await {
        let response_to = i32_at(&message, 8).unwrap_or(0);
        let refusal = refused.lock().unwrap().remove(&response_to);
        let message = match refusal {
            Some(refusal) => refusal_reply(response_to, refusal),
            None => message,
        };
        if to.write_all(&message).await.is_err() {
            return;
        }
    }
}

/// An insert that carries the marker.
struct Marked {
    request_id: i32,
    /// Of the marked document among the insert's.
    index: usize,
    /// The command's `$db`.
    db: String,
}

/// The insert `message` is, if it carries `marker`.
fn marked_insert(message: &[u8], marker: &[u8]) -> Option<Marked> {
    if i32_at(message, 12)? != OP_MSG {
        return None;
    }
    let request_id = i32_at(message, 4)?;
    let mut at = 20; // header (16) + flag bits (4)
    let mut is_insert = false;
    let mut db = String::new();
    let mut documents: Vec<&[u8]> = Vec::new();
    while at < message.len() {
        let kind = *message.get(at)?;
        at += 1;
        let size = usize::try_from(i32_at(message, at)?).ok()?;
        let section = message.get(at..at + size)?;
        match kind {
            0 => {
                let command = mongodb::bson::Document::from_reader(section).ok()?;
                is_insert = command.keys().next().is_some_and(|k| k == "insert");
                db = command.get_str("$db").unwrap_or_default().to_owned();
                if let Ok(array) = command.get_array("documents") {
                    // Documents inline in the command: find the marked one by re-encoding.
                    for (index, doc) in array.iter().enumerate() {
                        if let Some(doc) = doc.as_document() {
                            let mut bytes = Vec::new();
                            if doc.to_writer(&mut bytes).is_ok() && contains(&bytes, marker) {
                                return is_insert.then_some(Marked { request_id, index, db });
                            }
                        }
                    }
                }
            }
            1 => {
                // A document sequence: size, identifier (C string), then documents.
                let name_end = section[4..].iter().position(|b| *b == 0)? + 5;
                let mut doc_at = name_end;
                while doc_at < section.len() {
                    let doc_size = usize::try_from(i32_at(section, doc_at)?).ok()?;
                    documents.push(section.get(doc_at..doc_at + doc_size)?);
                    doc_at += doc_size;
                }
            }
            _ => return None,
        }
        at += size;
    }
    let index = documents.iter().position(|doc| contains(doc, marker))?;
    is_insert.then_some(Marked { request_id, index, db })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The `OP_MSG` reply to the insert `response_to` that refuses it: the marked document, as a
/// MongoDB whose schema validator rejects it would answer, or the whole command.
fn refusal_reply(response_to: i32, refused: Refused) -> Vec<u8> {
    let body = match refused {
        Refused::Document(index) => mongodb::bson::doc! {
            "n": 0,
            "writeErrors": [{
                "index": index as i32,
                "code": 121,
                "errmsg": "Document failed validation (refused by the test proxy)",
            }],
            "ok": 1.0,
        },
        Refused::Command => mongodb::bson::doc! {
            "ok": 0.0,
            "code": 2,
            "codeName": "BadValue",
            "errmsg": "insert refused (by the test proxy)",
        },
    };
    op_msg(0, response_to, &body)
}

/// An `OP_MSG` whose one section is `body`.
fn op_msg(request_id: i32, response_to: i32, body: &mongodb::bson::Document) -> Vec<u8> {
    let mut doc = Vec::new();
    let _ = body.to_writer(&mut doc);
    let total = 16 + 4 + 1 + doc.len();
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(&(total as i32).to_le_bytes());
    message.extend_from_slice(&request_id.to_le_bytes());
    message.extend_from_slice(&response_to.to_le_bytes());
    message.extend_from_slice(&OP_MSG.to_le_bytes());
    message.extend_from_slice(&0u32.to_le_bytes()); // flag bits
    message.push(0); // section kind 0: the body
    message.extend_from_slice(&doc);
    message
}
