//! Who is in a room across gateways: presence records and announcements.
//!
//! Each gateway keeps one record per room in the presence stream with its own members of the
//! room, and announces every change on the room's presence subject with the record's revision.
//! A gateway that starts listening to a room subscribes first and then reads the other
//! gateways' records, so it misses no change; keeping the highest revision per gateway
//! ([`RemoteMembers::apply`]) makes the order of the two irrelevant.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, stream::Stream};
use chatify_shared::subjects::{
    GATEWAY_DEAD_SUBJECT, GatewayId, RoomToken, presence_record_gateway, presence_records_of,
};
use chatify_shared::wire::{Member, PresenceChange, PresenceEvent};
use futures::StreamExt;

use crate::error::ChatError;

/// Presence records and announcements of this gateway.
pub struct Presence {
    /// Announcements (core NATS).
    nats: async_nats::Client,
    /// Record writes, acknowledged by JetStream.
    js: jetstream::Context,
    /// The presence stream: per-room, per-gateway member records.
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

    /// Writes this gateway's member list of the room and announces `change` at its revision.
    pub async fn publish_change(
        &self,
        token: &RoomToken,
        local: &[Member],
        change: PresenceChange,
    ) -> Result<(), ChatError> {
        let revision = self.write_members(token, local).await?;
        self.announce(token, revision, change, local).await;
        Ok(())
    }

    /// Writes this gateway's member list of a room; returns its revision. An empty list is
    /// written (for its revision) and then purged, so departed gateways leave no records.
    async fn write_members(&self, token: &RoomToken, members: &[Member]) -> Result<u64, ChatError> {
        let subject = token.presence_record_subject(&self.gateway);
        let payload = serde_json::to_vec(members).map_err(|e| unavailable(&e))?;
        let ack = self
            .js
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| unavailable(&e))?
            .await
            .map_err(|e| unavailable(&e))?;
        if members.is_empty()
            && let Err(e) = self.stream.purge().filter(subject).await
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

    /// The other gateways' member records of a room.
    pub async fn read_remote(&self, token: &RoomToken) -> Result<RemoteMembers, ChatError> {
        let mut remote = RemoteMembers::default();
        let mut subjects = self
            .stream
            .info_with_subjects(token.presence_record_filter())
            .await
            .map_err(|e| unavailable(&e))?;
        let mut found = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _count) = subject.map_err(|e| unavailable(&e))?;
            found.push(subject);
        }
        for subject in found {
            let Some(gateway) = presence_record_gateway(&subject).filter(|g| *g != self.gateway)
            else {
                continue;
            };
            // The record may be purged between listing and reading: then it is simply gone.
            let Ok(record) = self.stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            match serde_json::from_slice::<Vec<Member>>(&record.payload) {
                Ok(members) => {
                    remote.0.insert(
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

/// One other gateway's members of a room, as of a record revision.
struct Snapshot {
    revision: u64,
    members: Vec<Member>,
}

/// The other gateways' members of one room: the newest list known of each.
#[derive(Default)]
pub struct RemoteMembers(BTreeMap<GatewayId, Snapshot>);

impl RemoteMembers {
    /// Takes another gateway's announced list, unless a newer one is known already.
    pub fn apply(&mut self, event: &PresenceEvent) {
        let newer = self
            .0
            .get(&event.gateway)
            .is_none_or(|known| event.revision > known.revision);
        if newer {
            self.0.insert(
                event.gateway.clone(),
                Snapshot {
                    revision: event.revision,
                    members: event.members.clone(),
                },
            );
        }
    }

    /// Forgets a gateway; returns the members it had.
    pub fn remove(&mut self, gateway: &GatewayId) -> Vec<Member> {
        self.0
            .remove(gateway)
            .map(|s| s.members)
            .unwrap_or_default()
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.0.values().flat_map(|s| s.members.iter())
    }
}

/// The `ChatBot` notice text a change gives the room, and the socket that must not get it (a
/// joiner is welcomed instead); `None` for a refresh, which gives no notice.
pub fn notice(change: &PresenceChange) -> Option<(String, Option<&str>)> {
    match change {
        PresenceChange::Joined {
            socket_id,
            username,
        } => Some((
            format!("{username} has joined the chat room"),
            Some(socket_id),
        )),
        PresenceChange::Left { username, .. } => {
            Some((format!("{username} has left the chat room"), None))
        }
        PresenceChange::Refresh => None,
    }
}

/// The notice of a member who left (also when their gateway died).
pub fn left_notice(username: &str) -> String {
    format!("{username} has left the chat room")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(gateway: &GatewayId, revision: u64, names: &[&str]) -> PresenceEvent {
        PresenceEvent {
            gateway: gateway.clone(),
            revision,
            change: PresenceChange::Refresh,
            members: names
                .iter()
                .map(|n| Member {
                    id: format!("id-{n}"),
                    username: (*n).to_owned(),
                })
                .collect(),
        }
    }

    fn names(remote: &RemoteMembers) -> Vec<String> {
        let mut names: Vec<String> = remote.members().map(|m| m.username.clone()).collect();
        names.sort();
        names
    }

    #[test]
    fn the_newest_list_of_each_gateway_wins_whatever_order_they_arrive_in() {
        let (a, b) = (GatewayId::random(), GatewayId::random());
        let mut remote = RemoteMembers::default();
        remote.apply(&event(&a, 5, &["ann", "bob"]));
        remote.apply(&event(&b, 3, &["cy"]));
        remote.apply(&event(&a, 4, &["ann"]));
        assert_eq!(
            names(&remote),
            ["ann", "bob", "cy"],
            "an older list was taken"
        );
        remote.apply(&event(&a, 9, &["bob"]));
        assert_eq!(names(&remote), ["bob", "cy"]);
        assert_eq!(remote.remove(&b).len(), 1);
        assert_eq!(names(&remote), ["bob"]);
        assert!(remote.remove(&b).is_empty());
    }

    #[test]
    fn notices_name_the_member_and_spare_the_joiner() {
        let joined = PresenceChange::Joined {
            socket_id: "s1".into(),
            username: "ann".into(),
        };
        assert_eq!(
            notice(&joined),
            Some(("ann has joined the chat room".to_owned(), Some("s1")))
        );
        let left = PresenceChange::Left {
            socket_id: "s1".into(),
            username: "ann".into(),
        };
        assert_eq!(notice(&left), Some((left_notice("ann"), None)));
        assert_eq!(notice(&PresenceChange::Refresh), None);
    }
}
