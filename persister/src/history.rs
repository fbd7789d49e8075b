//! The history service: answers [`HistoryQuery`] requests on the NATS service API, so every
//! running persister shares the load (the service API subscribes in a queue group).
//!
//! Every answer shows messages as they are now: HarperDB's rows hold each message's state as
//! of the changes written, and the changes the stream holds above the consumer's ack floor
//! (not written yet) are applied on top ([`crate::unwritten`]). Besides pages, a query may ask
//! for messages by id (their states and the stream sequence they reflect, `asOf`), for the
//! changes after a cursor (from the change log table and the unwritten tail, collapsed), and
//! for a user's unread count.

use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};

use chatify_shared::changes::{ChangeEntry, MessageState, collapse};
use chatify_shared::storage::{RoomKey, storage_key};
use chatify_shared::subjects::{HISTORY_SERVICE, HISTORY_SUBJECT};
use chatify_shared::wire::{HistoryPage, HistoryQuery, UnreadQuery};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::event::{StreamEvent, apply_changes};
use crate::harperdb::{HarperDb, HarperError};
use crate::recent::{KEEP_PER_ROOM, Recent};
use crate::unwritten::{self, Unwritten, UnwrittenError};

/// Requests answered at once by one persister; more wait in the subscription.
const CONCURRENT_QUERIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HistoryServiceError {
    #[error("could not register the {HISTORY_SERVICE} service: {0}")]
    Register(String),
}

/// The history service's bounds (settings: see [`chatify_shared::config::PersisterSettings`]).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most bytes of recent messages kept in memory (see [`crate::recent`]).
    pub cache_bytes: usize,
    /// Most rooms kept there.
    pub cache_rooms: usize,
    /// Most messages read to count a user's unread ones; beyond, the count is
    /// [`HistoryQuery::UNREAD_MAX`] (at least that many, as far as it can tell).
    pub unread_scan: usize,
    /// Most change log records read for the changes after a cursor; beyond, the answer keeps
    /// the latest and says `changesCut`.
    pub changes_scan: usize,
}

/// What answers a query: HarperDB, the stream's unwritten tail, and the recent messages.
struct Sources {
    db: HarperDb,
    unwritten: Unwritten,
    recent: Recent,
    bounds: Bounds,
}

/// Why part of an answer could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Stored(#[from] HarperError),
    #[error(transparent)]
    Unwritten(#[from] UnwrittenError),
}

impl From<ReadError> for service::error::Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Stored(e) if !e.is_outage() => {
                tracing::warn!(error = %e, "history query failed");
                service::error::Error {
                    status: format!("history query failed: {e}"),
                    code: 503,
                }
            }
            e => unavailable(&e),
        }
    }
}

/// Serves history queries until `shutdown`; queries in flight are finished first.
pub async fn serve(
    client: async_nats::Client,
    db: HarperDb,
    unwritten: Unwritten,
    bounds: Bounds,
    shutdown: CancellationToken,
) -> Result<(), HistoryServiceError> {
    let service = client
        .service_builder()
        .description("Chatify message history")
        .start(HISTORY_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| HistoryServiceError::Register(e.to_string()))?;
    let endpoint = service
        .endpoint_builder()
        .name("query")
        .add(HISTORY_SUBJECT)
        .await
        .map_err(|e| HistoryServiceError::Register(e.to_string()))?;
    let sources = Arc::new(Sources {
        db,
        unwritten,
        recent: Recent::new(bounds.cache_bytes, bounds.cache_rooms),
        bounds,
    });
    endpoint
        .take_until(shutdown.cancelled())
        .for_each_concurrent(CONCURRENT_QUERIES, |request| {
            let sources = sources.clone();
            async move {
                let started = std::time::Instant::now();
                let answer = answer(&sources, &request.message.payload).await;
                let outcome = if answer.is_ok() { "ok" } else { "error" };
                metrics::histogram!(crate::metrics::HISTORY_DURATION, "outcome" => outcome)
                    .record(started.elapsed().as_secs_f64());
                if let Err(e) = request.respond(answer).await {
                    tracing::warn!(error = %e, "could not send a history answer");
                }
            }
        })
        .await;
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "could not stop the history service cleanly");
    }
    Ok(())
}

/// Decodes, checks and runs one query. Errors are service errors with HTTP-like codes:
/// 400 for a bad query, 503 when HarperDB can't answer.
async fn answer(sources: &Sources, payload: &[u8]) -> Result<Bytes, service::error::Error> {
    let query: HistoryQuery =
        serde_json::from_slice(payload).map_err(|e| service::error::Error {
            status: format!("invalid history query: {e}"),
            code: 400,
        })?;
    query.validate().map_err(|e| service::error::Error {
        status: format!("invalid history query: {e}"),
        code: 400,
    })?;
    let page = if query.ids.is_empty() {
        // Whether the room's recent messages are as current as the page (it came from them,
        // or filled them).
        let (mut page, fresh) = match cached(sources, &query).await {
            Some(page) => {
                metrics::counter!(crate::metrics::HISTORY_CACHE, "outcome" => "hit").increment(1);
                (page, true)
            }
            None => {
                metrics::counter!(crate::metrics::HISTORY_CACHE, "outcome" => "miss").increment(1);
                let latest = query.after.is_none() && query.before.is_none();
                (uncached(sources, &query).await?, latest)
            }
        };
        if query.changes
            && let Some(after) = query.after
        {
            let after = chatify_shared::id::sequence_of(&after).unwrap_or(0);
            let (changes, cut) = changes_after(sources, &query.room, after).await?;
            page.changes = changes;
            page.changes_cut = cut;
        }
        if let Some(unread_query) = &query.unread {
            let marker = unread_query
                .after
                .and_then(|id| chatify_shared::id::sequence_of(&id))
                .unwrap_or(0);
            let from_recent = fresh
                .then(|| {
                    sources.recent.unread(
                        &query.room,
                        marker,
                        &unread_query.user_id,
                        HistoryQuery::UNREAD_MAX,
                    )
                })
                .flatten();
            page.unread = Some(match from_recent {
                Some(count) => count,
                None => unread(sources, &query.room, unread_query).await?,
            });
        }
        page
    } else {
        by_ids(sources, &query).await?
    };
    let (rooms, bytes) = sources.recent.size();
    metrics::gauge!(crate::metrics::HISTORY_CACHE_ROOMS).set(rooms as f64);
    metrics::gauge!(crate::metrics::HISTORY_CACHE_BYTES).set(bytes as f64);
    serde_json::to_vec(&page)
        .map(Bytes::from)
        .map_err(|e| service::error::Error {
            status: format!("could not encode the answer: {e}"),
            code: 500,
        })
}

fn unavailable(e: &dyn std::fmt::Display) -> service::error::Error {
    tracing::warn!(error = %e, "history query failed");
    service::error::Error {
        status: "message history is unavailable".into(),
        code: 503,
    }
}

/// The answer from the recent messages, brought up to date from the stream, when they hold
/// all of it. Only while HarperDB answers: during an outage history is `unavailable`, as the
/// guarantees promise, cached or not.
async fn cached(sources: &Sources, query: &HistoryQuery) -> Option<HistoryPage> {
    if !sources.db.answering() {
        return None;
    }
    let from = sources.recent.newest(&query.room)?;
    // Each message since the entry's newest is one request to the stream: beyond a room's worth
    // (the room had a busy while since the entry was last brought up to date, and reading it
    // all could outlast the gateway's request timeout) the uncached path answers sooner.
    match sources
        .unwritten
        .room_after(&query.room, from, KEEP_PER_ROOM)
        .await
    {
        Ok(later) => sources.recent.extend_and_answer(query, from, later),
        // Too far behind (more than a room's worth since the entry's newest) or the stream did
        // not answer: the entry goes, and the uncached path answers (a latest page refills it).
        Err(e) => {
            tracing::debug!(error = %e, "recent messages could not be brought up to date");
            sources.recent.forget(&query.room);
            None
        }
    }
}

/// The answer from HarperDB and the unwritten tail. A room's latest page is read
/// [`KEEP_PER_ROOM`] long and kept in the recent messages.
async fn uncached(
    sources: &Sources,
    query: &HistoryQuery,
) -> Result<HistoryPage, service::error::Error> {
    let latest = query.after.is_none() && query.before.is_none();
    let wanted = query.limit as usize;
    let query = &HistoryQuery {
        limit: if latest {
            query.limit.max(KEEP_PER_ROOM as u32)
        } else {
            query.limit
        },
        ..query.clone()
    };
    // The floor first: whatever is at or below it is in HarperDB by the time we query it.
    // Then HarperDB and the stream at once: a message written meanwhile is in both answers,
    // and merging counts it once.
    let floor = sources
        .unwritten
        .floor()
        .await
        .map_err(|e| unavailable(&e))?;
    let (stored, recent) = tokio::join!(
        sources.db.history_states(query),
        sources
            .unwritten
            .room_after(&query.room, floor, crate::unwritten::MAX_UNWRITTEN)
    );
    let stored = stored.map_err(|e| {
        tracing::warn!(error = %e, room_len = query.room.len(), "history query failed");
        service::error::Error {
            status: if e.is_outage() {
                "message history is unavailable".into()
            } else {
                format!("history query failed: {e}")
            },
            code: 503,
        }
    })?;
    let recent = recent.map_err(|e| unavailable(&e))?;
    let page = unwritten::merge(query, stored, &recent);
    if latest {
        sources.recent.fill(&query.room, &page, floor);
    }
    let mut page = page.into_page();
    if latest {
        // Back to the limit asked for.
        let skip = page.messages.len().saturating_sub(wanted);
        if skip > 0 {
            page.messages.drain(..skip);
            page.has_more = true;
        }
    }
    Ok(page)
}

/// The ack floor, then the room's unwritten events above it: read before HarperDB is, so
/// that whatever HarperDB holds at or below the floor is everything there.
async fn floor_and_tail(
    sources: &Sources,
    room: &str,
) -> Result<(u64, Vec<StreamEvent>), UnwrittenError> {
    let floor = sources.unwritten.floor().await?;
    let tail = sources
        .unwritten
        .room_after(room, floor, unwritten::MAX_UNWRITTEN)
        .await?;
    Ok((floor, tail))
}

/// The states of the messages of `room` at `sequences`: HarperDB's rows, and messages of the
/// unwritten `tail` HarperDB does not have yet (changes not applied).
async fn states_at(
    sources: &Sources,
    room: &str,
    sequences: &[u64],
    tail: &[StreamEvent],
) -> Result<Vec<MessageState>, HarperError> {
    let key = RoomKey::new(room);
    let keys: Vec<String> = sequences.iter().map(|s| storage_key(&key, *s)).collect();
    let mut states: Vec<MessageState> = sources
        .db
        .states(&keys)
        .await?
        .into_iter()
        .filter(|s| s.message.room == room && sequences.contains(&s.message.sequence()))
        .collect();
    let found: HashSet<u64> = states.iter().map(|s| s.message.sequence()).collect();
    states.extend(tail.iter().filter_map(|event| match event {
        StreamEvent::Message(m)
            if sequences.contains(&m.sequence()) && !found.contains(&m.sequence()) =>
        {
            Some(MessageState::new(m.clone()))
        }
        _ => None,
    }));
    states.sort_by_key(|s| s.message.sequence());
    Ok(states)
}

/// A lookup by ids: the messages' current states, and `as_of`, the stream sequence they are
/// complete up to. The floor is read first, then HarperDB, then the tail: a change HarperDB
/// holds above the floor is in the tail too, so `as_of` (the newest event read) is not below
/// any change a state holds, and every change of the room up to it is in the states.
async fn by_ids(sources: &Sources, query: &HistoryQuery) -> Result<HistoryPage, ReadError> {
    let mut sequences: Vec<u64> = query
        .ids
        .iter()
        .filter_map(chatify_shared::id::sequence_of)
        .collect();
    sequences.sort_unstable();
    sequences.dedup();
    let floor = sources.unwritten.floor().await?;
    let key = RoomKey::new(&query.room);
    let keys: Vec<String> = sequences.iter().map(|s| storage_key(&key, *s)).collect();
    let stored = sources.db.states(&keys).await?;
    let tail = sources
        .unwritten
        .room_after(&query.room, floor, unwritten::MAX_UNWRITTEN)
        .await?;
    let mut states: Vec<MessageState> = stored
        .into_iter()
        .filter(|s| s.message.room == query.room && query.ids.contains(&s.message.id))
        .collect();
    let found: HashSet<u64> = states.iter().map(|s| s.message.sequence()).collect();
    states.extend(tail.iter().filter_map(|event| match event {
        StreamEvent::Message(m) if query.ids.contains(&m.id) && !found.contains(&m.sequence()) => {
            Some(MessageState::new(m.clone()))
        }
        _ => None,
    }));
    states.sort_by_key(|s| s.message.sequence());
    apply_changes(&mut states, &tail);
    let as_of = tail.last().map_or(floor, |e| e.sequence().max(floor));
    Ok(HistoryPage {
        states,
        as_of,
        ..HistoryPage::default()
    })
}

/// What changed after stream sequence `after` in the messages of `room` at or before it, in
/// the order it happened, collapsed, at most [`HistoryQuery::CHANGES_MAX`] entries; and
/// whether older ones were left out.
///
/// Written changes come from the change log; the unwritten ones (above the floor) are applied
/// to their messages' states, read from HarperDB before the log is, so that a change written
/// meanwhile (its state holds it: seen) is in the log read after it (the writer logs a change
/// before it writes the state).
async fn changes_after(
    sources: &Sources,
    room: &str,
    after: u64,
) -> Result<(Vec<ChangeEntry>, bool), ReadError> {
    let (_, tail) = floor_and_tail(sources, room).await?;
    let mut targets: Vec<u64> = tail
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Change { change, .. } if change.target_sequence() <= after => {
                Some(change.target_sequence())
            }
            _ => None,
        })
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut states = if targets.is_empty() {
        Vec::new()
    } else {
        states_at(sources, room, &targets, &tail).await?
    };
    let (log, scan_cut) = sources
        .db
        .changes_after(room, after, sources.bounds.changes_scan)
        .await?;
    if scan_cut {
        metrics::counter!(crate::metrics::CHANGES_SCAN_CUT).increment(1);
    }
    let mut entries: BTreeMap<u64, ChangeEntry> = log
        .into_iter()
        .filter(|r| r.target_sequence <= after)
        .map(|r| (r.sequence, r.entry))
        .collect();
    let oldest_logged = entries.keys().next().copied();
    for event in &tail {
        let StreamEvent::Change { sequence, change } = event else {
            continue;
        };
        if change.target_sequence() > after {
            continue;
        }
        let Some(state) = states
            .iter_mut()
            .find(|s| s.message.id == change.target && s.message.room == change.room)
        else {
            continue;
        };
        // Applied in order whether logged or not, so that the next one starts from the state
        // this one left.
        let outcome = state.apply(*sequence, change);
        // Older than what a cut log scan kept: left out with it.
        if entries.contains_key(sequence)
            || (scan_cut && oldest_logged.is_some_and(|oldest| *sequence < oldest))
        {
            continue;
        }
        if let Some(entry) = ChangeEntry::of(change, &outcome) {
            entries.insert(*sequence, entry);
        }
    }
    let (changes, cut) = collapse(entries.into_values().collect(), HistoryQuery::CHANGES_MAX);
    Ok((changes, cut || scan_cut))
}

/// How many messages of `room` after the user's read marker are neither deleted nor the
/// user's own, at most [`HistoryQuery::UNREAD_MAX`]. The newest [`Bounds::unread_scan`]
/// messages after the marker are read (HarperDB and the unwritten tail, as they are now);
/// when more follow the marker, the count is the cap.
async fn unread(sources: &Sources, room: &str, unread: &UnreadQuery) -> Result<u32, ReadError> {
    let scan = sources.bounds.unread_scan.max(1);
    let (_, tail) = floor_and_tail(sources, room).await?;
    let query = HistoryQuery {
        room: room.to_owned(),
        after: unread.after,
        limit: u32::try_from(scan).unwrap_or(u32::MAX),
        ..HistoryQuery::default()
    };
    let stored = sources.db.history_states(&query).await?;
    let page = unwritten::merge(&query, stored, &tail);
    let cap = HistoryQuery::UNREAD_MAX;
    if page.has_more {
        metrics::counter!(crate::metrics::UNREAD_SCAN_CUT).increment(1);
        return Ok(cap);
    }
    let count = page
        .states
        .iter()
        .filter(|s| !s.message.deleted && s.message.user_id.as_deref() != Some(&unread.user_id))
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX).min(cap))
}
