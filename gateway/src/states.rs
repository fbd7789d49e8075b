//! What a room's listener knows of the messages being changed, so that it can tell its local
//! members what each change did (a reaction's counts) and each handler what its own change did.
//!
//! Changes reach the listener in the room's order (see [`crate::delivery`]), as they reach
//! every other gateway and the persister, and it applies them with
//! [`MessageState::apply`], as they do: everyone computes the same counts. A message delivered
//! here enters the cache as it is; an older one's state comes from the persisters the first
//! time it is changed here (with the sequence their answer is complete up to). States are kept
//! within a byte bound per room, the least recently used dropped first; changes arriving while
//! a state is fetched wait for it in order.

use std::collections::{HashMap, VecDeque};

use chatify_shared::changes::{Change, MessageState, Outcome, StoredChange};
use chatify_shared::wire::ChatMessage;
use lru::LruCache;
use tokio::sync::oneshot;

use crate::metrics as m;

/// What a change did, as its listener saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Done(Outcome),
    /// The message is not a message of the room.
    NoSuchMessage,
    /// Its state could not be read (no persister answered): stored, but what it did is unknown.
    Unknown,
}

/// Outcomes kept for handlers that ask after their change was applied.
const OUTCOMES_KEPT: usize = 1024;

/// One room's message states, changes waiting for states, and outcomes.
pub struct RoomStates {
    /// States of messages changed lately, by stream sequence.
    cache: LruCache<u64, MessageState>,
    /// Bytes the cached states take ([`weight`]), and the most they may.
    bytes: usize,
    max_bytes: usize,
    /// What `bytes` was when last added to the gateway's gauge of all rooms' states.
    reported: usize,
    /// Changes (sequence, change) to messages whose state is being fetched, in order.
    pending: HashMap<u64, Vec<(u64, StoredChange)>>,
    /// Outcomes of the latest changes, by sequence, for a handler that asks after the fact.
    outcomes: VecDeque<(u64, Applied)>,
    /// Handlers waiting for what their change did.
    waiters: HashMap<u64, oneshot::Sender<Applied>>,
}

/// What the listener is to do with a change.
pub enum Step {
    /// Applied: tell the room (and the waiting handler).
    Applied(Applied),
    /// Waiting for the message's state, which is being fetched already.
    Waiting,
    /// Waiting for the message's state, which nobody fetches yet: fetch it.
    Fetch,
}

/// Roughly the bytes a state takes in the cache.
fn weight(state: &MessageState) -> usize {
    256 + state.message.message.len() + state.message.username.len() + state.reactors.weight()
}

impl RoomStates {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            cache: LruCache::unbounded(),
            bytes: 0,
            max_bytes,
            reported: 0,
            pending: HashMap::new(),
            outcomes: VecDeque::new(),
            waiters: HashMap::new(),
        }
    }

    /// A cached state (a copy).
    pub fn get(&mut self, target: u64) -> Option<MessageState> {
        self.cache.get(&target).cloned()
    }

    /// The message stored at `sequence`, as the stream delivered it: nothing changed it yet.
    pub fn message(&mut self, sequence: u64, message: &ChatMessage) {
        let mut state = MessageState::new(message.clone());
        state.version = sequence;
        self.bytes += weight(&state);
        if let Some((_, old)) = self.cache.push(sequence, state) {
            self.bytes = self.bytes.saturating_sub(weight(&old));
        }
        self.shrink();
    }

    /// Takes the change stored at `sequence` in the room's order.
    pub fn change(&mut self, sequence: u64, change: StoredChange) -> Step {
        let target = change.target_sequence();
        if let Some(waiting) = self.pending.get_mut(&target) {
            waiting.push((sequence, change));
            return Step::Waiting;
        }
        let Some(state) = self.cache.get_mut(&target) else {
            self.pending.insert(target, vec![(sequence, change)]);
            return Step::Fetch;
        };
        let before = weight(state);
        let outcome = state.apply(sequence, &change);
        let after = weight(state);
        self.bytes = (self.bytes + after).saturating_sub(before);
        self.shrink();
        let applied = Applied::Done(outcome);
        self.finish(sequence, applied.clone());
        Step::Applied(applied)
    }

    /// The fetched state of `target` (`None`: no such message in the room; `Err`: it could not
    /// be read), complete up to stream sequence `as_of`: applies the changes that waited for it,
    /// in order, and returns each with what it did.
    pub fn fetched(
        &mut self,
        target: u64,
        state: Result<Option<(MessageState, u64)>, ()>,
    ) -> Vec<(StoredChange, Applied)> {
        let waiting = self.pending.remove(&target).unwrap_or_default();
        let mut done = Vec::with_capacity(waiting.len());
        match state {
            Ok(Some((mut state, as_of))) => {
                for (sequence, change) in waiting {
                    let outcome = if sequence <= as_of {
                        // Already in the answer: what it did is what the state shows.
                        already_in(&state, &change)
                    } else {
                        state.apply(sequence, &change)
                    };
                    let applied = Applied::Done(outcome);
                    self.finish(sequence, applied.clone());
                    done.push((change, applied));
                }
                state.version = state.version.max(as_of);
                self.bytes += weight(&state);
                if let Some((_, old)) = self.cache.push(target, state) {
                    self.bytes = self.bytes.saturating_sub(weight(&old));
                }
                self.shrink();
            }
            Ok(None) => {
                for (sequence, change) in waiting {
                    self.finish(sequence, Applied::NoSuchMessage);
                    done.push((change, Applied::NoSuchMessage));
                }
            }
            Err(()) => {
                for (sequence, change) in waiting {
                    self.finish(sequence, Applied::Unknown);
                    done.push((change, Applied::Unknown));
                }
            }
        }
        done
    }

    /// Forgets every cached state (a change may have been missed: they are fetched again).
    pub fn forget_states(&mut self) {
        self.cache.clear();
        self.bytes = 0;
        self.report();
    }

    /// What the change at `sequence` did, now or once it is applied.
    pub fn outcome(&mut self, sequence: u64) -> Result<Applied, oneshot::Receiver<Applied>> {
        if let Some((_, applied)) = self.outcomes.iter().find(|(s, _)| *s == sequence) {
            return Ok(applied.clone());
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(sequence, tx);
        Err(rx)
    }

    /// A handler gave up waiting for `sequence`.
    pub fn abandon(&mut self, sequence: u64) {
        self.waiters.remove(&sequence);
    }

    fn finish(&mut self, sequence: u64, applied: Applied) {
        if let Some(waiter) = self.waiters.remove(&sequence) {
            let _ = waiter.send(applied);
            return;
        }
        if self.outcomes.len() >= OUTCOMES_KEPT {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back((sequence, applied));
    }

    /// Drops the least recently used states until the cache fits `max_bytes`.
    fn shrink(&mut self) {
        while self.bytes > self.max_bytes {
            match self.cache.pop_lru() {
                Some((_, old)) => {
                    self.bytes = self.bytes.saturating_sub(weight(&old));
                    metrics::counter!(m::MESSAGE_STATES_DROPPED).increment(1);
                }
                None => {
                    self.bytes = 0;
                    break;
                }
            }
        }
        self.report();
    }

    /// Brings the gateway's gauge of all rooms' states up to date with this room's.
    fn report(&mut self) {
        let (now, before) = (self.bytes as f64, self.reported as f64);
        metrics::gauge!(m::MESSAGE_STATES_BYTES).increment(now - before);
        self.reported = self.bytes;
    }

    /// Bytes the cached states take (a gauge).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for RoomStates {
    fn drop(&mut self) {
        metrics::gauge!(m::MESSAGE_STATES_BYTES).decrement(self.reported as f64);
    }
}

/// What a change the fetched state already holds did, as far as the state tells.
fn already_in(state: &MessageState, change: &StoredChange) -> Outcome {
    let m = &state.message;
    match &change.change {
        Change::Delete => Outcome::Deleted,
        _ if m.deleted => Outcome::Gone,
        Change::Edit { .. } => Outcome::Edited {
            edited_time: change.at,
        },
        Change::React { .. } => Outcome::Reacted {
            changed: true,
            reactions: m.reactions.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatify_shared::changes::Actor;
    use chatify_shared::wire::StoredMessage;

    fn state(seq: u64) -> MessageState {
        MessageState::new(
            StoredMessage {
                room: "r".into(),
                username: "ann".into(),
                message: "hi".into(),
                created_time: 1_700_000_000_000,
                ..StoredMessage::default()
            }
            .into_message(seq),
        )
    }

    fn react(target: u64, who: &str) -> StoredChange {
        StoredChange {
            room: "r".into(),
            target: chatify_shared::id::message_id(1_700_000_000_000, target),
            change: Change::React {
                emoji: "👍".into(),
                add: true,
                distinct_max: 20,
            },
            at: 1,
            by: Actor {
                member_id: who.into(),
                username: who.into(),
                user_id: None,
            },
        }
    }

    fn count(applied: &Applied) -> u32 {
        match applied {
            Applied::Done(Outcome::Reacted { reactions, .. }) => reactions["👍"],
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_wait_in_order_for_the_state_and_skip_what_it_holds() {
        let mut s = RoomStates::new(1 << 20);
        assert!(matches!(s.change(11, react(10, "a")), Step::Fetch));
        assert!(matches!(s.change(12, react(10, "b")), Step::Waiting));
        assert!(matches!(s.change(13, react(10, "c")), Step::Waiting));
        // The persisters' answer already holds a's reaction (11), not the later ones.
        let mut fetched = state(10);
        fetched.apply(11, &react(10, "a"));
        let done = s.fetched(10, Ok(Some((fetched, 11))));
        let counts: Vec<u32> = done.iter().map(|(_, a)| count(a)).collect();
        assert_eq!(counts, [1, 2, 3]);
        // Cached now: the next one applies at once, a redelivered one changes nothing.
        match s.change(14, react(10, "d")) {
            Step::Applied(a) => assert_eq!(count(&a), 4),
            _ => panic!("not applied at once"),
        }
        match s.change(12, react(10, "b")) {
            Step::Applied(a) => assert_eq!(a, Applied::Done(Outcome::Seen)),
            _ => panic!("not applied at once"),
        }
    }

    #[test]
    fn a_handler_gets_its_outcome_before_or_after_it_is_applied() {
        let mut s = RoomStates::new(1 << 20);
        s.fetched(10, Ok(Some((state(10), 10))));
        s.change(11, react(10, "a"));
        assert!(matches!(s.outcome(11), Ok(a) if count(&a) == 1));
        let Err(mut rx) = s.outcome(12) else {
            panic!("no outcome yet")
        };
        s.change(12, react(10, "b"));
        assert!(matches!(rx.try_recv(), Ok(a) if count(&a) == 2));
    }

    #[test]
    fn unknown_messages_and_unreadable_states_are_told() {
        let mut s = RoomStates::new(1 << 20);
        s.change(11, react(10, "a"));
        let done = s.fetched(10, Ok(None));
        assert_eq!(done[0].1, Applied::NoSuchMessage);
        s.change(12, react(20, "a"));
        assert_eq!(s.fetched(20, Err(()))[0].1, Applied::Unknown);
        assert!(matches!(s.outcome(12), Ok(Applied::Unknown)));
    }

    #[test]
    fn states_beyond_the_byte_bound_are_dropped_least_recent_first() {
        let mut s = RoomStates::new(2000);
        for seq in 1..=20 {
            s.fetched(seq, Ok(Some((state(seq), seq))));
        }
        assert!(s.bytes() <= 2000, "{}", s.bytes());
        assert!(s.get(20).is_some(), "the latest is kept");
        assert!(s.get(1).is_none(), "the oldest is dropped");
    }
}
