//! Gateway liveness: every gateway announces itself on a heartbeat subject, and drops the
//! members of any gateway it has not heard from within `gateway.gateway_timeout_ms`, so a
//! crashed gateway's users leave every room (with the usual notices) within that time.
//!
//! Silence is only evidence while this gateway itself is connected: during its own NATS outage
//! nobody is declared dead, and after it every other gateway gets a fresh timeout and this one
//! re-announces its members (records may have been lost with NATS). A gateway that learns it
//! was declared dead (it was cut off, not crashed) re-announces its members too.
//!
//! A heartbeat also says where the gateway takes connections from the others
//! (`gateway.advertise_address`): a WebSocket upgrade of its session that reached another
//! gateway is handed to it there ([`crate::forward`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use bytes::Bytes;
use chatify_shared::subjects::{GATEWAY_DEAD_SUBJECT, GATEWAY_HEARTBEAT_SUBJECT, GatewayId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::registry::Rooms;

/// When each other gateway was last heard of.
pub struct Liveness {
    /// This gateway, never listed.
    me: GatewayId,
    /// The others: when they were last heard of (a heartbeat, or a presence announcement), and
    /// where they take connections, as their last heartbeat said.
    last_seen: Mutex<HashMap<GatewayId, Seen>>,
}

/// What is known of another live gateway.
struct Seen {
    /// When it was last heard of.
    at: Instant,
    /// Where it takes connections (`None` until a heartbeat said).
    address: Option<String>,
}

impl Liveness {
    pub fn new(me: GatewayId) -> Self {
        Self {
            me,
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    fn last_seen(&self) -> MutexGuard<'_, HashMap<GatewayId, Seen>> {
        self.last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `gateway` is alive now.
    pub fn saw(&self, gateway: &GatewayId) {
        self.heard(gateway, None);
    }

    /// Records a heartbeat of `gateway`, which takes connections at `address` (when it says).
    pub fn heard(&self, gateway: &GatewayId, address: Option<&str>) {
        if *gateway == self.me {
            return;
        }
        let mut last_seen = self.last_seen();
        let seen = last_seen.entry(gateway.clone()).or_insert(Seen {
            at: Instant::now(),
            address: None,
        });
        seen.at = Instant::now();
        if let Some(address) = address {
            seen.address = Some(address.to_owned());
        }
    }

    /// Where a live `gateway` takes connections, if its heartbeats said.
    pub fn address_of(&self, gateway: &GatewayId) -> Option<String> {
        self.last_seen().get(gateway)?.address.clone()
    }

    /// Gateways not heard of for longer than `timeout`; they are forgotten here.
    pub fn expired(&self, timeout: Duration) -> Vec<GatewayId> {
        let mut last_seen = self.last_seen();
        let expired: Vec<GatewayId> = last_seen
            .iter()
            .filter(|(_, seen)| seen.at.elapsed() > timeout)
            .map(|(g, _)| g.clone())
            .collect();
        for g in &expired {
            last_seen.remove(g);
        }
        expired
    }

    /// The live gateway whose session ids start like `sid` (see [`GatewayId::sid_prefix`]).
    pub fn owner_of(&self, sid: &str) -> Option<GatewayId> {
        let prefix = sid.get(..GatewayId::SID_PREFIX_LEN)?;
        self.last_seen()
            .keys()
            .find(|g| g.sid_prefix() == prefix)
            .cloned()
    }

    /// Forgets how long ago other gateways were heard of: after this gateway's own NATS outage,
    /// their silence meant nothing.
    pub fn reset(&self) {
        let now = Instant::now();
        for seen in self.last_seen().values_mut() {
            seen.at = now;
        }
    }
}

/// Publishes heartbeats, listens to the others' and sweeps the silent ones, until `shutdown`.
pub async fn run(
    nats: async_nats::Client,
    rooms: Arc<Rooms>,
    advertise: String,
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
    let heartbeat = Bytes::from(heartbeat(&me, &advertise));
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
                    rooms.liveness.reset();
                    rooms.refresh_all().await;
                }
                if let Err(e) = nats.publish(GATEWAY_HEARTBEAT_SUBJECT, heartbeat.clone()).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
                for gateway in rooms.liveness.expired(timeout) {
                    rooms.drop_gateway(&gateway).await;
                }
            }
            Some(beat) = heartbeats.next() => {
                if let Some((gateway, address)) = parse_heartbeat(&beat.payload) {
                    rooms.liveness.heard(&gateway, address);
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

/// A heartbeat: the gateway's id, a space, and where it takes connections.
fn heartbeat(me: &GatewayId, advertise: &str) -> String {
    format!("{me} {advertise}")
}

/// A heartbeat's gateway and address (none from a gateway that sends only its id).
fn parse_heartbeat(payload: &[u8]) -> Option<(GatewayId, Option<&str>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (id, address) = match text.split_once(' ') {
        Some((id, address)) => (id, Some(address).filter(|a| !a.is_empty())),
        None => (text, None),
    };
    Some((GatewayId::parse(id)?, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_gateways_expire_once_and_a_reset_forgives_them() {
        let (me, a, b) = (
            GatewayId::random(),
            GatewayId::random(),
            GatewayId::random(),
        );
        let liveness = Liveness::new(me.clone());
        liveness.saw(&me);
        liveness.saw(&a);
        liveness.saw(&b);
        let timeout = Duration::from_millis(50);
        assert!(liveness.expired(timeout).is_empty());
        std::thread::sleep(Duration::from_millis(60));
        liveness.saw(&b);
        assert_eq!(
            liveness.expired(timeout),
            vec![a.clone()],
            "itself is never listed"
        );
        assert!(liveness.expired(timeout).is_empty(), "expired once");
        std::thread::sleep(Duration::from_millis(60));
        liveness.reset();
        assert!(liveness.expired(timeout).is_empty(), "b was forgiven");
    }

    #[test]
    fn a_heartbeat_names_its_gateway_and_address() {
        let (me, other) = (GatewayId::random(), GatewayId::random());
        let beat = heartbeat(&other, "10.0.0.7:3000");
        let Some((gateway, address)) = parse_heartbeat(beat.as_bytes()) else {
            panic!("a heartbeat must parse: {beat}")
        };
        assert_eq!(
            (gateway.clone(), address),
            (other.clone(), Some("10.0.0.7:3000"))
        );
        assert_eq!(
            parse_heartbeat(other.to_string().as_bytes()),
            Some((other.clone(), None)),
            "an id alone"
        );
        assert_eq!(parse_heartbeat(b"not-an-id 1.2.3.4:5"), None);

        let liveness = Liveness::new(me.clone());
        liveness.heard(&gateway, address);
        liveness.heard(&me, Some("127.0.0.1:1"));
        assert_eq!(
            liveness.address_of(&other).as_deref(),
            Some("10.0.0.7:3000")
        );
        assert_eq!(liveness.address_of(&me), None, "itself is never listed");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            liveness.expired(Duration::from_millis(10)),
            vec![other.clone()]
        );
        assert_eq!(
            liveness.address_of(&other),
            None,
            "forgotten with the gateway"
        );
    }
}
