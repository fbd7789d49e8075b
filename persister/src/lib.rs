//! The Chatify persister: a durable JetStream consumer that writes messages to HarperDB in
//! batches, and the NATS service that answers history queries from HarperDB.

pub mod harperdb;
pub mod history;
pub mod http;
pub mod metrics;
pub mod recent;
pub mod spread;
pub mod startup;
pub mod unwritten;
pub mod writer;
