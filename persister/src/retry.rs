//! Retrying HarperDB: a back-off that doubles up to a maximum, and the writer's policy on top
//! of it. An outage ([`HarperError::is_outage`]) is waited out, however long, until shutdown;
//! a refusal of the request itself is tried a set number of times.

use std::time::Duration;

use chatify_shared::config::PersisterSettings;
use chatify_shared::wire::ChatMessage;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::harperdb::HarperError;
use crate::lanes::Store;
use crate::metrics as m;

/// Exponential back-off between retries: each wait doubles, up to `max`.
#[derive(Debug)]
pub struct Backoff {
    /// The coming wait.
    delay: Duration,
    /// The longest wait.
    max: Duration,
}

impl Backoff {
    /// The coming wait, for logs.
    fn next_ms(&self) -> u64 {
        u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sleeps the current delay and doubles it; false if shutdown came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(self.max);
        true
    }
}

/// What writing some records came to.
#[derive(Debug)]
pub enum Outcome {
    Written,
    /// HarperDB refused them for good (after the allowed attempts).
    Rejected(HarperError),
    /// Shutdown came while retrying; nothing was acked.
    Stopped,
}

/// What running an operation under the retry policy came to ([`Retry::attempt`]).
#[derive(Debug)]
pub enum Attempted<T> {
    /// It passed, with this result.
    Done(T),
    /// HarperDB refused it for good (after the allowed attempts).
    Rejected(HarperError),
    /// Shutdown came while retrying.
    Stopped,
}

/// The writer's retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The first wait after a failure (`persister.retry_initial_ms`).
    initial: Duration,
    /// The longest wait (`persister.retry_max_ms`).
    max: Duration,
    /// How long a write may go on retrying before each further attempt first renews the
    /// messages' ack deadlines, so that JetStream does not redeliver them meanwhile.
    keep_alive_after: Duration,
}

impl Retry {
    pub fn new(settings: &PersisterSettings, keep_alive_after: Duration) -> Self {
        Self {
            initial: Duration::from_millis(settings.retry_initial_ms),
            max: Duration::from_millis(settings.retry_max_ms),
            keep_alive_after,
        }
    }

    /// A fresh back-off from the initial to the maximum delay.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            delay: self.initial,
            max: self.max,
        }
    }

    /// Writes `records` (delivered as `messages`), retrying an outage until the write passes or
    /// shutdown comes, and a refusal until it was tried `attempts` times.
    pub async fn write<S: Store, D: Delivery>(
        &self,
        store: &S,
        records: &[ChatMessage],
        messages: &[D],
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Outcome {
        match self
            .attempt(messages, attempts, shutdown, || store.insert(records))
            .await
        {
            Attempted::Done(()) => Outcome::Written,
            Attempted::Rejected(e) => Outcome::Rejected(e),
            Attempted::Stopped => Outcome::Stopped,
        }
    }

    /// Runs `op`, the writing of what `messages` delivered, as [`Retry::write`] writes: an
    /// outage is retried until `op` passes or shutdown comes (renewing the messages' ack
    /// deadlines past `keep_alive_after`), a refusal until it was tried `attempts` times.
    pub async fn attempt<D, T, F, Fut>(
        &self,
        messages: &[D],
        attempts: u32,
        shutdown: &CancellationToken,
        mut op: F,
    ) -> Attempted<T>
    where
        D: Delivery,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, HarperError>>,
    {
        let started = Instant::now();
        let mut refusals = 0;
        let mut backoff = self.backoff();
        loop {
            if started.elapsed() > self.keep_alive_after {
                for m in messages {
                    m.in_progress().await;
                }
            }
            match op().await {
                Ok(done) => return Attempted::Done(done),
                Err(e) if e.is_outage() => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.next_ms(), "writing to HarperDB failed; retrying");
                }
                Err(e) => {
                    refusals += 1;
                    if refusals >= attempts {
                        return Attempted::Rejected(e);
                    }
                    tracing::warn!(error = %e, attempt = refusals, "HarperDB rejected a write; retrying");
                }
            }
            metrics::counter!(m::WRITE_RETRIES).increment(1);
            if !backoff.wait(shutdown).await {
                return Attempted::Stopped;
            }
        }
    }

    /// Runs `op` until it succeeds (true) or shutdown (false), backing off between attempts.
    /// A refusal is retried as well, but logged as an error each time.
    pub async fn until_ok<F, Fut>(
        &self,
        shutdown: &CancellationToken,
        what: &str,
        mut op: F,
    ) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HarperError>>,
    {
        let mut backoff = self.backoff();
        loop {
            match op().await {
                Ok(()) => return true,
                Err(e) if e.is_outage() => {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{
        Event, FakeDelivery, FakeStore, Log, messages, outage, refusal, shutdown_after,
    };

    /// Waits of 100 ms doubling up to 1 s; ack deadlines renewed after 2 s of retrying.
    fn retry() -> Retry {
        Retry {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            keep_alive_after: Duration::from_secs(2),
        }
    }

    /// Writes `n` messages on a store that first answers `failures`, trying a refusal up to
    /// `attempts` times.
    async fn write(
        log: &Log,
        n: u64,
        failures: impl IntoIterator<Item = HarperError>,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let store = FakeStore::new(log).failing(failures);
        let delivered = FakeDelivery::batch(log, 0, n, None);
        retry()
            .write(&store, &messages(0, n), &delivered, attempts, shutdown)
            .await
    }

    fn gaps_ms(attempts: &[Instant]) -> Vec<u128> {
        attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_retried_with_doubling_waits_up_to_the_max() {
        let log = Log::default();
        let failures = (0..6).map(|_| outage());
        let outcome = write(&log, 2, failures, 1, &CancellationToken::new()).await;
        assert!(matches!(outcome, Outcome::Written), "{outcome:?}");
        assert_eq!(
            gaps_ms(&log.attempts()),
            vec![100, 200, 400, 800, 1000, 1000]
        );
        assert_eq!(log.stored().len(), 2);
        // Past 2 s of retrying, each attempt first renewed the messages' ack deadlines.
        let renewed = log
            .events()
            .iter()
            .filter(|e| matches!(e, Event::InProgress(_)))
            .count();
        assert_eq!(renewed, 2 * 2, "{:?}", log.events());
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_retried_until_shutdown() {
        let log = Log::default();
        let shutdown = shutdown_after(Duration::from_secs(30));
        let started = Instant::now();
        let outcome = write(&log, 1, (0..1000).map(|_| outage()), 3, &shutdown).await;
        assert!(matches!(outcome, Outcome::Stopped), "{outcome:?}");
        assert_eq!(started.elapsed().as_secs(), 30, "stopped at once");
        assert!(log.attempts().len() > 3, "more than the refusals' attempts");
        assert!(log.stored().is_empty() && log.acked().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_tried_the_allowed_number_of_times() {
        let log = Log::default();
        let failures = (0..5).map(|_| refusal());
        let outcome = write(&log, 1, failures, 3, &CancellationToken::new()).await;
        assert!(
            matches!(outcome, Outcome::Rejected(HarperError::Rejected { .. })),
            "{outcome:?}"
        );
        assert_eq!(gaps_ms(&log.attempts()), vec![100, 200]);
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_retries_anything_until_it_passes_or_shutdown() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let op = || async {
            match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Err(outage()),
                1 => Err(refusal()),
                _ => Ok(()),
            }
        };
        assert!(
            retry()
                .until_ok(&CancellationToken::new(), "test", op)
                .await
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);

        let stopped = CancellationToken::new();
        stopped.cancel();
        let failing = || async { Err(outage()) };
        assert!(!retry().until_ok(&stopped, "test", failing).await);
    }
}
