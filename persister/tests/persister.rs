//! Integration tests: the persister against a real nats-server (started here, per test, on a
//! free port) and the real HarperDB that `scripts/test.sh` starts (`CHATIFY_TEST_HARPERDB_*`),
//! each test in a database of its own. Without that HarperDB they fail, saying so.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use chatify_persister::startup::Application;
use chatify_shared::Settings;
use chatify_shared::subjects::{HISTORY_SUBJECT, RoomToken};
use chatify_shared::testing::NatsServer as Nats;
use chatify_shared::wire::{ChatMessage, HistoryPage, HistoryQuery, StoredMessage};
use secrecy::SecretString;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Settings for a persister on `nats`, writing to a fresh database of the HarperDB named by
/// `CHATIFY_TEST_HARPERDB_*`; an error saying how to provide one when it is not configured.
fn settings(nats: &Nats) -> Result<Settings, Box<dyn std::error::Error>> {
    let url = std::env::var("CHATIFY_TEST_HARPERDB_URL").map_err(|_| {
        "this test needs HarperDB: set CHATIFY_TEST_HARPERDB_URL, CHATIFY_TEST_HARPERDB_USERNAME \
         and CHATIFY_TEST_HARPERDB_PASSWORD, or run scripts/test.sh, which starts HarperDB"
    })?;
    let mut s = Settings::default();
    s.nats.url = nats.url.clone();
    s.harperdb.url = url;
    s.harperdb.username = std::env::var("CHATIFY_TEST_HARPERDB_USERNAME").unwrap_or_default();
    s.harperdb.password =
        SecretString::from(std::env::var("CHATIFY_TEST_HARPERDB_PASSWORD").unwrap_or_default());
    s.harperdb.database = format!("test_{}", Uuid::new_v4().simple());
    s.persister.port = 0;
    s.persister.batch_wait_ms = 10;
    Ok(s)
}

/// A running persister; `stop` shuts it down gracefully.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    http: std::net::SocketAddr,
}

async fn spawn_persister(settings: Settings) -> Result<Running, Box<dyn std::error::Error>> {
    let app = Application::build(settings).await?;
    let http = app.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = app
            .run_until_stopped(async move {
                let _ = stopped.await;
            })
            .await;
        assert!(result.is_ok(), "persister failed: {result:?}");
    });
    // Ready once the table exists and the consumer is bound.
    let started = Instant::now();
    loop {
        let ready = reqwest::get(format!("http://{http}/readyz")).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err("the persister did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Running { stop, task, http })
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn message(room: &str, text: &str) -> StoredMessage {
    StoredMessage {
        room: room.to_owned(),
        username: "tester".to_owned(),
        message: text.to_owned(),
        created_time: chatify_shared::id::now_millis(),
        user_id: None,
        reply_to: None,
    }
}

/// Stores a message in the stream the way a gateway does, with a retry key: the message as
/// clients see it (with the id its stream sequence gives it), and whether it was a duplicate.
async fn publish_with_key(
    js: &async_nats::jetstream::Context,
    m: &StoredMessage,
    msg_id: &str,
) -> Result<(ChatMessage, bool), Box<dyn std::error::Error>> {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    let ack = js
        .publish_with_headers(
            RoomToken::new(&m.room).store_subject(),
            headers,
            serde_json::to_vec(m)?.into(),
        )
        .await?
        .await?;
    Ok((m.clone().into_message(ack.sequence), ack.duplicate))
}

/// [`publish_with_key`] without a retry key.
async fn publish(
    js: &async_nats::jetstream::Context,
    m: &StoredMessage,
) -> Result<ChatMessage, Box<dyn std::error::Error>> {
    Ok(publish_with_key(js, m, &Uuid::new_v4().to_string())
        .await?
        .0)
}

async fn history(
    client: &async_nats::Client,
    query: &HistoryQuery,
) -> Result<HistoryPage, Box<dyn std::error::Error>> {
    let answer = client
        .request(HISTORY_SUBJECT, serde_json::to_vec(query)?.into())
        .await?;
    if let Some(code) = answer
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        return Err(format!("service error {code}").into());
    }
    Ok(serde_json::from_slice(&answer.payload)?)
}

fn query(room: &str, limit: u32) -> HistoryQuery {
    HistoryQuery {
        room: room.to_owned(),
        before: None,
        after: None,
        limit,
        ..HistoryQuery::default()
    }
}

/// Polls until the room's latest `limit` holds `count` messages.
async fn wait_for_count(
    client: &async_nats::Client,
    room: &str,
    count: usize,
) -> Result<HistoryPage, Box<dyn std::error::Error>> {
    let started = Instant::now();
    loop {
        let page = history(client, &query(room, 1000)).await?;
        if page.messages.len() >= count || started.elapsed() > Duration::from_secs(15) {
            return Ok(page);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drop_database(settings: &Settings) {
    use secrecy::ExposeSecret;
    let _ = reqwest::Client::new()
        .post(&settings.harperdb.url)
        .basic_auth(&settings.harperdb.username, Some(settings.harperdb.password.expose_secret()))
        .json(&serde_json::json!({"operation": "drop_database", "database": settings.harperdb.database}))
        .send()
        .await;
}

#[tokio::test]
async fn messages_are_stored_once_and_paged_back_per_room() -> TestResult {
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());

    // 120 messages in `a.b`, some in rooms whose names are wildcards or prefixes of it.
    let mut sent = Vec::new();
    for i in 0..120 {
        let m = message("a.b", &format!("m{i}"));
        let (stored, duplicate) = publish_with_key(&js, &m, &format!("key {i}")).await?;
        assert!(!duplicate);
        if i == 5 {
            // A retry with the same key: JetStream keeps the first, so the table has it once.
            let (again, duplicate) = publish_with_key(&js, &m, "key 5").await?;
            assert!(duplicate);
            assert_eq!(again.id, stored.id, "a retry is the first message");
        }
        sent.push(stored);
    }
    for room in ["a", "*", ">", "a.*"] {
        publish(&js, &message(room, &format!("only in {room}"))).await?;
    }

    let all = wait_for_count(&client, "a.b", 120).await?;
    assert_eq!(all.messages, sent, "every message once, oldest first");
    assert!(!all.has_more);

    // Latest 50, then pages back with `before`: 50, 50, 20, no overlap, no gap.
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = history(
            &client,
            &HistoryQuery {
                before,
                ..query("a.b", 50)
            },
        )
        .await?;
        before = page.messages.first().map(|m| m.id);
        let more = page.has_more;
        pages.push(page.messages);
        if !more {
            break;
        }
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![50, 50, 20]
    );
    let stitched: Vec<ChatMessage> = pages.into_iter().rev().flatten().collect();
    assert_eq!(stitched, sent);

    // `after` (join with `since`) gives exactly what came later.
    let since = history(
        &client,
        &HistoryQuery {
            after: Some(sent[99].id),
            ..query("a.b", 1000)
        },
    )
    .await?;
    assert_eq!(since.messages, sent[100..].to_vec());
    // Both bounds exclude their own ids.
    let window = history(
        &client,
        &HistoryQuery {
            after: Some(sent[10].id),
            before: Some(sent[14].id),
            ..query("a.b", 100)
        },
    )
    .await?;
    assert_eq!(window.messages, sent[11..14].to_vec());

    for room in ["a", "*", ">", "a.*"] {
        let page = wait_for_count(&client, room, 1).await?;
        assert_eq!(
            page.messages.len(),
            1,
            "room {room:?} holds only its own message"
        );
        assert_eq!(page.messages[0].message, format!("only in {room}"));
    }
    assert!(
        history(&client, &query("nobody-here", 10))
            .await?
            .messages
            .is_empty()
    );

    // Metrics and readiness answer.
    let metrics = reqwest::get(format!("http://{}/metrics", persister.http))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("chatify_persister_messages_stored_total"),
        "{metrics}"
    );
    assert_eq!(
        reqwest::get(format!("http://{}/readyz", persister.http))
            .await?
            .status(),
        200
    );

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

#[tokio::test]
async fn history_survives_a_restart_and_writes_resume() -> TestResult {
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());

    let first = spawn_persister(settings.clone()).await?;
    let mut before_restart = Vec::new();
    for i in 0..10 {
        before_restart.push(publish(&js, &message("restart", &format!("before {i}"))).await?);
    }
    assert_eq!(
        wait_for_count(&client, "restart", 10).await?.messages,
        before_restart
    );
    first.stop().await;

    // Written while no persister runs: waits in the stream.
    let mut while_down = Vec::new();
    for i in 0..5 {
        while_down.push(publish(&js, &message("restart", &format!("while down {i}"))).await?);
    }
    let second = spawn_persister(settings.clone()).await?;
    let page = wait_for_count(&client, "restart", 15).await?;
    let expected: Vec<ChatMessage> = before_restart.into_iter().chain(while_down).collect();
    assert_eq!(page.messages, expected);
    second.stop().await;
    drop_database(&settings).await;
    Ok(())
}

#[tokio::test]
async fn bad_history_queries_are_refused() -> TestResult {
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    // Wait until the service is registered.
    let started = Instant::now();
    while history(&client, &query("r", 1)).await.is_err()
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bad in [
        &b"not json"[..],
        br#"{"room":"r","limit":0}"#,
        br#"{"room":"","limit":5}"#,
        br#"{"room":"r","limit":5000}"#,
        br#"{"room":"r","limit":5,"after":"0b7c5a4e-4c4e-4f6e-9d4e-2c1d7f3e8a91"}"#,
    ] {
        let answer = client
            .request(HISTORY_SUBJECT, bytes::Bytes::copy_from_slice(bad))
            .await?;
        let code = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|c| c.as_str().to_owned());
        assert_eq!(
            code.as_deref(),
            Some("400"),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

#[tokio::test]
async fn history_includes_acked_messages_the_writer_has_not_written_yet() -> TestResult {
    let nats = Nats::start().await?;
    let mut settings = settings(&nats)?;
    // Batches wait 5 s to fill: for that long, the messages are only in JetStream.
    settings.persister.batch_size = 10_000;
    settings.persister.batch_wait_ms = 5000;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());

    let first = publish(&js, &message("tail", "first")).await?;
    // Let the first batch be written (it waits 5 s), then hold a second one back.
    let written = wait_for_count(&client, "tail", 1).await?;
    assert_eq!(written.messages, vec![first.clone()]);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(publish(&js, &message("tail", &format!("pending {i}"))).await?);
    }
    let started = Instant::now();
    let page = history(&client, &query("tail", 100)).await?;
    let expected: Vec<ChatMessage> = std::iter::once(first.clone())
        .chain(pending.clone())
        .collect();
    assert_eq!(
        page.messages, expected,
        "acked messages are in history at once"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered without waiting for the batch"
    );
    let since = history(
        &client,
        &HistoryQuery {
            after: Some(first.id),
            ..query("tail", 1000)
        },
    )
    .await?;
    assert_eq!(since.messages, pending);
    let limited = history(&client, &query("tail", 2)).await?;
    assert_eq!(limited.messages, pending[3..].to_vec());
    assert!(limited.has_more);

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

#[tokio::test]
async fn a_message_harperdb_refuses_is_dead_lettered_without_blocking_the_others() -> TestResult {
    use futures::StreamExt;
    let nats = Nats::start().await?;
    let mut settings = settings(&nats)?;
    settings.persister.batch_wait_ms = 300;
    settings.persister.retry_initial_ms = 10;
    settings.persister.max_attempts = 2;
    // The table declares `userId` a number, so HarperDB refuses the one message that has one
    // (a user id is text); the others have none.
    let mut attributes: Vec<serde_json::Value> = chatify_shared::storage::ATTRIBUTES
        .iter()
        .map(|(name, kind)| serde_json::json!({"name": name, "type": kind}))
        .collect();
    for a in &mut attributes {
        if a["name"] == "userId" {
            a["type"] = "Float".into();
        }
    }
    harperdb_operation(
        &settings,
        serde_json::json!({"operation": "create_database", "database": settings.harperdb.database}),
    )
    .await?;
    harperdb_operation(
        &settings,
        serde_json::json!({"operation": "create_table", "database": settings.harperdb.database,
            "table": settings.harperdb.table, "primary_key": "pk", "attributes": attributes}),
    )
    .await?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());

    let poison = StoredMessage {
        user_id: Some("a user id HarperDB refuses here".into()),
        ..message("poison", "poison")
    };
    let mut good = Vec::new();
    for i in 0..6 {
        if i == 3 {
            publish(&js, &poison).await?;
        }
        good.push(publish(&js, &message("beside-poison", &format!("good {i}"))).await?);
    }
    let page = wait_for_count(&client, "beside-poison", 6).await?;
    assert_eq!(
        page.messages, good,
        "the messages around the poison are stored"
    );

    let dead = js
        .get_stream(chatify_shared::subjects::DEAD_LETTER_STREAM)
        .await?;
    let consumer = dead
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let first = batch
        .next()
        .await
        .ok_or("nothing in the dead-letter stream")?
        .map_err(|e| e.to_string())?;
    let stored: StoredMessage = serde_json::from_slice(&first.payload)?;
    assert_eq!(stored, poison);
    let reason = first
        .headers
        .as_ref()
        .and_then(|h| h.get(chatify_shared::subjects::DEAD_LETTER_REASON_HEADER))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(reason.contains("must be a number"), "reason: {reason:?}");
    assert!(
        batch.next().await.is_none(),
        "only the poison is dead-lettered"
    );

    // Everything was acked: written (acks come only after the write) or dead-lettered.
    let messages = js
        .get_stream(chatify_shared::subjects::MESSAGES_STREAM)
        .await?;
    let started = Instant::now();
    loop {
        let info = messages
            .consumer_info(chatify_shared::subjects::PERSISTER_CONSUMER)
            .await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            assert_eq!(info.ack_floor.stream_sequence, 7);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still unacked: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::get(format!("http://{}/metrics", persister.http))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("chatify_persister_dead_lettered_total 1"),
        "{metrics}"
    );
    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

/// The sum of a counter's series in the persister's /metrics whose labels include `label`.
async fn counter(
    http: std::net::SocketAddr,
    name: &str,
    label: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test]
async fn history_from_recent_messages_in_memory_is_exactly_the_stored_history() -> TestResult {
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut all = Vec::new();
    for i in 0..150 {
        all.push(publish(&js, &message("cached", &format!("m{i}"))).await?);
    }
    let hits = |http| {
        counter(
            http,
            "chatify_persister_history_cache_total",
            "outcome=\"hit\"",
        )
    };
    let hits_before = hits(persister.http).await?;

    // The first latest page reads HarperDB (and keeps the newest 100 in memory).
    let page = history(&client, &query("cached", 50)).await?;
    assert_eq!(page.messages, all[100..].to_vec());
    assert!(page.has_more);
    // Messages stored since are in the next answers at once.
    for i in 150..180 {
        all.push(publish(&js, &message("cached", &format!("m{i}"))).await?);
    }
    let page = history(&client, &query("cached", 50)).await?;
    assert_eq!(page.messages, all[130..].to_vec());
    assert!(page.has_more);
    let page = history(&client, &query("cached", 100)).await?;
    assert_eq!(page.messages, all[80..].to_vec());
    assert!(page.has_more);
    let since = history(
        &client,
        &HistoryQuery {
            after: Some(all[170].id),
            ..query("cached", 1000)
        },
    )
    .await?;
    assert_eq!(since.messages, all[171..].to_vec());
    assert!(!since.has_more);
    let hits_after = hits(persister.http).await?;
    assert!(
        hits_after - hits_before >= 3.0,
        "answered from memory: hits {hits_before} -> {hits_after}"
    );
    // Older than what is kept: from HarperDB, just as exact.
    let older = history(
        &client,
        &HistoryQuery {
            before: Some(all[100].id),
            ..query("cached", 50)
        },
    )
    .await?;
    assert_eq!(older.messages, all[50..100].to_vec());
    assert!(older.has_more);

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

/// Waits until the persisters' consumer has every stored message written and acked.
async fn wait_until_written(js: &async_nats::jetstream::Context) -> TestResult {
    use chatify_shared::subjects::{MESSAGES_STREAM, PERSISTER_CONSUMER};
    let stream = js.get_stream(MESSAGES_STREAM).await?;
    let started = Instant::now();
    loop {
        let info = stream.consumer_info(PERSISTER_CONSUMER).await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err(format!("still unwritten after 15 s: {info:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn long_rooms_keep_their_history_and_rows_under_old_long_keys_are_migrated() -> TestResult {
    let nats = Nats::start().await?;
    let mut settings = settings(&nats)?;
    // Every answer from HarperDB itself, never from the recent messages in memory.
    settings.persister.history_cache_bytes = 0;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let running = spawn_persister(settings.clone()).await?;

    // 128 × "日": 384 bytes, a 512-character token, far past what HarperDB ranges over.
    let room = "日".repeat(128);
    let mut sent = Vec::new();
    for i in 0..6 {
        let by_a_user = StoredMessage {
            user_id: Some(format!("user {i}")),
            ..message(&room, &format!("long {i}"))
        };
        sent.push(publish(&js, &by_a_user).await?);
    }
    wait_until_written(&js).await?;
    assert_eq!(history(&client, &query(&room, 100)).await?.messages, sent);
    let since = HistoryQuery {
        after: Some(sent[1].id),
        ..query(&room, 100)
    };
    assert_eq!(history(&client, &since).await?.messages, sent[2..]);
    let before = HistoryQuery {
        before: Some(sent[4].id),
        ..query(&room, 2)
    };
    let page = history(&client, &before).await?;
    assert_eq!((page.messages, page.has_more), (sent[2..4].to_vec(), true));
    // A room one character shorter is another room.
    let neighbour = format!("{}月", "日".repeat(127));
    assert!(
        history(&client, &query(&neighbour, 100))
            .await?
            .messages
            .is_empty()
    );

    // A row an older Chatify stored under the room's whole token: no reader finds it...
    let legacy_room = "ü".repeat(128);
    let legacy = message(&legacy_room, "written before digests").into_message(1_000_000);
    let mut record = chatify_shared::storage::StoredRecord::new(&legacy);
    record.pk = format!(
        "{}|{:016x}",
        RoomToken::new(&legacy_room),
        legacy.sequence()
    );
    assert!(chatify_shared::storage::RoomKey::is_legacy_long_key(
        &record.pk
    ));
    harperdb_operation(
        &settings,
        serde_json::json!({"operation": "insert", "database": settings.harperdb.database,
            "table": settings.harperdb.table, "records": [record]}),
    )
    .await?;
    assert!(
        history(&client, &query(&legacy_room, 100))
            .await?
            .messages
            .is_empty()
    );
    // ...until the migration moves it to the room's current key.
    let db = chatify_persister::harperdb::HarperDb::new(&settings.harperdb)?;
    assert_eq!(chatify_persister::migrate::migrate_long_keys(&db).await?, 1);
    assert_eq!(
        history(&client, &query(&legacy_room, 100)).await?.messages,
        vec![legacy]
    );
    assert_eq!(
        chatify_persister::migrate::migrate_long_keys(&db).await?,
        0,
        "run again: nothing left"
    );
    assert_eq!(
        history(&client, &query(&room, 100)).await?.messages,
        sent,
        "others untouched"
    );

    running.stop().await;
    drop_database(&settings).await;
    Ok(())
}

async fn harperdb_operation(settings: &Settings, body: serde_json::Value) -> TestResult {
    use secrecy::ExposeSecret;
    let answer = reqwest::Client::new()
        .post(&settings.harperdb.url)
        .basic_auth(
            &settings.harperdb.username,
            Some(settings.harperdb.password.expose_secret()),
        )
        .json(&body)
        .send()
        .await?;
    if !answer.status().is_success() {
        return Err(format!(
            "HarperDB answered {}: {}",
            answer.status(),
            answer.text().await?
        )
        .into());
    }
    Ok(())
}

/// The persister with least privilege everywhere: `chatify-persister setup` (run twice, as
/// every up.sh does) gives it a HarperDB user that may read, insert and update its table and
/// read and insert into its change log, and nothing else, and it logs in to NATS as `chatify-persister` (deploy/nats/start.sh's users):
/// it stores what a gateway's user publishes and answers the gateway's history query.
#[tokio::test]
async fn with_its_own_harperdb_and_nats_users_the_persister_stores_and_answers() -> TestResult {
    use chatify_persister::harperdb::{HarperDb, HarperError};
    use chatify_persister::setup;
    use chatify_shared::subjects::Role;

    let (nats, users) = Nats::start_with_users().await?;
    let admin = settings(&nats)?;
    let mut settings = admin.clone();
    settings.nats = users.persister(&nats.url);
    settings.harperdb.admin_username = admin.harperdb.username.clone();
    settings.harperdb.admin_password = admin.harperdb.password.clone();
    settings.harperdb.username = format!("test_persister_{}", Uuid::new_v4().simple());
    settings.harperdb.password = SecretString::from(Uuid::new_v4().simple().to_string());
    let db = HarperDb::new(&settings.harperdb)?;
    setup::setup(&db, &settings.harperdb).await?;
    setup::setup(&db, &settings.harperdb).await?;

    // The running persister never has the admin's credentials.
    let mut running = settings.clone();
    running.harperdb.admin_username.clear();
    running.harperdb.admin_password = SecretString::from("");
    let persister = spawn_persister(running).await?;
    let gateway =
        chatify_shared::bus::connect(&users.gateway(&nats.url), "test-gateway", Role::Gateway)
            .await?;
    let js = async_nats::jetstream::new(gateway.clone());
    let sent = publish(&js, &message("least-privilege", "stored")).await?;
    let page = wait_for_count(&gateway, "least-privilege", 1).await?;
    assert_eq!(page.messages, vec![sent.clone()]);
    // A change is written with its rights too: the row upserted, the change logged.
    publish_change(&js, &change_of(&sent, "ann", edit("stored, edited"))).await?;
    publish_change(&js, &change_of(&sent, "bob", react("👍", true))).await?;
    let key = chatify_shared::storage::storage_key(
        &chatify_shared::storage::RoomKey::new("least-privilege"),
        sent.sequence(),
    );
    let started = Instant::now();
    let row = loop {
        let rows = db.states(std::slice::from_ref(&key)).await?;
        if let Some(row) = rows.into_iter().find(|s| s.message.reactions.len() == 1) {
            break row;
        }
        if started.elapsed() > Duration::from_secs(15) {
            // What the persister made of them, for the failure's message.
            let admin_nats =
                chatify_shared::bus::connect(&users.persister(&nats.url), "diag", Role::Persister)
                    .await;
            let mut seen = String::new();
            if let Ok(c) = admin_nats {
                let js = async_nats::jetstream::new(c);
                use chatify_shared::subjects::{
                    DEAD_LETTER_STREAM, MESSAGES_STREAM, PERSISTER_CONSUMER,
                };
                if let Ok(mut dl) = js.get_stream(DEAD_LETTER_STREAM).await {
                    seen += &format!(
                        "dead letters: {:?}; ",
                        dl.info().await.map(|i| i.state.messages)
                    );
                }
                if let Ok(stream) = js.get_stream(MESSAGES_STREAM).await {
                    seen += &format!(
                        "consumer: {:?}",
                        stream.consumer_info(PERSISTER_CONSUMER).await.map(|i| (
                            i.ack_floor,
                            i.num_ack_pending,
                            i.num_pending
                        ))
                    );
                }
            }
            let rows = db.states(std::slice::from_ref(&key)).await;
            return Err(format!("the changes were not written in 15 s: {rows:?}; {seen}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row.message.message, "stored, edited");
    let (logged, cut) = db.changes_after("least-privilege", 0, 10).await?;
    assert_eq!((logged.len(), cut), (2, false));

    // Its HarperDB user may not delete, change the schema, or read another database.
    let denied = db.delete(&["x".to_owned()]).await;
    assert!(
        matches!(denied, Err(HarperError::Forbidden { .. })),
        "{denied:?}"
    );
    let mut other = settings.harperdb.clone();
    other.database = format!("test_{}", Uuid::new_v4().simple());
    let denied = HarperDb::new(&other)?.ensure_schema().await;
    assert!(
        matches!(denied, Err(HarperError::Forbidden { .. })),
        "{denied:?}"
    );
    // Setup refuses to give the persister the admin's own user.
    let mut same = settings.harperdb.clone();
    same.username = same.admin_username.clone();
    assert!(matches!(
        setup::setup(&db, &same).await,
        Err(setup::SetupError::SameUser(_))
    ));

    persister.stop().await;
    drop_database(&admin).await;
    Ok(())
}

// --- Messages that change (issue 22) ---

/// Stores a change in the stream the way a gateway does (on the room's store subject, with the
/// change header): its stream sequence.
async fn publish_change(
    js: &async_nats::jetstream::Context,
    change: &chatify_shared::changes::StoredChange,
) -> Result<u64, Box<dyn std::error::Error>> {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        Uuid::new_v4().to_string().as_str(),
    );
    headers.insert(chatify_shared::changes::CHANGE_HEADER, "1");
    let ack = js
        .publish_with_headers(
            RoomToken::new(&change.room).store_subject(),
            headers,
            serde_json::to_vec(change)?.into(),
        )
        .await?
        .await?;
    Ok(ack.sequence)
}

fn actor(user: &str) -> chatify_shared::changes::Actor {
    chatify_shared::changes::Actor {
        member_id: format!("member-{user}"),
        username: user.to_owned(),
        user_id: Some(user.to_owned()),
    }
}

fn change_of(
    target: &ChatMessage,
    by: &str,
    what: chatify_shared::changes::Change,
) -> chatify_shared::changes::StoredChange {
    chatify_shared::changes::StoredChange {
        room: target.room.clone(),
        target: target.id,
        change: what,
        at: chatify_shared::id::now_millis(),
        by: actor(by),
    }
}

fn react(emoji: &str, add: bool) -> chatify_shared::changes::Change {
    chatify_shared::changes::Change::React {
        emoji: emoji.to_owned(),
        add,
        distinct_max: 20,
    }
}

fn edit(text: &str) -> chatify_shared::changes::Change {
    chatify_shared::changes::Change::Edit {
        message: text.to_owned(),
    }
}

fn authored(room: &str, text: &str, user: &str) -> StoredMessage {
    StoredMessage {
        user_id: Some(user.to_owned()),
        ..message(room, text)
    }
}

/// A room's messages and changes applied locally, in stream order: what every answer must
/// show.
#[derive(Default)]
struct Model {
    states: Vec<chatify_shared::changes::MessageState>,
    /// (sequence, target sequence, entry) of every change that did something.
    entries: Vec<(u64, u64, chatify_shared::changes::ChangeEntry)>,
}

impl Model {
    fn message(&mut self, m: &ChatMessage) {
        self.states
            .push(chatify_shared::changes::MessageState::new(m.clone()));
    }

    fn change(&mut self, sequence: u64, c: &chatify_shared::changes::StoredChange) {
        if let Some(state) = self.states.iter_mut().find(|s| s.message.id == c.target) {
            let outcome = state.apply(sequence, c);
            if let Some(entry) = chatify_shared::changes::ChangeEntry::of(c, &outcome) {
                self.entries.push((sequence, c.target_sequence(), entry));
            }
        }
    }

    fn messages(&self) -> Vec<ChatMessage> {
        self.states.iter().map(|s| s.message.clone()).collect()
    }

    /// The changes after `after` to messages at or before it, collapsed.
    fn changes_after(&self, after: u64) -> Vec<chatify_shared::changes::ChangeEntry> {
        let entries = self
            .entries
            .iter()
            .filter(|(s, t, _)| *s > after && *t <= after)
            .map(|(_, _, e)| e.clone())
            .collect();
        chatify_shared::changes::collapse(entries, HistoryQuery::CHANGES_MAX).0
    }
}

/// Publishes a room's messages and changes: three messages by `ann`, `bob` and `ann`, an edit,
/// reactions given and taken back, a deletion, then two more messages by `bob`.
async fn publish_changes(
    js: &async_nats::jetstream::Context,
    room: &str,
    model: &mut Model,
) -> Result<Vec<ChatMessage>, Box<dyn std::error::Error>> {
    let mut sent = Vec::new();
    for (text, user) in [("first", "ann"), ("second", "bob"), ("third", "ann")] {
        let m = publish(js, &authored(room, text, user)).await?;
        model.message(&m);
        sent.push(m);
    }
    let changes = [
        change_of(&sent[0], "ann", edit("first, edited")),
        change_of(&sent[1], "ann", react("👍", true)),
        change_of(&sent[1], "cat", react("👍", true)),
        change_of(&sent[1], "cat", react("🎉", true)),
        change_of(&sent[1], "ann", react("👍", false)),
        change_of(&sent[2], "ann", chatify_shared::changes::Change::Delete),
        change_of(&sent[0], "ann", edit("first, edited twice")),
    ];
    for c in &changes {
        let sequence = publish_change(js, c).await?;
        model.change(sequence, c);
    }
    for text in ["fourth", "fifth"] {
        let m = publish(js, &authored(room, text, "bob")).await?;
        model.message(&m);
        sent.push(m);
    }
    Ok(sent)
}

/// Reads the row of a message straight from HarperDB, as the admin.
async fn stored_row(
    settings: &Settings,
    m: &ChatMessage,
) -> Result<chatify_shared::storage::StoredRecord, Box<dyn std::error::Error>> {
    use chatify_shared::storage::{RoomKey, storage_key};
    use secrecy::ExposeSecret;
    let key = storage_key(&RoomKey::new(&m.room), m.sequence());
    let rows: Vec<chatify_shared::storage::StoredRecord> = reqwest::Client::new()
        .post(&settings.harperdb.url)
        .basic_auth(
            &settings.harperdb.username,
            Some(settings.harperdb.password.expose_secret()),
        )
        .json(&serde_json::json!({
            "operation": "search_by_hash",
            "database": settings.harperdb.database,
            "table": settings.harperdb.table,
            "hash_values": [key],
            "get_attributes": ["*"],
        }))
        .send()
        .await?
        .json()
        .await?;
    rows.into_iter()
        .next()
        .ok_or_else(|| format!("no row for {}", m.id).into())
}

/// Every answer the history service gives about a room shows it as `model` says: its pages,
/// lookups by ids (with `asOf` at or past `last`), the changes after a cursor, the unread
/// count of a user.
async fn assert_answers(
    client: &async_nats::Client,
    room: &str,
    model: &Model,
    sent: &[ChatMessage],
    last: u64,
) -> TestResult {
    let page = history(client, &query(room, 100)).await?;
    assert_eq!(page.messages, model.messages(), "the latest page");
    assert_eq!(page.messages[0].message, "first, edited twice");
    assert!(page.messages[0].edited_time.is_some());
    assert!(page.messages[2].deleted && page.messages[2].message.is_empty());
    assert_eq!(
        page.messages[1].reactions,
        std::collections::BTreeMap::from([("👍".to_owned(), 1), ("🎉".to_owned(), 1)])
    );
    let older = history(
        client,
        &HistoryQuery {
            before: Some(sent[3].id),
            ..query(room, 2)
        },
    )
    .await?;
    assert_eq!(
        older.messages,
        model.messages()[1..3].to_vec(),
        "a page back"
    );

    let ids = history(
        client,
        &HistoryQuery {
            ids: vec![sent[1].id, sent[2].id, sent[4].id],
            ..query(room, 1)
        },
    )
    .await?;
    let expected: Vec<_> = [1, 2, 4].iter().map(|&i| model.states[i].clone()).collect();
    assert_eq!(ids.states, expected, "states by ids, with who reacted");
    assert!(ids.as_of >= last, "asOf {} covers {last}", ids.as_of);
    assert!(ids.messages.is_empty());

    for cursor in [0usize, 1, 2, 3] {
        let since = history(
            client,
            &HistoryQuery {
                after: Some(sent[cursor].id),
                changes: true,
                ..query(room, 100)
            },
        )
        .await?;
        assert_eq!(
            since.changes,
            model.changes_after(sent[cursor].sequence()),
            "changes since message {cursor}"
        );
        assert!(!since.changes_cut);
        assert_eq!(since.messages, model.messages()[cursor + 1..].to_vec());
    }

    let unread = |user: &str, after: Option<Uuid>| HistoryQuery {
        unread: Some(chatify_shared::wire::UnreadQuery {
            user_id: user.to_owned(),
            after,
        }),
        ..query(room, 1)
    };
    // ann: bob's second, fourth and fifth (her own and the deleted one do not count).
    assert_eq!(history(client, &unread("ann", None)).await?.unread, Some(3));
    // bob after the second: the third is deleted, the rest his own.
    assert_eq!(
        history(client, &unread("bob", Some(sent[1].id)))
            .await?
            .unread,
        Some(0)
    );
    assert_eq!(
        history(client, &unread("cat", Some(sent[0].id)))
            .await?
            .unread,
        Some(3)
    );
    Ok(())
}

#[tokio::test]
async fn edits_deletions_and_reactions_are_written_and_shown_in_every_answer() -> TestResult {
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let room = "changing";
    let mut model = Model::default();
    let sent = publish_changes(&js, room, &mut model).await?;
    let last = sent.last().map(ChatMessage::sequence).unwrap_or_default();
    wait_until_written(&js).await?;

    // HarperDB holds each message as it is now.
    for (m, state) in sent.iter().zip(&model.states) {
        let row = stored_row(&settings, m).await?;
        assert_eq!(&row.into_state(), state, "row of {}", m.message);
    }
    assert_answers(&client, room, &model, &sent, last).await?;

    // A fresh persister (no recent messages in memory) answers the same.
    persister.stop().await;
    let persister = spawn_persister(settings.clone()).await?;
    assert_answers(&client, room, &model, &sent, last).await?;

    // And a change after that reaches the cached latest page at once.
    let c = change_of(&sent[3], "ann", react("👍", true));
    let sequence = publish_change(&js, &c).await?;
    model.change(sequence, &c);
    let page = history(&client, &query(room, 100)).await?;
    assert_eq!(page.messages, model.messages());

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

#[tokio::test]
async fn changes_not_written_yet_are_in_every_answer() -> TestResult {
    let nats = Nats::start().await?;
    let mut settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let room = "changing later";
    // Some messages written first, then a persister whose batches wait long to fill.
    let mut model = Model::default();
    for text in ["zero", "one"] {
        let m = publish(&js, &authored(room, text, "dan")).await?;
        model.message(&m);
    }
    wait_until_written(&js).await?;
    persister.stop().await;
    settings.persister.batch_size = 10_000;
    settings.persister.batch_wait_ms = 8000;
    let persister = spawn_persister(settings.clone()).await?;
    // The messages and changes of publish_changes, in a model of their own (after "zero" and
    // "one").
    let mut changed = Model::default();
    let started = Instant::now();
    let sent = publish_changes(&js, room, &mut changed).await?;
    let last = sent.last().map(ChatMessage::sequence).unwrap_or_default();
    let page = history(&client, &query(room, 100)).await?;
    let all: Vec<ChatMessage> = model
        .messages()
        .into_iter()
        .chain(changed.messages())
        .collect();
    assert_eq!(page.messages, all, "unwritten changes applied");
    let ids = history(
        &client,
        &HistoryQuery {
            ids: vec![sent[0].id, sent[1].id],
            ..query(room, 1)
        },
    )
    .await?;
    assert_eq!(ids.states, changed.states[..2].to_vec());
    assert!(ids.as_of >= last);
    let since = history(
        &client,
        &HistoryQuery {
            after: Some(sent[2].id),
            changes: true,
            ..query(room, 100)
        },
    )
    .await?;
    assert_eq!(since.changes, changed.changes_after(sent[2].sequence()));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered before the batch was written"
    );
    // Once written, the same answers.
    wait_until_written(&js).await?;
    let since_written = history(
        &client,
        &HistoryQuery {
            after: Some(sent[2].id),
            changes: true,
            ..query(room, 100)
        },
    )
    .await?;
    assert_eq!(since_written.changes, since.changes);
    assert_eq!(history(&client, &query(room, 100)).await?.messages, all);

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

/// Every event delivered again (the durable consumer deleted and made anew, so JetStream
/// delivers the whole stream once more): no change is applied twice, none logged twice.
#[tokio::test]
async fn redelivered_changes_are_applied_once() -> TestResult {
    use chatify_shared::subjects::{MESSAGES_STREAM, PERSISTER_CONSUMER};
    let nats = Nats::start().await?;
    let settings = settings(&nats)?;
    let persister = spawn_persister(settings.clone()).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let room = "again";
    let mut model = Model::default();
    let sent = publish_changes(&js, room, &mut model).await?;
    let last = sent.last().map(ChatMessage::sequence).unwrap_or_default();
    wait_until_written(&js).await?;
    persister.stop().await;

    let stream = js.get_stream(MESSAGES_STREAM).await?;
    stream.delete_consumer(PERSISTER_CONSUMER).await?;
    // No recent messages in memory: every answer below comes from HarperDB and the stream.
    let mut settings = settings;
    settings.persister.history_cache_bytes = 0;
    let persister = spawn_persister(settings.clone()).await?;
    let started = Instant::now();
    loop {
        let info = stream.consumer_info(PERSISTER_CONSUMER).await?;
        if info.ack_floor.stream_sequence >= last {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err(format!("not redelivered after 15 s: {info:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (m, state) in sent.iter().zip(&model.states) {
        let row = stored_row(&settings, m).await?;
        assert_eq!(&row.into_state(), state, "row of {}", m.message);
    }
    assert_answers(&client, room, &model, &sent, last).await?;
    // The change log holds each change that did something once.
    let logged = change_log(&settings).await?;
    let mut sequences: Vec<u64> = logged.iter().map(|r| r.sequence).collect();
    sequences.sort_unstable();
    let expected: Vec<u64> = model.entries.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(sequences, expected);

    persister.stop().await;
    drop_database(&settings).await;
    Ok(())
}

/// The whole change log table, as the admin reads it.
async fn change_log(
    settings: &Settings,
) -> Result<Vec<chatify_shared::storage::StoredChangeRecord>, Box<dyn std::error::Error>> {
    use secrecy::ExposeSecret;
    let table = chatify_shared::storage::changes_table(&settings.harperdb.table);
    let sql = format!("SELECT * FROM `{}`.`{table}`", settings.harperdb.database);
    Ok(reqwest::Client::new()
        .post(&settings.harperdb.url)
        .basic_auth(
            &settings.harperdb.username,
            Some(settings.harperdb.password.expose_secret()),
        )
        .json(&serde_json::json!({"operation": "sql", "sql": sql}))
        .send()
        .await?
        .json()
        .await?)
}
