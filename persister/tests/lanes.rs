//! The writer's lanes against a fake HarperDB on a real nats-server: each connection carries one
//! insert at a time and is replaced after `RECONNECT_EVERY` batches, short of a backlog one
//! insert runs at a time, and the whole backlog is stored once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::{Json, routing::post};
use chatify_persister::lanes::RECONNECT_EVERY;
use chatify_persister::startup::Application;
use chatify_shared::Settings;
use chatify_shared::subjects::RoomToken;
use chatify_shared::testing::NatsServer as Nats;
use chatify_shared::wire::StoredMessage;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long an insert takes.
const INSERT: Duration = Duration::from_millis(20);

/// A fake operations API that counts inserts per connection.
#[derive(Default)]
struct FakeHarper {
    /// Inserts finished per connection, by its address.
    per_connection: Mutex<HashMap<SocketAddr, usize>>,
    /// Inserts in progress per connection, and the most there ever were on one.
    on_connection: Mutex<HashMap<SocketAddr, usize>>,
    most_on_a_connection: AtomicUsize,
    /// Inserts in progress anywhere, and the most there ever were.
    at_once: AtomicUsize,
    most_at_once: AtomicUsize,
    /// Primary keys stored.
    stored: Mutex<HashSet<String>>,
}

impl FakeHarper {
    fn per_connection(&self) -> Vec<usize> {
        self.per_connection
            .lock()
            .map(|p| p.values().copied().collect())
            .unwrap_or_default()
    }

    fn inserts(&self) -> usize {
        self.per_connection().iter().sum()
    }

    fn stored(&self) -> usize {
        self.stored.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Adds `by` to the inserts in progress on `peer`; returns how many there are now.
    fn on(&self, peer: SocketAddr, by: isize) -> usize {
        let mut on = self.on_connection.lock().unwrap_or_else(|e| e.into_inner());
        let n = on.entry(peer).or_default();
        *n = n.saturating_add_signed(by);
        *n
    }

    async fn insert(&self, peer: SocketAddr, records: &[Value]) -> Value {
        let on = self.on(peer, 1);
        self.most_on_a_connection.fetch_max(on, Ordering::SeqCst);
        let at_once = self.at_once.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(at_once, Ordering::SeqCst);
        tokio::time::sleep(INSERT).await;
        self.at_once.fetch_sub(1, Ordering::SeqCst);
        self.on(peer, -1);
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
        if let Ok(mut per) = self.per_connection.lock() {
            *per.entry(peer).or_default() += 1;
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
        user_id: None,
        reply_to: None,
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
async fn lanes_write_one_insert_per_connection_reconnect_and_store_the_backlog_once() -> TestResult
{
    // Enough full batches for each of the two lanes to take a fresh connection twice.
    const BATCHES: usize = 2 * (2 * RECONNECT_EVERY as usize + 10);
    const MESSAGES: usize = BATCHES * BATCH;
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
    assert_eq!(fake.most_at_once.load(Ordering::SeqCst), 2, "on both lanes");
    assert_eq!(fake.most_on_a_connection.load(Ordering::SeqCst), 1);
    // Each connection carried RECONNECT_EVERY inserts, but the last of each lane fewer.
    let per_connection = fake.per_connection();
    let every = RECONNECT_EVERY as usize;
    let full = per_connection.iter().filter(|&&n| n == every).count();
    assert!(
        per_connection.iter().all(|&n| n <= every) && full + 2 >= per_connection.len(),
        "inserts per connection: {per_connection:?}"
    );
    assert!(full >= 2, "inserts per connection: {per_connection:?}");
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
    assert!(fake.inserts() > 1, "{} inserts", fake.inserts());
    // Each insert took the messages that came while the one before it ran.
    assert_eq!(fake.most_at_once.load(Ordering::SeqCst), 1);
    Ok(())
}
