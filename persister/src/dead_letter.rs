//! The dead-letter stream: where a message (or a change) HarperDB refuses for good goes, so that
//! the messages around it are written and it can still be inspected. It keeps the message as it
//! was stored, with why HarperDB refused it and its sequence in the messages stream in headers,
//! and a change keeps its [`CHANGE_HEADER`] header, so it is read back as the change it is.

use std::future::Future;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use chatify_shared::changes::CHANGE_HEADER;
use chatify_shared::subjects::{
    DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SEQUENCE_HEADER, dead_letter_subject,
};
use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::harperdb::HarperError;
use crate::metrics as m;
use crate::retry::Retry;

/// Where dead letters are published: JetStream, or a fake in tests.
pub trait Publisher: Clone + Send + Sync + 'static {
    /// Publishes and waits until the stream has stored it.
    fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), async_nats::Error>> + Send;
}

impl Publisher for jetstream::Context {
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        self.publish_with_headers(subject, headers, payload)
            .await?
            .await?;
        Ok(())
    }
}

/// Moves refused messages to the dead-letter stream.
#[derive(Clone)]
pub struct DeadLetters<P> {
    /// The dead-letter stream.
    publisher: P,
    /// How a failed publish is retried.
    retry: Retry,
}

impl<P: Publisher> DeadLetters<P> {
    pub fn new(publisher: P, retry: Retry) -> Self {
        Self { publisher, retry }
    }

    /// Publishes `message` to the dead-letter stream, retrying until it is stored there, then
    /// acks it. Returns false if shutdown came first: the message stays unacked and comes back.
    pub async fn move_aside<D: Delivery>(
        &self,
        message: &D,
        reason: &HarperError,
        shutdown: &CancellationToken,
    ) -> bool {
        let subject = dead_letter_subject(message.subject());
        let mut headers = HeaderMap::new();
        headers.insert(DEAD_LETTER_REASON_HEADER, reason.to_string().as_str());
        if let Ok(sequence) = message.stream_sequence() {
            headers.insert(DEAD_LETTER_SEQUENCE_HEADER, sequence.to_string().as_str());
        }
        if message.is_change() {
            headers.insert(CHANGE_HEADER, crate::event::CHANGE_HEADER_VALUE);
        }
        let mut backoff = self.retry.backoff();
        loop {
            let published = self
                .publisher
                .publish(subject.clone(), headers.clone(), message.payload().clone())
                .await;
            match published {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "could not dead-letter a message; retrying"),
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
        tracing::error!(%subject, error = %reason, "message refused by HarperDB moved to the dead-letter stream");
        metrics::counter!(m::DEAD_LETTERED).increment(1);
        message.ack().await;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatify_shared::config::PersisterSettings;

    use super::*;
    use crate::fakes::{Event, FakeDelivery, FakePublisher, Log, refusal, shutdown_after};

    fn retry() -> Retry {
        Retry::new(&PersisterSettings::default(), Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_message_is_published_with_its_reason_then_acked() {
        let log = Log::default();
        let letters = DeadLetters::new(FakePublisher::new(&log).failing(2), retry());
        let message = FakeDelivery::new(&log, 7, "poison");
        assert!(
            letters
                .move_aside(&message, &refusal(), &CancellationToken::new())
                .await
        );
        assert_eq!(
            log.events(),
            vec![
                Event::DeadLettered {
                    subject: dead_letter_subject(message.subject()),
                    reason: refusal().to_string(),
                    sequence: "7".into(),
                    change: false,
                },
                Event::Acked(7),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_the_stream_fails_leaves_the_message_unacked() {
        let log = Log::default();
        let letters = DeadLetters::new(FakePublisher::new(&log).failing(usize::MAX), retry());
        let shutdown = shutdown_after(Duration::from_secs(5));
        let message = FakeDelivery::new(&log, 7, "poison");
        assert!(!letters.move_aside(&message, &refusal(), &shutdown).await);
        assert_eq!(log.events(), vec![]);
    }
}
