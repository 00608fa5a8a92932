//! A TCP proxy in front of the store that counts MongoDB wire-protocol requests, which is how the
//! benchmarks count store round trips per message whatever the server (nx-27017 or a real
//! MongoDB). Every request message a driver sends is answered by one reply, so requests are round
//! trips. The driver's own monitoring (`hello` every few seconds) is counted too; it is tiny.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub(crate) struct CountingProxy {
    pub(crate) addr: std::net::SocketAddr,
    requests: Arc<AtomicU64>,
    /// Owns the accept loop and every piped connection; all end when the proxy is dropped.
    _tasks: JoinSet<()>,
}

impl CountingProxy {
    pub(crate) async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let counter = Arc::clone(&requests);
        tasks.spawn(async move {
            let mut pipes = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counter) = (upstream.clone(), Arc::clone(&counter));
                pipes.spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        pipe(client, server, counter).await;
                    }
                });
            }
        });
        Ok(Self { addr, requests, _tasks: tasks })
    }

    /// Requests forwarded so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A reader of [`Self::requests`] that does not borrow the proxy (for a sampler running
    /// beside code that changes the system under test).
    pub(crate) fn counter(&self) -> RequestCounter {
        RequestCounter(Arc::clone(&self.requests))
    }
}

/// Reads the requests a [`CountingProxy`] has forwarded; valid after the proxy is gone (the count
/// then stays where it was).
#[derive(Clone)]
pub(crate) struct RequestCounter(Arc<AtomicU64>);

impl RequestCounter {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, counter: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let up = async {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counter.fetch_add(framer.feed(&buf[..n]), Ordering::Relaxed);
            if server_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_wr.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Finds message boundaries in a byte stream of wire-protocol messages, each starting with its
/// total length as a little-endian i32.
#[derive(Default)]
struct Framer {
    /// Bytes left of the current message's body.
    remaining: usize,
    /// Bytes of a length prefix split across reads.
    header: Vec<u8>,
}

impl Framer {
    /// Consumes `bytes`; returns how many messages started in them.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut started = 0;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len());
                self.remaining -= take;
                bytes = &bytes[take..];
                continue;
            }
            let need = 4 - self.header.len();
            let take = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() == 4 {
                let len = i32::from_le_bytes([self.header[0], self.header[1], self.header[2], self.header[3]]);
                self.header.clear();
                self.remaining = usize::try_from(len).unwrap_or(4).saturating_sub(4);
                started += 1;
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_counts_messages_split_anywhere() {
        let mut stream = Vec::new();
        for body in [10usize, 0, 300] {
            stream.extend_from_slice(&((body + 4) as i32).to_le_bytes());
            stream.extend(std::iter::repeat_n(7u8, body));
        }
        for chunk in [1, 2, 3, 5, 64, 1000] {
            let mut framer = Framer::default();
            let total: u64 = stream.chunks(chunk).map(|c| framer.feed(c)).sum();
            assert_eq!(total, 3, "chunk size {chunk}");
        }
    }
}
