//! Writing one batch: decode the delivered messages, insert them in one request, and ack them
//! once HarperDB confirmed the write. A batch HarperDB refuses is written again one message at
//! a time, so that only the messages it refuses go to the dead-letter stream.

use std::time::Instant;

use chatify_shared::wire::StoredMessage;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dead_letter::{DeadLetters, Publisher};
use crate::delivery::Delivery;
use crate::lanes::Store;
use crate::metrics as m;
use crate::retry::{Outcome, Retry};

/// Writes batches and acks what they stored.
#[derive(Clone)]
pub struct BatchWriter<P> {
    /// How failed inserts are retried.
    retry: Retry,
    /// How many times a message HarperDB refuses is tried alone before it is moved aside
    /// (`persister.max_attempts`).
    max_attempts: u32,
    /// Where refused messages go.
    dead_letters: DeadLetters<P>,
    /// The acks of written batches, sent while their lanes write the next ones.
    acks: TaskTracker,
}

impl<P: Publisher> BatchWriter<P> {
    pub fn new(retry: Retry, max_attempts: u32, dead_letters: DeadLetters<P>) -> Self {
        Self {
            retry,
            max_attempts,
            dead_letters,
            acks: TaskTracker::new(),
        }
    }

    /// Waits until the acks of every batch written so far are sent.
    pub async fn acks_sent(&self) {
        self.acks.close();
        self.acks.wait().await;
        self.acks.reopen();
    }

    /// Decodes, writes and acks one batch on `store`. Returns when every message is written and
    /// its ack under way (see [`BatchWriter::acks_sent`]), terminated as undecodable, moved to
    /// the dead-letter stream, or left unacked because shutdown came during a retry (then
    /// JetStream redelivers it to a persister after the ack wait).
    pub async fn write<S: Store, D: Delivery>(
        &self,
        store: &S,
        batch: Vec<D>,
        shutdown: &CancellationToken,
    ) {
        let redelivered = batch.iter().filter(|m| m.redelivered()).count();
        if redelivered > 0 {
            metrics::counter!(m::REDELIVERIES).increment(redelivered as u64);
        }
        let mut decoded = Vec::with_capacity(batch.len());
        let mut ackable = Vec::with_capacity(batch.len());
        for message in batch {
            match (
                message.stream_sequence(),
                serde_json::from_slice::<StoredMessage>(message.payload()),
            ) {
                (Ok(sequence), Ok(stored)) => {
                    decoded.push(stored.into_message(sequence));
                    ackable.push(message);
                }
                (Err(e), _) => {
                    // Not a JetStream delivery (no sequence): nothing to ack either.
                    tracing::error!(subject = message.subject(), error = %e, "message without stream metadata skipped");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                }
                (Ok(_), Err(e)) => {
                    // Gateways only publish valid messages; whatever this is, retrying won't fix it.
                    tracing::error!(subject = message.subject(), error = %e, "undecodable message terminated");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                    message.terminate().await;
                }
            }
        }
        if decoded.is_empty() {
            return;
        }
        let started = Instant::now();
        match self
            .retry
            .write(store, &decoded, &ackable, 1, shutdown)
            .await
        {
            Outcome::Written => {
                metrics::histogram!(m::WRITE_DURATION).record(started.elapsed().as_secs_f64());
                metrics::histogram!(m::BATCH_MESSAGES).record(decoded.len() as f64);
                metrics::counter!(m::MESSAGES_STORED).increment(decoded.len() as u64);
                // Acked beside the lane, which takes its next batch meanwhile.
                self.acks.spawn(async move {
                    for m in &ackable {
                        m.ack().await;
                    }
                });
            }
            Outcome::Stopped => {}
            Outcome::Rejected(e) => {
                // Some record is refused for good; write them one by one so the others go
                // through, and move the refused ones aside.
                tracing::warn!(error = %e, size = decoded.len(), "batch rejected; writing its messages one by one");
                for (chat, message) in decoded.iter().zip(&ackable) {
                    let one = std::slice::from_ref(chat);
                    let alone = std::slice::from_ref(message);
                    match self
                        .retry
                        .write(store, one, alone, self.max_attempts, shutdown)
                        .await
                    {
                        Outcome::Written => {
                            metrics::counter!(m::MESSAGES_STORED).increment(1);
                            message.ack().await;
                        }
                        Outcome::Stopped => return,
                        Outcome::Rejected(e) => {
                            if !self.dead_letters.move_aside(message, &e, shutdown).await {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatify_shared::config::PersisterSettings;

    use super::*;
    use crate::fakes::{
        Event, FakeDelivery, FakePublisher, FakeStore, Log, outage, shutdown_after,
    };

    fn writer(log: &Log) -> BatchWriter<FakePublisher> {
        let settings = PersisterSettings {
            retry_initial_ms: 10,
            max_attempts: 2,
            ..PersisterSettings::default()
        };
        let retry = Retry::new(&settings, Duration::from_secs(10));
        let dead_letters = DeadLetters::new(FakePublisher::new(log), retry);
        BatchWriter::new(retry, settings.max_attempts, dead_letters)
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_acked_only_after_its_insert_succeeded() {
        let log = Log::default();
        let store = FakeStore::new(&log).failing([outage(), outage()]);
        let writer = writer(&log);
        writer
            .write(
                &store,
                FakeDelivery::batch(&log, 0, 3, None),
                &CancellationToken::new(),
            )
            .await;
        writer.acks_sent().await;
        assert_eq!(
            log.events(),
            vec![
                Event::Failed(vec![1, 2, 3]),
                Event::Failed(vec![1, 2, 3]),
                Event::Inserted(vec![1, 2, 3]),
                Event::Acked(1),
                Event::Acked(2),
                Event::Acked(3),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_acked_when_shutdown_comes_before_the_write() {
        let log = Log::default();
        let store = FakeStore::new(&log).failing((0..100).map(|_| outage()));
        let writer = writer(&log);
        let shutdown = shutdown_after(Duration::from_secs(3));
        writer
            .write(&store, FakeDelivery::batch(&log, 0, 3, None), &shutdown)
            .await;
        writer.acks_sent().await;
        assert!(log.stored().is_empty());
        assert_eq!(log.acked(), Vec::<u64>::new(), "{:?}", log.events());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_is_split_and_only_the_refused_message_dead_lettered() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        writer
            .write(
                &store,
                FakeDelivery::batch(&log, 0, 5, Some(3)),
                &CancellationToken::new(),
            )
            .await;
        writer.acks_sent().await;
        assert_eq!(log.stored(), [1, 2, 4, 5].into_iter().collect());
        let events = log.events();
        let dead: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::DeadLettered { .. }))
            .collect();
        assert!(
            matches!(dead.as_slice(), [Event::DeadLettered { sequence, .. }] if sequence == "3"),
            "{events:?}"
        );
        // Every message acked once, each after its own write (or its move aside).
        assert_eq!(log.acked(), vec![1, 2, 3, 4, 5]);
        for (i, event) in events.iter().enumerate() {
            if let Event::Acked(sequence) = event {
                let settled = events[..i].iter().any(|e| match e {
                    Event::Inserted(s) => s == &vec![*sequence],
                    Event::DeadLettered { sequence: s, .. } => s == &sequence.to_string(),
                    _ => false,
                });
                assert!(
                    settled,
                    "{sequence} acked before it was settled: {events:?}"
                );
            }
        }
        // The poison was tried alone the allowed number of times.
        let tried_alone = events
            .iter()
            .filter(|e| **e == Event::Failed(vec![3]))
            .count();
        assert_eq!(tried_alone, 2);
    }

    #[tokio::test]
    async fn an_undecodable_message_is_terminated_and_the_others_written() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let mut batch = FakeDelivery::batch(&log, 0, 2, None);
        batch.push(FakeDelivery::undecodable(&log, 3));
        writer.write(&store, batch, &CancellationToken::new()).await;
        writer.acks_sent().await;
        assert_eq!(
            log.events(),
            vec![
                Event::Terminated(3),
                Event::Inserted(vec![1, 2]),
                Event::Acked(1),
                Event::Acked(2),
            ]
        );
    }
}
