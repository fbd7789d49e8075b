//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to handle the websocket connection through tasks and channels
//! and to handle upgrade from polling to ws

use std::{
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::futures::Notified,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};
use tokio_util::{future::FutureExt as _, sync::WaitForCancellationFuture};

use engineioxide_core::{Packet, ProtocolVersion, Sid, Str, TransportType};

use crate::{
    DisconnectReason, Socket,
    body::ResponseBody,
    config::EngineIoConfig,
    engine::EngineIo,
    errors::Error,
    handler::EngineIoHandler,
    socket::{InternalRx, Queued},
    transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts.clone(), body);

    let ws_key = parts
        .headers
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();

    tokio::spawn(async move {
        let conn = hyper::upgrade::on(req)
            .await
            .map(hyper_util::rt::TokioIo::new);

        let res = match conn {
            Ok(conn) => on_init(engine.clone(), conn, protocol, sid, parts).await,
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return;
            }
        };

        match res {
            Ok(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws connection set up")
            }
            Err(Error::MultipleWebsocketRequests) => {}
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
            }
        }
    });

    Ok(ws_response(&ws_key))
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// Read packets from the websocket and handle them, it will block until the connection is closed
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
pub async fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    let (socket, ws) = if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => return Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => return Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                match tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut)
                    .with_cancellation_token(&socket.cancellation_token)
                    .await
                {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                (socket, ws)
            }
        }
    } else {
        let req_data = without_handshake(req_data);
        let socket = engine.create_session(protocol, TransportType::Websocket, req_data, false);

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        init_handshake(socket.id, &mut ws, &engine.config).await?;
        (socket, ws)
    };

    // (Chatify patch, see vendor/README.md.) One task serves the connection from here on: it
    // reads, writes and, for a v4 session opened on this WebSocket, keeps the heartbeat.
    // Upstream split the stream and ran a reader, a writer and a heartbeat task (this one, which
    // awaited the reader, kept the upgrade's whole future as well): 2.5 KiB a connection in task
    // futures and the lock between the halves. A session upgraded from polling keeps the
    // heartbeat task it has run since its handshake, as does a v3 session (whose heartbeat the
    // client drives).
    let heartbeat = if sid.is_none() && socket.protocol == ProtocolVersion::V4 {
        Some(Heartbeat::new(
            engine.config.ping_interval,
            engine.config.ping_timeout,
        ))
    } else {
        if sid.is_none() {
            socket
                .clone()
                .spawn_heartbeat(engine.config.ping_interval, engine.config.ping_timeout);
        }
        None
    };
    tokio::spawn(serve(engine, socket, ws, heartbeat));
    Ok(())
}

/// How many messages the connection's task reads in one wakeup before it lets other tasks run.
const READ_BUDGET: usize = 32;

/// Serves a WebSocket session until it ends: forwards what the client sends to the handler,
/// writes what the session queues (flushing once the queue is empty) and keeps `heartbeat`, if
/// any. Once the session is closed, whether by the client, the handler, an error or the
/// heartbeat, it writes what is still queued, then closes the WebSocket.
fn serve<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    socket: Arc<Socket<H::Data>>,
    ws: WebSocketStream<S>,
    heartbeat: Option<Heartbeat>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Not an `async fn`: its arguments would take their room in the future twice (once as
    // arguments, once as the `mut` bindings the connection borrows), and this future lives as
    // long as the connection.
    let (mut ws, mut heartbeat) = (ws, heartbeat);
    async move {
        // A polling request that was in progress during the upgrade may still hold the lock. When
        // it is free, what a session closed already (by its handler, say) queued is still written.
        let internal_rx = match socket.internal_rx.try_lock() {
            Ok(internal_rx) => Some(internal_rx),
            // Boxed: this future lives as long as the connection, and would keep room for the lock's
            // 200-byte future, which only an upgrade racing a polling request needs.
            Err(_) => {
                Box::pin(
                    socket
                        .internal_rx
                        .lock()
                        .with_cancellation_token(&socket.cancellation_token),
                )
                .await
            }
        };
        let Some(mut internal_rx) = internal_rx else {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, "session closed before starting the ws connection");
            return;
        };

        let cancelled = pin!(socket.cancellation_token.cancelled());
        let volatile = pin!(socket.volatile.ready.notified());
        // Far enough never to fire when there is no heartbeat to keep; only polled when there is.
        let first = heartbeat.as_ref().map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
            Heartbeat::deadline,
        );
        let timer = pin!(tokio::time::sleep_until(first));
        // The connection borrows the stream and the heartbeat: moved into it, each would take its
        // size twice in this future (an argument keeps its place in it).
        let mut conn = Connection {
            ws: &mut ws,
            reading: true,
            pending: None,
            batch: None,
            unflushed: false,
            closing: false,
            heartbeat: &mut heartbeat,
            cancelled,
            volatile,
            timer,
        };
        std::future::poll_fn(|cx| conn.poll(cx, &engine, &socket, &mut internal_rx)).await;
    }
}

/// The state of a WebSocket session's task between two wakeups.
struct Connection<'p, 'a, S> {
    /// The client's WebSocket.
    ws: &'p mut WebSocketStream<S>,
    /// Whether the client's side is still open: false once it closed, failed or sent garbage.
    reading: bool,
    /// The next message to write, taken from the queue but not yet accepted by the WebSocket.
    pending: Option<Message>,
    /// The rest of the packet buffer being written (a message and its binary attachments).
    batch: Option<Queued>,
    /// Whether messages were written since the last flush.
    unflushed: bool,
    /// Whether the session is over and its queue written: the WebSocket is being closed.
    closing: bool,
    /// The heartbeat, when this task keeps it.
    heartbeat: &'p mut Option<Heartbeat>,
    /// Resolves once the session is closed.
    cancelled: Pin<&'p mut WaitForCancellationFuture<'a>>,
    /// Resolves when a volatile packet buffer is put in the socket's slot.
    volatile: Pin<&'p mut Notified<'a>>,
    /// Fires at the heartbeat's deadline.
    timer: Pin<&'p mut tokio::time::Sleep>,
}

impl<'a, S> Connection<'_, 'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Does what can be done now; ready once the session is closed, its queue written and the
    /// WebSocket closed.
    fn poll<H: EngineIoHandler>(
        &mut self,
        cx: &mut Context<'_>,
        engine: &Arc<EngineIo<H>>,
        socket: &'a Arc<Socket<H::Data>>,
        internal_rx: &mut InternalRx,
    ) -> Poll<()> {
        if self.closing {
            return self.poll_close(cx, socket);
        }
        let mut more_to_read = false;
        if self.reading {
            more_to_read = true;
            for _ in 0..READ_BUDGET {
                let Poll::Ready(read) = self.ws.poll_next_unpin(cx) else {
                    more_to_read = false;
                    break;
                };
                if let Err(reason) = self.on_read(read, engine, socket) {
                    self.reading = false;
                    more_to_read = false;
                    engine.close_session(socket.id, reason);
                    break;
                }
            }
        }

        self.poll_heartbeat(cx, socket);

        let ended = loop {
            if self.pending.is_none() {
                match self.next_message(cx, socket, internal_rx) {
                    Poll::Ready(Some(message)) => self.pending = Some(message),
                    Poll::Ready(None) => break true,
                    Poll::Pending => break false,
                }
            }
            match self.ws.poll_ready_unpin(cx) {
                Poll::Pending => break false,
                Poll::Ready(Ok(())) => {
                    if let Some(message) = self.pending.take()
                        && let Err(_e) = self.ws.start_send_unpin(message)
                    {
                        #[cfg(feature = "tracing")]
                        tracing::debug!("[sid={}] error sending packet: {}", socket.id, _e);
                    }
                    self.unflushed = true;
                }
                Poll::Ready(Err(_e)) => {
                    // As upstream's writer, which went on with the next packet.
                    #[cfg(feature = "tracing")]
                    tracing::debug!("[sid={}] error sending packet: {}", socket.id, _e);
                    self.pending = None;
                }
            }
        };
        if self.unflushed && self.pending.is_none() {
            #[cfg(feature = "tracing")]
            tracing::trace!(sid = %socket.id, "ws flush");
            if self.ws.poll_flush_unpin(cx).is_ready() {
                self.unflushed = false;
            }
        }
        if ended {
            self.closing = true;
            return self.poll_close(cx, socket);
        }
        if more_to_read {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Writes what the WebSocket still buffers and its close frame (as `SinkExt::close`, which
    /// upstream's writer called, and with its errors ignored as there).
    fn poll_close<D: Default + Send + Sync + 'static>(
        &mut self,
        cx: &mut Context<'_>,
        _socket: &Socket<D>,
    ) -> Poll<()> {
        #[cfg(feature = "tracing")]
        tracing::trace!(sid = %_socket.id, "ws closing flush");
        self.ws.poll_close_unpin(cx).map(|_| ())
    }

    /// The next message to write: the rest of the current packet buffer, then the queue, then
    /// (the queue empty) the volatile slot. `None` once the session is closed and the queue
    /// empty.
    fn next_message<D: Default + Send + Sync + 'static>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &'a Socket<D>,
        internal_rx: &mut InternalRx,
    ) -> Poll<Option<Message>> {
        loop {
            if let Some(batch) = &mut self.batch {
                if batch.is_empty() {
                    self.batch = None;
                } else if let Some(message) = ws_message(batch.remove(0), socket.protocol) {
                    return Poll::Ready(Some(message));
                } else {
                    continue;
                }
            }
            match socket.queue.poll_recv(internal_rx, cx) {
                Poll::Ready(Some(packets)) => {
                    self.batch = Some(packets);
                    continue;
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if self.cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            let packets = ready!(socket.volatile.poll_take(self.volatile.as_mut(), cx));
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = ?socket.id, "ws volatile flush: {} packets", packets.len());
            self.batch = Some(Box::new(packets));
        }
    }

    /// Handles what the client sent; `Err` with the reason to close the session once it is
    /// over: closed, failed, or sent what the protocol does not allow.
    fn on_read<H: EngineIoHandler>(
        &mut self,
        read: Option<Result<Message, tungstenite::Error>>,
        engine: &Arc<EngineIo<H>>,
        socket: &Arc<Socket<H::Data>>,
    ) -> Result<(), DisconnectReason> {
        let reason = |e: Error| {
            #[cfg(feature = "tracing")]
            tracing::debug!("error when handling packet: {:?}", e);
            Option::<DisconnectReason>::from(&e).unwrap_or(DisconnectReason::TransportError)
        };
        match read {
            None => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "ws transport was closed");
                Err(DisconnectReason::TransportClose)
            }
            Some(Err(e)) => Err(reason(e.into())),
            Some(Ok(Message::Text(msg))) => {
                match Packet::parse(socket.protocol, ws_bytes_to_str(msg))
                    .map_err(|e| reason(e.into()))?
                {
                    Packet::Close => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!("[sid={}] closing session", socket.id);
                        Err(DisconnectReason::TransportClose)
                    }
                    Packet::Pong | Packet::Ping => {
                        match self.heartbeat.as_mut() {
                            Some(heartbeat) => {
                                if heartbeat.on_pong() {
                                    self.timer.as_mut().reset(heartbeat.deadline());
                                }
                            }
                            // A stored permit means that the client is already known to be alive.
                            None => socket.heartbeat.notify_one(),
                        }
                        Ok(())
                    }
                    Packet::Message(msg) => {
                        engine.handler.on_message(msg, socket.clone());
                        Ok(())
                    }
                    p => Err(reason(Error::BadPacket(p))),
                }
            }
            Some(Ok(Message::Binary(mut data))) => {
                if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                    // The first byte is the message type, which we don't need.
                    data = data.split_off(1);
                }
                engine.handler.on_binary(data, socket.clone());
                Ok(())
            }
            Some(Ok(Message::Close(_))) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("websocket closed, closing session");
                Err(DisconnectReason::TransportClose)
            }
            Some(Ok(_)) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = ?socket.id, "unexpected ws message");
                Ok(())
            }
        }
    }

    /// Sends the heartbeat's ping, or closes the session when its pong is late.
    fn poll_heartbeat<D: Default + Send + Sync + 'static>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &Socket<D>,
    ) {
        let Some(heartbeat) = self.heartbeat.as_mut() else {
            return;
        };
        while self.timer.as_mut().poll(cx).is_ready() {
            let on_time = heartbeat.on_deadline() && {
                #[cfg(feature = "tracing")]
                tracing::trace!(sid = ?socket.id, "emitting ping");
                socket.send(Packet::Ping).is_ok()
            };
            if !on_time {
                #[cfg(feature = "tracing")]
                tracing::debug!(id = ?socket.id, "heartbeat error: {}", Error::HeartbeatTimeout);
                *self.heartbeat = None;
                socket.close(DisconnectReason::HeartbeatTimeout);
                return;
            }
            self.timer.as_mut().reset(heartbeat.deadline());
        }
    }
}

/// The v4 heartbeat of a session opened on its WebSocket, as upstream's heartbeat job keeps it:
/// a ping when the session starts and every `interval` after that (counted from the start), and
/// the session closed when a ping's pong is not back within `timeout`, or when the ping cannot
/// be queued.
#[derive(Debug)]
struct Heartbeat {
    /// Time between two pings.
    interval: Duration,
    /// Time the client has to answer a ping.
    timeout: Duration,
    /// When the next ping is due.
    next_ping: tokio::time::Instant,
    /// When the pong of the ping sent last is due, while it has not come.
    pong_due: Option<tokio::time::Instant>,
}

impl Heartbeat {
    fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            next_ping: tokio::time::Instant::now(),
            pong_due: None,
        }
    }

    /// When the heartbeat must act next.
    fn deadline(&self) -> tokio::time::Instant {
        self.pong_due.unwrap_or(self.next_ping)
    }

    /// The deadline came: true if a ping is to be sent now, false if the pong is late.
    fn on_deadline(&mut self) -> bool {
        if self.pong_due.is_some() {
            return false;
        }
        self.pong_due = Some(tokio::time::Instant::now() + self.timeout);
        self.next_ping += self.interval;
        true
    }

    /// A pong came: true if it answered the ping (the deadline moved). A pong nobody waits for
    /// changes nothing.
    fn on_pong(&mut self) -> bool {
        self.pong_due.take().is_some()
    }
}

/// The websocket message that carries a packet (none for a `Noop`).
fn ws_message(packet: Packet, protocol: ProtocolVersion) -> Option<Message> {
    Some(match packet {
        Packet::Binary(bin) | Packet::BinaryV3(bin) => {
            if protocol == ProtocolVersion::V3 {
                // v3 protocol requires packet type as the first byte.
                // This requires a new buffer. This is OK as it is only for the V3 protocol.
                let mut buff = Vec::with_capacity(bin.len() + 1);
                buff.push(0x04);
                buff.extend(bin);
                Message::Binary(buff.into())
            } else {
                Message::Binary(bin)
            }
        }
        // A Noop Packet maybe sent by the server to upgrade from a polling connection
        // In the case that the packet was not poll in time it will remain in the buffer and therefore
        // it should be discarded here
        Packet::Noop => return None,
        packet => {
            let packet: String = packet.try_into().unwrap();
            Message::Text(packet.into())
        }
    })
}

/// The request's parts as the session keeps them: without what only the WebSocket handshake used.
/// (Chatify patch, see vendor/README.md.) The session keeps its request's parts for its whole
/// life; the handshake's own headers (the key, version and extensions offered, `Connection` and
/// `Upgrade`) and the upgrade's handle mean nothing once the connection is a WebSocket, and took
/// about 450 bytes of every connection. The headers are copied into a map of the size they need.
fn without_handshake(mut parts: Parts) -> Parts {
    use http::header;
    const HANDSHAKE: [header::HeaderName; 5] = [
        header::CONNECTION,
        header::UPGRADE,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ];
    let kept = parts
        .headers
        .iter()
        .filter(|(name, _)| !HANDSHAKE.contains(name))
        .count();
    let mut headers = http::HeaderMap::with_capacity(kept);
    for (name, value) in &parts.headers {
        if !HANDSHAKE.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    parts.headers = headers;
    parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    parts
}

/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(make_open_packet(TransportType::Websocket, sid, config));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    socket
        .queue
        .send(Box::new(smallvec![Packet::Noop]))
        .await
        .map_err(|_| Error::Upgrade)?;

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::Request;
    use tokio::io::DuplexStream;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    /// What the handler saw, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Message(String),
        Disconnect(DisconnectReason),
    }

    #[derive(Debug)]
    struct RecordingHandler(tokio::sync::mpsc::UnboundedSender<Seen>);
    impl EngineIoHandler for RecordingHandler {
        type Data = ();
        fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
        fn on_disconnect(&self, _: Arc<Socket<()>>, reason: DisconnectReason) {
            self.0.send(Seen::Disconnect(reason)).ok();
        }
        fn on_message(self: &Arc<Self>, msg: Str, _: Arc<Socket<()>>) {
            self.0.send(Seen::Message(msg.to_string())).ok();
        }
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    type Engine = Arc<EngineIo<RecordingHandler>>;

    fn engine(ping: Duration) -> (Engine, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let config = EngineIoConfig::builder()
            .ping_interval(ping)
            .ping_timeout(ping)
            .build();
        (
            Arc::new(EngineIo::new(Arc::new(RecordingHandler(tx)), config)),
            rx,
        )
    }

    fn session(engine: &Engine) -> Arc<Socket<()>> {
        engine.create_session(
            ProtocolVersion::V4,
            TransportType::Websocket,
            Request::<()>::default().into_parts().0,
            false,
        )
    }

    async fn ws_pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    async fn next_text(client: &mut WebSocketStream<DuplexStream>) -> Option<String> {
        match tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the server should send something")
        {
            Some(Ok(Message::Text(text))) => Some(text.to_string()),
            Some(Ok(Message::Close(_))) | None => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A polling request can still hold the lock at the end of an upgrade.
    #[tokio::test]
    async fn the_connection_waits_for_the_lock_of_a_polling_request() {
        let (engine, _seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;

        let polling = socket.internal_rx.lock().await;
        let task = tokio::spawn(serve(engine, socket.clone(), server, None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !task.is_finished(),
            "the connection should wait for the lock"
        );

        drop(polling);
        socket.emit(Str::from("hello")).unwrap();
        assert_eq!(next_text(&mut client).await.as_deref(), Some("4hello"));
    }

    #[tokio::test]
    async fn a_connection_waiting_for_the_lock_stops_with_the_session() {
        let (engine, _seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, _client) = ws_pair().await;

        let _polling = socket.internal_rx.lock().await;
        let task = tokio::spawn(serve(engine, socket.clone(), server, None));
        tokio::time::sleep(Duration::from_millis(20)).await;

        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("the connection should stop")
            .unwrap();
    }

    /// Reading and writing in one task: the client's messages reach the handler while the
    /// server's reach the client, in order on both sides.
    #[tokio::test]
    async fn the_connection_reads_and_writes() {
        let (engine, mut seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        tokio::spawn(serve(engine, socket.clone(), server, None));

        for i in 0..100 {
            socket.emit(Str::from(format!("down {i}"))).unwrap();
            client
                .send(Message::text(format!("4up {i}")))
                .await
                .unwrap();
        }
        for i in 0..100 {
            assert_eq!(next_text(&mut client).await, Some(format!("4down {i}")));
            let got = tokio::time::timeout(TIMEOUT, seen.recv()).await.unwrap();
            assert_eq!(got, Some(Seen::Message(format!("up {i}"))));
        }
    }

    /// What the session queued before it was closed is written, then the WebSocket is closed.
    #[tokio::test]
    async fn a_closed_session_writes_its_queue_then_closes_the_websocket() {
        let (engine, mut seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        let task = tokio::spawn(serve(engine.clone(), socket.clone(), server, None));

        socket.emit(Str::from("last words")).unwrap();
        socket.close(DisconnectReason::ClosingServer);

        assert_eq!(next_text(&mut client).await.as_deref(), Some("4last words"));
        assert_eq!(next_text(&mut client).await.as_deref(), Some("1"));
        assert_eq!(next_text(&mut client).await, None, "then the close frame");
        tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        let got = tokio::time::timeout(TIMEOUT, seen.recv()).await.unwrap();
        assert_eq!(got, Some(Seen::Disconnect(DisconnectReason::ClosingServer)));
    }

    #[tokio::test]
    async fn a_client_closing_its_websocket_closes_the_session() {
        let (engine, mut seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        let task = tokio::spawn(serve(engine.clone(), socket.clone(), server, None));

        client.close(None).await.unwrap();

        let got = tokio::time::timeout(TIMEOUT, seen.recv()).await.unwrap();
        assert_eq!(
            got,
            Some(Seen::Disconnect(DisconnectReason::TransportClose))
        );
        tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        assert!(engine.get_socket(socket.id).is_none());
    }

    #[tokio::test]
    async fn garbage_from_the_client_closes_the_session() {
        let (engine, mut seen) = engine(Duration::from_secs(25));
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        tokio::spawn(serve(engine.clone(), socket.clone(), server, None));

        client.send(Message::text("not a packet")).await.unwrap();

        let got = tokio::time::timeout(TIMEOUT, seen.recv()).await.unwrap();
        assert_eq!(
            got,
            Some(Seen::Disconnect(DisconnectReason::PacketParsingError))
        );
    }

    /// The heartbeat the connection keeps: a ping every interval while pongs come back.
    #[tokio::test]
    async fn answered_pings_keep_the_session() {
        let ping = Duration::from_millis(50);
        let (engine, mut seen) = engine(ping);
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        let started = tokio::time::Instant::now();
        tokio::spawn(serve(
            engine.clone(),
            socket.clone(),
            server,
            Some(Heartbeat::new(ping, ping)),
        ));

        for n in 1..=5 {
            assert_eq!(next_text(&mut client).await.as_deref(), Some("2"));
            assert!(started.elapsed() >= ping * (n - 1), "ping {n} came early");
            client.send(Message::text("3")).await.unwrap();
        }
        assert!(seen.try_recv().is_err(), "the session should be open");
        assert!(engine.get_socket(socket.id).is_some());
    }

    #[tokio::test]
    async fn an_unanswered_ping_closes_the_session() {
        let ping = Duration::from_millis(50);
        let (engine, mut seen) = engine(ping);
        let socket = session(&engine);
        let (server, mut client) = ws_pair().await;
        tokio::spawn(serve(
            engine.clone(),
            socket.clone(),
            server,
            Some(Heartbeat::new(ping, ping)),
        ));

        // A pong before the ping it would answer does not count.
        client.send(Message::text("3")).await.unwrap();
        assert_eq!(next_text(&mut client).await.as_deref(), Some("2"));
        assert_eq!(next_text(&mut client).await.as_deref(), Some("1"));
        assert_eq!(next_text(&mut client).await, None);
        let got = tokio::time::timeout(TIMEOUT, seen.recv()).await.unwrap();
        assert_eq!(
            got,
            Some(Seen::Disconnect(DisconnectReason::HeartbeatTimeout))
        );
    }

    #[test]
    fn the_session_keeps_the_request_without_its_handshake() {
        #[derive(Clone, Debug, PartialEq)]
        struct Peer(u16);
        let mut req = Request::builder()
            .uri("/engine.io/?EIO=4&transport=websocket")
            .header("Host", "chat.example")
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Extensions", "permessage-deflate")
            .header("X-Forwarded-For", "10.0.0.1")
            .header("X-Forwarded-For", "10.0.0.2")
            .header("Origin", "http://chat.example")
            .body(())
            .unwrap();
        req.extensions_mut().insert(Peer(7));
        let (parts, ()) = req.into_parts();

        let kept = without_handshake(parts);

        let names: Vec<_> = kept.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "x-forwarded-for", "origin"]);
        let forwarded: Vec<_> = kept.headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(forwarded, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(kept.extensions.get::<Peer>(), Some(&Peer(7)));
        assert_eq!(kept.uri, "/engine.io/?EIO=4&transport=websocket");
    }
}
