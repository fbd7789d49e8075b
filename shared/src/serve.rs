//! Serving HTTP on a listener, as `axum::serve` does, with the bounds a port facing the
//! internet needs: a client that sends half a request's headers and goes quiet, or keeps a
//! connection open without sending another request, has it closed after the header read
//! timeout (axum's own `serve` sets no timer, so such connections stayed open forever). Only
//! HTTP/1.1: Socket.IO clients speak nothing else, and HTTP/2 would open more doors.

use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
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
        on_accept(&mut stream);
        let service =
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
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
        let (addr, _stop) = server(Duration::from_millis(300)).await?;
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
        let (addr, stop) = server(Duration::from_secs(5)).await?;
        let mut client = TcpStream::connect(addr).await?;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let answer = read_to_close(&mut client, Duration::from_secs(3)).await;
        assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
        let _ = stop.send(());
        Ok(())
    }
}
