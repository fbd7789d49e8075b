//! Counters, latency histograms (HDR, microseconds), and CPU/RSS of server processes from /proc.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded (µs): larger values are clamped to it.
const MAX_US: u64 = 600_000_000;
const SHARDS: usize = 16;

#[allow(clippy::expect_used)] // constant bounds that `new_with_bounds` always accepts
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Unix time in nanoseconds (CLOCK_REALTIME: comparable across processes of one machine).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A latency histogram written by many connection tasks: sharded so they seldom share a lock.
pub struct LatencyRecorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl LatencyRecorder {
    /// Records `from_ns → to_ns` (clamped at 1 µs and at the maximum).
    pub fn record_ns(&self, shard: usize, from_ns: u64, to_ns: u64) {
        let us = (to_ns.saturating_sub(from_ns) / 1000).clamp(1, MAX_US);
        if let Ok(mut h) = self.shards[shard % SHARDS].lock() {
            let _ = h.record(us);
        }
    }

    /// Moves everything recorded so far into `into` (and forgets it here).
    pub fn drain_into(&self, into: &mut Histogram<u64>) {
        for shard in &self.shards {
            if let Ok(mut h) = shard.lock() {
                let _ = into.add(&*h);
                h.reset();
            }
        }
    }
}

/// Everything the connections count; shared by all of them.
#[derive(Default)]
pub struct Stats {
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub disconnects: AtomicU64,
    pub joined: AtomicU64,
    pub join_errors: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub ack_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub other_events: AtomicU64,
    pub history_ok: AtomicU64,
    pub history_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// `react` requests sent, acknowledged ok, refused; `reaction` events received.
    pub reacts: AtomicU64,
    pub react_acked: AtomicU64,
    pub react_errors: AtomicU64,
    pub reaction_events: AtomicU64,
    /// When the latest stamped `receive_message` or `reaction` event arrived (unix ns).
    pub last_event_ns: AtomicU64,
    pub delivery: LatencyRecorder,
    pub ack: LatencyRecorder,
    pub history: LatencyRecorder,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn error(&self, what: impl Into<String>) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(what.into()).or_default() += 1;
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes that an event arrived at `ns`.
    pub fn event_at(&self, ns: u64) {
        self.last_event_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| (us as f64) / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// The median of some figures (the mean of the two middle ones for an even count); `None` when
/// there are none. NaNs are ignored.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ProcSample {
    /// User + system CPU time, µs.
    pub cpu_us: u64,
    pub rss_kib: u64,
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line, in ticks.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    // `after` starts at field 3 (state); utime is field 14 → index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a /proc/<pid>/status text, KiB.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

pub fn sample(pid: u32, ticks: u64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_us: parse_stat_ticks(&stat)? * 1_000_000 / ticks.max(1),
        rss_kib: parse_status_rss(&status)?,
    })
}

/// Readings of every watched process.
pub fn sample_all(pids: &[u32], ticks: u64) -> Vec<Option<ProcSample>> {
    pids.iter().map(|&p| sample(p, ticks)).collect()
}

/// What the watched processes did between two readings.
#[derive(Debug, Clone, Serialize)]
pub struct ProcDelta {
    pub pid: u32,
    pub cpu_us: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

pub fn deltas(
    pids: &[u32],
    before: &[Option<ProcSample>],
    after: &[Option<ProcSample>],
) -> Vec<ProcDelta> {
    pids.iter()
        .zip(before.iter().zip(after))
        .map(|(&pid, (b, a))| {
            let (b, a) = (b.unwrap_or_default(), a.unwrap_or_default());
            ProcDelta {
                pid,
                cpu_us: a.cpu_us.saturating_sub(b.cpu_us),
                rss_before_kib: b.rss_kib,
                rss_after_kib: a.rss_kib,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0, 1.0]), Some(3.0));
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap_or_default();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.p999_ms - 999.0).abs() < 1.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 1.0, "{p:?}");
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn recorder_clamps_and_drains() {
        let r = LatencyRecorder::default();
        r.record_ns(0, 10, 5); // negative: 1 µs
        r.record_ns(17, 0, 2_000_000); // 2 ms
        r.record_ns(3, 0, u64::MAX); // clamped
        let mut h = new_histogram();
        r.drain_into(&mut h);
        assert_eq!(h.len(), 3);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= MAX_US - MAX_US / 1000);
        let mut again = new_histogram();
        r.drain_into(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 5 1000 200";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t   4321 kB\nThreads:\t4\n";
        assert_eq!(parse_status_rss(status), Some(4321));
        assert_eq!(parse_status_rss("Name: x\n"), None);
        let me = sample(std::process::id(), clock_ticks()).unwrap_or_default();
        assert!(me.rss_kib > 0);
    }
}
