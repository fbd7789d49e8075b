//! Delivery to this gateway's sockets: each room with local members has one listener task on
//! the room's subjects, which hands stored messages (in stream order, see [`Reorder`]), typing
//! and presence changes to the room's local sockets.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chatify_shared::changes::{
    CHANGE_HEADER, Change, MessageDeleted, MessageEdited, MessageState, Outcome, ReactionEvent,
    StoredChange,
};
use chatify_shared::subjects::{RoomEventKind, room_event_kind};
use chatify_shared::wire::{
    ChatMessage, DirectMessage, HistoryQuery, Notice, PresenceDelta, RoomPresence, StoredMessage,
    Typing, TypingEvent,
};
use futures::StreamExt;
use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::operators::BroadcastOperators;
use socketioxide::socket::Sid;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::bus::Bus;
use crate::metrics as m;
use crate::order::Reorder;
use crate::registry::{Room, Rooms, UsersUpdate};
use crate::states::{Applied, Step};

/// How long a membership change waits for others before the room gets `chatroom_users`. Each
/// emission carries the whole list to every member, so a join storm of n members would send n
/// lists of up to n entries to each of them (n² entries per member) and overflow their outgoing
/// queues, join acks included; coalesced, a storm sends one list per interval.
const USERS_COALESCE: Duration = Duration::from_millis(50);

/// Emits to this gateway's sockets.
#[derive(Default)]
pub struct Delivery {
    /// The Socket.IO server; set once it exists (it is built after the registry).
    io: OnceLock<SocketIo>,
}

impl Delivery {
    pub fn set_io(&self, io: SocketIo) {
        let _ = self.io.set(io);
    }

    /// The room's sockets on this gateway; `None` before the server exists and once it is
    /// closed. `SocketIo::close` removes the namespace, and `SocketIo::to` panics without it,
    /// while the room listeners still run during shutdown.
    fn to_room(&self, room: &str) -> Option<BroadcastOperators> {
        Some(self.io.get()?.of("/")?.to(room.to_owned()))
    }

    /// Everyone in the room on this gateway but `socket_id` (when that socket is here); `None`
    /// as [`Delivery::to_room`].
    fn to_others(&self, room: &str, socket_id: &str) -> Option<BroadcastOperators> {
        let namespace = self.io.get()?.of("/")?;
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

    /// Emits `event` to the room's local sockets, but `except` (a socket id) when given.
    pub async fn emit<T: Serialize + ?Sized>(
        &self,
        room: &str,
        except: Option<&str>,
        event: &'static str,
        data: &T,
    ) {
        let to = match except {
            Some(socket_id) => self.to_others(room, socket_id),
            None => self.to_room(room),
        };
        if let Some(to) = to {
            log_emit(event, to.emit(event, data).await);
        }
    }

    /// `dm` to the sockets of a user's room that are not in the notification's room.
    pub async fn dm(&self, user_room: &str, dm: &DirectMessage) {
        let Some(namespace) = self.io.get().and_then(|io| io.of("/")) else {
            return;
        };
        let to = namespace.to(user_room.to_owned()).except(dm.room.clone());
        let sockets = to.clone().sockets().len();
        metrics::counter!(m::DIRECT_MESSAGES).increment(sockets as u64);
        log_emit("dm", to.emit("dm", dm).await);
    }

    /// A `ChatBot` notice to the room's local sockets, but `except`.
    pub async fn notice(&self, room: &str, text: String, except: Option<&str>) {
        let notice = Notice::new(room, text);
        self.emit(room, except, "receive_message", &notice).await;
    }

    async fn message(&self, room: &Room, message: &ChatMessage) {
        let members = room.local_count.load(Ordering::Relaxed);
        metrics::counter!(m::MESSAGES_DELIVERED).increment(members as u64);
        metrics::counter!(m::MESSAGES_FANNED_OUT).increment(1);
        self.emit(&room.name, None, "receive_message", message)
            .await;
    }

    /// Tells the room's local sockets what a change did: `message_edited`, `message_deleted`
    /// or `reaction`; nothing for a change that did nothing. A change whose message's state
    /// could not be read is told as it was made when it needs no state (an edit, a deletion).
    pub async fn change(&self, room: &str, change: &StoredChange, applied: &Applied) {
        let outcome = match applied {
            Applied::Done(outcome) => outcome,
            Applied::NoSuchMessage => return,
            Applied::Unknown => {
                metrics::counter!(m::CHANGES_UNTOLD).increment(1);
                match &change.change {
                    Change::Edit { .. } => &Outcome::Edited {
                        edited_time: change.at,
                    },
                    Change::Delete => &Outcome::Deleted,
                    Change::React { .. } => return,
                }
            }
        };
        match (outcome, &change.change) {
            (Outcome::Edited { edited_time }, Change::Edit { message }) => {
                let event = MessageEdited {
                    room: room.to_owned(),
                    id: change.target,
                    message: message.clone(),
                    edited_time: *edited_time,
                };
                self.emit(room, None, "message_edited", &event).await;
            }
            (Outcome::Deleted, _) => {
                let event = MessageDeleted {
                    room: room.to_owned(),
                    id: change.target,
                };
                self.emit(room, None, "message_deleted", &event).await;
            }
            (
                Outcome::Reacted {
                    changed: true,
                    reactions,
                },
                _,
            ) => {
                if let Some(event) = ReactionEvent::new(change, reactions.clone()) {
                    self.emit(room, None, "reaction", &event).await;
                }
            }
            _ => {}
        }
    }
}

/// How long `typing` waits before going out to a room's local sockets: the changes of a room
/// within it go out together, the latest of each typist's only.
const TYPING_COALESCE: Duration = Duration::from_millis(250);

/// The most typists whose `typing` a room's local sockets get per [`TYPING_COALESCE`]: the
/// latest ones. Typing is never stored; what a crowd of typists sends beyond this is dropped.
const TYPISTS_PER_FLUSH: usize = 20;

/// The `typing` changes of one room waiting to go out, latest last.
#[derive(Default)]
struct PendingTyping {
    /// (the typist's socket, which must not get it back; what it says).
    changes: Vec<(String, Typing)>,
    /// When they go out; `None` while nothing waits.
    deadline: Option<Instant>,
}

impl PendingTyping {
    fn add(&mut self, event: TypingEvent, now: Instant) {
        self.changes
            .retain(|(socket, _)| *socket != event.socket_id);
        self.changes.push((event.socket_id, event.typing));
        if self.changes.len() > TYPISTS_PER_FLUSH {
            self.changes.remove(0);
        }
        self.deadline.get_or_insert(now + TYPING_COALESCE);
    }

    fn take(&mut self) -> Vec<(String, Typing)> {
        self.deadline = None;
        std::mem::take(&mut self.changes)
    }
}

/// How long a change in a room above `presence_list_max` members waits before its members get
/// the new count: `room_presence` goes out at most once a second.
const COUNT_COALESCE: Duration = Duration::from_secs(1);

/// Tells the room's local sockets who is in it now: `chatroom_users` within [`USERS_COALESCE`]
/// (changes until then share the one emission), or for a room above `presence_list_max`
/// members, `room_presence` within [`COUNT_COALESCE`] if the count changed.
pub fn users_changed(rooms: &Arc<Rooms>, room: &Arc<Room>) {
    if room.users_pending.swap(true, Ordering::AcqRel) {
        return;
    }
    let (rooms, room) = (rooms.clone(), room.clone());
    tokio::spawn(async move {
        let large = room.local_count.load(Ordering::Relaxed) > 0 && rooms.is_large(&room).await;
        let wait = if large {
            COUNT_COALESCE
        } else {
            USERS_COALESCE
        };
        tokio::time::sleep(wait).await;
        room.users_pending.store(false, Ordering::Release);
        match room.users_update(rooms.list_max).await {
            Some(UsersUpdate::List(users)) => {
                rooms
                    .delivery
                    .emit(&room.name, None, "chatroom_users", &users)
                    .await;
            }
            Some(UsersUpdate::Count(count)) => {
                let presence = RoomPresence {
                    room: room.name.clone(),
                    count,
                };
                rooms
                    .delivery
                    .emit(&room.name, None, "room_presence", &presence)
                    .await;
            }
            None => {}
        }
    });
}

/// Delivers the room's subjects to local sockets until the subscription ends or the task is
/// aborted (when the room's last local member leaves): chat messages in stream order (see
/// [`Reorder`]), the rest in the order NATS delivers them.
///
/// Every room has one of these waiting, so what it awaits in turn is boxed: the task holds
/// only what it keeps between events (about 3 KiB per room otherwise, mostly idle).
pub async fn listen(rooms: Arc<Rooms>, room: Arc<Room>, mut subscriber: async_nats::Subscriber) {
    let mut order = Reorder::default();
    let mut typing = PendingTyping::default();
    // States of messages fetched for changes: (the message's sequence, what was read). Boxed:
    // a channel allocates room for 32 of its items up front, and a state inline made that
    // 7 KiB in every room, changed or not.
    let (fetched_tx, mut fetched) = mpsc::unbounded_channel::<Box<(u64, FetchedState)>>();
    loop {
        let gap_deadline = order.deadline();
        let message = tokio::select! {
            message = subscriber.next() => match message {
                Some(message) => message,
                None => break,
            },
            Some(fetched) = fetched.recv() => {
                let (target, state) = *fetched;
                let done = room.states().fetched(target, state);
                for (change, applied) in done {
                    metrics::counter!(m::CHANGES_APPLIED, "outcome" => outcome_label(&applied)).increment(1);
                    Box::pin(rooms.delivery.change(&room.name, &change, &applied)).await;
                }
                continue;
            }
            () = sleep_until_some(typing.deadline) => {
                for (typist, change) in typing.take() {
                    Box::pin(rooms.delivery.emit(&room.name, Some(&typist), "typing", &change)).await;
                }
                continue;
            }
            () = sleep_until_some(gap_deadline) => {
                let held = order.expire();
                metrics::counter!(m::ORDER_GAPS).increment(1);
                tracing::debug!(room = %room.name, held = held.len(), "a message never arrived; delivering the ones after it");
                // A change may have been lost too: the states kept may miss it.
                room.states().forget_states();
                Box::pin(deliver(&rooms, &room, held, &fetched_tx)).await;
                continue;
            }
        };
        match room_event_kind(&message.subject) {
            Some(RoomEventKind::Message) => match republished(&message) {
                Some((sequence, previous, event)) => {
                    let ready = order.push(sequence, previous, event, Instant::now());
                    Box::pin(deliver(&rooms, &room, ready, &fetched_tx)).await;
                }
                None => tracing::warn!("undecodable chat message on the room subject"),
            },
            Some(RoomEventKind::Typing) => {
                match serde_json::from_slice::<TypingEvent>(&message.payload) {
                    Ok(event) => typing.add(event, Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "undecodable typing event"),
                }
            }
            Some(RoomEventKind::Presence) => {
                match serde_json::from_slice::<PresenceDelta>(&message.payload) {
                    Ok(delta) => Box::pin(rooms.on_presence(&room, delta)).await,
                    Err(e) => tracing::warn!(error = %e, "undecodable presence event"),
                }
            }
            None => {}
        }
    }
}

/// What the stream stores for a room: a message, or a change to one (at its sequence).
enum RoomEvent {
    Message(ChatMessage),
    Change(u64, StoredChange),
}

/// Hands released events to the room's local sockets, in order: messages as they are;
/// changes applied to the messages' states first (a state not kept here is fetched, and the
/// changes to it wait for it, in order).
async fn deliver(
    rooms: &Arc<Rooms>,
    room: &Arc<Room>,
    events: Vec<RoomEvent>,
    fetched: &mpsc::UnboundedSender<Box<(u64, FetchedState)>>,
) {
    for event in events {
        match event {
            RoomEvent::Message(message) => {
                // A message the stream just delivered has no change before it: its state is
                // known here, and changes made soon after it apply without a fetch.
                if let Some(sequence) = chatify_shared::id::sequence_of(&message.id) {
                    room.states().message(sequence, &message);
                }
                rooms.delivery.message(room, &message).await;
            }
            RoomEvent::Change(sequence, change) => {
                let step = room.states().change(sequence, change.clone());
                match step {
                    Step::Applied(applied) => {
                        metrics::counter!(m::CHANGES_APPLIED, "outcome" => outcome_label(&applied))
                            .increment(1);
                        rooms.delivery.change(&room.name, &change, &applied).await;
                    }
                    Step::Waiting => {}
                    Step::Fetch => {
                        let target = change.target_sequence();
                        let (bus, fetched) = (rooms.bus.clone(), fetched.clone());
                        let name = room.name.clone();
                        tokio::spawn(async move {
                            let state = fetch_state(&bus, name, change.target).await;
                            let _ = fetched.send(Box::new((target, state)));
                        });
                    }
                }
            }
        }
    }
}

/// A message's state read from the persisters, and the sequence it is complete up to; `None`
/// when it is no message of the room; `Err` when it could not be read.
pub type FetchedState = Result<Option<(MessageState, u64)>, ()>;

/// Reads a message's state from the persisters.
pub async fn fetch_state(bus: &Bus, room: String, id: Uuid) -> FetchedState {
    let query = HistoryQuery {
        room,
        ids: vec![id],
        limit: 1,
        ..HistoryQuery::default()
    };
    match bus.history(&query).await {
        Ok(page) => Ok(page
            .states
            .into_iter()
            .find(|s| s.message.id == id)
            .map(|s| (s, page.as_of))),
        Err(e) => {
            tracing::debug!(error = %e.message, "a message's state could not be read");
            Err(())
        }
    }
}

/// The `outcome` label of [`m::CHANGES_APPLIED`].
fn outcome_label(applied: &Applied) -> &'static str {
    match applied {
        Applied::Done(Outcome::Seen) => "seen",
        Applied::Done(Outcome::Edited { .. }) => "edited",
        Applied::Done(Outcome::Deleted) => "deleted",
        Applied::Done(Outcome::Reacted { changed: true, .. }) => "reacted",
        Applied::Done(Outcome::Reacted { changed: false, .. }) => "unchanged",
        Applied::Done(Outcome::Gone) => "gone",
        Applied::Done(Outcome::TooManyEmoji) => "too_many_emoji",
        Applied::NoSuchMessage => "no_such_message",
        Applied::Unknown => "unknown",
    }
}

/// An event the stream republished: its sequence, the sequence of the room's event before it,
/// and the message (with the id its sequence gives it) or change.
fn republished(message: &async_nats::Message) -> Option<(u64, u64, RoomEvent)> {
    let headers = message.headers.as_ref()?;
    let number = |name| headers.get(name)?.as_str().parse::<u64>().ok();
    let sequence = number(async_nats::header::NATS_SEQUENCE)?;
    let previous = number(async_nats::header::NATS_LAST_SEQUENCE)?;
    if headers.get(CHANGE_HEADER).is_some() {
        let change = serde_json::from_slice::<StoredChange>(&message.payload).ok()?;
        return Some((sequence, previous, RoomEvent::Change(sequence, change)));
    }
    let stored = serde_json::from_slice::<StoredMessage>(&message.payload).ok()?;
    Some((
        sequence,
        previous,
        RoomEvent::Message(stored.into_message(sequence)),
    ))
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
    use socketioxide::extract::SocketRef;

    fn typing(socket: &str, username: &str, is_typing: bool) -> TypingEvent {
        TypingEvent {
            socket_id: socket.into(),
            typing: Typing {
                room: "r".into(),
                username: username.into(),
                is_typing,
            },
        }
    }

    #[test]
    fn typing_goes_out_once_per_interval_the_latest_of_each_typist() {
        let now = Instant::now();
        let mut pending = PendingTyping::default();
        assert_eq!(pending.deadline, None);
        pending.add(typing("s1", "ann", true), now);
        pending.add(typing("s2", "bob", true), now + Duration::from_millis(10));
        pending.add(typing("s1", "ann", false), now + Duration::from_millis(20));
        assert_eq!(
            pending.deadline,
            Some(now + TYPING_COALESCE),
            "from the first"
        );
        let out = pending.take();
        assert_eq!(
            out.iter()
                .map(|(s, t)| (s.as_str(), t.is_typing))
                .collect::<Vec<_>>(),
            [("s2", true), ("s1", false)]
        );
        assert_eq!(pending.deadline, None);
        for i in 0..100 {
            pending.add(typing(&format!("s{i}"), "x", true), now);
        }
        let out = pending.take();
        assert_eq!(out.len(), TYPISTS_PER_FLUSH);
        assert_eq!(
            out.last().map(|(s, _)| s.as_str()),
            Some("s99"),
            "the latest kept"
        );
    }

    /// The room listeners outlive `SocketIo::close` during shutdown: what they deliver then
    /// finds no room (it used to panic in `SocketIo::to`).
    #[tokio::test]
    async fn a_closed_server_has_no_rooms_to_deliver_to() {
        let delivery = Delivery::default();
        assert!(delivery.to_room("general").is_none(), "no server yet");
        let (_layer, io) = SocketIo::new_layer();
        io.ns("/", |_: SocketRef| async {});
        delivery.set_io(io.clone());
        assert!(delivery.to_room("general").is_some());
        assert!(delivery.to_others("general", "not-a-socket-id").is_some());
        io.close().await;
        assert!(delivery.to_room("general").is_none());
        assert!(delivery.to_others("general", "not-a-socket-id").is_none());
    }
}
