//! What every handler can reach: limits, NATS, the room registry and the authenticator.

use std::ops::Deref;
use std::sync::Arc;

use chatify_shared::config::Limits;

use crate::access::Access;
use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::connections::ConnectionLimiter;
use crate::expiry::Expiry;
use crate::lifecycle::Lifecycle;
use crate::reads::Reads;
use crate::registry::Rooms;
use crate::users::Users;

/// Shared gateway state; cheap to clone.
#[derive(Clone)]
pub struct App(Arc<AppInner>);

pub struct AppInner {
    /// Client input limits.
    pub limits: Limits,
    /// Message storage and history requests.
    pub bus: Bus,
    /// Local room membership and cross-gateway presence and fan-out.
    pub rooms: Arc<Rooms>,
    /// Token checks, when auth is on.
    pub auth: Option<Authenticator>,
    /// Disconnects connections whose tokens expire.
    pub expiry: Arc<Expiry>,
    /// Who may use which room.
    pub access: Access,
    /// Users with connections here, for `dm` and `read` notifications.
    pub users: Users,
    /// Read markers.
    pub reads: Reads,
    /// The per-address connection cap.
    pub connections: Arc<ConnectionLimiter>,
    /// Refuses new events and tracks running ones during shutdown.
    pub lifecycle: Lifecycle,
}

impl App {
    pub fn new(inner: AppInner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}
