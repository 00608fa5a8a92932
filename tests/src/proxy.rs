//! A TCP proxy in front of one upstream address, to cut a dependency off and restore it while
//! the dependency itself keeps running (e.g. a MongoDB outage as Herald sees it).
//!
//! Owns the listening socket and every proxied connection; knows nothing of the protocol.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
        let accept = tokio::spawn(accept_loop(listener, upstream.into(), mode.subscribe(), live.clone()));
        Ok(Self { addr, mode, live, accept })
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

async fn accept_loop(listener: TcpListener, upstream: String, mode: watch::Receiver<Mode>, live: Arc<AtomicUsize>) {
    // Dropped with this task, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) if *mode.borrow() == Mode::Cut => drop(inbound),
                Ok((inbound, _)) => {
                    let guard = LiveGuard::new(&live);
                    connections.spawn(proxy_connection(inbound, upstream.clone(), mode.clone(), guard));
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

async fn proxy_connection(mut inbound: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>, _live: LiveGuard) {
    if *mode.borrow() == Mode::Forward {
        let mut outbound = match TcpStream::connect(&upstream).await {
            Ok(s) => s,
            // The upstream is down: the client sees its connection closed, as it would directly.
            Err(_) => return,
        };
        let changed = tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
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
