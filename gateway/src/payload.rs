//! Decoding and checking client event payloads. Everything a client sends passes through here
//! before it can reach NATS or HarperDB; anything else is refused with a precise message.

use chatify_shared::config::Limits;
use chatify_shared::wire::{CHAT_BOT, ErrorCode, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::dm;
use crate::error::ChatError;

/// `join_room { username, room, since? }` or the original `{ userName, userRoom }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub room: String,
    /// Absent when the username comes from the auth token.
    pub username: Option<String>,
    pub since: Option<Uuid>,
}

/// `send_message { room, message, clientId?, replyTo? }`, with the text trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub room: String,
    pub message: String,
    pub client_id: Option<String>,
    /// A message id (which must be a message of the room: checked against the stored ones).
    pub reply_to: Option<Uuid>,
}

/// The message an `edit_message`, `delete_message`, `react` or `mark_read` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub room: String,
    pub id: Uuid,
}

/// `edit_message { room, id, message }`, with the text trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub target: Target,
    pub message: String,
}

/// `react { room, id, emoji, add }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct React {
    pub target: Target,
    pub emoji: String,
    pub add: bool,
}

/// `get_history { room, before?, limit? }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPageRequest {
    pub room: String,
    pub before: Option<Uuid>,
    pub limit: u32,
}

/// `typing { room, isTyping }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypingRequest {
    pub room: String,
    pub is_typing: bool,
}

/// Longest accepted `clientId`.
const CLIENT_ID_MAX_CHARS: usize = 128;

fn object<'a>(v: &'a Value, event: &str, shape: &str) -> Result<&'a Map<String, Value>, ChatError> {
    v.as_object()
        .ok_or_else(|| ChatError::invalid(format!("{event} needs an object {shape}")))
}

/// The first present field among `names` (the contract's name, then the original client's).
fn field<'a>(o: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .find_map(|n| o.get(*n).filter(|v| !v.is_null()))
}

fn string_field<'a>(
    o: &'a Map<String, Value>,
    names: &[&str],
) -> Result<Option<&'a str>, ChatError> {
    match field(o, names) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ChatError::invalid(format!("{} must be a string", names[0]))),
    }
}

fn required_string<'a>(o: &'a Map<String, Value>, names: &[&str]) -> Result<&'a str, ChatError> {
    string_field(o, names)?.ok_or_else(|| ChatError::invalid(format!("{} is required", names[0])))
}

/// Characters that make a name look like another one: bidirectional controls (which reorder
/// the text around them) and invisible separators.
fn is_deceptive(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200B}' | '\u{2060}' | '\u{FEFF}'
    )
}

/// A name shown to people (room, username): 1..=max characters, no control characters, no
/// bidirectional controls or invisible separators.
fn checked_name(what: &str, value: &str, max_chars: usize) -> Result<String, ChatError> {
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err(ChatError::invalid(format!("{what} must not be empty")));
    }
    if chars > max_chars {
        return Err(ChatError::invalid(format!(
            "{what} is {chars} characters long; the limit is {max_chars}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ChatError::invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    if value.chars().any(is_deceptive) {
        return Err(ChatError::invalid(format!(
            "{what} must not contain bidirectional controls or invisible characters"
        )));
    }
    Ok(value.to_owned())
}

/// Whether `name` would pass for the server's own notices: `ChatBot` in any case, with
/// surrounding white space or invisible characters.
fn is_reserved(name: &str) -> bool {
    let visible: String = name.chars().filter(|c| !is_deceptive(*c)).collect();
    visible.trim().to_lowercase() == CHAT_BOT.to_lowercase()
}

/// A room name; one in the reserved name space of direct messages may be longer (it holds two
/// user ids; the access check decides whether it is a room of the asking user).
pub fn room(o: &Map<String, Value>, names: &[&str], limits: &Limits) -> Result<String, ChatError> {
    let value = required_string(o, names)?;
    let max = if dm::is_dm(value) {
        dm::NAME_MAX_CHARS
    } else {
        limits.room_max_chars
    };
    checked_name("room", value, max)
}

pub fn username(value: &str, limits: &Limits) -> Result<String, ChatError> {
    if is_reserved(value) {
        return Err(ChatError::invalid(format!(
            "the username {CHAT_BOT} is reserved for server notices"
        )));
    }
    checked_name("username", value, limits.username_max_chars)
}

fn message_id(o: &Map<String, Value>, name: &str) -> Result<Option<Uuid>, ChatError> {
    match string_field(o, &[name])? {
        None => Ok(None),
        Some(s) => Uuid::parse_str(s)
            .ok()
            .filter(|id| chatify_shared::id::sequence_of(id).is_some())
            .map(Some)
            .ok_or_else(|| ChatError::invalid(format!("{name} must be a message id"))),
    }
}

/// A message a change or reply is about: any UUID (one that is no message id is no message of
/// the room: `not_found`, as the contract says).
fn target_id(o: &Map<String, Value>, name: &str) -> Result<Option<Uuid>, ChatError> {
    match string_field(o, &[name])? {
        None => Ok(None),
        Some(s) => Uuid::parse_str(s)
            .map(Some)
            .map_err(|_| ChatError::invalid(format!("{name} must be a message id (a UUID)"))),
    }
}

pub fn join(v: &Value, limits: &Limits) -> Result<Join, ChatError> {
    let o = object(v, "join_room", "{ username, room, since? }")?;
    let room = room(o, &["room", "userRoom"], limits)?;
    let username = string_field(o, &["username", "userName"])?
        .map(|u| username(u, limits))
        .transpose()?;
    Ok(Join {
        room,
        username,
        since: message_id(o, "since")?,
    })
}

/// A message's text: trimmed, not empty, at most `limits.message_max_bytes` bytes.
fn text(o: &Map<String, Value>, limits: &Limits) -> Result<String, ChatError> {
    let message = required_string(o, &["message"])?.trim();
    if message.is_empty() {
        return Err(ChatError::invalid("message must not be empty"));
    }
    if message.len() > limits.message_max_bytes {
        return Err(ChatError::new(
            ErrorCode::TooLarge,
            format!(
                "message is {} bytes; the limit is {}",
                message.len(),
                limits.message_max_bytes
            ),
        ));
    }
    Ok(message.to_owned())
}

pub fn send(v: &Value, limits: &Limits) -> Result<Send, ChatError> {
    let o = object(v, "send_message", "{ room, message, clientId?, replyTo? }")?;
    let room = room(o, &["room"], limits)?;
    let message = text(o, limits)?;
    let reply_to = target_id(o, "replyTo")?;
    let client_id = match string_field(o, &["clientId"])? {
        None => None,
        Some(id) if id.is_empty() || id.chars().count() > CLIENT_ID_MAX_CHARS => {
            return Err(ChatError::invalid(format!(
                "clientId must be 1..={CLIENT_ID_MAX_CHARS} characters"
            )));
        }
        Some(id) => Some(id.to_owned()),
    };
    Ok(Send {
        room,
        message,
        client_id,
        reply_to,
    })
}

fn target(o: &Map<String, Value>, limits: &Limits) -> Result<Target, ChatError> {
    Ok(Target {
        room: room(o, &["room"], limits)?,
        id: target_id(o, "id")?.ok_or_else(|| ChatError::invalid("id is required"))?,
    })
}

/// `edit_message { room, id, message }`.
pub fn edit(v: &Value, limits: &Limits) -> Result<Edit, ChatError> {
    let o = object(v, "edit_message", "{ room, id, message }")?;
    Ok(Edit {
        target: target(o, limits)?,
        message: text(o, limits)?,
    })
}

/// `delete_message { room, id }`.
pub fn delete(v: &Value, limits: &Limits) -> Result<Target, ChatError> {
    target(object(v, "delete_message", "{ room, id }")?, limits)
}

/// `mark_read { room, id }`.
pub fn mark_read(v: &Value, limits: &Limits) -> Result<Target, ChatError> {
    target(object(v, "mark_read", "{ room, id }")?, limits)
}

/// `react { room, id, emoji, add }`: an emoji of 1..=`limits.emoji_max_bytes` bytes without
/// control characters.
pub fn react(v: &Value, limits: &Limits) -> Result<React, ChatError> {
    let o = object(v, "react", "{ room, id, emoji, add }")?;
    let target = target(o, limits)?;
    let emoji = required_string(o, &["emoji"])?;
    if emoji.is_empty() || emoji.len() > limits.emoji_max_bytes {
        return Err(ChatError::invalid(format!(
            "emoji must be 1..={} bytes",
            limits.emoji_max_bytes
        )));
    }
    if emoji.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ChatError::invalid(
            "emoji must not contain control characters or white space",
        ));
    }
    let add = match o.get("add") {
        Some(Value::Bool(add)) => *add,
        _ => return Err(ChatError::invalid("add must be true or false")),
    };
    Ok(React {
        target,
        emoji: emoji.to_owned(),
        add,
    })
}

pub fn leave(v: &Value, limits: &Limits) -> Result<String, ChatError> {
    room(object(v, "leave_room", "{ room }")?, &["room"], limits)
}

/// A page size: an integer in 1..=100, 50 when absent.
pub fn page_limit(v: Option<&Value>) -> Result<u32, ChatError> {
    let bad = || {
        ChatError::invalid(format!(
            "limit must be an integer from 1 to {PAGE_LIMIT_MAX}"
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(PAGE_LIMIT_DEFAULT),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|n| (1..=u64::from(PAGE_LIMIT_MAX)).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

pub fn history(v: &Value, limits: &Limits) -> Result<HistoryPageRequest, ChatError> {
    let o = object(v, "get_history", "{ room, before?, limit? }")?;
    Ok(HistoryPageRequest {
        room: room(o, &["room"], limits)?,
        before: message_id(o, "before")?,
        limit: page_limit(o.get("limit"))?,
    })
}

/// The HTTP route's query string: the same rules, with `limit` as text.
pub fn history_query(
    room_name: &str,
    before: Option<&str>,
    limit: Option<&str>,
    limits: &Limits,
) -> Result<HistoryPageRequest, ChatError> {
    let mut o = Map::new();
    o.insert("room".into(), Value::String(room_name.to_owned()));
    if let Some(b) = before.filter(|b| !b.is_empty()) {
        o.insert("before".into(), Value::String(b.to_owned()));
    }
    if let Some(l) = limit.filter(|l| !l.is_empty()) {
        let n: u64 = l.parse().map_err(|_| {
            ChatError::invalid(format!(
                "limit must be an integer from 1 to {PAGE_LIMIT_MAX}"
            ))
        })?;
        o.insert("limit".into(), Value::from(n));
    }
    history(&Value::Object(o), limits)
}

/// Longest accepted user id (as the token's `sub`).
const USER_ID_MAX_BYTES: usize = 256;

/// `open_dm { userId }`.
pub fn open_dm(v: &Value) -> Result<String, ChatError> {
    let o = object(v, "open_dm", "{ userId }")?;
    let user_id = required_string(o, &["userId"])?;
    if user_id.is_empty() || user_id.len() > USER_ID_MAX_BYTES {
        return Err(ChatError::invalid(format!(
            "userId must be 1..={USER_ID_MAX_BYTES} bytes"
        )));
    }
    Ok(user_id.to_owned())
}

/// Longest accepted token text.
const TOKEN_MAX_BYTES: usize = 8192;

/// `refresh_token { token }`.
pub fn refresh(v: &Value) -> Result<String, ChatError> {
    let o = object(v, "refresh_token", "{ token }")?;
    let token = required_string(o, &["token"])?;
    if token.is_empty() || token.len() > TOKEN_MAX_BYTES {
        return Err(ChatError::invalid(format!(
            "token must be 1..={TOKEN_MAX_BYTES} bytes"
        )));
    }
    Ok(token.to_owned())
}

pub fn typing(v: &Value, limits: &Limits) -> Result<TypingRequest, ChatError> {
    let o = object(v, "typing", "{ room, isTyping }")?;
    let room = room(o, &["room"], limits)?;
    match o.get("isTyping") {
        Some(Value::Bool(is_typing)) => Ok(TypingRequest {
            room,
            is_typing: *is_typing,
        }),
        _ => Err(ChatError::invalid("isTyping must be true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits::default()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ChatError>) -> ErrorCode {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.code,
        }
    }

    #[test]
    fn changes_name_a_message_of_a_room_and_check_their_parts() {
        let id = chatify_shared::id::message_id(1_700_000_000_000, 7);
        let l = limits();
        let e = edit(
            &json!({"room": "r", "id": id.to_string(), "message": "  fixed "}),
            &l,
        );
        assert_eq!(
            e.ok(),
            Some(Edit {
                target: Target {
                    room: "r".into(),
                    id
                },
                message: "fixed".into()
            })
        );
        assert_eq!(
            code(edit(
                &json!({"room": "r", "id": id.to_string(), "message": " "}),
                &l
            )),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            code(delete(&json!({"room": "r"}), &l)),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            code(delete(&json!({"room": "r", "id": "not-a-uuid"}), &l)),
            ErrorCode::InvalidPayload,
            "not a UUID"
        );
        // Any UUID names a target: one that is no message of the room is `not_found` later.
        let other = Uuid::new_v4();
        assert!(matches!(
            delete(&json!({"room": "r", "id": other.to_string()}), &l),
            Ok(Target { id, .. }) if id == other
        ));
        let r = |emoji: &str, add: Value| {
            react(
                &json!({"room": "r", "id": id.to_string(), "emoji": emoji, "add": add}),
                &l,
            )
        };
        assert_eq!(
            r("👍", json!(true)).map(|r| r.emoji).ok(),
            Some("👍".into())
        );
        assert_eq!(r("👍", json!(false)).map(|r| r.add).ok(), Some(false));
        for bad in ["", "a\u{7}", "a b", &"x".repeat(33)] {
            assert_eq!(
                code(r(bad, json!(true))),
                ErrorCode::InvalidPayload,
                "{bad:?}"
            );
        }
        assert_eq!(code(r("👍", json!("yes"))), ErrorCode::InvalidPayload);
        assert_eq!(code(r("👍", Value::Null)), ErrorCode::InvalidPayload);
        let s = send(
            &json!({"room": "r", "message": "hi", "replyTo": id.to_string()}),
            &l,
        );
        assert_eq!(s.ok().and_then(|s| s.reply_to), Some(id));
        assert_eq!(
            code(send(
                &json!({"room": "r", "message": "hi", "replyTo": "x"}),
                &l
            )),
            ErrorCode::InvalidPayload
        );
    }

    #[test]
    fn cursors_must_be_message_ids() {
        // A UUIDv7 that is not one of ours: `rand_a` set.
        let foreign_v7 =
            Uuid::from_u128(chatify_shared::id::message_id(1, 1).as_u128() | (0x123 << 64));
        for since in ["x", &Uuid::new_v4().to_string(), &foreign_v7.to_string()] {
            let v = json!({"username": "ann", "room": "r", "since": since});
            assert_eq!(
                code(join(&v, &limits())),
                ErrorCode::InvalidPayload,
                "{since}"
            );
            let v = json!({"room": "r", "before": since});
            assert_eq!(
                code(history(&v, &limits())),
                ErrorCode::InvalidPayload,
                "{since}"
            );
        }
    }

    #[test]
    fn join_accepts_both_payload_shapes() {
        let id = chatify_shared::id::message_id(1_700_000_000_000, 7);
        assert_eq!(
            join(
                &json!({"username": "ann", "room": "a.b", "since": id.to_string()}),
                &limits()
            ),
            Ok(Join {
                room: "a.b".into(),
                username: Some("ann".into()),
                since: Some(id)
            })
        );
        assert_eq!(
            join(&json!({"userName": "bob", "userRoom": "*"}), &limits()),
            Ok(Join {
                room: "*".into(),
                username: Some("bob".into()),
                since: None
            })
        );
        assert_eq!(
            join(&json!({"room": "r"}), &limits()),
            Ok(Join {
                room: "r".into(),
                username: None,
                since: None
            })
        );
    }

    #[test]
    fn join_refuses_bad_names_and_shapes() {
        let l = limits();
        for bad in [
            json!(null),
            json!(5),
            json!("room"),
            json!(["room"]),
            json!({"username": "u"}),
            json!({"username": "u", "room": ""}),
            json!({"username": "u", "room": "   "}),
            json!({"username": "u", "room": 7}),
            json!({"username": "u", "room": "x".repeat(129)}),
            json!({"username": "", "room": "r"}),
            json!({"username": "u".repeat(65), "room": "r"}),
            json!({"username": "a\u{0}b", "room": "r"}),
            json!({"username": "u", "room": "a\nb"}),
            json!({"username": "u", "room": "r", "since": "not-an-id"}),
            json!({"username": ["u"], "room": "r"}),
        ] {
            assert_eq!(code(join(&bad, &l)), ErrorCode::InvalidPayload, "{bad}");
        }
        assert!(
            join(
                &json!({"username": "u".repeat(64), "room": "日".repeat(128)}),
                &l
            )
            .is_ok()
        );
    }

    #[test]
    fn names_that_pass_for_others_are_refused() {
        let l = limits();
        for name in [
            "ChatBot",
            "chatbot",
            "CHATBOT",
            " ChatBot ",
            "Chat\u{200B}Bot",
            "\u{FEFF}ChatBot",
            "\u{202E}toBtahC",
            "ann\u{2066}",
            "a\u{2060}b",
        ] {
            let v = json!({"username": name, "room": "r"});
            assert_eq!(code(join(&v, &l)), ErrorCode::InvalidPayload, "{name:?}");
        }
        for room in ["a\u{202A}b", "\u{200B}", "x\u{2069}"] {
            let v = json!({"username": "ann", "room": room});
            assert_eq!(code(join(&v, &l)), ErrorCode::InvalidPayload, "{room:?}");
        }
        // A room may be called ChatBot; names that only contain it are fine.
        assert!(join(&json!({"username": "ChatBotFan", "room": "ChatBot"}), &l).is_ok());
        assert!(join(&json!({"username": "Chat Bot", "room": "r"}), &l).is_ok());
        assert!(join(&json!({"username": "عربي", "room": "日本語 ✓"}), &l).is_ok());
    }

    #[test]
    fn send_trims_and_enforces_the_byte_limit() {
        let l = limits();
        assert_eq!(
            send(
                &json!({"room": "r", "message": "  hi  ", "clientId": "c1"}),
                &l
            ),
            Ok(Send {
                room: "r".into(),
                message: "hi".into(),
                client_id: Some("c1".into()),
                reply_to: None,
            })
        );
        assert_eq!(
            code(send(&json!({"room": "r", "message": " \n\t "}), &l)),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            code(send(&json!({"room": "r", "message": 5}), &l)),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            code(send(&json!({"room": "r"}), &l)),
            ErrorCode::InvalidPayload
        );
        assert!(send(&json!({"room": "r", "message": "é".repeat(2048)}), &l).is_ok());
        assert_eq!(
            code(send(&json!({"room": "r", "message": "é".repeat(2049)}), &l)),
            ErrorCode::TooLarge
        );
        assert!(
            send(
                &json!({"room": "r", "message": format!("  {}  ", "x".repeat(4096))}),
                &l
            )
            .is_ok()
        );
        assert_eq!(
            code(send(
                &json!({"room": "r", "message": "x", "clientId": ""}),
                &l
            )),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            code(send(
                &json!({"room": "r", "message": "x", "clientId": 3}),
                &l
            )),
            ErrorCode::InvalidPayload
        );
    }

    #[test]
    fn page_limits_are_integers_from_1_to_100() {
        assert_eq!(page_limit(None), Ok(50));
        assert_eq!(page_limit(Some(&json!(1))), Ok(1));
        assert_eq!(page_limit(Some(&json!(100))), Ok(100));
        for bad in [
            json!(0),
            json!(101),
            json!(2.5),
            json!("10"),
            json!(-1),
            json!(true),
        ] {
            assert_eq!(
                code(page_limit(Some(&bad))),
                ErrorCode::InvalidPayload,
                "{bad}"
            );
        }
        assert_eq!(
            code(history_query("r", None, Some("abc"), &limits())),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            history_query("r", Some(""), Some("7"), &limits()).map(|h| h.limit),
            Ok(7)
        );
    }

    #[test]
    fn typing_needs_a_boolean() {
        assert_eq!(
            typing(&json!({"room": "r", "isTyping": true}), &limits()),
            Ok(TypingRequest {
                room: "r".into(),
                is_typing: true
            })
        );
        assert_eq!(
            code(typing(&json!({"room": "r", "isTyping": "yes"}), &limits())),
            ErrorCode::InvalidPayload
        );
    }

    proptest! {
        #[test]
        fn decoding_any_json_never_panics(v in arb_json()) {
            let l = limits();
            let _ = join(&v, &l);
            let _ = send(&v, &l);
            let _ = leave(&v, &l);
            let _ = history(&v, &l);
            let _ = typing(&v, &l);
        }

        #[test]
        fn accepted_rooms_are_within_limits(room in any::<String>()) {
            if let Ok(j) = join(&json!({"username": "u", "room": room}), &limits()) {
                prop_assert!(!j.room.trim().is_empty());
                prop_assert!(j.room.chars().count() <= 128);
                prop_assert!(!j.room.chars().any(char::is_control));
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            any::<i64>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::String),
            prop::sample::select(vec!["room", "message", "username", "limit", "since"])
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "room", "message", "username", "userName", "userRoom", "limit", "before",
                        "since", "clientId", "isTyping"
                    ])
                    .prop_map(String::from),
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
