//! The server's side of a WebSocket that holds no buffer while its connection idles.
//!
//! Most of a gateway's connections wait most of the time, and what each holds while it waits
//! is what a gateway's memory is made of. tungstenite keeps a read and a write buffer per
//! connection for its whole life (~0.45 KiB idle) and tokio-tungstenite two waker proxies
//! beside them. Here a read goes through a buffer on the stack; only bytes that are not yet a
//! whole frame (or frames that arrived together) are kept, and only until they are taken. What
//! is written is kept only until the socket takes it. The frame codec is tungstenite's
//! ([`frame`]); the HTTP handshake is in [`upgrade`].

mod frame;
mod upgrade;

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{CloseFrame, Message};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use frame::Fragments;
pub(crate) use frame::FrameError;
pub(crate) use upgrade::{Transport, Upgrade};

/// The most one read takes from the socket: the stack buffer's size.
pub(crate) const MAX_READ_CHUNK: usize = herald_shared::config::MAX_READ_BUFFER_BYTES;

/// A socket's limits, set from the gateway's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The largest message a client may send, all its frames together, and so the largest
    /// frame.
    pub(crate) max_message: u32,
    /// The most one read takes (at most [`MAX_READ_CHUNK`]).
    pub(crate) read_chunk: u16,
    /// Written bytes kept before the next frame waits for the socket to take them.
    pub(crate) write_buffer: u32,
}

/// Why a WebSocket stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("a frame after our close frame")]
    SendAfterClose,
}

impl SocketError {
    /// Whether the client sent more than the socket's limits allow.
    pub(crate) fn is_too_big(&self) -> bool {
        matches!(self, SocketError::Frame(FrameError::TooBig { .. }))
    }
}

/// One upgraded connection: a [`Stream`] of the client's messages and a [`Sink`] of ours, with
/// the closing handshake's rules (a ping is answered, a close frame is answered and ends the
/// stream). Errors are `axum::Error`s wrapping a [`SocketError`].
pub(crate) struct WebSocket<Io = Transport> {
    io: Io,
    /// Bytes read and not yet taken as frames; unallocated between frames.
    inbox: Vec<u8>,
    /// A data message arriving in several frames.
    fragments: Option<Box<Fragments>>,
    /// Frames for the client not yet taken by the socket; unallocated once they are.
    outbox: Vec<u8>,
    limits: Limits,
    /// Our close frame is queued: nothing may follow it.
    close_sent: bool,
    /// The client's stream is over: its close frame came, the socket ended or broke.
    ended: bool,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> WebSocket<Io> {
    /// A socket whose handshake is done; `read` holds what was read past the handshake.
    pub(crate) fn new(io: Io, read: Vec<u8>, limits: Limits) -> Self {
        Self { io, inbox: read, fragments: None, outbox: Vec::new(), limits, close_sent: false, ended: false }
    }

    /// Writes what is queued until the socket has taken all of it, then lets the buffer go.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outbox.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outbox))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outbox.drain(..written);
        }
        self.outbox = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// The next whole message among the bytes already read, answering pings and a close
    /// frame on the way.
    fn take_message(&mut self) -> Result<Option<Message>, SocketError> {
        let max_message = self.limits.max_message as usize;
        while let Some((frame, used)) = frame::decode(&self.inbox, max_message)? {
            if used == self.inbox.len() {
                self.inbox = Vec::new();
            } else {
                self.inbox.drain(..used);
            }
            let Some(message) = frame::message(frame, &mut self.fragments, max_message)? else {
                continue;
            };
            match &message {
                // A client that pings without reading our answers must not grow the outbox:
                // past the write buffer, pings go unanswered (§5.5.3 asks a pong only for the
                // latest).
                Message::Ping(data) if !self.close_sent && self.outbox.len() < self.limits.write_buffer as usize => {
                    frame::encode(&Message::Pong(data.clone()), &mut self.outbox);
                }
                Message::Close(close) => {
                    // Answered with its code (§5.5.1), unless it answers ours; either way the
                    // conversation is over.
                    if !self.close_sent {
                        let reply = close.as_ref().map(|c| CloseFrame { code: c.code, reason: Default::default() });
                        frame::encode(&Message::Close(reply), &mut self.outbox);
                        self.close_sent = true;
                    }
                    self.ended = true;
                }
                _ => {}
            }
            return Ok(Some(message));
        }
        Ok(None)
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, SocketError>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            // Answers (a pong, our close reply) go out while the client is read; a socket that
            // takes nothing now is written to again when the session next writes or flushes.
            if !self.outbox.is_empty() {
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            if let Some(message) = self.take_message().transpose() {
                return Poll::Ready(Some(message));
            }
            let mut storage = [MaybeUninit::<u8>::uninit(); MAX_READ_CHUNK];
            let chunk = usize::from(self.limits.read_chunk).clamp(1, MAX_READ_CHUNK);
            let mut buf = ReadBuf::uninit(&mut storage[..chunk]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                // The client went away, with or without its half of the closing handshake.
                self.ended = true;
                return Poll::Ready(None);
            }
            self.inbox.extend_from_slice(buf.filled());
        }
    }
}

/// The socket's error as the session's socket bound has it (see [`crate::session`]).
fn wrap(e: SocketError) -> axum::Error {
    axum::Error::new(e)
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<Io> {
    type Item = Result<Message, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.poll_message(cx).map(|item| {
            item.map(|result| {
                result.map_err(|e| {
                    // Nothing more is read from a client that broke the protocol.
                    this.ended = true;
                    wrap(e)
                })
            })
        })
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<Io> {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.outbox.len() >= this.limits.write_buffer as usize {
            ready!(this.poll_write_out(cx)).map_err(|e| wrap(e.into()))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.close_sent {
            return Err(wrap(SocketError::SendAfterClose));
        }
        this.close_sent = matches!(message, Message::Close(_));
        frame::encode(&message, &mut this.outbox);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx)).map_err(|e| wrap(e.into()))?;
        Pin::new(&mut this.io).poll_flush(cx).map_err(|e| wrap(e.into()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx).map_err(|e| wrap(e.into()))
    }
}

#[cfg(test)]
mod tests {
    //! The socket over an in-memory duplex pipe, spoken to as a client would.

    use futures::{SinkExt, StreamExt};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const LIMITS: Limits = Limits { max_message: 1024, read_chunk: 64, write_buffer: 4096 };

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [1, 2, 3, 4];
        let mut out = vec![first, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn pair() -> (WebSocket<DuplexStream>, DuplexStream) {
        let (server, client) = duplex(1 << 16);
        (WebSocket::new(server, Vec::new(), LIMITS), client)
    }

    #[tokio::test]
    async fn messages_come_whole_however_the_bytes_are_cut() {
        let (mut socket, mut client) = pair();
        let mut bytes = masked(0x81, b"one");
        bytes.extend(masked(0x81, &[b'2'; 100]));
        bytes.extend(masked(0x81, b"three"));
        // Read 64 bytes at a time (LIMITS.read_chunk): the second frame spans two reads and
        // shares them with its neighbours.
        client.write_all(&bytes).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::Text("one".into()));
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::Text("2".repeat(100).into()));
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::Text("three".into()));
        assert!(socket.inbox.capacity() == 0, "nothing is held between frames");
    }

    #[tokio::test]
    async fn what_was_read_past_the_handshake_is_the_first_frame() {
        let (server, _client) = duplex(64);
        let mut socket = WebSocket::new(server, masked(0x81, b"early"), LIMITS);
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::Text("early".into()));
    }

    #[tokio::test]
    async fn a_ping_is_answered_and_a_close_is_answered_and_ends_the_stream() {
        let (mut socket, mut client) = pair();
        client.write_all(&masked(0x89, b"p")).await.unwrap();
        client.write_all(&masked(0x88, &[0x03, 0xe8, b'b', b'y', b'e'])).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::Ping(b"p"[..].into()));
        let close = socket.next().await.unwrap().unwrap();
        assert_eq!(close, Message::Close(Some(CloseFrame { code: 1000, reason: "bye".into() })));
        assert!(socket.next().await.is_none(), "nothing after the close");
        socket.flush().await.unwrap();
        let mut answers = [0u8; 7];
        client.read_exact(&mut answers).await.unwrap();
        assert_eq!(answers, [0x8A, 0x01, b'p', 0x88, 0x02, 0x03, 0xe8], "the pong, then the close echoed");
        assert!(socket.send(Message::Text("late".into())).await.is_err(), "nothing after a close frame");
    }

    #[tokio::test]
    async fn a_client_that_pings_and_never_reads_grows_nothing() {
        // Room for 100 bytes on the client's side, which never reads.
        let (server, mut client) = duplex(100);
        let mut socket = WebSocket::new(server, Vec::new(), LIMITS);
        let ping = masked(0x89, &[b'p'; 100]);
        let pings = async {
            for _ in 0..1000 {
                client.write_all(&ping).await.unwrap();
            }
        };
        let read = async {
            for _ in 0..1000 {
                assert!(matches!(socket.next().await, Some(Ok(Message::Ping(_)))));
            }
        };
        tokio::join!(pings, read);
        let bound = LIMITS.write_buffer as usize + ping.len();
        assert!(socket.outbox.len() <= bound, "{} bytes of pongs waiting", socket.outbox.len());
    }

    #[tokio::test]
    async fn our_frames_are_written_on_flush_and_the_buffer_let_go() {
        let (mut socket, mut client) = pair();
        socket.feed(Message::Text("a".into())).await.unwrap();
        socket.feed(Message::Text("b".into())).await.unwrap();
        socket.flush().await.unwrap();
        assert_eq!(socket.outbox.capacity(), 0);
        let mut frames = [0u8; 6];
        client.read_exact(&mut frames).await.unwrap();
        assert_eq!(frames, [0x81, 0x01, b'a', 0x81, 0x01, b'b']);
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_stream_as_too_big() {
        let (mut socket, mut client) = pair();
        // A 2,000-byte frame's header and mask: over max_message (1,024) before any payload.
        client.write_all(&[0x81, 0x80 | 126, 0x07, 0xd0, 1, 2, 3, 4]).await.unwrap();
        let error = socket.next().await.unwrap().unwrap_err();
        let error = error.into_inner().downcast::<SocketError>().unwrap();
        assert!(error.is_too_big(), "{error}");
        assert!(socket.next().await.is_none());
    }

    #[tokio::test]
    async fn a_protocol_violation_ends_the_stream_and_the_end_of_the_socket_is_none() {
        let (mut socket, mut client) = pair();
        client.write_all(&[0x81, 0x01, b'x']).await.unwrap();
        let error = socket.next().await.unwrap().unwrap_err();
        let error = error.into_inner().downcast::<SocketError>().unwrap();
        assert!(matches!(*error, SocketError::Frame(FrameError::Protocol(_))), "unmasked: {error}");
        assert!(socket.next().await.is_none());

        let (mut socket, client) = pair();
        drop(client);
        assert!(socket.next().await.is_none());
    }
}
