//! The one error type of client events, and how it reaches the client: as the ack
//! `{ ok: false, error: { code, message } }`, or as an `error` event when there was no ack.

use chatify_shared::wire::{ErrorBody, ErrorCode};
use serde::Serialize;

use crate::answer::Answer;

/// A refused or failed client event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
}

impl ChatError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidPayload, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn not_in_room(room: &str) -> Self {
        Self::new(
            ErrorCode::NotInRoom,
            format!("you have not joined the room {room:?}"),
        )
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// `{ ok: true, ...fields }`.
#[derive(Serialize)]
struct OkAck<T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    fields: T,
}

/// `{ ok: false, error }`.
#[derive(Serialize)]
struct ErrAck {
    ok: bool,
    error: ErrorBody,
}

/// An empty success body: the ack is just `{ ok: true }`.
#[derive(Serialize)]
pub struct Empty {}

/// Sends the outcome of `event` to the client: the ack if it asked for one, else an `error`
/// event on failure. Server-side failures are logged as warnings, client mistakes at debug.
pub fn reply<T: Serialize>(answer: Answer, event: &'static str, result: Result<T, ChatError>) {
    if let Err(e) = &result {
        metrics::counter!(crate::metrics::EVENT_ERRORS, "event" => event, "code" => e.code.as_str())
            .increment(1);
        if e.code.is_client_error() {
            tracing::debug!(socket_id = %answer.socket_id(), event, code = e.code.as_str(), error = %e.message, "event refused");
        } else {
            tracing::warn!(socket_id = %answer.socket_id(), event, code = e.code.as_str(), error = %e.message, "event failed");
        }
    }
    match (result, answer.wants_ack()) {
        (Ok(fields), true) => answer.ack(event, &OkAck { ok: true, fields }),
        (Err(e), true) => answer.ack(
            event,
            &ErrAck {
                ok: false,
                error: e.body(),
            },
        ),
        (Ok(_), false) => {}
        (Err(e), false) => answer.error_event(event, &e.body()),
    }
}
