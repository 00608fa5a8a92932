//! The HTTP listener both services serve their axum router on: the accept loop and HTTP/1.1
//! connections (hyper), with the limits that keep clients who have shown no credentials from
//! exhausting the process. It owns each connection from accept until the connection closes or is
//! upgraded to a WebSocket (from then on the gateway's session owns the socket); what a request
//! means is the router's business.
//!
//! At accept, before a byte is parsed, a connection is closed at once when its source connects
//! faster than `connects_per_sec_per_ip` ([`rate`]), or when every place in the budget of
//! `max_connections` is held by a connection that may not give way ([`pending`]). A connection
//! then has `header_timeout` to send each request head, counted from its connect or from its
//! previous response, and is closed after `idle_timeout` without moving a byte. Accept errors
//! (out of file descriptors, mostly) back off from 10 ms to 1 s instead of spinning. HTTP/1.1
//! only: nothing Herald serves needs HTTP/2, which brings its own ways of holding a server.
//!
//! With TLS ([`serve_tls`], the gateway's `wss://`), the handshake comes first, within
//! `header_timeout` of the connect and holding its place in the budget like a request head: a
//! client that opens a socket and sends no ClientHello (or drips one) is closed at the timeout,
//! or sooner when it must give way. The certificates themselves are [`certs`]'.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::Router;
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::backoff::Backoff;
use crate::config::HttpConfig;
use crate::metrics::MetricsError;

pub mod certs;
mod pending;
mod rate;

use pending::{Activity, Admission, PendingSet, Place};

/// Connections told to give way that may still be closing, on top of `max_connections`: each
/// holds its descriptor until its task has run.
pub const EVICTION_SLACK: usize = 64;
/// After the listener is told to stop, how long its connections have to finish what they are
/// doing (told to close after their current request) before they are closed anyway.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Largest request head (request line and headers); a larger one is answered 431. A token in a
/// header or the query string is well under 4 KiB; the rest is room for a browser's cookies.
const MAX_HEAD_BYTES: usize = 32 * 1024;
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why the listener closed a connection itself (the `reason` label of
/// `herald_http_connections_shed_total`).
mod shed {
    pub(super) const RATE_LIMITED: &str = "rate_limited";
    pub(super) const FULL: &str = "full";
    pub(super) const EVICTED: &str = "evicted";
    pub(super) const HEADER_TIMEOUT: &str = "header_timeout";
    pub(super) const IDLE_TIMEOUT: &str = "idle_timeout";
    pub(super) const TLS_HANDSHAKE_TIMEOUT: &str = "tls_handshake_timeout";
    pub(super) const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";
}

/// Most connections at once on the internal listener: probes, scrapes and an operator's
/// commands, from inside the cluster. A small fixed budget, so it cannot eat the public one's.
pub const INTERNAL_MAX_CONNECTIONS: usize = 32;

/// The descriptors both listeners may hold for connections: their budgets, and those still
/// closing after giving way. A service adds them up with its own needs against the open-file limit.
pub fn open_files(config: &HttpConfig) -> usize {
    config.max_connections + EVICTION_SLACK + INTERNAL_MAX_CONNECTIONS + EVICTION_SLACK
}

/// The limits of the internal listener: the public one's timeouts, its own small budget, and no
/// per-address connect rate (the kubelet and Prometheus connect from a few addresses, often).
pub fn internal_config(public: &HttpConfig) -> HttpConfig {
    HttpConfig { max_connections: INTERNAL_MAX_CONNECTIONS, connects_per_sec_per_ip: 0, ..public.clone() }
}

/// A service's two listeners: the public one (clients' WebSockets, the publish and query API),
/// which the ingress reaches, and the internal one (probes, metrics, the operator's API), which
/// only the cluster reaches. Always both: the public port never serves metrics or admin.
#[derive(Debug)]
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: io::Error,
}

impl Listeners {
    /// Both listeners, each with a queue of `backlog` connections the kernel completes before
    /// they are accepted (`HERALD_LISTEN_BACKLOG`; tokio's own bind asks for 1024).
    pub fn bind(public: SocketAddr, internal: SocketAddr, backlog: u32) -> Result<Self, BindError> {
        Ok(Self { public: listen(public, backlog)?, internal: listen(internal, backlog)? })
    }
}

/// A listener on `addr` with an accept queue of `backlog`, as `TcpListener::bind` sets it up
/// otherwise (`SO_REUSEADDR`, so a restarted process can bind while old connections linger).
pub fn listen(addr: SocketAddr, backlog: u32) -> Result<TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

/// The listener's metrics, registered in the service's registry.
#[derive(Clone)]
pub struct ServeMetrics {
    open: IntGauge,
    shed: IntCounterVec,
    accept_errors: IntCounter,
}

impl ServeMetrics {
    /// One listener's metrics, told apart by the label `listener` (`public`, `internal`).
    pub fn new(registry: &Registry, listener: &str) -> Result<Self, MetricsError> {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("listener", listener);
        let open = IntGauge::with_opts(opts(
            "herald_http_connections_open",
            "HTTP connections open and not upgraded to a WebSocket",
        ))?;
        let shed = IntCounterVec::new(
            opts("herald_http_connections_shed_total", "HTTP connections the listener closed itself, by reason"),
            &["reason"],
        )?;
        let accept_errors = IntCounter::with_opts(opts(
            "herald_http_accept_errors_total",
            "Failed accepts (e.g. out of file descriptors), each followed by a backoff",
        ))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        Ok(Self { open, shed, accept_errors })
    }

    fn shed(&self, reason: &str) {
        self.shed.with_label_values(&[reason]).inc();
    }
}

/// What every connection task needs.
struct Shared {
    http: http1::Builder,
    router: Router,
    /// Set: every connection starts with a TLS handshake, bounded by `header_timeout`.
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    idle_timeout: Duration,
    metrics: ServeMetrics,
    /// The caller's: connections finish their current request and close when it fires.
    stop: CancellationToken,
    /// Ours, cancelled `STOP_GRACE` after `stop`: the connections still open close at once.
    force: CancellationToken,
}

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting, lets each open
/// connection finish its current request for up to [`STOP_GRACE`], and returns once all are
/// closed. Upgraded connections are no longer the listener's and are not waited for.
///
/// It never fails: a failed accept is retried after a backoff, however often it fails.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    metrics: ServeMetrics,
    stop: CancellationToken,
) {
    serve_tls(listener, router, config, metrics, stop, None).await;
}

/// [`serve`], with each connection a TLS one when `tls` is set.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    metrics: ServeMetrics,
    stop: CancellationToken,
    tls: Option<TlsAcceptor>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.header_timeout).max_buf_size(MAX_HEAD_BYTES);
    let shared = Arc::new(Shared {
        http,
        router,
        tls,
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        metrics,
        stop: stop.clone(),
        force: CancellationToken::new(),
    });
    let pending = PendingSet::new(config.max_connections, EVICTION_SLACK);
    let mut rate = rate::ConnectRate::new(config.connects_per_sec_per_ip, Instant::now());
    // Owns every connection task; waited for below.
    let connections = TaskTracker::new();
    let admit = |stream: TcpStream, peer: SocketAddr| {
        // Refused connections are dropped here: closed before a byte of theirs is read.
        let now = Instant::now();
        if rate.as_mut().is_some_and(|rate| !rate.allow(peer.ip(), now)) {
            shared.metrics.shed(shed::RATE_LIMITED);
            return;
        }
        let place = match pending.admit(now) {
            Admission::Placed(place) => place,
            Admission::Displaced(place) => {
                shared.metrics.shed(shed::EVICTED);
                place
            }
            Admission::Full => {
                shared.metrics.shed(shed::FULL);
                return;
            }
        };
        connections.spawn(connection(stream, place, Arc::clone(&shared)));
    };
    accept_loop(|| listener.accept(), &stop, &shared.metrics, admit).await;
    drop(listener); // from here the kernel refuses new connections
    connections.close();
    if tokio::time::timeout(STOP_GRACE, connections.wait()).await.is_err() {
        tracing::debug!(open = connections.len(), "closing HTTP connections still open after the stop grace");
        shared.force.cancel();
        connections.wait().await;
    }
}

/// Accepts until `stop`, handing each connection to `admit`. A failed accept that is about the
/// resources of this process (EMFILE, ENFILE, ENOBUFS...) is retried after a doubling backoff:
/// retrying at once would spin on the same error while the backlog fills.
async fn accept_loop<A>(
    mut accept: impl FnMut() -> A,
    stop: &CancellationToken,
    metrics: &ServeMetrics,
    mut admit: impl FnMut(TcpStream, SocketAddr),
) where
    A: Future<Output = io::Result<(TcpStream, SocketAddr)>>,
{
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_START, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                admit(stream, peer);
                // Let the connection just spawned run before the next accept: its first read
                // decides whether it may give way to a newcomer, and a flood of accepts must not
                // starve the connections already being served.
                tokio::task::yield_now().await;
            }
            // That one client gave up between its handshake and our accept: nothing to wait for.
            Err(e) if is_about_one_connection(&e) => {}
            Err(e) => {
                metrics.accept_errors.inc();
                let delay = backoff.failed();
                tracing::warn!(error = %e, ?delay, failures = backoff.failures(), "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn is_about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Serves one connection until it closes, upgrades, times out, gives way or is stopped.
async fn connection(stream: TcpStream, place: Place, shared: Arc<Shared>) {
    let _open = Open::count(&shared.metrics.open);
    let activity = Arc::clone(place.activity());
    let watched = Watched { stream, activity: Some(Arc::clone(&activity)) };
    let shed = match &shared.tls {
        None => http(watched, &activity, &shared).await,
        Some(tls) => match handshake(tls, watched, &activity, &shared).await {
            Ok(stream) => http(stream, &activity, &shared).await,
            Err(shed) => shed,
        },
    };
    if let Some(reason) = shed {
        shared.metrics.shed(reason);
    }
    // The socket (unless upgraded) goes before `place`: the place is given back only once the
    // descriptor is closed.
}

/// The TLS handshake of a new connection, within `header_timeout` of its connect. It is waiting
/// on its client throughout (the socket reports that), so under pressure it gives way like an
/// idle socket. Err: the connection is done, with the reason it was shed, if any.
async fn handshake(
    tls: &TlsAcceptor,
    watched: Watched,
    activity: &Activity,
    shared: &Shared,
) -> Result<TlsStream<Watched>, Option<&'static str>> {
    let deadline = Instant::now() + shared.header_timeout;
    tokio::select! {
        accepted = tokio::time::timeout_at(deadline, tls.accept(watched)) => match accepted {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Err(Some(shed::TLS_HANDSHAKE_FAILED))
            }
            Err(_) => Err(Some(shed::TLS_HANDSHAKE_TIMEOUT)),
        },
        // Counted when it was chosen.
        () = activity.evicted() => Err(None),
        () = shared.force.cancelled() => Err(None),
        () = shared.stop.cancelled() => Err(None),
    }
}

/// HTTP/1.1 on `io` until the connection closes, upgrades, times out, gives way or is stopped;
/// the reason it was shed, if it was.
async fn http<I>(io: I, activity: &Arc<Activity>, shared: &Shared) -> Option<&'static str>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = TowerToHyperService::new(Tracked { router: shared.router.clone(), activity: Arc::clone(activity) });
    let conn = shared.http.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let idle = tokio::time::sleep_until(activity.idle_deadline(shared.idle_timeout));
    tokio::pin!(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => break match served {
                Ok(()) => None,
                Err(e) if e.is_timeout() => Some(shed::HEADER_TIMEOUT),
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                    None
                }
            },
            // Counted when it was chosen.
            () = activity.evicted() => break None,
            () = shared.force.cancelled() => break None,
            () = shared.stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut idle => {
                let now = Instant::now();
                let deadline = activity.idle_deadline(shared.idle_timeout);
                if activity.is_upgrading() {
                    // Hyper is handing the socket over; the session's heartbeats take it from here.
                    idle.as_mut().reset(now + shared.idle_timeout);
                } else if deadline <= now {
                    break Some(shed::IDLE_TIMEOUT);
                } else {
                    idle.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// One open connection in `herald_http_connections_open`, for as long as this lives.
struct Open(IntGauge);

impl Open {
    fn count(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The router, telling the connection's [`Activity`] when a request is being served.
#[derive(Clone)]
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
}

impl Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<Incoming>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        // False only for a connection told to give way, which is about to be closed anyway.
        let _ = self.activity.request_started();
        let served = RequestServed(Arc::clone(&self.activity));
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                served.0.upgrading();
            }
            Ok(response)
        })
    }
}

/// Ends the request in the connection's activity when its response is ready (or abandoned).
struct RequestServed(Arc<Activity>);

impl Drop for RequestServed {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The plain TCP socket under a connection upgraded by [`serve`], with what hyper had read past
/// the request; the upgraded connection back as it is when it is not plain TCP (TLS). A
/// WebSocket that owns its socket holds neither hyper's box nor the HTTP phase's wrapper for
/// the connection's whole life.
pub fn into_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, hyper::body::Bytes), hyper::upgrade::Upgraded> {
    upgraded.downcast::<TokioIo<Watched>>().map(|parts| (parts.io.into_inner().stream, parts.read_buf))
}

/// The socket, reporting to the connection's [`Activity`] when bytes move and when a read finds
/// nothing: the two facts the idle timeout and giving way are decided on.
struct Watched {
    stream: TcpStream,
    /// None once the connection has upgraded (see [`Watched::activity`]).
    activity: Option<Arc<Activity>>,
}

impl Watched {
    /// The connection's activity while it is plain HTTP. Once it has upgraded, nothing is
    /// decided on it any more and this socket lives on in a WebSocket session for hours: the
    /// reference is let go, so that no session keeps the HTTP phase's bookkeeping (~160 bytes,
    /// an eviction token among them) or reports every read and write to it.
    fn activity(&mut self) -> Option<&Activity> {
        if self.activity.as_ref().is_some_and(|a| a.is_upgrading()) {
            self.activity = None;
        }
        self.activity.as_deref()
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if let Some(activity) = this.activity() {
                    activity.progressed();
                }
            }
            Poll::Pending => {
                if let Some(activity) = this.activity() {
                    activity.read_would_block();
                }
            }
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let (Poll::Ready(Ok(1..)), Some(activity)) = (&polled, this.activity()) {
            activity.progressed();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(1..)), Some(activity)) = (&polled, this.activity()) {
            activity.progressed();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn metrics() -> (Registry, ServeMetrics) {
        let registry = Registry::new();
        let metrics = ServeMetrics::new(&registry, "public").unwrap();
        (registry, metrics)
    }

    #[tokio::test]
    async fn accept_errors_back_off_instead_of_spinning() {
        let (_registry, metrics) = metrics();
        let stop = CancellationToken::new();
        let calls = Cell::new(0u32);
        let accept = || {
            calls.set(calls.get() + 1);
            // EMFILE: what a process out of descriptors gets from accept(2).
            std::future::ready(Err(io::Error::from_raw_os_error(24)))
        };
        let run = accept_loop(accept, &stop, &metrics, |_, _| unreachable!("nothing is accepted"));
        // Attempts at 0, 10, 30, 70, 150, 310 and 630 ms; a spinning loop makes millions.
        assert!(tokio::time::timeout(Duration::from_millis(700), run).await.is_err(), "the loop ended");
        assert!((5..=8).contains(&calls.get()), "{} accept attempts in 700 ms", calls.get());
        assert_eq!(metrics.accept_errors.get(), u64::from(calls.get()));

        // A backoff in progress does not hold up a stop.
        let calls = Cell::new(0u32);
        let accept = || {
            calls.set(calls.get() + 1);
            std::future::ready(Err(io::Error::from_raw_os_error(24)))
        };
        stop.cancel();
        let run = accept_loop(accept, &stop, &metrics, |_, _| unreachable!());
        tokio::time::timeout(Duration::from_millis(100), run).await.expect("stopped at once");
    }

    /// An upgraded socket lives on in a WebSocket session for hours: it keeps nothing of the
    /// HTTP phase's bookkeeping, which is decided on no more.
    #[tokio::test]
    async fn an_upgraded_socket_lets_go_of_its_http_bookkeeping() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let set = PendingSet::new(4, 4);
        let (Admission::Placed(place) | Admission::Displaced(place)) = set.admit(Instant::now()) else {
            panic!("no place")
        };
        let activity = Arc::clone(place.activity());
        let mut watched = Watched { stream, activity: Some(Arc::clone(&activity)) };

        watched.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(watched.activity.is_some(), "plain HTTP is watched");
        assert!(activity.request_started());
        activity.upgrading();
        watched.write_all(b"HTTP/1.1 101 Switching Protocols\r\n").await.unwrap();
        assert!(watched.activity.is_none(), "let go once upgraded");
        drop(place);
        assert_eq!(Arc::strong_count(&activity), 1, "the session's socket holds none of it");
        drop(client);
    }

    async fn start(config: HttpConfig) -> (SocketAddr, ServeMetrics, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_registry, metrics) = metrics();
        // /big: more than the socket buffers of a client that does not read can take.
        let big = axum::body::Bytes::from(vec![b'x'; 16 << 20]);
        let router =
            Router::new().route("/healthz", get(|| async { "ok" })).route("/big", get(move || async move { big }));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (metrics, stop) = (metrics.clone(), stop.clone());
            async move { serve(listener, router, &config, metrics, stop).await }
        });
        (addr, metrics, stop, task)
    }

    /// GET /healthz on a new connection from `source`; the response's first line, or None when
    /// the connection is closed without one.
    async fn healthz(addr: SocketAddr, source: &str) -> Option<String> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(addr).await.ok()?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.lines().next().map(str::to_owned)
    }

    /// Connections the kernel completes for a listener that has not accepted them yet: at most
    /// about `backlog`; the rest have their SYNs dropped and wait for a retry a second later.
    async fn completed_without_accept(backlog: u32, clients: usize) -> usize {
        let listener = listen("127.0.0.1:0".parse().unwrap(), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..clients).map(|_| tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(addr)));
        let streams = futures::future::join_all(connects).await;
        streams.iter().filter(|s| matches!(s, Ok(Ok(_)))).count()
    }

    /// A reconnect storm larger than tokio's default queue of 1024 must not be made to wait for
    /// SYN retries: the queue is what HERALD_LISTEN_BACKLOG says. Small numbers show the same.
    #[tokio::test]
    async fn the_listen_backlog_bounds_connections_waiting_for_accept() {
        let small = completed_without_accept(4, 24).await;
        assert!((1..=5).contains(&small), "a backlog of 4 completed {small} of 24");
        assert_eq!(completed_without_accept(64, 24).await, 24, "a backlog of 64 completes all 24");
    }

    #[tokio::test]
    async fn a_full_budget_of_idle_sockets_gives_way_to_a_probe_and_times_out() {
        let config = HttpConfig {
            header_timeout: Duration::from_millis(300),
            max_connections: 8,
            connects_per_sec_per_ip: 0,
            ..HttpConfig::default()
        };
        let (addr, metrics, stop, task) = start(config).await;
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every place is taken by a socket that sent nothing; the probe takes the oldest's.
        for _ in 0..3 {
            assert_eq!(healthz(addr, "127.0.0.1").await.as_deref(), Some("HTTP/1.1 200 OK"));
        }
        assert!(metrics.shed.with_label_values(&[shed::EVICTED]).get() >= 1);
        // The others are closed after the header timeout: the read ends.
        for mut socket in idle {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "still open: {read:?}");
        }
        assert!(metrics.shed.with_label_values(&[shed::HEADER_TIMEOUT]).get() >= 1);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.unwrap().unwrap();
        assert_eq!(metrics.open.get(), 0);
    }

    /// Polls `check` every 10 ms until it holds, for at most `within`.
    async fn until(within: Duration, check: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !check() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_response_is_closed_after_the_idle_timeout() {
        let config = HttpConfig {
            idle_timeout: Duration::from_millis(300),
            connects_per_sec_per_ip: 0,
            ..HttpConfig::default()
        };
        let (addr, metrics, stop, task) = start(config).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // The response stalls in full socket buffers; nothing moves, so the server lets go.
        let idle_timeouts = || metrics.shed.with_label_values(&[shed::IDLE_TIMEOUT]).get();
        assert!(until(Duration::from_secs(3), || idle_timeouts() == 1 && metrics.open.get() == 0).await);
        // A client that does read gets the whole body, however long that takes in all.
        let mut reader = TcpStream::connect(addr).await.unwrap();
        reader.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut body = Vec::new();
        reader.read_to_end(&mut body).await.unwrap();
        assert!(body.len() > 16 << 20, "{} bytes", body.len());
        assert_eq!(idle_timeouts(), 1);
        drop(stream);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn connects_over_the_rate_are_closed_before_any_http_and_other_sources_get_in() {
        let config = HttpConfig { connects_per_sec_per_ip: 2, ..HttpConfig::default() };
        let (addr, metrics, stop, task) = start(config).await;
        let mut answered = 0;
        for _ in 0..10 {
            answered += usize::from(healthz(addr, "127.0.0.1").await.is_some());
        }
        assert!((4..=5).contains(&answered), "{answered} of 10 answered; the burst is 4");
        assert!(metrics.shed.with_label_values(&[shed::RATE_LIMITED]).get() >= 5);
        assert_eq!(healthz(addr, "127.0.0.2").await.as_deref(), Some("HTTP/1.1 200 OK"));
        stop.cancel();
        task.await.unwrap();
    }
}
