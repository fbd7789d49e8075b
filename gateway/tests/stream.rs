//! The messages stream against a real nats-server: what delivery order rests on.

use std::time::Duration;

use chatify_shared::bus;
use chatify_shared::config::StreamSettings;
use chatify_shared::subjects::RoomToken;
use chatify_shared::testing::NatsServer;
use futures::StreamExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two publishers race into one room; a subscriber of the room gets each stored message once,
/// with its stream sequence and the sequence of the room's message before it, so the room's
/// messages form one chain in stream order (the order history has). nats-server 2.9 may hand two
/// of them over swapped; the chain is what lets a gateway put them back (see `order.rs`).
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
    // The server has both subscriptions before anything is published.
    a.flush().await?;
    b.flush().await?;
    // nats-server 2.9 sometimes does not republish the very first message a new stream stores
    // (seen 2 runs in 8); a message to a third room first keeps that quirk out of this test.
    js_a.publish(RoomToken::new("warm-up").store_subject(), "w".into())
        .await?
        .await?;

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

    let mut chain = Vec::new();
    while chain.len() < 400 {
        let m = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await
            .map_err(|_| format!("only {} of 400 republished: {chain:?}", chain.len()))?
            .ok_or("subscription ended")?;
        assert_eq!(m.subject.as_str(), room.message_subject());
        let header = |name| -> Result<u64, Box<dyn std::error::Error>> {
            Ok(m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .ok_or(format!("no {name} header"))?
                .as_str()
                .parse()?)
        };
        chain.push((header("Nats-Sequence")?, header("Nats-Last-Sequence")?));
    }
    chain.sort_unstable();
    let sequences: Vec<u64> = chain.iter().map(|&(seq, _)| seq).collect();
    let mut acked: Vec<u64> = acks_a.into_iter().chain(acks_b).collect();
    acked.sort_unstable();
    assert_eq!(sequences, acked, "every stored message once");
    assert_eq!(chain[0].1, 0, "the room's first message has no predecessor");
    assert_eq!(chain[0].0, 2, "the warm-up message took sequence 1");
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].1, pair[0].0,
            "each message names the room's previous one"
        );
    }
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
