//! Socket options of accepted connections.
//!
//! A client that stops reading must not keep its connection, and its place in every room,
//! forever. Engine.IO's heartbeat notices it, but engineioxide's WebSocket writer is then stuck
//! in a write the client never drains, and the session only ends (and our disconnect handler
//! only runs) once that write returns. `TCP_USER_TIMEOUT` makes the kernel abort a connection
//! whose written data stays unacknowledged, or whose peer keeps a zero receive window, for that
//! long; the stuck write then fails and the session ends the normal way.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a write may stall before the connection is aborted: a client that reads at all
/// answers a ping within `ping_interval + ping_timeout`, so a stall longer than that is a client
/// the heartbeat has given up on already.
pub fn write_stall_limit(ping_interval: Duration, ping_timeout: Duration) -> Duration {
    ping_interval + ping_timeout
}

/// Sets `TCP_USER_TIMEOUT` (Linux) on an accepted connection. A failure only costs the early
/// abort, so it is logged, not returned.
pub fn abort_stalled_writes(stream: &mut TcpStream, after: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Err(error) = socket2::SockRef::from(&*stream).set_tcp_user_timeout(Some(after)) {
        tracing::warn!(%error, "could not set TCP_USER_TIMEOUT; a client that stops reading keeps its connection until it reads again");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    let _ = (stream, after);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn accepted_connections_get_the_user_timeout() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let _client = TcpStream::connect(addr).await?;
        let (mut accepted, _) = listener.accept().await?;
        abort_stalled_writes(&mut accepted, Duration::from_millis(45_000));
        let set = socket2::SockRef::from(&accepted).tcp_user_timeout()?;
        assert_eq!(set, Some(Duration::from_millis(45_000)));
        Ok(())
    }
}
