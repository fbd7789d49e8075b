//! Gateway liveness: every gateway announces itself on a heartbeat subject, and drops the
//! members of any gateway it has not heard from within `gateway.gateway_timeout_ms`, so a
//! crashed gateway's users leave every room (with the usual notices) within that time.
//!
//! Silence is only evidence while this gateway itself is connected: during its own NATS outage
//! nobody is declared dead, and after it every other gateway gets a fresh timeout and this one
//! re-announces its members (records may have been lost with NATS). A gateway that learns it
//! was declared dead (it was cut off, not crashed) re-announces its members too.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use chatify_shared::subjects::{GATEWAY_DEAD_SUBJECT, GATEWAY_HEARTBEAT_SUBJECT, GatewayId};
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
    let subscribed = async {
        let heartbeats = nats.subscribe(GATEWAY_HEARTBEAT_SUBJECT).await?;
        let deaths = nats.subscribe(GATEWAY_DEAD_SUBJECT).await?;
        Ok::<_, async_nats::SubscribeError>((heartbeats, deaths))
    };
    let (mut heartbeats, mut deaths) = match subscribed.await {
        Ok(subs) => subs,
        Err(e) => {
            tracing::error!(error = %e, "could not subscribe to gateway heartbeats; crashed gateways will not be detected");
            return;
        }
    };
    let me = rooms.gateway().clone();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_connected = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let connected = nats.connection_state() == State::Connected;
                if !connected {
                    was_connected = false;
                    continue;
                }
                if !was_connected {
                    tracing::info!("NATS is back: re-announcing members, giving other gateways a fresh timeout");
                    was_connected = true;
                    rooms.reset_liveness();
                    rooms.refresh_all().await;
                }
                if let Err(e) = nats.publish(GATEWAY_HEARTBEAT_SUBJECT, me.to_string().into()).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
                for gateway in rooms.expired_gateways(timeout) {
                    rooms.drop_gateway(&gateway).await;
                }
            }
            Some(beat) = heartbeats.next() => {
                if let Some(gateway) = parse(&beat.payload) {
                    rooms.saw_gateway(&gateway);
                }
            }
            Some(death) = deaths.next() => {
                if parse(&death.payload).is_some_and(|g| g == me) {
                    tracing::warn!("another gateway declared this one dead; re-announcing members");
                    rooms.refresh_all().await;
                }
            }
        }
    }
}

fn parse(payload: &[u8]) -> Option<GatewayId> {
    std::str::from_utf8(payload).ok().and_then(GatewayId::parse)
}
