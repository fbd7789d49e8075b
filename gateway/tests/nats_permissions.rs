//! NATS with Chatify's users and permissions (deploy/nats/start.sh with nats.conf and
//! permissions.conf, as deploy/local/up.sh and compose run it): a connection without
//! credentials is refused; a gateway and a persister can do their work; the gateway's
//! credentials cannot delete or purge the messages stream, answer history queries, publish dead
//! letters, read through the persister's consumer or forge stored messages; the persister's
//! cannot store messages or speak in rooms.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use chatify_gateway::startup::Application;
use chatify_shared::Settings;
use chatify_shared::bus;
use chatify_shared::config::StreamSettings;
use chatify_shared::subjects::{
    DEAD_LETTER_STREAM, HISTORY_SUBJECT, MESSAGES_STREAM, PERSISTER_CONSUMER, PRESENCE_STREAM,
    Role, RoomToken, dead_letter_subject,
};
use chatify_shared::testing::{GATEWAY_USER, NatsServer, PERSISTER_USER, Users};
use chatify_shared::wire::HistoryPage;
use futures::StreamExt;
use serde_json::json;
use support::{Client, Error, TestResult, WAIT};
use tokio::sync::mpsc;

/// How long a test waits to be sure something does not happen.
const QUIET: Duration = Duration::from_millis(700);

/// A client logged in as `user`, with the inbox prefix of `role`, that reports the server's
/// errors (permission violations) on the returned channel.
async fn login(
    server: &NatsServer,
    user: &str,
    password: &str,
    role: Role,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>), Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(role.inbox_prefix())
        .request_timeout(Some(Duration::from_secs(1)))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(&server.url)
        .await?;
    Ok((client, rx))
}

/// Waits for the server to report a permission violation naming `subject`.
async fn violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) -> TestResult {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(error) = errors.recv().await {
            if error.to_lowercase().contains("permissions violation") && error.contains(subject) {
                return true;
            }
        }
        false
    })
    .await;
    match found {
        Ok(true) => Ok(()),
        _ => Err(format!("no permission violation reported for {subject}").into()),
    }
}

/// The persister's part: the streams and the durable consumer it owns.
async fn persister_setup(server: &NatsServer, users: &Users) -> Result<jetstream::Context, Error> {
    let nats = bus::connect(
        &users.persister(&server.url),
        "test-persister",
        Role::Persister,
    )
    .await?;
    let js = jetstream::new(nats);
    let stream = bus::ensure_messages_stream(&js, &StreamSettings::default()).await?;
    bus::ensure_dead_letter_stream(&js, 1).await?;
    stream
        .get_or_create_consumer(
            PERSISTER_CONSUMER,
            pull::Config {
                durable_name: Some(PERSISTER_CONSUMER.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    Ok(js)
}

#[tokio::test]
async fn a_connection_without_credentials_or_with_a_wrong_password_is_refused() -> TestResult {
    let (server, users) = NatsServer::start_with_users().await?;
    let anonymous = async_nats::connect(&server.url)
        .await
        .err()
        .ok_or("an anonymous client was let in")?;
    assert_eq!(
        anonymous.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "{anonymous}"
    );
    // Nor through the settings without credentials.
    let mut settings = users.gateway(&server.url);
    settings.user.clear();
    settings.password = String::new().into();
    assert!(bus::connect(&settings, "t", Role::Gateway).await.is_err());
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        GATEWAY_USER.into(),
        format!("{}x", users.gateway_password),
    )
    .connect(&server.url)
    .await;
    assert!(wrong.is_err(), "a wrong password was let in");
    // Each service's own settings log in.
    bus::connect(&users.gateway(&server.url), "t", Role::Gateway).await?;
    bus::connect(&users.persister(&server.url), "t", Role::Persister).await?;
    Ok(())
}

/// `nats.url` names every node of a cluster, comma separated: a client connects to one that
/// answers (here the second, the first has no server).
#[tokio::test]
async fn every_url_of_a_comma_separated_list_is_tried() -> TestResult {
    let (server, users) = NatsServer::start_with_users().await?;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let list = format!("nats://127.0.0.1:{nobody}, {}", server.url);
    let nats = bus::connect(&users.gateway(&list), "t", Role::Gateway).await?;
    nats.flush().await?;
    assert_eq!(
        nats.connection_state(),
        async_nats::connection::State::Connected
    );
    Ok(())
}

/// A persister and a gateway with their own credentials do their work: the persister creates
/// its streams and consumer and answers history; the gateway starts, stores a message that its
/// room receives, and gets history.
#[tokio::test]
async fn each_service_can_do_its_work() -> TestResult {
    let (server, users) = NatsServer::start_with_users().await?;
    let js = persister_setup(&server, &users).await?;
    // The persister's history service: its answers go to the gateway's inbox (allow_responses).
    let (persister, mut errors) = login(
        &server,
        PERSISTER_USER,
        &users.persister_password,
        Role::Persister,
    )
    .await?;
    let mut queries = persister
        .queue_subscribe(HISTORY_SUBJECT, "q".into())
        .await?;
    persister.flush().await?;
    let answering = persister.clone();
    tokio::spawn(async move {
        while let Some(query) = queries.next().await {
            let empty = HistoryPage::default();
            if let (Some(reply), Ok(payload)) = (query.reply, serde_json::to_vec(&empty)) {
                let _ = answering.publish(reply, payload.into()).await;
            }
        }
    });

    let mut settings = Settings {
        nats: users.gateway(&server.url),
        ..Default::default()
    };
    settings.nats.request_timeout_ms = 2000;
    settings.gateway.port = 0;
    let app = Application::build(settings).await?;
    let addr = app.local_addr()?;
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let mut ann = Client::connect(addr, None).await?;
    let ack = ann
        .ack("join_room", json!({"room": "perm", "username": "ann"}))
        .await?;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let ack = ann
        .ack(
            "send_message",
            json!({"room": "perm", "message": "hello", "clientId": "c1"}),
        )
        .await?;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    ann.wait_for("receive_message", |m| m["message"] == "hello")
        .await?;
    // A retry: the gateway reads the first message back (STREAM.MSG.GET).
    let again = ann
        .ack(
            "send_message",
            json!({"room": "perm", "message": "hello", "clientId": "c1"}),
        )
        .await?;
    assert_eq!(again["ok"], json!(true), "{again}");
    assert_eq!(again["message"]["id"], ack["message"]["id"], "{again}");
    let history = ann
        .ack("get_history", json!({"room": "perm", "limit": 10}))
        .await?;
    assert_eq!(history["ok"], json!(true), "{history}");
    assert_eq!(
        js.get_stream(MESSAGES_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages,
        1
    );
    // The persister's dead letters are stored.
    let dead = dead_letter_subject(&RoomToken::new("perm").store_subject());
    let ack = js.publish(dead, "{}".into()).await?.await?;
    assert_eq!(ack.stream, DEAD_LETTER_STREAM);
    // Nothing either side did was refused.
    tokio::time::sleep(QUIET).await;
    assert!(
        errors.try_recv().is_err(),
        "the persister was refused something"
    );
    Ok(())
}

#[tokio::test]
async fn the_gateways_credentials_cannot_do_the_persisters_work_or_destroy_the_stream() -> TestResult
{
    let (server, users) = NatsServer::start_with_users().await?;
    let persister_js = persister_setup(&server, &users).await?;
    let (gateway, mut errors) = login(
        &server,
        GATEWAY_USER,
        &users.gateway_password,
        Role::Gateway,
    )
    .await?;
    let js = jetstream::new(gateway.clone());
    let room = RoomToken::new("perm");

    // Allowed: storing a message.
    let ack = js.publish(room.store_subject(), "{}".into()).await?.await?;
    assert_eq!(ack.stream, MESSAGES_STREAM);

    // Not allowed: deleting or purging the messages stream, deleting any stream.
    for stream in [MESSAGES_STREAM, DEAD_LETTER_STREAM, PRESENCE_STREAM] {
        assert!(js.delete_stream(stream).await.is_err(), "deleted {stream}");
        violation(&mut errors, &format!("$JS.API.STREAM.DELETE.{stream}")).await?;
    }
    let messages = js.get_stream(MESSAGES_STREAM).await?;
    assert!(
        messages.purge().await.is_err(),
        "purged the messages stream"
    );
    violation(&mut errors, "$JS.API.STREAM.PURGE.CHATIFY_MESSAGES").await?;
    let mut config = bus::messages_stream_config(&StreamSettings::default());
    config.max_age = Duration::from_secs(1);
    assert!(
        js.update_stream(config).await.is_err(),
        "changed the stream"
    );
    violation(&mut errors, "$JS.API.STREAM.UPDATE.CHATIFY_MESSAGES").await?;

    // Not allowed: the persister's consumer (reading, and so acking, its messages).
    assert!(
        messages
            .get_consumer::<pull::Config>(PERSISTER_CONSUMER)
            .await
            .is_err(),
        "read the persister's consumer"
    );
    violation(
        &mut errors,
        "$JS.API.CONSUMER.INFO.CHATIFY_MESSAGES.chatify-persister",
    )
    .await?;
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{MESSAGES_STREAM}.{PERSISTER_CONSUMER}");
    assert!(
        gateway
            .request(next.clone(), r#"{"batch":1}"#.into())
            .await
            .is_err(),
        "fetched from the persister's consumer"
    );
    violation(&mut errors, &next).await?;
    let ack_subject = format!("$JS.ACK.{MESSAGES_STREAM}.{PERSISTER_CONSUMER}.1.1.1.0.0");
    gateway.publish(ack_subject.clone(), "+ACK".into()).await?;
    violation(&mut errors, &ack_subject).await?;
    let info = persister_js
        .get_stream(MESSAGES_STREAM)
        .await?
        .consumer_info(PERSISTER_CONSUMER)
        .await?;
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "an ack from a gateway counted"
    );
    assert_eq!(info.num_pending, 1);

    // Not allowed: answering history queries, reading the persister's replies.
    gateway.subscribe(HISTORY_SUBJECT).await?;
    violation(&mut errors, HISTORY_SUBJECT).await?;
    gateway.subscribe("_INBOX_chatify_persister.>").await?;
    violation(&mut errors, "_INBOX_chatify_persister.>").await?;

    // Not allowed: dead letters, and messages that look stored without being stored.
    let dead = dead_letter_subject(&room.store_subject());
    gateway.publish(dead.clone(), "{}".into()).await?;
    violation(&mut errors, &dead).await?;
    let (persister, _) = login(
        &server,
        PERSISTER_USER,
        &users.persister_password,
        Role::Persister,
    )
    .await?;
    let (listener, _) = login(
        &server,
        GATEWAY_USER,
        &users.gateway_password,
        Role::Gateway,
    )
    .await?;
    let mut room_events = listener.subscribe(room.room_wildcard()).await?;
    listener.flush().await?;
    gateway
        .publish(room.message_subject(), r#"{"forged":true}"#.into())
        .await?;
    violation(&mut errors, &room.message_subject()).await?;
    assert!(
        tokio::time::timeout(QUIET, room_events.next())
            .await
            .is_err(),
        "a forged stored message reached the room"
    );
    let dead_letters = jetstream::new(persister)
        .get_stream(DEAD_LETTER_STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(dead_letters, 0, "a gateway wrote a dead letter");
    Ok(())
}

#[tokio::test]
async fn the_persisters_credentials_cannot_store_messages_or_speak_in_rooms() -> TestResult {
    let (server, users) = NatsServer::start_with_users().await?;
    persister_setup(&server, &users).await?;
    let (persister, mut errors) = login(
        &server,
        PERSISTER_USER,
        &users.persister_password,
        Role::Persister,
    )
    .await?;
    let (listener, _) = login(
        &server,
        GATEWAY_USER,
        &users.gateway_password,
        Role::Gateway,
    )
    .await?;
    let room = RoomToken::new("perm");
    let mut room_events = listener.subscribe(room.room_wildcard()).await?;
    listener.flush().await?;

    let js = jetstream::new(persister.clone());
    let stored = async { js.publish(room.store_subject(), "{}".into()).await?.await };
    assert!(stored.await.is_err(), "the persister stored a message");
    violation(&mut errors, &room.store_subject()).await?;
    for subject in [
        room.presence_subject(),
        room.typing_subject(),
        room.message_subject(),
        "chatify.presence.x.y.z".to_owned(),
        "chatify.gateways.dead".to_owned(),
    ] {
        persister.publish(subject.clone(), "{}".into()).await?;
        violation(&mut errors, &subject).await?;
    }
    assert!(
        tokio::time::timeout(QUIET, room_events.next())
            .await
            .is_err(),
        "the persister reached a room"
    );
    assert!(js.delete_stream(MESSAGES_STREAM).await.is_err());
    violation(&mut errors, "$JS.API.STREAM.DELETE.CHATIFY_MESSAGES").await?;
    assert_eq!(
        js.get_stream(MESSAGES_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages,
        0
    );
    Ok(())
}

/// A gateway may not create the messages stream: without a persister it waits, then says so.
#[tokio::test]
async fn a_gateway_without_the_messages_stream_says_a_persister_must_create_it() -> TestResult {
    let (server, users) = NatsServer::start_with_users().await?;
    let nats = bus::connect(&users.gateway(&server.url), "t", Role::Gateway).await?;
    let js = jetstream::new(nats);
    match bus::open_messages_stream(&js, Duration::from_millis(300)).await {
        Err(e @ bus::BusError::MessagesStreamMissing { .. }) => {
            assert!(e.to_string().contains("start a persister"), "{e}");
        }
        other => return Err(format!("not the missing stream: {:?}", other.err()).into()),
    }
    assert!(
        bus::ensure_messages_stream(&js, &StreamSettings::default())
            .await
            .is_err(),
        "a gateway created the messages stream"
    );
    Ok(())
}
