//! Message ids: UUIDv7 made from a message's creation time and its sequence in the messages
//! stream.
//!
//! The stream's order is the one order of a room: JetStream republishes stored messages in it
//! (so every gateway delivers a room's messages in it) and the persister stores them under keys
//! that sort by it (so history has it too). An id carries its message's place in that order, so
//! `since` and `before` cursors need no lookup: the 48-bit millisecond timestamp of a UUIDv7 is
//! the creation time (ids stay time-sortable, as the contract promises) and the 62 bits of
//! `rand_b` hold the stream sequence; `rand_a` is zero, which marks the layout.
//!
//! Nobody picks an id before the message is stored: the gateway computes it from the PubAck's
//! sequence, receivers and the persister from the sequence JetStream gives them, so everyone
//! gets the same id, and a deduplicated retry gets the first message's.

use std::time::{SystemTime, UNIX_EPOCH};

use uuid::{Builder, Uuid};

/// Stream sequences an id can hold: 62 bits.
const SEQUENCE_MASK: u64 = (1 << 62) - 1;

/// The id of the message created at `created_time` (ms since the epoch) and stored at `sequence`.
pub fn message_id(created_time: i64, sequence: u64) -> Uuid {
    let mut bytes = [0u8; 10];
    bytes[2..].copy_from_slice(&(sequence & SEQUENCE_MASK).to_be_bytes());
    let millis = u64::try_from(created_time).unwrap_or(0);
    Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
}

/// The stream sequence an id made by [`message_id`] carries, or `None` for any other UUID.
pub fn sequence_of(id: &Uuid) -> Option<u64> {
    let b = id.as_bytes();
    if id.get_version_num() != 7 || b[6] & 0x0f != 0 || b[7] != 0 {
        return None;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&b[8..]);
    Some(u64::from_be_bytes(low) & SEQUENCE_MASK)
}

/// The millisecond timestamp embedded in a UUIDv7, or `None` for other versions.
pub fn created_time_of(id: &Uuid) -> Option<i64> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()
        .map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}

/// Milliseconds since the epoch.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn an_id_gives_back_its_sequence_and_time(
            created in 0i64..(1 << 47),
            sequence in 0u64..=SEQUENCE_MASK,
        ) {
            let id = message_id(created, sequence);
            prop_assert_eq!(id.get_version_num(), 7);
            prop_assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            prop_assert_eq!(sequence_of(&id), Some(sequence));
            prop_assert_eq!(created_time_of(&id), Some(created));
        }

        #[test]
        fn ids_sort_by_creation_time(a in 0i64..(1 << 47), b in 0i64..(1 << 47), s in 1u64..1_000_000, t in 1u64..1_000_000) {
            prop_assume!(a < b);
            prop_assert!(message_id(a, s).to_string() < message_id(b, t).to_string());
        }
    }

    #[test]
    fn other_uuids_carry_no_sequence() {
        assert_eq!(sequence_of(&Uuid::nil()), None);
        assert_eq!(sequence_of(&Uuid::new_v4()), None);
        // A random UUIDv7 has rand_a set (all but 1 in 4096 of them).
        let random_v7 = Uuid::from_u128(Uuid::now_v7().as_u128() | (0x123 << 64));
        assert_eq!(sequence_of(&random_v7), None);
    }

    #[test]
    fn the_text_is_a_uuid_v7() {
        let id = message_id(1_700_000_000_123, 42);
        let text = id.to_string();
        // The same text tests/faults/checker.test.mjs decodes.
        assert_eq!(text, "018bcfe5-687b-7000-8000-00000000002a");
        assert_eq!(Uuid::parse_str(&text).ok(), Some(id));
        assert_eq!(sequence_of(&id), Some(42));
    }
}
