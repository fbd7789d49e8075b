//! How the persister keeps messages in HarperDB: what everything that writes or reads its table
//! must agree on. The persister writes the table and answers history from it; the load
//! generator seeds rooms into it, reads them back, and measures HarperDB's write ceiling on the
//! same records.
//!
//! The table has one index, its primary key `pk = "<room token>|<stream sequence, 16 hex
//! digits>"`. Room tokens hold no `|` (see [`RoomToken`]), so keys sort by room, then by the
//! room's one order (the stream's, which message ids carry: see [`crate::id`]), and a room's
//! messages between two sequences are one `between` on `pk`. Indexing nothing else keeps writes
//! fast.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::subjects::RoomToken;
use crate::wire::ChatMessage;

/// The table's attributes and their HarperDB types, the primary key first.
pub const ATTRIBUTES: [(&str, &str); 6] = [
    ("pk", "String"),
    ("id", "String"),
    ("room", "String"),
    ("username", "String"),
    ("message", "String"),
    ("createdTime", "Float"),
];

/// A message as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The primary key: [`storage_key`] of the message's room and stream sequence.
    pub pk: String,
    /// The rest is the message as clients see it ([`ChatMessage`]), so that a history answer
    /// needs nothing but the record.
    pub id: Uuid,
    pub room: String,
    pub username: String,
    pub message: String,
    #[serde(rename = "createdTime")]
    pub created_time: i64,
}

impl StoredRecord {
    pub fn new(m: &ChatMessage) -> Self {
        Self {
            pk: storage_key(&RoomToken::new(&m.room), m.sequence()),
            id: m.id,
            room: m.room.clone(),
            username: m.username.clone(),
            message: m.message.clone(),
            created_time: m.created_time,
        }
    }

    pub fn into_message(self) -> ChatMessage {
        ChatMessage {
            id: self.id,
            room: self.room,
            username: self.username,
            message: self.message,
            created_time: self.created_time,
        }
    }
}

/// The key of `room`'s message at stream `sequence` (fixed-width hex, so keys sort as the
/// sequences do); also a bound of a range of the room's keys.
pub fn storage_key(room: &RoomToken, sequence: u64) -> String {
    format!("{room}|{sequence:016x}")
}

/// Above every key of `room` and below those of the rooms after it: the upper end of a range
/// of the room's keys (`~` comes after every hex digit).
pub fn room_keys_end(room: &RoomToken) -> String {
    format!("{room}|~")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::StoredMessage;

    #[test]
    fn keys_sort_by_room_then_sequence_and_never_cross_rooms() {
        let a = RoomToken::new("a");
        let ab = RoomToken::new("a.b");
        assert!(storage_key(&a, 9) < storage_key(&a, 10));
        assert!(storage_key(&a, u64::MAX) < room_keys_end(&a));
        for room in [&a, &ab] {
            let key = storage_key(room, 9);
            assert!(storage_key(room, 0) < key && key < room_keys_end(room));
        }
        let other = storage_key(&ab, 9);
        assert!(!(storage_key(&a, 0) < other && other < room_keys_end(&a)));
    }

    #[test]
    fn a_record_is_the_message_under_its_key() -> Result<(), serde_json::Error> {
        let message = StoredMessage {
            room: "a b".into(),
            username: "u".into(),
            message: "hi".into(),
            created_time: 1_700_000_000_000,
        }
        .into_message(0x2a);
        let record = StoredRecord::new(&message);
        assert_eq!(record.pk, "YSBi|000000000000002a");
        let json = serde_json::to_value(&record)?;
        let names: Vec<&str> = ATTRIBUTES.iter().map(|(name, _)| *name).collect();
        let mut fields: Vec<&str> = json
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        fields.sort_unstable();
        let mut expected = names.clone();
        expected.sort_unstable();
        assert_eq!(fields, expected, "the record holds the table's attributes");
        assert_eq!(serde_json::from_value::<StoredRecord>(json)?, record);
        assert_eq!(record.into_message(), message);
        Ok(())
    }
}
