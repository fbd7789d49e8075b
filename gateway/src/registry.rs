//! The rooms this gateway has members in, and the one owner of membership.
//!
//! A socket's membership lives in three places, which only this module changes, together: the
//! socket's own list ([`SocketRooms`], for its events), the room's local members ([`Room`], for
//! member lists and presence records) and socketioxide's room (for fan-out). A gateway listens
//! to a room's subjects only while one of its own sockets is in the room (see
//! [`crate::delivery`]), so its NATS traffic follows its members' interest.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chatify_shared::subjects::{GatewayId, RoomToken};
use chatify_shared::wire::{Member, PresenceChange, PresenceEvent};
use socketioxide::extract::SocketRef;
use tokio::task::JoinHandle;

use crate::delivery::{self, Delivery};
use crate::error::ChatError;
use crate::liveness::Liveness;
use crate::metrics as m;
use crate::presence::{self, Presence, RemoteMembers};

/// The rooms a socket is in, with the name it uses in each.
///
/// A list, not a map: a socket is in a few rooms (at most `limits.rooms_per_socket`), and a
/// map's first allocation (four buckets) is four times a one-room list's. Only this socket's
/// (serialized) events change it, through [`Rooms`].
#[derive(Default)]
pub struct SocketRooms(Mutex<Vec<(String, String)>>);

impl SocketRooms {
    fn lock(&self) -> MutexGuard<'_, Vec<(String, String)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name this socket joined `room` with, if it is in it.
    pub fn username_in(&self, room: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(name, _)| name == room)
            .map(|(_, username)| username.clone())
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn add(&self, room: &str, username: &str) {
        self.lock().push((room.to_owned(), username.to_owned()));
    }

    fn remove(&self, room: &str) -> bool {
        let mut rooms = self.lock();
        match rooms.iter().position(|(name, _)| name == room) {
            Some(at) => {
                rooms.swap_remove(at);
                true
            }
            None => false,
        }
    }

    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.lock())
    }
}

/// One room this gateway has members in.
pub struct Room {
    pub name: String,
    pub token: RoomToken,
    /// Number of local members, readable without the state lock (delivery metrics).
    pub local_count: AtomicUsize,
    /// Serializes membership changes of this room on this gateway.
    state: tokio::sync::Mutex<RoomState>,
    /// Set while a `chatroom_users` emission is scheduled (see [`delivery::users_changed`]).
    pub users_pending: AtomicBool,
}

#[derive(Default)]
struct RoomState {
    /// Set when the last local member left and the room was dropped from the registry; a
    /// joiner that finds it set starts over with a fresh entry.
    closed: bool,
    /// This gateway's members, in join order.
    local: Vec<Member>,
    /// The other gateways' members.
    remote: RemoteMembers,
    /// The task delivering the room's subjects to local sockets.
    listener: Option<JoinHandle<()>>,
}

impl RoomState {
    fn users(&self) -> Vec<Member> {
        self.local
            .iter()
            .chain(self.remote.members())
            .cloned()
            .collect()
    }
}

impl Room {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            token: RoomToken::new(name),
            local_count: AtomicUsize::new(0),
            state: tokio::sync::Mutex::new(RoomState::default()),
            users_pending: AtomicBool::new(false),
        }
    }

    /// Everyone in the room across gateways; `None` once the room was dropped here.
    pub async fn users(&self) -> Option<Vec<Member>> {
        let state = self.state.lock().await;
        (!state.closed).then(|| state.users())
    }
}

/// The registry of rooms this gateway has members in.
pub struct Rooms {
    /// Emits to local sockets.
    pub delivery: Delivery,
    /// Presence records and announcements.
    presence: Presence,
    /// When the other gateways were last heard of.
    pub liveness: Liveness,
    /// Subscribes to rooms' subjects.
    nats: async_nats::Client,
    /// Rooms with at least one local member (or being joined).
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

impl Rooms {
    pub fn new(nats: async_nats::Client, presence: Presence) -> Self {
        let liveness = Liveness::new(presence.gateway().clone());
        Self {
            delivery: Delivery::default(),
            presence,
            liveness,
            nats,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    pub fn gateway(&self) -> &GatewayId {
        self.presence.gateway()
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<String, Arc<Room>>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn all(&self) -> Vec<Arc<Room>> {
        self.registry().values().cloned().collect()
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
            .or_insert_with(|| Arc::new(Room::new(name)))
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

    /// Everyone in a room this gateway has members in.
    pub async fn users(&self, name: &str) -> Vec<Member> {
        let room = self.registry().get(name).cloned();
        match room {
            Some(room) => room.users().await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Adds the socket to a room as `username` and announces it, then runs `then` (the join's
    /// history), which must succeed for the join to stand: if it fails, the socket leaves again
    /// and its error is returned. Returns everyone in the room and what `then` gave.
    pub async fn join<T>(
        self: &Arc<Self>,
        socket: &SocketRef,
        rooms: &SocketRooms,
        name: &str,
        username: &str,
        then: impl Future<Output = Result<T, ChatError>>,
    ) -> Result<(Vec<Member>, T), ChatError> {
        let users = self.add(socket, name, username).await?;
        rooms.add(name, username);
        match then.await {
            Ok(value) => Ok((users, value)),
            Err(e) => {
                rooms.remove(name);
                self.remove(socket, name).await;
                Err(e)
            }
        }
    }

    /// Takes the socket out of a room and announces it; `not_in_room` if it was not in it.
    pub async fn leave(
        &self,
        socket: &SocketRef,
        rooms: &SocketRooms,
        name: &str,
    ) -> Result<(), ChatError> {
        if !rooms.remove(name) {
            return Err(ChatError::not_in_room(name));
        }
        self.remove(socket, name).await;
        Ok(())
    }

    /// Takes the socket out of every room it is in (on disconnect).
    pub async fn leave_all(&self, socket: &SocketRef, rooms: &SocketRooms) {
        for (name, _username) in rooms.take() {
            self.remove(socket, &name).await;
        }
    }

    /// Adds a local socket to a room and announces it; returns everyone in the room.
    async fn add(
        self: &Arc<Self>,
        socket: &SocketRef,
        name: &str,
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
            match self
                .presence
                .publish_change(&room.token, &state.local, joined)
                .await
            {
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
    async fn remove(&self, socket: &SocketRef, name: &str) {
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
        if let Err(e) = self
            .presence
            .publish_change(&room.token, &state.local, left)
            .await
        {
            tracing::warn!(error = %e.message, "a leave could not be announced");
        }
        if state.local.is_empty() {
            self.forget(&room, &mut state);
        }
    }

    /// Removes every local member from every room, announcing each departure (on shutdown,
    /// where socketioxide closes sockets without running their disconnect handlers).
    pub async fn leave_everyone(&self) {
        for room in self.all() {
            let mut state = room.state.lock().await;
            while let Some(member) = state.local.pop() {
                room.local_count.store(state.local.len(), Ordering::Relaxed);
                let left = PresenceChange::Left {
                    socket_id: member.id,
                    username: member.username,
                };
                if let Err(e) = self
                    .presence
                    .publish_change(&room.token, &state.local, left)
                    .await
                {
                    tracing::warn!(error = %e.message, "a departure could not be announced");
                }
            }
            self.forget(&room, &mut state);
        }
    }

    /// Rewrites this gateway's member records and re-announces them, without notices.
    pub async fn refresh_all(&self) {
        for room in self.all() {
            let state = room.state.lock().await;
            if state.closed || state.local.is_empty() {
                continue;
            }
            let refresh = PresenceChange::Refresh;
            if let Err(e) = self
                .presence
                .publish_change(&room.token, &state.local, refresh)
                .await
            {
                tracing::warn!(error = %e.message, "members could not be re-announced");
            }
        }
    }

    /// Drops a dead gateway's members from every room here, with the usual `has left` notices,
    /// and purges its presence records so no later reader sees them.
    pub async fn drop_gateway(self: &Arc<Self>, gateway: &GatewayId) {
        tracing::warn!(%gateway, "gateway stopped sending heartbeats; dropping its members");
        metrics::counter!(m::DEAD_GATEWAYS).increment(1);
        self.presence.declare_dead(gateway).await;
        for room in self.all() {
            let gone = {
                let mut state = room.state.lock().await;
                if state.closed {
                    continue;
                }
                state.remote.remove(gateway)
            };
            if gone.is_empty() {
                continue;
            }
            for member in gone {
                self.delivery
                    .notice(&room.name, presence::left_notice(&member.username), None)
                    .await;
            }
            delivery::users_changed(self, &room);
        }
    }

    /// Subscribes to the room, then reads the other gateways' member records.
    async fn start_listening(
        self: &Arc<Self>,
        room: &Arc<Room>,
    ) -> Result<(JoinHandle<()>, RemoteMembers), ChatError> {
        let subscriber = self
            .nats
            .subscribe(room.token.room_wildcard())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "could not subscribe to a room");
                ChatError::unavailable("room membership could not be updated; try again")
            })?;
        let remote = self.presence.read_remote(&room.token).await?;
        let listener = tokio::spawn(delivery::listen(self.clone(), room.clone(), subscriber));
        Ok((listener, remote))
    }

    /// A presence announcement on a room's subject: the announcing gateway's new member list,
    /// and the notices and fresh `chatroom_users` it gives the room's local sockets.
    pub async fn on_presence(self: &Arc<Self>, room: &Arc<Room>, event: PresenceEvent) {
        {
            let mut state = room.state.lock().await;
            if state.closed {
                return;
            }
            if event.gateway != *self.gateway() {
                self.liveness.saw(&event.gateway);
                state.remote.apply(&event);
            }
        }
        if let Some((text, except)) = presence::notice(&event.change) {
            self.delivery.notice(&room.name, text, except).await;
        }
        delivery::users_changed(self, room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_keeps_the_name_it_used_in_each_room() {
        let rooms = SocketRooms::default();
        rooms.add("a.b", "ann");
        rooms.add("*", "bob");
        assert_eq!(rooms.count(), 2);
        assert_eq!(rooms.username_in("a.b").as_deref(), Some("ann"));
        assert_eq!(rooms.username_in("*").as_deref(), Some("bob"));
        assert_eq!(rooms.username_in("a"), None);
        assert!(rooms.remove("a.b"));
        assert!(!rooms.remove("a.b"), "removed twice");
        rooms.add(">", "cy");
        let mut all = rooms.take();
        all.sort();
        assert_eq!(
            all,
            [
                ("*".to_owned(), "bob".to_owned()),
                (">".to_owned(), "cy".to_owned())
            ]
        );
        assert_eq!(rooms.count(), 0);
    }
}
