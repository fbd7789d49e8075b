//! Putting a room's republished messages back into stream order.
//!
//! The messages stream republishes each stored message with its sequence and the sequence of
//! the room's previous message (`Nats-Last-Sequence`), so the room's messages form a chain.
//! nats-server 2.9 may hand two republished messages of concurrent publishers to subscribers in
//! the opposite order (a few in thousands under load), and every gateway would then deliver
//! them in an order history does not have. A room's listener passes each message through a
//! [`Reorder`], which releases messages along the chain and holds one whose predecessor has not
//! arrived yet, for at most [`GAP_WAIT`]: core NATS can lose a message (a slow subscriber, a
//! reconnect), and then the ones after it go out anyway; clients recover the lost one with
//! `join_room` + `since`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a message waits for its predecessor. Swapped messages arrive microseconds apart;
/// a predecessor that takes this long was lost.
pub const GAP_WAIT: Duration = Duration::from_millis(100);

/// One room's chain position and the messages waiting for theirs.
pub struct Reorder<T> {
    /// Sequence of the last message released; `None` until the first one arrives.
    head: Option<u64>,
    /// Held messages by the sequence they come after: (their own sequence, the message).
    waiting: BTreeMap<u64, (u64, T)>,
    /// When the oldest held message gives up on its predecessor.
    deadline: Option<Instant>,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Self {
            head: None,
            waiting: BTreeMap::new(),
            deadline: None,
        }
    }
}

impl<T> Reorder<T> {
    /// Takes the message stored at `sequence` whose room predecessor is at `previous` (0: none),
    /// and returns the messages to deliver now, in order.
    pub fn push(&mut self, sequence: u64, previous: u64, item: T, now: Instant) -> Vec<T> {
        let mut ready = Vec::new();
        match self.head {
            // The first message seen, or the next one of the chain.
            None => self.release(sequence, item, &mut ready),
            Some(head) if previous == head => self.release(sequence, item, &mut ready),
            // Late (its successor went out after a gap, or it came right after subscribing):
            // delivered out of order rather than lost.
            Some(head) if sequence <= head => ready.push(item),
            // Its predecessor has not arrived: wait for it.
            Some(head) if previous > head => {
                self.waiting.insert(previous, (sequence, item));
                self.deadline.get_or_insert(now + GAP_WAIT);
            }
            // It follows something older than the head: nothing is missing in between.
            Some(_) => self.release(sequence, item, &mut ready),
        }
        ready
    }

    /// When [`Reorder::expire`] should run, if anything waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Gives up waiting: everything held goes out in sequence order.
    pub fn expire(&mut self) -> Vec<T> {
        self.deadline = None;
        let mut held: Vec<(u64, T)> = std::mem::take(&mut self.waiting).into_values().collect();
        held.sort_by_key(|(sequence, _)| *sequence);
        if let Some((last, _)) = held.last() {
            self.head = Some(*last);
        }
        held.into_iter().map(|(_, item)| item).collect()
    }

    /// Releases `item` and every held message that follows it along the chain.
    fn release(&mut self, sequence: u64, item: T, ready: &mut Vec<T>) {
        ready.push(item);
        let mut head = sequence;
        while let Some((next, item)) = self.waiting.remove(&head) {
            ready.push(item);
            head = next;
        }
        self.head = Some(head);
        // Anything still held keeps waiting for its own predecessor, until the same deadline.
        if self.waiting.is_empty() {
            self.deadline = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push_all(r: &mut Reorder<u64>, chain: &[(u64, u64)], now: Instant) -> Vec<u64> {
        chain
            .iter()
            .flat_map(|&(seq, prev)| r.push(seq, prev, seq, now))
            .collect()
    }

    #[test]
    fn in_order_messages_go_straight_out() {
        let mut r = Reorder::default();
        let now = Instant::now();
        assert_eq!(
            push_all(&mut r, &[(3, 0), (5, 3), (9, 5)], now),
            vec![3, 5, 9]
        );
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_swapped_pair_is_put_back_in_order() {
        let mut r = Reorder::default();
        let now = Instant::now();
        assert_eq!(r.push(3, 0, 3, now), vec![3]);
        assert_eq!(r.push(9, 5, 9, now), Vec::<u64>::new());
        assert_eq!(r.deadline(), Some(now + GAP_WAIT));
        assert_eq!(r.push(5, 3, 5, now), vec![5, 9]);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_lost_message_holds_the_next_ones_only_until_the_deadline() {
        let mut r = Reorder::default();
        let now = Instant::now();
        assert_eq!(r.push(3, 0, 3, now), vec![3]);
        // 5 is lost; 9 and 12 wait for it.
        assert!(r.push(12, 9, 12, now).is_empty());
        assert!(r.push(9, 5, 9, now).is_empty());
        assert_eq!(r.expire(), vec![9, 12]);
        assert_eq!(r.deadline(), None);
        // The chain goes on from 12; 5 turning up late is delivered, not dropped.
        assert_eq!(r.push(14, 12, 14, now), vec![14]);
        assert_eq!(r.push(5, 3, 5, now), vec![5]);
    }

    proptest! {
        /// Any order of arrival of a chain, each message at most a few places from its
        /// position, comes out in sequence order without waiting for a deadline.
        #[test]
        fn nearby_swaps_come_out_in_sequence_order(swaps in proptest::collection::vec(0usize..40, 0..20)) {
            let chain: Vec<(u64, u64)> = (1..=40u64).map(|i| (i * 2, (i - 1) * 2)).collect();
            let mut arrival = chain.clone();
            for s in swaps {
                if s + 1 < arrival.len() && s > 0 {
                    arrival.swap(s, s + 1);
                }
            }
            let mut r = Reorder::default();
            let out = push_all(&mut r, &arrival, Instant::now());
            let expected: Vec<u64> = chain.iter().map(|&(s, _)| s).collect();
            prop_assert_eq!(out, expected);
            prop_assert_eq!(r.deadline(), None);
        }
    }
}
