//! One Socket.IO client connection: a single task that owns its WebSocket, answers pings, sends
//! what the scenario asks and counts what arrives.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::proto::{self, Packet};
use crate::stats::{Stats, now_ns};

/// A server to connect to: `host:port` (the path is always `/socket.io/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Accepts `http://HOST:PORT`, `ws://HOST:PORT` (a trailing path is ignored) or `HOST:PORT`,
    /// with HOST an IPv4 address.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("ws://"))
            .unwrap_or(url);
        let host_port = rest.split('/').next().unwrap_or(rest);
        let host_port = host_port.replace("localhost", "127.0.0.1");
        let addr: SocketAddr = host_port
            .parse()
            .with_context(|| format!("target {url:?} must be http://IPV4:PORT"))?;
        Ok(Self {
            url: url.to_owned(),
            addr,
        })
    }

    fn ws_uri(&self) -> String {
        format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.addr)
    }
}

/// What the scenario asks a connection to do.
#[derive(Debug)]
pub enum Cmd {
    Send {
        room: Arc<str>,
        sched_ns: u64,
    },
    History {
        room: Arc<str>,
        limit: u32,
        /// Fewest messages a correct answer holds.
        expect: usize,
        sched_ns: u64,
    },
    /// `react { room, id, emoji, add: true }`.
    React {
        room: Arc<str>,
        id: Arc<str>,
        emoji: Arc<str>,
        sched_ns: u64,
    },
    /// Any event with an ack: the ack's arguments (the JSON array) go to `reply`.
    Request {
        event: &'static str,
        data: String,
        reply: oneshot::Sender<String>,
    },
}

/// What the connections of a reaction storm record: the arguments of the last `reaction` event
/// each connection received, and when each member's react was due (a `reaction` event names its
/// reactor, `u<index>` without auth, so its delivery latency counts from then).
pub struct StormLog {
    pub last: Vec<Mutex<String>>,
    pub due_ns: Vec<AtomicU64>,
}

impl StormLog {
    pub fn new(members: usize) -> Self {
        Self {
            last: (0..members).map(|_| Mutex::new(String::new())).collect(),
            due_ns: (0..members).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The last `reaction` event's arguments of connection `i` (empty when none came).
    pub fn last_of(&self, i: usize) -> String {
        self.last
            .get(i)
            .and_then(|m| m.lock().ok().map(|s| s.clone()))
            .unwrap_or_default()
    }
}

/// A `send_message` the server acknowledged.
#[derive(Debug)]
pub struct AckedSend {
    pub id: String,
    pub room: Arc<str>,
    pub sched_ns: u64,
    pub acked_ns: u64,
}

pub struct ConnConfig {
    pub index: usize,
    pub target: Arc<Target>,
    pub source: Option<Ipv4Addr>,
    pub auth_token: Option<Arc<str>>,
    pub msg_size: usize,
    pub acked_sink: Option<mpsc::UnboundedSender<AckedSend>>,
    /// The room this connection joins once connected, and the gate bounding how many joins are
    /// in flight at once (a join fans out notices and `chatroom_users` to the whole room).
    pub join: Option<(Arc<str>, Arc<Semaphore>)>,
    /// Where `reaction` events are recorded (the storm scenario).
    pub storm: Option<Arc<StormLog>>,
}

/// How long a join may wait for its ack before it is sent again (joining twice is harmless).
const JOIN_RETRY: Duration = Duration::from_secs(10);

enum Pending {
    Join,
    Send { room: Arc<str>, sched_ns: u64 },
    History { sched_ns: u64, expect: usize },
    React { sched_ns: u64 },
    Request(oneshot::Sender<String>),
}

type Ws = WebSocketStream<TcpStream>;

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of mostly idle connections. Frames are written at once.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
}

async fn open(cfg: &ConnConfig, stats: &Stats) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    if let Some(src) = cfg.source {
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("bind {src}"))?;
    }
    socket.set_nodelay(true)?;
    let tcp = socket
        .connect(cfg.target.addr)
        .await
        .context("tcp connect")?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(cfg.target.ws_uri(), tcp, Some(ws_config()))
            .await
            .context("websocket handshake")?;
    // Engine.IO open, then the Socket.IO connect of namespace "/".
    let mut opened = false;
    let mut requested = false;
    while let Some(msg) = ws.next().await {
        let msg = msg.context("handshake read")?;
        let Message::Text(text) = msg else { continue };
        match proto::parse(&text) {
            Ok(Packet::Open(json)) if !opened => {
                if proto::open_timings(json).is_none() {
                    stats.error("open packet without ping timings");
                }
                opened = true;
                ws.send(Message::text(proto::connect_request(
                    cfg.auth_token.as_deref(),
                )))
                .await?;
                requested = true;
            }
            Ok(Packet::Ping) => ws.send(Message::text("3")).await?,
            Ok(Packet::Connect(_)) if requested => return Ok(ws),
            Ok(Packet::ConnectError(data)) => bail!("connect_error {data}"),
            Ok(p) => bail!("unexpected packet during handshake: {p:?}"),
            Err(e) => bail!("bad packet during handshake: {e:?}"),
        }
    }
    Err(anyhow!("closed during handshake"))
}

/// Runs one connection until the command channel closes (then closes the socket) or the server
/// closes it. Connection attempts wait for a permit of `gate` (bounded concurrent handshakes).
pub async fn run(
    cfg: ConnConfig,
    stats: Arc<Stats>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    gate: Arc<Semaphore>,
) {
    let opened = {
        let _permit = gate.acquire().await;
        tokio::time::timeout(Duration::from_secs(30), open(&cfg, &stats)).await
    };
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            Stats::inc(&stats.connect_errors);
            stats.error(format!("connect: {}", short(&e)));
            return;
        }
        Err(_) => {
            Stats::inc(&stats.connect_errors);
            stats.error("connect: timeout");
            return;
        }
    };
    Stats::inc(&stats.connected);
    let shard = cfg.index;
    let username = format!("u{}", cfg.index);
    let mut next_ack: u64 = 0;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut out = String::with_capacity(256);
    let mut text = String::with_capacity(cfg.msg_size + 32);
    let mut room_json: Option<(Arc<str>, String)> = None;

    // The join: wait for a permit (reading meanwhile), send, resend on timeout, count once.
    let (join_room, join_gate) = match &cfg.join {
        Some((r, g)) => (Some(r.clone()), Some(g.clone())),
        None => (None, None),
    };
    let mut acquire = std::pin::pin!(async move {
        match join_gate {
            Some(g) => g.acquire_owned().await.ok(),
            None => std::future::pending().await,
        }
    });
    let mut join_permit = None;
    let mut join_state = if join_room.is_some() {
        JoinState::Waiting
    } else {
        JoinState::Done
    };
    let join_timer = tokio::time::sleep(JOIN_RETRY);
    let mut join_timer = std::pin::pin!(join_timer);

    loop {
        let mut send_join = false;
        tokio::select! {
            permit = &mut acquire, if join_state == JoinState::Waiting => {
                join_permit = permit;
                send_join = true;
            }
            () = &mut join_timer, if join_state == JoinState::Sent => {
                stats.error("join_room: no ack in 10 s, sent again");
                send_join = true;
            }
            frame = ws.next() => {
                let Some(frame) = frame else {
                    Stats::inc(&stats.disconnects);
                    stats.error("closed by server");
                    return;
                };
                let msg = match frame {
                    Ok(m) => m,
                    Err(e) => {
                        Stats::inc(&stats.disconnects);
                        stats.error(format!("read: {}", short(&anyhow!(e))));
                        return;
                    }
                };
                let Message::Text(t) = msg else {
                    if matches!(msg, Message::Close(_)) {
                        Stats::inc(&stats.disconnects);
                        stats.error("closed by server");
                        return;
                    }
                    if matches!(msg, Message::Binary(_)) {
                        Stats::inc(&stats.protocol_errors);
                    }
                    continue;
                };
                match proto::parse(&t) {
                    Ok(Packet::Ping) => {
                        if ws.send(Message::text("3")).await.is_err() {
                            Stats::inc(&stats.disconnects);
                            return;
                        }
                    }
                    Ok(Packet::Event { name: "receive_message", args, .. }) => {
                        if let Some(sent) = proto::stamp_of(args) {
                            let now = now_ns();
                            Stats::inc(&stats.delivered);
                            stats.delivery.record_ns(shard, sent, now);
                            stats.event_at(now);
                        } else {
                            Stats::inc(&stats.other_events);
                        }
                    }
                    Ok(Packet::Event { name: "reaction", args, .. }) => {
                        let now = now_ns();
                        Stats::inc(&stats.reaction_events);
                        stats.event_at(now);
                        if let Some(log) = &cfg.storm {
                            if let Some(last) = log.last.get(cfg.index)
                                && let Ok(mut l) = last.lock()
                            {
                                l.clear();
                                l.push_str(args);
                            }
                            let due = proto::reactor_index(args)
                                .and_then(|i| log.due_ns.get(i))
                                .map_or(0, |d| d.load(Ordering::Relaxed));
                            if due > 0 {
                                stats.delivery.record_ns(shard, due, now);
                            }
                        }
                    }
                    Ok(Packet::Event { .. }) => Stats::inc(&stats.other_events),
                    Ok(Packet::Ack { id, args }) => match pending.remove(&id) {
                        Some(Pending::Join) if join_state == JoinState::Done => {}
                        Some(Pending::Join) => {
                            join_state = JoinState::Done;
                            join_permit = None;
                            on_ack(&cfg, &stats, shard, Pending::Join, args);
                        }
                        Some(p) => on_ack(&cfg, &stats, shard, p, args),
                        None => {
                            Stats::inc(&stats.protocol_errors);
                            stats.error("ack for no request");
                        }
                    },
                    Ok(Packet::Close | Packet::Disconnect) => {
                        Stats::inc(&stats.disconnects);
                        stats.error("closed by server");
                        return;
                    }
                    Ok(Packet::Noop | Packet::Pong) => {}
                    Ok(p) => {
                        Stats::inc(&stats.protocol_errors);
                        stats.error(format!("unexpected packet {}", first_chars(&format!("{p:?}"), 40)));
                    }
                    Err(e) => {
                        Stats::inc(&stats.protocol_errors);
                        stats.error(format!("bad packet {e:?}"));
                    }
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else {
                    let _ = ws.close(None).await;
                    return;
                };
                next_ack += 1;
                let id = next_ack;
                match cmd {
                    Cmd::Send { room, sched_ns } => {
                        let rj = match &room_json {
                            Some((r, j)) if Arc::ptr_eq(r, &room) => j,
                            _ => {
                                let j = serde_json::to_string(&*room).unwrap_or_default();
                                &room_json.insert((room.clone(), j)).1
                            }
                        };
                        proto::stamped_text(&mut text, sched_ns, cfg.msg_size);
                        let data = format!("{{\"room\":{rj},\"message\":\"{text}\"}}");
                        proto::event_with_ack(&mut out, id, "send_message", &data);
                        pending.insert(id, Pending::Send { room, sched_ns });
                        Stats::inc(&stats.sent);
                    }
                    Cmd::History {
                        room,
                        limit,
                        expect,
                        sched_ns,
                    } => {
                        let data = serde_json::json!({ "room": &*room, "limit": limit });
                        proto::event_with_ack(&mut out, id, "get_history", &data.to_string());
                        pending.insert(id, Pending::History { sched_ns, expect });
                    }
                    Cmd::React {
                        room,
                        id: target,
                        emoji,
                        sched_ns,
                    } => {
                        let data = serde_json::json!({
                            "room": &*room, "id": &*target, "emoji": &*emoji, "add": true,
                        });
                        proto::event_with_ack(&mut out, id, "react", &data.to_string());
                        pending.insert(id, Pending::React { sched_ns });
                        Stats::inc(&stats.reacts);
                    }
                    Cmd::Request { event, data, reply } => {
                        proto::event_with_ack(&mut out, id, event, &data);
                        pending.insert(id, Pending::Request(reply));
                    }
                }
                if ws.send(Message::text(out.as_str())).await.is_err() {
                    Stats::inc(&stats.disconnects);
                    stats.error("write failed");
                    return;
                }
            }
        }
        if send_join && let Some(room) = &join_room {
            next_ack += 1;
            let data = serde_json::json!({ "username": username, "room": &**room });
            proto::event_with_ack(&mut out, next_ack, "join_room", &data.to_string());
            pending.insert(next_ack, Pending::Join);
            join_state = JoinState::Sent;
            join_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + JOIN_RETRY);
            if ws.send(Message::text(out.as_str())).await.is_err() {
                Stats::inc(&stats.disconnects);
                stats.error("write failed");
                return;
            }
        }
        let _ = &join_permit;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinState {
    Waiting,
    Sent,
    Done,
}

fn on_ack(cfg: &ConnConfig, stats: &Stats, shard: usize, p: Pending, args: &str) {
    let ok = proto::ack_ok(args);
    match p {
        Pending::Join => {
            if ok {
                Stats::inc(&stats.joined);
            } else {
                Stats::inc(&stats.join_errors);
                stats.error(format!("join_room: {}", proto::ack_error_code(args)));
            }
        }
        Pending::Send { room, sched_ns } => {
            let now = now_ns();
            if ok {
                Stats::inc(&stats.acked);
                stats.ack.record_ns(shard, sched_ns, now);
                if let Some(sink) = &cfg.acked_sink {
                    let id = proto::ack_string_field(args, "id")
                        .unwrap_or_default()
                        .to_owned();
                    let _ = sink.send(AckedSend {
                        id,
                        room,
                        sched_ns,
                        acked_ns: now,
                    });
                }
            } else {
                Stats::inc(&stats.ack_errors);
                stats.error(format!("send_message: {}", proto::ack_error_code(args)));
            }
        }
        Pending::React { sched_ns } => {
            if ok {
                Stats::inc(&stats.react_acked);
                stats.ack.record_ns(shard, sched_ns, now_ns());
            } else {
                Stats::inc(&stats.react_errors);
                stats.error(format!("react: {}", proto::ack_error_code(args)));
            }
        }
        Pending::Request(reply) => {
            let _ = reply.send(args.to_owned());
        }
        Pending::History { sched_ns, expect } => match proto::history_len(args) {
            Some(n) if ok && n >= expect => {
                Stats::inc(&stats.history_ok);
                stats.history.record_ns(shard, sched_ns, now_ns());
            }
            Some(n) if ok => {
                Stats::inc(&stats.history_errors);
                stats.error(format!(
                    "get_history: short page ({n} of {expect} messages)"
                ));
            }
            _ => {
                Stats::inc(&stats.history_errors);
                stats.error(format!("get_history: {}", proto::ack_error_code(args)));
            }
        },
    }
}

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// An error's chain on one short line (low cardinality for the error table).
fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    // Strip OS error numbers and addresses that would make every error unique.
    first_chars(&s, 120)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:4001").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.addr.to_string(), "127.0.0.1:4001");
        assert_eq!(
            t.ws_uri(),
            "ws://127.0.0.1:4001/socket.io/?EIO=4&transport=websocket"
        );
        let t = Target::parse("ws://localhost:80/socket.io/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.addr.to_string(), "127.0.0.1:80");
        assert!(Target::parse("http://example.com").is_err());
    }
}
