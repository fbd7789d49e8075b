//! Change runs waiting for the ack floor, held beside the lanes rather than in them.
//!
//! A run holding changes is written only once the durable consumer's ack floor has reached its
//! start ([`crate::batch`]). Waiting for that in a lane would hold the lane's HarperDB
//! connection idle: when a persister is killed, the events it held stay unacked until the
//! consumer's ack wait ends, so every change run waits its longest, and messages behind them
//! found no lane. So the consumer holds change runs here, and starts each on a lane only once
//! its floor is there; messages keep flowing on every lane meanwhile.
//!
//! One read of the floor serves every run held: it is read again and again while some run
//! waits (2 ms apart at first, doubling up to 50 ms while it stands still). A run whose floor
//! does not come within `persister.change_floor_wait_ms` is given back expired (the caller
//! hands it back to JetStream, as a lane waiting did before), since an earlier event may be
//! waiting for a redelivery behind it. Held runs hold unacked events, which count against the
//! consumer's ack-pending limit (and memory), so what is held is bounded ([`Bound`]): past it,
//! the run of the highest sequence (the last the floor reaches) is refused, to be handed back
//! at once. Keeping the lowest ones means the run the floor reaches next is never refused.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::floor::{AckFloor, FloorError};
use crate::metrics as m;

/// The first pause between two reads of the ack floor, and the longest (each doubles while
/// the floor stands still and some run waits).
const FLOOR_POLL_FIRST: Duration = Duration::from_millis(2);
const FLOOR_POLL_MAX: Duration = Duration::from_millis(50);

/// What became of a held run.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken<T> {
    /// The ack floor reached its start: write it now.
    Ready(T),
    /// Its floor did not come in time: hand it back.
    Expired(T),
}

/// How much may be held at once; one run is always held, however large.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The most runs: each is one write once its floor comes, one after the other.
    pub runs: usize,
    /// The most events in them, all unacked.
    pub events: usize,
}

/// A run and how long it may wait.
struct Held<T> {
    /// The run, as the caller gave it.
    run: T,
    /// How many events it holds, for the bound.
    events: usize,
    /// When it came, for the wait's histogram.
    since: Instant,
    /// When it expires.
    deadline: Instant,
}

/// The runs held until the ack floor reaches them.
pub struct Waiting<F, T> {
    /// Where the floor is read.
    floor: F,
    /// The longest a run is held (`persister.change_floor_wait_ms`).
    wait: Duration,
    /// The most held at once.
    bound: Bound,
    /// The events in the held runs.
    events: usize,
    /// The held runs by the floor each needs, then the order they came in (a run delivered
    /// twice is held twice; applying it twice changes nothing).
    runs: BTreeMap<(u64, u64), Held<T>>,
    /// Runs held so far, which orders runs needing the same floor.
    arrivals: u64,
    /// The floor as last read.
    known: u64,
    /// The read of the floor under way, if any: a task, so that a caller that stops waiting
    /// (its `select!` took another branch) does not cancel it.
    reading: Option<JoinHandle<Result<u64, FloorError>>>,
    /// When the floor may be read again.
    next_read: Instant,
    /// The pause before the read after that, doubling while the floor stands still.
    pause: Duration,
}

impl<F: AckFloor, T> Waiting<F, T> {
    /// Holds runs for `wait` at most, within `bound`, reading `floor`.
    pub fn new(floor: F, wait: Duration, bound: Bound) -> Self {
        Self {
            floor,
            wait,
            bound,
            events: 0,
            runs: BTreeMap::new(),
            arrivals: 0,
            known: 0,
            reading: None,
            next_read: Instant::now(),
            pause: FLOOR_POLL_FIRST,
        }
    }

    /// How many runs are held.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether no run is held.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Holds `run` of `events` events, which may be written once the floor is at `needs`.
    /// Past the bound, the runs of the highest floors (this one or held ones) are refused and
    /// returned: hand them back.
    pub fn hold(&mut self, needs: u64, events: usize, run: T) -> Vec<T> {
        let now = Instant::now();
        self.arrivals += 1;
        self.events += events;
        self.runs.insert(
            (needs, self.arrivals),
            Held {
                run,
                events,
                since: now,
                deadline: now + self.wait,
            },
        );
        // A new run is worth a prompt read, whatever the pause had grown to.
        self.pause = FLOOR_POLL_FIRST;
        self.next_read = self.next_read.min(now);
        let mut refused = Vec::new();
        while self.runs.len() > 1
            && (self.runs.len() > self.bound.runs || self.events > self.bound.events)
        {
            let Some((_, held)) = self.runs.pop_last() else {
                break;
            };
            self.events = self.events.saturating_sub(held.events);
            refused.push(held.run);
        }
        if !refused.is_empty() {
            tracing::debug!(
                held = self.runs.len(),
                refused = refused.len(),
                "too much waiting for the ack floor; the last change runs handed back"
            );
            metrics::counter!(m::CHANGE_RUNS_REFUSED).increment(refused.len() as u64);
        }
        refused
    }

    /// Takes every held run out, lowest floor first (shutdown: they are handed back).
    pub fn release(&mut self) -> Vec<T> {
        self.events = 0;
        std::mem::take(&mut self.runs)
            .into_values()
            .map(|held| held.run)
            .collect()
    }

    /// Waits until some held runs are ready (the floor reached them) or expired, and returns
    /// them, lowest floor first; never returns while none is held. Cancel-safe: a floor read
    /// under way goes on, and nothing is taken out before it is returned.
    pub async fn next(&mut self) -> Vec<Woken<T>> {
        loop {
            let woken = self.take_woken();
            if !woken.is_empty() {
                return woken;
            }
            let Some(deadline) = self.runs.values().map(|h| h.deadline).min() else {
                return std::future::pending().await;
            };
            if self.reading.is_none() && Instant::now() >= self.next_read {
                let floor = self.floor.clone();
                self.reading = Some(tokio::spawn(async move { floor.floor().await }));
            }
            match self.reading.as_mut() {
                Some(reading) => tokio::select! {
                    read = reading => {
                        self.reading = None;
                        self.read(read.unwrap_or_else(|e| Err(FloorError(e.to_string()))));
                    }
                    () = tokio::time::sleep_until(deadline) => {}
                },
                None => {
                    tokio::time::sleep_until(self.next_read.min(deadline)).await;
                }
            }
        }
    }

    /// Takes every run out that the floor as last read has reached, and every expired one.
    fn take_woken(&mut self) -> Vec<Woken<T>> {
        let now = Instant::now();
        let known = self.known;
        let keys: Vec<(u64, u64)> = self
            .runs
            .iter()
            .filter(|(key, held)| key.0 <= known || held.deadline <= now)
            .map(|(key, _)| *key)
            .collect();
        let mut woken = Vec::with_capacity(keys.len());
        for (needs, arrival) in keys {
            let Some(held) = self.runs.remove(&(needs, arrival)) else {
                continue;
            };
            self.events = self.events.saturating_sub(held.events);
            metrics::histogram!(m::CHANGE_FLOOR_WAIT)
                .record(now.duration_since(held.since).as_secs_f64());
            woken.push(if needs <= known {
                Woken::Ready(held.run)
            } else {
                Woken::Expired(held.run)
            });
        }
        woken
    }

    /// Takes in a read of the floor and sets when the next one may be made.
    fn read(&mut self, read: Result<u64, FloorError>) {
        match read {
            Ok(floor) if floor != self.known => {
                self.known = floor;
                self.pause = FLOOR_POLL_FIRST;
            }
            Ok(_) => self.pause = (self.pause * 2).min(FLOOR_POLL_MAX),
            Err(e) => {
                tracing::debug!(error = %e, "the ack floor could not be read");
                self.pause = (self.pause * 2).min(FLOOR_POLL_MAX);
            }
        }
        self.next_read = Instant::now() + self.pause;
    }
}

impl<F, T> Drop for Waiting<F, T> {
    fn drop(&mut self) {
        if let Some(reading) = self.reading.take() {
            reading.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeFloor, Log};

    const WAIT: Duration = Duration::from_secs(10);

    /// Holds at most `runs` runs of 100 events in all.
    fn waiting(log: &Log, runs: usize) -> Waiting<FakeFloor, &'static str> {
        let bound = Bound { runs, events: 100 };
        Waiting::new(FakeFloor::new(log, 0), WAIT, bound)
    }

    const NONE: Vec<&str> = Vec::new();

    #[tokio::test(start_paused = true)]
    async fn a_run_is_ready_once_the_floor_reaches_it_and_the_lowest_come_first() {
        let log = Log::default();
        let mut waiting = waiting(&log, 4);
        assert_eq!(waiting.hold(5, 1, "six on"), NONE);
        assert_eq!(waiting.hold(0, 1, "from one"), NONE);
        assert_eq!(waiting.next().await, vec![Woken::Ready("from one")]);
        let started = Instant::now();
        let other = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for sequence in 1..=5 {
                other.settle(sequence);
            }
        });
        assert_eq!(waiting.next().await, vec![Woken::Ready("six on")]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1050),
            "read again within 50 ms: {waited:?}"
        );
        assert!(waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_whose_floor_does_not_come_expires_after_the_wait() {
        let log = Log::default();
        let mut waiting = waiting(&log, 4);
        let started = Instant::now();
        waiting.hold(3, 1, "four on");
        assert_eq!(waiting.next().await, vec![Woken::Expired("four on")]);
        assert_eq!(started.elapsed(), WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_the_run_the_floor_reaches_last_is_refused() {
        let log = Log::default();
        let mut waiting = waiting(&log, 2);
        assert_eq!(waiting.hold(10, 1, "eleven on"), NONE);
        assert_eq!(waiting.hold(20, 1, "twenty-one on"), NONE);
        assert_eq!(waiting.hold(30, 1, "thirty-one on"), vec!["thirty-one on"]);
        assert_eq!(
            waiting.hold(5, 1, "six on"),
            vec!["twenty-one on"],
            "an earlier run is held, the last one is refused"
        );
        assert_eq!(waiting.len(), 2);
        for sequence in 1..=10 {
            log.settle(sequence);
        }
        assert_eq!(
            waiting.next().await,
            vec![Woken::Ready("six on"), Woken::Ready("eleven on")]
        );
    }

    #[test]
    fn past_the_events_bound_the_last_runs_are_refused_but_one_is_always_held() {
        let log = Log::default();
        let mut waiting = waiting(&log, 10);
        assert_eq!(waiting.hold(50, 60, "fifty-one on"), NONE);
        assert_eq!(waiting.hold(70, 30, "seventy-one on"), NONE);
        assert_eq!(
            waiting.hold(10, 30, "eleven on"),
            vec!["seventy-one on"],
            "120 events held: the last run goes"
        );
        assert_eq!(
            waiting.hold(0, 500, "one on"),
            vec!["fifty-one on", "eleven on"],
            "a run larger than the bound is held alone"
        );
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting.release(), vec!["one on"]);
        assert!(waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_given_up_keeps_its_read_and_its_runs() {
        let log = Log::default();
        let mut waiting = waiting(&log, 4);
        waiting.hold(2, 1, "three on");
        let gave_up = tokio::time::timeout(Duration::from_millis(30), waiting.next()).await;
        assert!(gave_up.is_err());
        assert_eq!(waiting.len(), 1);
        log.settle(1);
        log.settle(2);
        assert_eq!(waiting.next().await, vec![Woken::Ready("three on")]);
    }
}
