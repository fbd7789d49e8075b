//! The gateway's use of NATS for messages and history: store a message in JetStream (which
//! republishes it to the room); ask the persisters for history.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use chatify_shared::changes::{CHANGE_HEADER, StoredChange};
use chatify_shared::subjects::{HISTORY_SUBJECT, RoomToken};
use chatify_shared::wire::{ChatMessage, HistoryPage, HistoryQuery, StoredMessage, TypingEvent};
use sha2::{Digest, Sha256};

use crate::error::ChatError;

/// Why an event was not stored in JetStream.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("could not encode it: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// What storing a message came to: the message as stored, with its id.
#[derive(Debug)]
pub enum Stored {
    /// Stored now; the stream republishes it to the room.
    New(ChatMessage),
    /// The same retry key was stored before: this is the first message, not delivered again.
    Duplicate(ChatMessage),
}

/// NATS handles for messages and history.
#[derive(Clone)]
pub struct Bus {
    pub nats: async_nats::Client,
    js: jetstream::Context,
    /// The messages stream, to read a first message back when a retry is a duplicate.
    messages: Stream,
    request_timeout: Duration,
}

/// The `Nats-Msg-Id` of a retryable message: one user's `clientId` in one room. Hashed so any
/// client text makes a fixed-size header value.
pub fn dedup_key(user_scope: &str, room: &str, client_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [user_scope, room, client_id] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Bus {
    pub fn new(nats: async_nats::Client, messages: Stream, request_timeout: Duration) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(request_timeout)
            .build(nats.clone());
        Self {
            nats,
            js,
            messages,
            request_timeout,
        }
    }

    /// Stores `message` in JetStream (deduplicated by `dedup`). Returns only after JetStream
    /// confirmed, with the id the stream sequence gives it. Delivery is not ours to do: the
    /// stream republishes what it stored to the room, in its order, and a duplicate is not
    /// stored, so a retry is never delivered twice, and a message stored while its sender's
    /// wait timed out is still delivered.
    pub async fn publish_message(
        &self,
        message: StoredMessage,
        dedup: Option<String>,
    ) -> Result<Stored, ChatError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "could not store a message");
            ChatError::unavailable("the message could not be stored; try again")
        };
        let mut headers = HeaderMap::new();
        if let Some(key) = &dedup {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, key.as_str());
        }
        let ack = self
            .store(&message.room, headers, &message)
            .await
            .map_err(|e| unavailable(&e))?;
        if ack.duplicate {
            let first = self
                .messages
                .get_raw_message(ack.sequence)
                .await
                .map_err(|e| unavailable(&e))?;
            let first: StoredMessage =
                serde_json::from_slice(&first.payload).map_err(|e| unavailable(&e))?;
            return Ok(Stored::Duplicate(first.into_message(ack.sequence)));
        }
        Ok(Stored::New(message.into_message(ack.sequence)))
    }

    /// Stores a change to a message in JetStream, on its room's subject (so it takes its
    /// place in the room's order), marked with [`CHANGE_HEADER`]. Returns its stream sequence
    /// once JetStream confirmed; the stream republishes it to the room.
    pub async fn publish_change(&self, change: &StoredChange) -> Result<u64, ChatError> {
        let mut headers = HeaderMap::new();
        headers.insert(CHANGE_HEADER, "1");
        let ack = self
            .store(&change.room, headers, change)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "could not store a change");
                ChatError::unavailable("the change could not be stored; try again")
            })?;
        Ok(ack.sequence)
    }

    /// Publishes `event` as JSON with `headers` on `room`'s store subject and waits until
    /// JetStream confirmed it (what a message and a change have in common).
    async fn store(
        &self,
        room: &str,
        headers: HeaderMap,
        event: &impl serde::Serialize,
    ) -> Result<PublishAck, StoreError> {
        let payload = Bytes::from(serde_json::to_vec(event)?);
        let ack = self
            .js
            .publish_with_headers(RoomToken::new(room).store_subject(), headers, payload)
            .await?
            .await?;
        Ok(ack)
    }

    /// How long a request to NATS may take.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub async fn publish_typing(&self, event: &TypingEvent) -> Result<(), ChatError> {
        let token = RoomToken::new(&event.typing.room);
        let payload =
            serde_json::to_vec(event).map_err(|e| ChatError::unavailable(e.to_string()))?;
        self.nats
            .publish(token.typing_subject(), payload.into())
            .await
            .map_err(|_| ChatError::unavailable("typing could not be sent; try again"))
    }

    /// Asks a persister for history; `unavailable` when none answers in time.
    pub async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, ChatError> {
        let started = Instant::now();
        let result = self.request_history(query).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::histogram!(crate::metrics::HISTORY_DURATION, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn request_history(&self, query: &HistoryQuery) -> Result<HistoryPage, ChatError> {
        let payload =
            serde_json::to_vec(query).map_err(|e| ChatError::unavailable(e.to_string()))?;
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(self.request_timeout));
        let answer = self
            .nats
            .send_request(HISTORY_SUBJECT, request)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "history request failed");
                ChatError::unavailable("message history is unavailable; try again")
            })?;
        if let Some(headers) = &answer.headers
            && let Some(code) = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
        {
            let status = headers
                .get(async_nats::service::NATS_SERVICE_ERROR)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            return Err(if code.as_str() == "400" {
                ChatError::invalid(status)
            } else {
                tracing::warn!(%status, "history service error");
                ChatError::unavailable("message history is unavailable; try again")
            });
        }
        serde_json::from_slice(&answer.payload).map_err(|e| {
            tracing::warn!(error = %e, "undecodable history answer");
            ChatError::unavailable("message history is unavailable; try again")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::dedup_key;

    #[test]
    fn dedup_keys_separate_users_rooms_and_ids() {
        let k = dedup_key("anon:ann", "room", "c1");
        assert_eq!(k.len(), 64);
        assert_eq!(k, dedup_key("anon:ann", "room", "c1"));
        assert_ne!(k, dedup_key("anon:bob", "room", "c1"));
        assert_ne!(k, dedup_key("anon:ann", "room2", "c1"));
        assert_ne!(k, dedup_key("anon:ann", "room", "c2"));
        // Field boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(dedup_key("ab", "c", "x"), dedup_key("a", "bc", "x"));
    }
}
