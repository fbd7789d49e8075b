//! Messages JetStream has accepted (so their senders got an ack) that may not be in HarperDB
//! yet. History answers include them, so a client that rejoins with `since` right after its
//! sends were acked gets every one of them, even before the writer's batch lands.
//!
//! Every message at or below the consumer's ack floor has been written (acks come only after
//! the write). The ack floor is read before HarperDB is queried; the room's messages above it
//! are then read from the stream itself and merged into the answer.

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use chatify_shared::subjects::{PERSISTER_CONSUMER, RoomToken};
use chatify_shared::wire::{ChatMessage, HistoryPage, HistoryQuery, StoredMessage};

/// The most unwritten messages of one room read for one answer; beyond that the writer is far
/// behind (HarperDB was down) and history answers `unavailable` until it catches up.
pub const MAX_UNWRITTEN: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum UnwrittenError {
    #[error("could not read the consumer's progress: {0}")]
    Floor(String),
    #[error("could not read unwritten messages from the stream: {0}")]
    Read(String),
    #[error("more than {0} messages of the room follow")]
    TooMany(usize),
}

#[derive(Clone)]
pub struct Unwritten {
    stream: Stream,
}

impl Unwritten {
    pub fn new(stream: Stream) -> Self {
        Self { stream }
    }

    /// The stream sequence up to which every message is in HarperDB.
    pub async fn floor(&self) -> Result<u64, UnwrittenError> {
        match self.stream.consumer_info(PERSISTER_CONSUMER).await {
            Ok(info) => Ok(info.ack_floor.stream_sequence),
            Err(e) => Err(UnwrittenError::Floor(e.to_string())),
        }
    }

    /// The room's messages in the stream after `floor`, oldest first; [`UnwrittenError::TooMany`]
    /// once more than `max` follow (each is one request to the stream).
    pub async fn room_after(
        &self,
        room: &str,
        floor: u64,
        max: usize,
    ) -> Result<Vec<ChatMessage>, UnwrittenError> {
        let subject = RoomToken::new(room).store_subject();
        let mut found = Vec::new();
        let mut next = floor + 1;
        loop {
            match self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(m) => {
                    next = m.sequence + 1;
                    match serde_json::from_slice::<StoredMessage>(&m.payload) {
                        Ok(stored) => found.push(stored.into_message(m.sequence)),
                        Err(e) => {
                            tracing::warn!(error = %e, seq = m.sequence, "undecodable message skipped")
                        }
                    }
                    if found.len() > max {
                        return Err(UnwrittenError::TooMany(max));
                    }
                }
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(found),
                Err(e) => return Err(UnwrittenError::Read(e.to_string())),
            }
        }
    }
}

/// Merges the newest stored page (`stored`, oldest first, with its `has_more`) with unwritten
/// messages: those within the query's bounds count too, duplicates once, newest `limit` kept.
pub fn merge(
    query: &HistoryQuery,
    stored: HistoryPage,
    unwritten: Vec<ChatMessage>,
) -> HistoryPage {
    let (after, before) = query.sequence_bounds();
    let in_bounds = |m: &ChatMessage| after < m.sequence() && m.sequence() < before;
    let mut all: Vec<ChatMessage> = stored.messages;
    let stored_count = all.len();
    all.extend(unwritten.into_iter().filter(in_bounds));
    if all.len() == stored_count {
        return HistoryPage {
            messages: all,
            has_more: stored.has_more,
            ..HistoryPage::default()
        };
    }
    all.sort_by_key(ChatMessage::sequence);
    all.dedup_by(|a, b| a.id == b.id);
    let limit = query.limit as usize;
    let has_more = stored.has_more || all.len() > limit;
    let skip = all.len().saturating_sub(limit);
    HistoryPage {
        messages: all.split_off(skip),
        has_more,
        ..HistoryPage::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use uuid::Uuid;

    /// Messages in stream order whose creation times run backwards (two gateways' clocks may
    /// disagree): stream order must win.
    fn msgs(n: usize) -> Vec<ChatMessage> {
        (0..n)
            .map(|i| {
                StoredMessage {
                    room: "r".into(),
                    username: "u".into(),
                    message: format!("m{i}"),
                    created_time: 1_700_000_000_000 - i as i64,
                    user_id: None,
                    ..StoredMessage::default()
                }
                .into_message(100 + i as u64)
            })
            .collect()
    }

    /// A query of room `r` (shared with [`crate::recent`]'s tests).
    pub(crate) fn query(limit: u32, after: Option<Uuid>, before: Option<Uuid>) -> HistoryQuery {
        HistoryQuery {
            room: "r".into(),
            before,
            after,
            limit,
            ..HistoryQuery::default()
        }
    }

    #[test]
    fn unwritten_messages_complete_the_newest_page() {
        let all = msgs(10);
        let stored = HistoryPage {
            messages: all[2..7].to_vec(),
            has_more: true,
            ..HistoryPage::default()
        };
        // 6 is both written and still above the floor: it counts once.
        let page = merge(&query(5, None, None), stored, all[6..].to_vec());
        assert_eq!(page.messages, all[5..].to_vec());
        assert!(page.has_more);
    }

    #[test]
    fn bounds_apply_to_unwritten_messages() {
        let all = msgs(10);
        let stored = HistoryPage {
            messages: all[4..6].to_vec(),
            has_more: false,
            ..HistoryPage::default()
        };
        let page = merge(
            &query(100, Some(all[3].id), Some(all[8].id)),
            stored,
            all[6..].to_vec(),
        );
        assert_eq!(page.messages, all[4..8].to_vec());
        assert!(!page.has_more);
    }

    #[test]
    fn nothing_unwritten_leaves_the_page_as_it_was() {
        let all = msgs(3);
        let stored = HistoryPage {
            messages: all.clone(),
            has_more: true,
            ..HistoryPage::default()
        };
        let page = merge(&query(3, None, None), stored.clone(), Vec::new());
        assert_eq!(page, stored);
    }
}
