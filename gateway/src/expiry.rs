//! Tokens hold for as long as the connection lives, not only at connect: when a connection's
//! token expires (and was not refreshed), the connection gets an `error` event
//! `{ code: "unauthorized" }` and is disconnected, leaving its rooms with the usual notices.
//!
//! One task for the whole gateway watches every authenticated connection's expiry, in expiry
//! order, so a connection costs an entry in a set, not a timer of its own.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatify_shared::wire::{ErrorBody, ErrorCode};
use socketioxide::SocketIo;
use socketioxide::socket::Sid;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::session::Session;

/// The connections to disconnect when their tokens expire.
#[derive(Default)]
pub struct Expiry {
    /// (expiry in seconds since the epoch, connection), soonest first.
    due: Mutex<BTreeSet<(u64, Sid)>>,
    /// Wakes the watcher when an earlier expiry is added.
    changed: Notify,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Expiry {
    fn due(&self) -> MutexGuard<'_, BTreeSet<(u64, Sid)>> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches `sid` until `expires_at`, replacing the expiry it had (`previous`).
    pub fn watch(&self, sid: Sid, previous: Option<u64>, expires_at: u64) {
        let mut due = self.due();
        if let Some(previous) = previous {
            due.remove(&(previous, sid));
        }
        let soonest = due.first().is_none_or(|(first, _)| expires_at < *first);
        due.insert((expires_at, sid));
        drop(due);
        if soonest {
            self.changed.notify_one();
        }
    }

    /// Stops watching a connection that is gone.
    pub fn forget(&self, sid: Sid, expires_at: u64) {
        self.due().remove(&(expires_at, sid));
    }

    /// The connections whose expiry passed at `now`, taken out of the watch.
    fn take_expired(&self, now: u64) -> Vec<Sid> {
        let mut due = self.due();
        let mut expired = Vec::new();
        while let Some(&(at, sid)) = due.first()
            && at <= now
        {
            due.pop_first();
            expired.push(sid);
        }
        expired
    }

    /// How long until the soonest expiry (a minute at most, so a clock change is noticed).
    fn wait(&self, now: u64) -> Duration {
        let until = self
            .due()
            .first()
            .map_or(60, |(at, _)| at.saturating_sub(now).min(60));
        Duration::from_secs(until)
    }

    /// Disconnects connections as their tokens expire, until `shutdown`.
    pub async fn run(self: Arc<Self>, io: SocketIo, shutdown: CancellationToken) {
        loop {
            let now = now_secs();
            for sid in self.take_expired(now) {
                expire(&io, sid, now);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.changed.notified() => {}
                () = tokio::time::sleep(self.wait(now)) => {}
            }
        }
    }
}

/// Tells a connection its token expired and disconnects it, unless it was refreshed meanwhile.
fn expire(io: &SocketIo, sid: Sid, now: u64) {
    let Some(socket) = io.of("/").and_then(|ns| ns.get_socket(sid)) else {
        return;
    };
    if socket
        .extensions
        .get::<Arc<Session>>()
        .is_some_and(|s| s.expires_at() > now)
    {
        return;
    }
    metrics::counter!(m::TOKEN_EXPIRIES).increment(1);
    let body = ErrorBody {
        code: ErrorCode::Unauthorized,
        message: "your auth token has expired; reconnect with a new one".into(),
    };
    if let Err(e) = socket.emit("error", &body) {
        tracing::debug!(socket_id = %sid, error = %e, "could not tell a connection its token expired");
    }
    tracing::debug!(socket_id = %sid, "token expired; disconnecting");
    if let Err(e) = socket.disconnect() {
        tracing::debug!(socket_id = %sid, error = %e, "an expired connection was gone already");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_expire_in_order_and_a_refresh_moves_them() {
        let expiry = Expiry::default();
        let (a, b, c) = (Sid::new(), Sid::new(), Sid::new());
        expiry.watch(a, None, 100);
        expiry.watch(b, None, 50);
        expiry.watch(c, None, 200);
        // b refreshed: its old expiry no longer counts.
        expiry.watch(b, Some(50), 300);
        assert_eq!(
            expiry.wait(40),
            Duration::from_secs(60),
            "capped at a minute"
        );
        assert_eq!(expiry.wait(90), Duration::from_secs(10));
        assert_eq!(expiry.take_expired(99), vec![]);
        assert_eq!(expiry.take_expired(150), vec![a]);
        expiry.forget(c, 200);
        assert_eq!(expiry.take_expired(250), vec![]);
        assert_eq!(expiry.take_expired(300), vec![b]);
        assert_eq!(expiry.take_expired(u64::MAX), vec![]);
    }
}
