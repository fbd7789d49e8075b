//! NATS subject, stream, consumer and service names: the only place they are spelled.
//!
//! A room name is any Unicode text, so it never goes into a subject as it is: `a.b` would be two
//! tokens and `*` or `>` would be wildcards. [`RoomToken`] encodes the room's UTF-8 bytes as
//! unpadded base64url, whose alphabet (`A-Z a-z 0-9 - _`) holds no separator, wildcard or white
//! space, and which is one-to-one, so distinct rooms always get distinct single tokens. The same
//! token is the room part of history storage keys, which is why it must never contain `|`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The JetStream stream that stores every accepted chat message until the persister has it.
pub const MESSAGES_STREAM: &str = "CHATIFY_MESSAGES";
/// Subjects captured by [`MESSAGES_STREAM`]: `chatify.store.<room token>`.
pub const MESSAGES_STREAM_SUBJECTS: &str = "chatify.store.*";
/// Where [`MESSAGES_STREAM`] republishes every message it stored: the room's
/// [`RoomToken::message_subject`]. One publisher (the stream) in stream order, so every gateway
/// delivers a room's messages in the order they are stored, which is also history order.
pub const MESSAGES_REPUBLISH_DESTINATION: &str = "chatify.room.{{wildcard(1)}}.msg";
/// The JetStream stream keeping messages HarperDB refused for good, for inspection.
pub const DEAD_LETTER_STREAM: &str = "CHATIFY_DEAD_LETTERS";
/// Subjects captured by [`DEAD_LETTER_STREAM`]: `chatify.deadletter.<room token>`.
pub const DEAD_LETTER_STREAM_SUBJECTS: &str = "chatify.deadletter.*";
/// Header of a dead-lettered message: why HarperDB refused it.
pub const DEAD_LETTER_REASON_HEADER: &str = "Chatify-Dead-Letter-Reason";
/// Header of a dead-lettered message: its sequence in [`MESSAGES_STREAM`].
pub const DEAD_LETTER_SEQUENCE_HEADER: &str = "Chatify-Stream-Sequence";
/// Durable consumer through which persisters share the stream.
pub const PERSISTER_CONSUMER: &str = "chatify-persister";
/// The JetStream stream holding one record per member, room and gateway the member is on:
/// the last message of subject `chatify.presence.<room token>.<gateway id>.<member token>`.
pub const PRESENCE_STREAM: &str = "CHATIFY_PRESENCE";
/// Subjects captured by [`PRESENCE_STREAM`].
pub const PRESENCE_STREAM_SUBJECTS: &str = "chatify.presence.>";
/// Records of Chatify before member ids (one whole member list per room and gateway), purged
/// when a gateway starts.
pub const LEGACY_PRESENCE_RECORDS: &str = "chatify.presence.*.*";
/// Core NATS subject on which every gateway announces, periodically, that it is alive.
pub const GATEWAY_HEARTBEAT_SUBJECT: &str = "chatify.gateways.heartbeat";
/// Core NATS subject on which a gateway says it declared another one dead (by its id), so a
/// gateway that was only cut off re-announces its members.
pub const GATEWAY_DEAD_SUBJECT: &str = "chatify.gateways.dead";
/// A user id (any text: a token's `sub`) as one fixed-size subject token, as [`MemberToken`].
pub fn user_dm_subject(user_id: &str) -> String {
    format!("chatify.user.{}.dm", MemberToken::new(user_id).0)
}

/// Core NATS subject on which a user's connections hear that the user moved a read marker.
pub fn user_read_subject(user_id: &str) -> String {
    format!("chatify.user.{}.read", MemberToken::new(user_id).0)
}

/// The JetStream key-value bucket of read markers: per room and user, the id of the last
/// message read.
pub const READS_BUCKET: &str = "CHATIFY_READS";

/// The key of a user's read marker in a room, in [`READS_BUCKET`]: fixed-size digests of both
/// (any room name and user id make a valid key, and distinct ones distinct keys).
pub fn read_marker_key(room: &str, user_id: &str) -> String {
    format!(
        "{}.{}",
        MemberToken::new(room).0,
        MemberToken::new(user_id).0
    )
}

/// Core NATS subject on which a gateway serves the Engine.IO requests other gateways received
/// for its sessions (see the gateway's `forward`).
pub fn gateway_http_subject(gateway: &GatewayId) -> String {
    format!("chatify.gateways.{}.http", gateway.0)
}

/// Name of the NATS service that answers history queries.
pub const HISTORY_SERVICE: &str = "chatify-history";
/// Endpoint subject of the history service.
pub const HISTORY_SUBJECT: &str = "chatify.history.query";

/// Which Chatify service a NATS connection belongs to. Each has its own inbox prefix (where
/// the replies to its requests come), so that NATS permissions can let each service read its
/// own replies and nothing else's (see deploy/nats/permissions.conf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A gateway (or a tool publishing as one, like the load generator).
    Gateway,
    /// A persister.
    Persister,
}

impl Role {
    /// The prefix of this service's inboxes: `<prefix>.<unique id>`.
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Self::Gateway => "_INBOX_chatify_gateway",
            Self::Persister => "_INBOX_chatify_persister",
        }
    }
}

/// A room name encoded as one safe NATS subject token.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoomToken(String);

impl RoomToken {
    pub fn new(room: &str) -> Self {
        Self(URL_SAFE_NO_PAD.encode(room.as_bytes()))
    }

    /// The room name back from a token, or `None` when the token was not made by [`RoomToken::new`].
    pub fn decode(token: &str) -> Option<String> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        String::from_utf8(bytes).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Subject a gateway publishes a message to for storage; captured by [`MESSAGES_STREAM`].
    pub fn store_subject(&self) -> String {
        format!("chatify.store.{}", self.0)
    }

    /// Core NATS subject on which every gateway with members in the room receives stored
    /// messages, republished by [`MESSAGES_STREAM`] (see [`MESSAGES_REPUBLISH_DESTINATION`]).
    pub fn message_subject(&self) -> String {
        format!("chatify.room.{}.msg", self.0)
    }

    /// Core NATS subject for typing indicators (never stored).
    pub fn typing_subject(&self) -> String {
        format!("chatify.room.{}.typing", self.0)
    }

    /// Core NATS subject for membership changes.
    pub fn presence_subject(&self) -> String {
        format!("chatify.room.{}.presence", self.0)
    }

    /// The one subscription a gateway needs per room it has members in.
    pub fn room_wildcard(&self) -> String {
        format!("chatify.room.{}.*", self.0)
    }

    /// Subject in [`PRESENCE_STREAM`] of one member's record on one gateway in this room.
    pub fn presence_record_subject(&self, gateway_id: &GatewayId, member: &MemberToken) -> String {
        format!("chatify.presence.{}.{}.{}", self.0, gateway_id.0, member.0)
    }

    /// Filter matching every record of this room in [`PRESENCE_STREAM`].
    pub fn presence_record_filter(&self) -> String {
        format!("chatify.presence.{}.>", self.0)
    }
}

/// The dead-letter subject for a message received on a [`RoomToken::store_subject`].
pub fn dead_letter_subject(store_subject: &str) -> String {
    let token = store_subject
        .strip_prefix("chatify.store.")
        .unwrap_or("unknown");
    format!("chatify.deadletter.{token}")
}

/// Filter matching every presence record of one gateway, in all rooms (to purge a dead one's).
pub fn presence_records_of(gateway_id: &GatewayId) -> String {
    format!("chatify.presence.*.{}.*", gateway_id.0)
}

/// The gateway a [`RoomToken::presence_record_subject`] belongs to.
pub fn presence_record_gateway(subject: &str) -> Option<GatewayId> {
    let rest = subject.strip_prefix("chatify.presence.")?;
    let mut tokens = rest.split('.');
    let (_room, gateway, _member) = (tokens.next()?, tokens.next()?, tokens.next()?);
    if tokens.next().is_some() {
        return None;
    }
    GatewayId::parse(gateway)
}

/// A member id (any text: a token's `sub`) as one fixed-size subject token: 128 bits of its
/// SHA-256, unpadded base64url. The record's payload carries the id itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MemberToken(String);

impl MemberToken {
    pub fn new(member_id: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(member_id.as_bytes());
        Self(URL_SAFE_NO_PAD.encode(&digest[..16]))
    }
}

impl fmt::Debug for MemberToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemberToken({})", self.0)
    }
}

impl fmt::Display for RoomToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomToken({})", self.0)
    }
}

/// What kind of event a room subject carries, read back from a received subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomEventKind {
    Message,
    Typing,
    Presence,
}

/// Splits a subject received on [`RoomToken::room_wildcard`] into its kind.
pub fn room_event_kind(subject: &str) -> Option<RoomEventKind> {
    let rest = subject.strip_prefix("chatify.room.")?;
    let (_token, kind) = rest.rsplit_once('.')?;
    match kind {
        "msg" => Some(RoomEventKind::Message),
        "typing" => Some(RoomEventKind::Typing),
        "presence" => Some(RoomEventKind::Presence),
        _ => None,
    }
}

/// A gateway process's identity on the bus: unique per process start.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct GatewayId(String);

impl GatewayId {
    /// A fresh id: a random UUID without hyphens, valid as a subject token.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    /// What the Engine.IO session ids this gateway makes start with: the first
    /// [`GatewayId::SID_PREFIX_LEN`] characters of its id.
    pub fn sid_prefix(&self) -> &str {
        &self.0[..Self::SID_PREFIX_LEN.min(self.0.len())]
    }

    /// Characters of a gateway's id that start its session ids (24 bits; the other 60 bits of
    /// a session id stay random).
    pub const SID_PREFIX_LEN: usize = 6;

    /// Parses an id received from another gateway; `None` unless it is a safe token.
    pub fn parse(s: &str) -> Option<Self> {
        (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_safe_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    #[test]
    fn tricky_room_names_are_distinct_single_tokens() {
        let rooms = [
            "a.b",
            "a.*",
            "a.>",
            "a b",
            "*",
            ">",
            "a",
            "a_b",
            "日本語",
            "|",
            "a|b",
            "$JS",
        ];
        let tokens: Vec<RoomToken> = rooms.iter().map(|r| RoomToken::new(r)).collect();
        for (room, token) in rooms.iter().zip(&tokens) {
            assert!(is_safe_token(token.as_str()), "{room:?} -> {token}");
            assert_eq!(RoomToken::decode(token.as_str()).as_deref(), Some(*room));
        }
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), rooms.len());
    }

    #[test]
    fn subjects_have_fixed_shapes() {
        let t = RoomToken::new("a.b");
        assert_eq!(t.as_str(), "YS5i");
        assert_eq!(t.store_subject(), "chatify.store.YS5i");
        assert_eq!(t.message_subject(), "chatify.room.YS5i.msg");
        assert_eq!(t.typing_subject(), "chatify.room.YS5i.typing");
        assert_eq!(t.presence_subject(), "chatify.room.YS5i.presence");
        assert_eq!(t.room_wildcard(), "chatify.room.YS5i.*");
        assert_eq!(
            room_event_kind(&t.message_subject()),
            Some(RoomEventKind::Message)
        );
        assert_eq!(
            room_event_kind(&t.typing_subject()),
            Some(RoomEventKind::Typing)
        );
        assert_eq!(
            room_event_kind(&t.presence_subject()),
            Some(RoomEventKind::Presence)
        );
        assert_eq!(room_event_kind("chatify.room.YS5i.other"), None);
        assert_eq!(room_event_kind("elsewhere.YS5i.msg"), None);
        let gw = GatewayId::random();
        let member = MemberToken::new("auth0|user.with*dots>");
        assert_eq!(member.0.len(), 22);
        assert!(is_safe_token(&member.0));
        assert_ne!(member, MemberToken::new("auth0|user.with*dots"));
        assert_eq!(
            t.presence_record_subject(&gw, &member),
            format!("chatify.presence.YS5i.{gw}.{}", member.0)
        );
        assert_eq!(t.presence_record_filter(), "chatify.presence.YS5i.>");
        assert_eq!(
            user_dm_subject("auth0|user.with*dots>"),
            format!("chatify.user.{}.dm", member.0)
        );
        assert_eq!(
            presence_record_gateway(&t.presence_record_subject(&gw, &member)),
            Some(gw.clone())
        );
        assert_eq!(
            presence_record_gateway(&format!("chatify.presence.YS5i.{gw}")),
            None
        );
        assert_eq!(
            presence_records_of(&gw),
            format!("chatify.presence.*.{gw}.*")
        );
        assert_eq!(
            dead_letter_subject(&t.store_subject()),
            "chatify.deadletter.YS5i"
        );
    }

    #[test]
    fn gateway_ids_are_safe_and_checked() {
        let id = GatewayId::random();
        assert_eq!(GatewayId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(GatewayId::parse("a.b"), None);
        assert_eq!(GatewayId::parse(""), None);
        assert_eq!(GatewayId::parse("*"), None);
    }

    proptest! {
        #[test]
        fn distinct_rooms_give_distinct_safe_subjects(a in "\\PC{1,128}", b in "\\PC{1,128}") {
            let (ta, tb) = (RoomToken::new(&a), RoomToken::new(&b));
            prop_assert!(is_safe_token(ta.as_str()));
            prop_assert!(!ta.message_subject().contains(['*', '>', ' ', '\t', '\n', '\r']));
            prop_assert_eq!(ta.message_subject().split('.').count(), 4);
            prop_assert_eq!(ta.store_subject().split('.').count(), 3);
            prop_assert!(!ta.as_str().contains('|'));
            prop_assert_eq!(a == b, ta == tb);
            prop_assert_eq!(a == b, ta.message_subject() == tb.message_subject());
            prop_assert_eq!(RoomToken::decode(ta.as_str()), Some(a));
        }

        #[test]
        fn any_unicode_including_controls_stays_one_token(room in any::<String>()) {
            let t = RoomToken::new(&room);
            prop_assert!(t.as_str().is_empty() == room.is_empty());
            prop_assert!(t.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
