//! The history service: answers [`HistoryQuery`] requests on the NATS service API, so every
//! running persister shares the load (the service API subscribes in a queue group).

use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use chatify_shared::subjects::{HISTORY_SERVICE, HISTORY_SUBJECT};
use chatify_shared::wire::{HistoryPage, HistoryQuery};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::harperdb::HarperDb;
use crate::recent::{KEEP_PER_ROOM, Recent};
use crate::unwritten::{self, Unwritten};

/// Requests answered at once by one persister; more wait in the subscription.
const CONCURRENT_QUERIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HistoryServiceError {
    #[error("could not register the {HISTORY_SERVICE} service: {0}")]
    Register(String),
}

/// What answers a query: HarperDB, the stream's unwritten tail, and the recent messages.
struct Sources {
    db: HarperDb,
    unwritten: Unwritten,
    recent: Recent,
}

/// Serves history queries until `shutdown`; queries in flight are finished first.
/// `cache` (bytes, rooms) bounds the recent messages kept in memory (see [`crate::recent`]).
pub async fn serve(
    client: async_nats::Client,
    db: HarperDb,
    unwritten: Unwritten,
    cache: (usize, usize),
    shutdown: CancellationToken,
) -> Result<(), HistoryServiceError> {
    let service = client
        .service_builder()
        .description("Chatify message history")
        .start(HISTORY_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| HistoryServiceError::Register(e.to_string()))?;
    let endpoint = service
        .endpoint_builder()
        .name("query")
        .add(HISTORY_SUBJECT)
        .await
        .map_err(|e| HistoryServiceError::Register(e.to_string()))?;
    let sources = Arc::new(Sources {
        db,
        unwritten,
        recent: Recent::new(cache.0, cache.1),
    });
    endpoint
        .take_until(shutdown.cancelled())
        .for_each_concurrent(CONCURRENT_QUERIES, |request| {
            let sources = sources.clone();
            async move {
                let started = std::time::Instant::now();
                let answer = answer(&sources, &request.message.payload).await;
                let outcome = if answer.is_ok() { "ok" } else { "error" };
                metrics::histogram!(crate::metrics::HISTORY_DURATION, "outcome" => outcome)
                    .record(started.elapsed().as_secs_f64());
                if let Err(e) = request.respond(answer).await {
                    tracing::warn!(error = %e, "could not send a history answer");
                }
            }
        })
        .await;
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "could not stop the history service cleanly");
    }
    Ok(())
}

/// Decodes, checks and runs one query. Errors are service errors with HTTP-like codes:
/// 400 for a bad query, 503 when HarperDB can't answer.
async fn answer(sources: &Sources, payload: &[u8]) -> Result<Bytes, service::error::Error> {
    let query: HistoryQuery =
        serde_json::from_slice(payload).map_err(|e| service::error::Error {
            status: format!("invalid history query: {e}"),
            code: 400,
        })?;
    query.validate().map_err(|e| service::error::Error {
        status: format!("invalid history query: {e}"),
        code: 400,
    })?;
    let page = match cached(sources, &query).await {
        Some(page) => {
            metrics::counter!(crate::metrics::HISTORY_CACHE, "outcome" => "hit").increment(1);
            page
        }
        None => {
            metrics::counter!(crate::metrics::HISTORY_CACHE, "outcome" => "miss").increment(1);
            uncached(sources, &query).await?
        }
    };
    let (rooms, bytes) = sources.recent.size();
    metrics::gauge!(crate::metrics::HISTORY_CACHE_ROOMS).set(rooms as f64);
    metrics::gauge!(crate::metrics::HISTORY_CACHE_BYTES).set(bytes as f64);
    serde_json::to_vec(&page)
        .map(Bytes::from)
        .map_err(|e| service::error::Error {
            status: format!("could not encode the answer: {e}"),
            code: 500,
        })
}

fn unavailable(e: &dyn std::fmt::Display) -> service::error::Error {
    tracing::warn!(error = %e, "history query failed");
    service::error::Error {
        status: "message history is unavailable".into(),
        code: 503,
    }
}

/// The answer from the recent messages, brought up to date from the stream, when they hold
/// all of it. Only while HarperDB answers: during an outage history is `unavailable`, as the
/// guarantees promise, cached or not.
async fn cached(sources: &Sources, query: &HistoryQuery) -> Option<HistoryPage> {
    if !sources.db.answering() {
        return None;
    }
    let from = sources.recent.newest(&query.room)?;
    // Each message since the entry's newest is one request to the stream: beyond a room's worth
    // (the room had a busy while since the entry was last brought up to date, and reading it
    // all could outlast the gateway's request timeout) the uncached path answers sooner.
    match sources
        .unwritten
        .room_after(&query.room, from, KEEP_PER_ROOM)
        .await
    {
        Ok(later) => sources.recent.extend_and_answer(query, from, later),
        // Too far behind (more than a room's worth since the entry's newest) or the stream did
        // not answer: the entry goes, and the uncached path answers (a latest page refills it).
        Err(e) => {
            tracing::debug!(error = %e, "recent messages could not be brought up to date");
            sources.recent.forget(&query.room);
            None
        }
    }
}

/// The answer from HarperDB and the unwritten tail. A room's latest page is read
/// [`KEEP_PER_ROOM`] long and kept in the recent messages.
async fn uncached(
    sources: &Sources,
    query: &HistoryQuery,
) -> Result<HistoryPage, service::error::Error> {
    let latest = query.after.is_none() && query.before.is_none();
    let wanted = query.limit as usize;
    let query = &HistoryQuery {
        limit: if latest {
            query.limit.max(KEEP_PER_ROOM as u32)
        } else {
            query.limit
        },
        ..query.clone()
    };
    // The floor first: whatever is at or below it is in HarperDB by the time we query it.
    // Then HarperDB and the stream at once: a message written meanwhile is in both answers,
    // and merging counts it once.
    let floor = sources
        .unwritten
        .floor()
        .await
        .map_err(|e| unavailable(&e))?;
    let (stored, recent) = tokio::join!(
        sources.db.history(query),
        sources
            .unwritten
            .room_after(&query.room, floor, crate::unwritten::MAX_UNWRITTEN)
    );
    let stored = stored.map_err(|e| {
        tracing::warn!(error = %e, room_len = query.room.len(), "history query failed");
        service::error::Error {
            status: if e.is_outage() {
                "message history is unavailable".into()
            } else {
                format!("history query failed: {e}")
            },
            code: 503,
        }
    })?;
    let recent = recent.map_err(|e| unavailable(&e))?;
    let mut page = unwritten::merge(query, stored, recent);
    if latest {
        sources.recent.fill(&query.room, &page, floor);
        // Back to the limit asked for.
        let skip = page.messages.len().saturating_sub(wanted);
        if skip > 0 {
            page.messages.drain(..skip);
            page.has_more = true;
        }
    }
    Ok(page)
}
