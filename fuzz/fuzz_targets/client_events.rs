//! Any bytes a client could put in an event payload: decoding and checking must never panic,
//! and whatever is accepted must be within the limits and map to a single safe subject token.
#![no_main]

use chatify_gateway::payload;
use chatify_shared::config::Limits;
use chatify_shared::subjects::RoomToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let limits = Limits::default();
    let rooms = [
        payload::join(&value, &limits).map(|j| j.room),
        payload::send(&value, &limits).map(|s| {
            assert!(!s.message.is_empty() && s.message.len() <= limits.message_max_bytes);
            s.room
        }),
        payload::leave(&value, &limits),
        payload::history(&value, &limits).map(|h| {
            assert!((1..=100).contains(&h.limit));
            h.room
        }),
        payload::typing(&value, &limits).map(|t| t.room),
    ];
    for room in rooms.into_iter().flatten() {
        assert!(room.chars().count() <= limits.room_max_chars);
        assert!(!room.chars().any(char::is_control));
        let token = RoomToken::new(&room);
        assert!(token.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(RoomToken::decode(token.as_str()).as_deref(), Some(room.as_str()));
    }
});
