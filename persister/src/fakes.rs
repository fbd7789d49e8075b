//! Test doubles for the writer's parts: a HarperDB ([`FakeStore`]) with its two tables,
//! JetStream deliveries ([`FakeDelivery`]), the consumer's ack floor ([`FakeFloor`]) and the
//! dead-letter stream ([`FakePublisher`]), all writing what happens to them, in order, into one
//! [`Log`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chatify_shared::changes::{CHANGE_HEADER, Change, MessageState, StoredChange};
use chatify_shared::storage::{RoomKey, StoredChangeRecord, StoredRecord, storage_key};
use chatify_shared::subjects::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SEQUENCE_HEADER, RoomToken};
use chatify_shared::wire::{ChatMessage, StoredMessage};
use reqwest::StatusCode;
use tokio::time::Instant;

use crate::dead_letter::Publisher;
use crate::delivery::Delivery;
use crate::floor::{AckFloor, FloorError};
use crate::harperdb::HarperError;
use crate::lanes::Store;

/// The text of a message the fake HarperDB refuses (as HarperDB refuses a record, in any batch).
pub const POISON: &str = "poison";

/// What happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An insert of these sequences succeeded.
    Inserted(Vec<u64>),
    /// An insert of these sequences failed.
    Failed(Vec<u64>),
    Acked(u64),
    Terminated(u64),
    InProgress(u64),
    /// Handed back to JetStream (a NAK).
    Nakked(u64),
    /// The rows of the messages at these sequences were written over (their new states).
    Updated(Vec<u64>),
    /// Change log records of the changes at these sequences were inserted (or found there).
    Logged(Vec<u64>),
    /// Published to the dead-letter stream: subject, reason header, sequence header, and
    /// whether it carried the change header.
    DeadLettered {
        subject: String,
        reason: String,
        sequence: String,
        change: bool,
    },
}

#[derive(Default)]
struct State {
    /// Everything that happened, in order.
    events: Vec<Event>,
    /// When each insert started.
    attempts: Vec<Instant>,
    /// Inserts finished per connection, by connection number.
    per_connection: BTreeMap<usize, usize>,
    /// Inserts running now, in all and per connection, and the most there ever were.
    at_once: usize,
    most_at_once: usize,
    on_connection: BTreeMap<usize, usize>,
    most_on_a_connection: usize,
    /// The messages table: rows by key.
    rows: BTreeMap<String, MessageState>,
    /// The change log table: records by key.
    changes: BTreeMap<String, StoredChangeRecord>,
}

/// The shared record of a test's fakes.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<State>>);

impl Log {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, event: Event) {
        self.state().events.push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    /// When each insert started, in order.
    pub fn attempts(&self) -> Vec<Instant> {
        self.state().attempts.clone()
    }

    /// Successful inserts.
    pub fn inserts(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Inserted(_)))
            .count()
    }

    /// The sequences stored.
    pub fn stored(&self) -> HashSet<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Inserted(sequences) => Some(sequences),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// The sequences acked, in order.
    pub fn acked(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Acked(sequence) => Some(sequence),
                _ => None,
            })
            .collect()
    }

    /// Inserts finished on each connection, in the order the connections were made.
    pub fn inserts_per_connection(&self) -> BTreeMap<usize, usize> {
        self.state().per_connection.clone()
    }

    pub fn most_at_once(&self) -> usize {
        self.state().most_at_once
    }

    pub fn most_at_once_on_a_connection(&self) -> usize {
        self.state().most_on_a_connection
    }

    /// The sequences handed back, in order.
    pub fn nakked(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Nakked(sequence) => Some(sequence),
                _ => None,
            })
            .collect()
    }

    /// The row of room `r`'s message at `sequence`.
    pub fn row(&self, sequence: u64) -> Option<MessageState> {
        self.state()
            .rows
            .get(&storage_key(&RoomKey::new("r"), sequence))
            .cloned()
    }

    /// The change log, in key order (per room, stream order).
    pub fn change_log(&self) -> Vec<StoredChangeRecord> {
        self.state().changes.values().cloned().collect()
    }

    /// Records that another persister acked `sequence` (it counts for the [`FakeFloor`]).
    pub fn settle(&self, sequence: u64) {
        self.push(Event::Acked(sequence));
    }
}

/// A shutdown token cancelled `after` from now.
pub fn shutdown_after(after: Duration) -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        stop.cancel();
    });
    shutdown
}

/// An outage as HarperDB reports one.
pub fn outage() -> HarperError {
    HarperError::Server {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "down".into(),
    }
}

/// A refusal of the request itself.
pub fn refusal() -> HarperError {
    HarperError::Rejected {
        status: StatusCode::BAD_REQUEST,
        message: "refused".into(),
    }
}

/// `n` messages of room `r` at sequences `from + 1`…
pub fn messages(from: u64, n: u64) -> Vec<ChatMessage> {
    (from + 1..=from + n)
        .map(|sequence| stored(&format!("m{sequence}")).into_message(sequence))
        .collect()
}

fn stored(text: &str) -> StoredMessage {
    StoredMessage {
        room: "r".into(),
        username: "u".into(),
        message: text.into(),
        created_time: 1_700_000_000_000,
        user_id: None,
        ..StoredMessage::default()
    }
}

/// A HarperDB whose inserts take `delay`, fail with the queued errors first, and refuse any
/// batch holding a [`POISON`] message. Each [`Store::dedicated`] is a new connection.
#[derive(Clone)]
pub struct FakeStore {
    /// Where inserts are written.
    log: Log,
    /// This client's connection number.
    connection: usize,
    /// Connections made so far, shared by every client.
    connections: Arc<AtomicUsize>,
    /// Errors the next operations (of any kind) answer, shared by every client.
    failures: Arc<Mutex<VecDeque<HarperError>>>,
    /// Errors the next updates answer (after `failures`), shared by every client.
    update_failures: Arc<Mutex<VecDeque<HarperError>>>,
    /// How long an operation takes.
    delay: Duration,
}

impl FakeStore {
    pub fn new(log: &Log) -> Self {
        Self {
            log: log.clone(),
            connection: 0,
            connections: Arc::new(AtomicUsize::new(1)),
            failures: Arc::default(),
            update_failures: Arc::default(),
            delay: Duration::ZERO,
        }
    }

    pub fn taking(self, delay: Duration) -> Self {
        Self { delay, ..self }
    }

    pub fn failing(self, errors: impl IntoIterator<Item = HarperError>) -> Self {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(errors);
        self
    }

    pub fn failing_updates(self, errors: impl IntoIterator<Item = HarperError>) -> Self {
        self.update_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(errors);
        self
    }

    fn next_failure(&self) -> Option<HarperError> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    fn next_update_failure(&self) -> Option<HarperError> {
        self.next_failure().or_else(|| {
            self.update_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
        })
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

impl Store for FakeStore {
    fn insert(
        &self,
        records: &[ChatMessage],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        let sequences: Vec<u64> = records.iter().map(ChatMessage::sequence).collect();
        let poisoned = records.iter().any(|r| r.message == POISON);
        let records = records.to_vec();
        async move {
            {
                let mut state = self.log.state();
                state.attempts.push(Instant::now());
                state.at_once += 1;
                state.most_at_once = state.most_at_once.max(state.at_once);
                let on = state.on_connection.entry(self.connection).or_default();
                *on += 1;
                let on = *on;
                state.most_on_a_connection = state.most_on_a_connection.max(on);
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let result = match self.next_failure() {
                Some(e) => Err(e),
                None if poisoned => Err(refusal()),
                None => Ok(()),
            };
            let mut state = self.log.state();
            state.at_once -= 1;
            *state.on_connection.entry(self.connection).or_default() -= 1;
            if result.is_ok() {
                *state.per_connection.entry(self.connection).or_default() += 1;
                for record in &records {
                    let key = StoredRecord::new(record).pk;
                    state
                        .rows
                        .entry(key)
                        .or_insert_with(|| MessageState::new(record.clone()));
                }
                state.events.push(Event::Inserted(sequences));
            } else {
                state.events.push(Event::Failed(sequences));
            }
            result
        }
    }

    fn states(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<MessageState>, HarperError>> + Send {
        let keys = keys.to_vec();
        async move {
            self.pause().await;
            if let Some(e) = self.next_failure() {
                return Err(e);
            }
            let state = self.log.state();
            Ok(keys
                .iter()
                .filter_map(|k| state.rows.get(k).cloned())
                .collect())
        }
    }

    /// Refuses a state whose text is [`POISON`] (an edit to it).
    fn update(
        &self,
        states: &[MessageState],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        let states = states.to_vec();
        async move {
            self.pause().await;
            if let Some(e) = self.next_update_failure() {
                return Err(e);
            }
            if states.iter().any(|s| s.message.message == POISON) {
                return Err(refusal());
            }
            let mut state = self.log.state();
            for s in &states {
                state.rows.insert(StoredRecord::from_state(s).pk, s.clone());
            }
            let sequences = states.iter().map(|s| s.message.sequence()).collect();
            state.events.push(Event::Updated(sequences));
            Ok(())
        }
    }

    fn log_changes(
        &self,
        records: &[StoredChangeRecord],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        let records = records.to_vec();
        async move {
            self.pause().await;
            if let Some(e) = self.next_failure() {
                return Err(e);
            }
            let mut state = self.log.state();
            for r in &records {
                state
                    .changes
                    .entry(r.pk.clone())
                    .or_insert_with(|| r.clone());
            }
            let sequences = records.iter().map(|r| r.sequence).collect();
            state.events.push(Event::Logged(sequences));
            Ok(())
        }
    }

    fn dedicated(&self) -> Result<Self, HarperError> {
        Ok(Self {
            connection: self.connections.fetch_add(1, Ordering::SeqCst),
            ..self.clone()
        })
    }
}

/// A message as JetStream delivers it, logging its acks.
pub struct FakeDelivery {
    /// Where its acks are written.
    log: Log,
    /// Its place in the stream, which names it in the log.
    sequence: u64,
    /// Its room's store subject.
    subject: String,
    /// The stored message or change as JSON, or anything else for an undecodable one.
    payload: Bytes,
    /// Whether it carries the change header.
    change: bool,
}

impl FakeDelivery {
    /// The message stored at `sequence` with `text`, in room `r`.
    pub fn new(log: &Log, sequence: u64, text: &str) -> Self {
        Self {
            log: log.clone(),
            sequence,
            subject: RoomToken::new("r").store_subject(),
            payload: serde_json::to_vec(&stored(text))
                .map(Bytes::from)
                .unwrap_or_default(),
            change: false,
        }
    }

    /// `change`, stored at `sequence` on its room's subject with the change header.
    pub fn change(log: &Log, sequence: u64, change: &StoredChange) -> Self {
        Self {
            log: log.clone(),
            sequence,
            subject: RoomToken::new(&change.room).store_subject(),
            payload: serde_json::to_vec(change)
                .map(Bytes::from)
                .unwrap_or_default(),
            change: true,
        }
    }

    /// The same delivery, stored under `subject` instead.
    pub fn on_subject(self, subject: String) -> Self {
        Self { subject, ..self }
    }

    /// A delivery at `sequence` that is not a stored message.
    pub fn undecodable(log: &Log, sequence: u64) -> Self {
        Self {
            payload: Bytes::from_static(b"not json"),
            ..Self::new(log, sequence, "")
        }
    }

    /// Deliveries of messages at sequences `from + 1`…, with [`POISON`] at `poison`.
    pub fn batch(log: &Log, from: u64, n: u64, poison: Option<u64>) -> Vec<Self> {
        (from + 1..=from + n)
            .map(|sequence| {
                let text = if poison == Some(sequence) {
                    POISON.to_owned()
                } else {
                    format!("m{sequence}")
                };
                Self::new(log, sequence, &text)
            })
            .collect()
    }
}

impl Delivery for FakeDelivery {
    fn stream_sequence(&self) -> Result<u64, async_nats::Error> {
        Ok(self.sequence)
    }

    /// Every fake is a first delivery.
    fn redelivered(&self) -> bool {
        false
    }

    fn subject(&self) -> &str {
        &self.subject
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    fn is_change(&self) -> bool {
        self.change
    }

    async fn ack(&self) {
        self.log.push(Event::Acked(self.sequence));
    }

    async fn terminate(&self) {
        self.log.push(Event::Terminated(self.sequence));
    }

    async fn in_progress(&self) {
        self.log.push(Event::InProgress(self.sequence));
    }

    async fn nak(&self, _delay: Duration) {
        self.log.push(Event::Nakked(self.sequence));
    }
}

/// A change to room `r`'s message at `target` by member `by`.
pub fn change(target: u64, by: &str, what: Change) -> StoredChange {
    StoredChange {
        room: "r".into(),
        target: messages(target - 1, 1)
            .first()
            .map(|m| m.id)
            .unwrap_or_default(),
        change: what,
        at: 1_700_000_100_000,
        by: chatify_shared::changes::Actor {
            member_id: by.into(),
            username: by.into(),
            user_id: None,
        },
    }
}

/// A reaction (`add`) with 👍.
pub fn thumbs(add: bool) -> Change {
    Change::React {
        emoji: "👍".into(),
        add,
        distinct_max: 20,
    }
}

/// The consumer's ack floor as the [`Log`] tells it: the highest sequence up to which every
/// one is acked (or terminated), counting from `base` (every sequence up to it counts as
/// acked).
#[derive(Clone)]
pub struct FakeFloor {
    /// Where acks are read.
    log: Log,
    /// Sequences acked before the test.
    base: u64,
}

impl FakeFloor {
    pub fn new(log: &Log, base: u64) -> Self {
        Self {
            log: log.clone(),
            base,
        }
    }
}

impl AckFloor for FakeFloor {
    async fn floor(&self) -> Result<u64, FloorError> {
        let settled: HashSet<u64> = self
            .log
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Acked(s) | Event::Terminated(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut floor = self.base;
        while settled.contains(&(floor + 1)) {
            floor += 1;
        }
        Ok(floor)
    }
}

/// The dead-letter stream: fails the first publishes it is told to, logs the others.
#[derive(Clone)]
pub struct FakePublisher {
    /// Where dead letters are written.
    log: Log,
    /// Publishes still to fail.
    failures: Arc<AtomicUsize>,
}

impl FakePublisher {
    pub fn new(log: &Log) -> Self {
        Self {
            log: log.clone(),
            failures: Arc::default(),
        }
    }

    pub fn failing(self, publishes: usize) -> Self {
        self.failures.store(publishes, Ordering::SeqCst);
        self
    }
}

impl Publisher for FakePublisher {
    async fn publish(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        _payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err("the dead-letter stream is not answering".into());
        }
        let header = |name| {
            headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        self.log.push(Event::DeadLettered {
            subject,
            reason: header(DEAD_LETTER_REASON_HEADER),
            sequence: header(DEAD_LETTER_SEQUENCE_HEADER),
            change: header(CHANGE_HEADER) == crate::event::CHANGE_HEADER_VALUE,
        });
        Ok(())
    }
}
