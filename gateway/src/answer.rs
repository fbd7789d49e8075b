//! Where an event's outcome goes: the client's ack callback, or an `error` event when it sent
//! none and the event failed.
//!
//! An answer never competes with deliveries to be dropped: when the socket's outgoing queue is
//! full (the client stopped reading), the answer waits for room in it and is sent as soon as the
//! client reads again. Deliveries to a full queue are dropped (the client recovers them with
//! `since`), but a dropped ack would leave the client not knowing whether its message was
//! stored. The wait ends when the socket closes, which Engine.IO's heartbeat does to a socket
//! whose queue stays full at its next ping, or after [`GIVE_UP_AFTER`]; both are counted in
//! `chatify_gateway_answer_drops_total`, and a client learns of the first one by its
//! disconnection (socket.io-client fails pending acks with "socket has been disconnected").

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::AckSender;
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError};

use crate::metrics as m;
use crate::session::{Session, WaitingAnswer};

/// How often a waiting answer tries the queue again.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// Longest wait for room in the queue. The heartbeat closes a socket that stays full well before
/// (at its next ping: every `gateway.ping_interval_ms`, 25 s by default); this only bounds a
/// socket that keeps reading a little but never enough.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// How one event is answered: through the ack callback the client sent with it, if any.
pub struct Answer {
    /// The socket the event came from (kept, not borrowed: a waiting answer outlives the handler).
    socket: Arc<Socket<LocalAdapter>>,
    /// The event's ack id; `None` when the client sent no callback.
    ack_id: Option<i64>,
}

/// What an answer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The ack of the event.
    Ack,
    /// An `error` event (a failure of an event sent without a callback).
    ErrorEvent,
}

impl Answer {
    pub fn new(socket: Arc<Socket<LocalAdapter>>, ack_id: Option<i64>) -> Self {
        Self { socket, ack_id }
    }

    /// The socket the answer goes to (for log lines).
    pub fn socket_id(&self) -> socketioxide::socket::Sid {
        self.socket.id
    }

    pub fn wants_ack(&self) -> bool {
        self.ack_id.is_some()
    }

    /// Sends `value` as the event's ack (a no-op when the client asked for none).
    pub fn ack<T: Serialize + ?Sized>(self, event: &'static str, value: &T) {
        self.send(Kind::Ack, event, value);
    }

    /// Sends `value` as an `error` event.
    pub fn error_event<T: Serialize + ?Sized>(self, event: &'static str, value: &T) {
        self.send(Kind::ErrorEvent, event, value);
    }

    /// Sends at once; only an answer that has to wait is encoded into a [`Value`] to keep.
    fn send<T: Serialize + ?Sized>(self, kind: Kind, event: &'static str, value: &T) {
        match self.try_send(kind, value) {
            Ok(()) => {}
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                let session = self.socket.extensions.get::<Arc<Session>>();
                let Some(place) = session.as_ref().and_then(Session::wait_for_room) else {
                    return self.give_up_on_socket(event);
                };
                match serde_json::to_value(value) {
                    Ok(kept) => {
                        metrics::counter!(m::ANSWERS_DELAYED, "event" => event).increment(1);
                        tokio::spawn(self.wait_and_send(kind, event, kept, place));
                    }
                    Err(e) => self.dropped(event, &e),
                }
            }
            Err(e) => self.dropped(event, &e),
        }
    }

    /// Tries again every [`RETRY_EVERY`] until the answer fits, the socket closes, or
    /// [`GIVE_UP_AFTER`].
    async fn wait_and_send(
        self,
        kind: Kind,
        event: &'static str,
        value: Value,
        _place: WaitingAnswer,
    ) {
        let deadline = tokio::time::Instant::now() + GIVE_UP_AFTER;
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            if !self.socket.connected() {
                return self.dropped(event, &"the socket closed while its queue was full");
            }
            match self.try_send(kind, &value) {
                Ok(()) => return,
                Err(SendError::Socket(SocketError::InternalChannelFull))
                    if tokio::time::Instant::now() < deadline => {}
                Err(e) => return self.dropped(event, &e),
            }
        }
    }

    fn try_send<T: Serialize + ?Sized>(&self, kind: Kind, value: &T) -> Result<(), SendError> {
        match kind {
            Kind::Ack => self.ack_sender().send(value),
            Kind::ErrorEvent => self.socket.emit("error", value),
        }
    }

    /// A fresh [`AckSender`] for the event: socketioxide's is consumed by its first try, and
    /// the extractor is the public way to make another for the same ack id.
    fn ack_sender(&self) -> AckSender {
        // The extractor reads neither the payload nor anything else of the event.
        let mut unused = socketioxide_core::Value::Bytes(bytes::Bytes::new());
        let made: Result<AckSender, Infallible> =
            AckSender::from_message_parts(&self.socket, &mut unused, &self.ack_id);
        match made {
            Ok(sender) => sender,
            Err(never) => match never {},
        }
    }

    /// The socket has `limits.answers_waiting_per_socket` answers waiting already: it does not
    /// read, so it is disconnected rather than kept with a growing backlog (its rooms hear it
    /// left; a client that reads again reconnects and recovers with `since`).
    fn give_up_on_socket(&self, event: &'static str) {
        metrics::counter!(m::SLOW_CLIENT_DISCONNECTS).increment(1);
        self.dropped(
            event,
            &"the socket does not read its answers; disconnecting it",
        );
        if let Err(e) = self.socket.clone().disconnect() {
            tracing::debug!(socket_id = %self.socket.id, error = %e, "the slow socket was gone already");
        }
    }

    fn dropped(&self, event: &'static str, error: &dyn std::fmt::Display) {
        metrics::counter!(m::ANSWER_DROPS, "event" => event).increment(1);
        tracing::warn!(socket_id = %self.socket.id, event, error = %error, "could not answer the client");
    }
}
