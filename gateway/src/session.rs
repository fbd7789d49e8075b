//! Per-socket state, and the ordering of a socket's events.
//!
//! socketioxide runs each event handler as its own task, so two `send_message` events from one
//! socket could reach NATS out of order. But it extracts handler arguments synchronously, in
//! the order packets arrive. The [`Ordered`] extractor takes a numbered ticket at that moment,
//! and each handler waits for its ticket's turn before doing anything: one socket's events run
//! one at a time, in the order the socket sent them, while different sockets run in parallel.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chatify_shared::config::Limits;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::TryData;
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use tokio::sync::Notify;

use crate::answer::Answer;
use crate::auth::Identity;
use crate::connections::ConnectionPermit;

/// Hands out turns in arrival order.
pub struct Sequencer {
    /// Number of the next ticket to hand out.
    next: AtomicU64,
    /// Number of the ticket whose turn it is.
    serving: AtomicU64,
    /// Wakes the waiting tickets when `serving` moves on. (A `watch` channel did both jobs in
    /// 300 bytes a socket, most of them its eight notifiers.)
    moved: Notify,
}

impl Default for Sequencer {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            serving: AtomicU64::new(0),
            moved: Notify::new(),
        }
    }
}

impl Sequencer {
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket {
            number: self.next.fetch_add(1, Ordering::SeqCst),
            sequencer: self.clone(),
        }
    }
}

/// A place in a socket's queue of events.
pub struct Ticket {
    number: u64,
    sequencer: Arc<Sequencer>,
}

impl Ticket {
    /// Waits until every earlier event of the socket has finished.
    pub async fn turn(self) -> Turn {
        loop {
            let moved = self.sequencer.moved.notified();
            let mut moved = std::pin::pin!(moved);
            // Registered before the check, so a move between the check and the wait wakes it.
            moved.as_mut().enable();
            if self.sequencer.serving.load(Ordering::Acquire) == self.number {
                break;
            }
            moved.await;
        }
        Turn {
            sequencer: self.sequencer,
        }
    }
}

/// While held, this socket's other events wait. Dropping it (even by a panic) lets the next run.
pub struct Turn {
    sequencer: Arc<Sequencer>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.sequencer.serving.fetch_add(1, Ordering::Release);
        self.sequencer.moved.notify_waiters();
    }
}

/// What the gateway knows about one connected socket.
pub struct Session {
    /// Orders this socket's events.
    pub sequencer: Arc<Sequencer>,
    /// Who the auth token says this is, when auth is on.
    pub identity: Option<Identity>,
    /// Rooms joined, with the name used in each. Only this socket's (serialized) events touch it.
    /// A list, not a map: a socket is in a few rooms (at most `limits.rooms_per_socket`), and a
    /// map's first allocation (four buckets) is four times a one-room list's.
    rooms: Mutex<Vec<(String, String)>>,
    /// `send_message` rate limit.
    sends: DefaultDirectRateLimiter,
    /// `join_room` rate limit.
    joins: DefaultDirectRateLimiter,
    /// This connection's place under the per-address cap, freed with the session.
    _permit: Option<ConnectionPermit>,
}

impl Session {
    pub fn new(
        identity: Option<Identity>,
        limits: &Limits,
        permit: Option<ConnectionPermit>,
    ) -> Self {
        let quota = |rate: u32, burst: u32| {
            Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        Self {
            sequencer: Arc::new(Sequencer::default()),
            identity,
            rooms: Mutex::new(Vec::new()),
            sends: RateLimiter::direct(quota(limits.messages_per_second, limits.message_burst)),
            joins: RateLimiter::direct(quota(limits.joins_per_second, limits.join_burst)),
            _permit: permit,
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The name this socket joined `room` with, if it is in it.
    pub fn username_in(&self, room: &str) -> Option<String> {
        self.rooms()
            .iter()
            .find(|(name, _)| name == room)
            .map(|(_, username)| username.clone())
    }

    pub fn room_count(&self) -> usize {
        self.rooms().len()
    }

    pub fn add_room(&self, room: &str, username: &str) {
        let mut rooms = self.rooms();
        match rooms.iter_mut().find(|(name, _)| name == room) {
            Some((_, name_used)) => username.clone_into(name_used),
            None => rooms.push((room.to_owned(), username.to_owned())),
        }
    }

    pub fn remove_room(&self, room: &str) -> Option<String> {
        let mut rooms = self.rooms();
        let at = rooms.iter().position(|(name, _)| name == room)?;
        Some(rooms.swap_remove(at).1)
    }

    /// Every room, emptying the list (on disconnect).
    pub fn take_rooms(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.rooms())
    }

    /// Whether one more `send_message` fits the rate limit now (and counts it if so).
    pub fn allow_send(&self) -> bool {
        self.sends.check().is_ok()
    }

    /// Whether one more `join_room` of a new room fits the rate limit now.
    pub fn allow_join(&self) -> bool {
        self.joins.check().is_ok()
    }
}

/// The last argument of every event handler: the payload (or why it could not be decoded),
/// how to answer it, and the socket's ticket for this event.
pub struct Ordered {
    pub payload: Result<Value, String>,
    pub answer: Answer,
    pub session: Option<Arc<Session>>,
    pub ticket: Option<Ticket>,
}

impl FromMessageParts<LocalAdapter> for Ordered {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<LocalAdapter>>,
        v: &mut socketioxide_core::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        let TryData(payload) = TryData::<Value>::from_message_parts(s, v, ack_id)?;
        let session = s.extensions.get::<Arc<Session>>();
        let ticket = session.as_ref().map(|s| s.sequencer.ticket());
        Ok(Self {
            payload: payload.map_err(|e| e.to_string()),
            answer: Answer::new(s.clone(), *ack_id),
            session,
            ticket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn turns_run_in_ticket_order_whatever_order_tasks_start_in() {
        let sequencer = Arc::new(Sequencer::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..50).map(|_| sequencer.ticket()).collect();
        let mut tasks = Vec::new();
        // Start the tasks in reverse order: the last ticket's task is spawned first.
        for (i, ticket) in tickets.into_iter().enumerate().rev() {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let _turn = ticket.turn().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                log.lock().map(|mut l| l.push(i)).ok();
            }));
        }
        for t in tasks {
            t.await.ok();
        }
        let order = log.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_turn_still_lets_the_next_one_run() {
        let sequencer = Arc::new(Sequencer::default());
        let first = sequencer.ticket();
        let second = sequencer.ticket();
        let crashed = tokio::spawn(async move {
            let _turn = first.turn().await;
            panic!("handler bug");
        });
        assert!(crashed.await.is_err());
        let waited = tokio::time::timeout(Duration::from_secs(1), second.turn()).await;
        assert!(
            waited.is_ok(),
            "the second event was blocked by the first one's panic"
        );
    }

    #[test]
    fn sends_are_limited_to_the_burst_then_the_rate() {
        let limits = Limits {
            messages_per_second: 20,
            message_burst: 40,
            ..Limits::default()
        };
        let session = Session::new(None, &limits, None);
        let allowed = (0..100).filter(|_| session.allow_send()).count();
        assert!(
            (40..=42).contains(&allowed),
            "allowed {allowed} of an instant burst of 100"
        );
    }

    #[test]
    fn rooms_keep_the_name_used_in_each() {
        let session = Session::new(None, &Limits::default(), None);
        session.add_room("a.b", "ann");
        session.add_room("*", "bob");
        session.add_room("a.b", "ann2");
        assert_eq!(session.room_count(), 2, "joining again replaces the name");
        assert_eq!(session.username_in("a.b").as_deref(), Some("ann2"));
        assert_eq!(session.username_in("*").as_deref(), Some("bob"));
        assert_eq!(session.username_in("a"), None);

        assert_eq!(session.remove_room("a.b").as_deref(), Some("ann2"));
        assert_eq!(session.remove_room("a.b"), None);
        session.add_room(">", "cy");
        let mut rooms = session.take_rooms();
        rooms.sort();
        assert_eq!(
            rooms,
            [
                ("*".to_owned(), "bob".to_owned()),
                (">".to_owned(), "cy".to_owned())
            ]
        );
        assert_eq!(session.room_count(), 0);
    }
}
