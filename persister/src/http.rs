//! The persister's small HTTP server: liveness, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// To tell whether NATS is connected.
    pub nats: async_nats::Client,
    /// Set by the writer once the table exists and the consumer is bound.
    pub writer_ready: Arc<AtomicBool>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    let nats_up = state.nats.connection_state() == async_nats::connection::State::Connected;
    match (nats_up, state.writer_ready.load(Ordering::Relaxed)) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "NATS is not connected\n"),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the HarperDB table is not ready\n",
        ),
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}
