//! Taking turns: one socket's events run one at a time, in the order the socket sent them.
//!
//! socketioxide runs each event handler as its own task, so two `send_message` events from one
//! socket could reach NATS out of order. But it extracts handler arguments synchronously, in
//! the order packets arrive. A [`Ticket`] is taken at that moment, and each handler waits for
//! its ticket's turn before doing anything, while different sockets run in parallel.
//!
//! Safe to cancel: a ticket dropped before its turn (its task was cancelled, or it was never
//! awaited) gives its turn up when that turn comes, so the tickets after it still run.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Hands out turns in arrival order.
#[derive(Default)]
pub struct Sequencer {
    /// Where the queue stands.
    state: Mutex<State>,
    /// Wakes the waiting tickets when the turn moves on. (A `watch` channel did this and the
    /// counting in 300 bytes a socket, most of them its eight notifiers.)
    moved: Notify,
}

#[derive(Default)]
struct State {
    /// Number of the next ticket to hand out.
    next: u64,
    /// Number of the ticket whose turn it is.
    serving: u64,
    /// Tickets dropped before their turn came, skipped when it does. Empty (no allocation)
    /// unless a handler was cancelled while it waited.
    abandoned: BTreeSet<u64>,
}

impl State {
    /// Moves the turn on, past every abandoned ticket.
    fn advance(&mut self) {
        self.serving += 1;
        while self.abandoned.remove(&self.serving) {
            self.serving += 1;
        }
    }
}

impl Sequencer {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place at the end of the queue.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut state = self.state();
        let number = state.next;
        state.next += 1;
        Ticket {
            number,
            sequencer: Some(self.clone()),
        }
    }

    /// Tickets handed out whose events have not finished: the one being served and those
    /// waiting behind it.
    pub fn queued(&self) -> u64 {
        let state = self.state();
        state.next - state.serving - state.abandoned.len() as u64
    }
}

/// A place in a socket's queue of events.
pub struct Ticket {
    number: u64,
    /// `None` once the ticket became a [`Turn`]; until then, dropping it gives its turn up.
    sequencer: Option<Arc<Sequencer>>,
}

impl Ticket {
    /// Waits until every earlier event of the socket has finished (or given up its turn). If
    /// this wait is cancelled, the ticket is dropped and gives its turn up.
    pub async fn turn(mut self) -> Turn {
        if let Some(sequencer) = &self.sequencer {
            loop {
                let moved = sequencer.moved.notified();
                let mut moved = std::pin::pin!(moved);
                // Registered before the check, so a move between the check and the wait wakes it.
                moved.as_mut().enable();
                if sequencer.state().serving == self.number {
                    break;
                }
                moved.await;
            }
        }
        Turn {
            sequencer: self.sequencer.take(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(sequencer) = self.sequencer.take() else {
            return;
        };
        let mut state = sequencer.state();
        if state.serving == self.number {
            state.advance();
            drop(state);
            sequencer.moved.notify_waiters();
        } else if self.number > state.serving {
            state.abandoned.insert(self.number);
        }
    }
}

/// While held, this socket's other events wait. Dropping it (even by a panic) lets the next run.
pub struct Turn {
    /// Always set: only a ticket's own `turn` makes one.
    sequencer: Option<Arc<Sequencer>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(sequencer) = self.sequencer.take() {
            sequencer.state().advance();
            sequencer.moved.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn turns_run_in_ticket_order_whatever_order_tasks_start_in() {
        let sequencer = Arc::new(Sequencer::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..50).map(|_| sequencer.ticket()).collect();
        let mut tasks = Vec::new();
        // Start the tasks in reverse order: the last ticket's task is spawned first.
        for (i, ticket) in tickets.into_iter().enumerate().rev() {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let _turn = ticket.turn().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                log.lock().map(|mut l| l.push(i)).ok();
            }));
        }
        for t in tasks {
            t.await.ok();
        }
        let order = log.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
        assert_eq!(sequencer.queued(), 0);
    }

    #[tokio::test]
    async fn a_panicking_turn_still_lets_the_next_one_run() {
        let sequencer = Arc::new(Sequencer::default());
        let first = sequencer.ticket();
        let second = sequencer.ticket();
        let crashed = tokio::spawn(async move {
            let _turn = first.turn().await;
            panic!("handler bug");
        });
        assert!(crashed.await.is_err());
        let waited = tokio::time::timeout(Duration::from_secs(1), second.turn()).await;
        assert!(
            waited.is_ok(),
            "the second event was blocked by the first one's panic"
        );
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_its_turn_up_in_order() {
        let sequencer = Arc::new(Sequencer::default());
        let first = sequencer.ticket();
        let second = sequencer.ticket();
        let third = sequencer.ticket();
        let turn = first.turn().await;
        // The second event's wait is cancelled while the first one runs.
        let cancelled = tokio::time::timeout(Duration::from_millis(20), second.turn()).await;
        assert!(cancelled.is_err(), "the second ran before the first ended");
        assert_eq!(sequencer.queued(), 2, "the first and the third");
        // The third still waits for the first: giving a turn up does not jump the queue.
        let mut third = tokio::spawn(third.turn());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut third)
                .await
                .is_err(),
            "the third ran while the first still held its turn"
        );
        drop(turn);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await;
        assert!(
            matches!(third, Ok(Ok(_))),
            "the third never got its turn after the second was cancelled"
        );
    }

    #[tokio::test]
    async fn a_ticket_dropped_unused_gives_its_turn_up() {
        let sequencer = Arc::new(Sequencer::default());
        drop(sequencer.ticket());
        let dropped_later = sequencer.ticket();
        let last = sequencer.ticket();
        drop(dropped_later);
        let waited = tokio::time::timeout(Duration::from_secs(1), last.turn()).await;
        assert!(waited.is_ok(), "tickets never used blocked the next one");
        assert_eq!(sequencer.queued(), 1);
    }
}
