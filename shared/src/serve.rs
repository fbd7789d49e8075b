//! Serving HTTP on a listener, as `axum::serve` does, with the bounds a port facing the
//! internet needs: a client that sends half a request's headers and goes quiet, or keeps a
//! connection open without sending another request, has it closed after the header read
//! timeout (axum's own `serve` sets no timer, so such connections stayed open forever). Only
//! HTTP/1.1: Socket.IO clients speak nothing else, and HTTP/2 would open more doors.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// How a port bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a request's headers may take to arrive, and how long a kept-alive connection
    /// may wait for its next request.
    pub header_read_timeout: Duration,
    /// Counted once per connection closed for taking longer than that.
    pub timeouts_metric: &'static str,
    /// Most TCP connections open at a time (0: no cap). One more is accepted and closed at
    /// once, before anything is read from it: the process keeps file descriptors for its own
    /// work (NATS, logs) instead of running out of them and refusing everyone.
    pub max_connections: usize,
    /// Counted once per connection closed for being over `max_connections`.
    pub refusals_metric: &'static str,
}

/// Serves `router` on `listener` until `shutdown`, then lets the requests in progress finish
/// (connections upgraded to WebSockets are the application's to close). Each request carries
/// its peer address as [`ConnectInfo`]; `on_accept` sees each connection first (socket options).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    on_accept: impl Fn(&mut TcpStream) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    // Dropped at shutdown: each connection's task then shuts its connection down gracefully.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    // Every connection's task holds a receiver: all of them are done once `closed` returns.
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let mut shutdown = pin!(shutdown);
    let places = (limits.max_connections > 0).then(|| {
        Places(std::sync::Arc::new(tokio::sync::Semaphore::new(
            limits.max_connections,
        )))
    });
    let mut refused_lately = false;
    loop {
        let (mut stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum does, not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Held by the connection's task: its place is free again when the connection ends.
        let place = match &places {
            None => None,
            Some(places) => match places.take() {
                Some(place) => Some(place),
                None => {
                    metrics::counter!(limits.refusals_metric).increment(1);
                    if !std::mem::replace(&mut refused_lately, true) {
                        tracing::warn!(
                            max = limits.max_connections,
                            "connections refused: this port holds as many as it may"
                        );
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        refused_lately = false;
        on_accept(&mut stream);
        // The place goes with the stream: a connection upgraded to a WebSocket outlives its HTTP
        // task, and keeps its place until the WebSocket is closed.
        let stream = Counted {
            stream,
            _place: place,
        };
        let connection_places = places.clone();
        let service =
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    if let Some(places) = &connection_places {
                        request.extensions_mut().insert(places.clone());
                    }
                    request.map(axum::body::Body::new)
                });
        let service = TowerToHyperService::new(service);
        let (mut stop, done) = (stop_rx.clone(), done_rx.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics::counter!(limits.timeouts_metric, "phase" => "headers").increment(1);
                }
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
            drop(done);
        });
    }
    drop(listener);
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// The places under a port's connection cap. Each request of a capped port carries it in its
/// extensions, so that a handler opening a connection of its own for the client (a WebSocket
/// handed to another gateway) takes a place for it too.
#[derive(Clone)]
pub struct Places(std::sync::Arc<tokio::sync::Semaphore>);

impl Places {
    /// A place, held until the permit is dropped; `None` when the port is full.
    pub fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// A connection holding its place under the port's cap for as long as it exists.
struct Counted {
    stream: TcpStream,
    /// Freed when the stream is dropped (by its HTTP task, or by the WebSocket it became).
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// File descriptors a process keeps for itself (NATS, logs, outgoing HTTP) when its connection
/// cap is derived from its open-file limit.
pub const RESERVED_FILES: u64 = 256;

/// The connection cap of a port: `configured`, or when that is 0, the process's open-file limit
/// less [`RESERVED_FILES`] (at least 64; no cap when the limit is unlimited).
pub fn connection_cap(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.map_or(0, |files| {
        usize::try_from(files.saturating_sub(RESERVED_FILES).max(64)).unwrap_or(usize::MAX)
    })
}

/// The peer address of a request served by [`serve`].
pub fn peer(request: &axum::http::request::Parts) -> Option<SocketAddr> {
    request
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(
        header_read: Duration,
        max_connections: usize,
    ) -> std::io::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.ip().to_string()
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits {
            header_read_timeout: header_read,
            timeouts_metric: "test_timeouts_total",
            max_connections,
            refusals_metric: "test_refusals_total",
        };
        tokio::spawn(serve(listener, router, limits, |_| {}, async move {
            let _ = stopped.await;
        }));
        Ok((addr, stop))
    }

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Option<String> {
        let mut got = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&got).into_owned())
    }

    #[tokio::test]
    async fn half_a_header_and_an_idle_keep_alive_are_closed_after_the_timeout()
    -> std::io::Result<()> {
        let (addr, _stop) = server(Duration::from_millis(300), 0).await?;
        let mut half = TcpStream::connect(addr).await?;
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
        let closed = read_to_close(&mut half, Duration::from_secs(3)).await;
        assert!(closed.is_some(), "half a header kept the connection open");

        let mut idle = TcpStream::connect(addr).await?;
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let answer = read_to_close(&mut idle, Duration::from_secs(3)).await;
        let answer = answer.unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("127.0.0.1"),
            "the peer address reached the handler: {answer}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_quick_client_is_served() -> std::io::Result<()> {
        let (addr, stop) = server(Duration::from_secs(5), 0).await?;
        let mut client = TcpStream::connect(addr).await?;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let answer = read_to_close(&mut client, Duration::from_secs(3)).await;
        assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
        let _ = stop.send(());
        Ok(())
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_the_others_untouched() -> std::io::Result<()> {
        let (addr, _stop) = server(Duration::from_secs(5), 2).await?;
        let mut held = [
            TcpStream::connect(addr).await?,
            TcpStream::connect(addr).await?,
        ];
        // The server has accepted both (a request on each is answered) before the third.
        for h in &mut held {
            h.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            let mut buf = [0u8; 12];
            h.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"HTTP/1.1 200");
        }
        let mut over = TcpStream::connect(addr).await?;
        let _ = over
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let answer = read_to_close(&mut over, Duration::from_secs(3)).await;
        // Closed unanswered (a reset, when the request had arrived first).
        assert!(
            answer.as_deref().is_none_or(str::is_empty),
            "the third connection was served: {answer:?}"
        );

        // The held ones still work; once one ends, a new connection is served.
        held[0]
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let answer = read_to_close(&mut held[0], Duration::from_secs(3)).await;
        assert!(answer.is_some_and(|a| a.contains("200 OK")));
        let mut answered = None;
        for _ in 0..50 {
            let mut next = TcpStream::connect(addr).await?;
            let _ = next
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            answered = read_to_close(&mut next, Duration::from_secs(3)).await;
            if answered.as_deref().is_some_and(|a| !a.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            answered.is_some_and(|a| a.starts_with("HTTP/1.1 200")),
            "a freed place was not reused"
        );
        Ok(())
    }
}
