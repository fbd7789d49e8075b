//! The cap on connections per client address, and how a client's address is told: the TCP
//! peer, or — when the peer is a trusted proxy (the load balancer) — the address the proxy
//! appended to `X-Forwarded-For`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;

/// Counts live connections per client address.
pub struct ConnectionLimiter {
    /// Most connections per address; 0 means no cap.
    max: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpAddr>,
    live: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it (with the socket's session) frees its place.
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

    /// The client's address from the handshake request, if known.
    pub fn client_address(&self, request: &Parts) -> Option<IpAddr> {
        let peer = request.extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip();
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let forwarded = request
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .next_back();
        Some(forwarded.unwrap_or(peer))
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
