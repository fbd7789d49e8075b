//! The durable consumer's ack floor: the stream sequence at or below which every event is
//! acked. Acks come only after the write, so everything at or below the floor is in HarperDB.
//! History reads it to know where the unwritten tail starts ([`crate::unwritten`]); the writer
//! waits for it before it applies changes ([`crate::batch`]), which is what puts every change
//! after everything stored before it, across lanes and persisters, without any lock.

use std::future::Future;

use async_nats::jetstream::stream::Stream;
use chatify_shared::subjects::PERSISTER_CONSUMER;

/// The floor could not be read (NATS did not answer).
#[derive(Debug, thiserror::Error)]
#[error("could not read the consumer's progress: {0}")]
pub struct FloorError(pub String);

/// Where the ack floor is read: the consumer's info, or a fake in tests.
pub trait AckFloor: Clone + Send + Sync + 'static {
    /// The stream sequence up to which every event is acked.
    fn floor(&self) -> impl Future<Output = Result<u64, FloorError>> + Send;
}

impl AckFloor for Stream {
    async fn floor(&self) -> Result<u64, FloorError> {
        match self.consumer_info(PERSISTER_CONSUMER).await {
            Ok(info) => Ok(info.ack_floor.stream_sequence),
            Err(e) => Err(FloorError(e.to_string())),
        }
    }
}
