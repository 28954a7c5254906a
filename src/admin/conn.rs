//! The admin listener's connections, with a write deadline a handler can set
//! (issue 15: a recording download ends at its deadline even when the client
//! stopped reading).
//!
//! Owns the accept loop's I/O type ([`AdminConn`]: a TCP stream whose writes
//! fail once its deadline has passed) and the handle a request gets to it
//! ([`ConnDeadline`], through axum's `ConnectInfo`). A client that never
//! reads leaves hyper waiting on a full socket: it no longer polls the
//! response body, so a deadline kept in the body would never be looked at.
//! The write side is what hyper does poll, and a timer armed there wakes it.
//! Each connection's kernel send buffer is fixed ([`SEND_BUFFER`]), so a
//! stalled client costs bounded memory there too. Must not know about
//! requests, tenants or recordings.

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// Send buffer asked for on each admin connection (the kernel doubles it):
/// 5 MB/s at 50 ms round trip, far more on the loopback the shipped
/// profiles listen on.
const SEND_BUFFER: usize = 256 * 1024;

/// The admin API's listener: TCP, each connection wrapped in [`AdminConn`].
pub(crate) struct AdminListener(pub(crate) TcpListener);

impl Listener for AdminListener {
    type Io = AdminConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (AdminConn, SocketAddr) {
        // axum's own loop for TCP: it retries accept errors with a pause.
        let (tcp, addr) = Listener::accept(&mut self.0).await;
        // A fixed send buffer instead of the kernel's autotuned one (up to
        // 4 MB): what a client that stops reading leaves queued in the
        // kernel stays bounded. Failure only leaves the default.
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(error = %e, "admin connection: send buffer not set");
        }
        (
            AdminConn {
                tcp,
                deadline: ConnDeadline::default(),
                timer: None,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A connection's write deadline, shared by the connection and the requests
/// on it. Unset: writes wait as long as the peer makes them.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnDeadline(Arc<Mutex<Option<Instant>>>);

impl ConnDeadline {
    /// From `at` on, every write on the connection fails (`TimedOut`) and
    /// hyper drops it. A later call moves it.
    pub(crate) fn set(&self, at: Instant) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    fn get(&self) -> Option<Instant> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Connected<IncomingStream<'_, AdminListener>> for ConnDeadline {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        stream.io().deadline.clone()
    }
}

/// A TCP connection of the admin listener (see the module documentation).
pub(crate) struct AdminConn {
    tcp: TcpStream,
    deadline: ConnDeadline,
    /// Armed while a write waits past which the deadline falls.
    timer: Option<Pin<Box<Sleep>>>,
}

impl AdminConn {
    /// `Err(TimedOut)` once the deadline passed; otherwise arms the timer
    /// that wakes the task at the deadline (a write that would wait).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(at) = self.deadline.get() else {
            return Ok(());
        };
        if Instant::now() >= at {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin API response deadline passed",
            ));
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin API response deadline passed",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Err(e) = this.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Err(e) = this.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn a_write_to_a_peer_that_never_reads_fails_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut admin = AdminListener(listener);
        // The peer connects and never reads.
        let _peer = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = admin.accept().await;
        let deadline = conn.deadline.clone();
        let started = Instant::now();
        deadline.set(started + std::time::Duration::from_millis(300));
        let chunk = vec![7u8; 64 * 1024];
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                if let Err(e) = conn.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the write fails at the deadline, not never");
        assert_eq!(outcome.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    }

    #[tokio::test]
    async fn without_a_deadline_writes_pass_through() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut admin = AdminListener(listener);
        let mut peer = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = admin.accept().await;
        conn.write_all(b"hello").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"hello");
    }
}
