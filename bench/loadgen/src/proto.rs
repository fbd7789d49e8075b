//! Engine.IO v4 / Socket.IO v5 packets over WebSocket text frames, parsed only as far as the load
//! generator needs (no allocation on the hot path: everything borrows from the frame).
//!
//! A frame holds one Engine.IO packet: `0{open json}`, `1` close, `2` ping, `3` pong, `4<socket.io
//! packet>`, `6` noop. A Socket.IO packet of the default namespace is `<type>[ack id][json]`:
//! `0{..}` connect, `1` disconnect, `2[ack id]["event",...]`, `3<ack id>[...]`, `4{..}` connect
//! error.

use std::fmt::Write as _;

/// One parsed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Engine.IO open: the JSON handshake (`sid`, `pingInterval`, ...).
    Open(&'a str),
    Close,
    Ping,
    Pong,
    Noop,
    /// Socket.IO connect answer of the namespace.
    Connect(&'a str),
    /// Socket.IO connect refusal, with its JSON data.
    ConnectError(&'a str),
    Disconnect,
    /// An event: its name, its ack id when the server wants one, and the JSON array of arguments
    /// (the name included, as received).
    Event {
        name: &'a str,
        ack: Option<u64>,
        args: &'a str,
    },
    /// An acknowledgement: the id and the JSON array of reply arguments.
    Ack {
        id: u64,
        args: &'a str,
    },
}

/// Why a frame could not be parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    UnknownEnginePacket(char),
    UnknownSocketPacket(char),
    /// A namespace other than `/`, or a binary packet: the load generator never asks for them.
    Unsupported,
    BadEvent,
    BadAck,
}

/// Splits leading ASCII digits off `s` as a number (`None` when there are none or they overflow).
fn leading_number(s: &str) -> (Option<u64>, &str) {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return (None, s);
    }
    (s[..end].parse().ok(), &s[end..])
}

/// The first JSON string of an array starting at `args` (`["name",...`), without unescaping: event
/// names of this protocol never hold escapes.
fn event_name(args: &str) -> Option<&str> {
    let rest = args.strip_prefix("[\"")?;
    let end = rest.find('"')?;
    let name = &rest[..end];
    if name.contains('\\') {
        None
    } else {
        Some(name)
    }
}

pub fn parse(frame: &str) -> Result<Packet<'_>, ParseError> {
    let mut chars = frame.chars();
    let engine = chars.next().ok_or(ParseError::Empty)?;
    let rest = chars.as_str();
    match engine {
        '0' => Ok(Packet::Open(rest)),
        '1' => Ok(Packet::Close),
        '2' => Ok(Packet::Ping),
        '3' => Ok(Packet::Pong),
        '6' => Ok(Packet::Noop),
        '4' => parse_socket(rest),
        c => Err(ParseError::UnknownEnginePacket(c)),
    }
}

fn parse_socket(packet: &str) -> Result<Packet<'_>, ParseError> {
    let mut chars = packet.chars();
    let kind = chars.next().ok_or(ParseError::Empty)?;
    let rest = chars.as_str();
    if rest.starts_with('/') {
        return Err(ParseError::Unsupported);
    }
    match kind {
        '0' => Ok(Packet::Connect(rest)),
        '1' => Ok(Packet::Disconnect),
        '4' => Ok(Packet::ConnectError(rest)),
        '2' => {
            let (ack, args) = leading_number(rest);
            if ack.is_none() && args.len() != rest.len() {
                return Err(ParseError::BadEvent);
            }
            let name = event_name(args).ok_or(ParseError::BadEvent)?;
            Ok(Packet::Event { name, ack, args })
        }
        '3' => {
            let (id, args) = leading_number(rest);
            let id = id.ok_or(ParseError::BadAck)?;
            if !args.starts_with('[') {
                return Err(ParseError::BadAck);
            }
            Ok(Packet::Ack { id, args })
        }
        '5' | '6' => Err(ParseError::Unsupported),
        c => Err(ParseError::UnknownSocketPacket(c)),
    }
}

/// The ping interval and timeout (ms) of an Engine.IO open packet.
pub fn open_timings(open: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(open).ok()?;
    Some((
        v.get("pingInterval")?.as_u64()?,
        v.get("pingTimeout")?.as_u64()?,
    ))
}

/// `40` or `40{auth}`: the Socket.IO connect request of the default namespace.
pub fn connect_request(auth_token: Option<&str>) -> String {
    match auth_token {
        None => "40".to_owned(),
        Some(t) => format!("40{}", serde_json::json!({ "token": t })),
    }
}

/// `42<ack>["event",<json data>]`: an event that wants an acknowledgement.
pub fn event_with_ack(out: &mut String, ack: u64, event: &str, data_json: &str) {
    out.clear();
    let _ = write!(out, "42{ack}[\"{event}\",{data_json}]");
}

/// The marker every load-generator message text starts with: `t=<unix nanos>;`.
pub const STAMP_PREFIX: &str = "t=";

/// A message text of exactly `size` bytes (at least the stamp) carrying `sent_ns`.
pub fn stamped_text(out: &mut String, sent_ns: u64, size: usize) {
    out.clear();
    let _ = write!(out, "{STAMP_PREFIX}{sent_ns};");
    while out.len() < size {
        out.push('x');
    }
}

/// The send timestamp of a `receive_message` event's arguments, when the text is one of ours.
/// Looks only for `"message":"t=<digits>;`, so it works whatever the field order.
pub fn stamp_of(args: &str) -> Option<u64> {
    let key = "\"message\":\"t=";
    let at = args.find(key)? + key.len();
    let (n, rest) = leading_number(&args[at..]);
    if rest.starts_with(';') { n } else { None }
}

/// Whether an acknowledgement's arguments are `[{"ok":true,...}]`.
pub fn ack_ok(args: &str) -> bool {
    let inner = args.trim_start_matches('[').trim_start();
    inner.starts_with("{\"ok\":true") || {
        // Any other field order: parse (rare path).
        serde_json::from_str::<serde_json::Value>(args)
            .ok()
            .and_then(|v| v.get(0)?.get("ok")?.as_bool())
            .unwrap_or(false)
    }
}

/// The error code of a failed acknowledgement (`[{"ok":false,"error":{"code":"..."}}]`).
pub fn ack_error_code(args: &str) -> String {
    serde_json::from_str::<serde_json::Value>(args)
        .ok()
        .and_then(|v| {
            v.get(0)?
                .get("error")?
                .get("code")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "malformed_ack".to_owned())
}

/// The value of a top-level string field of the first ack argument, found by text (the ids of
/// `send_message` acks): `"id":"<value>"`.
pub fn ack_string_field<'a>(args: &'a str, field: &str) -> Option<&'a str> {
    let key = format!("\"{field}\":\"");
    let at = args.find(&key)? + key.len();
    let end = args[at..].find('"')?;
    Some(&args[at..at + end])
}

/// The member index of a `reaction` event's reactor, when it is a load-generator connection
/// (`"username":"u<index>"`, as the connections join without auth).
pub fn reactor_index(args: &str) -> Option<usize> {
    let key = "\"username\":\"u";
    let at = args.find(key)? + key.len();
    let (n, rest) = leading_number(&args[at..]);
    if rest.starts_with('"') {
        n.and_then(|n| usize::try_from(n).ok())
    } else {
        None
    }
}

/// How many messages a `get_history` ack holds (`[{"ok":true,"messages":[...],...}]`).
pub fn history_len(args: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(args).ok()?;
    Some(v.get(0)?.get("messages")?.as_array()?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        assert_eq!(
            parse(r#"0{"sid":"a","pingInterval":25000,"pingTimeout":20000}"#),
            Ok(Packet::Open(
                r#"{"sid":"a","pingInterval":25000,"pingTimeout":20000}"#
            ))
        );
        assert_eq!(parse("2"), Ok(Packet::Ping));
        assert_eq!(parse("3"), Ok(Packet::Pong));
        assert_eq!(parse("1"), Ok(Packet::Close));
        assert_eq!(parse("6"), Ok(Packet::Noop));
        assert_eq!(parse(""), Err(ParseError::Empty));
        assert_eq!(parse("9"), Err(ParseError::UnknownEnginePacket('9')));
        assert_eq!(parse("é"), Err(ParseError::UnknownEnginePacket('é')));
        assert_eq!(
            open_timings(r#"{"sid":"a","pingInterval":25000,"pingTimeout":20000}"#),
            Some((25000, 20000))
        );
        assert_eq!(open_timings("{"), None);
    }

    #[test]
    fn socket_packets() {
        assert_eq!(
            parse(r#"40{"sid":"x"}"#),
            Ok(Packet::Connect(r#"{"sid":"x"}"#))
        );
        assert_eq!(
            parse(r#"44{"message":"no"}"#),
            Ok(Packet::ConnectError(r#"{"message":"no"}"#))
        );
        assert_eq!(parse("41"), Ok(Packet::Disconnect));
        assert_eq!(
            parse(r#"42["receive_message",{"message":"hi"}]"#),
            Ok(Packet::Event {
                name: "receive_message",
                ack: None,
                args: r#"["receive_message",{"message":"hi"}]"#
            })
        );
        assert_eq!(
            parse(r#"4217["ping_me"]"#),
            Ok(Packet::Event {
                name: "ping_me",
                ack: Some(17),
                args: r#"["ping_me"]"#
            })
        );
        assert_eq!(
            parse(r#"43123[{"ok":true}]"#),
            Ok(Packet::Ack {
                id: 123,
                args: r#"[{"ok":true}]"#
            })
        );
        assert_eq!(parse("43[{}]"), Err(ParseError::BadAck));
        assert_eq!(parse("4312"), Err(ParseError::BadAck));
        assert_eq!(parse("42{}"), Err(ParseError::BadEvent));
        assert_eq!(parse(r#"42["a\"b"]"#), Err(ParseError::BadEvent));
        assert_eq!(parse("42/admin,[\"x\"]"), Err(ParseError::Unsupported));
        assert_eq!(parse("451-[\"x\"]"), Err(ParseError::Unsupported));
        assert_eq!(parse("4"), Err(ParseError::Empty));
        assert_eq!(parse("49"), Err(ParseError::UnknownSocketPacket('9')));
        assert_eq!(
            parse("4399999999999999999999999[]"),
            Err(ParseError::BadAck),
            "overflowing ack ids are errors, not panics"
        );
    }

    #[test]
    fn outgoing_packets() {
        assert_eq!(connect_request(None), "40");
        assert_eq!(connect_request(Some("a\"b")), r#"40{"token":"a\"b"}"#);
        let mut out = String::new();
        event_with_ack(&mut out, 7, "join_room", r#"{"room":"r"}"#);
        assert_eq!(out, r#"427["join_room",{"room":"r"}]"#);
        assert!(matches!(
            parse(&out),
            Ok(Packet::Event {
                name: "join_room",
                ack: Some(7),
                ..
            })
        ));
    }

    #[test]
    fn stamps_round_trip_in_any_field_order() {
        let mut text = String::new();
        stamped_text(&mut text, 1_732_531_200_123_456_789, 100);
        assert_eq!(text.len(), 100);
        let chatify = format!(
            r#"["receive_message",{{"id":"0193","room":"r","username":"u","message":"{text}","createdTime":1}}]"#
        );
        assert_eq!(stamp_of(&chatify), Some(1_732_531_200_123_456_789));
        let other = format!(r#"["receive_message",{{"message":"{text}","id":"x"}}]"#);
        assert_eq!(stamp_of(&other), Some(1_732_531_200_123_456_789));
        assert_eq!(
            stamp_of(r#"["receive_message",{"username":"ChatBot","message":"Welcome u"}]"#),
            None
        );
        assert_eq!(stamp_of(r#"["receive_message",{"message":"t=12"}]"#), None);
        stamped_text(&mut text, 5, 1);
        assert_eq!(text, "t=5;", "a stamp is never cut short");
    }

    #[test]
    fn acks() {
        assert!(ack_ok(r#"[{"ok":true,"id":"a","createdTime":1}]"#));
        assert!(ack_ok(r#"[{"id":"a","ok":true}]"#));
        assert!(!ack_ok(
            r#"[{"ok":false,"error":{"code":"rate_limited","message":"x"}}]"#
        ));
        assert!(!ack_ok("[]"));
        assert!(!ack_ok("[garbage"));
        assert_eq!(
            ack_error_code(r#"[{"ok":false,"error":{"code":"rate_limited","message":"x"}}]"#),
            "rate_limited"
        );
        assert_eq!(ack_error_code("[1]"), "malformed_ack");
        assert_eq!(
            ack_string_field(r#"[{"ok":true,"id":"0193-ab","createdTime":1}]"#, "id"),
            Some("0193-ab")
        );
        assert_eq!(ack_string_field(r#"[{"ok":true}]"#, "id"), None);
        assert_eq!(
            history_len(r#"[{"ok":true,"messages":[{"id":"a"},{"id":"b"}],"hasMore":true}]"#),
            Some(2)
        );
        assert_eq!(history_len(r#"[{"ok":false}]"#), None);
    }

    #[test]
    fn reactors() {
        assert_eq!(
            reactor_index(
                r#"["reaction",{"room":"r","id":"x","emoji":"a","add":true,"reactions":{"a":1},"username":"u17"}]"#
            ),
            Some(17)
        );
        assert_eq!(reactor_index(r#"["reaction",{"username":"u17x"}]"#), None);
        assert_eq!(reactor_index(r#"["reaction",{"userId":"s"}]"#), None);
    }
}
