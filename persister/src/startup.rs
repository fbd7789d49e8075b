//! Building and running the persister: `Application::build` connects and binds everything from
//! configuration (port 0 picks a free port, which tests use); `run_until_stopped` runs the
//! writer, the history service and the HTTP server until the shutdown signal, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use chatify_shared::Settings;
use chatify_shared::bus::{self, BusError};
use chatify_shared::subjects::Role;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Consumer, ConsumerError};
use crate::harperdb::{HarperDb, HarperError};
use crate::history::{self, HistoryServiceError};
use crate::http::{self, HttpState};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("invalid HarperDB settings: {0}")]
    HarperDb(#[from] HarperError),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error(transparent)]
    History(#[from] HistoryServiceError),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    /// A part of the persister panicked (or was aborted): it is not running any more.
    #[error("a persister task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub struct Application {
    settings: Settings,
    listener: TcpListener,
    nats: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    js: async_nats::jetstream::Context,
    db: HarperDb,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let addr = format!("{}:{}", settings.persister.host, settings.persister.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        // The recorder first: help texts registered before it would be lost.
        chatify_shared::telemetry::metrics_handle();
        crate::metrics::describe();
        let nats = bus::connect(&settings.nats, "chatify-persister", Role::Persister).await?;
        let js = async_nats::jetstream::new(nats.clone());
        let stream = bus::ensure_messages_stream(&js, &settings.stream).await?;
        bus::ensure_dead_letter_stream(&js, settings.stream.replicas).await?;
        let db = HarperDb::new(&settings.harperdb)?;
        Ok(Self {
            settings,
            listener,
            nats,
            stream,
            js,
            db,
        })
    }

    /// The bound HTTP address (with the real port when configured with 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run_until_stopped(
        self,
        shutdown_signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let shutdown = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));
        let metrics = chatify_shared::telemetry::metrics_handle();
        tracing::info!(addr = ?self.listener.local_addr().ok(), "persister HTTP listening");

        let unwritten = crate::unwritten::Unwritten::new(self.stream.clone());
        let consumer = Consumer::new(
            self.stream,
            self.db.clone(),
            self.js,
            self.settings.persister.clone(),
            ready.clone(),
        );
        let http_shutdown = shutdown.child_token();
        let router = http::router(HttpState {
            nats: self.nats.clone(),
            writer_ready: ready,
            metrics,
        });
        let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
        let consumer_shutdown = shutdown.child_token();
        tasks.spawn(async move { Ok(consumer.run(consumer_shutdown).await?) });
        let (nats, db, history_shutdown) = (self.nats.clone(), self.db, shutdown.child_token());
        let p = &self.settings.persister;
        let bounds = history::Bounds {
            cache_bytes: p.history_cache_bytes,
            cache_rooms: p.history_cache_rooms,
            unread_scan: p.unread_scan_max,
            changes_scan: p.changes_scan_max,
        };
        tasks.spawn(async move {
            Ok(history::serve(nats, db, unwritten, bounds, history_shutdown).await?)
        });
        let http_limits = chatify_shared::serve::Limits {
            header_read_timeout: Duration::from_millis(
                self.settings.persister.header_read_timeout_ms,
            ),
            timeouts_metric: crate::metrics::HTTP_TIMEOUTS,
            // Operators' port (metrics, health): bounded by the file limit alone.
            max_connections: chatify_shared::serve::connection_cap(0),
            refusals_metric: crate::metrics::PORT_FULL_REFUSALS,
        };
        tasks.spawn(async move {
            chatify_shared::serve::serve(
                self.listener,
                router,
                http_limits,
                |_| {},
                http_shutdown.cancelled_owned(),
            )
            .await
            .map_err(RunError::Http)
        });

        // Run until the signal, or until a part stops by itself (which is an error).
        let mut result = tokio::select! {
            () = shutdown_signal => Ok(()),
            Some(first) = tasks.join_next() => flatten(first),
        };
        shutdown.cancel();
        let deadline = Duration::from_millis(self.settings.persister.shutdown_timeout_ms);
        let finish = async {
            while let Some(done) = tasks.join_next().await {
                result = std::mem::replace(&mut result, Ok(())).and(flatten(done));
            }
            if let Err(e) = chatify_shared::bus::drain(&self.nats).await {
                tracing::warn!(error = %e, "NATS drain failed");
            }
        };
        if tokio::time::timeout(deadline, finish).await.is_err() {
            tracing::error!(?deadline, "shutdown took too long; exiting anyway");
        }
        result
    }
}

/// A task's outcome; a panic is an error like any other (the other tasks still finish).
fn flatten(joined: Result<Result<(), RunError>, tokio::task::JoinError>) -> Result<(), RunError> {
    joined.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a persister task panicked");
        Err(RunError::Task(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_is_an_error() {
        let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
        tasks.spawn(async { panic!("a part of the persister failed") });
        tasks.spawn(async { Ok(()) });
        let mut result = Ok(());
        while let Some(done) = tasks.join_next().await {
            result = result.and(flatten(done));
        }
        assert!(matches!(result, Err(RunError::Task(_))), "{result:?}");
    }
}
