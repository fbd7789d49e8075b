//! Per-socket state, and the extractor that takes each event's place in the socket's turns
//! (see [`crate::turns`]).

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::Arc;

use chatify_shared::config::Limits;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::TryData;
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;

use crate::answer::Answer;
use crate::auth::Identity;
use crate::connections::ConnectionPermit;
use crate::registry::SocketRooms;
use crate::turns::{Sequencer, Ticket};

/// What the gateway knows about one connected socket.
pub struct Session {
    /// Orders this socket's events.
    pub sequencer: Arc<Sequencer>,
    /// Who the auth token says this is, when auth is on.
    pub identity: Option<Identity>,
    /// This connection's id in member lists: the user's id with auth, else random. Never the
    /// session id, which would let others act as this connection.
    pub member_id: String,
    /// Rooms joined, with the name used in each; changed only through [`crate::registry`].
    pub rooms: SocketRooms,
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
        let member_id = match &identity {
            Some(identity) => identity.user_id.clone(),
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        Self {
            sequencer: Arc::new(Sequencer::default()),
            identity,
            member_id,
            rooms: SocketRooms::default(),
            sends: RateLimiter::direct(quota(limits.messages_per_second, limits.message_burst)),
            joins: RateLimiter::direct(quota(limits.joins_per_second, limits.join_burst)),
            _permit: permit,
        }
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
}
