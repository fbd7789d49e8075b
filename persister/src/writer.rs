//! The durable JetStream consumer that moves messages into HarperDB.
//!
//! It collects up to `batch_size` messages (waiting at most `batch_wait_ms` once the first
//! arrived), writes them in one insert, and acks them only after HarperDB confirmed the write.
//! A failed write is retried with exponential back-off while the messages' ack deadline is kept
//! extended, so nothing is redelivered behind the writer's back. Several persisters may share
//! the consumer; inserts are idempotent, so a redelivery never creates a second record.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chatify_shared::config::PersisterSettings;
use chatify_shared::subjects::{
    DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SEQUENCE_HEADER, MESSAGES_STREAM, PERSISTER_CONSUMER,
    dead_letter_subject,
};
use chatify_shared::wire::{ChatMessage, StoredMessage};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::harperdb::{HarperDb, HarperError};
use crate::metrics as m;
use crate::spread::{Busy, Spread, Timing, Verdict};

/// How long JetStream waits for an ack before redelivering; kept extended while retrying.
const ACK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("could not create the durable consumer {PERSISTER_CONSUMER}: {0}")]
    Consumer(#[from] jetstream::stream::ConsumerError),
    #[error("could not read from the durable consumer: {0}")]
    Messages(#[from] jetstream::consumer::StreamError),
    #[error("could not build the HarperDB clients: {0}")]
    Client(#[from] HarperError),
}

/// The consumer's configuration: explicit acks, so each message is acked after its write.
pub fn consumer_config() -> pull::Config {
    pull::Config {
        durable_name: Some(PERSISTER_CONSUMER.to_owned()),
        description: Some("Chatify persisters: messages into HarperDB".to_owned()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Exponential back-off between retries: each wait doubles, up to `max`.
struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    /// The coming wait, for logs.
    fn next_ms(&self) -> u64 {
        u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sleeps the current delay and doubles it; false if shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(self.max);
        true
    }
}

/// What writing some records came to.
enum Outcome {
    /// Stored; `retried` if it took more than one request.
    Written { retried: bool },
    /// HarperDB refused them for good (after the allowed attempts).
    Rejected(HarperError),
    /// Shutdown came while retrying; nothing was acked.
    Stopped,
}

/// Acks a written message. A lost ack only means a redelivery, which the insert skips.
async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        tracing::warn!(error = %e, "ack failed after a successful write");
    }
}

/// What a batch task hands back to the dispatcher.
struct LaneDone {
    lane: usize,
    /// The lane's connection generation the batch was written on; a timing from a connection
    /// replaced meanwhile says nothing about the new one.
    generation: u64,
    /// The insert's timing, when it was a full batch stored at the first try.
    timing: Option<Timing>,
    /// Whether any request failed: the lane's connection may have been replaced by the pool.
    failed: bool,
}

/// The writer's connections to HarperDB, one batch at a time on each, and where they stand.
/// Batches are written on as many lanes at once as there are lanes; storage keys are stream
/// sequences, so the order batches land in changes nothing a reader sees.
struct Lanes {
    /// One client per lane, each on a connection of its own ([`HarperDb::dedicated`]).
    clients: Vec<HarperDb>,
    /// Bumped when a lane reconnects.
    generations: Vec<u64>,
    /// Lanes with no batch in flight.
    free: Vec<usize>,
    /// Which lane each running batch task holds, to free it even if the task panicked.
    running: HashMap<tokio::task::Id, usize>,
    /// Whether the lanes share HarperDB threads (see [`crate::spread`]).
    spread: Spread,
}

impl Lanes {
    fn new(db: &HarperDb, lanes: usize) -> Result<Self, HarperError> {
        Ok(Self {
            clients: (0..lanes)
                .map(|_| db.dedicated())
                .collect::<Result<_, _>>()?,
            generations: vec![0; lanes],
            free: (0..lanes).rev().collect(),
            running: HashMap::new(),
            spread: Spread::new(lanes),
        })
    }

    /// Takes `lane`, or any free lane; the caller made sure it is free.
    fn take(&mut self, lane: Option<usize>) -> usize {
        match lane {
            Some(lane) => {
                self.free.retain(|&l| l != lane);
                lane
            }
            None => self.free.pop().unwrap_or(0),
        }
    }

    /// Frees the lane of a finished batch task and learns from its timing.
    fn finish(
        &mut self,
        done: Option<Result<(tokio::task::Id, LaneDone), tokio::task::JoinError>>,
    ) {
        let done = match done {
            None => return,
            Some(Ok((id, done))) => {
                self.running.remove(&id);
                done
            }
            Some(Err(e)) => {
                // Its messages stay unacked: JetStream redelivers them.
                tracing::error!(error = %e, "a batch write task failed; its messages will be redelivered");
                if let Some(lane) = self.running.remove(&e.id()) {
                    self.free.push(lane);
                    self.spread.forget(lane);
                }
                return;
            }
        };
        self.free.push(done.lane);
        if self.generations.get(done.lane) != Some(&done.generation) {
            return;
        }
        if done.failed {
            self.spread.forget(done.lane);
        } else if let Some(timing) = done.timing {
            match self.spread.record(timing) {
                Verdict::Pending => {}
                Verdict::Apart { ratio } => metrics::gauge!(m::HARPERDB_SLOWDOWN).set(ratio),
                Verdict::Shared { ratio, reconnect } => {
                    metrics::gauge!(m::HARPERDB_SLOWDOWN).set(ratio);
                    if let Some(lane) = reconnect {
                        self.reconnect(lane, ratio);
                    }
                }
            }
        }
    }

    fn reconnect(&mut self, lane: usize, ratio: f64) {
        match self.clients[lane].dedicated() {
            Ok(client) => {
                tracing::info!(
                    lane,
                    slowdown = format!("{ratio:.1}"),
                    "HarperDB connections share a worker thread; reconnecting one"
                );
                metrics::counter!(m::HARPERDB_RECONNECTS).increment(1);
                self.clients[lane] = client;
                self.generations[lane] += 1;
            }
            Err(e) => tracing::warn!(error = %e, "could not build a new HarperDB client"),
        }
    }
}

/// Runs the write loop until `shutdown`, finishing (and acking) the batches in hand first.
#[derive(Clone)]
pub struct Writer {
    /// Where messages come from.
    stream: jetstream::stream::Stream,
    /// Where they go.
    db: HarperDb,
    /// Where messages HarperDB refuses for good go.
    js: jetstream::Context,
    settings: PersisterSettings,
    /// Set once the table exists and the consumer is bound; `/readyz` reads it.
    ready: Arc<AtomicBool>,
    /// Inserts in flight on all lanes, to tell an insert alone from one alongside the others.
    busy: Busy,
    /// The acks of written batches, sent while their lanes write the next ones.
    acks: TaskTracker,
}

impl Writer {
    pub fn new(
        stream: jetstream::stream::Stream,
        db: HarperDb,
        js: jetstream::Context,
        settings: PersisterSettings,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            stream,
            db,
            js,
            settings,
            ready,
            busy: Busy::default(),
            acks: TaskTracker::new(),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WriterError> {
        if !self
            .until_ok(&shutdown, "creating the HarperDB table", || {
                self.db.ensure_schema()
            })
            .await
        {
            return Ok(());
        }
        let consumer = self
            .stream
            .get_or_create_consumer(PERSISTER_CONSUMER, consumer_config())
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.settings.batch_size)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await?;
        self.ready.store(true, Ordering::Relaxed);
        tokio::spawn(report_lag(self.stream.clone(), shutdown.clone()));
        tracing::info!(
            stream = MESSAGES_STREAM,
            consumer = PERSISTER_CONSUMER,
            "writing messages to HarperDB"
        );

        let batch_wait = Duration::from_millis(self.settings.batch_wait_ms);
        let mut lanes = Lanes::new(&self.db, self.settings.write_connections)?;
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                next = messages.next() => next,
            };
            let mut batch = match first {
                Some(Ok(m)) => vec![m],
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer read failed; continuing");
                    continue;
                }
                None => break,
            };
            let deadline = tokio::time::Instant::now() + batch_wait;
            while batch.len() < self.settings.batch_size {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "consumer read failed mid-batch");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            // Short of a backlog one insert at a time is enough, and one insert never shares a
            // HarperDB thread: a batch that is not full waits until no lane is busy, taking the
            // messages that arrive meanwhile (filled up, it goes out like any full batch).
            while batch.len() < self.settings.batch_size && !in_flight.is_empty() {
                tokio::select! {
                    done = in_flight.join_next_with_id() => lanes.finish(done),
                    next = messages.next() => match next {
                        Some(Ok(m)) => batch.push(m),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consumer read failed mid-batch");
                        }
                        None => break,
                    },
                }
            }
            // A full batch is a backlog; now and then one of them is written on a lane alone,
            // so that the lanes' times together can be compared with it.
            let alone = (batch.len() >= self.settings.batch_size)
                .then(|| lanes.spread.wants_alone(Instant::now()))
                .flatten();
            if alone.is_some() {
                while !in_flight.is_empty() {
                    lanes.finish(in_flight.join_next_with_id().await);
                }
            } else {
                while lanes.free.is_empty() {
                    lanes.finish(in_flight.join_next_with_id().await);
                }
            }
            let lane = lanes.take(alone);
            let (db, generation) = (lanes.clients[lane].clone(), lanes.generations[lane]);
            let (writer, shutdown) = (self.clone(), shutdown.clone());
            let task = in_flight.spawn(async move {
                writer
                    .write_batch(&db, lane, generation, batch, &shutdown)
                    .await
            });
            lanes.running.insert(task.id(), lane);
            if alone.is_some() {
                lanes.finish(in_flight.join_next_with_id().await);
            }
        }
        while !in_flight.is_empty() {
            lanes.finish(in_flight.join_next_with_id().await);
        }
        self.acks.close();
        self.acks.wait().await;
        self.ready.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Decodes, writes and acks one batch on `db`, lane `lane`'s client. Returns when every
    /// message is written and its ack under way (in `self.acks`), terminated as undecodable, or
    /// left unacked because shutdown came during a retry (then JetStream redelivers it to a
    /// persister after the ack wait).
    async fn write_batch(
        &self,
        db: &HarperDb,
        lane: usize,
        generation: u64,
        batch: Vec<jetstream::Message>,
        shutdown: &CancellationToken,
    ) -> LaneDone {
        let full = batch.len() >= self.settings.batch_size;
        let mut done = LaneDone {
            lane,
            generation,
            timing: None,
            failed: false,
        };
        let redelivered = batch
            .iter()
            .filter(|m| m.info().is_ok_and(|info| info.delivered > 1))
            .count();
        if redelivered > 0 {
            metrics::counter!(m::REDELIVERIES).increment(redelivered as u64);
        }
        let mut decoded = Vec::with_capacity(batch.len());
        let mut ackable = Vec::with_capacity(batch.len());
        for m in batch {
            let sequence = m.info().map(|info| info.stream_sequence);
            match (
                sequence,
                serde_json::from_slice::<StoredMessage>(&m.payload),
            ) {
                (Ok(sequence), Ok(stored)) => {
                    decoded.push(stored.into_message(sequence));
                    ackable.push(m);
                }
                (Err(e), _) => {
                    // Not a JetStream delivery (no sequence): nothing to ack either.
                    tracing::error!(subject = %m.subject, error = %e, "message without stream metadata skipped");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                }
                (Ok(_), Err(e)) => {
                    // Gateways only publish valid messages; whatever this is, retrying won't fix it.
                    tracing::error!(subject = %m.subject, error = %e, "undecodable message terminated");
                    metrics::counter!(m::POISON_MESSAGES).increment(1);
                    if let Err(e) = m.ack_with(AckKind::Term).await {
                        tracing::warn!(error = %e, "could not terminate an undecodable message");
                    }
                }
            }
        }
        if decoded.is_empty() {
            return done;
        }
        let (outcome, timing) = self
            .busy
            .time(
                lane,
                self.settings.write_connections,
                decoded.len(),
                self.write(db, &decoded, &ackable, shutdown, 1),
            )
            .await;
        done.failed = !matches!(outcome, Outcome::Written { retried: false });
        if full && !done.failed {
            done.timing = Some(timing);
        }
        match outcome {
            Outcome::Written { .. } => {
                metrics::histogram!(m::WRITE_DURATION).record(timing.elapsed.as_secs_f64());
                metrics::histogram!(m::BATCH_MESSAGES).record(decoded.len() as f64);
                metrics::counter!(m::MESSAGES_STORED).increment(decoded.len() as u64);
                // Acked beside the lane, which takes its next batch meanwhile; `run` waits
                // for these before it returns.
                self.acks.spawn(async move {
                    for m in &ackable {
                        ack(m).await;
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
                    match self
                        .write(
                            db,
                            one,
                            std::slice::from_ref(message),
                            shutdown,
                            self.settings.max_attempts,
                        )
                        .await
                    {
                        Outcome::Written { .. } => {
                            metrics::counter!(m::MESSAGES_STORED).increment(1);
                            ack(message).await;
                        }
                        Outcome::Stopped => return done,
                        Outcome::Rejected(e) => {
                            if !self.dead_letter(message, &e, shutdown).await {
                                return done;
                            }
                        }
                    }
                }
            }
        }
        done
    }

    /// Writes `records`, retrying transient failures (HarperDB unreachable or failing) until
    /// they pass or shutdown comes, and permanent rejections up to `attempts` times.
    async fn write(
        &self,
        db: &HarperDb,
        records: &[ChatMessage],
        messages: &[jetstream::Message],
        shutdown: &CancellationToken,
        attempts: u32,
    ) -> Outcome {
        let started = Instant::now();
        let mut rejections = 0;
        let mut retried = false;
        let mut backoff = self.backoff();
        loop {
            if started.elapsed() > ACK_WAIT / 3 {
                self.keep_alive(messages).await;
            }
            match db.insert(records).await {
                Ok(()) => return Outcome::Written { retried },
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.next_ms(), "writing to HarperDB failed; retrying");
                }
                Err(e) => {
                    rejections += 1;
                    if rejections >= attempts {
                        return Outcome::Rejected(e);
                    }
                    tracing::warn!(error = %e, attempt = rejections, "HarperDB rejected a write; retrying");
                }
            }
            metrics::counter!(m::WRITE_RETRIES).increment(1);
            retried = true;
            if !backoff.wait(shutdown).await {
                return Outcome::Stopped;
            }
        }
    }

    /// Moves a message HarperDB refuses for good to the dead-letter stream, then acks it.
    /// Returns false if shutdown came first (the message stays unacked and comes back).
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        reason: &HarperError,
        shutdown: &CancellationToken,
    ) -> bool {
        let subject = dead_letter_subject(&message.subject);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(DEAD_LETTER_REASON_HEADER, reason.to_string().as_str());
        if let Ok(info) = message.info() {
            headers.insert(
                DEAD_LETTER_SEQUENCE_HEADER,
                info.stream_sequence.to_string().as_str(),
            );
        }
        let mut backoff = self.backoff();
        loop {
            let published = async {
                self.js
                    .publish_with_headers(subject.clone(), headers.clone(), message.payload.clone())
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(async_nats::Error::from)
            }
            .await;
            match published {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "could not dead-letter a message; retrying"),
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
        tracing::error!(%subject, error = %reason, "message refused by HarperDB moved to the dead-letter stream");
        metrics::counter!(m::DEAD_LETTERED).increment(1);
        ack(message).await;
        true
    }

    /// Tells JetStream the messages are still being worked on, if a retry has taken a while.
    async fn keep_alive(&self, messages: &[jetstream::Message]) {
        for m in messages {
            if let Err(e) = m.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "progress ack failed");
            }
        }
    }

    /// Runs `op` until it succeeds (true) or shutdown (false), backing off between attempts.
    /// A permanent rejection is retried as well, but logged as an error each time.
    async fn until_ok<F, Fut>(&self, shutdown: &CancellationToken, what: &str, mut op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), HarperError>>,
    {
        let mut backoff = self.backoff();
        loop {
            match op().await {
                Ok(()) => return true,
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.next_ms(), "{what} failed; retrying");
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.next_ms(), "{what} was rejected; retrying");
                }
            }
            metrics::counter!(m::WRITE_RETRIES).increment(1);
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }

    /// A fresh back-off from the configured initial to maximum delay.
    fn backoff(&self) -> Backoff {
        Backoff {
            delay: Duration::from_millis(self.settings.retry_initial_ms),
            max: Duration::from_millis(self.settings.retry_max_ms),
        }
    }
}

/// Keeps the consumer-lag gauge current: messages not yet delivered plus delivered but unacked.
async fn report_lag(stream: jetstream::stream::Stream, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match stream.consumer_info(PERSISTER_CONSUMER).await {
            Ok(info) => metrics::gauge!(m::CONSUMER_PENDING)
                .set((info.num_pending + info.num_ack_pending as u64) as f64),
            Err(e) => tracing::debug!(error = %e, "consumer info unavailable"),
        }
    }
}
