//! History for clients: the page `get_history` and the HTTP route answer, and the messages a
//! join sends. The persisters hold the messages (see [`crate::bus::Bus::history`]).

use chatify_shared::changes::ChangeEntry;
use chatify_shared::wire::{
    ChatMessage, HistoryQuery, JOIN_HISTORY_LEN, SINCE_HISTORY_MAX, UnreadQuery,
};
use serde::Serialize;
use uuid::Uuid;

use crate::bus::Bus;
use crate::error::ChatError;
use crate::payload::HistoryPageRequest;

/// A page of history, newest first.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub messages: Vec<ChatMessage>,
    pub has_more: bool,
}

/// One page back from `before`, newest first.
pub async fn page(bus: &Bus, request: HistoryPageRequest) -> Result<Page, ChatError> {
    let page = bus
        .history(&HistoryQuery {
            room: request.room,
            before: request.before,
            after: None,
            limit: request.limit,
            ..HistoryQuery::default()
        })
        .await?;
    let mut messages = page.messages;
    messages.reverse();
    Ok(Page {
        messages,
        has_more: page.has_more,
    })
}

/// What a join sends.
pub struct OnJoin {
    /// Oldest first, each as it is now.
    pub messages: Vec<ChatMessage>,
    /// With `since`: what changed after it in messages at or before it, in order.
    pub changes: Vec<ChangeEntry>,
    /// Whether older entries of `changes` were left out.
    pub changes_cut: bool,
    /// When asked: the user's unread messages (see [`UnreadQuery`]).
    pub unread: Option<u32>,
}

/// What a join sends: the newest [`JOIN_HISTORY_LEN`] messages, or with `since` the messages
/// after it (at most `since_max`, the newest of them) and the changes after it to older ones.
pub async fn on_join(
    bus: &Bus,
    room: &str,
    since: Option<Uuid>,
    since_max: u32,
    unread: Option<UnreadQuery>,
) -> Result<OnJoin, ChatError> {
    let query = HistoryQuery {
        room: room.to_owned(),
        before: None,
        after: since,
        limit: if since.is_some() {
            since_max.min(SINCE_HISTORY_MAX)
        } else {
            JOIN_HISTORY_LEN
        },
        changes: since.is_some(),
        unread,
        ..HistoryQuery::default()
    };
    let page = bus.history(&query).await?;
    Ok(OnJoin {
        messages: page.messages,
        changes: page.changes,
        changes_cut: page.changes_cut,
        unread: page.unread,
    })
}
