//! Socket.IO handlers: one named handler per client event.
//!
//! Each handler waits for its turn (see [`crate::turns`]), checks the payload, does the work
//! and answers through [`crate::error::reply`]. A bad event is answered with an error and never
//! closes the connection.

use std::sync::Arc;

use chatify_shared::changes::ChangeEntry;
use chatify_shared::id::now_millis;
use chatify_shared::wire::{
    Author, ChatMessage, DirectMessage, ErrorCode, JOIN_HISTORY_LEN, Member, Notice, ReadMarker,
    ReadNotice, SINCE_HISTORY_MAX, StoredMessage, Typing, TypingEvent, UnreadQuery,
};
use serde::Serialize;
use serde_json::Value;
use socketioxide::extract::{SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;
use tracing::Instrument;
use uuid::Uuid;

use crate::access::{Action, Who};
use crate::auth::AuthError;
use crate::bus::{Stored, dedup_key};
use crate::changes;
use crate::dm;
use crate::error::{ChatError, Empty, reply};
use crate::history;
use crate::metrics as m;
use crate::payload;
use crate::session::{Ordered, Session};
use crate::state::App;

/// Why a connection was refused; the text is what the client's `connect_error` says.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Connect middleware: authenticates (when auth is on), then sets the socket up. Runs before
/// the client learns it is connected, so no event can arrive before its handler exists.
pub async fn accept(
    s: SocketRef,
    State(app): State<App>,
    TryData(auth): TryData<Value>,
) -> Result<(), Refused> {
    let identity = match &app.auth {
        Some(authenticator) => match authenticator.verify(auth.as_ref().ok(), &app.limits) {
            Ok(identity) => Some(identity),
            Err(e) => {
                metrics::counter!(m::AUTH_REFUSALS).increment(1);
                tracing::debug!(socket_id = %s.id, reason = %e, "connection refused");
                return Err(Refused::Auth(e));
            }
        },
        None => None,
    };
    let session = Arc::new(Session::new(identity, &app.limits));
    if let Some(identity) = &session.identity {
        app.users.arrived(&app.rooms, &s, &identity.user_id);
    }
    s.extensions.insert(session);
    // One handler for every event rather than one per event: socketioxide keeps a socket's
    // handlers in a map of its own, which cost each idle connection about 0.5 KiB.
    s.on_fallback(dispatch);
    s.on_disconnect(on_disconnect);
    Ok(())
}

/// The client events, each handled by the function of its name; an event of any other name
/// is ignored (not decoded, not answered), as Socket.IO ignores an event nobody listens to.
pub const EVENTS: [&str; 11] = [
    "join_room",
    "send_message",
    "leave_room",
    "get_history",
    "typing",
    "refresh_token",
    "open_dm",
    "edit_message",
    "delete_message",
    "react",
    "mark_read",
];

/// Runs a client event's handler.
async fn dispatch(s: SocketRef, app: State<App>, event: Ordered) {
    match event.name {
        Some("join_room") => join_room(s, app, event).await,
        Some("send_message") => send_message(s, app, event).await,
        Some("leave_room") => leave_room(s, app, event).await,
        Some("get_history") => get_history(s, app, event).await,
        Some("typing") => typing(s, app, event).await,
        Some("refresh_token") => refresh_token(s, app, event).await,
        Some("open_dm") => open_dm(s, app, event).await,
        Some("edit_message") => edit_message(s, app, event).await,
        Some("delete_message") => delete_message(s, app, event).await,
        Some("react") => react(s, app, event).await,
        Some("mark_read") => mark_read(s, app, event).await,
        _ => {}
    }
}

/// Runs once the socket is in the namespace (after [`accept`]).
pub async fn on_connect(s: SocketRef, State(app): State<App>) {
    metrics::counter!(m::CONNECTIONS).increment(1);
    metrics::gauge!(m::CONNECTED_SOCKETS).increment(1);
    tracing::debug!(socket_id = %s.id, "connected");
    // Watched from here, not from `accept`: an expiry due at once (a token accepted within
    // the clock leeway) must find the socket to disconnect.
    if let Some(session) = s.extensions.get::<Arc<Session>>()
        && session.identity.is_some()
    {
        app.expiry.watch(s.id, None, session.expires_at());
    }
}

/// The one access check of every path into a room, for this connection.
async fn allowed(
    app: &App,
    session: &Session,
    room: &str,
    action: Action,
) -> Result<(), ChatError> {
    let grants = session.grants();
    let who = session.identity.as_ref().map(|identity| Who {
        user_id: &identity.user_id,
        username: &identity.name,
        grants: &grants,
    });
    app.access.check(who, room, action).await
}

/// Runs one event in its turn: decode, check auth expiry, `work`, answer.
async fn run<T, F, Fut>(app: App, s: SocketRef, event: Ordered, name: &'static str, work: F)
where
    T: Serialize,
    F: FnOnce(Arc<Session>, Value) -> Fut,
    Fut: Future<Output = Result<T, ChatError>>,
{
    let Ordered {
        name: _,
        payload,
        answer,
        session,
        ticket,
        overflow,
    } = event;
    if overflow {
        metrics::counter!(m::RATE_LIMITED, "event" => name).increment(1);
        let e = ChatError::new(
            ErrorCode::RateLimited,
            format!(
                "too many events waiting: at most {} unanswered per connection",
                app.limits.events_queued_per_socket
            ),
        );
        return reply::<Empty>(answer, name, Err(e));
    }
    let (Some(session), Some(ticket)) = (session, ticket) else {
        let e = ChatError::unavailable("the connection is not set up yet; try again");
        return reply::<Empty>(answer, name, Err(e));
    };
    // Counted from arrival, so shutdown waits for events queued behind a running one too.
    let running = app.lifecycle.begin();
    let _turn = ticket.turn().await;
    if !s.connected() {
        return;
    }
    let Some(_running) = running else {
        let e = ChatError::unavailable("the gateway is shutting down; reconnect and try again");
        return reply::<Empty>(answer, name, Err(e));
    };
    metrics::counter!(m::EVENTS, "event" => name).increment(1);
    // Every log line of the event carries the socket and the event.
    let span = tracing::info_span!("event", socket_id = %s.id, event = name);
    let result = match payload {
        Err(e) => Err(ChatError::invalid(format!(
            "{name} payload could not be decoded: {e}"
        ))),
        Ok(_) if session.expired() => Err(ChatError::new(
            ErrorCode::Unauthorized,
            "your auth token has expired; reconnect with a new one",
        )),
        Ok(v) => work(session, v).instrument(span.clone()).await,
    };
    span.in_scope(|| reply(answer, name, result));
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Joined {
    room: String,
    /// At most `limits.presence_list_max` members.
    users: Vec<Member>,
    /// How many members the room has.
    count: usize,
    history: Vec<ChatMessage>,
    /// With `since`: what changed after it in messages at or before it, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    changes: Option<Vec<ChangeEntry>>,
    /// With `since`: whether older entries of `changes` were left out (more than 1,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    changes_cut: Option<bool>,
    /// With auth: the user's read marker in the room (null: none) and how many messages of
    /// others came after it (at most 1,000).
    #[serde(flatten)]
    read: Option<ReadState>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReadState {
    last_read: Option<Uuid>,
    unread: u32,
}

async fn join_room(s: SocketRef, State(app): State<App>, event: Ordered) {
    let socket = s.clone();
    run(
        app.clone(),
        s,
        event,
        "join_room",
        |session, v| async move {
            let request = payload::join(&v, &app.limits)?;
            let username = match &session.identity {
                Some(identity) => identity.name.clone(),
                None => request
                    .username
                    .ok_or_else(|| ChatError::invalid("username is required"))?,
            };
            let room = request.room;
            let already_in = session.rooms.username_in(&room).is_some();
            if !already_in && session.rooms.count() >= app.limits.rooms_per_socket {
                return Err(ChatError::new(
                    ErrorCode::TooManyRooms,
                    format!(
                        "a connection may be in at most {} rooms",
                        app.limits.rooms_per_socket
                    ),
                ));
            }
            // Joining a room again counts too: it answers with history, which costs.
            if !session.allow_join() {
                metrics::counter!(m::RATE_LIMITED, "event" => "join_room").increment(1);
                return Err(ChatError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many joins: at most {} a second, with bursts of {}",
                        app.limits.joins_per_second, app.limits.join_burst
                    ),
                ));
            }
            allowed(&app, &session, &room, Action::Join).await?;
            // Joined first, then history: nothing stored meanwhile is missed. Without history a
            // (re)joining client would silently miss messages, so a join whose history fails
            // is undone. Joining again gets one page at most, whatever its `since`.
            let history_max = if already_in {
                JOIN_HISTORY_LEN
            } else {
                SINCE_HISTORY_MAX
            };
            let last_read = match &session.identity {
                Some(identity) => Some(app.reads.last(&room, &identity.user_id).await?),
                None => None,
            };
            let unread = session.identity.as_ref().map(|identity| UnreadQuery {
                user_id: identity.user_id.clone(),
                after: last_read.flatten(),
            });
            let history = history::on_join(&app.bus, &room, request.since, history_max, unread);
            let (users, history) = if already_in {
                (app.rooms.users(&room).await, history.await?)
            } else {
                let member = Member {
                    id: session.member_id.clone(),
                    username: username.clone(),
                };
                app.rooms
                    .join(&socket, &session.rooms, &room, &member, history)
                    .await?
            };
            if !already_in {
                let welcome = Notice::new(&room, format!("Welcome {username}"));
                emit(&socket, "receive_message", &welcome);
            }
            emit(&socket, "last_100_messages", &history.messages);
            if !already_in {
                metrics::counter!(m::JOINS).increment(1);
            }
            tracing::debug!(socket_id = %socket.id, room = %room, "joined");
            Ok(Joined {
                room,
                users: users.listed,
                count: users.count,
                history: history.messages,
                changes: request.since.map(|_| history.changes),
                changes_cut: request.since.map(|_| history.changes_cut),
                read: last_read.map(|last_read| ReadState {
                    last_read,
                    unread: history.unread.unwrap_or_default(),
                }),
            })
        },
    )
    .await;
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Sent {
    id: Uuid,
    created_time: i64,
}

async fn send_message(s: SocketRef, State(app): State<App>, event: Ordered) {
    let socket_id = s.id;
    run(app.clone(), s, event, "send_message", |session, v| async move {
        let request = payload::send(&v, &app.limits)?;
        let username = session
            .rooms
            .username_in(&request.room)
            .ok_or_else(|| ChatError::not_in_room(&request.room))?;
        allowed(&app, &session, &request.room, Action::Send).await?;
        if !session.allow_send() {
            metrics::counter!(m::RATE_LIMITED, "event" => "send_message").increment(1);
            return Err(ChatError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many messages: at most {} a second, with bursts of {}",
                    app.limits.messages_per_second, app.limits.message_burst
                ),
            ));
        }
        if let Some(reply_to) = request.reply_to {
            changes::check_reply(&app, &request.room, reply_to).await?;
        }
        let dedup = request.client_id.as_deref().map(|client_id| {
            let scope = match &session.identity {
                Some(identity) => format!("user:{}", identity.user_id),
                None => format!("anon:{username}"),
            };
            dedup_key(&scope, &request.room, client_id)
        });
        let message = StoredMessage {
            room: request.room,
            username,
            message: request.message,
            created_time: now_millis(),
            user_id: session.identity.as_ref().map(|i| i.user_id.clone()),
            reply_to: request.reply_to,
        };
        let started = std::time::Instant::now();
        let stored = app.bus.publish_message(message, dedup).await?;
        metrics::histogram!(m::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
        Ok(match stored {
            Stored::New(message) => {
                metrics::counter!(m::MESSAGES_RECEIVED).increment(1);
                session.sent(message.id);
                tracing::debug!(%socket_id, message_id = %message.id, room = %message.room, "message stored");
                if let (Some((a, b)), Some(identity)) =
                    (dm::participants(&message.room), &session.identity)
                {
                    let notice = DirectMessage {
                        room: message.room.clone(),
                        from: Author {
                            user_id: identity.user_id.clone(),
                            username: message.username.clone(),
                        },
                        message: message.clone(),
                    };
                    app.users.notify((&a, &b), &notice).await;
                }
                Sent {
                    id: message.id,
                    created_time: message.created_time,
                }
            }
            Stored::Duplicate(first) => {
                metrics::counter!(m::DUPLICATE_SENDS).increment(1);
                session.sent(first.id);
                Sent {
                    id: first.id,
                    created_time: first.created_time,
                }
            }
        })
    })
    .await;
}

async fn leave_room(s: SocketRef, State(app): State<App>, event: Ordered) {
    let socket = s.clone();
    run(
        app.clone(),
        s,
        event,
        "leave_room",
        |session, v| async move {
            let room = payload::leave(&v, &app.limits)?;
            app.rooms
                .leave(&socket, &session.rooms, &room, &session.member_id)
                .await?;
            Ok(Empty {})
        },
    )
    .await;
}

async fn get_history(s: SocketRef, State(app): State<App>, event: Ordered) {
    run(
        app.clone(),
        s,
        event,
        "get_history",
        |session, v| async move {
            let request = payload::history(&v, &app.limits)?;
            if !session.allow_history() {
                metrics::counter!(m::RATE_LIMITED, "event" => "get_history").increment(1);
                return Err(ChatError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many history requests: at most {} a second, with bursts of {}",
                        app.limits.history_per_second, app.limits.history_burst
                    ),
                ));
            }
            allowed(&app, &session, &request.room, Action::History).await?;
            history::page(&app.bus, request).await
        },
    )
    .await;
}

async fn typing(s: SocketRef, State(app): State<App>, event: Ordered) {
    let socket_id = s.id.to_string();
    run(app.clone(), s, event, "typing", |session, v| async move {
        let request = payload::typing(&v, &app.limits)?;
        let username = session
            .rooms
            .username_in(&request.room)
            .ok_or_else(|| ChatError::not_in_room(&request.room))?;
        allowed(&app, &session, &request.room, Action::Typing).await?;
        if !session.allow_typing() {
            metrics::counter!(m::RATE_LIMITED, "event" => "typing").increment(1);
            return Err(ChatError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many typing events: at most {} a second, with bursts of {}",
                    app.limits.typing_per_second, app.limits.typing_burst
                ),
            ));
        }
        app.bus
            .publish_typing(&TypingEvent {
                socket_id,
                typing: Typing {
                    room: request.room,
                    username,
                    is_typing: request.is_typing,
                },
            })
            .await?;
        Ok(Empty {})
    })
    .await;
}

/// The checks every change of a message (and a read marker) passes first: the connection is in
/// the room, may do `action` there, and has not used up its changes' rate. Returns the name it
/// joined the room with.
async fn may_change(
    app: &App,
    session: &Session,
    room: &str,
    action: Action,
    event: &'static str,
) -> Result<String, ChatError> {
    let username = session
        .rooms
        .username_in(room)
        .ok_or_else(|| ChatError::not_in_room(room))?;
    allowed(app, session, room, action).await?;
    if !session.allow_change() {
        metrics::counter!(m::RATE_LIMITED, "event" => event).increment(1);
        return Err(ChatError::new(
            ErrorCode::RateLimited,
            format!(
                "too many changes: at most {} a second, with bursts of {} (edits, deletions, reactions and read markers together)",
                app.limits.changes_per_second, app.limits.changes_burst
            ),
        ));
    }
    Ok(username)
}

/// `edit_message { room, id, message }`.
async fn edit_message(s: SocketRef, State(app): State<App>, event: Ordered) {
    run(
        app.clone(),
        s,
        event,
        "edit_message",
        |session, v| async move {
            let request = payload::edit(&v, &app.limits)?;
            let username = may_change(
                &app,
                &session,
                &request.target.room,
                Action::Send,
                "edit_message",
            )
            .await?;
            changes::edit(&app, &session, username, request).await
        },
    )
    .await;
}

/// `delete_message { room, id }`.
async fn delete_message(s: SocketRef, State(app): State<App>, event: Ordered) {
    run(
        app.clone(),
        s,
        event,
        "delete_message",
        |session, v| async move {
            let request = payload::delete(&v, &app.limits)?;
            let username = may_change(
                &app,
                &session,
                &request.room,
                Action::Send,
                "delete_message",
            )
            .await?;
            changes::delete(&app, &session, username, request).await
        },
    )
    .await;
}

/// `react { room, id, emoji, add }`.
async fn react(s: SocketRef, State(app): State<App>, event: Ordered) {
    run(app.clone(), s, event, "react", |session, v| async move {
        let request = payload::react(&v, &app.limits)?;
        let username =
            may_change(&app, &session, &request.target.room, Action::Send, "react").await?;
        changes::react(&app, &session, username, request).await
    })
    .await;
}

/// `mark_read { room, id }` (with auth): moves the user's read marker in the room forward;
/// the user's other connections get `read`.
async fn mark_read(s: SocketRef, State(app): State<App>, event: Ordered) {
    let socket_id = s.id.to_string();
    run(
        app.clone(),
        s,
        event,
        "mark_read",
        |session, v| async move {
            let Some(identity) = &session.identity else {
                return Err(ChatError::invalid(
                    "mark_read needs auth, which is off on this server",
                ));
            };
            let request = payload::mark_read(&v, &app.limits)?;
            may_change(&app, &session, &request.room, Action::History, "mark_read").await?;
            changes::lookup(&app, &request.room, request.id).await?;
            if app
                .reads
                .mark(&request.room, &identity.user_id, request.id)
                .await?
            {
                let notice = ReadNotice {
                    socket_id,
                    marker: ReadMarker {
                        room: request.room,
                        id: request.id,
                    },
                };
                app.users.read(&identity.user_id, &notice).await;
            }
            Ok(Empty {})
        },
    )
    .await;
}

#[derive(Serialize)]
struct DmRoom {
    /// The private room of the two users.
    room: String,
}

/// `open_dm { userId }`: the direct-message room of this user and `userId`.
async fn open_dm(s: SocketRef, State(app): State<App>, event: Ordered) {
    run(app.clone(), s, event, "open_dm", |session, v| async move {
        let Some(identity) = &session.identity else {
            return Err(ChatError::new(
                ErrorCode::Forbidden,
                "direct messages need auth, which is off on this server",
            ));
        };
        let other = payload::open_dm(&v)?;
        if other == identity.user_id {
            return Err(ChatError::invalid("a direct message needs another user"));
        }
        Ok(DmRoom {
            room: dm::room_of(&identity.user_id, &other),
        })
    })
    .await;
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Refreshed {
    /// The connection's new expiry, seconds since the epoch.
    expires_at: u64,
    /// The rooms the new token no longer grants, which the connection left.
    left_rooms: Vec<String>,
}

/// `refresh_token { token }`: a new token of the same user extends the connection's life.
async fn refresh_token(s: SocketRef, State(app): State<App>, event: Ordered) {
    let sid = s.id;
    let socket = s.clone();
    run(
        app.clone(),
        s,
        event,
        "refresh_token",
        |session, v| async move {
            let (Some(authenticator), Some(identity)) = (&app.auth, &session.identity) else {
                return Err(ChatError::invalid(
                    "refresh_token needs auth, which is off on this server",
                ));
            };
            let token = payload::refresh(&v)?;
            let fresh = authenticator
                .verify_token(&token, &app.limits)
                .map_err(|e| ChatError::new(ErrorCode::Unauthorized, e.to_string()))?;
            if fresh.user_id != identity.user_id {
                return Err(ChatError::new(
                    ErrorCode::Unauthorized,
                    "the token is for another user",
                ));
            }
            let previous = session.refresh(&fresh);
            app.expiry.watch(sid, Some(previous), fresh.expires_at);
            // The new token's grants count for rooms already joined too: the connection leaves
            // those it may no longer join (with the usual notice).
            let mut left_rooms = Vec::new();
            for room in session.rooms.names() {
                match allowed(&app, &session, &room, Action::Join).await {
                    Err(e) if e.code == ErrorCode::Forbidden => {
                        app.rooms
                            .leave(&socket, &session.rooms, &room, &session.member_id)
                            .await?;
                        left_rooms.push(room);
                    }
                    _ => {}
                }
            }
            Ok(Refreshed {
                expires_at: fresh.expires_at,
                left_rooms,
            })
        },
    )
    .await;
}

/// Leaves every room (after the socket's pending events), so the others get the notices.
async fn on_disconnect(s: SocketRef, State(app): State<App>, reason: DisconnectReason) {
    metrics::gauge!(m::CONNECTED_SOCKETS).decrement(1);
    tracing::debug!(socket_id = %s.id, ?reason, "disconnected");
    let Some(session) = s.extensions.get::<Arc<Session>>() else {
        return;
    };
    if let Some(identity) = &session.identity {
        app.expiry.forget(s.id, session.expires_at());
        app.users.left(&identity.user_id);
    }
    let _turn = session.sequencer.ticket().turn().await;
    app.rooms
        .leave_all(&s, &session.rooms, &session.member_id)
        .await;
}

fn emit<T: Serialize + ?Sized>(socket: &SocketRef, event: &'static str, data: &T) {
    if let Err(e) = socket.emit(event, data) {
        metrics::counter!(m::DELIVERY_DROPS, "event" => event).increment(1);
        tracing::debug!(socket_id = %socket.id, event, error = %e, "could not emit");
    }
}
