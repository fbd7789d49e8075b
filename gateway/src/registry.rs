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
use chatify_shared::wire::{Member, PresenceDelta};
use socketioxide::extract::SocketRef;
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::delivery::{self, Delivery};
use crate::error::ChatError;
use crate::liveness::Liveness;
use crate::metrics as m;
use crate::presence::{self, Change, Presence, Roster};
use crate::states::RoomStates;

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

    /// The rooms, by name.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|(name, _)| name.clone()).collect()
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
    /// Number of local sockets in the room, readable without the state lock (delivery metrics).
    pub local_count: AtomicUsize,
    /// Serializes membership changes of this room on this gateway.
    state: tokio::sync::Mutex<RoomState>,
    /// Set while a `chatroom_users` or `room_presence` emission is scheduled (see
    /// [`delivery::users_changed`]).
    pub users_pending: AtomicBool,
    /// The states of messages changed lately, which the listener keeps to apply changes in
    /// order; and what each change did, for the handler that made it.
    states: Mutex<RoomStates>,
}

#[derive(Default)]
struct RoomState {
    /// Set when the last local member left and the room was dropped from the registry; a
    /// joiner that finds it set starts over with a fresh entry.
    closed: bool,
    /// Who is in the room, here and on the other gateways.
    roster: Roster,
    /// The member count last sent as `room_presence` (large rooms), so an unchanged count is
    /// not sent again.
    count_sent: Option<usize>,
    /// The task delivering the room's subjects to local sockets.
    listener: Option<JoinHandle<()>>,
}

/// Who is in a room, as a join ack and `chatroom_users` tell it.
pub struct Users {
    /// At most `limits.presence_list_max` members.
    pub listed: Vec<Member>,
    /// How many members the room has.
    pub count: usize,
}

/// What a room's local sockets are to be told of its members now.
pub enum UsersUpdate {
    /// `chatroom_users`: the whole list (a room of at most `presence_list_max` members).
    List(Vec<Member>),
    /// `room_presence`: the count (a larger room), which changed since it was last sent.
    Count(usize),
}

impl Room {
    fn new(name: &str, states_bytes: usize) -> Self {
        Self {
            name: name.to_owned(),
            token: RoomToken::new(name),
            local_count: AtomicUsize::new(0),
            state: tokio::sync::Mutex::new(RoomState::default()),
            users_pending: AtomicBool::new(false),
            states: Mutex::new(RoomStates::new(states_bytes)),
        }
    }

    /// The room's message states and change outcomes.
    pub fn states(&self) -> MutexGuard<'_, RoomStates> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the room is listed to its members (else they get its count).
    fn listed(count: usize, list_max: usize) -> bool {
        count <= list_max
    }

    /// What the local sockets are to be told now, if anything; `None` once the room was
    /// dropped here, or when a large room's count has not changed.
    pub async fn users_update(&self, list_max: usize) -> Option<UsersUpdate> {
        let mut state = self.state.lock().await;
        if state.closed {
            return None;
        }
        let count = state.roster.len();
        if Self::listed(count, list_max) {
            state.count_sent = None;
            return Some(UsersUpdate::List(state.roster.users(list_max)));
        }
        if state.count_sent == Some(count) {
            return None;
        }
        state.count_sent = Some(count);
        Some(UsersUpdate::Count(count))
    }
}

/// The registry of rooms this gateway has members in.
pub struct Rooms {
    /// Emits to local sockets.
    pub delivery: Delivery,
    /// Presence records and announcements.
    presence: Presence,
    /// When the other gateways were last heard of.
    pub liveness: Arc<Liveness>,
    /// Subscribes to rooms' subjects.
    nats: async_nats::Client,
    /// Rooms with at least one local member (or being joined).
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    /// Rooms with more members than this are not listed to their members, only counted, and
    /// have no join and leave notices.
    pub list_max: usize,
    /// Where a listener reads the state of a message changed here for the first time.
    pub bus: Bus,
    /// Bytes of message states each room keeps (`gateway.message_states_bytes_per_room`).
    states_bytes: usize,
}

impl Rooms {
    pub fn new(
        nats: async_nats::Client,
        presence: Presence,
        list_max: usize,
        bus: Bus,
        states_bytes: usize,
    ) -> Self {
        let liveness = Arc::new(Liveness::new(presence.gateway().clone()));
        Self {
            delivery: Delivery::default(),
            presence,
            liveness,
            nats,
            rooms: Mutex::new(HashMap::new()),
            list_max,
            bus,
            states_bytes,
        }
    }

    /// The room of that name, if this gateway has members in it.
    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.registry().get(name).cloned()
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
            .or_insert_with(|| Arc::new(Room::new(name, self.states_bytes)))
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

    /// Whether the room has more members than are listed to them.
    pub async fn is_large(&self, room: &Room) -> bool {
        !Room::listed(room.state.lock().await.roster.len(), self.list_max)
    }

    /// Who is in a room this gateway has members in.
    pub async fn users(&self, name: &str) -> Users {
        let room = self.registry().get(name).cloned();
        let Some(room) = room else {
            return Users {
                listed: Vec::new(),
                count: 0,
            };
        };
        let state = room.state.lock().await;
        Users {
            listed: state.roster.users(self.list_max),
            count: state.roster.len(),
        }
    }

    /// Adds the socket to a room as `member` and announces it, then runs `then` (the join's
    /// history), which must succeed for the join to stand: if it fails, the socket leaves again
    /// and its error is returned. Returns who is in the room and what `then` gave.
    pub async fn join<T>(
        self: &Arc<Self>,
        socket: &SocketRef,
        rooms: &SocketRooms,
        name: &str,
        member: &Member,
        then: impl Future<Output = Result<T, ChatError>>,
    ) -> Result<(Users, T), ChatError> {
        let users = self.add(socket, name, member).await?;
        rooms.add(name, &member.username);
        match then.await {
            Ok(value) => Ok((users, value)),
            Err(e) => {
                rooms.remove(name);
                self.remove(socket, name, member).await;
                Err(e)
            }
        }
    }

    /// Takes the socket out of a room and announces it; `not_in_room` if it was not in it.
    pub async fn leave(
        self: &Arc<Self>,
        socket: &SocketRef,
        rooms: &SocketRooms,
        name: &str,
        member_id: &str,
    ) -> Result<(), ChatError> {
        let Some(username) = rooms.username_in(name) else {
            return Err(ChatError::not_in_room(name));
        };
        rooms.remove(name);
        let member = Member {
            id: member_id.to_owned(),
            username,
        };
        self.remove(socket, name, &member).await;
        Ok(())
    }

    /// Takes the socket out of every room it is in (on disconnect).
    pub async fn leave_all(
        self: &Arc<Self>,
        socket: &SocketRef,
        rooms: &SocketRooms,
        member_id: &str,
    ) {
        for (name, username) in rooms.take() {
            let member = Member {
                id: member_id.to_owned(),
                username,
            };
            self.remove(socket, &name, &member).await;
        }
    }

    /// Adds a local socket to a room and announces the member if it is new here.
    async fn add(
        self: &Arc<Self>,
        socket: &SocketRef,
        name: &str,
        member: &Member,
    ) -> Result<Users, ChatError> {
        loop {
            let room = self.entry(name);
            let mut state = room.state.lock().await;
            if state.closed {
                continue;
            }
            if state.listener.is_none() {
                if let Err(e) = self.start_listening(&room, &mut state).await {
                    if room.local_count.load(Ordering::Relaxed) == 0 {
                        self.forget(&room, &mut state);
                    }
                    return Err(e);
                }
                metrics::gauge!(m::ROOMS).set(self.len() as f64);
            }
            let (first_here, change) = state.roster.add_local(member);
            socket.join(name.to_owned());
            room.local_count.fetch_add(1, Ordering::Relaxed);
            if first_here {
                match self.presence.write(&room.token, member).await {
                    Ok(revision) => {
                        state.roster.set_local_revision(&member.id, revision);
                        self.presence
                            .announce(&room.token, member, true, revision, false)
                            .await;
                    }
                    Err(e) => {
                        state.roster.remove_local(&member.id);
                        socket.leave(name.to_owned());
                        if room.local_count.fetch_sub(1, Ordering::Relaxed) == 1 {
                            self.forget(&room, &mut state);
                        }
                        return Err(e);
                    }
                }
            }
            let count = state.roster.len();
            if let Change::Arrived(m) = change
                && Room::listed(count, self.list_max)
            {
                let text = presence::joined_notice(&m.username);
                let joiner = socket.id.to_string();
                self.delivery.notice(&room.name, text, Some(&joiner)).await;
            }
            delivery::users_changed(self, &room);
            return Ok(Users {
                listed: state.roster.users(self.list_max),
                count,
            });
        }
    }

    /// Removes a local socket from a room, and announces the member's departure from this
    /// gateway if it was its last connection here. The socket is out of the room locally
    /// whatever happens; a failed announcement is logged.
    async fn remove(self: &Arc<Self>, socket: &SocketRef, name: &str, member: &Member) {
        let Some(room) = self.registry().get(name).cloned() else {
            return;
        };
        let mut state = room.state.lock().await;
        socket.leave(name.to_owned());
        let count_before = state.roster.len();
        let (last_here, change) = state.roster.remove_local(&member.id);
        if let Some(revision) = last_here {
            self.presence.erase(&room.token, &member.id).await;
            self.presence
                .announce(&room.token, member, false, revision, false)
                .await;
        }
        if let Change::Departed(m) = change
            && Room::listed(count_before, self.list_max)
        {
            let text = presence::left_notice(&m.username);
            self.delivery.notice(&room.name, text, None).await;
        }
        delivery::users_changed(self, &room);
        if room.local_count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.forget(&room, &mut state);
        }
    }

    /// Announces every local member's departure from every room and purges this gateway's
    /// records (on shutdown, where socketioxide closes sockets without running their disconnect
    /// handlers).
    pub async fn leave_everyone(&self) {
        for room in self.all() {
            let mut state = room.state.lock().await;
            for (member, revision) in state.roster.local_members() {
                self.presence
                    .announce(&room.token, &member, false, revision, false)
                    .await;
            }
            room.local_count.store(0, Ordering::Relaxed);
            self.forget(&room, &mut state);
        }
        self.presence.erase_all().await;
    }

    /// Rewrites this gateway's member records and re-announces them, without notices.
    pub async fn refresh_all(&self) {
        for room in self.all() {
            let mut state = room.state.lock().await;
            if state.closed {
                continue;
            }
            for (member, _) in state.roster.local_members() {
                match self.presence.write(&room.token, &member).await {
                    Ok(revision) => {
                        state.roster.set_local_revision(&member.id, revision);
                        self.presence
                            .announce(&room.token, &member, true, revision, true)
                            .await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "a member could not be re-announced");
                    }
                }
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
            let mut state = room.state.lock().await;
            if state.closed {
                continue;
            }
            let count_before = state.roster.len();
            let departed = state.roster.remove_gateway(gateway);
            if departed.is_empty() {
                continue;
            }
            if Room::listed(count_before, self.list_max) {
                for member in departed {
                    let text = presence::left_notice(&member.username);
                    self.delivery.notice(&room.name, text, None).await;
                }
            }
            delivery::users_changed(self, &room);
        }
    }

    /// Subscribes to the room, reads the other gateways' records into its roster, then starts
    /// the room's listener (announcements that came meanwhile wait in the subscription).
    async fn start_listening(
        self: &Arc<Self>,
        room: &Arc<Room>,
        state: &mut RoomState,
    ) -> Result<(), ChatError> {
        let subscriber = self
            .nats
            .subscribe(room.token.room_wildcard())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "could not subscribe to a room");
                ChatError::unavailable("room membership could not be updated; try again")
            })?;
        for (gateway, member, revision) in self.presence.read(&room.token).await? {
            self.liveness.saw(&gateway);
            state.roster.apply(&gateway, &member, true, revision);
        }
        state.listener = Some(tokio::spawn(delivery::listen(
            self.clone(),
            room.clone(),
            subscriber,
        )));
        Ok(())
    }

    /// Another gateway's announcement on a room's subject, with the notices and the fresh
    /// member list it gives the room's local sockets.
    pub async fn on_presence(self: &Arc<Self>, room: &Arc<Room>, delta: PresenceDelta) {
        if delta.gateway == *self.gateway() {
            return;
        }
        self.liveness.saw(&delta.gateway);
        let mut state = room.state.lock().await;
        if state.closed {
            return;
        }
        let count_before = state.roster.len();
        let change =
            state
                .roster
                .apply(&delta.gateway, &delta.member, delta.present, delta.revision);
        let count = state.roster.len();
        if !delta.quiet {
            let text = match change {
                Change::Arrived(m) if Room::listed(count, self.list_max) => {
                    Some(presence::joined_notice(&m.username))
                }
                Change::Departed(m) if Room::listed(count_before, self.list_max) => {
                    Some(presence::left_notice(&m.username))
                }
                _ => None,
            };
            if let Some(text) = text {
                self.delivery.notice(&room.name, text, None).await;
            }
        }
        if count != count_before || !delta.quiet {
            delivery::users_changed(self, room);
        }
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
