//! Publishing straight into JetStream, the way a gateway stores a `send_message`: the
//! persister's own lag and throughput, without WebSocket clients and gateways on the same
//! cores (the persister scenario with `--nats-url`).

use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishAckFuture};
use chatify_shared::config::NatsSettings;
use chatify_shared::id::message_id;
use chatify_shared::subjects::{Role, RoomToken};
use chatify_shared::wire::StoredMessage;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use crate::client::AckedSend;
use crate::proto;
use crate::stats::{Stats, now_ns};

/// One message to publish: its room and when it was due.
pub struct Due {
    pub room: Arc<str>,
    pub sched_ns: u64,
}

/// A published message waiting for JetStream's ack.
struct InFlight {
    room: Arc<str>,
    sched_ns: u64,
    created_time: i64,
}

/// Connects to NATS and starts the publishing task: every [`Due`] sent to the returned channel
/// (and counted as sent by the caller) is published to its room's store subject; each
/// JetStream ack counts as an acked send (with the message id a gateway would have answered)
/// and goes to `sink`. The task ends when the channel is closed and every ack is in.
pub async fn start(
    nats: NatsSettings,
    stats: &Arc<Stats>,
    size: usize,
    sink: mpsc::UnboundedSender<AckedSend>,
) -> anyhow::Result<mpsc::UnboundedSender<Due>> {
    // As a gateway: only gateways may publish to the store subjects (deploy/nats/permissions.conf).
    let client = chatify_shared::bus::connect(&nats, "chatify-loadgen", Role::Gateway)
        .await
        .with_context(|| format!("connecting to NATS at {}", nats.url))?;
    let js = jetstream::new(client);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(publish(js, stats.clone(), size, rx, sink));
    Ok(tx)
}

async fn publish(
    js: jetstream::Context,
    stats: Arc<Stats>,
    size: usize,
    mut due: mpsc::UnboundedReceiver<Due>,
    sink: mpsc::UnboundedSender<AckedSend>,
) {
    let mut acks = FuturesUnordered::new();
    let mut text = String::new();
    let mut open = true;
    while open || !acks.is_empty() {
        tokio::select! {
            next = due.recv(), if open => {
                let Some(Due { room, sched_ns }) = next else {
                    open = false;
                    continue;
                };
                proto::stamped_text(&mut text, sched_ns, size);
                let message = StoredMessage {
                    room: room.to_string(),
                    username: "loadgen".into(),
                    message: text.clone(),
                    created_time: chatify_shared::id::now_millis(),
                    user_id: None,
                    reply_to: None,
                };
                let created_time = message.created_time;
                let Ok(payload) = serde_json::to_vec(&message) else {
                    Stats::inc(&stats.ack_errors);
                    stats.error("publish: encoding failed");
                    continue;
                };
                let subject = RoomToken::new(&room).store_subject();
                match js.publish(subject, payload.into()).await {
                    Ok(ack) => acks.push(wait(ack, InFlight { room, sched_ns, created_time })),
                    Err(e) => {
                        Stats::inc(&stats.ack_errors);
                        stats.error(format!("publish: {e}"));
                    }
                }
            }
            Some((result, sent)) = acks.next(), if !acks.is_empty() => {
                let now = now_ns();
                match result {
                    Ok(sequence) => {
                        Stats::inc(&stats.acked);
                        stats.ack.record_ns(0, sent.sched_ns, now);
                        let _ = sink.send(AckedSend {
                            id: message_id(sent.created_time, sequence).to_string(),
                            room: sent.room,
                            sched_ns: sent.sched_ns,
                            acked_ns: now,
                        });
                    }
                    Err(e) => {
                        Stats::inc(&stats.ack_errors);
                        stats.error(format!("publish ack: {e}"));
                    }
                }
            }
        }
    }
}

/// JetStream's ack of one publish: the stream sequence.
async fn wait(
    ack: PublishAckFuture,
    sent: InFlight,
) -> (Result<u64, jetstream::context::PublishError>, InFlight) {
    (ack.await.map(|a| a.sequence), sent)
}
