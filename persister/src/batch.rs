//! Writing one batch: decode the delivered events (messages and changes, told apart by their
//! header: [`crate::event`]), write them, and ack them once HarperDB confirmed the write.
//!
//! A batch of messages only is inserted in one request, whatever else is being written at the
//! time: an insert skips a key that exists and keys carry the order, so batches may land in any
//! order, on any lane, from any persister. A batch HarperDB refuses is written again one
//! message at a time, so that only the messages it refuses go to the dead-letter stream.
//!
//! A change depends on the state its message is in, so it is applied after everything stored
//! before it: a batch holding one first waits until the durable consumer's ack floor has
//! reached the batch's first sequence less one, that is until every earlier event is written
//! and acked (acks come only after the write). Lanes and persisters share the consumer, and the
//! floor only passes a batch once it is acked, so this puts change batches one after the other
//! across all of them without a lock. A wait is bounded ([`BatchWriter::new`]'s `floor_wait`):
//! an earlier event may be waiting for a redelivery behind this very batch, so a batch whose
//! floor does not come is handed back to JetStream (a NAK with [`HANDED_BACK_DELAY`]) rather
//! than held. The consumer waits outside its lanes, so that a lane's connection never idles
//! while messages wait: it cuts a batch into parts ([`BatchWriter::prepare`]: messages, and
//! runs of consecutive sequences holding changes), writes the messages at once, holds each
//! change run aside ([`crate::waiting`]) until its floor is there and only then writes it on
//! a lane ([`BatchWriter::write_part`]); [`BatchWriter::write`] does it all in place, waiting
//! in the caller. Once the floor is there, the run's messages are inserted, then its changes
//! applied in order: the messages they target are read, each change applied to its message's
//! state ([`MessageState::apply`], whose version makes a change seen twice count once), what
//! the changes did inserted into the change log, the states written back, and only then is the
//! batch acked. A retry (HarperDB out) does it all again, which changes nothing already done.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chatify_shared::changes::{ChangeEntry, MessageState, Outcome as ChangeOutcome, StoredChange};
use chatify_shared::storage::{RoomKey, StoredChangeRecord, storage_key};
use chatify_shared::subjects::RoomToken;
use chatify_shared::wire::ChatMessage;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dead_letter::{DeadLetters, Publisher};
use crate::delivery::Delivery;
use crate::event::StreamEvent;
use crate::floor::AckFloor;
use crate::harperdb::HarperError;
use crate::lanes::Store;
use crate::metrics as m;
use crate::retry::{Attempted, Outcome, Retry};

/// How long JetStream holds back the events of a batch handed back because the ack floor did
/// not reach it in time.
pub const HANDED_BACK_DELAY: Duration = Duration::from_secs(1);
/// The first pause between two reads of the ack floor, and the longest (each doubles).
const FLOOR_POLL_FIRST: Duration = Duration::from_millis(2);
const FLOOR_POLL_MAX: Duration = Duration::from_millis(50);

/// A delivery and what it holds.
pub type Decoded<D> = (D, StreamEvent);

/// A piece of a batch that is written in one go ([`BatchWriter::prepare`]).
pub enum Part<D> {
    /// Messages only: written at once, on any lane, in any order with anything else.
    Messages(Vec<Decoded<D>>),
    /// A run of consecutive sequences holding changes: written only once the ack floor has
    /// reached its start.
    Changes(ChangeRun<D>),
}

impl<D> Part<D> {
    /// The part's deliveries, to hand them back.
    pub fn into_deliveries(self) -> impl Iterator<Item = D> {
        let events = match self {
            Part::Messages(events) => events,
            Part::Changes(run) => run.events,
        };
        events.into_iter().map(|(delivery, _)| delivery)
    }
}

/// Events of consecutive stream sequences, in stream order, at least one of them a change.
pub struct ChangeRun<D> {
    /// The events; never empty.
    events: Vec<Decoded<D>>,
}

impl<D> ChangeRun<D> {
    /// The sequence of its first event.
    pub fn first(&self) -> u64 {
        self.events.first().map_or(0, |(_, event)| event.sequence())
    }

    /// The ack floor it needs before it is written: every event before it written and acked.
    pub fn needs(&self) -> u64 {
        self.first().saturating_sub(1)
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether it holds none (never, as [`BatchWriter::prepare`] makes them).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Its deliveries, to hand them back.
    pub fn into_deliveries(self) -> impl Iterator<Item = D> {
        self.events.into_iter().map(|(delivery, _)| delivery)
    }
}

/// Writes batches and acks what they stored.
#[derive(Clone)]
pub struct BatchWriter<P, F> {
    /// How failed inserts are retried.
    retry: Retry,
    /// How many times a message HarperDB refuses is tried alone before it is moved aside
    /// (`persister.max_attempts`).
    max_attempts: u32,
    /// Where refused messages go.
    dead_letters: DeadLetters<P>,
    /// The acks of written batches, sent while their lanes write the next ones.
    acks: TaskTracker,
    /// Where the consumer's ack floor is read: a batch holding changes waits until it has
    /// passed every event before the batch.
    floor: F,
    /// The longest such wait, after which the batch is handed back.
    floor_wait: Duration,
}

/// How a wait for the ack floor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloorWait {
    Reached,
    TimedOut,
    Stopped,
}

/// What applying a run of events did, counted once it is written.
#[derive(Debug, Default)]
struct Applied {
    /// Messages inserted (or found there already).
    messages: usize,
    /// Changes applied to their message (not already in its state).
    changes: u64,
    /// Changes whose target is no stored message of their room.
    skipped: u64,
}

impl Applied {
    fn count(&self) {
        metrics::counter!(m::MESSAGES_STORED).increment(self.messages as u64);
        metrics::counter!(m::CHANGES_APPLIED).increment(self.changes);
        metrics::counter!(m::CHANGES_SKIPPED).increment(self.skipped);
    }
}

impl<P: Publisher, F: AckFloor> BatchWriter<P, F> {
    pub fn new(
        retry: Retry,
        max_attempts: u32,
        dead_letters: DeadLetters<P>,
        floor: F,
        floor_wait: Duration,
    ) -> Self {
        Self {
            retry,
            max_attempts,
            dead_letters,
            acks: TaskTracker::new(),
            floor,
            floor_wait,
        }
    }

    /// Waits until the acks of every batch written so far are sent.
    pub async fn acks_sent(&self) {
        self.acks.close();
        self.acks.wait().await;
        self.acks.reopen();
    }

    /// Decodes, writes and acks one batch on `store`, waiting for the ack floor in place: the
    /// batch's parts ([`BatchWriter::prepare`]) in stream order, each change run after the
    /// floor reached its start. Returns when every event is written and its ack sent or under
    /// way (see [`BatchWriter::acks_sent`]), terminated as undecodable, moved to the
    /// dead-letter stream, handed back (a change run whose floor did not come, with every part
    /// after it), or left unacked because shutdown came during a retry (then JetStream
    /// redelivers it to a persister after the ack wait). The consumer does not wait in a lane:
    /// it writes the parts itself, holding change runs aside until their floor is there
    /// ([`crate::waiting`]).
    pub async fn write<S: Store, D: Delivery>(
        &self,
        store: &S,
        batch: Vec<D>,
        shutdown: &CancellationToken,
    ) {
        let mut parts = self.prepare(batch).await.into_iter();
        while let Some(part) = parts.next() {
            if let Part::Changes(run) = &part {
                let waited = self.wait_for_floor(run.needs(), shutdown).await;
                if waited != FloorWait::Reached {
                    let handed_back = parts.flat_map(Part::into_deliveries);
                    let handed_back: Vec<D> = part.into_deliveries().chain(handed_back).collect();
                    let timed_out = waited == FloorWait::TimedOut;
                    self.hand_back(handed_back, timed_out).await;
                    return;
                }
            }
            if !self.write_part(store, part, shutdown).await {
                return;
            }
        }
    }

    /// Decodes a batch and cuts it into the parts that are written one by one: a batch of
    /// messages only is one part; a batch holding changes is sorted by sequence and cut into
    /// runs of consecutive sequences (a batch may skip sequences another lane or persister
    /// holds, or hold a redelivered older one), in stream order. Messages need no wait: those
    /// of a run before its first change and after its last are parts of their own, written at
    /// once. What lies between (the changes, and the messages among them, which a later change
    /// may target) is a change run, written only once the ack floor reached its start
    /// ([`ChangeRun::needs`]). What cannot be written is settled here: an undecodable event is
    /// terminated, a change stored under another room's subject acked (it targets nothing).
    pub async fn prepare<D: Delivery>(&self, batch: Vec<D>) -> Vec<Part<D>> {
        let redelivered = batch.iter().filter(|m| m.redelivered()).count();
        if redelivered > 0 {
            metrics::counter!(m::REDELIVERIES).increment(redelivered as u64);
        }
        let mut decoded = Vec::with_capacity(batch.len());
        for message in batch {
            let sequence = match message.stream_sequence() {
                Ok(sequence) => sequence,
                Err(e) => {
                    // Not a JetStream delivery (no sequence): nothing to ack either.
                    tracing::error!(subject = message.subject(), error = %e, "message without stream metadata skipped");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                    continue;
                }
            };
            match StreamEvent::decode(message.is_change(), sequence, message.payload()) {
                Ok(StreamEvent::Change { change, .. })
                    if RoomToken::new(&change.room).store_subject() != message.subject() =>
                {
                    // Its room's messages are on another subject: it targets none of them.
                    tracing::warn!(
                        subject = message.subject(),
                        sequence,
                        "a change stored under another room's subject skipped"
                    );
                    metrics::counter!(m::CHANGES_SKIPPED).increment(1);
                    message.ack().await;
                }
                Ok(event) => decoded.push((message, event)),
                Err(e) => {
                    // Gateways only publish valid events; whatever this is, retrying won't fix it.
                    tracing::error!(subject = message.subject(), error = %e, "undecodable message terminated");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                    message.terminate().await;
                }
            }
        }
        if decoded.is_empty() {
            return Vec::new();
        }
        if !decoded.iter().any(|(_, event)| event.is_change()) {
            return vec![Part::Messages(decoded)];
        }
        decoded.sort_by_key(|(_, event)| event.sequence());
        runs(decoded).into_iter().flat_map(parts_of_run).collect()
    }

    /// Writes one part on `store` and acks it: messages at once, a change run as if the ack
    /// floor had reached its start (the caller saw to that). False if shutdown came first (the
    /// rest stays unacked).
    pub async fn write_part<S: Store, D: Delivery>(
        &self,
        store: &S,
        part: Part<D>,
        shutdown: &CancellationToken,
    ) -> bool {
        match part {
            Part::Messages(messages) => self.write_messages(store, messages, shutdown).await,
            Part::Changes(run) => self.apply_run(store, run.events, shutdown).await,
        }
    }

    /// Hands events back to JetStream unwritten (a NAK with [`HANDED_BACK_DELAY`]): a change
    /// run whose floor did not come in time (`timed_out`: logged and counted), or that shutdown
    /// found waiting.
    pub async fn hand_back<D: Delivery>(&self, handed_back: Vec<D>, timed_out: bool) {
        if timed_out {
            tracing::warn!(
                first = handed_back
                    .iter()
                    .filter_map(|d| d.stream_sequence().ok())
                    .min(),
                events = handed_back.len(),
                wait_ms = self.floor_wait.as_millis() as u64,
                "earlier events were not written in time; changes handed back to JetStream"
            );
            metrics::counter!(m::CHANGE_BATCHES_HANDED_BACK).increment(1);
        }
        for delivery in &handed_back {
            delivery.nak(HANDED_BACK_DELAY).await;
        }
    }

    /// The longest wait for the ack floor before a change run is handed back
    /// (`persister.change_floor_wait_ms`).
    pub fn floor_wait(&self) -> Duration {
        self.floor_wait
    }

    /// Inserts messages (changes among `batch` are left out) in one request and acks them
    /// beside the lane; a refused batch is written one message at a time.
    /// False if shutdown came first (the rest stays unacked).
    async fn write_messages<S: Store, D: Delivery>(
        &self,
        store: &S,
        batch: Vec<Decoded<D>>,
        shutdown: &CancellationToken,
    ) -> bool {
        let (ackable, decoded): (Vec<D>, Vec<ChatMessage>) = batch
            .into_iter()
            .filter_map(|(delivery, event)| match event {
                StreamEvent::Message(m) => Some((delivery, m)),
                StreamEvent::Change { .. } => None,
            })
            .unzip();
        if decoded.is_empty() {
            return true;
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
                true
            }
            Outcome::Stopped => false,
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
                        Outcome::Stopped => return false,
                        Outcome::Rejected(e) => {
                            if !self.dead_letters.move_aside(message, &e, shutdown).await {
                                return false;
                            }
                        }
                    }
                }
                true
            }
        }
    }

    /// Waits until the ack floor is at `needed` or above, for [`BatchWriter::floor_wait`] at
    /// most.
    async fn wait_for_floor(&self, needed: u64, shutdown: &CancellationToken) -> FloorWait {
        let started = Instant::now();
        let deadline = started + self.floor_wait;
        let mut pause = FLOOR_POLL_FIRST;
        let ended = loop {
            if needed == 0 {
                break FloorWait::Reached;
            }
            match tokio::time::timeout_at(deadline, self.floor.floor()).await {
                Ok(Ok(floor)) if floor >= needed => break FloorWait::Reached,
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "the ack floor could not be read"),
            }
            let now = Instant::now();
            if now >= deadline {
                break FloorWait::TimedOut;
            }
            tokio::select! {
                () = shutdown.cancelled() => break FloorWait::Stopped,
                () = tokio::time::sleep(pause.min(deadline - now)) => {}
            }
            pause = (pause * 2).min(FLOOR_POLL_MAX);
        };
        metrics::histogram!(m::CHANGE_FLOOR_WAIT).record(started.elapsed().as_secs_f64());
        ended
    }

    /// Writes one run (the floor is at its start) and acks it; a run HarperDB refuses is
    /// written again one event at a time, in order, and the events it refuses are moved aside.
    /// False if shutdown came first (the rest stays unacked).
    async fn apply_run<S: Store, D: Delivery>(
        &self,
        store: &S,
        run: Vec<Decoded<D>>,
        shutdown: &CancellationToken,
    ) -> bool {
        let (deliveries, events): (Vec<D>, Vec<StreamEvent>) = run.into_iter().unzip();
        let started = Instant::now();
        let attempt = || apply(store, &events);
        match self.retry.attempt(&deliveries, 1, shutdown, attempt).await {
            Attempted::Done(applied) => {
                metrics::histogram!(m::WRITE_DURATION).record(started.elapsed().as_secs_f64());
                applied.count();
                for delivery in &deliveries {
                    delivery.ack().await;
                }
                true
            }
            Attempted::Stopped => false,
            Attempted::Rejected(e) => {
                tracing::warn!(error = %e, size = events.len(), "batch of changes rejected; writing its events one by one");
                for (delivery, event) in deliveries.iter().zip(&events) {
                    let alone = std::slice::from_ref(delivery);
                    let one = || apply(store, std::slice::from_ref(event));
                    match self
                        .retry
                        .attempt(alone, self.max_attempts, shutdown, one)
                        .await
                    {
                        Attempted::Done(applied) => {
                            applied.count();
                            delivery.ack().await;
                        }
                        Attempted::Stopped => return false,
                        Attempted::Rejected(e) => {
                            if !self.dead_letters.move_aside(delivery, &e, shutdown).await {
                                return false;
                            }
                        }
                    }
                }
                true
            }
        }
    }
}

/// Cuts events sorted by sequence into runs of consecutive sequences (an event delivered
/// twice stays in its run).
fn runs<D>(sorted: Vec<Decoded<D>>) -> Vec<Vec<Decoded<D>>> {
    let mut runs: Vec<Vec<Decoded<D>>> = Vec::new();
    for item in sorted {
        let sequence = item.1.sequence();
        match runs.last_mut() {
            Some(run)
                if run
                    .last()
                    .is_some_and(|(_, e)| sequence <= e.sequence() + 1) =>
            {
                run.push(item);
            }
            _ => runs.push(vec![item]),
        }
    }
    runs
}

/// The parts of one run of consecutive sequences, in order: the messages before its first
/// change and after its last are written at once; the change run is what lies between (the
/// messages among its changes stay in it: a change after them may target them).
fn parts_of_run<D>(mut run: Vec<Decoded<D>>) -> Vec<Part<D>> {
    let Some(first) = run.iter().position(|(_, event)| event.is_change()) else {
        return vec![Part::Messages(run)];
    };
    let last = run
        .iter()
        .rposition(|(_, event)| event.is_change())
        .unwrap_or(first);
    let after = run.split_off(last + 1);
    let changes = run.split_off(first);
    let before = run;
    let mut parts = Vec::with_capacity(3);
    if !before.is_empty() {
        parts.push(Part::Messages(before));
    }
    parts.push(Part::Changes(ChangeRun { events: changes }));
    if !after.is_empty() {
        parts.push(Part::Messages(after));
    }
    parts
}

/// The key of the message a change stored at `sequence` targets, if it can be one: a message
/// of the change's room stored before it.
fn target_key(sequence: u64, change: &StoredChange) -> Option<String> {
    let target = change.target_sequence();
    (target > 0 && target < sequence).then(|| storage_key(&RoomKey::new(&change.room), target))
}

/// Writes `events` (in stream order, every event before them written): inserts the messages,
/// then applies the changes to the messages they target, logs what they did and writes the
/// messages' new states. Safe to run again after any failure: the inserts skip what exists,
/// the states' versions skip changes already in them, and the log, written before the states,
/// holds every change a state holds.
async fn apply<S: Store>(store: &S, events: &[StreamEvent]) -> Result<Applied, HarperError> {
    let messages: Vec<ChatMessage> = events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Message(m) => Some(m.clone()),
            StreamEvent::Change { .. } => None,
        })
        .collect();
    if !messages.is_empty() {
        store.insert(&messages).await?;
    }
    let mut applied = Applied {
        messages: messages.len(),
        ..Applied::default()
    };
    let changes: Vec<(u64, &StoredChange)> = events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Change { sequence, change } => Some((*sequence, change)),
            StreamEvent::Message(_) => None,
        })
        .collect();
    if changes.is_empty() {
        return Ok(applied);
    }
    let keys: BTreeSet<String> = changes
        .iter()
        .filter_map(|(sequence, change)| target_key(*sequence, change))
        .collect();
    let keys: Vec<String> = keys.into_iter().collect();
    let mut states: HashMap<String, MessageState> = store
        .states(&keys)
        .await?
        .into_iter()
        .map(|s| {
            let key = storage_key(&RoomKey::new(&s.message.room), s.message.sequence());
            (key, s)
        })
        .collect();
    let mut changed = BTreeSet::new();
    let mut log = Vec::new();
    for (sequence, change) in changes {
        let target = target_key(sequence, change).and_then(|key| {
            let state = states.get_mut(&key)?;
            (state.message.id == change.target).then_some((key, state))
        });
        let Some((key, state)) = target else {
            tracing::warn!(sequence, target = %change.target, "a change of no stored message of its room skipped");
            applied.skipped += 1;
            continue;
        };
        let outcome = state.apply(sequence, change);
        if outcome == ChangeOutcome::Seen {
            continue;
        }
        applied.changes += 1;
        if let Some(entry) = ChangeEntry::of(change, &outcome) {
            log.push(StoredChangeRecord::new(
                &change.room,
                sequence,
                change.target_sequence(),
                entry,
            ));
        }
        changed.insert(key);
    }
    // The log first: after a failure between the two, a retry finds these changes in the
    // states (seen) and could not tell any more what they did.
    if !log.is_empty() {
        store.log_changes(&log).await?;
    }
    let updated: Vec<MessageState> = changed
        .iter()
        .filter_map(|key| states.get(key).cloned())
        .collect();
    if !updated.is_empty() {
        store.update(&updated).await?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatify_shared::config::PersisterSettings;

    use chatify_shared::changes::Change;

    use super::*;
    use crate::fakes::{
        Event, FakeDelivery, FakeFloor, FakePublisher, FakeStore, Log, change, outage,
        shutdown_after, thumbs,
    };

    /// The writers' longest wait for the floor in these tests.
    const FLOOR_WAIT: Duration = Duration::from_secs(10);

    fn writer(log: &Log) -> BatchWriter<FakePublisher, FakeFloor> {
        writer_from(log, 0)
    }

    /// A writer whose ack floor counts every sequence up to `base` as acked, and waits for it
    /// 10 s at most.
    fn writer_from(log: &Log, base: u64) -> BatchWriter<FakePublisher, FakeFloor> {
        let settings = PersisterSettings {
            retry_initial_ms: 10,
            max_attempts: 2,
            ..PersisterSettings::default()
        };
        let retry = Retry::new(&settings, Duration::from_secs(10));
        let dead_letters = DeadLetters::new(FakePublisher::new(log), retry);
        BatchWriter::new(
            retry,
            settings.max_attempts,
            dead_letters,
            FakeFloor::new(log, base),
            FLOOR_WAIT,
        )
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

    /// Room `r`'s message `m<sequence>` stored at `sequence`, delivered.
    fn message_at(log: &Log, sequence: u64) -> FakeDelivery {
        FakeDelivery::new(log, sequence, &format!("m{sequence}"))
    }

    /// `what` by `by` to the message at `target`, stored at `sequence`, delivered.
    fn change_at(log: &Log, sequence: u64, target: u64, by: &str, what: Change) -> FakeDelivery {
        FakeDelivery::change(log, sequence, &change(target, by, what))
    }

    fn edit(text: &str) -> Change {
        Change::Edit {
            message: text.into(),
        }
    }

    /// The position of the first event matching `what` in `events`.
    fn position(events: &[Event], what: impl Fn(&Event) -> bool) -> usize {
        events.iter().position(what).unwrap_or(usize::MAX)
    }

    /// Where the first ack of any of `sequences` is; every one of them must be acked.
    fn first_ack_of(events: &[Event], sequences: &[u64]) -> usize {
        for s in sequences {
            assert!(
                events.contains(&Event::Acked(*s)),
                "{s} not acked: {events:?}"
            );
        }
        position(
            events,
            |e| matches!(e, Event::Acked(s) if sequences.contains(s)),
        )
    }

    fn reactions(log: &Log, sequence: u64) -> Option<u32> {
        log.row(sequence)
            .and_then(|s| s.message.reactions.get("👍").copied())
    }

    #[tokio::test(start_paused = true)]
    async fn changes_wait_until_every_earlier_event_is_written_then_apply_in_order() {
        let log = Log::default();
        let store = FakeStore::new(&log).taking(Duration::from_millis(5));
        // Two persisters: the second gets the changes first, the first the messages they
        // follow, 50 ms later.
        let (first, second) = (writer(&log), writer(&log));
        let changes = vec![
            change_at(&log, 4, 1, "a", thumbs(true)),
            change_at(&log, 5, 1, "b", thumbs(true)),
        ];
        let (changes_store, shutdown) = (store.clone(), CancellationToken::new());
        let stop = shutdown.clone();
        let applying =
            tokio::spawn(async move { second.write(&changes_store, changes, &stop).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(log.row(1).is_none() && log.acked().is_empty());
        first
            .write(&store, FakeDelivery::batch(&log, 0, 3, None), &shutdown)
            .await;
        first.acks_sent().await;
        let _ = applying.await;

        let events = log.events();
        let last_message_acked = position(&events, |e| *e == Event::Acked(3));
        let updated = position(&events, |e| matches!(e, Event::Updated(_)));
        assert!(last_message_acked < updated, "{events:?}");
        assert!(updated < position(&events, |e| *e == Event::Acked(4)));
        assert_eq!(log.acked(), vec![1, 2, 3, 4, 5]);
        assert!(log.nakked().is_empty());
        let row = log.row(1).unwrap_or_else(|| panic!("no row 1: {events:?}"));
        assert_eq!(reactions(&log, 1), Some(2));
        assert_eq!(row.version, 5);
        assert_eq!(
            log.change_log()
                .iter()
                .map(|r| (r.sequence, r.target_sequence))
                .collect::<Vec<_>>(),
            vec![(4, 1), (5, 1)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_mixing_messages_and_changes_to_them_applies_each_change_in_place() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let batch = vec![
            message_at(&log, 1),
            message_at(&log, 2),
            change_at(&log, 3, 1, "a", thumbs(true)),
            change_at(&log, 4, 2, "ann", edit("fixed")),
            message_at(&log, 5),
            change_at(&log, 6, 1, "ann", Change::Delete),
            change_at(&log, 7, 5, "a", thumbs(true)),
            change_at(&log, 8, 1, "b", thumbs(true)),
        ];
        writer.write(&store, batch, &CancellationToken::new()).await;
        writer.acks_sent().await;
        let events = log.events();
        let mut acked = log.acked();
        acked.sort_unstable();
        assert_eq!(acked, (1..=8).collect::<Vec<_>>());
        let updated = position(&events, |e| matches!(e, Event::Updated(_)));
        let logged = position(&events, |e| matches!(e, Event::Logged(_)));
        assert!(logged < updated, "the log first: {events:?}");
        // Messages 1 and 2, before the first change, are written (and acked) at once; message
        // 5, among the changes, with them; every change is acked after the rows are written.
        assert!(
            updated < first_ack_of(&events, &[3, 4, 5, 6, 7, 8]),
            "{events:?}"
        );
        assert!(
            position(
                &events,
                |e| matches!(e, Event::Inserted(s) if s.as_slice() == [1, 2])
            ) < first_ack_of(&events, &[1, 2]),
            "{events:?}"
        );
        let deleted = log.row(1).map(|s| s.message);
        assert!(
            deleted
                .as_ref()
                .is_some_and(|m| m.deleted && m.message.is_empty() && m.reactions.is_empty()),
            "{deleted:?}"
        );
        assert_eq!(
            log.row(1).map(|s| s.version),
            Some(8),
            "the late reaction counts as seen"
        );
        let edited = log.row(2).map(|s| s.message);
        assert_eq!(
            edited.as_ref().map(|m| (m.message.as_str(), m.edited_time)),
            Some(("fixed", Some(1_700_000_100_000)))
        );
        assert_eq!(reactions(&log, 5), Some(1));
        // What each change did, in order; the reaction to the deleted message did nothing.
        let entries: Vec<(u64, ChangeEntry)> = log
            .change_log()
            .into_iter()
            .map(|r| (r.sequence, r.entry))
            .collect();
        let id = |sequence| change(sequence, "x", Change::Delete).target;
        assert_eq!(
            entries,
            vec![
                (
                    3,
                    ChangeEntry::Reactions {
                        id: id(1),
                        reactions: [("👍".to_owned(), 1)].into()
                    }
                ),
                (
                    4,
                    ChangeEntry::Edited {
                        id: id(2),
                        message: "fixed".into(),
                        edited_time: 1_700_000_100_000
                    }
                ),
                (6, ChangeEntry::Deleted { id: id(1) }),
                (
                    7,
                    ChangeEntry::Reactions {
                        id: id(5),
                        reactions: [("👍".to_owned(), 1)].into()
                    }
                ),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivered_batch_of_changes_is_applied_once() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let batch = |log: &Log| {
            vec![
                message_at(log, 1),
                change_at(log, 2, 1, "a", thumbs(true)),
                change_at(log, 3, 1, "a", thumbs(false)),
                change_at(log, 4, 1, "b", thumbs(true)),
            ]
        };
        writer
            .write(&store, batch(&log), &CancellationToken::new())
            .await;
        let once = log.row(1);
        let logged = log.change_log();
        assert_eq!(reactions(&log, 1), Some(1));
        // Delivered again (its acks were lost): each change is in the row already.
        writer
            .write(&store, batch(&log), &CancellationToken::new())
            .await;
        writer.acks_sent().await;
        assert_eq!(log.row(1), once, "a's reaction stays taken back");
        assert_eq!(log.change_log(), logged);
        let events = log.events();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Updated(_)))
                .count(),
            1,
            "nothing to write the second time: {events:?}"
        );
        let mut acked = log.acked();
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 1, 2, 2, 3, 3, 4, 4], "each acked both times");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_between_the_log_and_the_rows_loses_no_entry_and_doubles_no_change() {
        let log = Log::default();
        // The rows' write fails twice (HarperDB went away) after the log was written.
        let store = FakeStore::new(&log).failing_updates([outage(), outage()]);
        let writer = writer(&log);
        let batch = vec![
            message_at(&log, 1),
            change_at(&log, 2, 1, "a", thumbs(true)),
            change_at(&log, 3, 1, "b", thumbs(true)),
        ];
        writer.write(&store, batch, &CancellationToken::new()).await;
        assert_eq!(reactions(&log, 1), Some(2));
        assert_eq!(log.row(1).map(|s| s.version), Some(3));
        assert_eq!(
            log.change_log()
                .iter()
                .map(|r| r.sequence)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        let events = log.events();
        let updated = position(&events, |e| matches!(e, Event::Updated(_)));
        assert!(
            updated < first_ack_of(&events, &[2, 3]),
            "the changes acked after the rows were written: {events:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_of_no_stored_message_of_their_room_are_skipped_and_the_rest_applied() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let mut forged = change(1, "a", thumbs(true));
        forged.target = chatify_shared::id::message_id(1_600_000_000_000, 1);
        let mut not_an_id = change(1, "a", thumbs(true));
        not_an_id.target = uuid::Uuid::new_v4();
        let mut other_room = change(1, "a", thumbs(true));
        other_room.room = "elsewhere".into();
        let batch = vec![
            message_at(&log, 1),
            // The target is a change, not a message.
            change_at(&log, 2, 1, "a", thumbs(true)),
            change_at(&log, 3, 2, "b", thumbs(true)),
            // The target comes after the change.
            change_at(&log, 4, 9, "b", thumbs(true)),
            FakeDelivery::change(&log, 5, &forged),
            FakeDelivery::change(&log, 6, &not_an_id),
            // On room r's subject, naming another room.
            FakeDelivery::change(&log, 7, &other_room)
                .on_subject(RoomToken::new("r").store_subject()),
            change_at(&log, 8, 1, "c", thumbs(true)),
            message_at(&log, 9),
        ];
        writer.write(&store, batch, &CancellationToken::new()).await;
        writer.acks_sent().await;
        let mut acked = log.acked();
        acked.sort_unstable();
        assert_eq!(acked, (1..=9).collect::<Vec<_>>(), "every event is acked");
        assert_eq!(reactions(&log, 1), Some(2), "a's and c's");
        assert_eq!(log.row(1).map(|s| s.version), Some(8));
        assert_eq!(reactions(&log, 9), None);
        assert_eq!(
            log.change_log()
                .iter()
                .map(|r| r.sequence)
                .collect::<Vec<_>>(),
            vec![2, 8]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_whose_earlier_events_are_not_written_in_time_are_handed_back() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let started = tokio::time::Instant::now();
        // 1..=3 are held elsewhere and never acked.
        writer
            .write(
                &store,
                vec![
                    change_at(&log, 4, 1, "a", thumbs(true)),
                    message_at(&log, 5),
                ],
                &CancellationToken::new(),
            )
            .await;
        assert_eq!(started.elapsed(), FLOOR_WAIT);
        assert_eq!(log.nakked(), vec![4, 5]);
        assert!(log.acked().is_empty());
        assert!(log.stored().is_empty() && log.change_log().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_skipping_sequences_held_elsewhere_is_written_run_by_run() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer_from(&log, 3);
        // 6 and 7 are held by another persister, which acks them after a second.
        let other = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            other.settle(6);
            other.settle(7);
        });
        let started = tokio::time::Instant::now();
        let batch = vec![
            change_at(&log, 8, 4, "b", thumbs(true)),
            message_at(&log, 4),
            change_at(&log, 5, 4, "a", thumbs(true)),
            change_at(&log, 9, 4, "a", thumbs(false)),
        ];
        writer.write(&store, batch, &CancellationToken::new()).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1100),
            "{waited:?}"
        );
        let events = log.events();
        let first_run = position(&events, |e| *e == Event::Acked(5));
        let released = position(&events, |e| *e == Event::Acked(7));
        let second_run = position(&events, |e| *e == Event::Acked(8));
        assert!(first_run < released && released < second_run, "{events:?}");
        assert!(log.nakked().is_empty());
        assert_eq!(reactions(&log, 4), Some(1), "b's, after a took theirs back");
        assert_eq!(log.row(4).map(|s| s.version), Some(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_harperdb_refuses_is_dead_lettered_and_the_others_applied() {
        let log = Log::default();
        let store = FakeStore::new(&log);
        let writer = writer(&log);
        let batch = vec![
            message_at(&log, 1),
            change_at(&log, 2, 1, "ann", edit(crate::fakes::POISON)),
            change_at(&log, 3, 1, "a", thumbs(true)),
        ];
        writer.write(&store, batch, &CancellationToken::new()).await;
        let events = log.events();
        let dead: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::DeadLettered { .. }))
            .collect();
        assert!(
            matches!(dead.as_slice(), [Event::DeadLettered { sequence, change: true, .. }] if sequence == "2"),
            "{events:?}"
        );
        assert_eq!(log.acked(), vec![1, 2, 3]);
        let row = log.row(1).map(|s| s.message);
        assert_eq!(row.as_ref().map(|m| m.message.as_str()), Some("m1"));
        assert_eq!(reactions(&log, 1), Some(1));
    }
}
