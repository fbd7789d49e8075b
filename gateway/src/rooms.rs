//! Rooms across gateways.
//!
//! A gateway subscribes to a room's subjects only while one of its own sockets is in the room,
//! so its traffic follows its members' interest. Membership is shared through the presence
//! stream: each gateway keeps one record per room with its own members, and announces every
//! change on the room's presence subject with the record's revision. A gateway that starts
//! listening to a room subscribes first and then reads the other gateways' records, so it
//! misses no change; keeping the highest revision per gateway makes the order of the two
//! irrelevant. Every gateway turns each announcement into the `ChatBot` notice and a fresh
//! `chatroom_users` for its own sockets.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use chatify_shared::subjects::{
    GATEWAY_DEAD_SUBJECT, GatewayId, RoomEventKind, RoomToken, presence_record_gateway,
    presence_records_of, room_event_kind,
};
use chatify_shared::wire::{
    ChatMessage, Member, Notice, PresenceChange, PresenceEvent, StoredMessage, TypingEvent,
};
use futures::StreamExt;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::operators::BroadcastOperators;
use socketioxide::socket::Sid;
use tokio::task::JoinHandle;

use crate::error::ChatError;
use crate::metrics as m;
use crate::order::Reorder;

/// The registry of rooms this gateway has members in.
pub struct Rooms {
    /// Emits to local sockets; set once the Socket.IO server exists.
    io: OnceLock<SocketIo>,
    nats: async_nats::Client,
    js: jetstream::Context,
    /// Per-room, per-gateway member records.
    presence: Stream,
    /// This gateway's identity in presence records and events.
    gateway: GatewayId,
    /// Rooms with at least one local member (or being joined).
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    /// When each other gateway was last heard of (heartbeat, or first seen in a record).
    last_seen: Mutex<HashMap<GatewayId, Instant>>,
}

struct Room {
    name: String,
    token: RoomToken,
    /// Number of local members, readable without the state lock (delivery metrics).
    local_count: AtomicUsize,
    /// Serializes membership changes of this room on this gateway.
    state: tokio::sync::Mutex<RoomState>,
    /// Set while a `chatroom_users` emission is scheduled (see [`USERS_COALESCE`]).
    users_pending: AtomicBool,
}

/// How long a membership change waits for others before the room gets `chatroom_users`. Each
/// emission carries the whole list to every member, so a join storm of n members would send n
/// lists of up to n entries to each of them (n² entries per member) and overflow their outgoing
/// queues, join acks included; coalesced, a storm sends one list per interval.
const USERS_COALESCE: Duration = Duration::from_millis(50);

#[derive(Default)]
struct RoomState {
    /// Set when the last local member left and the room was dropped from the registry; a
    /// joiner that finds it set starts over with a fresh entry.
    closed: bool,
    /// This gateway's members, in join order.
    local: Vec<Member>,
    /// The other gateways' members, with the revision they were read or announced at.
    remote: BTreeMap<GatewayId, Snapshot>,
    /// The task delivering the room's subjects to local sockets.
    listener: Option<JoinHandle<()>>,
}

struct Snapshot {
    revision: u64,
    members: Vec<Member>,
}

impl RoomState {
    fn users(&self) -> Vec<Member> {
        self.local
            .iter()
            .chain(self.remote.values().flat_map(|s| s.members.iter()))
            .cloned()
            .collect()
    }
}

fn presence_unavailable(e: &dyn std::fmt::Display) -> ChatError {
    tracing::warn!(error = %e, "presence update failed");
    ChatError::unavailable("room membership could not be updated; try again")
}

impl Rooms {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        presence: Stream,
        gateway: GatewayId,
    ) -> Self {
        Self {
            io: OnceLock::new(),
            nats,
            js,
            presence,
            gateway,
            rooms: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    fn last_seen(&self) -> std::sync::MutexGuard<'_, HashMap<GatewayId, Instant>> {
        self.last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `gateway` is alive now.
    pub fn saw_gateway(&self, gateway: &GatewayId) {
        if *gateway != self.gateway {
            self.last_seen().insert(gateway.clone(), Instant::now());
        }
    }

    /// Gateways not heard of for longer than `timeout`; they are forgotten here.
    pub fn expired_gateways(&self, timeout: Duration) -> Vec<GatewayId> {
        let mut last_seen = self.last_seen();
        let expired: Vec<GatewayId> = last_seen
            .iter()
            .filter(|(_, seen)| seen.elapsed() > timeout)
            .map(|(g, _)| g.clone())
            .collect();
        for g in &expired {
            last_seen.remove(g);
        }
        expired
    }

    /// Forgets how long ago other gateways were heard of: after this gateway's own NATS outage,
    /// their silence meant nothing.
    pub fn reset_liveness(&self) {
        let now = Instant::now();
        for seen in self.last_seen().values_mut() {
            *seen = now;
        }
    }

    /// Rewrites this gateway's member records and re-announces them, without notices.
    pub async fn refresh_all(&self) {
        let rooms: Vec<Arc<Room>> = self.registry().values().cloned().collect();
        for room in rooms {
            let state = room.state.lock().await;
            if state.closed || state.local.is_empty() {
                continue;
            }
            let refresh = PresenceChange::Refresh;
            if let Err(e) = self.publish_change(&room, &state.local, refresh).await {
                tracing::warn!(error = %e.message, "members could not be re-announced");
            }
        }
    }

    /// Drops a dead gateway's members from every room here, with the usual `has left` notices,
    /// and purges its presence records so no later reader sees them.
    pub async fn drop_gateway(&self, gateway: &GatewayId) {
        tracing::warn!(%gateway, "gateway stopped sending heartbeats; dropping its members");
        metrics::counter!(m::DEAD_GATEWAYS).increment(1);
        if let Err(e) = self
            .nats
            .publish(GATEWAY_DEAD_SUBJECT, gateway.to_string().into())
            .await
        {
            tracing::debug!(error = %e, "could not say a gateway is dead");
        }
        if let Err(e) = self
            .presence
            .purge()
            .filter(presence_records_of(gateway))
            .await
        {
            tracing::warn!(error = %e, %gateway, "could not purge a dead gateway's presence records");
        }
        let rooms: Vec<Arc<Room>> = self.registry().values().cloned().collect();
        let Some(io) = self.io.get() else { return };
        for room in rooms {
            let gone = {
                let mut state = room.state.lock().await;
                if state.closed {
                    continue;
                }
                match state.remote.remove(gateway) {
                    Some(snapshot) if !snapshot.members.is_empty() => snapshot.members,
                    _ => continue,
                }
            };
            for member in gone {
                let Some(to_room) = local_room(io, &room.name) else {
                    return;
                };
                let notice = Notice::new(
                    &room.name,
                    format!("{} has left the chat room", member.username),
                );
                log_emit(
                    "receive_message",
                    to_room.emit("receive_message", &notice).await,
                );
            }
            users_changed(io, &room);
        }
    }

    pub fn set_io(&self, io: SocketIo) {
        let _ = self.io.set(io);
    }

    pub fn gateway(&self) -> &GatewayId {
        &self.gateway
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Room>>> {
        self.rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of rooms with local members.
    pub fn len(&self) -> usize {
        self.registry().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, name: &str) -> Arc<Room> {
        self.registry()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Room {
                    name: name.to_owned(),
                    token: RoomToken::new(name),
                    local_count: AtomicUsize::new(0),
                    state: tokio::sync::Mutex::new(RoomState::default()),
                    users_pending: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Drops a closed room from the registry, unless a fresh entry already replaced it.
    fn forget(&self, room: &Arc<Room>, state: &mut RoomState) {
        state.closed = true;
        if let Some(listener) = state.listener.take() {
            listener.abort();
        }
        let mut registry = self.registry();
        if registry
            .get(&room.name)
            .is_some_and(|r| Arc::ptr_eq(r, room))
        {
            registry.remove(&room.name);
        }
        metrics::gauge!(m::ROOMS).set(registry.len() as f64);
    }

    /// Adds a local socket to a room and announces it; returns everyone in the room.
    pub async fn join(
        self: &Arc<Self>,
        name: &str,
        socket: &SocketRef,
        username: &str,
    ) -> Result<Vec<Member>, ChatError> {
        loop {
            let room = self.entry(name);
            let mut state = room.state.lock().await;
            if state.closed {
                continue;
            }
            if state.listener.is_none() {
                match self.start_listening(&room).await {
                    Ok((listener, remote)) => {
                        state.listener = Some(listener);
                        state.remote = remote;
                        metrics::gauge!(m::ROOMS).set(self.len() as f64);
                    }
                    Err(e) => {
                        if state.local.is_empty() {
                            self.forget(&room, &mut state);
                        }
                        return Err(e);
                    }
                }
            }
            let member = Member {
                id: socket.id.to_string(),
                username: username.to_owned(),
            };
            socket.join(name.to_owned());
            state.local.push(member.clone());
            room.local_count.store(state.local.len(), Ordering::Relaxed);
            let joined = PresenceChange::Joined {
                socket_id: member.id.clone(),
                username: member.username,
            };
            match self.publish_change(&room, &state.local, joined).await {
                Ok(()) => return Ok(state.users()),
                Err(e) => {
                    state.local.retain(|m| m.id != member.id);
                    room.local_count.store(state.local.len(), Ordering::Relaxed);
                    socket.leave(name.to_owned());
                    if state.local.is_empty() {
                        self.forget(&room, &mut state);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Removes a local socket from a room and announces it. The socket is out of the room
    /// locally whatever happens; a failed announcement is logged.
    pub async fn leave(&self, name: &str, socket: &SocketRef) {
        let Some(room) = self.registry().get(name).cloned() else {
            return;
        };
        let mut state = room.state.lock().await;
        let id = socket.id.to_string();
        socket.leave(name.to_owned());
        let Some(pos) = state.local.iter().position(|m| m.id == id) else {
            return;
        };
        let member = state.local.remove(pos);
        room.local_count.store(state.local.len(), Ordering::Relaxed);
        let left = PresenceChange::Left {
            socket_id: member.id,
            username: member.username,
        };
        if let Err(e) = self.publish_change(&room, &state.local, left).await {
            tracing::warn!(error = %e.message, "a leave could not be announced");
        }
        if state.local.is_empty() {
            self.forget(&room, &mut state);
        }
    }

    /// Removes every local member from every room, announcing each departure (on shutdown,
    /// where socketioxide closes sockets without running their disconnect handlers).
    pub async fn leave_everyone(&self) {
        let rooms: Vec<Arc<Room>> = self.registry().values().cloned().collect();
        for room in rooms {
            let mut state = room.state.lock().await;
            while let Some(member) = state.local.pop() {
                room.local_count.store(state.local.len(), Ordering::Relaxed);
                let left = PresenceChange::Left {
                    socket_id: member.id,
                    username: member.username,
                };
                if let Err(e) = self.publish_change(&room, &state.local, left).await {
                    tracing::warn!(error = %e.message, "a departure could not be announced");
                }
            }
            self.forget(&room, &mut state);
        }
    }

    /// Everyone in a room this gateway has members in.
    pub async fn users(&self, name: &str) -> Vec<Member> {
        let room = self.registry().get(name).cloned();
        match room {
            Some(room) => room.state.lock().await.users(),
            None => Vec::new(),
        }
    }

    /// Subscribes to the room, then reads the other gateways' member records.
    async fn start_listening(
        self: &Arc<Self>,
        room: &Arc<Room>,
    ) -> Result<(JoinHandle<()>, BTreeMap<GatewayId, Snapshot>), ChatError> {
        let subscriber = self
            .nats
            .subscribe(room.token.room_wildcard())
            .await
            .map_err(|e| presence_unavailable(&e))?;
        let remote = match self.read_remote(&room.token).await {
            Ok(remote) => remote,
            Err(e) => return Err(e),
        };
        let listener = tokio::spawn(self.clone().listen(room.clone(), subscriber));
        Ok((listener, remote))
    }

    async fn read_remote(
        &self,
        token: &RoomToken,
    ) -> Result<BTreeMap<GatewayId, Snapshot>, ChatError> {
        let mut remote = BTreeMap::new();
        let mut subjects = self
            .presence
            .info_with_subjects(token.presence_record_filter())
            .await
            .map_err(|e| presence_unavailable(&e))?;
        let mut found = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _count) = subject.map_err(|e| presence_unavailable(&e))?;
            found.push(subject);
        }
        for subject in found {
            let Some(gateway) = presence_record_gateway(&subject).filter(|g| *g != self.gateway)
            else {
                continue;
            };
            // The record may be purged between listing and reading: then it is simply gone.
            let Ok(record) = self
                .presence
                .get_last_raw_message_by_subject(&subject)
                .await
            else {
                continue;
            };
            match serde_json::from_slice::<Vec<Member>>(&record.payload) {
                Ok(members) => {
                    remote.insert(
                        gateway,
                        Snapshot {
                            revision: record.sequence,
                            members,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, %subject, "undecodable presence record skipped")
                }
            }
        }
        Ok(remote)
    }

    /// Writes this gateway's member list of the room and announces `change` at its revision.
    async fn publish_change(
        &self,
        room: &Room,
        local: &[Member],
        change: PresenceChange,
    ) -> Result<(), ChatError> {
        let revision = self.write_members(&room.token, local).await?;
        self.announce(&room.token, revision, change, local).await;
        Ok(())
    }

    /// Writes this gateway's member list of a room; returns its revision. An empty list is
    /// written (for its revision) and then purged, so departed gateways leave no records.
    async fn write_members(&self, token: &RoomToken, members: &[Member]) -> Result<u64, ChatError> {
        let subject = token.presence_record_subject(&self.gateway);
        let payload = serde_json::to_vec(members).map_err(|e| presence_unavailable(&e))?;
        let ack = self
            .js
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| presence_unavailable(&e))?
            .await
            .map_err(|e| presence_unavailable(&e))?;
        if members.is_empty()
            && let Err(e) = self.presence.purge().filter(subject).await
        {
            tracing::warn!(error = %e, "an empty presence record could not be purged");
        }
        Ok(ack.sequence)
    }

    async fn announce(
        &self,
        token: &RoomToken,
        revision: u64,
        change: PresenceChange,
        members: &[Member],
    ) {
        let event = PresenceEvent {
            gateway: self.gateway.clone(),
            revision,
            change,
            members: members.to_vec(),
        };
        let result = match serde_json::to_vec(&event) {
            Ok(payload) => self
                .nats
                .publish(token.presence_subject(), payload.into())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "a presence change could not be announced");
        }
    }

    /// Delivers the room's subjects to local sockets: chat messages in stream order (see
    /// [`Reorder`]), the rest in the order NATS delivers them.
    async fn listen(self: Arc<Self>, room: Arc<Room>, mut subscriber: async_nats::Subscriber) {
        let mut order = Reorder::default();
        loop {
            let gap_deadline = order.deadline();
            let message = tokio::select! {
                message = subscriber.next() => match message {
                    Some(message) => message,
                    None => break,
                },
                () = sleep_until_some(gap_deadline) => {
                    let held = order.expire();
                    metrics::counter!(m::ORDER_GAPS).increment(1);
                    tracing::debug!(room = %room.name, held = held.len(), "a message never arrived; delivering the ones after it");
                    self.deliver_all(&room, held).await;
                    continue;
                }
            };
            let Some(io) = self.io.get() else { continue };
            match room_event_kind(&message.subject) {
                Some(RoomEventKind::Message) => match republished(&message) {
                    Some((sequence, previous, chat)) => {
                        let ready = order.push(sequence, previous, chat, Instant::now());
                        self.deliver_all(&room, ready).await;
                    }
                    None => tracing::warn!("undecodable chat message on the room subject"),
                },
                Some(RoomEventKind::Typing) => {
                    match serde_json::from_slice::<TypingEvent>(&message.payload) {
                        Ok(event) => {
                            if let Some(others) = except(io, &room.name, &event.socket_id) {
                                log_emit("typing", others.emit("typing", &event.typing).await);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable typing event"),
                    }
                }
                Some(RoomEventKind::Presence) => {
                    match serde_json::from_slice::<PresenceEvent>(&message.payload) {
                        Ok(event) => self.on_presence(io, &room, event).await,
                        Err(e) => tracing::warn!(error = %e, "undecodable presence event"),
                    }
                }
                None => {}
            }
        }
    }

    async fn deliver_all(&self, room: &Room, messages: Vec<ChatMessage>) {
        let Some(io) = self.io.get() else { return };
        for message in messages {
            let Some(to_room) = local_room(io, &room.name) else {
                return;
            };
            let members = room.local_count.load(Ordering::Relaxed);
            metrics::counter!(m::MESSAGES_DELIVERED).increment(members as u64);
            metrics::counter!(m::MESSAGES_FANNED_OUT).increment(1);
            log_emit(
                "receive_message",
                to_room.emit("receive_message", &message).await,
            );
        }
    }

    async fn on_presence(&self, io: &SocketIo, room: &Arc<Room>, event: PresenceEvent) {
        {
            let mut state = room.state.lock().await;
            if state.closed {
                return;
            }
            if event.gateway != self.gateway {
                self.saw_gateway(&event.gateway);
                let newer = state
                    .remote
                    .get(&event.gateway)
                    .is_none_or(|known| event.revision > known.revision);
                if newer {
                    state.remote.insert(
                        event.gateway.clone(),
                        Snapshot {
                            revision: event.revision,
                            members: event.members,
                        },
                    );
                }
            }
        }
        let (text, joiner) = match &event.change {
            PresenceChange::Joined {
                socket_id,
                username,
            } => (
                format!("{username} has joined the chat room"),
                Some(socket_id),
            ),
            PresenceChange::Left { username, .. } => {
                (format!("{username} has left the chat room"), None)
            }
            PresenceChange::Refresh => {
                users_changed(io, room);
                return;
            }
        };
        let notice = Notice::new(&room.name, text);
        let to_others = match joiner {
            Some(joiner) => except(io, &room.name, joiner),
            None => local_room(io, &room.name),
        };
        let Some(to_others) = to_others else { return };
        log_emit(
            "receive_message",
            to_others.emit("receive_message", &notice).await,
        );
        users_changed(io, room);
    }
}

/// Sends the room's local sockets `chatroom_users` within [`USERS_COALESCE`], with the list as
/// it is then; changes until then share the one emission.
fn users_changed(io: &SocketIo, room: &Arc<Room>) {
    if room.users_pending.swap(true, Ordering::AcqRel) {
        return;
    }
    let (io, room) = (io.clone(), room.clone());
    tokio::spawn(async move {
        tokio::time::sleep(USERS_COALESCE).await;
        room.users_pending.store(false, Ordering::Release);
        let users = {
            let state = room.state.lock().await;
            if state.closed {
                return;
            }
            state.users()
        };
        let Some(to_room) = local_room(&io, &room.name) else {
            return;
        };
        log_emit(
            "chatroom_users",
            to_room.emit("chatroom_users", &users).await,
        );
    });
}

/// The room's sockets on this gateway; `None` once the server is closed. `SocketIo::close`
/// removes the namespace, and `SocketIo::to` panics without it, while the room listeners still
/// run during shutdown.
fn local_room(io: &SocketIo, room: &str) -> Option<BroadcastOperators> {
    Some(io.of("/")?.to(room.to_owned()))
}

/// Everyone in the room on this gateway but `socket_id` (when that socket is here); `None` once
/// the server is closed, as [`local_room`].
fn except(io: &SocketIo, room: &str, socket_id: &str) -> Option<BroadcastOperators> {
    let namespace = io.of("/")?;
    Some(
        match Sid::from_str(socket_id)
            .ok()
            .and_then(|sid| namespace.get_socket(sid))
        {
            Some(socket) => socket.to(room.to_owned()),
            None => namespace.to(room.to_owned()),
        },
    )
}

/// A message the stream republished: its sequence, the sequence of the room's message before
/// it, and the message with the id its sequence gives it.
fn republished(message: &async_nats::Message) -> Option<(u64, u64, ChatMessage)> {
    let headers = message.headers.as_ref()?;
    let number = |name| headers.get(name)?.as_str().parse::<u64>().ok();
    let sequence = number(async_nats::header::NATS_SEQUENCE)?;
    let previous = number(async_nats::header::NATS_LAST_SEQUENCE)?;
    let stored = serde_json::from_slice::<StoredMessage>(&message.payload).ok()?;
    Some((sequence, previous, stored.into_message(sequence)))
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn log_emit(event: &'static str, result: Result<(), socketioxide::BroadcastError>) {
    if let Err(e) = result {
        // Typically clients whose outgoing queue is full (they stopped reading): one drop each.
        let sockets = match &e {
            socketioxide::BroadcastError::Socket(failed) => failed.len(),
            _ => 1,
        };
        metrics::counter!(m::DELIVERY_DROPS, "event" => event).increment(sockets as u64);
        tracing::debug!(event, sockets, error = %e, "some sockets could not be sent to");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room listeners outlive `SocketIo::close` during shutdown: what they deliver then
    /// finds no room (it used to panic in `SocketIo::to`).
    #[tokio::test]
    async fn a_closed_server_has_no_rooms_to_deliver_to() {
        let (_layer, io) = SocketIo::new_layer();
        io.ns("/", |_: SocketRef| async {});
        assert!(local_room(&io, "general").is_some());
        assert!(except(&io, "general", "not-a-socket-id").is_some());
        io.close().await;
        assert!(local_room(&io, "general").is_none());
        assert!(except(&io, "general", "not-a-socket-id").is_none());
    }
}
