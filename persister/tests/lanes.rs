//! The writer's lanes against a fake HarperDB whose simulated worker threads slow down when
//! they serve two inserts at once, as HarperDB's do: the persister, on a real nats-server,
//! must notice its connections sharing a thread, reconnect until they are apart, and store
//! the whole backlog once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::{Json, routing::post};
use chatify_persister::startup::Application;
use chatify_shared::Settings;
use chatify_shared::subjects::RoomToken;
use chatify_shared::testing::NatsServer as Nats;
use chatify_shared::wire::StoredMessage;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long an insert takes on a simulated thread serving nothing else.
const INSERT_ALONE: Duration = Duration::from_millis(20);

/// A fake operations API with two simulated worker threads.
#[derive(Default)]
struct FakeHarper {
    /// The thread of each connection that inserted, by its address, and how many there were.
    threads: Mutex<HashMap<SocketAddr, usize>>,
    /// Inserts in progress on each thread.
    busy: [AtomicUsize; 2],
    /// Inserts in progress anywhere, and the most there ever were.
    at_once: AtomicUsize,
    most_at_once: AtomicUsize,
    /// Primary keys stored.
    stored: Mutex<HashSet<String>>,
    /// For every insert, in the order they finished: whether its thread served another insert
    /// while it ran.
    crowded: Mutex<Vec<bool>>,
}

impl FakeHarper {
    /// The first two connections land on thread 0, as the kernel's hash sometimes puts them;
    /// later ones alternate, starting on thread 0 again.
    fn thread_of(&self, peer: SocketAddr) -> usize {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let next = threads.len();
        *threads
            .entry(peer)
            .or_insert(if next < 2 { 0 } else { next % 2 })
    }

    fn connections(&self) -> usize {
        self.threads.lock().map(|t| t.len()).unwrap_or(0)
    }

    fn stored(&self) -> usize {
        self.stored.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn crowded(&self) -> Vec<bool> {
        self.crowded.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// An insert: `INSERT_ALONE` of work, done at a quarter of the speed while the thread
    /// serves two (a HarperDB thread serving two inserts is about four times slower at each).
    async fn insert(&self, peer: SocketAddr, records: &[Value]) -> Value {
        let thread = self.thread_of(peer);
        self.busy[thread].fetch_add(1, Ordering::SeqCst);
        let at_once = self.at_once.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(at_once, Ordering::SeqCst);
        let (mut done, mut crowded) = (Duration::ZERO, false);
        let step = Duration::from_millis(2);
        while done < INSERT_ALONE {
            tokio::time::sleep(step).await;
            let sharing = self.busy[thread].load(Ordering::SeqCst) as u32;
            crowded |= sharing > 1;
            done += step / (sharing * sharing).max(1);
        }
        self.busy[thread].fetch_sub(1, Ordering::SeqCst);
        self.at_once.fetch_sub(1, Ordering::SeqCst);
        let (mut inserted, mut skipped) = (Vec::new(), Vec::new());
        if let Ok(mut stored) = self.stored.lock() {
            for pk in records.iter().filter_map(|r| r["pk"].as_str()) {
                if stored.insert(pk.to_owned()) {
                    inserted.push(pk.to_owned());
                } else {
                    skipped.push(pk.to_owned());
                }
            }
        }
        if let Ok(mut c) = self.crowded.lock() {
            c.push(crowded);
        }
        json!({"inserted_hashes": inserted, "skipped_hashes": skipped})
    }
}

async fn operation(
    State(fake): State<Arc<FakeHarper>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(body): Json<Value>,
) -> Json<Value> {
    match body["operation"].as_str() {
        Some("insert") => {
            let records = body["records"].as_array().cloned().unwrap_or_default();
            Json(fake.insert(peer, &records).await)
        }
        Some("describe_table") => Json(json!({"name": body["table"]})),
        _ => Json(json!([])),
    }
}

async fn fake_harperdb() -> Result<(String, Arc<FakeHarper>), Box<dyn std::error::Error>> {
    let fake = Arc::new(FakeHarper::default());
    let app = axum::Router::new()
        .route("/", post(operation))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    Ok((url, fake))
}

const BATCH: usize = 50;

/// A persister on `nats` writing to `url` in batches of [`BATCH`] on two lanes.
fn settings(nats: &Nats, url: String) -> Settings {
    let mut settings = Settings::default();
    settings.nats.url = nats.url.clone();
    settings.harperdb.url = url;
    settings.persister.port = 0;
    settings.persister.batch_size = BATCH;
    settings.persister.batch_wait_ms = 50;
    settings.persister.write_connections = 2;
    settings
}

/// The `i`th test message, in one of 30 rooms.
fn message(i: usize) -> StoredMessage {
    StoredMessage {
        room: format!("room {}", i % 30),
        username: "tester".to_owned(),
        message: format!("m{i}"),
        created_time: chatify_shared::id::now_millis(),
    }
}

/// Runs `app` until `done` holds or a minute passed, then stops it gracefully.
async fn run_until(app: Application, done: impl Fn() -> bool) -> TestResult {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    while !done() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    running.await??;
    Ok(())
}

#[tokio::test]
async fn lanes_sharing_a_thread_are_moved_apart_and_the_backlog_is_stored_once() -> TestResult {
    const MESSAGES: usize = 120 * BATCH;
    let nats = Nats::start().await?;
    let (url, fake) = fake_harperdb().await?;
    let settings = settings(&nats, url);

    // The stream exists once the application is built; the backlog is there before it runs,
    // so every batch is full.
    let app = Application::build(settings).await?;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await?);
    let mut acks = Vec::with_capacity(BATCH);
    for i in 0..MESSAGES {
        let m = message(i);
        let subject = RoomToken::new(&m.room).store_subject();
        acks.push(js.publish(subject, serde_json::to_vec(&m)?.into()).await?);
        // The context bounds the acks awaited at once; take them a batch at a time.
        if acks.len() == BATCH {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }

    run_until(app, || fake.stored() >= MESSAGES).await?;

    assert_eq!(fake.stored(), MESSAGES, "every message stored once");
    // Connections 1 and 2 shared thread 0, and so did connection 3: the writer had to
    // reconnect at least twice to get one onto thread 1.
    assert!(
        fake.connections() >= 4,
        "{} connections inserted",
        fake.connections()
    );
    let crowded = fake.crowded();
    let tail = &crowded[crowded.len().saturating_sub(20)..];
    assert!(
        tail.iter().all(|c| !c),
        "the last inserts still shared a thread: {crowded:?}"
    );
    Ok(())
}

#[tokio::test]
async fn short_of_a_backlog_one_insert_at_a_time_is_written() -> TestResult {
    const MESSAGES: usize = 300;
    let nats = Nats::start().await?;
    let (url, fake) = fake_harperdb().await?;
    let mut settings = settings(&nats, url);
    // A batch closes every 5 ms, four times within an insert.
    settings.persister.batch_wait_ms = 5;
    let app = Application::build(settings).await?;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    // A trickle, about 500 a second: batches of a few messages, never full.
    for i in 0..MESSAGES {
        let m = message(i);
        js.publish(
            RoomToken::new(&m.room).store_subject(),
            serde_json::to_vec(&m)?.into(),
        )
        .await?
        .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let started = Instant::now();
    while fake.stored() < MESSAGES && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    running.await??;
    assert_eq!(fake.stored(), MESSAGES);
    assert!(fake.crowded().len() > 1, "{} inserts", fake.crowded().len());
    // Each insert took the messages that came while the one before it ran.
    assert_eq!(fake.most_at_once.load(Ordering::SeqCst), 1);
    Ok(())
}
