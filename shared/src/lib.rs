//! Everything the Chatify gateway and persister must agree on: the wire types clients and
//! services exchange, the NATS subject and stream names, how messages are kept in HarperDB,
//! configuration and tracing setup.
//!
//! NATS subjects are built only here (see [`subjects`]); call sites never format subject strings.

pub mod bus;
pub mod changes;
pub mod config;
pub mod healthcheck;
pub mod id;
pub mod serve;
pub mod shutdown;
pub mod storage;
pub mod subjects;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use config::Settings;
