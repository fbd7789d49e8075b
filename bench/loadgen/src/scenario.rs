//! The scenarios: connect a fleet, drive it, read the servers' /proc figures, summarise.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chatify_shared::storage::StoredRecord;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::MissedTickBehavior;

use crate::client::{self, AckedSend, Cmd, ConnConfig, Target};
use crate::harper::{self, Harper};
use crate::stats::{self, Percentiles, ProcDelta, Stats, new_histogram, now_ns};
use crate::{Common, parse_sources};

/// Options of the scenarios that send at a fixed rate.
#[derive(Args, Clone, Debug)]
pub struct Load {
    /// Aggregate `send_message` rate, messages/s (open loop: a late send is not skipped, and its
    /// latency counts from when it was due).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Message text bytes (the send timestamp plus padding).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Measured seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of sending at the same rate before the measurement (not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Highest send rate of one connection (the servers allow 20/s, bursts of 40).
    #[arg(long, default_value_t = 15.0)]
    pub per_sender_rate: f64,
}

/// Where HarperDB is (defaults from the `env` file of deploy/local/up.sh).
#[derive(Args, Clone, Debug)]
pub struct DbArgs {
    #[arg(long, env = "CHATIFY_HARPERDB_URL")]
    pub harperdb_url: Option<String>,
    #[arg(long, env = "CHATIFY_HARPERDB__USERNAME", default_value = "chatify")]
    pub harperdb_user: String,
    #[arg(long, env = "CHATIFY_HARPERDB__PASSWORD", hide_env_values = true)]
    pub harperdb_password: Option<String>,
    #[arg(long, default_value = "chatify")]
    pub database: String,
    #[arg(long, default_value = "messages")]
    pub table: String,
}

impl DbArgs {
    fn client(&self) -> anyhow::Result<Harper> {
        let url = self
            .harperdb_url
            .as_deref()
            .context("--harperdb-url (or CHATIFY_HARPERDB_URL) is needed")?;
        Harper::new(
            url,
            &self.harperdb_user,
            self.harperdb_password.as_deref().unwrap_or_default(),
        )
    }
}

// ------------------------------------------------------------------------------------------
// Fleet of connections, progress, counters
// ------------------------------------------------------------------------------------------

struct Fleet {
    txs: Vec<mpsc::UnboundedSender<Cmd>>,
    stats: Arc<Stats>,
}

impl Fleet {
    /// Starts `n` connection tasks; connection `i` goes to `urls[url_of(i)]`.
    fn spawn(
        common: &Common,
        stats: &Arc<Stats>,
        n: usize,
        url_of: impl Fn(usize) -> usize,
        room_of: impl Fn(usize) -> Arc<str>,
        msg_size: usize,
        acked_sink: Option<mpsc::UnboundedSender<AckedSend>>,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(
            common, stats, n, url_of, room_of, msg_size, acked_sink, None,
        )
    }

    /// [`Fleet::spawn`], recording `reaction` events in `storm`.
    #[allow(clippy::too_many_arguments)]
    fn spawn_with(
        common: &Common,
        stats: &Arc<Stats>,
        n: usize,
        url_of: impl Fn(usize) -> usize,
        room_of: impl Fn(usize) -> Arc<str>,
        msg_size: usize,
        acked_sink: Option<mpsc::UnboundedSender<AckedSend>>,
        storm: Option<Arc<client::StormLog>>,
    ) -> anyhow::Result<Self> {
        let targets: Vec<Arc<Target>> = common
            .urls
            .iter()
            .map(|u| Target::parse(u).map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        let sources = parse_sources(&common.sources)?;
        let gate = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
        let token: Option<Arc<str>> = common.auth_token.as_deref().map(Arc::from);
        let join_gate = Arc::new(Semaphore::new(common.join_concurrency.max(1)));
        let mut txs = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let cfg = ConnConfig {
                index: i,
                target: targets[url_of(i) % targets.len()].clone(),
                source: (!sources.is_empty()).then(|| sources[i % sources.len()]),
                auth_token: token.clone(),
                msg_size,
                acked_sink: acked_sink.clone(),
                join: Some((room_of(i), join_gate.clone())),
                storm: storm.clone(),
            };
            tokio::spawn(client::run(cfg, stats.clone(), rx, gate.clone()));
            txs.push(tx);
        }
        Ok(Self {
            txs,
            stats: stats.clone(),
        })
    }

    fn cmd(&self, i: usize, cmd: Cmd) {
        let _ = self.txs[i].send(cmd);
    }

    /// Waits until every connection is up or failed, then until `joins` join acks arrived.
    async fn wait_joined(&self, joins: u64, timeout: Duration) -> anyhow::Result<()> {
        let s = &self.stats;
        let n = self.txs.len() as u64;
        let done = wait_for(timeout, || {
            let failed = Stats::get(&s.connect_errors);
            failed > 0 || Stats::get(&s.joined) + Stats::get(&s.join_errors) >= joins
        })
        .await;
        let failed = Stats::get(&s.connect_errors);
        if failed > 0 {
            bail!("{failed} of {n} connections failed: {:?}", s.errors());
        }
        if !done || Stats::get(&s.join_errors) > 0 {
            bail!(
                "joins: {} ok, {} failed of {joins} (connected {}): {:?}",
                Stats::get(&s.joined),
                Stats::get(&s.join_errors),
                Stats::get(&s.connected),
                s.errors()
            );
        }
        Ok(())
    }
}

async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    sent: u64,
    acked: u64,
    ack_errors: u64,
    delivered: u64,
    history_ok: u64,
    history_errors: u64,
    protocol_errors: u64,
    disconnects: u64,
}

impl Counts {
    fn of(s: &Stats) -> Self {
        Self {
            sent: Stats::get(&s.sent),
            acked: Stats::get(&s.acked),
            ack_errors: Stats::get(&s.ack_errors),
            delivered: Stats::get(&s.delivered),
            history_ok: Stats::get(&s.history_ok),
            history_errors: Stats::get(&s.history_errors),
            protocol_errors: Stats::get(&s.protocol_errors),
            disconnects: Stats::get(&s.disconnects),
        }
    }

    fn minus(self, o: Self) -> Self {
        Self {
            sent: self.sent - o.sent,
            acked: self.acked - o.acked,
            ack_errors: self.ack_errors - o.ack_errors,
            delivered: self.delivered - o.delivered,
            history_ok: self.history_ok - o.history_ok,
            history_errors: self.history_errors - o.history_errors,
            protocol_errors: self.protocol_errors - o.protocol_errors,
            disconnects: self.disconnects - o.disconnects,
        }
    }
}

struct Totals {
    delivery: Histogram<u64>,
    ack: Histogram<u64>,
    history: Histogram<u64>,
}

/// Collects the latency recorders every second, prints a progress line, keeps the totals.
struct Monitor {
    stats: Arc<Stats>,
    totals: Mutex<Totals>,
    phase: Mutex<String>,
    quiet: bool,
    stop: AtomicBool,
}

impl Monitor {
    fn start(stats: &Arc<Stats>, quiet: bool, name: &str) -> Arc<Self> {
        let m = Arc::new(Self {
            stats: stats.clone(),
            totals: Mutex::new(Totals {
                delivery: new_histogram(),
                ack: new_histogram(),
                history: new_histogram(),
            }),
            phase: Mutex::new("connecting".into()),
            quiet,
            stop: AtomicBool::new(false),
        });
        let me = m.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last = Counts::of(&me.stats);
            let mut last_at = Instant::now();
            while !me.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = Counts::of(&me.stats);
                let dt = last_at.elapsed().as_secs_f64().max(1e-3);
                let (d99, a99, h99) = me.collect();
                if !me.quiet {
                    let phase = me.phase.lock().map(|p| p.clone()).unwrap_or_default();
                    let s = &me.stats;
                    eprintln!(
                        "[{name} {:>4.0}s {phase}] conns {} (failed {}) joined {} | sends/s {:.0} acks/s {:.0} deliveries/s {:.0} history/s {:.0} | p99 delivery {:.1} ms ack {:.1} ms history {:.1} ms | errors: ack {} protocol {} disconnects {}{}",
                        started.elapsed().as_secs_f64(),
                        Stats::get(&s.connected),
                        Stats::get(&s.connect_errors),
                        Stats::get(&s.joined),
                        (now.sent - last.sent) as f64 / dt,
                        (now.acked - last.acked) as f64 / dt,
                        (now.delivered - last.delivered) as f64 / dt,
                        (now.history_ok - last.history_ok) as f64 / dt,
                        d99,
                        a99,
                        h99,
                        now.ack_errors,
                        now.protocol_errors,
                        now.disconnects,
                        if Stats::get(&s.reacts) > 0 {
                            format!(
                                " | reacts {} acked {} refused {} reaction events {}",
                                Stats::get(&s.reacts),
                                Stats::get(&s.react_acked),
                                Stats::get(&s.react_errors),
                                Stats::get(&s.reaction_events)
                            )
                        } else {
                            String::new()
                        },
                    );
                }
                last = now;
                last_at = Instant::now();
            }
        });
        m
    }

    fn phase(&self, p: &str) {
        if let Ok(mut ph) = self.phase.lock() {
            p.clone_into(&mut ph);
        }
    }

    /// Moves the recorders into the totals; returns the p99 (ms) of what was new.
    fn collect(&self) -> (f64, f64, f64) {
        let mut d = new_histogram();
        let mut a = new_histogram();
        let mut h = new_histogram();
        self.stats.delivery.drain_into(&mut d);
        self.stats.ack.drain_into(&mut a);
        self.stats.history.drain_into(&mut h);
        if let Ok(mut t) = self.totals.lock() {
            let _ = t.delivery.add(&d);
            let _ = t.ack.add(&a);
            let _ = t.history.add(&h);
        }
        (
            Percentiles::of(&d).p99_ms,
            Percentiles::of(&a).p99_ms,
            Percentiles::of(&h).p99_ms,
        )
    }

    /// Forgets everything recorded so far (the warm-up).
    fn reset(&self) {
        self.collect();
        if let Ok(mut t) = self.totals.lock() {
            t.delivery.reset();
            t.ack.reset();
            t.history.reset();
        }
    }

    fn percentiles(&self) -> (Percentiles, Percentiles, Percentiles) {
        self.collect();
        self.totals
            .lock()
            .map(|t| {
                (
                    Percentiles::of(&t.delivery),
                    Percentiles::of(&t.ack),
                    Percentiles::of(&t.history),
                )
            })
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Calls `dispatch(k, due_ns)` for k = 0.. at `rate` per second for `secs` (open loop: the k-th
/// send is due at start + k/rate whatever happened before; late ones go out at once, in bursts).
/// Returns how many were dispatched.
async fn paced(rate: f64, secs: f64, mut dispatch: impl FnMut(u64, u64)) -> u64 {
    if rate <= 0.0 || secs <= 0.0 {
        return 0;
    }
    let total = (rate * secs).round() as u64;
    let start = Instant::now();
    let start_ns = now_ns();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut k = 0u64;
    while k < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(total);
        while k < due {
            dispatch(k, start_ns + (k as f64 * 1e9 / rate) as u64);
            k += 1;
        }
    }
    k
}

fn run_id(common: &Common) -> String {
    common
        .run_id
        .clone()
        .unwrap_or_else(|| format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
}

/// This process's own CPU and RSS (to show the load generator is not the bottleneck).
fn self_sample(ticks: u64) -> stats::ProcSample {
    stats::sample(std::process::id(), ticks).unwrap_or_default()
}

struct Window {
    started: Instant,
    procs: Vec<Option<stats::ProcSample>>,
    me: stats::ProcSample,
    counts: Counts,
}

impl Window {
    fn open(common: &Common, s: &Stats, ticks: u64) -> Self {
        Self {
            started: Instant::now(),
            procs: stats::sample_all(&common.pids, ticks),
            me: self_sample(ticks),
            counts: Counts::of(s),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn summary(
    scenario: &str,
    common: &Common,
    params: Value,
    connections: u64,
    window: &Window,
    send_secs: f64,
    counts: Counts,
    expected: u64,
    mon: &Monitor,
    ticks: u64,
) -> Value {
    let elapsed = window.started.elapsed().as_secs_f64();
    let after = stats::sample_all(&common.pids, ticks);
    let procs: Vec<ProcDelta> = stats::deltas(&common.pids, &window.procs, &after);
    let me = self_sample(ticks);
    let cpu: u64 = procs.iter().map(|p| p.cpu_us).sum();
    let rss: u64 = procs.iter().map(|p| p.rss_after_kib).sum();
    let (delivery, ack, history) = mon.percentiles();
    let lost = expected.saturating_sub(counts.delivered);
    let s = &mon.stats;
    let ok = lost == 0
        && counts.ack_errors == 0
        && counts.protocol_errors == 0
        && counts.disconnects == 0
        && counts.history_errors == 0
        && Stats::get(&s.connect_errors) == 0
        && counts.acked == counts.sent;
    json!({
        "scenario": scenario,
        "label": common.label,
        "params": params,
        "urls": common.urls,
        "pids": common.pids,
        "connections": connections,
        "window_s": elapsed,
        "send_s": send_secs,
        "sent": counts.sent,
        "acked": counts.acked,
        "ack_errors": counts.ack_errors,
        "delivered": counts.delivered,
        "expected_deliveries": expected,
        "lost_deliveries": lost,
        "send_rate": counts.sent as f64 / send_secs.max(1e-9),
        "delivery_rate": counts.delivered as f64 / send_secs.max(1e-9),
        "delivery_latency": delivery,
        "ack_latency": ack,
        "history_ok": counts.history_ok,
        "history_errors": counts.history_errors,
        "history_latency": history,
        "protocol_errors": counts.protocol_errors,
        "disconnects": counts.disconnects,
        "connect_errors": Stats::get(&s.connect_errors),
        "errors": s.errors(),
        "server": {
            "processes": procs,
            "cpu_us": cpu,
            "cpu_percent": cpu as f64 / 1e4 / elapsed.max(1e-9),
            "cpu_us_per_delivery": if counts.delivered > 0 { cpu as f64 / counts.delivered as f64 } else { f64::NAN },
            "rss_kib": rss,
            // With --pid-names: the same per component (`gateway`, `nats`...).
            "cpu_us_per_delivery_by_component": per_delivery_by_component(common, &procs, counts.delivered),
        },
        "loadgen": {
            "cpu_percent": me.cpu_us.saturating_sub(window.me.cpu_us) as f64 / 1e4 / elapsed.max(1e-9),
            "rss_kib": me.rss_kib,
        },
        "ok": ok,
    })
}

// ------------------------------------------------------------------------------------------
// idle
// ------------------------------------------------------------------------------------------

pub async fn idle(common: Common, conns: usize, rooms: usize, hold: f64) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let stats = Arc::new(Stats::default());
    let mon = Monitor::start(&stats, common.quiet, "idle");
    let run = run_id(&common);
    let before = stats::sample_all(&common.pids, ticks);
    let rooms = rooms.max(1);
    let room_names: Vec<Arc<str>> = (0..rooms)
        .map(|r| Arc::from(format!("{run}-i{r}")))
        .collect();
    // Room r's members alternate over the URLs too.
    let fleet = Fleet::spawn(
        &common,
        &stats,
        conns,
        |i| i % rooms + i / rooms,
        |i| room_names[i % rooms].clone(),
        16,
        None,
    )?;
    fleet
        .wait_joined(conns as u64, Duration::from_secs(60 + conns as u64 / 50))
        .await?;
    mon.phase("holding");
    let window = Window::open(&common, &stats, ticks);
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let counts = Counts::of(&stats).minus(window.counts);
    let after = stats::sample_all(&common.pids, ticks);
    let mut v = summary(
        "idle",
        &common,
        json!({"conns": conns, "rooms": rooms, "hold_s": hold, "run_id": run}),
        Stats::get(&stats.connected),
        &window,
        hold,
        counts,
        0,
        &mon,
        ticks,
    );
    let grown: i64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.unwrap_or_default().rss_kib as i64 - b.unwrap_or_default().rss_kib as i64)
        .sum();
    v["server"]["rss_before_kib"] = json!(
        before
            .iter()
            .map(|b| b.unwrap_or_default().rss_kib)
            .sum::<u64>()
    );
    v["server"]["rss_kib_per_connection"] = json!(grown as f64 / conns.max(1) as f64);
    v["server"]["idle_cpu_us_per_connection_second"] =
        json!(v["server"]["cpu_us"].as_f64().unwrap_or(0.0) / conns.max(1) as f64 / hold.max(1e-9));
    Ok(v)
}

// ------------------------------------------------------------------------------------------
// room / rooms
// ------------------------------------------------------------------------------------------

/// Other rooms kept busy on another server while the measured rooms run ("cost follows
/// interest": the measured server's CPU should not grow with rooms it has no member in).
#[derive(Args, Clone, Debug, Default)]
pub struct Background {
    /// Rooms of one member each on --bg-url, active during the whole run.
    #[arg(long, default_value_t = 0)]
    pub bg_rooms: usize,
    /// Aggregate send rate over the background rooms, messages/s.
    #[arg(long, default_value_t = 0.0)]
    pub bg_rate: f64,
    #[arg(long)]
    pub bg_url: Option<String>,
    /// NATS's monitoring URL (http://HOST:PORT): the bytes NATS received and sent while the
    /// rooms filled, read from /varz, go into the summary (`fill`).
    #[arg(long)]
    pub nats_monitor: Option<String>,
}

/// NATS's traffic counters at one moment (from /varz).
#[derive(Debug, Clone, Copy, Default)]
struct NatsTraffic {
    in_bytes: u64,
    out_bytes: u64,
    in_msgs: u64,
    out_msgs: u64,
}

impl NatsTraffic {
    async fn read(http: &reqwest::Client, monitor: &str) -> anyhow::Result<Self> {
        let url = format!("{}/varz", monitor.trim_end_matches('/'));
        let v: Value = http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("reading {url}"))?
            .json()
            .await
            .with_context(|| format!("decoding {url}"))?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(Self {
            in_bytes: n("in_bytes"),
            out_bytes: n("out_bytes"),
            in_msgs: n("in_msgs"),
            out_msgs: n("out_msgs"),
        })
    }

    /// What passed between `before` and now, per join as well.
    fn since(self, before: Self, joins: u64) -> Value {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (ib, ob) = (
            d(self.in_bytes, before.in_bytes),
            d(self.out_bytes, before.out_bytes),
        );
        let per = |x: u64| x as f64 / joins.max(1) as f64;
        json!({
            "in_bytes": ib, "out_bytes": ob, "bytes": ib + ob,
            "in_msgs": d(self.in_msgs, before.in_msgs), "out_msgs": d(self.out_msgs, before.out_msgs),
            "in_bytes_per_join": per(ib), "out_bytes_per_join": per(ob), "bytes_per_join": per(ib + ob),
        })
    }
}

pub async fn rooms(
    common: Common,
    load: Load,
    rooms: usize,
    members: usize,
    name: &str,
    bg: Background,
) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let stats = Arc::new(Stats::default());
    let mon = Monitor::start(&stats, common.quiet, name);
    let run = run_id(&common);
    let (rooms, members) = (rooms.max(1), members.max(1));
    let total = rooms * members;
    let room_names: Vec<Arc<str>> = (0..rooms)
        .map(|r| Arc::from(format!("{run}-r{r}")))
        .collect();
    let http = reqwest::Client::new();
    let nats_before = match &bg.nats_monitor {
        Some(m) => Some(NatsTraffic::read(&http, m).await?),
        None => None,
    };
    let fill_started = Instant::now();
    // Connection i: room i / members, member i % members; members of a room alternate URLs.
    let fleet = Fleet::spawn(
        &common,
        &stats,
        total,
        |i| i / members + i % members,
        |i| room_names[i / members].clone(),
        load.size,
        None,
    )?;
    fleet
        .wait_joined(total as u64, Duration::from_secs(120 + total as u64 / 20))
        .await?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    // Presence settles (counts go out at most once a second) before NATS is read again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fill = json!({
        "seconds": fill_s,
        "joins": Stats::get(&stats.joined),
        "joins_per_s": Stats::get(&stats.joined) as f64 / fill_s.max(1e-9),
    });
    if let (Some(m), Some(before)) = (&bg.nats_monitor, nats_before) {
        fill["nats"] = NatsTraffic::read(&http, m)
            .await?
            .since(before, total as u64);
    }
    let bg_stats = Arc::new(Stats::default());
    let bg_names: Vec<Arc<str>> = (0..bg.bg_rooms)
        .map(|r| Arc::from(format!("{run}-bg{r}")))
        .collect();
    let bg_fleet = if bg.bg_rooms > 0 {
        let mut c = common.clone();
        c.urls = vec![bg.bg_url.clone().context("--bg-rooms needs --bg-url")?];
        mon.phase("background joins");
        let f = Fleet::spawn(
            &c,
            &bg_stats,
            bg.bg_rooms,
            |_| 0,
            |i| bg_names[i].clone(),
            load.size,
            None,
        )?;
        f.wait_joined(
            bg.bg_rooms as u64,
            Duration::from_secs(120 + bg.bg_rooms as u64 / 20),
        )
        .await?;
        Some(f)
    } else {
        None
    };
    let bg_send = |k: u64, due: u64| {
        if let Some(f) = &bg_fleet {
            let r = (k % bg_names.len() as u64) as usize;
            f.cmd(
                r,
                Cmd::Send {
                    room: bg_names[r].clone(),
                    sched_ns: due,
                },
            );
        }
    };
    let bg_rate = if bg_fleet.is_some() { bg.bg_rate } else { 0.0 };
    // Let the join notices settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let per_room_rate = load.rate / rooms as f64;
    let senders =
        ((per_room_rate / load.per_sender_rate.max(0.1)).ceil() as usize).clamp(1, members);
    let send = |k: u64, due: u64| {
        let r = (k % rooms as u64) as usize;
        let s = ((k / rooms as u64) % senders as u64) as usize;
        fleet.cmd(
            r * members + s,
            Cmd::Send {
                room: room_names[r].clone(),
                sched_ns: due,
            },
        );
    };
    if load.warmup > 0.0 {
        mon.phase("warm-up");
        tokio::join!(
            paced(load.rate, load.warmup, send),
            paced(bg_rate, load.warmup, bg_send)
        );
        let base = Counts::of(&stats);
        wait_for(Duration::from_secs_f64(common.drain), || {
            let c = Counts::of(&stats);
            c.acked + c.ack_errors >= c.sent && c.delivered >= c.acked * members as u64
        })
        .await;
        let _ = base;
    }
    mon.reset();
    mon.phase("measuring");
    let window = Window::open(&common, &stats, ticks);
    let started = Instant::now();
    let bg_base = Counts::of(&bg_stats);
    tokio::join!(
        paced(load.rate, load.duration, send),
        paced(bg_rate, load.duration, bg_send)
    );
    let send_secs = started.elapsed().as_secs_f64();
    mon.phase("draining");
    wait_for(Duration::from_secs_f64(common.drain), || {
        let c = Counts::of(&stats).minus(window.counts);
        c.acked + c.ack_errors >= c.sent && c.delivered >= c.acked * members as u64 && {
            let all = Counts::of(&bg_stats);
            all.acked + all.ack_errors >= all.sent && all.delivered >= all.acked
        }
    })
    .await;
    let counts = Counts::of(&stats).minus(window.counts);
    let expected = counts.acked * members as u64;
    let b = Counts::of(&bg_stats).minus(bg_base);
    // Losses of the background are counted over its whole run (warm-up included): a window
    // boundary falls between some sends and their deliveries.
    let b_all = Counts::of(&bg_stats);
    let mut v = summary(
        name,
        &common,
        json!({
            "rooms": rooms, "members": members, "rate": load.rate, "size": load.size,
            "duration_s": load.duration, "warmup_s": load.warmup, "senders_per_room": senders,
            "urls": common.urls.len(), "run_id": run,
            "bg_rooms": bg.bg_rooms, "bg_rate": bg_rate,
        }),
        Stats::get(&stats.connected),
        &window,
        send_secs,
        counts,
        expected,
        &mon,
        ticks,
    );
    v["fill"] = fill;
    if bg_fleet.is_some() {
        let lost = b_all.acked.saturating_sub(b_all.delivered);
        v["background"] = json!({
            "url": bg.bg_url, "rooms": bg.bg_rooms, "rate": bg_rate, "sent": b.sent, "acked": b.acked,
            "ack_errors": b.ack_errors, "delivered": b.delivered, "lost_deliveries": lost,
            "connect_errors": Stats::get(&bg_stats.connect_errors), "errors": bg_stats.errors(),
            "whole_run": {"sent": b_all.sent, "acked": b_all.acked, "delivered": b_all.delivered},
        });
        let ok = v["ok"].as_bool().unwrap_or(false)
            && lost == 0
            && b_all.ack_errors == 0
            && b_all.acked == b_all.sent;
        v["ok"] = json!(ok);
    }
    Ok(v)
}

// ------------------------------------------------------------------------------------------
// persister
// ------------------------------------------------------------------------------------------

pub struct PersisterArgs {
    pub common: Common,
    pub load: Load,
    pub db: DbArgs,
    pub senders: usize,
    pub rooms: usize,
    pub persister_url: String,
    pub poll_ms: u64,
    pub pause_cmd: Option<String>,
    pub resume_cmd: Option<String>,
    pub store_timeout: f64,
    pub nats_url: Option<String>,
    /// The NATS user and password to publish with (empty: none).
    pub nats_user: String,
    pub nats_password: String,
}

async fn shell(cmd: &str) -> anyhow::Result<()> {
    let st = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("`{cmd}` failed: {st}");
    }
    Ok(())
}

pub async fn persister(a: PersisterArgs) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let common = &a.common;
    let stats = Arc::new(Stats::default());
    let mon = Monitor::start(&stats, common.quiet, "persister");
    let run = run_id(common);
    let db = a.db.client()?;
    let http = reqwest::Client::new();
    let metrics_url = format!("{}/metrics", a.persister_url.trim_end_matches('/'));
    let rooms = if a.rooms == 0 {
        a.senders.max(1)
    } else {
        a.rooms.clamp(1, a.senders.max(1))
    };
    let room_names: Vec<Arc<str>> = (0..rooms)
        .map(|r| Arc::from(format!("{run}-p{r}")))
        .collect();
    let (sink, mut acked_rx) = mpsc::unbounded_channel::<AckedSend>();
    // Either WebSocket senders through the gateways, or one publisher straight into JetStream.
    let (fleet, publisher) = match &a.nats_url {
        None => {
            let fleet = Fleet::spawn(
                common,
                &stats,
                a.senders,
                |i| i,
                |i| room_names[i % rooms].clone(),
                a.load.size,
                Some(sink),
            )?;
            fleet
                .wait_joined(a.senders as u64, Duration::from_secs(120))
                .await?;
            (Some(fleet), None)
        }
        Some(url) => (
            None,
            Some(
                crate::publish::start(
                    chatify_shared::config::NatsSettings {
                        url: url.clone(),
                        user: a.nats_user.clone(),
                        password: a.nats_password.clone().into(),
                        ..Default::default()
                    },
                    &stats,
                    a.load.size,
                    sink,
                )
                .await?,
            ),
        ),
    };
    if let Some(cmd) = &a.pause_cmd {
        mon.phase("pausing");
        shell(cmd).await?;
    }
    let stored_base = if a.pause_cmd.is_some() {
        0
    } else {
        harper::fetch_stored_total(&http, &metrics_url).await?
    };
    // The stored counter, read every poll_ms: (unix ns, stored since the start).
    let timeline: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    // With a pause, the persister restarts and its counter starts again at 0.
    let polling = Arc::new(AtomicBool::new(a.pause_cmd.is_none()));
    let poller = {
        let (timeline, polling, http, url) = (
            timeline.clone(),
            polling.clone(),
            http.clone(),
            metrics_url.clone(),
        );
        let poll = Duration::from_millis(a.poll_ms.max(1));
        tokio::spawn(async move {
            let base = stored_base;
            loop {
                tokio::time::sleep(poll).await;
                if !polling.load(Ordering::Relaxed) {
                    continue;
                }
                if let Ok(n) = harper::fetch_stored_total(&http, &url).await
                    && let Ok(mut t) = timeline.lock()
                {
                    t.push((now_ns(), n.saturating_sub(base)));
                }
            }
        })
    };
    mon.reset();
    mon.phase("sending");
    let window = Window::open(common, &stats, ticks);
    let started = Instant::now();
    let first_due = now_ns();
    paced(a.load.rate, a.load.duration, |k, due| {
        // Round-robin over all senders, each sending in its own room.
        let i = (k % a.senders.max(1) as u64) as usize;
        let room = room_names[i % rooms].clone();
        if let Some(fleet) = &fleet {
            fleet.cmd(
                i,
                Cmd::Send {
                    room,
                    sched_ns: due,
                },
            );
        } else if let Some(publisher) = &publisher {
            // Counted here, so the wait for acks below never sees a send still queued.
            Stats::inc(&stats.sent);
            let _ = publisher.send(crate::publish::Due {
                room,
                sched_ns: due,
            });
        }
    })
    .await;
    drop(publisher);
    let send_secs = started.elapsed().as_secs_f64();
    mon.phase("waiting for acks");
    wait_for(Duration::from_secs_f64(common.drain), || {
        let c = Counts::of(&stats).minus(window.counts);
        c.acked + c.ack_errors >= c.sent
    })
    .await;
    let mut acked: Vec<AckedSend> = Vec::new();
    while let Ok(x) = acked_rx.try_recv() {
        acked.push(x);
    }
    let resumed_at = now_ns();
    if let Some(cmd) = &a.resume_cmd {
        mon.phase("resuming");
        polling.store(true, Ordering::Relaxed);
        shell(cmd).await?;
    }
    mon.phase("waiting for storage");
    let want = acked.len() as u64;
    let stored_all = wait_for(Duration::from_secs_f64(a.store_timeout), || {
        timeline
            .lock()
            .map(|t| t.last().is_some_and(|&(_, n)| n >= want))
            .unwrap_or(false)
    })
    .await;
    poller.abort();
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();

    // Lag: the k-th acked message (in ack order, which is the stream's order per gateway) is
    // taken as stored when the counter first exceeds k.
    acked.sort_by_key(|x| x.acked_ns);
    let mut lag = new_histogram();
    let mut j = 0;
    let mut last_stored_ns = 0;
    for (k, m) in acked.iter().enumerate() {
        while j < timeline.len() && timeline[j].1 <= k as u64 {
            j += 1;
        }
        if let Some(&(t, _)) = timeline.get(j) {
            let _ = lag.record((t.saturating_sub(m.sched_ns) / 1000).max(1));
            last_stored_ns = t;
        }
    }
    // The drain's throughput: from the first movement of the counter to the last message.
    let first_move = timeline.iter().find(|&&(_, n)| n > 0).map(|&(t, _)| t);
    let stored_rate = match (a.pause_cmd.is_some(), first_move) {
        (true, Some(t0)) if last_stored_ns > t0 => {
            // The first poll that saw movement saw up to one poll interval of work.
            let first_n = timeline
                .iter()
                .find(|&&(_, n)| n > 0)
                .map_or(0, |&(_, n)| n);
            (want.saturating_sub(first_n)) as f64 / ((last_stored_ns - t0) as f64 / 1e9)
        }
        (false, _) if last_stored_ns > first_due => {
            want as f64 / ((last_stored_ns - first_due) as f64 / 1e9)
        }
        _ => f64::NAN,
    };

    // Read back: every acked id must be in HarperDB.
    mon.phase("reading back");
    let mut by_room: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in &acked {
        by_room.entry(&*m.room).or_default().push(&m.id);
    }
    let mut missing = 0u64;
    for (room, ids) in &by_room {
        let stored: HashSet<String> = db
            .room_ids(&a.db.database, &a.db.table, room)
            .await?
            .into_iter()
            .collect();
        missing += ids.iter().filter(|id| !stored.contains(**id)).count() as u64;
    }
    let counts = Counts::of(&stats).minus(window.counts);
    let mut v = summary(
        "persister",
        common,
        json!({
            "senders": a.senders, "rooms": rooms, "rate": a.load.rate, "size": a.load.size,
            "duration_s": a.load.duration, "backlog": a.pause_cmd.is_some(), "run_id": run,
            "through": if a.nats_url.is_some() { "jetstream" } else { "gateways" },
        }),
        Stats::get(&stats.connected),
        &window,
        send_secs,
        counts,
        // Published straight into JetStream: nobody is in the rooms to receive them.
        if a.nats_url.is_some() {
            0
        } else {
            counts.acked
        },
        &mon,
        ticks,
    );
    let p = Percentiles::of(&lag);
    v["stored"] = json!(want - missing);
    v["missing_in_harperdb"] = json!(missing);
    v["stored_all"] = json!(stored_all);
    v["stored_per_s"] = json!(stored_rate);
    v["store_lag"] = json!(if a.pause_cmd.is_some() {
        Percentiles::default()
    } else {
        p
    });
    v["resume_to_stored_s"] = json!(if a.pause_cmd.is_some() {
        last_stored_ns.saturating_sub(resumed_at) as f64 / 1e9
    } else {
        f64::NAN
    });
    let ok = v["ok"].as_bool().unwrap_or(false) && missing == 0 && stored_all;
    v["ok"] = json!(ok);
    Ok(v)
}

// ------------------------------------------------------------------------------------------
// harperdb-direct
// ------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub async fn harperdb_direct(
    db: DbArgs,
    records: usize,
    batch: usize,
    concurrency: usize,
    size: usize,
    rooms: usize,
    table: &str,
    label: &str,
    pids: &[u32],
) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let h = db.client()?;
    h.ensure_table(&db.database, table).await?;
    let run = format!("d{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut text = String::new();
    crate::proto::stamped_text(&mut text, now_ns(), size);
    let batch = batch.max(1);
    let rooms = rooms.max(1);
    // Records are built before the clock starts: the figure is HarperDB's, not ours.
    let mut batches: VecDeque<Vec<StoredRecord>> = VecDeque::new();
    let mut made = 0;
    while made < records {
        let n = batch.min(records - made);
        batches.push_back(
            (made..made + n)
                .map(|i| harper::record(&format!("{run}-p{}", i % rooms), i as u64 + 1, &text))
                .collect(),
        );
        made += n;
    }
    // One connection per lane and one insert at a time on each, every lane taking a fresh
    // connection after RECONNECT_EVERY batches, as the persister's lanes (persister/src/lanes.rs).
    let lanes = concurrency.max(1);
    let mut clients = (0..lanes)
        .map(|_| Ok((h.dedicated()?, 0)))
        .collect::<anyhow::Result<Vec<(Harper, u32)>>>()?;
    let mut free: Vec<usize> = (0..lanes).rev().collect();
    let mut reconnects = 0u64;
    let mut lat = new_histogram();
    let mut inserted = 0;
    let mut in_flight = tokio::task::JoinSet::new();
    let before = stats::sample_all(pids, ticks);
    let started = Instant::now();
    while !batches.is_empty() || !in_flight.is_empty() {
        if batches.is_empty() || free.is_empty() {
            let Some(done) = in_flight.join_next().await else {
                break;
            };
            let (lane, n, elapsed): (usize, usize, Duration) = done??;
            free.push(lane);
            inserted += n;
            let _ = lat.record((elapsed.as_micros() as u64).max(1));
            continue;
        }
        // In order, as the persister stores a stream: keys ascend within each room.
        let (Some(b), Some(lane)) = (batches.pop_front(), free.pop()) else {
            break;
        };
        let (client, written) = &mut clients[lane];
        if *written >= harper::RECONNECT_EVERY {
            *client = client.dedicated()?;
            *written = 0;
            reconnects += 1;
        }
        *written += 1;
        let (c, dbn, t) = (client.clone(), db.database.clone(), table.to_owned());
        in_flight.spawn(async move {
            let began = Instant::now();
            let n = c.insert(&dbn, &t, b).await?;
            anyhow::Ok((lane, n, began.elapsed()))
        });
    }
    let secs = started.elapsed().as_secs_f64();
    let after = stats::sample_all(pids, ticks);
    let procs = stats::deltas(pids, &before, &after);
    let batch_latency = Percentiles::of(&lat);
    Ok(json!({
        "scenario": "harperdb-direct",
        "label": label,
        "params": {"records": records, "batch": batch, "concurrency": concurrency, "size": size, "rooms": rooms, "table": table},
        "inserted": inserted,
        "window_s": secs,
        "stored_per_s": inserted as f64 / secs.max(1e-9),
        "reconnects": reconnects,
        "batch_latency": batch_latency,
        "server": {"processes": procs},
        "ok": inserted == records,
    }))
}

// ------------------------------------------------------------------------------------------
// history
// ------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub async fn history(
    common: Common,
    db: DbArgs,
    rate: f64,
    duration: f64,
    limit: u32,
    conns: usize,
    room: Option<String>,
    seed: usize,
    seed_via: &str,
    room_holds: usize,
) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let stats = Arc::new(Stats::default());
    let mon = Monitor::start(&stats, common.quiet, "history");
    let run = run_id(&common);
    let room: Arc<str> = Arc::from(room.unwrap_or_else(|| format!("{run}-history")));
    let conns = conns.max(1);
    let seed_started = Instant::now();
    // Stored before anyone joins: as messages of long ago, never seen by the servers.
    if seed > 0 && seed_via == "harperdb" {
        mon.phase("seeding");
        let h = db.client()?;
        h.ensure_table(&db.database, &db.table).await?;
        let mut text = String::new();
        crate::proto::stamped_text(&mut text, now_ns(), 100);
        let mut done = 0;
        let mut last_print = Instant::now();
        while done < seed {
            // Two batches in flight.
            let mut pending = Vec::new();
            for _ in 0..2 {
                let n = 1000.min(seed - done);
                if n == 0 {
                    break;
                }
                // Sequences 1..=seed: the room's order, as if the stream had stored them.
                let recs: Vec<StoredRecord> = (done..done + n)
                    .map(|i| harper::record(&room, i as u64 + 1, &text))
                    .collect();
                done += n;
                let (h, d, t) = (h.clone(), db.database.clone(), db.table.clone());
                pending.push(tokio::spawn(async move { h.insert(&d, &t, recs).await }));
            }
            for p in pending {
                p.await??;
            }
            if !common.quiet && last_print.elapsed() > Duration::from_secs(5) {
                eprintln!("[history] seeded {done} of {seed}");
                last_print = Instant::now();
            }
        }
    }
    let fleet = Fleet::spawn(&common, &stats, conns, |i| i, |_| room.clone(), 100, None)?;
    fleet
        .wait_joined(conns as u64, Duration::from_secs(60))
        .await?;
    if seed > 0 && seed_via != "harperdb" {
        mon.phase("seeding");
        match seed_via {
            "sends" => {
                let rate = (conns as f64 * 15.0).max(1.0);
                paced(rate, seed as f64 / rate, |k, due| {
                    fleet.cmd(
                        (k % conns as u64) as usize,
                        Cmd::Send {
                            room: room.clone(),
                            sched_ns: due,
                        },
                    );
                })
                .await;
                wait_for(Duration::from_secs(60), || {
                    let c = Counts::of(&stats);
                    c.acked + c.ack_errors >= c.sent
                })
                .await;
                // Deliveries of the seed go to every member; wait for them to pass.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => bail!("--seed-via must be harperdb or sends, not {other}"),
        }
    }
    let seed_secs = seed_started.elapsed().as_secs_f64();
    mon.reset();
    mon.phase("measuring");
    let window = Window::open(&common, &stats, ticks);
    let started = Instant::now();
    paced(rate, duration, |k, due| {
        fleet.cmd(
            (k % conns as u64) as usize,
            Cmd::History {
                room: room.clone(),
                limit,
                expect: room_holds.min(limit as usize),
                sched_ns: due,
            },
        );
    })
    .await;
    let send_secs = started.elapsed().as_secs_f64();
    let want = (rate * duration).round() as u64;
    wait_for(Duration::from_secs_f64(common.drain), || {
        let c = Counts::of(&stats).minus(window.counts);
        c.history_ok + c.history_errors >= want
    })
    .await;
    let counts = Counts::of(&stats).minus(window.counts);
    let mut v = summary(
        "history",
        &common,
        json!({"rate": rate, "duration_s": duration, "limit": limit, "conns": conns, "seed": seed, "seed_via": seed_via, "room": &*room}),
        Stats::get(&stats.connected),
        &window,
        send_secs,
        counts,
        0,
        &mon,
        ticks,
    );
    v["seed_s"] = json!(seed_secs);
    v["requests"] = json!(want);
    let ok = v["ok"].as_bool().unwrap_or(false) && counts.history_ok == want;
    v["ok"] = json!(ok);
    Ok(v)
}

// ------------------------------------------------------------------------------------------
// storm
// ------------------------------------------------------------------------------------------

/// Options of the reaction storm.
#[derive(Args, Clone, Debug)]
pub struct StormArgs {
    /// Members of the one room; member i connects to `--url` number i mod (number of URLs).
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Seconds over which every member reacts once (and, in the comparison, sends one message),
    /// spread evenly.
    #[arg(long, default_value_t = 1.0)]
    pub window: f64,
    /// Emoji, comma separated: member i reacts with number i mod (number of emoji).
    #[arg(long, default_value = "👍,🎉,😂,🔥")]
    pub emoji: String,
    /// Message text bytes of the target message and of the plain messages.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seconds without a new event, every request answered, after which a phase counts as over
    /// even if events are missing.
    #[arg(long, default_value_t = 3.0)]
    pub quiet_secs: f64,
    /// Longest wait for a phase's events, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub settle_timeout: f64,
    /// Seconds the CPU and NATS window stays open after the last event (the persister writes
    /// after the deliveries).
    #[arg(long, default_value_t = 2.0)]
    pub tail: f64,
    /// Then ask `get_history` until it shows the exact counts (once the persister wrote them).
    #[arg(long)]
    pub history: bool,
    /// Seconds the history check waits before it reports "not persisted".
    #[arg(long, default_value_t = 30.0)]
    pub history_timeout: f64,
    /// Leave out the comparison with as many plain messages.
    #[arg(long)]
    pub no_messages: bool,
    /// NATS's monitoring URL (http://HOST:PORT): the bytes and messages NATS received and sent
    /// in each phase, from /varz.
    #[arg(long)]
    pub nats_monitor: Option<String>,
}

/// A phase's progress: requests sent, answered ok, refused, and events received.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCounts {
    requests: u64,
    ok: u64,
    refused: u64,
    events: u64,
}

impl PhaseCounts {
    fn reactions(s: &Stats) -> Self {
        Self {
            requests: Stats::get(&s.reacts),
            ok: Stats::get(&s.react_acked),
            refused: Stats::get(&s.react_errors),
            events: Stats::get(&s.reaction_events),
        }
    }

    fn messages(s: &Stats) -> Self {
        Self {
            requests: Stats::get(&s.sent),
            ok: Stats::get(&s.acked),
            refused: Stats::get(&s.ack_errors),
            events: Stats::get(&s.delivered),
        }
    }

    fn minus(self, o: Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(o.requests),
            ok: self.ok.saturating_sub(o.ok),
            refused: self.refused.saturating_sub(o.refused),
            events: self.events.saturating_sub(o.events),
        }
    }

    fn answered(self) -> bool {
        self.ok + self.refused >= self.requests
    }
}

/// The component of a process name: `gateway2` → `gateway`.
fn component(name: &str) -> &str {
    let c = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if c.is_empty() { name } else { c }
}

/// CPU µs per delivery of each component (`--pid-names`), or null without names.
fn per_delivery_by_component(common: &Common, procs: &[ProcDelta], delivered: u64) -> Value {
    if common.pid_names.is_empty() || delivered == 0 {
        return Value::Null;
    }
    // CPU seconds per component, as the storm reports them, turned into µs per delivery.
    let seconds = cpu_by_name(&common.pids, &common.pid_names(), procs);
    let per_delivery: serde_json::Map<String, Value> = seconds
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.as_str() != "total")
        .filter_map(|(name, s)| Some((name.clone(), json!(s.as_f64()? * 1e6 / delivered as f64))))
        .collect();
    Value::Object(per_delivery)
}

/// CPU seconds per process and per component, over one phase.
fn cpu_by_name(pids: &[u32], names: &[&str], procs: &[ProcDelta]) -> Value {
    let mut by_process = serde_json::Map::new();
    let mut by_component: std::collections::BTreeMap<String, f64> = Default::default();
    let mut total = 0.0;
    for (k, p) in procs.iter().enumerate() {
        let pid = pids.get(k).copied().unwrap_or(p.pid);
        let name = names
            .get(k)
            .filter(|n| !n.is_empty())
            .map_or_else(|| pid.to_string(), |n| (*n).to_owned());
        let s = p.cpu_us as f64 / 1e6;
        total += s;
        *by_component.entry(component(&name).to_owned()).or_default() += s;
        by_process.insert(name, json!(s));
    }
    let mut v = json!(by_component);
    v["total"] = json!(total);
    v["processes"] = Value::Object(by_process);
    v
}

fn nats_delta(after: NatsTraffic, before: NatsTraffic, requests: u64) -> Value {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let (ib, ob) = (
        d(after.in_bytes, before.in_bytes),
        d(after.out_bytes, before.out_bytes),
    );
    json!({
        "in_bytes": ib, "out_bytes": ob, "bytes": ib + ob,
        "in_msgs": d(after.in_msgs, before.in_msgs), "out_msgs": d(after.out_msgs, before.out_msgs),
        "bytes_per_request": (ib + ob) as f64 / requests.max(1) as f64,
    })
}

/// Everything a phase measures besides the dispatching.
struct PhaseCtx<'a> {
    common: &'a Common,
    a: &'a StormArgs,
    stats: &'a Arc<Stats>,
    mon: &'a Monitor,
    http: &'a reqwest::Client,
    ticks: u64,
    names: Vec<&'a str>,
}

impl PhaseCtx<'_> {
    /// Opens the CPU and NATS window, dispatches `members` requests evenly over the storm's
    /// window, waits until the `expected` events arrived (or none came for `--quiet` seconds,
    /// or `--settle-timeout`), keeps the window open `--tail` seconds more, and summarises.
    async fn run(
        &self,
        name: &str,
        expected: u64,
        counts: fn(&Stats) -> PhaseCounts,
        dispatch: impl FnMut(u64, u64),
    ) -> anyhow::Result<Value> {
        let (a, stats) = (self.a, self.stats);
        self.mon.reset();
        self.mon.phase(name);
        let nats_before = match &a.nats_monitor {
            Some(m) => Some(NatsTraffic::read(self.http, m).await?),
            None => None,
        };
        let before = stats::sample_all(&self.common.pids, self.ticks);
        let base = counts(stats);
        stats.last_event_ns.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let first_due = now_ns();
        let rate = a.members as f64 / a.window.max(1e-3);
        paced(rate, a.window.max(1e-3), dispatch).await;
        let send_s = started.elapsed().as_secs_f64();
        self.mon.phase(&format!("{name}: settling"));
        let until = Instant::now() + Duration::from_secs_f64(a.settle_timeout);
        let quiet_ns = (a.quiet_secs * 1e9) as u64;
        let all_arrived = loop {
            let c = counts(stats).minus(base);
            if c.answered() && c.events >= expected {
                break true;
            }
            let last = stats
                .last_event_ns
                .load(Ordering::Relaxed)
                .max(first_due + (send_s * 1e9) as u64);
            if (c.answered() && now_ns().saturating_sub(last) > quiet_ns) || Instant::now() >= until
            {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let last_event = stats.last_event_ns.load(Ordering::Relaxed);
        let c = counts(stats).minus(base);
        let (delivery, ack, _) = self.mon.percentiles();
        self.mon.phase(&format!("{name}: tail"));
        tokio::time::sleep(Duration::from_secs_f64(a.tail.max(0.0))).await;
        let window_s = started.elapsed().as_secs_f64();
        let after = stats::sample_all(&self.common.pids, self.ticks);
        let procs = stats::deltas(&self.common.pids, &before, &after);
        let cpu = cpu_by_name(&self.common.pids, &self.names, &procs);
        let cpu_us: u64 = procs.iter().map(|p| p.cpu_us).sum();
        let mut v = json!({
            "requests": c.requests,
            "ok": c.ok,
            "refused": c.refused,
            "events": c.events,
            "expected_events": expected,
            "missing_events": expected.saturating_sub(c.events),
            "all_arrived": all_arrived,
            "send_s": send_s,
            "settle_s": if last_event > first_due { (last_event - first_due) as f64 / 1e9 } else { f64::NAN },
            "window_s": window_s,
            "ack_latency": ack,
            "delivery_latency": delivery,
            "cpu_s": cpu,
            "cpu_us_per_event": if c.events > 0 { cpu_us as f64 / c.events as f64 } else { f64::NAN },
            "processes": procs,
        });
        if let (Some(m), Some(b)) = (&a.nats_monitor, nats_before) {
            v["nats"] = nats_delta(NatsTraffic::read(self.http, m).await?, b, c.requests);
        }
        Ok(v)
    }
}

/// Sends `event` with `data` from connection `i` of `fleet` and waits (at most `secs`) for its
/// ack's arguments.
async fn request(
    fleet: &Fleet,
    i: usize,
    event: &'static str,
    data: Value,
    secs: f64,
) -> anyhow::Result<String> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    fleet.cmd(
        i,
        Cmd::Request {
            event,
            data: data.to_string(),
            reply,
        },
    );
    match tokio::time::timeout(Duration::from_secs_f64(secs), rx).await {
        Ok(Ok(args)) => Ok(args),
        Ok(Err(_)) => bail!("{event}: the connection closed"),
        Err(_) => bail!("{event}: no ack in {secs} s"),
    }
}

/// The `reactions` of a `reaction` event's or a message's JSON, zero counts left out.
fn reactions_of(v: &Value) -> BTreeMap<String, u64> {
    v.get("reactions")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// The counts a storm of `members` over `emoji` ends with.
fn expected_counts(members: usize, emoji: &[Arc<str>]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    if emoji.is_empty() {
        return m;
    }
    for i in 0..members {
        *m.entry(emoji[i % emoji.len()].to_string()).or_default() += 1;
    }
    m
}

pub async fn storm(common: Common, a: StormArgs) -> anyhow::Result<Value> {
    let ticks = stats::clock_ticks();
    let stats = Arc::new(Stats::default());
    let mon = Monitor::start(&stats, common.quiet, "storm");
    let run = run_id(&common);
    let n = a.members.max(1);
    let room: Arc<str> = Arc::from(format!("{run}-storm"));
    let emoji: Vec<Arc<str>> = a
        .emoji
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(Arc::from)
        .collect();
    if emoji.is_empty() {
        bail!("--emoji needs at least one emoji");
    }
    let http = reqwest::Client::new();
    let log = Arc::new(client::StormLog::new(n));
    let fill_started = Instant::now();
    let fleet = Fleet::spawn_with(
        &common,
        &stats,
        n,
        |i| i,
        |_| room.clone(),
        a.size,
        None,
        Some(log.clone()),
    )?;
    fleet
        .wait_joined(n as u64, Duration::from_secs(120 + n as u64 / 20))
        .await?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    // Join notices and presence counts settle.
    mon.phase("settling joins");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The message everyone reacts to, sent by member 0 and delivered to all.
    mon.phase("target message");
    let mut text = String::new();
    crate::proto::stamped_text(&mut text, now_ns(), a.size);
    let delivered_before = Stats::get(&stats.delivered);
    let args = request(
        &fleet,
        0,
        "send_message",
        json!({ "room": &*room, "message": text }),
        30.0,
    )
    .await?;
    if !crate::proto::ack_ok(&args) {
        bail!(
            "send_message of the target: {}",
            crate::proto::ack_error_code(&args)
        );
    }
    let target: Arc<str> = Arc::from(
        crate::proto::ack_string_field(&args, "id").context("send_message ack without id")?,
    );
    let everyone = wait_for(Duration::from_secs(30), || {
        Stats::get(&stats.delivered) - delivered_before >= n as u64
    })
    .await;
    if !everyone {
        bail!(
            "the target message reached {} of {n} members in 30 s",
            Stats::get(&stats.delivered) - delivered_before
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let names = common.pid_names();
    let ctx = PhaseCtx {
        common: &common,
        a: &a,
        stats: &stats,
        mon: &mon,
        http: &http,
        ticks,
        names,
    };
    let nn = (n as u64) * (n as u64);

    // The storm: member k reacts with emoji k mod E, all within the window.
    let reactions = ctx
        .run("reactions", nn, PhaseCounts::reactions, |k, due| {
            let i = k as usize;
            if let Some(d) = log.due_ns.get(i) {
                d.store(due, Ordering::Relaxed);
            }
            fleet.cmd(
                i,
                Cmd::React {
                    room: room.clone(),
                    id: target.clone(),
                    emoji: emoji[i % emoji.len()].clone(),
                    sched_ns: due,
                },
            );
        })
        .await?;

    // Exact counts: the last `reaction` event every member received.
    let want = expected_counts(n, &emoji);
    let (mut exact, mut wrong, mut silent) = (0u64, 0u64, 0u64);
    let mut wrong_sample: Option<Value> = None;
    for i in 0..n {
        let last = log.last_of(i);
        if last.is_empty() {
            silent += 1;
            continue;
        }
        let got = serde_json::from_str::<Value>(&last)
            .ok()
            .and_then(|v| v.get(1).map(reactions_of))
            .unwrap_or_default();
        if got == want {
            exact += 1;
        } else {
            wrong += 1;
            if wrong_sample.is_none() {
                wrong_sample = Some(json!({ "member": i, "reactions": got }));
            }
        }
    }
    let exact_v = json!({
        "expected": want,
        "members_exact": exact,
        "members_wrong": wrong,
        "members_without_event": silent,
        "members_not_exact": wrong + silent,
        "first_wrong": wrong_sample,
    });

    // History: the persister writes changes after they were delivered; ask until it shows them.
    let history = if a.history {
        mon.phase("history");
        let started = Instant::now();
        let mut last_seen: Option<BTreeMap<String, u64>> = None;
        let mut last_error: Option<String> = None;
        let mut persisted_s = None;
        while started.elapsed().as_secs_f64() < a.history_timeout {
            match request(
                &fleet,
                0,
                "get_history",
                json!({ "room": &*room, "limit": 50 }),
                10.0,
            )
            .await
            {
                Ok(args) if crate::proto::ack_ok(&args) => {
                    let msg = serde_json::from_str::<Value>(&args).ok().and_then(|v| {
                        v.get(0)?
                            .get("messages")?
                            .as_array()?
                            .iter()
                            .find(|m| m.get("id").and_then(Value::as_str) == Some(&*target))
                            .cloned()
                    });
                    match msg {
                        Some(m) => {
                            let got = reactions_of(&m);
                            let done = got == want;
                            last_seen = Some(got);
                            if done {
                                persisted_s = Some(started.elapsed().as_secs_f64());
                                break;
                            }
                        }
                        None => last_error = Some("the target message is not in the page".into()),
                    }
                }
                Ok(args) => last_error = Some(crate::proto::ack_error_code(&args)),
                Err(e) => last_error = Some(format!("{e:#}")),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let note = match persisted_s {
            Some(s) => format!("exact counts in get_history after {s:.1} s"),
            None => format!("not persisted within {:.0} s", a.history_timeout),
        };
        if !common.quiet {
            eprintln!("[storm] history: {note}");
        }
        json!({
            "checked": true,
            "exact": persisted_s.is_some(),
            "seconds": persisted_s,
            "note": note,
            "last_seen": last_seen,
            "last_error": last_error,
        })
    } else {
        json!({ "checked": false })
    };

    // The same number of plain messages: each member sends one, all within the window.
    let messages = if a.no_messages {
        Value::Null
    } else {
        ctx.run("messages", nn, PhaseCounts::messages, |k, due| {
            fleet.cmd(
                k as usize,
                Cmd::Send {
                    room: room.clone(),
                    sched_ns: due,
                },
            );
        })
        .await?
    };

    let ratio = |path: &[&str]| -> Value {
        let get = |v: &Value| {
            let mut cur = v;
            for p in path {
                cur = cur.get(*p)?;
            }
            cur.as_f64()
        };
        match (get(&reactions), get(&messages)) {
            (Some(r), Some(m)) if m != 0.0 => json!(r / m),
            _ => Value::Null,
        }
    };
    let ratios = json!({
        "settle_s": ratio(&["settle_s"]),
        "cpu_total_s": ratio(&["cpu_s", "total"]),
        "cpu_gateway_s": ratio(&["cpu_s", "gateway"]),
        "cpu_nats_s": ratio(&["cpu_s", "nats"]),
        "cpu_persister_s": ratio(&["cpu_s", "persister"]),
        "nats_bytes": ratio(&["nats", "bytes"]),
    });
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let lost = field(&reactions, "missing_events") + field(&messages, "missing_events");
    let refused = field(&reactions, "refused") + field(&messages, "refused");
    let s = &stats;
    let ok = wrong + silent == 0
        && lost == 0
        && refused == 0
        && field(&reactions, "ok") == n as u64
        && (a.no_messages || field(&messages, "ok") == n as u64)
        && Stats::get(&s.connect_errors) == 0
        && Stats::get(&s.disconnects) == 0
        && Stats::get(&s.protocol_errors) == 0;
    Ok(json!({
        "scenario": "storm",
        "label": common.label,
        "params": {
            "members": n, "window_s": a.window, "emoji": emoji.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "size": a.size, "urls": common.urls.len(), "history": a.history, "run_id": run,
        },
        "urls": common.urls,
        "pids": common.pids,
        "connections": Stats::get(&s.connected),
        "fill_s": fill_s,
        "target": &*target,
        "reactions": reactions,
        "exact": exact_v,
        "history": history,
        "messages": messages,
        "ratios": ratios,
        "lost_deliveries": lost,
        "refused": refused,
        "protocol_errors": Stats::get(&s.protocol_errors),
        "disconnects": Stats::get(&s.disconnects),
        "connect_errors": Stats::get(&s.connect_errors),
        "errors": s.errors(),
        "loadgen": { "rss_kib": self_sample(ticks).rss_kib },
        "ok": ok,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paced_is_open_loop() {
        let mut due = Vec::new();
        let t0 = now_ns();
        let n = paced(1000.0, 0.05, |k, d| {
            due.push((k, d));
            if k == 10 {
                // A stall of the dispatcher: the sends that fell due meanwhile go out at once,
                // keeping their due times (latency counts from then).
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await;
        assert_eq!(n, 50);
        assert_eq!(due.len(), 50);
        for (i, pair) in due.windows(2).enumerate() {
            assert_eq!(pair[0].0 + 1, pair[1].0);
            let gap = pair[1].1 - pair[0].1;
            assert!((999_000..=1_001_000).contains(&gap), "gap {gap} ns at {i}");
        }
        assert!(due[0].1 >= t0);
        assert_eq!(paced(0.0, 1.0, |_, _| {}).await, 0);
    }

    #[test]
    fn storm_counts_and_names() {
        let emoji: Vec<Arc<str>> = vec![Arc::from("a"), Arc::from("b"), Arc::from("c")];
        let want = expected_counts(7, &emoji);
        assert_eq!(
            want.into_iter().collect::<Vec<_>>(),
            vec![
                ("a".to_owned(), 3),
                ("b".to_owned(), 2),
                ("c".to_owned(), 2)
            ]
        );
        let v = json!({"reactions": {"a": 2, "b": 0}});
        assert_eq!(
            reactions_of(&v).into_iter().collect::<Vec<_>>(),
            vec![("a".to_owned(), 2)],
            "zero counts are left out"
        );
        assert!(reactions_of(&json!({"id": "x"})).is_empty());
        assert_eq!(component("gateway12"), "gateway");
        assert_eq!(component("nats"), "nats");
        assert_eq!(component("42"), "42");
        let c = PhaseCounts {
            requests: 3,
            ok: 2,
            refused: 1,
            events: 9,
        };
        assert!(c.answered());
        assert!(
            !PhaseCounts {
                requests: 3,
                ok: 2,
                ..PhaseCounts::default()
            }
            .answered()
        );
    }

    #[test]
    fn counts_subtract() {
        let a = Counts {
            sent: 10,
            acked: 9,
            delivered: 90,
            ..Counts::default()
        };
        let b = Counts {
            sent: 4,
            acked: 4,
            delivered: 40,
            ..Counts::default()
        };
        let d = a.minus(b);
        assert_eq!((d.sent, d.acked, d.delivered), (6, 5, 50));
    }
}
