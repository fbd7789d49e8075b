//! Who is in a room across gateways: presence records, announcements, and each room's roster.
//!
//! A gateway writes one record per member it has in a room (the member's first connection in
//! the room on that gateway writes it, the last one to leave purges it) and announces each
//! arrival and departure on the room's presence subject as a [`PresenceDelta`]. A join or a
//! leave therefore costs the same whatever the room's size: one record write or purge and one
//! small announcement. A gateway that starts listening to a room subscribes first, then reads
//! the room's records; announcements that arrived meanwhile wait in the subscription and are
//! applied after the records, each only if it is not older than what the gateway knows of
//! that member on that gateway ([`Roster::apply`]).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream::Stream};
use chatify_shared::subjects::{
    GATEWAY_DEAD_SUBJECT, GatewayId, MemberToken, RoomToken, presence_record_gateway,
    presence_records_of,
};
use chatify_shared::wire::{Member, PresenceDelta};
use futures::StreamExt;

use crate::error::ChatError;

/// How long reading a room's records may take before the join answers `unavailable`.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Presence records and announcements of this gateway.
pub struct Presence {
    /// Announcements (core NATS).
    nats: async_nats::Client,
    /// Record writes, acknowledged by JetStream.
    js: jetstream::Context,
    /// The presence stream: one record per member, room and gateway.
    stream: Stream,
    /// This gateway's identity in records and announcements.
    gateway: GatewayId,
}

fn unavailable(e: &dyn std::fmt::Display) -> ChatError {
    tracing::warn!(error = %e, "presence update failed");
    ChatError::unavailable("room membership could not be updated; try again")
}

impl Presence {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        stream: Stream,
        gateway: GatewayId,
    ) -> Self {
        Self {
            nats,
            js,
            stream,
            gateway,
        }
    }

    pub fn gateway(&self) -> &GatewayId {
        &self.gateway
    }

    /// Writes the record of a member who arrived on this gateway; returns its revision.
    pub async fn write(&self, token: &RoomToken, member: &Member) -> Result<u64, ChatError> {
        let subject = token.presence_record_subject(&self.gateway, &MemberToken::new(&member.id));
        let payload = serde_json::to_vec(member).map_err(|e| unavailable(&e))?;
        let ack = self
            .js
            .publish(subject, payload.into())
            .await
            .map_err(|e| unavailable(&e))?
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(ack.sequence)
    }

    /// Purges the record of a member who left this gateway. A failure is logged: the member
    /// has left here whatever happens, and a record left behind is purged with the gateway's
    /// others when it stops.
    pub async fn erase(&self, token: &RoomToken, member_id: &str) {
        let subject = token.presence_record_subject(&self.gateway, &MemberToken::new(member_id));
        if let Err(e) = self.stream.purge().filter(subject).await {
            tracing::warn!(error = %e, "a presence record could not be purged");
        }
    }

    /// Purges every record of this gateway (on shutdown, once its members are announced gone).
    pub async fn erase_all(&self) {
        if let Err(e) = self
            .stream
            .purge()
            .filter(presence_records_of(&self.gateway))
            .await
        {
            tracing::warn!(error = %e, "this gateway's presence records could not be purged");
        }
    }

    /// Announces an arrival or a departure on the room's presence subject.
    pub async fn announce(
        &self,
        token: &RoomToken,
        member: &Member,
        present: bool,
        revision: u64,
        quiet: bool,
    ) {
        let delta = PresenceDelta {
            gateway: self.gateway.clone(),
            member: member.clone(),
            present,
            revision,
            quiet,
        };
        let result = match serde_json::to_vec(&delta) {
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

    /// The other gateways' records of a room: (gateway, member, revision).
    pub async fn read(
        &self,
        token: &RoomToken,
    ) -> Result<Vec<(GatewayId, Member, u64)>, ChatError> {
        tokio::time::timeout(READ_TIMEOUT, self.read_records(token))
            .await
            .map_err(|_| unavailable(&"reading the room's presence records timed out"))?
    }

    async fn read_records(
        &self,
        token: &RoomToken,
    ) -> Result<Vec<(GatewayId, Member, u64)>, ChatError> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: token.presence_record_filter(),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        let mut records = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(records);
        }
        let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| unavailable(&e))?;
            let info = message.info().map_err(|e| unavailable(&e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            match (
                presence_record_gateway(&message.subject),
                serde_json::from_slice::<Member>(&message.payload),
            ) {
                (Some(gateway), Ok(member)) if gateway != self.gateway => {
                    records.push((gateway, member, sequence));
                }
                (Some(_), Ok(_)) => {}
                _ => {
                    tracing::warn!(subject = %message.subject, "undecodable presence record skipped")
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(records)
    }

    /// Tells the other gateways that `gateway` is dead (so one that was only cut off
    /// re-announces its members), and purges its records so no later reader sees them.
    pub async fn declare_dead(&self, gateway: &GatewayId) {
        if let Err(e) = self
            .nats
            .publish(GATEWAY_DEAD_SUBJECT, gateway.to_string().into())
            .await
        {
            tracing::debug!(error = %e, "could not say a gateway is dead");
        }
        if let Err(e) = self
            .stream
            .purge()
            .filter(presence_records_of(gateway))
            .await
        {
            tracing::warn!(error = %e, %gateway, "could not purge a dead gateway's presence records");
        }
    }
}

/// One member of a room, as this gateway knows it.
#[derive(Debug)]
struct Entry {
    username: String,
    /// The member's connections in the room on this gateway.
    local: u32,
    /// The revision of the member's record of this gateway, while `local > 0`.
    local_revision: u64,
    /// The other gateways the member is on, with the revision of each one's record.
    remote: Vec<(GatewayId, u64)>,
}

impl Entry {
    fn present(&self) -> bool {
        self.local > 0 || !self.remote.is_empty()
    }
}

/// What a change did to the room as a whole: the notice it calls for, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The member was in the room nowhere before, and now is.
    Arrived(Member),
    /// The member was in the room somewhere before, and now is nowhere.
    Departed(Member),
    /// The room's membership did not change (another connection or gateway of a member).
    Unchanged,
}

/// Who is in one room across gateways, as this gateway knows it. Every operation costs the
/// same whatever the room's size, but listing it.
#[derive(Debug, Default)]
pub struct Roster {
    members: HashMap<String, Entry>,
}

impl Roster {
    /// Members in the room.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether the member has a connection in the room on this gateway.
    pub fn is_local(&self, member_id: &str) -> bool {
        self.members.get(member_id).is_some_and(|e| e.local > 0)
    }

    /// At most `max` members, with the members of this gateway first.
    pub fn users(&self, max: usize) -> Vec<Member> {
        let mut local: Vec<Member> = Vec::new();
        let mut remote: Vec<Member> = Vec::new();
        for (id, e) in &self.members {
            let member = Member {
                id: id.clone(),
                username: e.username.clone(),
            };
            if e.local > 0 {
                local.push(member)
            } else {
                remote.push(member)
            }
            if local.len() >= max {
                break;
            }
        }
        local.extend(remote);
        local.truncate(max);
        local
    }

    /// The members with connections here, with their records' revisions (to re-announce).
    pub fn local_members(&self) -> Vec<(Member, u64)> {
        self.members
            .iter()
            .filter(|(_, e)| e.local > 0)
            .map(|(id, e)| {
                let member = Member {
                    id: id.clone(),
                    username: e.username.clone(),
                };
                (member, e.local_revision)
            })
            .collect()
    }

    /// One more connection of `member` in the room here. Returns whether it is the member's
    /// first here (then its record must be written: [`Roster::set_local_revision`]) and what
    /// it did to the room.
    pub fn add_local(&mut self, member: &Member) -> (bool, Change) {
        let entry = self
            .members
            .entry(member.id.clone())
            .or_insert_with(|| Entry {
                username: member.username.clone(),
                local: 0,
                local_revision: 0,
                remote: Vec::new(),
            });
        let was_present = entry.present();
        entry.local += 1;
        let change = if was_present {
            Change::Unchanged
        } else {
            Change::Arrived(member.clone())
        };
        (entry.local == 1, change)
    }

    /// The revision of the record written for a member's first connection here.
    pub fn set_local_revision(&mut self, member_id: &str, revision: u64) {
        if let Some(e) = self.members.get_mut(member_id) {
            e.local_revision = revision;
        }
    }

    /// One connection fewer of `member_id` here. Returns, when it was the member's last one
    /// here, the revision of its record (to purge and announce), and what it did to the room.
    pub fn remove_local(&mut self, member_id: &str) -> (Option<u64>, Change) {
        let Some(entry) = self.members.get_mut(member_id) else {
            return (None, Change::Unchanged);
        };
        if entry.local == 0 {
            return (None, Change::Unchanged);
        }
        entry.local -= 1;
        if entry.local > 0 {
            return (None, Change::Unchanged);
        }
        let revision = entry.local_revision;
        (Some(revision), self.forget_if_absent(member_id))
    }

    /// Another gateway's announcement, or a record read from the stream (`present`, without
    /// notices: it is what the room was already). Applied unless what is known of the member
    /// on that gateway is newer.
    pub fn apply(
        &mut self,
        gateway: &GatewayId,
        member: &Member,
        present: bool,
        revision: u64,
    ) -> Change {
        match self.members.get_mut(&member.id) {
            Some(entry) => {
                let known = entry.remote.iter().position(|(g, _)| g == gateway);
                match (known, present) {
                    (Some(at), true) => {
                        let (_, rev) = &mut entry.remote[at];
                        *rev = (*rev).max(revision);
                        Change::Unchanged
                    }
                    (None, true) => {
                        let was_present = entry.present();
                        entry.remote.push((gateway.clone(), revision));
                        if was_present {
                            Change::Unchanged
                        } else {
                            Change::Arrived(member.clone())
                        }
                    }
                    // A departure of the record this gateway knows (or of a newer one).
                    (Some(at), false) if revision >= entry.remote[at].1 => {
                        entry.remote.swap_remove(at);
                        self.forget_if_absent(&member.id)
                    }
                    (_, false) => Change::Unchanged,
                }
            }
            None if present => {
                self.members.insert(
                    member.id.clone(),
                    Entry {
                        username: member.username.clone(),
                        local: 0,
                        local_revision: 0,
                        remote: vec![(gateway.clone(), revision)],
                    },
                );
                Change::Arrived(member.clone())
            }
            None => Change::Unchanged,
        }
    }

    /// A gateway is gone: the members it alone had leave the room (returned).
    pub fn remove_gateway(&mut self, gateway: &GatewayId) -> Vec<Member> {
        let mut departed = Vec::new();
        self.members.retain(|id, e| {
            e.remote.retain(|(g, _)| g != gateway);
            let stays = e.present();
            if !stays {
                departed.push(Member {
                    id: id.clone(),
                    username: e.username.clone(),
                });
            }
            stays
        });
        departed
    }

    fn forget_if_absent(&mut self, member_id: &str) -> Change {
        match self.members.get(member_id) {
            Some(e) if !e.present() => {
                let username = self
                    .members
                    .remove(member_id)
                    .map(|e| e.username)
                    .unwrap_or_default();
                Change::Departed(Member {
                    id: member_id.to_owned(),
                    username,
                })
            }
            _ => Change::Unchanged,
        }
    }
}

/// The notice of a member who joined.
pub fn joined_notice(username: &str) -> String {
    format!("{username} has joined the chat room")
}

/// The notice of a member who left (also when their gateway died).
pub fn left_notice(username: &str) -> String {
    format!("{username} has left the chat room")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.to_owned(),
            username: format!("name-{id}"),
        }
    }

    fn ids(members: &[Member]) -> Vec<String> {
        let mut ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_user_with_several_connections_is_listed_once_and_arrives_and_leaves_once() {
        let mut roster = Roster::default();
        let ann = member("ann");
        assert_eq!(roster.add_local(&ann), (true, Change::Arrived(ann.clone())));
        roster.set_local_revision("ann", 7);
        assert_eq!(roster.add_local(&ann), (false, Change::Unchanged));
        assert_eq!(ids(&roster.users(10)), ["ann"]);
        assert_eq!(roster.remove_local("ann"), (None, Change::Unchanged));
        assert!(roster.is_local("ann"));
        assert_eq!(
            roster.remove_local("ann"),
            (Some(7), Change::Departed(ann.clone()))
        );
        assert!(roster.is_empty());
        assert_eq!(roster.remove_local("ann"), (None, Change::Unchanged));
    }

    #[test]
    fn a_member_on_two_gateways_leaves_the_room_when_the_last_one_says_so() {
        let (g1, g2) = (GatewayId::random(), GatewayId::random());
        let mut roster = Roster::default();
        let ann = member("ann");
        assert_eq!(
            roster.apply(&g1, &ann, true, 3),
            Change::Arrived(ann.clone())
        );
        assert_eq!(roster.apply(&g2, &ann, true, 4), Change::Unchanged);
        assert_eq!(
            roster.add_local(&ann),
            (true, Change::Unchanged),
            "here too: no notice"
        );
        assert_eq!(roster.remove_local("ann").1, Change::Unchanged);
        assert_eq!(roster.apply(&g1, &ann, false, 3), Change::Unchanged);
        assert_eq!(
            roster.apply(&g2, &ann, false, 4),
            Change::Departed(ann.clone())
        );
        assert!(roster.is_empty());
    }

    #[test]
    fn an_older_departure_does_not_undo_a_newer_arrival() {
        let g = GatewayId::random();
        let mut roster = Roster::default();
        let ann = member("ann");
        // Read from the stream: the record of ann's second visit (revision 9).
        assert_eq!(
            roster.apply(&g, &ann, true, 9),
            Change::Arrived(ann.clone())
        );
        // Then, from the subscription, the departure of her first visit (revision 5).
        assert_eq!(roster.apply(&g, &ann, false, 5), Change::Unchanged);
        assert_eq!(ids(&roster.users(10)), ["ann"]);
        // A departure of an unknown member changes nothing.
        assert_eq!(
            roster.apply(&g, &member("bob"), false, 1),
            Change::Unchanged
        );
        assert_eq!(roster.apply(&g, &ann, false, 9), Change::Departed(ann));
    }

    #[test]
    fn a_dead_gateway_takes_only_its_own_members_along() {
        let (g1, g2) = (GatewayId::random(), GatewayId::random());
        let mut roster = Roster::default();
        roster.apply(&g1, &member("ann"), true, 1);
        roster.apply(&g1, &member("bob"), true, 2);
        roster.apply(&g2, &member("bob"), true, 3);
        roster.add_local(&member("cy"));
        assert_eq!(ids(&roster.remove_gateway(&g1)), ["ann"]);
        assert_eq!(ids(&roster.users(10)), ["bob", "cy"]);
    }

    #[test]
    fn listings_are_capped_with_local_members_first() {
        let g = GatewayId::random();
        let mut roster = Roster::default();
        for i in 0..50 {
            roster.apply(&g, &member(&format!("r{i}")), true, i);
        }
        roster.add_local(&member("me"));
        assert_eq!(roster.len(), 51);
        let listed = roster.users(5);
        assert_eq!(listed.len(), 5);
        assert_eq!(listed[0].id, "me");
        assert_eq!(roster.local_members().len(), 1);
    }
}
