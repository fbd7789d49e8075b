//! Keeping the writer's HarperDB connections on different HarperDB worker threads.
//!
//! HarperDB's worker threads each accept connections from their own `SO_REUSEPORT` socket, so
//! the kernel's hash of a connection's addresses picks the thread that serves it for the
//! connection's whole life, and no answer says which thread that was. One thread serving two
//! inserts at once takes about four times as long over each of them; two threads serving one
//! each take about 1.3 times as long as one alone (bench/PROFILE.md section 4). So the writer
//! sends one insert at a time on each of its connections ("lanes"), and this policy compares a
//! lane's time per record while every other lane was busy too with its time per record alone.
//! Lanes that slow down by more than [`SHARED_RATIO`] share a thread; the slowest of them
//! reconnects, which lets the kernel draw its thread anew, until the lanes are apart.
//!
//! Only full batches are timed: they are what a backlog is drained with, and only a backlog
//! needs HarperDB's every thread. The policy holds no I/O; the writer (and the load
//! generator's direct ceiling) run the inserts and report them here.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Mean slow-down, over all lanes, from a lane alone to all lanes at once, above which lanes
/// share a HarperDB thread. Measured 2026-12-02 (two lanes, 500-record batches, per-thread
/// CPU telling which thread served which lane): 2.9–4.9 on one thread, 1.1–1.7 on two; on a
/// machine losing a quarter of its CPU time to the hypervisor, up to 2.3 on two.
pub const SHARED_RATIO: f64 = 2.5;

/// Judgements in a row above [`SHARED_RATIO`] before a lane reconnects, so that one noisy
/// judgement does not move lanes that were apart.
pub const SHARED_JUDGEMENTS: u32 = 2;

/// How many timings with every lane busy each lane needs before the lanes are judged.
pub const TOGETHER_SAMPLES: usize = 3;

/// How old a lane's time alone may be before it is taken again: inserts slow as a table grows,
/// and the comparison is only fair between timings close in time.
pub const ALONE_REFRESH: Duration = Duration::from_secs(30);

/// How long a lane's connection may stay idle before its client closes it (HarperDB itself
/// closes keep-alive connections after 30 s). A lane idle longer has a new connection, so its
/// timings start over.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(20);

/// How an insert overlapped the other lanes' inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// No other lane was busy when it started nor when it ended.
    Alone,
    /// Every other lane was busy when it started and when it ended.
    Together,
    /// Anything in between: not a fair timing either way.
    Partly,
}

impl Overlap {
    /// From the number of lanes busy before this insert started (not counting it) and at its
    /// end (counting it), out of `lanes`.
    pub fn of(busy_before: usize, busy_at_end: usize, lanes: usize) -> Self {
        if busy_before == 0 && busy_at_end == 1 {
            Self::Alone
        } else if busy_before + 1 == lanes && busy_at_end == lanes {
            Self::Together
        } else {
            Self::Partly
        }
    }
}

/// Inserts in flight over all lanes, shared by their tasks: what tells an insert alone from one
/// alongside the others.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    /// Runs `insert` of `records` on `lane` (of `lanes`), timing it and noting its overlap.
    pub async fn time<T>(
        &self,
        lane: usize,
        lanes: usize,
        records: usize,
        insert: impl Future<Output = T>,
    ) -> (T, Timing) {
        let busy_before = self.0.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let output = insert.await;
        let elapsed = started.elapsed();
        let busy_at_end = self.0.fetch_sub(1, Ordering::SeqCst);
        let timing = Timing {
            lane,
            records,
            started,
            elapsed,
            overlap: Overlap::of(busy_before, busy_at_end, lanes),
        };
        (output, timing)
    }
}

/// One successful insert of a full batch.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lane: usize,
    pub records: usize,
    pub started: Instant,
    pub elapsed: Duration,
    pub overlap: Overlap,
}

/// What the lanes' timings came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Not enough timings to judge yet.
    Pending,
    /// The lanes are on different threads: all together, each was `ratio` times as slow per
    /// record as alone (the mean over the lanes).
    Apart { ratio: f64 },
    /// Lanes seem to share a thread; once [`SHARED_JUDGEMENTS`] in a row said so, `reconnect`
    /// names the lane to reconnect (its timings are forgotten already).
    Shared {
        ratio: f64,
        reconnect: Option<usize>,
    },
}

/// The timings of one lane's current connection.
#[derive(Debug, Default)]
struct Lane {
    /// Seconds per record of its latest insert alone, and when it started.
    alone: Option<(Instant, f64)>,
    /// Seconds per record of its latest inserts with every lane busy, newest last.
    together: Vec<f64>,
    /// When its latest timed insert ended, to notice an idle (so renewed) connection.
    last_end: Option<Instant>,
}

/// The placement policy for `lanes` connections.
#[derive(Debug)]
pub struct Spread {
    lanes: Vec<Lane>,
    /// Judgements in a row that found lanes sharing.
    shared_streak: u32,
}

impl Spread {
    pub fn new(lanes: usize) -> Self {
        Self {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            shared_streak: 0,
        }
    }

    /// The lane whose next full batch is to run with every other lane idle, so that its time
    /// alone is known and current; `None` when none needs it (or there is only one lane).
    pub fn wants_alone(&self, now: Instant) -> Option<usize> {
        if self.lanes.len() < 2 {
            return None;
        }
        self.lanes.iter().position(|l| {
            l.alone
                .is_none_or(|(at, _)| now.saturating_duration_since(at) > ALONE_REFRESH)
        })
    }

    /// Forgets a lane's timings: it failed (its connection may be new) or it reconnected.
    pub fn forget(&mut self, lane: usize) {
        if let Some(l) = self.lanes.get_mut(lane) {
            *l = Lane::default();
        }
    }

    /// Takes the timing of a successful full-batch insert and judges the lanes once each has
    /// enough timings.
    pub fn record(&mut self, t: Timing) -> Verdict {
        if self.lanes.len() < 2 || t.records == 0 {
            return Verdict::Pending;
        }
        let Some(lane) = self.lanes.get_mut(t.lane) else {
            return Verdict::Pending;
        };
        if lane
            .last_end
            .is_some_and(|end| t.started.saturating_duration_since(end) > CONNECTION_IDLE)
        {
            *lane = Lane::default();
        }
        lane.last_end = Some(t.started + t.elapsed);
        let per_record = t.elapsed.as_secs_f64() / t.records as f64;
        match t.overlap {
            Overlap::Alone => lane.alone = Some((t.started, per_record)),
            Overlap::Together => {
                lane.together.push(per_record);
                if lane.together.len() > TOGETHER_SAMPLES {
                    lane.together.remove(0);
                }
            }
            Overlap::Partly => return Verdict::Pending,
        }
        self.judge()
    }

    /// Once every lane has a time alone and enough timings together: their slow-downs.
    fn judge(&mut self) -> Verdict {
        let mut ratios = Vec::with_capacity(self.lanes.len());
        for l in &self.lanes {
            match l.alone {
                Some((_, alone)) if l.together.len() >= TOGETHER_SAMPLES && alone > 0.0 => {
                    ratios.push(median(&l.together) / alone);
                }
                _ => return Verdict::Pending,
            }
        }
        // Each judgement on fresh timings together.
        for l in &mut self.lanes {
            l.together.clear();
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        if mean <= SHARED_RATIO {
            self.shared_streak = 0;
            return Verdict::Apart { ratio: mean };
        }
        self.shared_streak += 1;
        if self.shared_streak < SHARED_JUDGEMENTS {
            return Verdict::Shared {
                ratio: mean,
                reconnect: None,
            };
        }
        self.shared_streak = 0;
        let (lane, _) =
            ratios.iter().enumerate().fold(
                (0, f64::MIN),
                |best, (i, &r)| if r > best.1 { (i, r) } else { best },
            );
        self.forget(lane);
        Verdict::Shared {
            ratio: mean,
            reconnect: Some(lane),
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: usize = 500;

    /// A timing of `ms` for a full batch on `lane`, started `at_ms` after `t0`.
    fn timing(t0: Instant, lane: usize, at_ms: u64, ms: u64, overlap: Overlap) -> Timing {
        Timing {
            lane,
            records: BATCH,
            started: t0 + Duration::from_millis(at_ms),
            elapsed: Duration::from_millis(ms),
            overlap,
        }
    }

    /// Lane 0, then lane 1, alone (50 ms each), as the policy asks for them.
    fn both_alone(spread: &mut Spread, t0: Instant) {
        assert_eq!(spread.wants_alone(t0), Some(0));
        assert_eq!(
            spread.record(timing(t0, 0, 0, 50, Overlap::Alone)),
            Verdict::Pending
        );
        assert_eq!(spread.wants_alone(t0), Some(1));
        assert_eq!(
            spread.record(timing(t0, 1, 50, 50, Overlap::Alone)),
            Verdict::Pending
        );
        assert_eq!(spread.wants_alone(t0), None);
    }

    /// [`both_alone`], then a round of timings together.
    fn run(spread: &mut Spread, t0: Instant, together_ms: [u64; 2]) -> Verdict {
        both_alone(spread, t0);
        together(spread, t0, 100, together_ms)
    }

    /// `together_ms` for each lane with both busy, from `from_ms` on, as many times as a
    /// judgement needs; the verdict of the last timing (every earlier one is pending).
    fn together(spread: &mut Spread, t0: Instant, from_ms: u64, together_ms: [u64; 2]) -> Verdict {
        let mut verdicts = Vec::new();
        for i in 0..TOGETHER_SAMPLES as u64 {
            for (lane, ms) in together_ms.iter().enumerate() {
                let at = from_ms + i * together_ms[0].max(together_ms[1]);
                verdicts.push(spread.record(timing(t0, lane, at, *ms, Overlap::Together)));
            }
        }
        let last = verdicts.pop().unwrap_or(Verdict::Pending);
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Pending),
            "{verdicts:?}"
        );
        last
    }

    #[test]
    fn lanes_on_different_threads_are_kept() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        let Verdict::Apart { ratio } = run(&mut spread, t0, [65, 80]) else {
            panic!("lanes 1.45 times slower together were not judged apart");
        };
        assert!((ratio - 1.45).abs() < 0.01, "{ratio}");
        // The times alone are kept: no new one is asked for until they are stale.
        assert_eq!(spread.wants_alone(t0 + Duration::from_secs(1)), None);
        assert_eq!(spread.wants_alone(t0 + ALONE_REFRESH * 2), Some(0));
    }

    #[test]
    fn lanes_sharing_a_thread_reconnect_the_slower_one() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        let first = run(&mut spread, t0, [190, 210]);
        let Verdict::Shared {
            ratio,
            reconnect: None,
        } = first
        else {
            panic!("one judgement was enough to reconnect, or the lanes were kept: {first:?}");
        };
        assert!((ratio - 4.0).abs() < 0.01, "{ratio}");
        let second = together(&mut spread, t0, 1000, [190, 210]);
        assert_eq!(
            second,
            Verdict::Shared {
                ratio,
                reconnect: Some(1)
            }
        );
        // The reconnected lane needs a new time alone before anything is judged again.
        assert_eq!(spread.wants_alone(t0), Some(1));
        for i in 0..10 {
            let t = timing(t0, 0, 2000 + i * 200, 200, Overlap::Together);
            assert_eq!(spread.record(t), Verdict::Pending);
        }
    }

    #[test]
    fn one_noisy_judgement_moves_nothing() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        assert!(matches!(
            run(&mut spread, t0, [65, 80]),
            Verdict::Apart { .. }
        ));
        for round in 0..6 {
            let ms = if round % 2 == 0 { [190, 210] } else { [65, 80] };
            let verdict = together(&mut spread, t0, 1000 + round * 1000, ms);
            assert!(
                matches!(
                    verdict,
                    Verdict::Apart { .. }
                        | Verdict::Shared {
                            reconnect: None,
                            ..
                        }
                ),
                "round {round}: {verdict:?}"
            );
        }
    }

    #[test]
    fn a_judgement_needs_enough_timings_of_every_lane() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        both_alone(&mut spread, t0);
        for i in 0..10 {
            let t = timing(t0, 0, 100 + i * 200, 200, Overlap::Together);
            assert_eq!(spread.record(t), Verdict::Pending, "judged on lane 0 alone");
        }
        let last = (0..TOGETHER_SAMPLES as u64)
            .map(|i| spread.record(timing(t0, 1, 100 + i * 200, 200, Overlap::Together)))
            .last();
        assert!(
            matches!(
                last,
                Some(Verdict::Shared {
                    reconnect: None,
                    ..
                })
            ),
            "{last:?}"
        );
    }

    #[test]
    fn partial_overlaps_and_idle_connections_are_not_compared() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        both_alone(&mut spread, t0);
        for i in 0..10 {
            for lane in 0..2 {
                let t = timing(t0, lane, 100 + i * 200, 200, Overlap::Partly);
                assert_eq!(spread.record(t), Verdict::Pending);
            }
        }
        // After an idle spell longer than the connection lives, the times alone are void.
        let later = CONNECTION_IDLE.as_millis() as u64 + 5_000;
        for i in 0..TOGETHER_SAMPLES as u64 {
            for lane in 0..2 {
                let t = timing(t0, lane, later + i * 200, 200, Overlap::Together);
                assert_eq!(spread.record(t), Verdict::Pending);
            }
        }
        assert_eq!(
            spread.wants_alone(t0 + Duration::from_millis(later)),
            Some(0)
        );
    }

    #[test]
    fn a_forgotten_lane_starts_over() {
        let t0 = Instant::now();
        let mut spread = Spread::new(2);
        assert!(matches!(
            run(&mut spread, t0, [65, 80]),
            Verdict::Apart { .. }
        ));
        spread.forget(0);
        assert_eq!(spread.wants_alone(t0), Some(0));
    }

    #[test]
    fn one_lane_is_never_judged() {
        let t0 = Instant::now();
        let mut spread = Spread::new(1);
        assert_eq!(spread.wants_alone(t0), None);
        for i in 0..10 {
            let t = timing(t0, 0, i * 200, 200, Overlap::Alone);
            assert_eq!(spread.record(t), Verdict::Pending);
        }
    }

    #[tokio::test]
    async fn busy_tells_an_insert_alone_from_one_among_others() {
        let busy = Busy::default();
        let ((), alone) = busy.time(0, 2, 10, async {}).await;
        assert_eq!(
            (alone.lane, alone.records, alone.overlap),
            (0, 10, Overlap::Alone)
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let other = busy.clone();
        let long = tokio::spawn(async move { other.time(1, 2, 10, rx).await.1 });
        while busy.0.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let ((), beside) = busy.time(0, 2, 10, async {}).await;
        assert_eq!(beside.overlap, Overlap::Together);
        let _ = tx.send(());
        let long = long.await.map(|t| t.overlap).ok();
        // Only its two ends are seen, and at both it was the only one: the writer makes that
        // true in between as well, by starting nothing else while a lane's time alone is taken.
        assert_eq!(long, Some(Overlap::Alone));
    }

    #[test]
    fn overlap_from_the_busy_counts() {
        assert_eq!(Overlap::of(0, 1, 2), Overlap::Alone);
        assert_eq!(Overlap::of(1, 2, 2), Overlap::Together);
        assert_eq!(Overlap::of(0, 2, 2), Overlap::Partly);
        assert_eq!(Overlap::of(1, 1, 2), Overlap::Partly);
        assert_eq!(Overlap::of(2, 3, 3), Overlap::Together);
        assert_eq!(Overlap::of(1, 3, 3), Overlap::Partly);
    }
}
