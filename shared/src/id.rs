//! Message ids: UUIDv7, assigned once by the gateway that accepts a message.
//!
//! A UUIDv7 starts with a 48-bit millisecond timestamp, and `Uuid::now_v7` keeps ids made in one
//! process strictly increasing (a counter fills the bits below the timestamp), so the hyphenated
//! lower-case text of ids sorts in the order they were made. History storage keys rely on that.

use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// A new message id and its creation time in milliseconds since the epoch, read from the id
/// itself so the two can never disagree.
pub fn new_message_id() -> (Uuid, i64) {
    let id = Uuid::now_v7();
    (id, created_time_of(&id).unwrap_or_else(now_millis))
}

/// The millisecond timestamp embedded in a UUIDv7, or `None` for other versions.
pub fn created_time_of(id: &Uuid) -> Option<i64> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()
        .map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}

/// Milliseconds since the epoch, for notices that carry no id.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_in_a_row_sort_as_text_in_creation_order() {
        let ids: Vec<String> = (0..10_000)
            .map(|_| new_message_id().0.to_string())
            .collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn created_time_comes_from_the_id_and_is_now() {
        let before = now_millis();
        let (id, created) = new_message_id();
        let after = now_millis();
        assert_eq!(Some(created), created_time_of(&id));
        assert!(
            before <= created && created <= after,
            "{before} <= {created} <= {after}"
        );
    }

    #[test]
    fn non_v7_ids_have_no_created_time() {
        assert_eq!(created_time_of(&Uuid::nil()), None);
    }
}
