//! How the persister keeps messages in HarperDB: what everything that writes or reads its table
//! must agree on. The persister writes the table and answers history from it; the load
//! generator seeds rooms into it, reads them back, and measures HarperDB's write ceiling on the
//! same records.
//!
//! The table has one index, its primary key `pk = "<room key>|<stream sequence, 16 hex
//! digits>"`. Room keys hold no `|` (see [`RoomKey`]), so keys sort by room, then by the room's
//! one order (the stream's, which message ids carry: see [`crate::id`]), and a room's messages
//! between two sequences are one `between` on `pk`. Indexing nothing else keeps writes fast.
//!
//! A key has a bounded size whatever the room's name: HarperDB 4.7 finds nothing with a
//! `between` whose lower bound is longer than 256 characters (measured: a row is stored and
//! found by its exact key, but a range starting at a longer key is empty), so a room whose
//! token is too long for that is keyed by a digest of its name instead ([`RoomKey`]).
//!
//! Beside it, the change log table ([`changes_table`]) keeps what each change did
//! ([`StoredChangeRecord`]) under the same kind of key, the room's key and the change's stream
//! sequence, so the changes of a room after a cursor are one `between` as well.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::changes::{ChangeEntry, MessageState, Reactors};
use crate::subjects::RoomToken;
use crate::wire::ChatMessage;

/// The table's attributes and their HarperDB types, the primary key first.
pub const ATTRIBUTES: [(&str, &str); 13] = [
    ("pk", "String"),
    ("id", "String"),
    ("room", "String"),
    ("username", "String"),
    ("message", "String"),
    ("createdTime", "Float"),
    ("userId", "String"),
    ("replyTo", "String"),
    ("editedTime", "Float"),
    ("deleted", "Boolean"),
    ("reactions", "Any"),
    ("reactors", "Any"),
    ("version", "Float"),
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
    /// With auth, the author's user id; absent in rows written without auth (and before it
    /// was stored).
    #[serde(rename = "userId", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The rest is what changes made of the message ([`crate::changes`]); absent in rows
    /// nothing changed (and in rows written before messages could change).
    #[serde(rename = "replyTo", default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
    #[serde(
        rename = "editedTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub edited_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reactions: Option<BTreeMap<String, u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reactors: Option<Reactors>,
    /// The stream sequence of the last change applied to the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl StoredRecord {
    /// The row of a message as stored (nothing changed it yet).
    pub fn new(m: &ChatMessage) -> Self {
        Self::from_state(&MessageState::new(m.clone()))
    }

    /// The row of a message in its current state.
    pub fn from_state(s: &MessageState) -> Self {
        let m = &s.message;
        Self {
            pk: storage_key(&RoomKey::new(&m.room), m.sequence()),
            id: m.id,
            room: m.room.clone(),
            username: m.username.clone(),
            message: m.message.clone(),
            created_time: m.created_time,
            user_id: m.user_id.clone(),
            reply_to: m.reply_to,
            edited_time: m.edited_time,
            deleted: m.deleted.then_some(true),
            reactions: (!m.reactions.is_empty()).then(|| m.reactions.clone()),
            reactors: (!s.reactors.0.is_empty()).then(|| s.reactors.clone()),
            version: (s.version > 0).then_some(s.version),
        }
    }

    /// The message as clients see it.
    pub fn into_message(self) -> ChatMessage {
        self.into_state().message
    }

    /// The message with who reacted and the last change applied.
    pub fn into_state(self) -> MessageState {
        MessageState {
            message: ChatMessage {
                id: self.id,
                room: self.room,
                username: self.username,
                message: self.message,
                created_time: self.created_time,
                user_id: self.user_id,
                reply_to: self.reply_to,
                edited_time: self.edited_time,
                deleted: self.deleted.unwrap_or(false),
                reactions: self.reactions.unwrap_or_default(),
            },
            reactors: self.reactors.unwrap_or_default(),
            version: self.version.unwrap_or(0),
        }
    }
}

/// The change log table's attributes and their HarperDB types, the primary key first.
pub const CHANGE_ATTRIBUTES: [(&str, &str); 4] = [
    ("pk", "String"),
    ("sequence", "Float"),
    ("targetSequence", "Float"),
    ("entry", "Any"),
];

/// The change log table beside a messages table: `<messages table>_changes`, in the same
/// database.
pub fn changes_table(messages_table: &str) -> String {
    format!("{messages_table}_changes")
}

/// A change as the change log holds it: what it did to its message. Only changes that did
/// something are kept (an edit, a deletion, a reaction that changed the counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChangeRecord {
    /// The primary key: [`storage_key`] of the change's room and its own stream sequence.
    pub pk: String,
    /// The change's stream sequence (also in the key): its place in the room's order.
    pub sequence: u64,
    /// The stream sequence of the message changed: a history query keeps the changes of
    /// messages at or before its cursor.
    #[serde(rename = "targetSequence")]
    pub target_sequence: u64,
    /// What the change made of its message.
    pub entry: ChangeEntry,
}

impl StoredChangeRecord {
    /// The record of the change to `target_sequence` in `room`, stored at `sequence`.
    pub fn new(room: &str, sequence: u64, target_sequence: u64, entry: ChangeEntry) -> Self {
        Self {
            pk: storage_key(&RoomKey::new(room), sequence),
            sequence,
            target_sequence,
            entry,
        }
    }
}

/// The longest room token a key holds as it is: with `|` and 16 hex digits, 256 characters,
/// the longest range bound HarperDB searches correctly. Longer ones are digested.
pub const ROOM_TOKEN_KEY_MAX: usize = 256 - 1 - 16;

/// A room's part of its messages' keys: the room's token ([`RoomToken`], one-to-one with the
/// name, as every key written before digests existed), or for a token longer than
/// [`ROOM_TOKEN_KEY_MAX`], `-` and the unpadded base64url SHA-256 of the name (44 characters).
/// The two never meet: a token is base64url of UTF-8, whose first character is never `-` or
/// `_` (that would be a first byte of 0xF8 or more, which UTF-8 never has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKey(String);

impl RoomKey {
    pub fn new(room: &str) -> Self {
        let token = RoomToken::new(room);
        if token.as_str().len() <= ROOM_TOKEN_KEY_MAX {
            return Self(token.as_str().to_owned());
        }
        Self(format!(
            "-{}",
            URL_SAFE_NO_PAD.encode(Sha256::digest(room.as_bytes()))
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a key was written for a long room by a Chatify that did not digest them yet
    /// (see [`LEGACY_KEY_MIN_LEN`]).
    pub fn is_legacy_long_key(pk: &str) -> bool {
        pk.len() >= LEGACY_KEY_MIN_LEN && !pk.starts_with('-')
    }
}

/// Keys of this length or longer were written by a Chatify that kept every room's token in the
/// key; HarperDB cannot range over them, and `chatify-persister migrate-keys` rewrites them.
pub const LEGACY_KEY_MIN_LEN: usize = ROOM_TOKEN_KEY_MAX + 1 + 1 + 16;

/// The key of `room`'s message at stream `sequence` (fixed-width hex, so keys sort as the
/// sequences do); also a bound of a range of the room's keys.
pub fn storage_key(room: &RoomKey, sequence: u64) -> String {
    format!("{}|{sequence:016x}", room.0)
}

/// Above every key of `room` and below those of the rooms after it: the upper end of a range
/// of the room's keys (`~` comes after every hex digit).
pub fn room_keys_end(room: &RoomKey) -> String {
    format!("{}|~", room.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::StoredMessage;

    #[test]
    fn keys_sort_by_room_then_sequence_and_never_cross_rooms() {
        let a = RoomKey::new("a");
        let ab = RoomKey::new("a.b");
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
            user_id: Some("user-7".into()),
            reply_to: Some(crate::id::message_id(1_700_000_000_000, 0x29)),
        }
        .into_message(0x2a);
        let record = StoredRecord::new(&message);
        assert_eq!(record.pk, "YSBi|000000000000002a");
        assert_eq!(record.clone().into_message(), message);

        // Changed, it holds every attribute of the table.
        let mut state = MessageState::new(message);
        let by = crate::changes::Actor {
            member_id: "m".into(),
            username: "u".into(),
            user_id: None,
        };
        let change = |change| crate::changes::StoredChange {
            room: "a b".into(),
            target: state.message.id,
            change,
            at: 1_700_000_000_500,
            by: by.clone(),
        };
        let (edit, react) = (
            change(crate::changes::Change::Edit {
                message: "hi!".into(),
            }),
            change(crate::changes::Change::React {
                emoji: "👍".into(),
                add: true,
                distinct_max: 20,
            }),
        );
        state.apply(0x2b, &edit);
        state.apply(0x2c, &react);
        let record = StoredRecord::from_state(&state);
        let json = serde_json::to_value(&record)?;
        let names: Vec<&str> = ATTRIBUTES.iter().map(|(name, _)| *name).collect();
        let mut fields: Vec<&str> = json
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        fields.sort_unstable();
        let mut expected = names.clone();
        expected.sort_unstable();
        expected.retain(|n| *n != "deleted");
        assert_eq!(fields, expected, "the record holds the table's attributes");
        assert_eq!(serde_json::from_value::<StoredRecord>(json)?, record);
        assert_eq!(record.into_state(), state);
        Ok(())
    }

    #[test]
    fn every_key_is_short_enough_for_a_range_and_rooms_stay_apart() {
        // 128 characters of 4 bytes each: the longest room the contract allows, in bytes.
        let longest = "𝄞".repeat(128);
        let short = RoomKey::new("general");
        assert_eq!(
            short.as_str(),
            RoomToken::new("general").as_str(),
            "unchanged"
        );
        // 179 bytes: a token of exactly ROOM_TOKEN_KEY_MAX characters.
        let at_edge = "x".repeat(179);
        assert_eq!(RoomToken::new(&at_edge).as_str().len(), ROOM_TOKEN_KEY_MAX);
        assert_eq!(
            RoomKey::new(&at_edge).as_str(),
            RoomToken::new(&at_edge).as_str()
        );
        let rooms = [
            longest.clone(),
            format!("{}a", "日".repeat(127)),
            format!("{}b", "日".repeat(127)),
            "日".repeat(128),
            format!("{at_edge}x"),
        ];
        let keys: Vec<RoomKey> = rooms.iter().map(|r| RoomKey::new(r)).collect();
        for (room, key) in rooms.iter().zip(&keys) {
            assert!(key.as_str().starts_with('-'), "{room} is digested");
            assert_eq!(key.as_str().len(), 44);
            assert!(room_keys_end(key).len() <= 256);
            assert!(storage_key(key, u64::MAX).len() <= 256);
            assert!(!RoomKey::is_legacy_long_key(&storage_key(key, 1)));
        }
        let distinct: std::collections::HashSet<_> = keys.iter().map(RoomKey::as_str).collect();
        assert_eq!(distinct.len(), rooms.len());
        // What an older Chatify wrote for the longest room.
        let legacy = format!("{}|{:016x}", RoomToken::new(&longest), 1);
        assert!(RoomKey::is_legacy_long_key(&legacy));
        assert!(!RoomKey::is_legacy_long_key(&storage_key(&short, 1)));
    }

    #[test]
    fn a_change_record_holds_the_change_log_attributes_under_the_changes_key()
    -> Result<(), serde_json::Error> {
        let target = crate::id::message_id(1_700_000_000_000, 0x29);
        let record = StoredChangeRecord::new(
            "a b",
            0x2b,
            0x29,
            ChangeEntry::Reactions {
                id: target,
                reactions: BTreeMap::from([("👍".to_owned(), 2)]),
            },
        );
        assert_eq!(record.pk, storage_key(&RoomKey::new("a b"), 0x2b));
        assert_eq!(record.pk, "YSBi|000000000000002b");
        let json = serde_json::to_value(&record)?;
        let mut fields: Vec<&str> = json
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        fields.sort_unstable();
        let mut expected: Vec<&str> = CHANGE_ATTRIBUTES.iter().map(|(name, _)| *name).collect();
        expected.sort_unstable();
        assert_eq!(fields, expected);
        assert_eq!(serde_json::from_value::<StoredChangeRecord>(json)?, record);
        assert_eq!(changes_table("messages"), "messages_changes");
        Ok(())
    }
}
