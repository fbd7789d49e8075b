//! Building and running the gateway: `Application::build` binds and connects everything from
//! configuration (port 0 picks a free port, which tests use); `run_until_stopped` serves until
//! the shutdown signal, then stops accepting, disconnects sockets (so every room hears that
//! they left), finishes in-flight work and drains NATS, within the configured deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chatify_shared::Settings;
use chatify_shared::bus::{self, BusError};
use chatify_shared::subjects::{GatewayId, Role};
use socketioxide::SocketIo;
use socketioxide::handler::ConnectHandler;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, AccessError};
use crate::address_limit::AddressLimit;
use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::connections::ConnectionLimiter;
use crate::forward::Forwarding;
use crate::handlers;
use crate::http::{self, HttpState, Origins};
use crate::lifecycle::Lifecycle;
use crate::presence::Presence;
use crate::reads::Reads;
use crate::registry::Rooms;
use crate::state::{App, AppInner};
use crate::tcp;
use crate::users::Users;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Initial read buffer of a WebSocket connection, and the most one `read()` takes. Client
/// events are a few hundred bytes (a `send_message` with a 100-byte text is about 150); a
/// longer frame grows the buffer to its length and takes several reads. Every idle WebSocket
/// holds this buffer.
const WS_READ_BUFFER_BYTES: usize = 512;

/// How long a starting gateway waits for a persister to create the messages stream (up.sh and
/// compose start the persister first; on Kubernetes both may start at once).
const MESSAGES_STREAM_WAIT: Duration = Duration::from_secs(60);

/// How long a stopping gateway lets its sockets' connection tasks run after `SocketIo::close`.
/// Closing queues each socket's Socket.IO disconnect packet and the socket's task writes it soon
/// after, but nothing reports when; exiting at once, the gateway's clients saw their connection
/// drop instead of being told (the graceful-shutdown fault scenario). Not per socket: the tasks
/// run in parallel.
const SOCKET_CLOSE_GRACE: Duration = Duration::from_millis(200);

/// How much longer than a long poll a forwarded request may take (the hop and its queueing).
const FORWARD_SLACK: Duration = Duration::from_secs(5);

/// Where the other gateways reach this one: `configured`, or the listener's address (loopback
/// when it listens on every interface).
fn advertise_address(configured: &str, listener: &TcpListener) -> Result<String, StartError> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    let mut local = listener.local_addr().map_err(|source| StartError::Bind {
        addr: "the listener's own address".into(),
        source,
    })?;
    if local.ip().is_unspecified() {
        local.set_ip(if local.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(local.to_string())
}

pub struct Application {
    listener: TcpListener,
    /// Where the requests other gateways forward for this gateway's sessions arrive.
    gateway_id: GatewayId,
    /// The largest forwarded body.
    max_body: usize,
    router: axum::Router,
    io: SocketIo,
    app: App,
    nats: async_nats::Client,
    shutdown_timeout: Duration,
    heartbeat_interval: Duration,
    gateway_timeout: Duration,
    /// Where the other gateways reach this one to hand it an upgrade of its session.
    advertise_address: String,
    /// Connections whose writes stall this long are aborted (see `tcp`).
    write_stall_limit: Duration,
    /// How the HTTP port bounds its clients.
    http_limits: chatify_shared::serve::Limits,
    name: String,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let gw = &settings.gateway;
        let addr = format!("{}:{}", gw.host, gw.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        // The recorder first: help texts registered before it would be lost.
        let metrics = chatify_shared::telemetry::metrics_handle();
        crate::metrics::describe();
        let nats = bus::connect(
            &settings.nats,
            &format!("chatify-gateway-{}", gw.name),
            Role::Gateway,
        )
        .await?;
        let js = async_nats::jetstream::new(nats.clone());
        // The persister creates the messages stream; a gateway may only read it.
        let messages = bus::open_messages_stream(&js, MESSAGES_STREAM_WAIT).await?;
        let presence = bus::ensure_presence_stream(&js, settings.stream.replicas).await?;
        let reads = Reads::new(bus::ensure_reads_bucket(&js, settings.stream.replicas).await?);
        let gateway_id = GatewayId::random();
        // Every session id starts with this gateway's, so any gateway can tell where it lives.
        engineioxide::config::set_default_sid_prefix(gateway_id.sid_prefix());
        let presence = Presence::new(nats.clone(), js, presence, gateway_id.clone());
        let bus = Bus::new(nats.clone(), messages, settings.nats.request_timeout());
        let rooms = Arc::new(Rooms::new(
            nats.clone(),
            presence,
            settings.limits.presence_list_max,
            bus.clone(),
            gw.message_states_bytes_per_room,
        ));
        let app = App::new(AppInner {
            limits: settings.limits.clone(),
            bus,
            rooms: rooms.clone(),
            auth: Authenticator::from_settings(&settings.auth),
            expiry: Arc::default(),
            access: Access::from_settings(&settings.access)?,
            users: Users::new(nats.clone()),
            reads,
            lifecycle: Lifecycle::default(),
            connections: Arc::new(ConnectionLimiter::new(
                settings.limits.connections_per_address,
                &settings.limits.trusted_proxies,
            )),
        });

        let max_payload = settings.limits.max_payload_bytes;
        let max_ws = usize::try_from(max_payload).unwrap_or(usize::MAX);
        // socketioxide's builder starts from engineioxide's defaults and forwards no byte bound.
        engineioxide::config::set_default_max_buffer_bytes(gw.max_buffer_bytes);
        let (layer, io) = SocketIo::builder()
            .with_state(app.clone())
            .max_payload(max_payload)
            .ws_max_message_size(max_ws)
            .ws_max_frame_size(max_ws)
            // (4 KiB by default; see WS_READ_BUFFER_BYTES.)
            .ws_read_buffer_size(WS_READ_BUFFER_BYTES)
            .max_buffer_size(gw.max_buffer_size)
            .ping_interval(Duration::from_millis(gw.ping_interval_ms))
            .ping_timeout(Duration::from_millis(gw.ping_timeout_ms))
            .connect_timeout(Duration::from_millis(gw.connect_timeout_ms))
            .build_layer();
        io.ns("/", handlers::on_connect.with(handlers::accept));
        rooms.delivery.set_io(io.clone());
        let advertise_address = advertise_address(&gw.advertise_address, &listener)?;
        let forwarding = Forwarding {
            nats: nats.clone(),
            me: gateway_id.clone(),
            liveness: rooms.liveness.clone(),
            timeout: Duration::from_millis(gw.ping_interval_ms + gw.ping_timeout_ms)
                + FORWARD_SLACK,
            max_body: max_ws,
        };

        let router = http::router(
            HttpState {
                app: app.clone(),
                nats: nats.clone(),
                metrics,
                history_limit: Arc::new(AddressLimit::new(
                    settings.limits.http_history_per_second,
                    settings.limits.http_history_burst,
                )),
            },
            layer,
            Origins::new(&settings.cors),
            Duration::from_millis(gw.body_read_timeout_ms),
            forwarding,
        );
        tracing::info!(gateway_id = %rooms.gateway(), name = %gw.name, auth = app.auth.is_some(), "gateway built");
        Ok(Self {
            listener,
            gateway_id,
            max_body: max_ws,
            router,
            io,
            app,
            nats,
            shutdown_timeout: Duration::from_millis(gw.shutdown_timeout_ms),
            heartbeat_interval: Duration::from_millis(gw.heartbeat_interval_ms),
            gateway_timeout: Duration::from_millis(gw.gateway_timeout_ms),
            advertise_address,
            http_limits: chatify_shared::serve::Limits {
                header_read_timeout: Duration::from_millis(gw.header_read_timeout_ms),
                timeouts_metric: crate::metrics::HTTP_TIMEOUTS,
                max_connections: chatify_shared::serve::connection_cap(
                    settings.limits.max_connections,
                ),
                refusals_metric: crate::metrics::PORT_FULL_REFUSALS,
            },
            write_stall_limit: tcp::write_stall_limit(
                Duration::from_millis(gw.ping_interval_ms),
                Duration::from_millis(gw.ping_timeout_ms),
            ),
            name: gw.name.clone(),
        })
    }

    /// The bound address (with the real port when configured with 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run_until_stopped(
        self,
        shutdown_signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), std::io::Error> {
        tracing::info!(addr = ?self.listener.local_addr().ok(), name = %self.name, "gateway listening");
        let stop_accepting = CancellationToken::new();
        let stall_limit = self.write_stall_limit;
        let server = chatify_shared::serve::serve(
            self.listener,
            self.router.clone(),
            self.http_limits,
            move |stream| tcp::abort_stalled_writes(stream, stall_limit),
            stop_accepting.clone().cancelled_owned(),
        );
        let mut server = tokio::spawn(server);
        let expiry = tokio::spawn(
            self.app
                .expiry
                .clone()
                .run(self.io.clone(), stop_accepting.child_token()),
        );
        let forwarded = tokio::spawn(crate::forward::serve(
            self.nats.clone(),
            self.gateway_id.clone(),
            self.router.clone(),
            self.max_body,
            stop_accepting.child_token(),
        ));
        let liveness = tokio::spawn(crate::liveness::run(
            self.nats.clone(),
            self.app.rooms.clone(),
            self.advertise_address.clone(),
            self.heartbeat_interval,
            self.gateway_timeout,
            stop_accepting.child_token(),
        ));

        tokio::select! {
            () = shutdown_signal => {}
            result = &mut server => {
                return match result {
                    Ok(r) => r,
                    Err(e) => Err(std::io::Error::other(e)),
                };
            }
        }

        let deadline = self.shutdown_timeout;
        let rooms = self.app.rooms.clone();
        let drain = async {
            stop_accepting.cancel();
            let _ = liveness.await;
            let _ = expiry.await;
            let _ = forwarded.await;
            // Events already running finish and answer; new ones are refused.
            self.app.lifecycle.stop();
            self.app.lifecycle.idle(deadline / 2).await;
            // Disconnects every socket, then tells the other gateways they left.
            self.io.close().await;
            tracing::info!(
                rooms = rooms.len(),
                "sockets closed; announcing their departures"
            );
            rooms.leave_everyone().await;
            tracing::info!("draining NATS");
            if let Err(e) = chatify_shared::bus::drain(&self.nats).await {
                tracing::warn!(error = %e, "NATS drain failed");
            }
            tokio::time::sleep(SOCKET_CLOSE_GRACE).await;
            server.await
        };
        match tokio::time::timeout(deadline, drain).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => {
                tracing::error!(?deadline, "shutdown took too long; exiting anyway");
                Ok(())
            }
        }
    }
}
