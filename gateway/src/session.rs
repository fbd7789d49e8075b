//! Per-socket state, and the extractor that takes each event's place in the socket's turns
//! (see [`crate::turns`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chatify_shared::config::Limits;
use chatify_shared::wire::ChatMessage;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::TryData;
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use uuid::Uuid;

use crate::answer::Answer;
use crate::auth::Identity;
use crate::registry::SocketRooms;
use crate::turns::{Sequencer, Ticket};

/// Without auth, how many of its latest messages a connection may still edit or delete (it is
/// their author only while it is connected, and only for these).
pub const SENT_IDS_KEPT: usize = 256;

/// What the gateway knows about one connected socket.
pub struct Session {
    /// Orders this socket's events.
    pub sequencer: Arc<Sequencer>,
    /// Who the auth token says this is, when auth is on.
    pub identity: Option<Identity>,
    /// This connection's id in member lists: the user's id with auth, else random. Never the
    /// session id, which would let others act as this connection.
    pub member_id: String,
    /// When the connection's token expires (seconds since the epoch; never without auth):
    /// the connect token's, or a refreshed one's.
    expires_at: AtomicU64,
    /// What the current token grants (its `rooms` and `roles` claims): the connect token's, or
    /// a refreshed one's.
    grants: Mutex<Grants>,
    /// Rooms joined, with the name used in each; changed only through [`crate::registry`].
    pub rooms: SocketRooms,
    /// `send_message` rate limit.
    sends: DefaultDirectRateLimiter,
    /// `join_room` rate limit.
    joins: DefaultDirectRateLimiter,
    /// `typing` rate limit.
    typings: DefaultDirectRateLimiter,
    /// `get_history` rate limit.
    histories: DefaultDirectRateLimiter,
    /// `edit_message`, `delete_message`, `react` and `mark_read` rate limit (together).
    changes: DefaultDirectRateLimiter,
    /// Without auth, the ids of the latest messages this connection sent (at most
    /// [`SENT_IDS_KEPT`]): the messages it is the author of. With auth the author is the user.
    sent: Mutex<VecDeque<Uuid>>,
    /// Most events received and not finished (`limits.events_queued_per_socket`).
    queued_max: usize,
    /// Answers waiting for room in the socket's outgoing queue, and the most allowed.
    answers_waiting: AtomicUsize,
    answers_waiting_max: usize,
}

impl Session {
    pub fn new(identity: Option<Identity>, limits: &Limits) -> Self {
        let quota = |rate: u32, burst: u32| {
            Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        let member_id = match &identity {
            Some(identity) => identity.user_id.clone(),
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let expires_at = identity.as_ref().map_or(u64::MAX, |i| i.expires_at);
        let grants = identity.as_ref().map(Grants::from).unwrap_or_default();
        Self {
            sequencer: Arc::new(Sequencer::default()),
            identity,
            member_id,
            expires_at: AtomicU64::new(expires_at),
            grants: Mutex::new(grants),
            rooms: SocketRooms::default(),
            sends: RateLimiter::direct(quota(limits.messages_per_second, limits.message_burst)),
            joins: RateLimiter::direct(quota(limits.joins_per_second, limits.join_burst)),
            typings: RateLimiter::direct(quota(limits.typing_per_second, limits.typing_burst)),
            histories: RateLimiter::direct(quota(limits.history_per_second, limits.history_burst)),
            changes: RateLimiter::direct(quota(limits.changes_per_second, limits.changes_burst)),
            sent: Mutex::new(VecDeque::new()),
            queued_max: limits.events_queued_per_socket,
            answers_waiting: AtomicUsize::new(0),
            answers_waiting_max: limits.answers_waiting_per_socket,
        }
    }

    /// When the connection's token expires (seconds since the epoch).
    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// Takes a refreshed token: its expiry and grants from now on; returns the expiry before.
    pub fn refresh(&self, fresh: &Identity) -> u64 {
        *self.grants.lock().unwrap_or_else(PoisonError::into_inner) = Grants::from(fresh);
        self.expires_at.swap(fresh.expires_at, Ordering::Relaxed)
    }

    /// What the current token grants.
    pub fn grants(&self) -> Grants {
        self.grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the connection's token has expired.
    pub fn expired(&self) -> bool {
        jsonwebtoken::get_current_timestamp() >= self.expires_at()
    }

    /// Whether one more `send_message` fits the rate limit now (and counts it if so).
    pub fn allow_send(&self) -> bool {
        self.sends.check().is_ok()
    }

    /// Whether one more `join_room` fits the rate limit now.
    pub fn allow_join(&self) -> bool {
        self.joins.check().is_ok()
    }

    /// Whether one more `get_history` fits the rate limit now.
    pub fn allow_history(&self) -> bool {
        self.histories.check().is_ok()
    }

    /// Whether one more change (`edit_message`, `delete_message`, `react`, `mark_read`) fits
    /// the rate limit now.
    pub fn allow_change(&self) -> bool {
        self.changes.check().is_ok()
    }

    /// Records a message this connection sent (without auth: what makes it the author).
    pub fn sent(&self, id: Uuid) {
        if self.identity.is_some() {
            return;
        }
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if sent.len() >= SENT_IDS_KEPT {
            sent.pop_front();
        }
        sent.push_back(id);
    }

    /// Whether this connection is the author of `message`: with auth, the user who sent it;
    /// without, this connection, among its latest [`SENT_IDS_KEPT`] messages.
    pub fn is_author(&self, message: &ChatMessage) -> bool {
        match &self.identity {
            Some(identity) => message.user_id.as_deref() == Some(identity.user_id.as_str()),
            None => self
                .sent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&message.id),
        }
    }

    /// Whether one more `typing` fits the rate limit now.
    pub fn allow_typing(&self) -> bool {
        self.typings.check().is_ok()
    }

    /// A place for one more answer waiting for room in the outgoing queue, or `None` when the
    /// socket has its share (it does not read).
    pub fn wait_for_room(self: &Arc<Self>) -> Option<WaitingAnswer> {
        let waiting = self.answers_waiting.fetch_add(1, Ordering::Relaxed);
        if waiting >= self.answers_waiting_max {
            self.answers_waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(WaitingAnswer(self.clone()))
    }
}

/// What a connection's token grants.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// The `rooms` claim (the `token` access policy).
    pub rooms: Arc<[String]>,
    /// The `roles` claim holds `"moderator"`.
    pub moderator: bool,
}

impl From<&Identity> for Grants {
    fn from(identity: &Identity) -> Self {
        Self {
            rooms: identity.rooms.clone(),
            moderator: identity.moderator,
        }
    }
}

/// One answer waiting for room in a socket's outgoing queue; dropping it frees its place.
pub struct WaitingAnswer(Arc<Session>);

impl Drop for WaitingAnswer {
    fn drop(&mut self) {
        self.0.answers_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The last argument of every event handler: the payload (or why it could not be decoded),
/// how to answer it, and the socket's ticket for this event.
pub struct Ordered {
    /// Which client event this is ([`crate::handlers::EVENTS`]); `None` for any other name,
    /// which is neither decoded nor queued.
    pub name: Option<&'static str>,
    pub payload: Result<Value, String>,
    pub answer: Answer,
    pub session: Option<Arc<Session>>,
    pub ticket: Option<Ticket>,
    /// Set when the socket already had `limits.events_queued_per_socket` events unfinished:
    /// this one is refused without being decoded or queued.
    pub overflow: bool,
}

impl FromMessageParts<LocalAdapter> for Ordered {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<LocalAdapter>>,
        v: &mut socketioxide_core::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        let session = s.extensions.get::<Arc<Session>>();
        let name = socketioxide::extract::Event::from_message_parts(s, v, ack_id)
            .ok()
            .and_then(|event| {
                crate::handlers::EVENTS
                    .iter()
                    .copied()
                    .find(|known| *known == event.0)
            });
        let overflow = name.is_some()
            && session
                .as_ref()
                .is_some_and(|s| s.sequencer.queued() >= s.queued_max as u64);
        if name.is_none() || overflow {
            return Ok(Self {
                name,
                payload: Err("not decoded".into()),
                answer: Answer::new(s.clone(), *ack_id),
                session,
                ticket: None,
                overflow,
            });
        }
        let TryData(payload) = TryData::<Value>::from_message_parts(s, v, ack_id)?;
        let ticket = session.as_ref().map(|s| s.sequencer.ticket());
        Ok(Self {
            name,
            overflow,
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

    #[test]
    fn sends_are_limited_to_the_burst_then_the_rate() {
        let limits = Limits {
            messages_per_second: 20,
            message_burst: 40,
            ..Limits::default()
        };
        let session = Session::new(None, &limits);
        let allowed = (0..100).filter(|_| session.allow_send()).count();
        assert!(
            (40..=42).contains(&allowed),
            "allowed {allowed} of an instant burst of 100"
        );
    }
}
