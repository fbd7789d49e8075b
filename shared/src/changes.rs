//! Messages that change: edits, deletions and reactions.
//!
//! A change is stored like a message: in the messages stream, on its room's subject, so it has
//! a place in the room's one order (its stream sequence), is durable before it is acknowledged,
//! and reaches every gateway (republished) and the persister (the durable consumer) in that
//! order. Everyone who keeps a message's state — the persister's table, a gateway's room
//! listener — gets it by applying the message's changes in stream order with [`MessageState::apply`],
//! so they all agree; each state remembers the sequence of the last change in it
//! ([`MessageState::version`]), so a change seen twice (a redelivery, a history answer that
//! already holds it) is applied once.
//!
//! Who may make a change (the author, a moderator, a member with access) is the publishing
//! gateway's decision, taken before the change is stored. What a change does depends only on
//! the state it meets, which is why it is decided in order: an edit or a reaction reaching a
//! deleted message does nothing, a user's second identical reaction does nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::ChatMessage;

/// The header that marks a stream message as a [`StoredChange`] (a message has none).
pub const CHANGE_HEADER: &str = "Chatify-Change";

/// What a change does to its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Change {
    /// New text (already checked and trimmed).
    Edit { message: String },
    /// The text is gone; the message stays in history as `{ id, room, createdTime, deleted }`.
    Delete,
    /// `reactor` adds (or takes back) `emoji`. `distinct_max` is the most distinct emoji a
    /// message may carry, as the publishing gateway was configured: every applier uses the
    /// number the change carries, so all of them agree whatever their own settings.
    React {
        emoji: String,
        add: bool,
        #[serde(rename = "distinctMax")]
        distinct_max: u32,
    },
}

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Actor {
    /// The member id ([`crate::wire::Member`]): with auth the token's `sub`, without it the
    /// connection's random id. A reaction is counted once per member id and emoji.
    pub member_id: String,
    pub username: String,
    /// With auth, the user's id (the token's `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// A change as the messages stream holds it, on its room's store subject, with the
/// [`CHANGE_HEADER`] header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredChange {
    pub room: String,
    /// The message changed: a message of the same room, stored before the change.
    pub target: Uuid,
    pub change: Change,
    /// When the gateway accepted it (ms since the epoch): an edit's `editedTime`.
    pub at: i64,
    pub by: Actor,
}

impl StoredChange {
    /// The stream sequence of the message changed (0 if the target is no message id).
    pub fn target_sequence(&self) -> u64 {
        crate::id::sequence_of(&self.target).unwrap_or(0)
    }
}

/// Who reacted with what: for each emoji, the member ids of those who did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reactors(pub BTreeMap<String, BTreeSet<String>>);

impl Reactors {
    /// How many reacted with each emoji (emoji nobody holds any more are left out).
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.0
            .iter()
            .filter(|(_, who)| !who.is_empty())
            .map(|(emoji, who)| (emoji.clone(), u32::try_from(who.len()).unwrap_or(u32::MAX)))
            .collect()
    }

    /// Bytes this takes, roughly: what a cache of states counts.
    pub fn weight(&self) -> usize {
        self.0
            .iter()
            .map(|(e, who)| e.len() + 32 + who.iter().map(|w| w.len() + 32).sum::<usize>())
            .sum()
    }
}

/// A message as it is now: its client view (with `reactions` counts, `editedTime`,
/// `deleted`), who reacted, and the sequence of the last change applied to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageState {
    pub message: ChatMessage,
    #[serde(default)]
    pub reactors: Reactors,
    /// The stream sequence of the last change applied (0: none).
    #[serde(default)]
    pub version: u64,
}

/// What applying one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already in the state (its sequence is not above the state's version): nothing done.
    Seen,
    /// The text was replaced.
    Edited { edited_time: i64 },
    /// The message is deleted now (or already was: deleting twice is no error).
    Deleted,
    /// The reactions after the change; `changed` is false when it changed nothing (a second
    /// identical reaction, or taking back one never made).
    Reacted {
        changed: bool,
        reactions: BTreeMap<String, u32>,
    },
    /// The message is deleted: an edit or a reaction finds nothing to change.
    Gone,
    /// A new emoji beyond the distinct emoji a message may carry.
    TooManyEmoji,
}

impl MessageState {
    /// A message no change has touched yet.
    pub fn new(message: ChatMessage) -> Self {
        Self {
            message,
            reactors: Reactors::default(),
            version: 0,
        }
    }

    /// Applies `change`, stored at stream `sequence`, unless the state already holds it.
    pub fn apply(&mut self, sequence: u64, change: &StoredChange) -> Outcome {
        if sequence <= self.version {
            return Outcome::Seen;
        }
        self.version = sequence;
        let m = &mut self.message;
        match &change.change {
            Change::Delete => {
                if !m.deleted {
                    m.deleted = true;
                    m.username.clear();
                    m.message.clear();
                    m.user_id = None;
                    m.reply_to = None;
                    m.edited_time = None;
                    m.reactions.clear();
                    self.reactors = Reactors::default();
                }
                Outcome::Deleted
            }
            _ if m.deleted => Outcome::Gone,
            Change::Edit { message } => {
                m.message.clone_from(message);
                m.edited_time = Some(change.at);
                Outcome::Edited {
                    edited_time: change.at,
                }
            }
            Change::React {
                emoji,
                add,
                distinct_max,
            } => {
                let reactors = &mut self.reactors.0;
                let member = &change.by.member_id;
                let changed = if *add {
                    let distinct = reactors.values().filter(|w| !w.is_empty()).count();
                    let known = reactors.get(emoji).is_some_and(|w| !w.is_empty());
                    if !known && distinct >= *distinct_max as usize {
                        return Outcome::TooManyEmoji;
                    }
                    reactors
                        .entry(emoji.clone())
                        .or_default()
                        .insert(member.clone())
                } else {
                    let removed = reactors.get_mut(emoji).is_some_and(|w| w.remove(member));
                    if reactors.get(emoji).is_some_and(BTreeSet::is_empty) {
                        reactors.remove(emoji);
                    }
                    removed
                };
                m.reactions = self.reactors.counts();
                Outcome::Reacted {
                    changed,
                    reactions: m.reactions.clone(),
                }
            }
        }
    }
}

/// `message_edited`: a message's new text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageEdited {
    pub room: String,
    pub id: Uuid,
    pub message: String,
    pub edited_time: i64,
}

/// `message_deleted`: a message's text is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDeleted {
    pub room: String,
    pub id: Uuid,
}

/// `reaction`: someone reacted (or took it back); the message's counts after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReactionEvent {
    pub room: String,
    pub id: Uuid,
    pub emoji: String,
    pub add: bool,
    pub reactions: BTreeMap<String, u32>,
    /// With auth, who reacted (the token's `sub`); without auth, `username` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

impl ReactionEvent {
    pub fn new(change: &StoredChange, reactions: BTreeMap<String, u32>) -> Option<Self> {
        let Change::React { emoji, add, .. } = &change.change else {
            return None;
        };
        Some(Self {
            room: change.room.clone(),
            id: change.target,
            emoji: emoji.clone(),
            add: *add,
            reactions,
            user_id: change.by.user_id.clone(),
            username: change
                .by
                .user_id
                .is_none()
                .then(|| change.by.username.clone()),
        })
    }
}

/// One entry of a `join_room` ack's `changes`: what became of a message older than the cursor,
/// after the cursor. Entries are in the order the changes happened; consecutive changes of one
/// message collapse into its latest state of that kind (the last edit, the final counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ChangeEntry {
    #[serde(rename = "edited", rename_all = "camelCase")]
    Edited {
        id: Uuid,
        message: String,
        edited_time: i64,
    },
    #[serde(rename = "deleted")]
    Deleted { id: Uuid },
    #[serde(rename = "reactions")]
    Reactions {
        id: Uuid,
        reactions: BTreeMap<String, u32>,
    },
}

impl ChangeEntry {
    /// The message the entry is about.
    pub fn id(&self) -> Uuid {
        match self {
            Self::Edited { id, .. } | Self::Deleted { id } | Self::Reactions { id, .. } => *id,
        }
    }

    /// The entry for a change that did `outcome`, if it did anything.
    pub fn of(change: &StoredChange, outcome: &Outcome) -> Option<Self> {
        let id = change.target;
        match outcome {
            Outcome::Edited { edited_time } => match &change.change {
                Change::Edit { message } => Some(Self::Edited {
                    id,
                    message: message.clone(),
                    edited_time: *edited_time,
                }),
                _ => None,
            },
            Outcome::Deleted => Some(Self::Deleted { id }),
            Outcome::Reacted {
                changed: true,
                reactions,
            } => Some(Self::Reactions {
                id,
                reactions: reactions.clone(),
            }),
            _ => None,
        }
    }
}

/// Collapses `entries` (in the order their changes happened) so that each message keeps at
/// most one entry of each kind, at the place of its latest; a deletion drops the message's
/// earlier entries. At most `max` entries are kept, the latest; returns whether any were cut.
pub fn collapse(entries: Vec<ChangeEntry>, max: usize) -> (Vec<ChangeEntry>, bool) {
    let kind = |e: &ChangeEntry| match e {
        ChangeEntry::Edited { .. } => 0u8,
        ChangeEntry::Deleted { .. } => 1,
        ChangeEntry::Reactions { .. } => 2,
    };
    let mut latest: BTreeMap<(Uuid, u8), usize> = BTreeMap::new();
    let mut deleted_at: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        latest.insert((e.id(), kind(e)), i);
        if matches!(e, ChangeEntry::Deleted { .. }) {
            deleted_at.insert(e.id(), i);
        }
    }
    let mut kept: Vec<ChangeEntry> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, e)| {
            latest.get(&(e.id(), kind(e))) == Some(i)
                && deleted_at.get(&e.id()).is_none_or(|d| d <= i)
        })
        .map(|(_, e)| e)
        .collect();
    let cut = kept.len() > max;
    if cut {
        kept.drain(..kept.len() - max);
    }
    (kept, cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(seq: u64) -> ChatMessage {
        crate::wire::StoredMessage {
            room: "r".into(),
            username: "ann".into(),
            message: "hello".into(),
            created_time: 1_700_000_000_000,
            user_id: Some("u-ann".into()),
            reply_to: None,
        }
        .into_message(seq)
    }

    fn change(target: &ChatMessage, by: &str, change: Change) -> StoredChange {
        StoredChange {
            room: "r".into(),
            target: target.id,
            change,
            at: 1_700_000_100_000,
            by: Actor {
                member_id: by.into(),
                username: by.into(),
                user_id: Some(by.into()),
            },
        }
    }

    fn react(emoji: &str, add: bool) -> Change {
        Change::React {
            emoji: emoji.into(),
            add,
            distinct_max: 2,
        }
    }

    #[test]
    fn reactions_count_each_member_once_and_can_be_taken_back() {
        let m = message(10);
        let mut s = MessageState::new(m.clone());
        let counts = |o: Outcome| match o {
            Outcome::Reacted { changed, reactions } => (changed, reactions),
            other => panic!("{other:?}"),
        };
        let (changed, r) = counts(s.apply(11, &change(&m, "a", react("👍", true))));
        assert!(changed);
        assert_eq!(r, BTreeMap::from([("👍".to_owned(), 1)]));
        let (changed, r) = counts(s.apply(12, &change(&m, "a", react("👍", true))));
        assert!(!changed, "adding again changes nothing");
        assert_eq!(r["👍"], 1);
        counts(s.apply(13, &change(&m, "b", react("👍", true))));
        let (changed, r) = counts(s.apply(14, &change(&m, "a", react("👍", false))));
        assert!(changed);
        assert_eq!(r["👍"], 1);
        let (changed, _) = counts(s.apply(15, &change(&m, "a", react("👍", false))));
        assert!(!changed, "taking back one never made");
        assert_eq!(s.message.reactions, BTreeMap::from([("👍".to_owned(), 1)]));
    }

    #[test]
    fn a_change_is_applied_once_whatever_the_redeliveries() {
        let m = message(10);
        let mut s = MessageState::new(m.clone());
        let c = change(&m, "a", react("👍", true));
        assert!(matches!(s.apply(11, &c), Outcome::Reacted { .. }));
        assert_eq!(s.apply(11, &c), Outcome::Seen);
        assert_eq!(s.apply(5, &c), Outcome::Seen);
        assert_eq!(s.version, 11);
    }

    #[test]
    fn distinct_emoji_are_bounded_by_the_number_the_change_carries() {
        let m = message(10);
        let mut s = MessageState::new(m.clone());
        s.apply(11, &change(&m, "a", react("1", true)));
        s.apply(12, &change(&m, "a", react("2", true)));
        assert_eq!(
            s.apply(13, &change(&m, "a", react("3", true))),
            Outcome::TooManyEmoji
        );
        assert!(matches!(
            s.apply(14, &change(&m, "b", react("2", true))),
            Outcome::Reacted { changed: true, .. }
        ));
        s.apply(15, &change(&m, "a", react("1", false)));
        assert!(matches!(
            s.apply(16, &change(&m, "a", react("3", true))),
            Outcome::Reacted { changed: true, .. }
        ));
    }

    #[test]
    fn a_deleted_message_keeps_id_room_and_time_only_and_refuses_later_changes() {
        let m = message(10);
        let mut s = MessageState::new(m.clone());
        s.apply(11, &change(&m, "a", react("👍", true)));
        s.apply(
            12,
            &change(
                &m,
                "ann",
                Change::Edit {
                    message: "fixed".into(),
                },
            ),
        );
        assert_eq!(s.message.message, "fixed");
        assert_eq!(s.message.edited_time, Some(1_700_000_100_000));
        assert_eq!(
            s.apply(13, &change(&m, "ann", Change::Delete)),
            Outcome::Deleted
        );
        assert_eq!(
            serde_json::to_value(&s.message).unwrap_or_default(),
            json!({"id": m.id.to_string(), "room": "r", "createdTime": 1_700_000_000_000_i64, "deleted": true})
        );
        assert_eq!(
            s.apply(
                14,
                &change(
                    &m,
                    "ann",
                    Change::Edit {
                        message: "back".into()
                    }
                )
            ),
            Outcome::Gone
        );
        assert_eq!(
            s.apply(15, &change(&m, "b", react("👍", true))),
            Outcome::Gone
        );
        assert_eq!(
            s.apply(16, &change(&m, "ann", Change::Delete)),
            Outcome::Deleted
        );
    }

    #[test]
    fn changes_round_trip_through_json() {
        let m = message(10);
        for c in [
            Change::Edit {
                message: "x".into(),
            },
            Change::Delete,
            react("🎉", false),
        ] {
            let stored = change(&m, "a", c);
            let v = serde_json::to_vec(&stored).unwrap_or_default();
            assert_eq!(
                serde_json::from_slice::<StoredChange>(&v).ok(),
                Some(stored)
            );
        }
        assert_eq!(
            serde_json::to_value(react("🎉", true)).unwrap_or_default(),
            json!({"kind": "react", "emoji": "🎉", "add": true, "distinctMax": 2})
        );
    }

    #[test]
    fn collapsing_keeps_the_latest_of_each_kind_per_message_in_order() {
        let (a, b) = (message(1).id, message(2).id);
        let r = |id, n| ChangeEntry::Reactions {
            id,
            reactions: BTreeMap::from([("x".to_owned(), n)]),
        };
        let e = |id, t: &str, at| ChangeEntry::Edited {
            id,
            message: t.into(),
            edited_time: at,
        };
        let entries = vec![
            r(a, 1),
            e(b, "one", 1),
            r(a, 2),
            e(b, "two", 2),
            r(b, 1),
            ChangeEntry::Deleted { id: a },
            r(b, 2),
        ];
        let (kept, cut) = collapse(entries, 10);
        assert!(!cut);
        assert_eq!(
            kept,
            vec![e(b, "two", 2), ChangeEntry::Deleted { id: a }, r(b, 2)]
        );
        let (kept, cut) = collapse(kept, 2);
        assert!(cut);
        assert_eq!(kept, vec![ChangeEntry::Deleted { id: a }, r(b, 2)]);
        assert_eq!(
            serde_json::to_value(&kept).unwrap_or_default(),
            json!([{"type": "deleted", "id": a.to_string()}, {"type": "reactions", "id": b.to_string(), "reactions": {"x": 2}}])
        );
    }
}
