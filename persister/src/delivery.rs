//! A message JetStream delivered to the writer: where the stream holds it (which makes its id),
//! what it says, and its acks. The writer works on [`Delivery`] rather than on JetStream's
//! message type, so that its tests can hand it messages without a NATS server.

use std::future::Future;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;

pub trait Delivery: Send + Sync + 'static {
    /// The message's sequence in the messages stream; an error when it was not delivered by
    /// JetStream (then it cannot be acked either).
    fn stream_sequence(&self) -> Result<u64, async_nats::Error>;

    /// Whether JetStream delivered it before.
    fn redelivered(&self) -> bool;

    /// The subject it was stored under (its room's store subject).
    fn subject(&self) -> &str;

    /// The stored message, as JSON.
    fn payload(&self) -> &Bytes;

    /// Acks it: it is written (or moved aside), and JetStream may count it done. A lost ack
    /// only means a redelivery, which the idempotent insert skips; so a failure is logged only.
    fn ack(&self) -> impl Future<Output = ()> + Send;

    /// Tells JetStream never to deliver it again: it cannot be decoded.
    fn terminate(&self) -> impl Future<Output = ()> + Send;

    /// Tells JetStream it is still being worked on, so its ack deadline starts over.
    fn in_progress(&self) -> impl Future<Output = ()> + Send;
}

impl Delivery for jetstream::Message {
    fn stream_sequence(&self) -> Result<u64, async_nats::Error> {
        self.info().map(|info| info.stream_sequence)
    }

    fn redelivered(&self) -> bool {
        self.info().is_ok_and(|info| info.delivered > 1)
    }

    fn subject(&self) -> &str {
        self.subject.as_str()
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    async fn ack(&self) {
        if let Err(e) = jetstream::Message::ack(self).await {
            tracing::warn!(error = %e, "ack failed after a successful write");
        }
    }

    async fn terminate(&self) {
        if let Err(e) = self.ack_with(AckKind::Term).await {
            tracing::warn!(error = %e, "could not terminate an undecodable message");
        }
    }

    async fn in_progress(&self) {
        if let Err(e) = self.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "progress ack failed");
        }
    }
}
