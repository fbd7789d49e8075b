//! What the messages stream holds: messages, and changes to them. A change is stored on its
//! room's store subject like a message, with the [`CHANGE_HEADER`] header set to `1` (a message
//! has no such header), so it has its place in the room's one order. Everything here that reads
//! the stream (the writer, the unwritten tail, the dead letters) tells the two apart by that
//! header.

use std::collections::HashMap;

use async_nats::HeaderMap;
use chatify_shared::changes::{CHANGE_HEADER, MessageState, StoredChange};
use chatify_shared::wire::{ChatMessage, StoredMessage};
use uuid::Uuid;

/// The value of [`CHANGE_HEADER`] on a change.
pub const CHANGE_HEADER_VALUE: &str = "1";

/// Whether a stream message with these headers is a change.
pub fn is_change(headers: Option<&HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(CHANGE_HEADER))
        .is_some_and(|v| v.as_str() == CHANGE_HEADER_VALUE)
}

/// One event of the messages stream, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A message, with the id its sequence gives it.
    Message(ChatMessage),
    /// A change, stored at `sequence`.
    Change { sequence: u64, change: StoredChange },
}

impl StreamEvent {
    /// The event stored at `sequence` with `payload`, a change if `is_change` (see
    /// [`is_change`]).
    pub fn decode(
        is_change: bool,
        sequence: u64,
        payload: &[u8],
    ) -> Result<Self, serde_json::Error> {
        if is_change {
            Ok(Self::Change {
                sequence,
                change: serde_json::from_slice(payload)?,
            })
        } else {
            let stored: StoredMessage = serde_json::from_slice(payload)?;
            Ok(Self::Message(stored.into_message(sequence)))
        }
    }

    /// Its place in the stream.
    pub fn sequence(&self) -> u64 {
        match self {
            Self::Message(m) => m.sequence(),
            Self::Change { sequence, .. } => *sequence,
        }
    }

    pub fn is_change(&self) -> bool {
        matches!(self, Self::Change { .. })
    }

    /// The room it belongs to.
    pub fn room(&self) -> &str {
        match self {
            Self::Message(m) => &m.room,
            Self::Change { change, .. } => &change.room,
        }
    }
}

/// Applies, in order, every change among `events` to the state in `states` it targets (by id);
/// changes of messages not in `states` are left out. A change the state already holds is
/// applied once ([`MessageState::apply`]).
pub fn apply_changes(states: &mut [MessageState], events: &[StreamEvent]) {
    if !events.iter().any(StreamEvent::is_change) {
        return;
    }
    let by_id: HashMap<Uuid, usize> = states
        .iter()
        .enumerate()
        .map(|(i, s)| (s.message.id, i))
        .collect();
    for event in events {
        if let StreamEvent::Change { sequence, change } = event
            && let Some(state) = by_id.get(&change.target).and_then(|&i| states.get_mut(i))
            && state.message.room == change.room
        {
            state.apply(*sequence, change);
        }
    }
}

#[cfg(test)]
mod tests {
    use chatify_shared::changes::{Actor, Change};

    use super::*;

    fn change(target: Uuid, room: &str) -> StoredChange {
        StoredChange {
            room: room.into(),
            target,
            change: Change::Edit {
                message: "edited".into(),
            },
            at: 5,
            by: Actor {
                member_id: "m".into(),
                username: "u".into(),
                user_id: None,
            },
        }
    }

    #[test]
    fn the_header_tells_changes_from_messages() -> Result<(), serde_json::Error> {
        let mut headers = HeaderMap::new();
        assert!(!is_change(None));
        assert!(!is_change(Some(&headers)));
        headers.insert(CHANGE_HEADER, "0");
        assert!(!is_change(Some(&headers)));
        headers.insert(CHANGE_HEADER, CHANGE_HEADER_VALUE);
        assert!(is_change(Some(&headers)));

        let message = StoredMessage {
            room: "r".into(),
            username: "u".into(),
            message: "hi".into(),
            created_time: 1_700_000_000_000,
            ..StoredMessage::default()
        };
        let decoded = StreamEvent::decode(false, 7, &serde_json::to_vec(&message)?)?;
        assert_eq!(decoded, StreamEvent::Message(message.into_message(7)));
        let stored = change(chatify_shared::id::message_id(1, 3), "r");
        let decoded = StreamEvent::decode(true, 8, &serde_json::to_vec(&stored)?)?;
        assert_eq!(decoded.sequence(), 8);
        assert_eq!(
            decoded,
            StreamEvent::Change {
                sequence: 8,
                change: stored.clone()
            }
        );
        // A change read as a message (no header) or the reverse is no event.
        assert!(StreamEvent::decode(true, 9, b"{\"room\":\"r\"}").is_err());
        assert!(StreamEvent::decode(false, 9, &serde_json::to_vec(&stored)?).is_err());
        Ok(())
    }

    #[test]
    fn changes_apply_once_to_the_states_of_their_room() {
        let m = StoredMessage {
            room: "r".into(),
            username: "u".into(),
            message: "hi".into(),
            created_time: 1,
            ..StoredMessage::default()
        }
        .into_message(3);
        let mut states = vec![MessageState::new(m.clone())];
        let events = vec![
            StreamEvent::Change {
                sequence: 4,
                change: change(m.id, "r"),
            },
            StreamEvent::Change {
                sequence: 5,
                change: change(m.id, "another room"),
            },
        ];
        apply_changes(&mut states, &events);
        apply_changes(&mut states, &events);
        assert_eq!(states[0].message.message, "edited");
        assert_eq!(
            states[0].version, 4,
            "the other room's change is not applied"
        );
    }
}
