//! Read markers: per room and user, the id of the last message the user read, in a JetStream
//! key-value bucket ([`chatify_shared::subjects::READS_BUCKET`]), so every gateway sees the
//! same and it survives restarts. A marker never moves back: it is moved by compare-and-set on
//! the key's revision, and only to a later message (ids carry their stream sequence).

use async_nats::jetstream::kv::{self, Store};
use chatify_shared::id::sequence_of;
use chatify_shared::subjects::read_marker_key;
use uuid::Uuid;

use crate::error::ChatError;

/// Tries of the compare-and-set before giving up (each lost try means another connection of
/// the same user moved the marker at the same moment).
const TRIES: usize = 5;

/// The read markers.
#[derive(Clone)]
pub struct Reads {
    store: Store,
}

fn unavailable(e: &dyn std::fmt::Display) -> ChatError {
    tracing::warn!(error = %e, "read markers unavailable");
    ChatError::unavailable("read markers are unavailable; try again")
}

impl Reads {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The user's marker in the room, with the key's revision (0: none).
    async fn entry(&self, key: &str) -> Result<(Option<Uuid>, u64), ChatError> {
        match self.store.entry(key).await.map_err(|e| unavailable(&e))? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let id = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| Uuid::parse_str(s).ok());
                Ok((id, entry.revision))
            }
            Some(entry) => Ok((None, entry.revision)),
            None => Ok((None, 0)),
        }
    }

    /// The id of the last message `user_id` read in `room`, if any.
    pub async fn last(&self, room: &str, user_id: &str) -> Result<Option<Uuid>, ChatError> {
        Ok(self.entry(&read_marker_key(room, user_id)).await?.0)
    }

    /// Moves the user's marker in the room to `id` unless it is there or later already.
    /// Returns whether it moved.
    pub async fn mark(&self, room: &str, user_id: &str, id: Uuid) -> Result<bool, ChatError> {
        let key = read_marker_key(room, user_id);
        let sequence = sequence_of(&id).unwrap_or(0);
        for _ in 0..TRIES {
            let (current, revision) = self.entry(&key).await?;
            if current
                .and_then(|c| sequence_of(&c))
                .is_some_and(|c| c >= sequence)
            {
                return Ok(false);
            }
            let value = id.to_string().into_bytes().into();
            match self.store.update(&key, value, revision).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(&e)),
            }
        }
        Err(ChatError::unavailable(
            "the read marker kept changing meanwhile; try again",
        ))
    }
}
