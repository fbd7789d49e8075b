//! The history service: answers [`HistoryQuery`] requests on the NATS service API, so every
//! running persister shares the load (the service API subscribes in a queue group).

use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use chatify_shared::subjects::{HISTORY_SERVICE, HISTORY_SUBJECT};
use chatify_shared::wire::{HistoryQuery, SINCE_HISTORY_MAX};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::harperdb::{HarperDb, HarperError};
use crate::unwritten::{self, Unwritten};

/// Requests answered at once by one persister; more wait in the subscription.
const CONCURRENT_QUERIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HistoryServiceError {
    #[error("could not register the {HISTORY_SERVICE} service: {0}")]
    Register(String),
}

/// Serves history queries until `shutdown`; queries in flight are finished first.
pub async fn serve(
    client: async_nats::Client,
    db: HarperDb,
    unwritten: Unwritten,
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
    let db = Arc::new((db, unwritten));
    endpoint
        .take_until(shutdown.cancelled())
        .for_each_concurrent(CONCURRENT_QUERIES, |request| {
            let db = db.clone();
            async move {
                let started = std::time::Instant::now();
                let answer = answer(&db.0, &db.1, &request.message.payload).await;
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
async fn answer(
    db: &HarperDb,
    unwritten: &Unwritten,
    payload: &[u8],
) -> Result<Bytes, service::error::Error> {
    let query: HistoryQuery =
        serde_json::from_slice(payload).map_err(|e| service::error::Error {
            status: format!("invalid history query: {e}"),
            code: 400,
        })?;
    if query.limit == 0 || query.limit > SINCE_HISTORY_MAX || query.room.is_empty() {
        return Err(service::error::Error {
            status: "invalid history query: limit must be 1..=1000 and room non-empty".into(),
            code: 400,
        });
    }
    if query.checked_sequence_bounds().is_none() {
        return Err(service::error::Error {
            status: "invalid history query: a cursor is not a message id".into(),
            code: 400,
        });
    }
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "history query failed");
        service::error::Error {
            status: "message history is unavailable".into(),
            code: 503,
        }
    };
    // The floor first: whatever is at or below it is in HarperDB by the time we query it.
    // Then HarperDB and the stream at once: a message written meanwhile is in both answers,
    // and merging counts it once.
    let floor = unwritten.floor().await.map_err(|e| unavailable(&e))?;
    let (stored, recent) =
        tokio::join!(db.history(&query), unwritten.room_after(&query.room, floor));
    let recent = match &stored {
        Ok(_) => recent.map_err(|e| unavailable(&e))?,
        Err(_) => Vec::new(),
    };
    match stored.map(|page| unwritten::merge(&query, page, recent)) {
        Ok(page) => serde_json::to_vec(&page)
            .map(Bytes::from)
            .map_err(|e| service::error::Error {
                status: format!("could not encode the answer: {e}"),
                code: 500,
            }),
        Err(e) => {
            tracing::warn!(error = %e, room_len = query.room.len(), "history query failed");
            Err(service::error::Error {
                status: match e {
                    HarperError::Unreachable(_)
                    | HarperError::Server { .. }
                    | HarperError::Unauthorized => "message history is unavailable".into(),
                    other => format!("history query failed: {other}"),
                },
                code: 503,
            })
        }
    }
}
