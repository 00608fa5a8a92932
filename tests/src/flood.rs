//! Unauthenticated abuse of an HTTP port, measured: a flood of idle TCP connections, request
//! heads drip-fed a byte at a time, and plain HTTP probes on fresh connections from a chosen
//! source address. For the hostile-input tests; nothing here knows Herald's protocol.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a flood saw.
#[derive(Debug, Default, Clone)]
pub struct FloodStats {
    /// Connections the server accepted (or at least completed the handshake of).
    pub opened: usize,
    /// Connects that failed or did not complete within 2 s.
    pub failed_connects: usize,
    /// How long each connection lasted until the server closed it.
    pub lifetimes: Vec<Duration>,
    /// Connections the server still held open after the flood's limit.
    pub held_past_limit: usize,
}

impl FloodStats {
    /// The `q` quantile (0 to 1) of the lifetimes.
    pub fn lifetime(&self, q: f64) -> Duration {
        let mut sorted = self.lifetimes.clone();
        sorted.sort();
        sorted.get(((sorted.len().saturating_sub(1)) as f64 * q) as usize).copied().unwrap_or_default()
    }
}

/// Idle connections opened at a steady rate, each held without sending a byte until the server
/// closes it. Owns its tasks; [`Flood::stop`] ends them.
pub struct Flood {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    stats: Arc<Mutex<FloodStats>>,
}

impl Flood {
    /// Opens `per_sec` connections a second to `addr`, at most `max_open` of them open at once.
    /// One still open `limit` after it connected counts in `held_past_limit` and is let go.
    pub fn idle(addr: SocketAddr, per_sec: u32, max_open: usize, limit: Duration) -> Self {
        let stop = CancellationToken::new();
        let stats = Arc::new(Mutex::new(FloodStats::default()));
        let mut tasks = JoinSet::new();
        let (stop_opening, shared) = (stop.clone(), Arc::clone(&stats));
        tasks.spawn(async move {
            let open = Arc::new(AtomicUsize::new(0));
            let mut sockets = JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    () = stop_opening.cancelled() => break,
                    _ = tick.tick() => {}
                    Some(_) = sockets.join_next(), if !sockets.is_empty() => continue,
                }
                if open.load(Ordering::SeqCst) >= max_open {
                    continue;
                }
                open.fetch_add(1, Ordering::SeqCst);
                let (open, stats, stop) = (Arc::clone(&open), Arc::clone(&shared), stop_opening.clone());
                sockets.spawn(async move {
                    hold_idle(addr, limit, &stats, &stop).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            sockets.shutdown().await;
        });
        Self { stop, tasks, stats }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> usize {
        self.stats.lock().map(|s| s.opened).unwrap_or_default()
    }

    /// Stops opening, lets every connection go, and returns what the flood saw.
    pub async fn stop(mut self) -> FloodStats {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn hold_idle(addr: SocketAddr, limit: Duration, stats: &Mutex<FloodStats>, stop: &CancellationToken) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
        stats.lock().unwrap().failed_connects += 1;
        return;
    };
    let connected = Instant::now();
    stats.lock().unwrap().opened += 1;
    let mut buf = [0u8; 256];
    // Whatever the server sends (it should send nothing), only its close counts.
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        // Let go when the flood stops; a connection the server still holds then is counted at
        // its limit like any other.
        () = stop.cancelled() => {
            if connected.elapsed() >= limit {
                stats.lock().unwrap().held_past_limit += 1;
            }
        }
        outcome = tokio::time::timeout(limit, closed) => match outcome {
            Ok(()) => stats.lock().unwrap().lifetimes.push(connected.elapsed()),
            Err(_) => stats.lock().unwrap().held_past_limit += 1,
        },
    }
}

/// One connection to `addr` that sends nothing. Returns how long the server took to close it;
/// fails if it held on past `limit`.
pub async fn idle_once(addr: SocketAddr, limit: Duration) -> anyhow::Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(limit, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Ok(started.elapsed()),
        Ok(Ok(n)) => anyhow::bail!("sent {:?} to a client that asked nothing", String::from_utf8_lossy(&buf[..n])),
        Err(_) => anyhow::bail!("an idle connection still open after {limit:?}"),
    }
}

/// Sends a request head to `addr` one byte every `every`, never finishing it. Returns how long
/// the server took to close the connection; fails if it answered, or held on past `limit`.
pub async fn drip_feed(addr: SocketAddr, every: Duration, limit: Duration) -> anyhow::Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    let started = Instant::now();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: herald\r\nx-drip: ").await?;
    let mut tick = tokio::time::interval(every);
    let mut buf = [0u8; 256];
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => return match read {
                Ok(0) | Err(_) => Ok(started.elapsed()),
                Ok(n) => anyhow::bail!("answered a head it never got whole: {:?}", String::from_utf8_lossy(&buf[..n])),
            },
            _ = tick.tick() => {
                if stream.write_all(b"a").await.is_err() {
                    return Ok(started.elapsed());
                }
            }
            () = &mut deadline => anyhow::bail!("still open after {limit:?} of drip-feeding"),
        }
    }
}

/// `GET path` on a fresh connection from `source` (any local address when `None`), with a bearer
/// `token` if given. Returns the status and how long the whole exchange took; fails when the
/// connection is closed without a response, or nothing comes within `timeout`.
pub async fn probe(
    addr: SocketAddr,
    path: &str,
    source: Option<IpAddr>,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, Duration)> {
    let started = Instant::now();
    let exchange = async {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        let mut stream = socket.connect(addr).await?;
        let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!("GET {path} HTTP/1.1\r\nhost: herald\r\n{auth}connection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut response = Vec::new();
        // A connection closed before any HTTP ends with a reset or an empty read.
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        status.ok_or_else(|| anyhow::anyhow!("closed without a response ({} bytes)", response.len()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(status)) => Ok((status, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!("no response within {timeout:?}"),
    }
}

/// Latency figures of probes: (median, max).
pub fn median_and_max(latencies: &[Duration]) -> (Duration, Duration) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    (sorted.get(sorted.len() / 2).copied().unwrap_or_default(), sorted.last().copied().unwrap_or_default())
}
