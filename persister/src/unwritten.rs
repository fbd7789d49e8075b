//! Messages and changes JetStream has accepted (so their senders got an ack) that may not be in
//! HarperDB yet. History answers include them, so a client that rejoins with `since` right
//! after its sends were acked gets every one of them, even before the writer's batch lands,
//! and sees every message as it is now (the unwritten changes applied to it).
//!
//! Every message at or below the consumer's ack floor has been written (acks come only after
//! the write). The ack floor is read before HarperDB is queried; the room's messages above it
//! are then read from the stream itself and merged into the answer.

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use chatify_shared::changes::MessageState;
use chatify_shared::subjects::{PERSISTER_CONSUMER, RoomToken};
use chatify_shared::wire::HistoryQuery;

use crate::event::{StreamEvent, apply_changes, is_change};
use crate::harperdb::StatePage;

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

    /// The room's events (messages and changes) in the stream after `floor`, oldest first;
    /// [`UnwrittenError::TooMany`] once more than `max` follow (each is one request to the
    /// stream).
    pub async fn room_after(
        &self,
        room: &str,
        floor: u64,
        max: usize,
    ) -> Result<Vec<StreamEvent>, UnwrittenError> {
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
                    match StreamEvent::decode(is_change(Some(&m.headers)), m.sequence, &m.payload) {
                        Ok(event) => found.push(event),
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
/// events: messages within the query's bounds count too, duplicates once, newest `limit` kept;
/// then the unwritten changes are applied to the page's messages, in order (a change a stored
/// state already holds is seen and applied once: [`MessageState::apply`]).
pub fn merge(query: &HistoryQuery, stored: StatePage, unwritten: &[StreamEvent]) -> StatePage {
    let (after, before) = query.sequence_bounds();
    let mut all: Vec<MessageState> = stored.states;
    let stored_count = all.len();
    all.extend(unwritten.iter().filter_map(|event| match event {
        StreamEvent::Message(m) if after < m.sequence() && m.sequence() < before => {
            Some(MessageState::new(m.clone()))
        }
        _ => None,
    }));
    let mut page = if all.len() == stored_count {
        StatePage {
            states: all,
            has_more: stored.has_more,
        }
    } else {
        all.sort_by_key(|s| s.message.sequence());
        all.dedup_by(|a, b| a.message.id == b.message.id);
        let limit = query.limit as usize;
        let has_more = stored.has_more || all.len() > limit;
        let skip = all.len().saturating_sub(limit);
        StatePage {
            states: all.split_off(skip),
            has_more,
        }
    };
    apply_changes(&mut page.states, unwritten);
    page
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chatify_shared::wire::{ChatMessage, StoredMessage};
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

    fn states(messages: &[ChatMessage]) -> Vec<MessageState> {
        messages.iter().cloned().map(MessageState::new).collect()
    }

    fn events(messages: &[ChatMessage]) -> Vec<StreamEvent> {
        messages.iter().cloned().map(StreamEvent::Message).collect()
    }

    #[test]
    fn unwritten_messages_complete_the_newest_page() {
        let all = msgs(10);
        let stored = StatePage {
            states: states(&all[2..7]),
            has_more: true,
        };
        // 6 is both written and still above the floor: it counts once.
        let page = merge(&query(5, None, None), stored, &events(&all[6..]));
        assert_eq!(page.states, states(&all[5..]));
        assert!(page.has_more);
    }

    #[test]
    fn bounds_apply_to_unwritten_messages() {
        let all = msgs(10);
        let stored = StatePage {
            states: states(&all[4..6]),
            has_more: false,
        };
        let page = merge(
            &query(100, Some(all[3].id), Some(all[8].id)),
            stored,
            &events(&all[6..]),
        );
        assert_eq!(page.states, states(&all[4..8]));
        assert!(!page.has_more);
    }

    #[test]
    fn nothing_unwritten_leaves_the_page_as_it_was() {
        let all = msgs(3);
        let stored = StatePage {
            states: states(&all),
            has_more: true,
        };
        let page = merge(&query(3, None, None), stored.clone(), &[]);
        assert_eq!(page, stored);
    }

    #[test]
    fn unwritten_changes_apply_to_stored_and_unwritten_messages_once() {
        use chatify_shared::changes::{Actor, Change, StoredChange};
        let all = msgs(4);
        let edit = |target: &ChatMessage, text: &str| StoredChange {
            room: "r".into(),
            target: target.id,
            change: Change::Edit {
                message: text.into(),
            },
            at: 1,
            by: Actor {
                member_id: "m".into(),
                username: "u".into(),
                user_id: None,
            },
        };
        // The stored state of 100 already holds the change at 200 (written meanwhile).
        let mut first = MessageState::new(all[0].clone());
        first.apply(200, &edit(&all[0], "once"));
        let stored = StatePage {
            states: vec![first, MessageState::new(all[1].clone())],
            has_more: false,
        };
        let tail = vec![
            StreamEvent::Message(all[2].clone()),
            StreamEvent::Change {
                sequence: 200,
                change: edit(&all[0], "once"),
            },
            StreamEvent::Change {
                sequence: 201,
                change: edit(&all[2], "tail"),
            },
        ];
        let page = merge(&query(10, None, None), stored, &tail);
        let texts: Vec<&str> = page
            .states
            .iter()
            .map(|s| s.message.message.as_str())
            .collect();
        assert_eq!(texts, ["once", "m1", "tail"]);
        assert_eq!(page.states[0].version, 200);
        assert_eq!(page.states[2].version, 201);
    }
}
