//! Reaching a user wherever they are connected: `dm` notifications, and `read` when the
//! user's read marker moved.
//!
//! Each authenticated connection is in a Socket.IO room of its own user (a name no chat room
//! can have: it starts with a control character), and a gateway listens to a user's NATS
//! subject while it has one of the user's connections. A new message in a direct-message room
//! is announced on both users' subjects; every gateway with a connection of either user emits
//! `dm` to those of that user's connections that are not in the room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chatify_shared::subjects::{user_dm_subject, user_read_subject};
use chatify_shared::wire::{DirectMessage, ReadNotice};
use futures::StreamExt;
use socketioxide::extract::SocketRef;
use tokio::task::JoinHandle;

use crate::registry::Rooms;

/// The Socket.IO room of a user's connections on this gateway.
pub fn user_room(user_id: &str) -> String {
    format!("\u{1}user:{user_id}")
}

/// The users with connections on this gateway, and the listeners of their subjects.
pub struct Users {
    /// Subscribes to users' subjects and publishes notifications.
    nats: async_nats::Client,
    /// By user id: how many connections the user has here, and the task listening to its
    /// subject while there is one.
    here: Mutex<HashMap<String, (usize, JoinHandle<()>)>>,
}

impl Users {
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            here: Mutex::new(HashMap::new()),
        }
    }

    fn here(&self) -> MutexGuard<'_, HashMap<String, (usize, JoinHandle<()>)>> {
        self.here.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection of `user_id` arrived: it joins the user's room, and the gateway listens to
    /// the user's subject if it did not already.
    pub fn arrived(&self, rooms: &Arc<Rooms>, socket: &SocketRef, user_id: &str) {
        socket.join(user_room(user_id));
        let mut here = self.here();
        match here.get_mut(user_id) {
            Some((connections, _)) => *connections += 1,
            None => {
                let listener =
                    tokio::spawn(listen(self.nats.clone(), rooms.clone(), user_id.to_owned()));
                here.insert(user_id.to_owned(), (1, listener));
            }
        }
    }

    /// A connection of `user_id` left; with the user's last one, the listener stops.
    pub fn left(&self, user_id: &str) {
        let mut here = self.here();
        if let Some((connections, _)) = here.get_mut(user_id) {
            *connections -= 1;
            if *connections == 0
                && let Some((_, listener)) = here.remove(user_id)
            {
                listener.abort();
            }
        }
    }

    /// Tells both users of a direct-message room of a new message there. Best effort (core
    /// NATS): the message itself is stored, and the room's history has it.
    pub async fn notify(&self, participants: (&str, &str), dm: &DirectMessage) {
        let payload = match serde_json::to_vec(dm) {
            Ok(payload) => bytes::Bytes::from(payload),
            Err(e) => {
                tracing::warn!(error = %e, "a dm notification could not be encoded");
                return;
            }
        };
        let (a, b) = participants;
        for user in if a == b { vec![a] } else { vec![a, b] } {
            if let Err(e) = self
                .nats
                .publish(user_dm_subject(user), payload.clone())
                .await
            {
                tracing::warn!(error = %e, "a dm notification could not be published");
            }
        }
    }

    /// Tells the user's other connections that its read marker moved. Best effort (core
    /// NATS): the marker itself is stored, and a join tells it.
    pub async fn read(&self, user_id: &str, notice: &ReadNotice) {
        match serde_json::to_vec(notice) {
            Ok(payload) => {
                if let Err(e) = self
                    .nats
                    .publish(user_read_subject(user_id), payload.into())
                    .await
                {
                    tracing::warn!(error = %e, "a read notification could not be published");
                }
            }
            Err(e) => tracing::warn!(error = %e, "a read notification could not be encoded"),
        }
    }
}

/// Emits the user's notifications to its connections here: `dm` to those not in the room,
/// `read` to those but the one that moved the marker.
async fn listen(nats: async_nats::Client, rooms: Arc<Rooms>, user_id: String) {
    let subscribed = tokio::try_join!(
        nats.subscribe(user_dm_subject(&user_id)),
        nats.subscribe(user_read_subject(&user_id)),
    );
    let (dms, reads) = match subscribed {
        Ok(subscribers) => subscribers,
        Err(e) => {
            tracing::warn!(error = %e, "could not listen for a user's notifications");
            return;
        }
    };
    let user_room = user_room(&user_id);
    let mut both = futures::stream::select(dms, reads);
    while let Some(message) = both.next().await {
        if message.subject.ends_with(".read") {
            match serde_json::from_slice::<ReadNotice>(&message.payload) {
                Ok(notice) => {
                    rooms
                        .delivery
                        .emit(&user_room, Some(&notice.socket_id), "read", &notice.marker)
                        .await;
                }
                Err(e) => tracing::warn!(error = %e, "undecodable read notification"),
            }
            continue;
        }
        match serde_json::from_slice::<DirectMessage>(&message.payload) {
            Ok(dm) => rooms.delivery.dm(&user_room, &dm).await,
            Err(e) => tracing::warn!(error = %e, "undecodable dm notification"),
        }
    }
}
