//! The writer's lanes: HarperDB connections, one insert at a time on each.
//!
//! A HarperDB worker thread serving two inserts at once spends about twice the CPU per record,
//! while two threads serving one each are nearly twice as fast as one (bench/PROFILE.md section
//! 4). So the writer never sends a second insert on a connection that has one in flight, and
//! keeps `persister.write_connections` connections (best at HarperDB's thread count). Which
//! thread serves a connection is the kernel's choice (each thread accepts from a `SO_REUSEPORT`
//! socket, by a hash of the addresses), for the connection's life, and no answer says which it
//! was; so each lane takes a fresh connection every [`RECONNECT_EVERY`] batches, and a draw that
//! put two lanes on one thread does not last.

use std::collections::HashMap;
use std::future::Future;

use chatify_shared::changes::MessageState;
use chatify_shared::storage::StoredChangeRecord;
use chatify_shared::wire::ChatMessage;
use tokio::task::{Id, JoinError, JoinSet};

use crate::harperdb::{HarperDb, HarperError};
use crate::metrics as m;

/// Batches a lane writes on one connection before it takes a fresh one. During a backlog a
/// lane writes 15–20 batches a second, so a bad draw (two lanes on one HarperDB thread, which
/// with two of each is half of all draws) lasts three or four seconds; a loopback connection
/// set up once in 64 inserts costs nothing measurable.
pub const RECONNECT_EVERY: u32 = 64;

/// Where a lane writes: HarperDB, or a fake in tests.
pub trait Store: Clone + Send + Sync + 'static {
    /// Inserts the records in one request; a record whose key exists is skipped (idempotent).
    fn insert(
        &self,
        records: &[ChatMessage],
    ) -> impl Future<Output = Result<(), HarperError>> + Send;

    /// The messages stored under `keys`, in their current state; keys with none are left out.
    fn states(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<MessageState>, HarperError>> + Send;

    /// Writes the messages' states over their rows, in one request.
    fn update(
        &self,
        states: &[MessageState],
    ) -> impl Future<Output = Result<(), HarperError>> + Send;

    /// Inserts change log records in one request; one whose key exists is skipped.
    fn log_changes(
        &self,
        records: &[StoredChangeRecord],
    ) -> impl Future<Output = Result<(), HarperError>> + Send;

    /// The same store on a connection of its own, a new one each call: used one request at a
    /// time, every request of the returned client goes over that one connection.
    fn dedicated(&self) -> Result<Self, HarperError>;
}

impl Store for HarperDb {
    fn insert(
        &self,
        records: &[ChatMessage],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        HarperDb::insert(self, records)
    }

    fn states(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<MessageState>, HarperError>> + Send {
        HarperDb::states(self, keys)
    }

    fn update(
        &self,
        states: &[MessageState],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        HarperDb::update(self, states)
    }

    fn log_changes(
        &self,
        records: &[StoredChangeRecord],
    ) -> impl Future<Output = Result<(), HarperError>> + Send {
        HarperDb::log_changes(self, records)
    }

    fn dedicated(&self) -> Result<Self, HarperError> {
        HarperDb::dedicated(self)
    }
}

/// One connection and how much it has carried.
struct Lane<S> {
    /// The client on the lane's current connection.
    store: S,
    /// Batches handed to the lane since it took that connection.
    batches: u32,
}

/// The lanes, which are free, and the writes running on the others.
pub struct Lanes<S> {
    /// One per `persister.write_connections`.
    lanes: Vec<Lane<S>>,
    /// Lanes with no write running: a write is started only on one of these.
    free: Vec<usize>,
    /// The running writes, one per busy lane.
    running: JoinSet<()>,
    /// Which lane each running write holds, so that its lane is freed even if it panicked.
    holding: HashMap<Id, usize>,
}

impl<S: Store> Lanes<S> {
    /// `count` lanes, each on a connection of its own to `store`.
    pub fn new(store: &S, count: usize) -> Result<Self, HarperError> {
        let lanes = (0..count.max(1))
            .map(|_| {
                Ok(Lane {
                    store: store.dedicated()?,
                    batches: 0,
                })
            })
            .collect::<Result<Vec<_>, HarperError>>()?;
        Ok(Self {
            free: (0..lanes.len()).rev().collect(),
            lanes,
            running: JoinSet::new(),
            holding: HashMap::new(),
        })
    }

    /// Whether any write is running.
    pub fn busy(&self) -> bool {
        !self.running.is_empty()
    }

    /// Waits until a running write ends and frees its lane; at once if none runs. Cancel-safe.
    pub async fn finish_one(&mut self) {
        if let Some(done) = self.running.join_next_with_id().await {
            self.free(done);
        }
    }

    /// Waits until every running write has ended.
    pub async fn finish_all(&mut self) {
        while self.busy() {
            self.finish_one().await;
        }
    }

    /// Starts `write` with a free lane's client, first waiting for a lane to free up if all
    /// are busy. After [`RECONNECT_EVERY`] batches on one connection, a lane takes a fresh one.
    pub async fn start<F, Fut>(&mut self, write: F)
    where
        F: FnOnce(S) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        while self.free.is_empty() {
            self.finish_one().await;
        }
        let Some(index) = self.free.pop() else {
            return;
        };
        let Some(lane) = self.lanes.get_mut(index) else {
            return;
        };
        if lane.batches >= RECONNECT_EVERY {
            match lane.store.dedicated() {
                Ok(store) => {
                    lane.store = store;
                    lane.batches = 0;
                    metrics::counter!(m::HARPERDB_RECONNECTS).increment(1);
                }
                Err(e) => tracing::warn!(error = %e, "could not build a new HarperDB client"),
            }
        }
        lane.batches += 1;
        let task = self.running.spawn(write(lane.store.clone()));
        self.holding.insert(task.id(), index);
    }

    fn free(&mut self, done: Result<(Id, ()), JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                // Its messages stay unacked: JetStream redelivers them.
                tracing::error!(error = %e, "a batch write task failed; its messages will be redelivered");
                e.id()
            }
        };
        if let Some(lane) = self.holding.remove(&id) {
            self.free.push(lane);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fakes::{FakeStore, Log};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// `count` lanes on a fake HarperDB whose inserts take `insert`.
    fn lanes(log: &Log, count: usize, insert: Duration) -> Result<Lanes<FakeStore>, HarperError> {
        Lanes::new(&FakeStore::new(log).taking(insert), count)
    }

    /// Starts `batches` writes of one message each, then waits for them all.
    async fn write(lanes: &mut Lanes<FakeStore>, batches: u64) {
        for i in 0..batches {
            lanes
                .start(move |store| async move {
                    let _ = store.insert(&crate::fakes::messages(i, 1)).await;
                })
                .await;
        }
        lanes.finish_all().await;
    }

    #[tokio::test]
    async fn lanes_never_run_two_inserts_on_one_connection() -> TestResult {
        let log = Log::default();
        let mut lanes = lanes(&log, 3, Duration::from_millis(3))?;
        write(&mut lanes, 40).await;
        assert_eq!(log.inserts(), 40);
        assert_eq!(log.most_at_once_on_a_connection(), 1);
        assert_eq!(log.most_at_once(), 3, "every lane was used");
        Ok(())
    }

    #[tokio::test]
    async fn a_lane_takes_a_fresh_connection_every_reconnect_every_batches() -> TestResult {
        let log = Log::default();
        let mut lanes = lanes(&log, 1, Duration::ZERO)?;
        write(&mut lanes, u64::from(2 * RECONNECT_EVERY + 1)).await;
        let per_connection = log.inserts_per_connection();
        assert_eq!(
            per_connection.values().copied().collect::<Vec<_>>(),
            vec![RECONNECT_EVERY as usize, RECONNECT_EVERY as usize, 1],
            "{per_connection:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_write_frees_its_lane() -> TestResult {
        let log = Log::default();
        let mut lanes = lanes(&log, 1, Duration::ZERO)?;
        lanes.start(|_| async { panic!("a write failed") }).await;
        lanes.finish_one().await;
        assert!(!lanes.busy());
        write(&mut lanes, 1).await;
        assert_eq!(log.inserts(), 1, "the lane was free again");
        Ok(())
    }
}
