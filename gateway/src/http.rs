//! HTTP routes beside Socket.IO, the CORS policy, and the `Origin` check that also guards the
//! WebSocket upgrade (browsers do not apply CORS to WebSockets).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chatify_shared::config::CorsSettings;
use chatify_shared::wire::ErrorCode;
use serde_json::json;
use socketioxide::layer::SocketIoLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ChatError;
use crate::handlers::history_page;
use crate::payload;
use crate::state::App;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub app: App,
    pub nats: async_nats::Client,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// The allowed browser origins, shared by CORS and the Origin check.
#[derive(Clone)]
pub struct Origins {
    any: bool,
    list: Arc<Vec<String>>,
}

impl Origins {
    pub fn new(settings: &CorsSettings) -> Self {
        let list: Vec<String> = settings
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .collect();
        Self {
            any: list.iter().any(|o| o == "*"),
            list: Arc::new(list),
        }
    }

    /// Requests without an `Origin` (non-browser clients) are allowed.
    pub fn allows(&self, origin: Option<&HeaderValue>) -> bool {
        match origin {
            None => true,
            Some(_) if self.any => true,
            Some(o) => o
                .to_str()
                .is_ok_and(|o| self.list.iter().any(|allowed| allowed == o)),
        }
    }

    fn cors(&self) -> CorsLayer {
        let allow = if self.any {
            AllowOrigin::mirror_request()
        } else {
            AllowOrigin::list(
                self.list
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        CorsLayer::new()
            .allow_origin(allow)
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
    }
}

async fn check_origin(State(origins): State<Origins>, request: Request, next: Next) -> Response {
    if origins.allows(request.headers().get(header::ORIGIN)) {
        return next.run(request).await;
    }
    metrics::counter!(crate::metrics::ORIGIN_REFUSALS).increment(1);
    (StatusCode::FORBIDDEN, "origin not allowed\n").into_response()
}

pub fn router(state: HttpState, socket_io: SocketIoLayer, origins: Origins) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Json(json!({"message": "Hello from chatify backend"})) }),
        )
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/rooms/{room}/messages", get(room_messages))
        .with_state(state)
        .layer(socket_io)
        .layer(origins.cors())
        .layer(middleware::from_fn_with_state(origins, check_origin))
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.nats.connection_state() == async_nats::connection::State::Connected {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS is not connected\n")
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}

/// `GET /api/rooms/{room}/messages?before=&limit=`: the `get_history` page as JSON.
async fn room_messages(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let request = payload::history_query(
            &room,
            params.get("before").map(String::as_str),
            params.get("limit").map(String::as_str),
            &state.app.limits,
        )?;
        history_page(&state.app, request).await
    }
    .await;
    match result {
        Ok(page) => Json(json!({"ok": true, "messages": page.messages, "hasMore": page.has_more}))
            .into_response(),
        Err(e) => error_response(&e),
    }
}

fn error_response(e: &ChatError) -> Response {
    let status = match e.code {
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    if status.is_server_error() {
        tracing::warn!(error = %e.message, "history request failed");
    }
    (status, Json(json!({"ok": false, "error": e.body()}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_matched_exactly() {
        let o = Origins::new(&CorsSettings {
            allowed_origins: vec![
                "http://localhost:3000/".into(),
                "https://chat.example".into(),
            ],
        });
        assert!(o.allows(None));
        assert!(o.allows(Some(&HeaderValue::from_static("http://localhost:3000"))));
        assert!(o.allows(Some(&HeaderValue::from_static("https://chat.example"))));
        assert!(!o.allows(Some(&HeaderValue::from_static("http://localhost:3001"))));
        assert!(!o.allows(Some(&HeaderValue::from_static("https://chat.example.evil"))));
        assert!(!o.allows(Some(&HeaderValue::from_static("null"))));
        let any = Origins::new(&CorsSettings {
            allowed_origins: vec!["*".into()],
        });
        assert!(any.allows(Some(&HeaderValue::from_static("https://anything"))));
    }
}
