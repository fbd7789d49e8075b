//! Wire types: what clients see (`docs/contract.md`) and what services put on NATS.
//!
//! Field names follow the contract (`createdTime`, `isTyping`, `hasMore`), hence camelCase.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::changes::{ChangeEntry, MessageState};
use crate::subjects::GatewayId;

/// Sender name of server notices, as in the original server.
pub const CHAT_BOT: &str = "ChatBot";
/// How many stored messages `join_room` returns without `since`.
pub const JOIN_HISTORY_LEN: u32 = 100;
/// The most stored messages `join_room` with `since` returns.
pub const SINCE_HISTORY_MAX: u32 = 1000;
/// `get_history` page size bounds and default.
pub const PAGE_LIMIT_MAX: u32 = 100;
pub const PAGE_LIMIT_DEFAULT: u32 = 50;

/// A stored chat message, as delivered in `receive_message`, stored in JetStream and HarperDB,
/// and returned by history queries, in its current state (see [`crate::changes`]).
///
/// A deleted message keeps only `id`, `room`, `createdTime` and `deleted`: its `username` and
/// `message` are empty, and empty ones are not serialized (a message that is not deleted
/// always has both).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatMessage {
    pub id: Uuid,
    pub room: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub created_time: i64,
    /// With auth, the author's user id (the token's `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The message of the same room this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
    /// When the text was last edited (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_time: Option<i64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// How many members reacted with each emoji.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, u32>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ChatMessage {
    /// The message's place in its room's order (its stream sequence; see [`crate::id`]).
    pub fn sequence(&self) -> u64 {
        crate::id::sequence_of(&self.id).unwrap_or(0)
    }
}

/// A chat message as the messages stream holds it: everything but the id, which comes from the
/// stream sequence it is stored at ([`StoredMessage::into_message`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessage {
    pub room: String,
    pub username: String,
    pub message: String,
    pub created_time: i64,
    /// With auth, the author's user id (the token's `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The message of the same room this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
}

impl StoredMessage {
    /// The message as clients see it, once stored at `sequence`.
    pub fn into_message(self, sequence: u64) -> ChatMessage {
        ChatMessage {
            id: crate::id::message_id(self.created_time, sequence),
            room: self.room,
            username: self.username,
            message: self.message,
            created_time: self.created_time,
            user_id: self.user_id,
            reply_to: self.reply_to,
            ..ChatMessage::default()
        }
    }
}

/// A `ChatBot` notice: a `receive_message` without an id, never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    pub room: String,
    pub username: String,
    pub message: String,
    pub created_time: i64,
}

impl Notice {
    pub fn new(room: &str, message: String) -> Self {
        Self {
            room: room.to_owned(),
            username: CHAT_BOT.to_owned(),
            message,
            created_time: crate::id::now_millis(),
        }
    }
}

/// One entry of `chatroom_users` and of a join ack's `users`: a member of the room. The id
/// grants nothing: with auth it is the user's id (the token's `sub`), listed once however many
/// connections the user has in the room; without auth a random id per connection. Never a
/// session id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub username: String,
}

/// `dm`: a new message in one of the user's direct-message rooms, to each of the user's
/// connections that is not in that room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectMessage {
    pub room: String,
    pub from: Author,
    pub message: ChatMessage,
}

/// Who wrote a message: the user's id and display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Author {
    pub user_id: String,
    pub username: String,
}

/// `room_presence`: how many members a room has, sent instead of `chatroom_users` (and the
/// join and leave notices) to the members of a room above `presence_list_max` members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPresence {
    pub room: String,
    pub count: usize,
}

/// `typing` as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Typing {
    pub room: String,
    pub username: String,
    pub is_typing: bool,
}

/// `typing` on the bus: also names the sending socket, which must not get it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypingEvent {
    pub socket_id: String,
    #[serde(flatten)]
    pub typing: Typing,
}

/// A member arrived on a gateway (its first connection there joined the room) or left it (its
/// last connection there left), published on the room's presence subject.
///
/// `revision` is the sequence of the member's presence record, which the gateway writes before
/// it announces an arrival and purges before it announces a departure. A gateway that starts
/// listening to a room subscribes first, then reads the room's records: an announcement about
/// a record it read is applied only if it is not older than the record ([`PresenceDelta::revision`]
/// of a departure is the departed record's), so the order of the two does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceDelta {
    pub gateway: GatewayId,
    pub member: Member,
    pub present: bool,
    pub revision: u64,
    /// A re-announcement (after a NATS outage, or after others wrongly declared the gateway
    /// dead): receivers update their view without notices.
    #[serde(default)]
    pub quiet: bool,
}

/// A history query to the persisters' service. Returns the messages stored after `after` and
/// before `before` (in stream order: see [`crate::id`]), the newest `limit` of them, each in
/// its current state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryQuery {
    pub room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Uuid>,
    pub limit: u32,
    /// With `after` (a `join_room` with `since`): also what changed after it in messages at or
    /// before it ([`HistoryPage::changes`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub changes: bool,
    /// With auth (a join): also count the user's unread messages ([`HistoryPage::unread`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<UnreadQuery>,
    /// Instead of a range: these messages of the room, with who reacted
    /// ([`HistoryPage::states`]); at most [`HistoryQuery::IDS_MAX`]. What a gateway asks
    /// before it changes a message it has not seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<Uuid>,
}

/// What counts as unread for a user: the room's messages after `after` (its read marker; all
/// of them without one) that are not deleted and not the user's own, up to
/// [`HistoryQuery::UNREAD_MAX`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnreadQuery {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Uuid>,
}

/// Why a [`HistoryQuery`] cannot be answered ([`HistoryQuery::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidQuery {
    #[error("the room is empty")]
    EmptyRoom,
    #[error("limit must be between 1 and {max}, not {0}", max = HistoryQuery::LIMIT_MAX)]
    Limit(u32),
    #[error("a cursor is not a message id")]
    Cursor,
    #[error("at most {max} ids", max = HistoryQuery::IDS_MAX)]
    TooManyIds,
}

impl HistoryQuery {
    /// The most messages one query may ask for: the longest answer a client can get, `join_room`
    /// with `since`.
    pub const LIMIT_MAX: u32 = SINCE_HISTORY_MAX;
    /// The most messages one lookup by ids names.
    pub const IDS_MAX: usize = 100;
    /// The most entries of [`HistoryPage::changes`].
    pub const CHANGES_MAX: usize = 1000;
    /// The most unread messages counted ([`HistoryQuery::unread`]).
    pub const UNREAD_MAX: u32 = 1000;

    /// Whether the history service can answer the query: the room is named, `limit` is
    /// `1..=`[`HistoryQuery::LIMIT_MAX`], and the cursors are message ids (their stream sequences
    /// bound the answer). The one place these rules are spelled.
    pub fn validate(&self) -> Result<(), InvalidQuery> {
        if self.room.is_empty() {
            return Err(InvalidQuery::EmptyRoom);
        }
        if !(1..=Self::LIMIT_MAX).contains(&self.limit) {
            return Err(InvalidQuery::Limit(self.limit));
        }
        if self.ids.len() > Self::IDS_MAX {
            return Err(InvalidQuery::TooManyIds);
        }
        if self
            .ids
            .iter()
            .any(|id| crate::id::sequence_of(id).is_none())
        {
            return Err(InvalidQuery::Cursor);
        }
        match self.checked_sequence_bounds() {
            Some(_) => Ok(()),
            None => Err(InvalidQuery::Cursor),
        }
    }

    /// The stream sequences strictly between which the answer lies; `None` when a cursor is not
    /// a message id (see [`crate::id`]).
    pub fn checked_sequence_bounds(&self) -> Option<(u64, u64)> {
        let after = match &self.after {
            Some(id) => crate::id::sequence_of(id)?,
            None => 0,
        };
        let before = match &self.before {
            Some(id) => crate::id::sequence_of(id)?,
            None => u64::MAX,
        };
        Some((after, before))
    }

    /// [`HistoryQuery::checked_sequence_bounds`], for a query already checked (an empty range
    /// otherwise).
    pub fn sequence_bounds(&self) -> (u64, u64) {
        self.checked_sequence_bounds().unwrap_or((0, 0))
    }
}

/// A history answer: messages oldest first, and whether older ones matched beyond `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub messages: Vec<ChatMessage>,
    pub has_more: bool,
    /// For [`HistoryQuery::changes`]: what changed after `after` in messages at or before it,
    /// in the order it happened (collapsed: [`crate::changes::collapse`]), the latest
    /// [`HistoryQuery::CHANGES_MAX`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ChangeEntry>,
    /// Whether older entries of `changes` were left out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub changes_cut: bool,
    /// For [`HistoryQuery::unread`]: the unread messages counted (at most
    /// [`HistoryQuery::UNREAD_MAX`]); `None` when not asked (or from a persister that cannot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<u32>,
    /// For [`HistoryQuery::ids`]: the messages found, with who reacted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<MessageState>,
    /// Every event of the room the stream held at or below this sequence is in the answer, and
    /// none above it (0: not told).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub as_of: u64,
}

/// `read`: a user's read marker in a room moved (to the user's other connections).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMarker {
    pub room: String,
    pub id: Uuid,
}

/// `read` on the bus: also names the connection that moved it, which does not get it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadNotice {
    pub socket_id: String,
    #[serde(flatten)]
    pub marker: ReadMarker,
}

/// Error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidPayload,
    TooLarge,
    RateLimited,
    NotInRoom,
    TooManyRooms,
    Unauthorized,
    Unavailable,
    /// No access to the room, or not the author (v2).
    Forbidden,
    /// No such message in that room (v2).
    NotFound,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidPayload => "invalid_payload",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::NotInRoom => "not_in_room",
            Self::TooManyRooms => "too_many_rooms",
            Self::Unauthorized => "unauthorized",
            Self::Unavailable => "unavailable",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
        }
    }

    /// Whether the client caused it (not logged as a server error).
    pub fn is_client_error(self) -> bool {
        !matches!(self, Self::Unavailable)
    }
}

/// `{ code, message }`: the `error` of a failed ack, and the payload of the `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_message_uses_contract_field_names() {
        let id = Uuid::now_v7();
        let m = ChatMessage {
            id,
            room: "r".into(),
            username: "u".into(),
            message: "hi".into(),
            created_time: 5,
            ..ChatMessage::default()
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap_or_default(),
            json!({"id": id.to_string(), "room": "r", "username": "u", "message": "hi", "createdTime": 5})
        );
    }

    #[test]
    fn error_codes_serialize_as_contract_codes() {
        for code in [
            ErrorCode::InvalidPayload,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::NotInRoom,
            ErrorCode::TooManyRooms,
            ErrorCode::Unauthorized,
            ErrorCode::Unavailable,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
        ] {
            assert_eq!(serde_json::to_value(code).ok(), Some(json!(code.as_str())));
        }
    }

    fn query(limit: u32) -> HistoryQuery {
        HistoryQuery {
            room: "r".into(),
            limit,
            ..HistoryQuery::default()
        }
    }

    #[test]
    fn history_queries_within_the_rules_are_valid() {
        let id = crate::id::message_id(1_700_000_000_000, 42);
        for q in [
            query(1),
            query(HistoryQuery::LIMIT_MAX),
            HistoryQuery {
                after: Some(id),
                before: Some(id),
                ..query(50)
            },
        ] {
            assert_eq!(q.validate(), Ok(()), "{q:?}");
        }
    }

    #[test]
    fn history_queries_breaking_a_rule_say_which() {
        let not_ours = Uuid::new_v4();
        let cases = [
            (
                HistoryQuery {
                    room: String::new(),
                    ..query(5)
                },
                InvalidQuery::EmptyRoom,
            ),
            (query(0), InvalidQuery::Limit(0)),
            (
                query(HistoryQuery::LIMIT_MAX + 1),
                InvalidQuery::Limit(HistoryQuery::LIMIT_MAX + 1),
            ),
            (
                HistoryQuery {
                    after: Some(not_ours),
                    ..query(5)
                },
                InvalidQuery::Cursor,
            ),
            (
                HistoryQuery {
                    before: Some(not_ours),
                    ..query(5)
                },
                InvalidQuery::Cursor,
            ),
        ];
        for (q, expected) in cases {
            assert_eq!(q.validate(), Err(expected), "{q:?}");
        }
    }

    #[test]
    fn the_limit_rule_is_told_from_the_constant() {
        let told = InvalidQuery::Limit(0).to_string();
        assert!(
            told.contains(&format!("between 1 and {SINCE_HISTORY_MAX}")),
            "{told}"
        );
    }

    #[test]
    fn typing_event_flattens_the_client_view() {
        let e = TypingEvent {
            socket_id: "s".into(),
            typing: Typing {
                room: "r".into(),
                username: "u".into(),
                is_typing: true,
            },
        };
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(
            v,
            json!({"socketId": "s", "room": "r", "username": "u", "isTyping": true})
        );
        assert_eq!(serde_json::from_value::<TypingEvent>(v).ok(), Some(e));
    }
}
