//! A message JetStream delivered to the writer: where the stream holds it (which makes its id),
//! what it says, and its acks. The writer works on [`Delivery`] rather than on JetStream's
//! message type, so that its tests can hand it messages without a NATS server.

use std::future::Future;
use std::time::Duration;

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

    /// The stored message or change, as JSON.
    fn payload(&self) -> &Bytes;

    /// Whether it is a change rather than a message (its [`crate::event::is_change`] header).
    fn is_change(&self) -> bool;

    /// Acks it: it is written (or moved aside), and JetStream may count it done. A lost ack
    /// only means a redelivery, which the idempotent insert skips; so a failure is logged only.
    fn ack(&self) -> impl Future<Output = ()> + Send;

    /// Tells JetStream never to deliver it again: it cannot be decoded.
    fn terminate(&self) -> impl Future<Output = ()> + Send;

    /// Tells JetStream it is still being worked on, so its ack deadline starts over.
    fn in_progress(&self) -> impl Future<Output = ()> + Send;

    /// Hands it back unwritten: JetStream delivers it again (to any persister) after `delay`.
    fn nak(&self, delay: Duration) -> impl Future<Output = ()> + Send;
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

    fn is_change(&self) -> bool {
        crate::event::is_change(self.headers.as_ref())
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

    async fn nak(&self, delay: Duration) {
        if let Err(e) = self.ack_with(AckKind::Nak(Some(delay))).await {
            // Not handed back: JetStream redelivers it after the ack wait instead.
            tracing::debug!(error = %e, "nak failed");
        }
    }
}
