//! `edit_message`, `delete_message`, `react`, and the `replyTo` of `send_message`: what a
//! connection may change of a message, decided before the change is stored.
//!
//! The message is looked up first (the room listener's state, or the persisters'): a message
//! of another room, or none, is `not_found`; who may change it is decided here (the author, a
//! moderator, any member with access). The change is then stored in the room's order (see
//! [`chatify_shared::changes`]), and the answer waits until this gateway's listener of the room
//! applied it, in that order, so it tells what the change did among concurrent ones: an edit
//! that lost the race with a deletion is `not_found`, a reaction answers the counts after it.

use std::collections::BTreeMap;
use std::time::Duration;

use chatify_shared::changes::{Actor, Change, MessageState, Outcome, StoredChange};
use chatify_shared::id::now_millis;
use chatify_shared::wire::ErrorCode;
use serde::Serialize;
use uuid::Uuid;

use crate::delivery::fetch_state;
use crate::error::ChatError;
use crate::metrics as m;
use crate::payload::{Edit, React, Target};
use crate::session::Session;
use crate::state::App;
use crate::states::Applied;

/// `edit_message`'s ack.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edited {
    id: Uuid,
    edited_time: i64,
}

/// `delete_message`'s ack.
#[derive(Debug, Serialize)]
pub struct Deleted {
    id: Uuid,
}

/// `react`'s ack: the message's counts after the reaction.
#[derive(Debug, Serialize)]
pub struct Reacted {
    id: Uuid,
    reactions: BTreeMap<String, u32>,
}

fn not_found(id: Uuid, room: &str) -> ChatError {
    ChatError::new(
        ErrorCode::NotFound,
        format!("no message {id} in the room {room:?}"),
    )
}

/// The message `id` of `room` as it is now: the room listener's state when it keeps one, else
/// the persisters'. `not_found` when it is no message of the room.
pub async fn lookup(app: &App, room: &str, id: Uuid) -> Result<MessageState, ChatError> {
    let Some(sequence) = chatify_shared::id::sequence_of(&id) else {
        return Err(not_found(id, room));
    };
    if let Some(state) = app
        .rooms
        .get(room)
        .and_then(|r| r.states().get(sequence))
        .filter(|s| s.message.id == id)
    {
        return Ok(state);
    }
    match fetch_state(&app.bus, room.to_owned(), id).await {
        Ok(Some((state, _))) => Ok(state),
        Ok(None) => Err(not_found(id, room)),
        Err(()) => Err(ChatError::unavailable(
            "the message could not be looked up; try again",
        )),
    }
}

/// Who makes a change: this connection, under the name it joined the room with.
fn actor(session: &Session, username: String) -> Actor {
    Actor {
        member_id: session.member_id.clone(),
        username,
        user_id: session.identity.as_ref().map(|i| i.user_id.clone()),
    }
}

/// Stores `change` and waits for what it did, as this gateway's listener of the room applied
/// it (in the room's order, among the changes of everyone).
async fn store(app: &App, change: StoredChange) -> Result<(StoredChange, Applied), ChatError> {
    let started = std::time::Instant::now();
    let sequence = app.bus.publish_change(&change).await?;
    metrics::histogram!(m::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
    let Some(room) = app.rooms.get(&change.room) else {
        // The connection left the room meanwhile: stored, but nobody here applies it.
        return Ok((change, Applied::Unknown));
    };
    let waiting = room.states().outcome(sequence);
    let applied = match waiting {
        Ok(applied) => applied,
        Err(rx) => {
            let wait = app.bus.request_timeout() + Duration::from_secs(1);
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(applied)) => applied,
                _ => {
                    room.states().abandon(sequence);
                    Applied::Unknown
                }
            }
        }
    };
    Ok((change, applied))
}

/// What every change answers for a message that is gone, or whose outcome is unknown.
fn refused(applied: Applied, change: &StoredChange) -> ChatError {
    match applied {
        Applied::NoSuchMessage | Applied::Done(Outcome::Gone) => {
            not_found(change.target, &change.room)
        }
        Applied::Done(Outcome::TooManyEmoji) => too_many_emoji(change),
        _ => ChatError::unavailable(
            "the change was stored, but what it did could not be read; send it again (it is safe: a change applies once)",
        ),
    }
}

fn too_many_emoji(change: &StoredChange) -> ChatError {
    let max = match change.change {
        Change::React { distinct_max, .. } => distinct_max,
        _ => 0,
    };
    ChatError::invalid(format!("a message carries at most {max} distinct emoji"))
}

/// `edit_message`: the author only, within `limits.edit_window_secs` of sending.
pub async fn edit(
    app: &App,
    session: &Session,
    username: String,
    request: Edit,
) -> Result<Edited, ChatError> {
    let Target { room, id } = request.target;
    let current = lookup(app, &room, id).await?;
    if current.message.deleted {
        return Err(not_found(id, &room));
    }
    if !session.is_author(&current.message) {
        return Err(ChatError::new(
            ErrorCode::Forbidden,
            "only its author may edit a message",
        ));
    }
    let now = now_millis();
    let window =
        i64::try_from(app.limits.edit_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if now.saturating_sub(current.message.created_time) > window {
        return Err(ChatError::new(
            ErrorCode::Forbidden,
            format!(
                "a message may be edited within {} seconds of sending",
                app.limits.edit_window_secs
            ),
        ));
    }
    let change = StoredChange {
        room,
        target: id,
        change: Change::Edit {
            message: request.message,
        },
        at: now,
        by: actor(session, username),
    };
    match store(app, change).await? {
        (_, Applied::Done(Outcome::Edited { edited_time })) => Ok(Edited { id, edited_time }),
        (change, applied) => Err(refused(applied, &change)),
    }
}

/// `delete_message`: the author, or a moderator (a token whose `roles` claim holds
/// `"moderator"`). Deleting a deleted message again answers as the first time.
pub async fn delete(
    app: &App,
    session: &Session,
    username: String,
    request: Target,
) -> Result<Deleted, ChatError> {
    let Target { room, id } = request;
    let current = lookup(app, &room, id).await?;
    if current.message.deleted {
        return Ok(Deleted { id });
    }
    if !session.is_author(&current.message) && !session.grants().moderator {
        return Err(ChatError::new(
            ErrorCode::Forbidden,
            "only its author or a moderator may delete a message",
        ));
    }
    let change = StoredChange {
        room,
        target: id,
        change: Change::Delete,
        at: now_millis(),
        by: actor(session, username),
    };
    match store(app, change).await? {
        (_, Applied::Done(Outcome::Deleted)) => Ok(Deleted { id }),
        (change, applied) => Err(refused(applied, &change)),
    }
}

/// `react`: any member with access; one reaction per member and emoji.
pub async fn react(
    app: &App,
    session: &Session,
    username: String,
    request: React,
) -> Result<Reacted, ChatError> {
    let Target { room, id } = request.target;
    let current = lookup(app, &room, id).await?;
    if current.message.deleted {
        return Err(not_found(id, &room));
    }
    let distinct_max = app.limits.reactions_per_message;
    let change = StoredChange {
        room,
        target: id,
        change: Change::React {
            emoji: request.emoji.clone(),
            add: request.add,
            distinct_max,
        },
        at: now_millis(),
        by: actor(session, username),
    };
    // Refused before it costs a write when the state already tells.
    let new_emoji = !current.message.reactions.contains_key(&request.emoji);
    if request.add && new_emoji && current.message.reactions.len() >= distinct_max as usize {
        return Err(too_many_emoji(&change));
    }
    match store(app, change).await? {
        (_, Applied::Done(Outcome::Reacted { reactions, .. })) => Ok(Reacted { id, reactions }),
        (change, applied) => Err(refused(applied, &change)),
    }
}

/// `send_message`'s `replyTo`: a message of the same room (deleted or not).
pub async fn check_reply(app: &App, room: &str, reply_to: Uuid) -> Result<(), ChatError> {
    lookup(app, room, reply_to).await.map(|_| ())
}
