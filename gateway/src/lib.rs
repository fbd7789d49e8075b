//! The Chatify gateway: a stateless Socket.IO v4 server. It validates client events, stores
//! messages in NATS JetStream, and fans them out to its own sockets in each room; every other
//! gateway with members in the room does the same, so no chat state lives only here.

pub mod access;
pub mod address_limit;
pub mod answer;
pub mod auth;
pub mod bus;
pub mod changes;
pub mod connections;
pub mod delivery;
pub mod dm;
pub mod error;
pub mod expiry;
pub mod forward;
pub mod handlers;
pub mod history;
pub mod http;
pub mod lifecycle;
pub mod liveness;
pub mod metrics;
pub mod order;
pub mod payload;
pub mod presence;
pub mod reads;
pub mod registry;
pub mod session;
pub mod startup;
pub mod state;
pub mod states;
pub mod tcp;
pub mod turns;
pub mod users;
