//! The cap on connections per client address, and how a client's address is told: the TCP
//! peer, or — when the peer is a trusted proxy (the load balancer) — the address the proxy
//! appended to `X-Forwarded-For`.
//!
//! A connection is counted from its Engine.IO handshake (the request that opens a session,
//! without a `sid`), before the client has sent anything else: the permit rides in the
//! handshake request's extensions, which the session keeps for its life, so it is freed when
//! the session ends, whether or not the client ever joined the namespace.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Counts live connections per client address.
pub struct ConnectionLimiter {
    /// Most connections per address; 0 means no cap.
    max: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpAddr>,
    live: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it (with the session's handshake request) frees its place.
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    address: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut live = self.limiter.live();
        if let Some(n) = live.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.address);
            }
        }
    }
}

impl ConnectionLimiter {
    pub fn new(max: usize, trusted_proxies: &[String]) -> Self {
        Self {
            max,
            trusted_proxies: trusted_proxies
                .iter()
                .filter_map(|p| p.trim().parse().ok())
                .collect(),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client's address from a request's parts, if known.
    pub fn client_address(&self, request: &Parts) -> Option<IpAddr> {
        let peer = request.extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(self.client_of(peer, &request.headers))
    }

    /// The client's address of a request from `peer` with these headers.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted_proxies.contains(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .next_back();
        forwarded.unwrap_or(peer)
    }

    /// A place for one more connection from `address`, or `None` when it has its share.
    pub fn acquire(self: &Arc<Self>, address: IpAddr) -> Option<ConnectionPermit> {
        let mut live = self.live();
        let n = live.entry(address).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionPermit {
            limiter: self.clone(),
            address,
        })
    }
}

/// Middleware on Engine.IO requests: a handshake (no `sid`) takes a place under the cap for
/// its client address or is refused with 429; its permit goes into the request, which the
/// session keeps.
pub async fn count_handshakes(
    State(limiter): State<Arc<ConnectionLimiter>>,
    mut request: Request,
    next: Next,
) -> Response {
    let handshake = request.uri().path().starts_with("/socket.io")
        && !request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("sid=")));
    if handshake {
        let (parts, body) = request.into_parts();
        let address = limiter.client_address(&parts);
        request = Request::from_parts(parts, body);
        if let Some(address) = address {
            match limiter.acquire(address) {
                Some(permit) => {
                    request.extensions_mut().insert(Arc::new(permit));
                }
                None => {
                    metrics::counter!(crate::metrics::CONNECTION_REFUSALS).increment(1);
                    tracing::debug!(%address, "too many connections from one address");
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        axum::Json(serde_json::json!({
                            "code": "rate_limited",
                            "message": "too many connections from your address",
                        })),
                    )
                        .into_response();
                }
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(peer: &str, xff: Option<&str>) -> Parts {
        let mut builder = Request::builder();
        if let Some(xff) = xff {
            builder = builder.header("x-forwarded-for", xff);
        }
        let (mut parts, ()) = builder.body(()).unwrap_or_default().into_parts();
        parts.extensions.insert(ConnectInfo(
            peer.parse::<SocketAddr>()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        ));
        parts
    }

    #[test]
    fn only_trusted_proxies_may_name_the_client() {
        let limiter = ConnectionLimiter::new(2, &["127.0.0.1".into()]);
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(
            limiter.client_address(&parts("127.0.0.1:5000", Some("1.2.3.4, 10.0.0.9"))),
            ip("10.0.0.9")
        );
        assert_eq!(
            limiter.client_address(&parts("127.0.0.1:5000", None)),
            ip("127.0.0.1")
        );
        assert_eq!(
            limiter.client_address(&parts("8.8.8.8:5000", Some("10.0.0.9"))),
            ip("8.8.8.8")
        );
    }

    #[test]
    fn the_cap_counts_live_connections_per_address() {
        let limiter = Arc::new(ConnectionLimiter::new(2, &[]));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limiter.acquire(a);
        let second = limiter.acquire(a);
        assert!(first.is_some() && second.is_some());
        assert!(
            limiter.acquire(a).is_none(),
            "a third from the same address"
        );
        assert!(
            limiter.acquire(b).is_some(),
            "other addresses are not affected"
        );
        drop(first);
        assert!(
            limiter.acquire(a).is_some(),
            "a closed connection frees its place"
        );
        let unlimited = Arc::new(ConnectionLimiter::new(0, &[]));
        let permits: Vec<_> = (0..1000).filter_map(|_| unlimited.acquire(a)).collect();
        assert_eq!(permits.len(), 1000);
    }
}
