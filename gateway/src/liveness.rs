//! Gateway liveness: every gateway announces itself on a heartbeat subject, and drops the
//! members of any gateway it has not heard from within `gateway.gateway_timeout_ms`, so a
//! crashed gateway's users leave every room (with the usual notices) within that time.

use std::sync::Arc;
use std::time::Duration;

use chatify_shared::subjects::{GATEWAY_HEARTBEAT_SUBJECT, GatewayId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::rooms::Rooms;

/// Publishes heartbeats, listens to the others' and sweeps the silent ones, until `shutdown`.
pub async fn run(
    nats: async_nats::Client,
    rooms: Arc<Rooms>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut heartbeats = match nats.subscribe(GATEWAY_HEARTBEAT_SUBJECT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "could not subscribe to gateway heartbeats; crashed gateways will not be detected");
            return;
        }
    };
    let me = rooms.gateway().to_string();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = nats.publish(GATEWAY_HEARTBEAT_SUBJECT, me.clone().into()).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
                for gateway in rooms.expired_gateways(timeout) {
                    rooms.drop_gateway(&gateway).await;
                }
            }
            Some(beat) = heartbeats.next() => {
                if let Some(gateway) = std::str::from_utf8(&beat.payload).ok().and_then(GatewayId::parse) {
                    rooms.saw_gateway(&gateway);
                }
            }
        }
    }
}
