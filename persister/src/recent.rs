//! The newest messages of the rooms history was recently asked for, kept in memory, so that the
//! common queries — a room's latest page (every `join_room` asks for it), `since` a recent
//! message (every reconnect), the first pages back — need no HarperDB query.
//!
//! An entry holds a contiguous run of a room's order: every message of the room from its first
//! one up to its newest, none left out. It is filled from a complete answer (HarperDB plus the
//! unwritten tail, see [`crate::unwritten`]) and brought up to date before each use by reading
//! the stream forward from its newest message — one JetStream direct get when nothing is new —
//! so a cached answer is as current as an uncached one. Entries are dropped least recently used
//! first beyond a byte budget, and refilled after [`MAX_AGE`] (a message moved to the
//! dead-letter stream stays visible in a cached room's history until then, as it stayed in
//! its live delivery).
//!
//! Each message is kept in its current state: the changes read with the stream's new events
//! are applied to the entry's messages as they come (once each: [`MessageState::apply`]), so
//! an edit, a deletion or a reaction shows in the next cached answer.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chatify_shared::changes::MessageState;
use chatify_shared::wire::{HistoryPage, HistoryQuery};
use lru::LruCache;

use crate::event::{StreamEvent, apply_changes};
use crate::harperdb::StatePage;

/// Messages kept per room: the longest latest page a client asks for (`join_room`'s 100).
pub const KEEP_PER_ROOM: usize = 100;
/// How long an entry is used before it is filled again from HarperDB.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// What one message is counted as beyond its text, name and room (the struct, the queue slot).
const MESSAGE_OVERHEAD: usize = 96;
/// What one room's entry is counted as beyond its name and messages (the map's node and
/// slot, the entry's fields), so that entries of empty rooms cost their memory too.
const ENTRY_OVERHEAD: usize = 160;

/// The cache of all rooms (shared by the history service's concurrent queries).
pub struct Recent {
    /// Rooms by name, least recently used first out.
    rooms: Mutex<Rooms>,
    /// Most bytes kept over all rooms (names and messages); 0 turns the cache off.
    budget: usize,
    /// Most rooms kept.
    max_rooms: usize,
}

struct Rooms {
    entries: LruCache<String, Entry>,
    /// Bytes of all entries' messages (see [`cost`]).
    bytes: usize,
}

/// One room's newest messages.
#[derive(Debug, Clone)]
struct Entry {
    /// Oldest first, contiguous in the room's order, at most [`KEEP_PER_ROOM`].
    messages: VecDeque<MessageState>,
    /// Whether `messages` starts with the room's first message (nothing older exists).
    complete: bool,
    /// The sequence the stream has been read up to for this room: the newest event's
    /// (message or change), or what the filling answer was current to.
    newest: u64,
    /// When the entry was filled from HarperDB.
    filled: Instant,
    /// Bytes of the entry: its room's name twice (the key and the messages' room), its
    /// overhead and `messages`.
    bytes: usize,
}

/// What a room's entry costs without its messages.
fn entry_cost(room: &str) -> usize {
    ENTRY_OVERHEAD + room.len()
}

fn cost(s: &MessageState) -> usize {
    let m = &s.message;
    m.message.len()
        + m.username.len()
        + m.room.len()
        + m.user_id.as_ref().map_or(0, String::len)
        + m.reactions.keys().map(|e| e.len() + 8).sum::<usize>()
        + s.reactors.weight()
        + MESSAGE_OVERHEAD
}

impl Recent {
    pub fn new(budget: usize, max_rooms: usize) -> Self {
        Self {
            rooms: Mutex::new(Rooms {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            budget: if max_rooms == 0 { 0 } else { budget },
            max_rooms,
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Rooms> {
        // A panic elsewhere while holding the lock leaves consistent data (every change is
        // one assignment or one push/pop): keep serving.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the stream must be read from to bring `room`'s entry up to date: the entry's
    /// newest sequence, or `None` when the room is not cached (or its entry is too old).
    pub fn newest(&self, room: &str) -> Option<u64> {
        if self.budget == 0 {
            return None;
        }
        let mut rooms = self.rooms();
        let (filled, newest) = rooms.entries.get(room).map(|e| (e.filled, e.newest))?;
        if filled.elapsed() > MAX_AGE {
            rooms.take(room);
            return None;
        }
        Some(newest)
    }

    /// Adds what the stream holds after `from` (read after [`Recent::newest`] gave `from`):
    /// its messages join the entry, its changes are applied to the entry's messages; then
    /// answers `query` from the entry if it holds everything the answer needs.
    pub fn extend_and_answer(
        &self,
        query: &HistoryQuery,
        from: u64,
        later: Vec<StreamEvent>,
    ) -> Option<HistoryPage> {
        let mut rooms = self.rooms();
        let mut entry = rooms.take(&query.room)?;
        // Another query may have extended the entry meanwhile: its run and ours overlap. An
        // entry behind `from` (fills never go back, so this should not happen) would leave a
        // hole between its newest and `later`: it stays out, and the next query refills it.
        if entry.newest < from {
            return None;
        }
        let newest = entry.newest;
        let mut changed = false;
        for event in &later {
            match event {
                StreamEvent::Message(m) if m.sequence() > entry.newest => {
                    let state = MessageState::new(m.clone());
                    entry.bytes += cost(&state);
                    entry.messages.push_back(state);
                }
                StreamEvent::Change { .. } => changed = true,
                StreamEvent::Message(_) => {}
            }
            entry.newest = entry.newest.max(event.sequence());
        }
        if changed {
            // Changes after `newest` only: the entry holds every earlier one already.
            let changes: Vec<StreamEvent> = later
                .into_iter()
                .filter(|e| e.is_change() && e.sequence() > newest)
                .collect();
            let before: usize = entry.messages.iter().map(cost).sum();
            apply_changes(entry.messages.make_contiguous(), &changes);
            let after: usize = entry.messages.iter().map(cost).sum();
            entry.bytes = entry.bytes + after - before;
        }
        entry.trim();
        let page = entry.answer(query);
        rooms.put(query.room.clone(), entry, self.budget, self.max_rooms);
        page
    }

    /// Keeps the room's newest messages from a complete answer to a latest-page query of
    /// [`KEEP_PER_ROOM`] (oldest first), current to stream sequence `current_to` at least.
    pub fn fill(&self, room: &str, page: &StatePage, current_to: u64) {
        if self.budget == 0 {
            return;
        }
        let messages: VecDeque<MessageState> = page.states.iter().cloned().collect();
        let newest = messages
            .back()
            .map(|s| s.message.sequence())
            .unwrap_or(0)
            .max(current_to);
        let mut rooms = self.rooms();
        // Never replace an entry with an older view of the room.
        if rooms
            .entries
            .peek(room)
            .is_some_and(|existing| existing.newest >= newest)
        {
            return;
        }
        let mut entry = Entry {
            bytes: entry_cost(room) + messages.iter().map(cost).sum::<usize>(),
            messages,
            complete: !page.has_more,
            newest,
            filled: Instant::now(),
        };
        entry.trim();
        rooms.take(room);
        rooms.put(room.to_owned(), entry, self.budget, self.max_rooms);
    }

    /// How many messages of `room` after stream sequence `after` are neither deleted nor by
    /// `user_id`, at most `cap`, when the entry holds every message after `after` (it is
    /// complete, or starts at or before `after`); `None` otherwise. As current as the entry:
    /// ask right after it answered (or was filled for) the same query.
    pub fn unread(&self, room: &str, after: u64, user_id: &str, cap: u32) -> Option<u32> {
        let rooms = self.rooms();
        let entry = rooms.entries.peek(room)?;
        let first = entry.messages.front().map(|s| s.message.sequence());
        if !(entry.complete || first.is_some_and(|first| first <= after)) {
            return None;
        }
        let count = entry
            .messages
            .iter()
            .filter(|s| {
                s.message.sequence() > after
                    && !s.message.deleted
                    && s.message.user_id.as_deref() != Some(user_id)
            })
            .count();
        Some(u32::try_from(count).unwrap_or(u32::MAX).min(cap))
    }

    /// Drops `room`'s entry.
    pub fn forget(&self, room: &str) {
        self.rooms().take(room);
    }

    /// Rooms and bytes cached now.
    pub fn size(&self) -> (usize, usize) {
        let rooms = self.rooms();
        (rooms.entries.len(), rooms.bytes)
    }
}

impl Rooms {
    fn take(&mut self, room: &str) -> Option<Entry> {
        let entry = self.entries.pop(room)?;
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Inserts (as most recently used), then drops least recently used rooms beyond `budget`
    /// bytes or `max_rooms` rooms.
    fn put(&mut self, room: String, entry: Entry, budget: usize, max_rooms: usize) {
        self.bytes += entry.bytes;
        self.entries.put(room, entry);
        while self.bytes > budget || self.entries.len() > max_rooms {
            match self.entries.pop_lru() {
                Some((_, dropped)) => self.bytes -= dropped.bytes,
                None => break,
            }
        }
    }
}

impl Entry {
    fn trim(&mut self) {
        while self.messages.len() > KEEP_PER_ROOM {
            if let Some(dropped) = self.messages.pop_front() {
                self.bytes -= cost(&dropped);
                self.complete = false;
            }
        }
    }

    /// The answer to `query` if this entry holds all of it (what HarperDB would say, merged
    /// with the unwritten tail), else `None`.
    fn answer(&self, query: &HistoryQuery) -> Option<HistoryPage> {
        let (after, before) = query.checked_sequence_bounds()?;
        let limit = query.limit as usize;
        let matching: Vec<&MessageState> = self
            .messages
            .iter()
            .filter(|s| after < s.message.sequence() && s.message.sequence() < before)
            .collect();
        // Whether every message of the room in (after, before) is in the entry: nothing older
        // than the entry's first message matches.
        let first = self.messages.front().map(|s| s.message.sequence());
        let all_here = self.complete || first.is_some_and(|first| after >= first);
        let has_more = if matching.len() > limit {
            true
        } else if all_here {
            false
        } else if matching.len() == limit && after == 0 {
            // A full page, and the room has older messages (the entry is not complete), which
            // match too with no lower bound.
            true
        } else {
            // Older matches may exist, and may be needed for the page: HarperDB knows.
            return None;
        };
        let skip = matching.len().saturating_sub(limit);
        Some(HistoryPage {
            messages: matching[skip..].iter().map(|s| s.message.clone()).collect(),
            has_more,
            ..HistoryPage::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwritten::tests::query;
    use chatify_shared::wire::{ChatMessage, StoredMessage};
    use proptest::prelude::*;

    fn events(messages: &[ChatMessage]) -> Vec<StreamEvent> {
        messages.iter().cloned().map(StreamEvent::Message).collect()
    }

    fn states(page: &HistoryPage) -> StatePage {
        StatePage {
            states: page
                .messages
                .iter()
                .cloned()
                .map(MessageState::new)
                .collect(),
            has_more: page.has_more,
        }
    }

    /// A room's messages at sequences `seqs` (increasing).
    fn room(seqs: &[u64]) -> Vec<ChatMessage> {
        seqs.iter()
            .map(|&s| {
                StoredMessage {
                    room: "r".into(),
                    username: "u".into(),
                    message: format!("m{s}"),
                    created_time: 1_700_000_000_000,
                    user_id: None,
                    ..StoredMessage::default()
                }
                .into_message(s)
            })
            .collect()
    }

    /// What HarperDB plus the unwritten tail answer: the newest `limit` in bounds.
    fn truth(all: &[ChatMessage], q: &HistoryQuery) -> HistoryPage {
        let (after, before) = q.sequence_bounds();
        let matching: Vec<ChatMessage> = all
            .iter()
            .filter(|m| after < m.sequence() && m.sequence() < before)
            .cloned()
            .collect();
        let skip = matching.len().saturating_sub(q.limit as usize);
        HistoryPage {
            has_more: skip > 0,
            messages: matching[skip..].to_vec(),
            ..HistoryPage::default()
        }
    }

    /// The latest-page answer the history service fills an entry from.
    fn latest(all: &[ChatMessage]) -> StatePage {
        states(&truth(all, &query(KEEP_PER_ROOM as u32, None, None)))
    }

    #[test]
    fn a_filled_room_answers_its_latest_page_and_new_messages_join_it() {
        let all = room(&(1..=150).collect::<Vec<_>>());
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&all[..120]), 0);
        assert_eq!(recent.newest("r"), Some(120));
        let q = query(50, None, None);
        let page = recent.extend_and_answer(&q, 120, events(&all[120..]));
        assert_eq!(page, Some(truth(&all, &q)));
        assert_eq!(recent.newest("r"), Some(150));
        // The entry kept only the newest 100.
        let older = query(100, None, Some(all[60].id));
        assert_eq!(recent.extend_and_answer(&older, 150, Vec::new()), None);
    }

    #[test]
    fn unread_counts_come_from_an_entry_that_holds_every_message_after_the_marker() {
        let mut all = room(&(1..=150).collect::<Vec<_>>());
        for m in all.iter_mut().filter(|m| m.sequence() % 2 == 0) {
            m.user_id = Some("me".into());
        }
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&all), 0);
        // The entry holds 51..=150: odd ones are others'.
        assert_eq!(recent.unread("r", 140, "me", 1000), Some(5));
        assert_eq!(recent.unread("r", 51, "me", 1000), Some(49));
        assert_eq!(recent.unread("r", 51, "me", 10), Some(10));
        assert_eq!(
            recent.unread("r", 50, "me", 1000),
            None,
            "51 may not be the first after 50"
        );
        assert_eq!(recent.unread("r", 0, "me", 1000), None);
        assert_eq!(recent.unread("other", 0, "me", 1000), None);
        let small = Recent::new(1 << 20, 1000);
        small.fill("r", &latest(&all[..10]), 0);
        assert_eq!(small.unread("r", 0, "me", 1000), Some(5), "a complete room");
    }

    #[test]
    fn changes_read_from_the_stream_apply_to_the_cached_messages_once() {
        use chatify_shared::changes::{Actor, Change, StoredChange};
        let all = room(&[1, 2, 3]);
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&all[..2]), 2);
        let change = |target: &ChatMessage, what: Change| StoredChange {
            room: "r".into(),
            target: target.id,
            change: what,
            at: 9,
            by: Actor {
                member_id: "m".into(),
                username: "u".into(),
                user_id: None,
            },
        };
        let later = vec![
            StreamEvent::Message(all[2].clone()),
            StreamEvent::Change {
                sequence: 4,
                change: change(&all[0], Change::Delete),
            },
            StreamEvent::Change {
                sequence: 5,
                change: change(
                    &all[2],
                    Change::Edit {
                        message: "edited".into(),
                    },
                ),
            },
        ];
        let q = query(10, None, None);
        let page = recent.extend_and_answer(&q, 2, later.clone());
        assert_eq!(recent.newest("r"), Some(5));
        let page = page.map(|p| p.messages).unwrap_or_default();
        assert!(page[0].deleted && page[0].message.is_empty());
        assert_eq!(page[2].message, "edited");
        // Read again (another query overlapped): nothing changes twice.
        let again = recent.extend_and_answer(&q, 2, later).map(|p| p.messages);
        assert_eq!(again, Some(page));
        let (_, bytes) = recent.size();
        let cached = recent.extend_and_answer(&q, 5, Vec::new());
        assert_eq!(recent.size().1, bytes);
        assert!(cached.is_some());
    }

    #[test]
    fn an_empty_room_is_cached_as_empty_and_complete() {
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&[]), 7);
        assert_eq!(recent.newest("r"), Some(7));
        let q = query(50, None, None);
        let page = recent.extend_and_answer(&q, 7, events(&room(&[9])));
        assert_eq!(page, Some(truth(&room(&[9]), &q)));
    }

    #[test]
    fn an_uncached_room_and_a_disabled_cache_answer_nothing() {
        let recent = Recent::new(1 << 20, 1000);
        assert_eq!(recent.newest("r"), None);
        let off = Recent::new(0, 1000);
        off.fill("r", &latest(&room(&[1, 2])), 0);
        assert_eq!(off.newest("r"), None);
    }

    #[test]
    fn a_forgotten_room_is_not_cached() {
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&room(&[1, 2])), 0);
        recent.forget("r");
        assert_eq!(recent.newest("r"), None);
        assert_eq!(recent.size(), (0, 0));
    }

    #[test]
    fn a_fill_never_replaces_a_newer_entry() {
        let all = room(&[1, 2, 3, 4]);
        let recent = Recent::new(1 << 20, 1000);
        recent.fill("r", &latest(&all), 0);
        recent.fill("r", &latest(&all[..2]), 0);
        assert_eq!(recent.newest("r"), Some(4));
    }

    #[test]
    fn rooms_beyond_the_byte_budget_go_least_recently_used_first() {
        let one = latest(&room(&[1, 2, 3]));
        let per_room: usize = entry_cost("a") + one.states.iter().map(cost).sum::<usize>();
        let recent = Recent::new(per_room * 2, 1000);
        recent.fill("a", &one, 0);
        recent.fill("b", &one, 0);
        assert!(recent.newest("a").is_some()); // a is now more recent than b
        recent.fill("c", &one, 0);
        assert_eq!(recent.size(), (2, per_room * 2));
        assert!(recent.newest("b").is_none());
        assert!(recent.newest("a").is_some() && recent.newest("c").is_some());
    }

    #[test]
    fn empty_rooms_cost_their_names_and_rooms_are_counted_too() {
        let empty = latest(&[]);
        let long = "x".repeat(1000);
        let recent = Recent::new(10 * (entry_cost(&long)), 1000);
        for i in 0..100 {
            recent.fill(&format!("{long}{i}"), &empty, 5);
        }
        let (rooms, bytes) = recent.size();
        assert!(
            rooms <= 10,
            "{rooms} empty rooms kept within a 10-room budget"
        );
        assert!(bytes <= 10 * entry_cost(&long) + 20, "{bytes}");
        let few = Recent::new(1 << 30, 3);
        for i in 0..100 {
            few.fill(&format!("r{i}"), &empty, 5);
        }
        assert_eq!(few.size().0, 3, "at most max_rooms rooms");
        assert!(few.newest("r99").is_some() && few.newest("r0").is_none());
    }

    proptest! {
        /// Whatever the room, the filling point, the messages added later and the query: a
        /// cached answer, when there is one, is exactly the uncached answer.
        #[test]
        fn cached_answers_are_the_uncached_answers(
            gaps in prop::collection::vec(1u64..4, 0..260),
            filled_at in 0usize..260,
            limit in 1u32..=120,
            after in prop::option::of(0usize..260),
            before in prop::option::of(0usize..260),
        ) {
            let mut seq = 0;
            let seqs: Vec<u64> = gaps.iter().map(|g| { seq += g; seq }).collect();
            let all = room(&seqs);
            let split = filled_at.min(all.len());
            let recent = Recent::new(1 << 24, 1000);
            let current_to = all[..split].last().map(ChatMessage::sequence).unwrap_or(0);
            recent.fill("r", &latest(&all[..split]), current_to);
            let id = |i: usize| all.get(i).map(|m| m.id);
            let q = query(limit, after.and_then(id), before.and_then(id));
            let from = recent.newest("r");
            prop_assert!(from.is_some(), "just filled");
            let from = from.unwrap_or_default();
            let later: Vec<StreamEvent> =
                all.iter().filter(|m| m.sequence() > from).cloned().map(StreamEvent::Message).collect();
            if let Some(page) = recent.extend_and_answer(&q, from, later) {
                prop_assert_eq!(page, truth(&all, &q));
            }
            // The latest page itself is always answered from the cache.
            let latest_q = query(limit.min(KEEP_PER_ROOM as u32), None, None);
            let from = recent.newest("r");
            prop_assert!(from.is_some(), "still cached");
            let from = from.unwrap_or_default();
            prop_assert_eq!(
                recent.extend_and_answer(&latest_q, from, Vec::new()),
                Some(truth(&all, &latest_q))
            );
        }
    }
}
