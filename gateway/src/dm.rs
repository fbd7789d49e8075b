//! Direct messages: the private room of two users. Its name says who they are, so checking
//! that a user may use it needs nothing but the name: `dm:` then both user ids (the tokens'
//! `sub`), each unpadded base64url, the smaller first, joined by `.` (which base64url never
//! holds). The same two users always get the same room, whichever of them opens it. Names
//! starting with `dm:` are reserved: only the two users of a well-formed name may use the room.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What every direct-message room's name starts with.
pub const PREFIX: &str = "dm:";

/// The longest direct-message room name: two ids of the longest accepted `sub` (256 bytes).
pub const NAME_MAX_CHARS: usize = PREFIX.len() + 2 * 342 + 1;

/// Whether `room` is in the reserved name space of direct messages.
pub fn is_dm(room: &str) -> bool {
    room.starts_with(PREFIX)
}

/// The room of users `a` and `b`.
pub fn room_of(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(first),
        URL_SAFE_NO_PAD.encode(second)
    )
}

/// The two users of a direct-message room; `None` when the name is not one [`room_of`] makes.
pub fn participants(room: &str) -> Option<(String, String)> {
    let (a, b) = room.strip_prefix(PREFIX)?.split_once('.')?;
    let decode = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|id| !id.is_empty())
    };
    let (a, b) = (decode(a)?, decode(b)?);
    // Only the canonical name of two users: the same two must not get a second room, and a
    // room of one user is no direct-message room.
    (a != b && room_of(&a, &b) == room).then_some((a, b))
}

/// Whether `user_id` is one of the two users of `room`.
pub fn is_participant(room: &str, user_id: &str) -> bool {
    participants(room).is_some_and(|(a, b)| a == user_id || b == user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_users_have_one_room_whoever_opens_it() {
        let room = room_of("bob", "ann");
        assert_eq!(room, room_of("ann", "bob"));
        assert!(is_dm(&room));
        assert_eq!(
            participants(&room),
            Some(("ann".to_owned(), "bob".to_owned()))
        );
        assert!(is_participant(&room, "ann") && is_participant(&room, "bob"));
        assert!(!is_participant(&room, "cy"));
        assert_ne!(room, room_of("ann", "bo"));
        // Ids with the separators of other schemes stay apart.
        let tricky = room_of("a.b", "c:d");
        assert_eq!(
            participants(&tricky),
            Some(("a.b".to_owned(), "c:d".to_owned()))
        );
    }

    #[test]
    fn only_canonical_names_have_participants() {
        let room = room_of("ann", "bob");
        let (a, b) = room
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once('.'))
            .unwrap_or_default();
        assert_eq!(participants(&format!("{PREFIX}{b}.{a}")), None, "swapped");
        for bad in [
            "dm:",
            "dm:foo",
            "dm:.",
            "dm:YW5u",
            "dm:YW5u.",
            "dm:YW5u.Ym9i.Y3k",
            "dm:!!.Ym9i",
        ] {
            assert_eq!(participants(bad), None, "{bad}");
            assert!(is_dm(bad));
        }
        let longest = "x".repeat(256);
        assert!(room_of(&longest, &"y".repeat(256)).chars().count() <= NAME_MAX_CHARS);
        assert_eq!(
            participants(&room_of("ann", "ann")),
            None,
            "a room of one user"
        );
    }
}
