//! The durable JetStream consumer that moves messages into HarperDB.
//!
//! It collects up to `persister.batch_size` messages (waiting at most `batch_wait_ms` once the
//! first arrived) and hands each batch to a free lane ([`crate::lanes`]), which writes it in one
//! insert ([`crate::batch`]); messages are acked only after HarperDB confirmed their write.
//! A run of events holding changes waits for the ack floor beside the lanes
//! ([`crate::waiting`]), and takes a lane only once its floor is there. A
//! failed write is retried while the messages' ack deadline is kept extended, so nothing is
//! redelivered behind the writer's back. Several persisters may share the consumer; inserts are
//! idempotent, so a redelivery never creates a second record.

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use chatify_shared::config::PersisterSettings;
use chatify_shared::subjects::{MESSAGES_STREAM, PERSISTER_CONSUMER};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::batch::{BatchWriter, ChangeRun, Part};
use crate::dead_letter::{DeadLetters, Publisher};
use crate::delivery::Delivery;
use crate::floor::AckFloor;
use crate::harperdb::{HarperDb, HarperError};
use crate::lanes::{Lanes, Store};
use crate::retry::Retry;
use crate::waiting::{Bound, Waiting, Woken};

/// How long JetStream waits for an ack before redelivering; kept extended while retrying.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// The most events delivered and not yet acked; JetStream delivers no more until some are.
const MAX_ACK_PENDING: i64 = 20_000;

/// The most change runs waiting for the ack floor at once. Each is a write of its own once the
/// floor comes, one after the other (tens of milliseconds each), so this bounds the time they
/// take then to seconds; past it the last ones are handed back and come again a second later
/// (they wait behind the held ones anyway).
const MAX_WAITING_RUNS: usize = 256;

/// How often the consumer's leader sends an idle heartbeat to a waiting pull request. Two missed
/// ones mean the pull went unheard (see [`repulling`]).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long to wait before pulling afresh after "no responders" (no leader of the consumer yet).
const NO_LEADER_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
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
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Reads the messages stream through the durable consumer and writes it to HarperDB.
pub struct Consumer {
    /// Where messages come from.
    stream: jetstream::stream::Stream,
    /// Where they go; each lane gets a connection of its own to it.
    db: HarperDb,
    /// Where messages HarperDB refuses for good go (the dead-letter stream).
    js: jetstream::Context,
    /// Batch size and wait, lanes, retries.
    settings: PersisterSettings,
    /// Set once the table exists and the consumer is bound; `/readyz` reads it.
    ready: Arc<AtomicBool>,
}

impl Consumer {
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
        }
    }

    /// Runs until `shutdown`, then finishes (and acks) the batches in hand.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let retry = Retry::new(&self.settings, ACK_WAIT / 3);
        let schema = || self.db.ensure_schema();
        if !retry
            .until_ok(&shutdown, "creating the HarperDB table", schema)
            .await
        {
            return Ok(());
        }
        // On a cluster, JetStream may not answer for a while (a leader election, a node away).
        let consumer = chatify_shared::bus::retry_jetstream(
            "creating the durable consumer",
            chatify_shared::bus::JETSTREAM_SETUP_WAIT,
            chatify_shared::bus::consumer_error_is_transient,
            || {
                self.stream
                    .get_or_create_consumer(PERSISTER_CONSUMER, consumer_config())
            },
        )
        .await?;
        let batch_size = self.settings.batch_size;
        let consumer = &consumer;
        let open = move || {
            consumer
                .stream()
                .max_messages_per_batch(batch_size)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
        };
        // The first stream opens here, so that a consumer that cannot be read fails the start.
        let first = open().await?;
        let messages = Box::pin(repulling(Some(first), open, pull_stalled));
        let mut lanes = Lanes::new(&self.db, self.settings.write_connections)?;
        let dead_letters = DeadLetters::new(self.js.clone(), retry);
        let floor_wait = Duration::from_millis(self.settings.change_floor_wait_ms);
        let writer = BatchWriter::new(
            retry,
            self.settings.max_attempts,
            dead_letters,
            self.stream.clone(),
            floor_wait,
        );
        let mut waiting = Waiting::new(self.stream.clone(), floor_wait, waiting_bound());
        self.ready.store(true, Ordering::Relaxed);
        tokio::spawn(crate::lag::report(self.stream.clone(), shutdown.clone()));
        tracing::info!(
            stream = MESSAGES_STREAM,
            consumer = PERSISTER_CONSUMER,
            "writing messages to HarperDB"
        );
        let batching = Batching {
            size: self.settings.batch_size,
            wait: Duration::from_millis(self.settings.batch_wait_ms),
        };
        let mut writing = Writing {
            lanes: &mut lanes,
            waiting: &mut waiting,
            writer: &writer,
        };
        drain(messages, &mut writing, batching, &shutdown).await;
        self.ready.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// Whether a read error of the pull stream means its pulls went unheard, and how long to wait
/// before pulling afresh: two missed idle heartbeats, or no responders (no consumer leader).
fn pull_stalled(e: &jetstream::consumer::pull::MessagesError) -> Option<Duration> {
    use jetstream::consumer::pull::MessagesErrorKind as K;
    match e.kind() {
        K::MissingHeartbeat => Some(Duration::ZERO),
        K::NoResponders => Some(NO_LEADER_PAUSE),
        _ => None,
    }
}

/// The consumer's messages, pulled afresh whenever the pulls go unheard.
///
/// A pull request waits on the consumer's leader. When that node dies or steps down (a NATS
/// cluster losing a node, a rolling restart), the requests waiting there are gone, but
/// async-nats goes on counting the messages they asked for and sends no new request until they
/// expire (30 s and 5 more): the persister would write nothing meanwhile. Without requests the
/// leader's idle heartbeats stop too, so when `stalled` says so of an error (two missed
/// heartbeats, no responders) this stream is dropped (its subscription and pulls with it) and
/// `open` makes a new one, whose first request reaches the new leader, after `stalled`'s pause.
/// The error is passed on (the caller logs it). Messages fetched and not yet acked are not
/// affected: their acks go to their own reply subjects, and JetStream redelivers any it never
/// gets after the ack wait. `first` is the stream to start with (None: open one).
fn repulling<S, D, E, OE, F, Fut>(
    first: Option<S>,
    open: F,
    stalled: fn(&E) -> Option<Duration>,
) -> impl Stream<Item = Result<D, String>>
where
    S: Stream<Item = Result<D, E>> + Unpin,
    E: Display,
    OE: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, OE>>,
{
    futures::stream::unfold((open, first), move |(mut open, mut current)| async move {
        let stream = match current.as_mut() {
            Some(stream) => stream,
            None => match open().await {
                Ok(stream) => current.insert(stream),
                Err(e) => {
                    tokio::time::sleep(NO_LEADER_PAUSE).await;
                    return Some((
                        Err(format!("could not pull from the consumer: {e}")),
                        (open, None),
                    ));
                }
            },
        };
        match stream.next().await {
            None => None,
            Some(Ok(message)) => Some((Ok(message), (open, current))),
            Some(Err(e)) => match stalled(&e) {
                Some(pause) => {
                    drop(current.take());
                    tokio::time::sleep(pause).await;
                    Some((
                        Err(format!(
                            "{e}: pulling afresh (the consumer's leader may have changed)"
                        )),
                        (open, None),
                    ))
                }
                None => Some((Err(e.to_string()), (open, current))),
            },
        }
    })
}

/// How batches are cut from the messages.
#[derive(Debug, Clone, Copy)]
struct Batching {
    /// The most messages in one batch (`persister.batch_size`).
    size: usize,
    /// How long a batch waits to fill once it has its first message (`persister.batch_wait_ms`).
    wait: Duration,
}

/// How much may wait for the ack floor at once ([`Waiting`]): a quarter of the consumer's
/// ack-pending limit in events (5,000), so that JetStream goes on delivering the messages
/// written meanwhile, in at most [`MAX_WAITING_RUNS`] runs.
fn waiting_bound() -> Bound {
    Bound {
        runs: MAX_WAITING_RUNS,
        events: usize::try_from(MAX_ACK_PENDING / 4).unwrap_or(usize::MAX),
    }
}

/// Where the batches go: the lanes that write them, the change runs held until the ack floor
/// reaches them, and the writer.
struct Writing<'a, S, F, D, P> {
    /// The HarperDB connections, one write at a time on each.
    lanes: &'a mut Lanes<S>,
    /// Change runs whose floor is not there yet: they hold no lane meanwhile.
    waiting: &'a mut Waiting<F, ChangeRun<D>>,
    /// Decodes, writes and acks.
    writer: &'a BatchWriter<P, F>,
}

impl<S, F, D, P> Writing<'_, S, F, D, P>
where
    S: Store,
    F: AckFloor,
    D: Delivery,
    P: Publisher,
{
    /// Writes a batch's parts: messages on a lane at once, change runs once their floor is
    /// there (held until then, or handed back at once past the bound).
    async fn batch(&mut self, batch: Vec<D>, shutdown: &CancellationToken) {
        for part in self.writer.prepare(batch).await {
            match part {
                Part::Changes(run) => {
                    let (needs, events) = (run.needs(), run.len());
                    for refused in self.waiting.hold(needs, events, run) {
                        let handed_back = refused.into_deliveries().collect();
                        self.writer.hand_back(handed_back, false).await;
                    }
                }
                messages => self.start(messages, shutdown).await,
            }
        }
    }

    /// Starts the runs the floor reached on lanes, hands back the ones it did not in time.
    async fn woken(&mut self, woken: Vec<Woken<ChangeRun<D>>>, shutdown: &CancellationToken) {
        for woken in woken {
            match woken {
                Woken::Ready(run) => self.start(Part::Changes(run), shutdown).await,
                Woken::Expired(run) => {
                    let handed_back = run.into_deliveries().collect();
                    self.writer.hand_back(handed_back, true).await;
                }
            }
        }
    }

    /// Writes `part` on a free lane (waiting for one if all are busy).
    async fn start(&mut self, part: Part<D>, shutdown: &CancellationToken) {
        let (writer, shutdown) = (self.writer.clone(), shutdown.clone());
        self.lanes
            .start(move |store| async move {
                writer.write_part(&store, part, &shutdown).await;
            })
            .await;
    }

    /// Once the messages end or shutdown comes: writes the change runs held, as their floor
    /// comes (handing back those it does not come for in time) until shutdown, when the ones
    /// still held are handed back; then waits for the writes in hand and their acks.
    async fn finish(&mut self, shutdown: &CancellationToken) {
        while !self.waiting.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                woken = self.waiting.next() => self.woken(woken, shutdown).await,
            }
        }
        // Shutdown found these waiting: nothing of them is written, so nothing is acked.
        for run in self.waiting.release() {
            self.writer
                .hand_back(run.into_deliveries().collect(), false)
                .await;
        }
        self.lanes.finish_all().await;
        self.writer.acks_sent().await;
    }
}

/// Cuts `messages` into batches and writes each (see [`Writing::batch`]), until shutdown or
/// the end of `messages`; then finishes what it holds ([`Writing::finish`]).
async fn drain<D, E, S, P, F>(
    mut messages: impl Stream<Item = Result<D, E>> + Unpin,
    writing: &mut Writing<'_, S, F, D, P>,
    batching: Batching,
    shutdown: &CancellationToken,
) where
    D: Delivery,
    E: Display,
    S: Store,
    P: Publisher,
    F: AckFloor,
{
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            woken = writing.waiting.next() => {
                writing.woken(woken, shutdown).await;
                continue;
            }
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
        let deadline = tokio::time::Instant::now() + batching.wait;
        while batch.len() < batching.size {
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
        // messages that arrive meanwhile (filled up, it goes out like any full batch). Change
        // runs whose floor came meanwhile go first.
        while batch.len() < batching.size && writing.lanes.busy() {
            tokio::select! {
                () = writing.lanes.finish_one() => {}
                woken = writing.waiting.next() => writing.woken(woken, shutdown).await,
                next = messages.next() => match next {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer read failed mid-batch");
                    }
                    None => break,
                },
            }
        }
        writing.batch(batch, shutdown).await;
    }
    writing.finish(shutdown).await;
}

#[cfg(test)]
mod tests {
    use chatify_shared::config::PersisterSettings;
    use futures::channel::mpsc;

    use super::*;
    use crate::fakes::{Event, FakeDelivery, FakeFloor, FakePublisher, FakeStore, Log};

    type Delivered = Result<FakeDelivery, String>;

    const BATCH: usize = 10;

    /// The longest a change run waits for the ack floor.
    const FLOOR_WAIT: Duration = Duration::from_secs(10);

    /// A consumer's parts on fakes: lanes whose inserts take 20 ms, batches of [`BATCH`]
    /// waiting 5 ms, and the messages, which come from the sender [`parts`] returns with them.
    struct Parts {
        rx: mpsc::UnboundedReceiver<Delivered>,
        lanes: Lanes<FakeStore>,
        waiting: Waiting<FakeFloor, ChangeRun<FakeDelivery>>,
        writer: BatchWriter<FakePublisher, FakeFloor>,
        batching: Batching,
    }

    impl Parts {
        async fn drain(mut self, shutdown: &CancellationToken) {
            let mut writing = Writing {
                lanes: &mut self.lanes,
                waiting: &mut self.waiting,
                writer: &self.writer,
            };
            drain(self.rx, &mut writing, self.batching, shutdown).await;
        }
    }

    fn parts(
        log: &Log,
        lanes: usize,
    ) -> Result<(mpsc::UnboundedSender<Delivered>, Parts), HarperError> {
        let (tx, rx) = mpsc::unbounded();
        let store = FakeStore::new(log).taking(Duration::from_millis(20));
        let retry = Retry::new(&PersisterSettings::default(), ACK_WAIT / 3);
        let writer = BatchWriter::new(
            retry,
            3,
            DeadLetters::new(FakePublisher::new(log), retry),
            FakeFloor::new(log, 0),
            FLOOR_WAIT,
        );
        let waiting = Waiting::new(FakeFloor::new(log, 0), FLOOR_WAIT, waiting_bound());
        let batching = Batching {
            size: BATCH,
            wait: Duration::from_millis(5),
        };
        let lanes = Lanes::new(&store, lanes)?;
        Ok((
            tx,
            Parts {
                rx,
                lanes,
                waiting,
                writer,
                batching,
            },
        ))
    }

    /// Whether every ack in `events` comes after an insert that stored its message.
    fn acked_after_written(events: &[Event]) -> bool {
        events.iter().enumerate().all(|(i, e)| match e {
            Event::Acked(s) => events[..i]
                .iter()
                .any(|e| matches!(e, Event::Inserted(stored) if stored.contains(s))),
            _ => true,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_written_in_full_batches_on_every_lane_and_acked_after_its_write()
    -> Result<(), HarperError> {
        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        for m in FakeDelivery::batch(&log, 0, 10 * BATCH as u64, None) {
            let _ = tx.unbounded_send(Ok(m));
        }
        drop(tx);
        parts.drain(&CancellationToken::new()).await;
        assert_eq!(log.stored().len(), 10 * BATCH);
        assert_eq!(log.acked().len(), 10 * BATCH);
        let events = log.events();
        assert!(acked_after_written(&events), "{events:?}");
        assert!(
            events
                .iter()
                .all(|e| !matches!(e, Event::Inserted(s) if s.len() != BATCH)),
            "{events:?}"
        );
        assert_eq!(log.most_at_once(), 2, "both lanes wrote");
        assert_eq!(log.most_at_once_on_a_connection(), 1);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn short_of_a_backlog_one_insert_at_a_time_is_written() -> Result<(), HarperError> {
        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        let (feeder, shutdown) = (log.clone(), CancellationToken::new());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // One message every 4 ms: a batch would close after 5 ms, four times within an
            // insert, and no batch fills up (5 messages come during an insert, a batch holds 10).
            for m in FakeDelivery::batch(&feeder, 0, 100, None) {
                let _ = tx.unbounded_send(Ok(m));
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            // The messages go on (`tx` is open) until shutdown.
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
            drop(tx);
        });
        parts.drain(&shutdown).await;
        assert_eq!(log.stored().len(), 100);
        assert!(log.inserts() > 1, "{} inserts", log.inserts());
        assert_eq!(log.most_at_once(), 1);
        assert!(acked_after_written(&log.events()));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_finishes_and_acks_the_batch_in_hand() -> Result<(), HarperError> {
        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        for m in FakeDelivery::batch(&log, 0, 5, None) {
            let _ = tx.unbounded_send(Ok(m));
        }
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let watcher = log.clone();
        tokio::spawn(async move {
            while watcher.attempts().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stop.cancel();
        });
        // `tx` stays open: only shutdown ends the loop.
        parts.drain(&shutdown).await;
        assert_eq!(log.acked(), vec![1, 2, 3, 4, 5]);
        assert!(acked_after_written(&log.events()));
        drop(tx);
        Ok(())
    }

    /// A read error of a fake pull stream: `Stalled` is what two missed heartbeats are.
    #[derive(Debug)]
    enum ReadError {
        Stalled,
        Other,
    }

    impl Display for ReadError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_pull_is_opened_afresh_and_other_errors_are_passed_on() {
        use std::sync::Mutex;
        let second: Vec<Result<u32, ReadError>> = vec![Ok(3), Ok(4)];
        let later = Mutex::new(vec![second]);
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let open = || {
            opened.fetch_add(1, Ordering::SeqCst);
            let next = later.lock().ok().and_then(|mut l| l.pop());
            async move { next.map(futures::stream::iter).ok_or("no stream left") }
        };
        let first = futures::stream::iter(vec![
            Ok(1),
            Err(ReadError::Other),
            Ok(2),
            Err(ReadError::Stalled),
            Ok(99),
        ]);
        let stalled = |e: &ReadError| matches!(e, ReadError::Stalled).then_some(Duration::ZERO);
        let got: Vec<Result<u32, String>> = repulling(Some(first), open, stalled).collect().await;
        assert_eq!(
            got,
            vec![
                Ok(1),
                Err("Other".to_owned()),
                Ok(2),
                Err("Stalled: pulling afresh (the consumer's leader may have changed)".to_owned()),
                Ok(3),
                Ok(4),
            ],
            "what the stalled stream still held (99) is dropped with it"
        );
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_interleaved_with_messages_on_every_lane_end_as_applied_in_stream_order()
    -> Result<(), HarperError> {
        use chatify_shared::changes::{Change, MessageState};
        use std::collections::BTreeMap;

        use crate::fakes::{change, messages};

        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        // 300 events: a message every fourth, and changes by ten members to the messages
        // before them (reactions taken and taken back, edits, a deletion), in an order no
        // lane can keep by luck.
        let mut expected: BTreeMap<u64, MessageState> = BTreeMap::new();
        let mut stored = Vec::new();
        let mut seed: u64 = 7;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        for sequence in 1..=300u64 {
            if sequence % 4 == 1 {
                let m = messages(sequence - 1, 1);
                expected.insert(sequence, MessageState::new(m[0].clone()));
                stored.push(sequence);
                let _ = tx.unbounded_send(Ok(FakeDelivery::new(
                    &log,
                    sequence,
                    &format!("m{sequence}"),
                )));
                continue;
            }
            let target = stored[next(stored.len() as u64) as usize];
            let by = format!("member {}", next(10));
            let what = match next(20) {
                0 => Change::Edit {
                    message: format!("edit {sequence}"),
                },
                1 if sequence > 250 => Change::Delete,
                n => Change::React {
                    emoji: ["👍", "🎉"][n as usize % 2].into(),
                    add: next(3) > 0,
                    distinct_max: 20,
                },
            };
            let c = change(target, &by, what);
            if let Some(state) = expected.get_mut(&target) {
                state.apply(sequence, &c);
            }
            let _ = tx.unbounded_send(Ok(FakeDelivery::change(&log, sequence, &c)));
        }
        drop(tx);
        parts.drain(&CancellationToken::new()).await;
        assert!(log.nakked().is_empty(), "{:?}", log.nakked());
        let mut acked = log.acked();
        acked.sort_unstable();
        assert_eq!(acked, (1..=300).collect::<Vec<_>>());
        // Batches holding changes take turns, but on both lanes.
        assert_eq!(log.inserts_per_connection().len(), 2, "both lanes wrote");
        for (sequence, state) in &expected {
            assert_eq!(
                log.row(*sequence).as_ref(),
                Some(state),
                "message {sequence}"
            );
        }
        Ok(())
    }

    /// Sends `events`, each group a batch of its own (10 ms apart), then ends the messages.
    fn send_apart(tx: mpsc::UnboundedSender<Delivered>, events: Vec<Vec<FakeDelivery>>) {
        tokio::spawn(async move {
            for group in events {
                for event in group {
                    let _ = tx.unbounded_send(Ok(event));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    /// What `log` says `after` from now: the sequences acked and the most inserts at once.
    fn look_after(log: &Log, after: Duration) -> tokio::task::JoinHandle<(Vec<u64>, usize)> {
        let log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            (log.acked(), log.most_at_once())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_run_whose_floor_is_not_there_does_not_stop_messages_on_any_lane()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::fakes::{change, thumbs};

        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        // 1..=3 are held by a persister that was killed: the floor stays at 0 throughout. Two
        // changes to message 1 come alone, then a backlog of 200 messages.
        send_apart(
            tx,
            vec![
                vec![FakeDelivery::change(&log, 4, &change(1, "a", thumbs(true)))],
                vec![FakeDelivery::change(&log, 5, &change(1, "b", thumbs(true)))],
                FakeDelivery::batch(&log, 5, 20 * BATCH as u64, None),
            ],
        );
        let early = look_after(&log, Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        parts.drain(&CancellationToken::new()).await;
        let (acked, at_once) = early.await?;
        let mut acked_early = acked;
        acked_early.sort_unstable();
        assert_eq!(
            acked_early,
            (6..=5 + 20 * BATCH as u64).collect::<Vec<_>>(),
            "every message written within a second, while the changes wait"
        );
        assert_eq!(at_once, 2, "on both lanes");
        assert_eq!(log.most_at_once_on_a_connection(), 1);
        // The changes' floor never came: handed back after the wait, never written.
        assert_eq!(log.nakked(), vec![4, 5]);
        let waited = started.elapsed();
        assert!(
            waited >= FLOOR_WAIT && waited < FLOOR_WAIT + Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(log.change_log().is_empty());
        assert!(!log.acked().contains(&4) && !log.acked().contains(&5));
        assert!(acked_after_written(&log.events()));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn change_runs_held_aside_are_applied_in_stream_order_once_their_floor_comes()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::fakes::{change, messages, thumbs};

        let log = Log::default();
        let (tx, parts) = parts(&log, 2)?;
        // Message 1 is held by another persister, which stores and acks it after a second.
        let other = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = FakeStore::new(&other).insert(&messages(0, 1)).await;
            other.settle(1);
        });
        let react = |sequence, by: &str, add| {
            FakeDelivery::change(&log, sequence, &change(1, by, thumbs(add)))
        };
        send_apart(
            tx,
            vec![
                vec![react(2, "a", true)],
                FakeDelivery::batch(&log, 2, 10, None),
                vec![react(13, "a", false), react(14, "b", true)],
                FakeDelivery::batch(&log, 14, 10, None),
                vec![react(25, "c", true)],
            ],
        );
        let early = look_after(&log, Duration::from_millis(900));
        parts.drain(&CancellationToken::new()).await;
        let (mut acked_early, _) = early.await?;
        acked_early.sort_unstable();
        let messages: Vec<u64> = (3..=12).chain(15..=24).collect();
        assert_eq!(
            acked_early, messages,
            "the messages did not wait for the changes"
        );
        assert!(log.nakked().is_empty(), "{:?}", log.nakked());
        let acked = log.acked();
        let changes: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|s| [2, 13, 14, 25].contains(s))
            .collect();
        assert_eq!(changes, vec![2, 13, 14, 25], "acked in stream order");
        // a's reaction taken back, b's and c's counted: applied in stream order, each once.
        let row = log.row(1).ok_or("no row 1")?;
        assert_eq!(row.message.reactions.get("👍").copied(), Some(2));
        assert_eq!(row.version, 25);
        assert_eq!(
            log.change_log()
                .iter()
                .map(|r| r.sequence)
                .collect::<Vec<_>>(),
            vec![2, 13, 14, 25]
        );
        Ok(())
    }
}
