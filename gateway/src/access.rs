//! Who may use which room: one check that every path into a room goes through (the socket
//! events, the HTTP history route, direct messages).
//!
//! Direct-message rooms are the two users' own whatever the policy. Otherwise, without auth
//! every room is open; with auth the configured policy decides: `open` (every authenticated
//! user), `token` (the token's `rooms` claim lists the room, exactly or by a prefix ending in
//! `*`), or `webhook` (the operator's endpoint answers `POST { userId, username, room, action }`
//! with 2xx to allow and 403 to deny; answers are reused for a while, calls are bounded in time
//! and in number, and an endpoint that cannot be reached answers `unavailable`, never "allowed").

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chatify_shared::config::{AccessPolicy, AccessSettings};
use chatify_shared::wire::ErrorCode;
use lru::LruCache;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::dm;
use crate::error::ChatError;
use crate::metrics as m;
use crate::session::Grants;

/// What a user wants to do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Join,
    Send,
    Typing,
    History,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Send => "send",
            Self::Typing => "typing",
            Self::History => "history",
        }
    }
}

/// The authenticated user asking.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user_id: &'a str,
    pub username: &'a str,
    pub grants: &'a Grants,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("could not build the webhook client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The access check of this gateway.
pub struct Access {
    policy: Policy,
}

enum Policy {
    Open,
    Token,
    Webhook(Box<Webhook>),
}

/// The operator's endpoint, its answers and its bounds.
struct Webhook {
    /// Keep-alive connections to the endpoint, each call bounded by the timeout.
    client: reqwest::Client,
    url: String,
    /// Sent as `Authorization: Bearer`, when set.
    secret: Option<SecretString>,
    /// Answers by (user, room, action): allowed or not, and when the answer was given.
    answers: Mutex<Answers>,
    /// How long an answer is reused.
    reuse: Duration,
    /// Calls in flight at once.
    calls: Semaphore,
    /// How long a check may wait for a call, its turn included.
    timeout: Duration,
}

/// The webhook's answers by (user, room, action): allowed or not, and when.
type Answers = LruCache<(String, String, Action), (bool, Instant)>;

/// What the endpoint is asked.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Question<'a> {
    user_id: &'a str,
    username: &'a str,
    room: &'a str,
    action: &'static str,
}

fn forbidden(room: &str, action: Action) -> ChatError {
    metrics::counter!(m::ACCESS_REFUSALS, "action" => action.as_str()).increment(1);
    ChatError::new(
        ErrorCode::Forbidden,
        format!("you may not {} room {room:?}", action.as_str()),
    )
}

impl Access {
    pub fn from_settings(settings: &AccessSettings) -> Result<Self, AccessError> {
        let policy = match settings.policy {
            AccessPolicy::Open => Policy::Open,
            AccessPolicy::Token => Policy::Token,
            AccessPolicy::Webhook => {
                let timeout = Duration::from_millis(settings.webhook_timeout_ms);
                Policy::Webhook(Box::new(Webhook {
                    client: reqwest::Client::builder()
                        .timeout(timeout)
                        .connect_timeout(timeout)
                        .build()?,
                    url: settings.webhook_url.clone(),
                    secret: settings.webhook_secret.clone(),
                    answers: Mutex::new(LruCache::new(
                        NonZeroUsize::new(settings.webhook_cache_entries)
                            .unwrap_or(NonZeroUsize::MIN),
                    )),
                    reuse: Duration::from_millis(settings.webhook_cache_ms),
                    calls: Semaphore::new(settings.webhook_concurrency),
                    timeout,
                }))
            }
        };
        Ok(Self { policy })
    }

    /// Whether `who` (`None` without auth) may do `action` in `room`: `Ok`, or `forbidden`
    /// (or `unavailable` when the webhook cannot answer).
    pub async fn check(
        &self,
        who: Option<Who<'_>>,
        room: &str,
        action: Action,
    ) -> Result<(), ChatError> {
        if dm::is_dm(room) {
            return match who {
                Some(who) if dm::is_participant(room, who.user_id) => Ok(()),
                _ => Err(forbidden(room, action)),
            };
        }
        let Some(who) = who else {
            return Ok(());
        };
        match &self.policy {
            Policy::Open => Ok(()),
            Policy::Token if token_allows(&who.grants.rooms, room) => Ok(()),
            Policy::Token => Err(forbidden(room, action)),
            Policy::Webhook(webhook) => match webhook.allows(who, room, action).await? {
                true => Ok(()),
                false => Err(forbidden(room, action)),
            },
        }
    }
}

/// Whether a `rooms` claim lists `room`: an entry equal to it, or an entry ending in `*` whose
/// rest starts it (`team-42/*`; `*` alone is every room).
fn token_allows(claim: &[String], room: &str) -> bool {
    claim.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => entry == room,
    })
}

impl Webhook {
    fn answers(&self) -> MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn allows(&self, who: Who<'_>, room: &str, action: Action) -> Result<bool, ChatError> {
        let key = (who.user_id.to_owned(), room.to_owned(), action);
        if let Some((allowed, at)) = self.answers().get(&key).copied()
            && at.elapsed() < self.reuse
        {
            metrics::counter!(m::ACCESS_WEBHOOK_CALLS, "outcome" => "reused").increment(1);
            return Ok(allowed);
        }
        let allowed = tokio::time::timeout(self.timeout, self.ask(who, room, action))
            .await
            .unwrap_or(Err("no answer in time".into()))
            .map_err(|e| {
                metrics::counter!(m::ACCESS_WEBHOOK_CALLS, "outcome" => "error").increment(1);
                tracing::warn!(error = %e, "the access webhook did not answer");
                ChatError::unavailable("room access could not be checked; try again")
            })?;
        let outcome = if allowed { "allowed" } else { "denied" };
        metrics::counter!(m::ACCESS_WEBHOOK_CALLS, "outcome" => outcome).increment(1);
        self.answers().put(key, (allowed, Instant::now()));
        Ok(allowed)
    }

    /// One call: 2xx allows, 403 denies, anything else is an error.
    async fn ask(&self, who: Who<'_>, room: &str, action: Action) -> Result<bool, String> {
        let _turn = self.calls.acquire().await.map_err(|e| e.to_string())?;
        let mut request = self.client.post(&self.url).json(&Question {
            user_id: who.user_id,
            username: who.username,
            room,
            action: action.as_str(),
        });
        if let Some(secret) = &self.secret {
            request = request.bearer_auth(secret.expose_secret());
        }
        let status = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?
            .status();
        match status {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::FORBIDDEN => Ok(false),
            s => Err(format!("the webhook answered {s}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn grants(rooms: &[&str]) -> Grants {
        Grants {
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            moderator: false,
        }
    }

    fn who<'a>(user_id: &'a str, grants: &'a Grants) -> Who<'a> {
        Who {
            user_id,
            username: "name",
            grants,
        }
    }

    fn code(r: Result<(), ChatError>) -> Option<ErrorCode> {
        r.err().map(|e| e.code)
    }

    #[test]
    fn a_rooms_claim_lists_names_and_prefixes() {
        let claim: Vec<String> = ["general", "team-42/*"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert!(token_allows(&claim, "general"));
        assert!(token_allows(&claim, "team-42/"));
        assert!(token_allows(&claim, "team-42/design"));
        assert!(!token_allows(&claim, "general2"));
        assert!(!token_allows(&claim, "team-4"));
        assert!(!token_allows(&claim, "team-421/x"));
        assert!(token_allows(&["*".to_owned()], "anything"));
        assert!(!token_allows(&[], "general"));
    }

    #[tokio::test]
    async fn direct_messages_are_the_two_users_own_under_every_policy() {
        let room = dm::room_of("ann", "bob");
        let all = grants(&["*"]);
        for policy in [AccessPolicy::Open, AccessPolicy::Token] {
            let access = Access::from_settings(&AccessSettings {
                policy,
                ..AccessSettings::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                access
                    .check(Some(who("ann", &all)), &room, Action::Join)
                    .await
                    .is_ok()
            );
            assert!(
                access
                    .check(Some(who("bob", &all)), &room, Action::Send)
                    .await
                    .is_ok()
            );
            assert_eq!(
                code(
                    access
                        .check(Some(who("cy", &all)), &room, Action::History)
                        .await
                ),
                Some(ErrorCode::Forbidden)
            );
            assert_eq!(
                code(access.check(None, &room, Action::Join).await),
                Some(ErrorCode::Forbidden),
                "without auth nobody has direct messages"
            );
            assert_eq!(
                code(
                    access
                        .check(Some(who("ann", &all)), "dm:made-up", Action::Join)
                        .await
                ),
                Some(ErrorCode::Forbidden),
                "the name space is reserved"
            );
        }
    }

    /// A webhook that allows rooms starting with "ok", denies the others, fails for "boom",
    /// and never answers for "slow"; counts its calls.
    async fn webhook() -> Result<(String, Arc<AtomicUsize>), std::io::Error> {
        use axum::{Json, http::StatusCode, routing::post};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/",
            post(move |Json(q): Json<serde_json::Value>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let room = q["room"].as_str().unwrap_or_default().to_owned();
                    if room.starts_with("slow") {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    if room.starts_with("ok") {
                        StatusCode::NO_CONTENT
                    } else if room.starts_with("boom") {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::FORBIDDEN
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((url, calls))
    }

    #[tokio::test]
    async fn webhook_answers_are_reused_and_failures_are_unavailable()
    -> Result<(), Box<dyn std::error::Error>> {
        let (url, calls) = webhook().await?;
        let access = Access::from_settings(&AccessSettings {
            policy: AccessPolicy::Webhook,
            webhook_url: url,
            webhook_timeout_ms: 300,
            ..AccessSettings::default()
        })?;
        let g = grants(&[]);
        let ann = who("ann", &g);
        assert!(access.check(Some(ann), "ok-1", Action::Join).await.is_ok());
        assert!(access.check(Some(ann), "ok-1", Action::Join).await.is_ok());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the second answer was reused"
        );
        assert!(access.check(Some(ann), "ok-1", Action::Send).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "per action");
        assert_eq!(
            code(access.check(Some(ann), "secret", Action::Join).await),
            Some(ErrorCode::Forbidden)
        );
        assert_eq!(
            code(access.check(Some(ann), "secret", Action::Join).await),
            Some(ErrorCode::Forbidden)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3, "a denial is reused too");
        assert_eq!(
            code(access.check(Some(ann), "boom", Action::Join).await),
            Some(ErrorCode::Unavailable)
        );
        let started = Instant::now();
        assert_eq!(
            code(access.check(Some(ann), "slow", Action::Join).await),
            Some(ErrorCode::Unavailable)
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            access.check(None, "secret", Action::Join).await.is_ok(),
            "without auth every room is open"
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_unreachable_webhook_is_unavailable_never_allowed()
    -> Result<(), Box<dyn std::error::Error>> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/", listener.local_addr()?);
        drop(listener);
        let access = Access::from_settings(&AccessSettings {
            policy: AccessPolicy::Webhook,
            webhook_url: url,
            ..AccessSettings::default()
        })?;
        let g = grants(&["*"]);
        assert_eq!(
            code(
                access
                    .check(Some(who("ann", &g)), "general", Action::Join)
                    .await
            ),
            Some(ErrorCode::Unavailable)
        );
        Ok(())
    }
}
