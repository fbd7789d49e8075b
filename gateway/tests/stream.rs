//! The messages stream against a real nats-server: what delivery order rests on.

use std::time::Duration;

use chatify_shared::bus;
use chatify_shared::config::StreamSettings;
use chatify_shared::subjects::RoomToken;
use chatify_shared::testing::NatsServer;
use futures::StreamExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two publishers race into one room; every subscriber of the room gets each stored message
/// once, in stream order, with its stream sequence: the order history has.
#[tokio::test]
async fn stored_messages_are_republished_to_the_room_in_stream_order() -> TestResult {
    let server = NatsServer::start().await?;
    let a = async_nats::connect(&server.url).await?;
    let b = async_nats::connect(&server.url).await?;
    let js_a = async_nats::jetstream::new(a.clone());
    let js_b = async_nats::jetstream::new(b.clone());
    bus::ensure_messages_stream(&js_a, &StreamSettings::default()).await?;
    let room = RoomToken::new("a.b *>");
    let other = RoomToken::new("a");
    let mut subscriber = a.subscribe(room.room_wildcard()).await?;
    let mut other_room = b.subscribe(other.room_wildcard()).await?;

    let send = |js: async_nats::jetstream::Context, who: &'static str| {
        let subject = room.store_subject();
        async move {
            let mut acks = Vec::new();
            for i in 0..200 {
                let ack = js
                    .publish(subject.clone(), format!("{who}{i}").into())
                    .await?
                    .await?;
                acks.push(ack.sequence);
            }
            Ok::<_, Box<dyn std::error::Error>>(acks)
        }
    };
    let (acks_a, acks_b) = tokio::try_join!(send(js_a, "a"), send(js_b, "b"))?;
    assert_eq!(acks_a.len() + acks_b.len(), 400);

    let mut sequences = Vec::new();
    while sequences.len() < 400 {
        let m = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await?
            .ok_or("subscription ended")?;
        assert_eq!(m.subject.as_str(), room.message_subject());
        let seq: u64 = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .ok_or("no Nats-Sequence header")?
            .as_str()
            .parse()?;
        sequences.push(seq);
    }
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    assert_eq!(sequences, sorted, "republished out of stream order");
    let mut acked: Vec<u64> = acks_a.into_iter().chain(acks_b).collect();
    acked.sort_unstable();
    assert_eq!(sequences, acked);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other_room.next())
            .await
            .is_err(),
        "another room's subscriber got a message"
    );
    Ok(())
}

/// A stream made before republishing existed cannot get it by an update: starting refuses with
/// a clear error instead of running without delivery.
#[tokio::test]
async fn a_messages_stream_without_republish_is_refused_clearly() -> TestResult {
    let server = NatsServer::start().await?;
    let client = async_nats::connect(&server.url).await?;
    let js = async_nats::jetstream::new(client);
    let settings = StreamSettings::default();
    let mut old = bus::messages_stream_config(&settings);
    old.republish = None;
    js.create_stream(old).await?;
    js.publish(RoomToken::new("r").store_subject(), "x".into())
        .await?
        .await?;
    match bus::ensure_messages_stream(&js, &settings).await {
        Err(e @ bus::BusError::MessagesStreamWithoutRepublish { last_sequence: 1 }) => {
            assert!(e.to_string().contains("first_seq"), "{e}");
        }
        Err(e) => return Err(format!("another error: {e}").into()),
        Ok(_) => return Err("an old stream was accepted".into()),
    }
    Ok(())
}
