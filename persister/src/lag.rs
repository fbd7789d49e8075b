//! The consumer-lag gauge: how many messages JetStream holds that no persister has written
//! yet, read from the durable consumer every few seconds.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoError;
use async_nats::jetstream::stream::Stream;
use chatify_shared::subjects::PERSISTER_CONSUMER;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// How often the gauge is brought up to date.
const EVERY: Duration = Duration::from_secs(5);

/// Messages not yet written: not yet delivered, plus delivered but not yet acked (acks come
/// only after the write).
pub async fn unwritten(stream: &Stream) -> Result<u64, ConsumerInfoError> {
    let info = stream.consumer_info(PERSISTER_CONSUMER).await?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

/// Keeps the gauge current until `shutdown`.
pub async fn report(stream: Stream, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match unwritten(&stream).await {
            Ok(n) => metrics::gauge!(m::CONSUMER_PENDING).set(n as f64),
            Err(e) => tracing::debug!(error = %e, "consumer info unavailable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use chatify_shared::config::StreamSettings;
    use chatify_shared::testing::NatsServer;
    use futures::StreamExt;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A nats-server (stopped on drop) with the messages stream.
    async fn messages_stream()
    -> Result<(NatsServer, async_nats::jetstream::Context, Stream), Box<dyn std::error::Error>>
    {
        let nats = NatsServer::start().await?;
        let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await?);
        let stream =
            chatify_shared::bus::ensure_messages_stream(&js, &StreamSettings::default()).await?;
        Ok((nats, js, stream))
    }

    #[tokio::test]
    async fn unwritten_counts_undelivered_and_unacked_messages() -> TestResult {
        let (_nats, js, stream) = messages_stream().await?;
        let consumer = stream
            .get_or_create_consumer(PERSISTER_CONSUMER, crate::consumer::consumer_config())
            .await?;
        let subject = chatify_shared::subjects::RoomToken::new("r").store_subject();
        for _ in 0..3 {
            js.publish(subject.clone(), "{}".into()).await?.await?;
        }
        assert_eq!(unwritten(&stream).await?, 3);
        // One delivered, not acked: still unwritten.
        let mut batch = consumer.fetch().max_messages(1).messages().await?;
        let first = batch
            .next()
            .await
            .ok_or("nothing delivered")?
            .map_err(|e| e.to_string())?;
        assert_eq!(unwritten(&stream).await?, 3);
        first.ack().await.map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        while unwritten(&stream).await? != 2 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the ack never counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_reporter_stops_on_shutdown() -> TestResult {
        let (_nats, _js, stream) = messages_stream().await?;
        let shutdown = CancellationToken::new();
        let reporter = tokio::spawn(report(stream, shutdown.clone()));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), reporter).await??;
        Ok(())
    }
}
