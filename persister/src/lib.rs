//! The Chatify persister: a durable JetStream consumer that writes messages to HarperDB in
//! batches, and the NATS service that answers history queries from HarperDB.
//!
//! The writer's parts: [`consumer`] cuts the stream into batches and hands each to a free lane
//! ([`lanes`]), which writes it ([`batch`]) with retries ([`retry`]), moving what HarperDB
//! refuses to the dead-letter stream ([`dead_letter`]); [`lag`] reports how far behind it is.
//! The stream holds messages and changes to them ([`event`]); changes are applied in the
//! stream's order, after the consumer's ack floor ([`floor`]) passed everything before them;
//! they wait for it beside the lanes ([`waiting`]).

pub mod batch;
pub mod consumer;
pub mod dead_letter;
pub mod delivery;
pub mod event;
#[cfg(test)]
mod fakes;
pub mod floor;
pub mod harperdb;
pub mod history;
pub mod http;
pub mod lag;
pub mod lanes;
pub mod metrics;
pub mod migrate;
pub mod recent;
pub mod retry;
pub mod setup;
pub mod startup;
pub mod unwritten;
pub mod waiting;
