//! HTTP routes beside Socket.IO, the CORS policy, and the `Origin` check that also guards the
//! WebSocket upgrade (browsers do not apply CORS to WebSockets).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use futures::StreamExt;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chatify_shared::config::CorsSettings;
use chatify_shared::wire::ErrorCode;
use serde_json::json;
use socketioxide::layer::SocketIoLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::access::{Action, Who};
use crate::address_limit::AddressLimit;
use crate::error::ChatError;
use crate::history;
use crate::payload;
use crate::session::Grants;
use crate::state::App;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub app: App,
    pub nats: async_nats::Client,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The history route's rate limit per client address.
    pub history_limit: Arc<AddressLimit>,
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

    /// Requests without an `Origin` (non-browser clients) are allowed, and so are same-origin
    /// ones: an `Origin` naming the host (and port) the request was sent to, as its `Host` says.
    pub fn allows(&self, origin: Option<&HeaderValue>, host: Option<&HeaderValue>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let same_origin = host
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.is_empty())
            .is_some_and(|host| {
                origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
            });
        same_origin || self.list.iter().any(|allowed| allowed == origin)
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
    let headers = request.headers();
    if origins.allows(headers.get(header::ORIGIN), headers.get(header::HOST)) {
        return next.run(request).await;
    }
    metrics::counter!(crate::metrics::ORIGIN_REFUSALS).increment(1);
    (StatusCode::FORBIDDEN, "origin not allowed\n").into_response()
}

/// Counts the request bodies that the body-read timeout cut off (the timeout's error surfaces
/// as a failed read of the body, which Engine.IO answers 400).
async fn count_body_timeouts(request: Request) -> Request {
    let (parts, body) = request.into_parts();
    let body = body.into_data_stream().map(|chunk| {
        chunk.inspect_err(|e| {
            let timed_out = std::error::Error::source(e)
                .is_some_and(|s| s.is::<tower_http::timeout::TimeoutError>());
            if timed_out {
                metrics::counter!(crate::metrics::HTTP_TIMEOUTS, "phase" => "body").increment(1);
            }
        })
    });
    Request::from_parts(parts, axum::body::Body::from_stream(body))
}

/// Copies the request's URI and header values out of hyper's read buffer before Socket.IO sees
/// the request. hyper hands them out as slices of that buffer (8–16 KiB per connection), and
/// engineioxide keeps each session's request for the life of the connection, so without the copy
/// every idle WebSocket pins its whole read buffer: about half of an idle connection's memory
/// (the socket.io docs' `rawSocket.request = null` advice, in Rust). A few hundred bytes copied
/// per HTTP request.
async fn detach_request_head(mut request: Request) -> Request {
    if let Ok(uri) = request.uri().to_string().parse::<axum::http::Uri>() {
        // axum's copy of the URI too, which would hold the same buffer.
        if let Some(original) = request.extensions_mut().get_mut::<OriginalUri>() {
            original.0 = uri.clone();
        }
        *request.uri_mut() = uri;
    }
    for value in request.headers_mut().values_mut() {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
    request
}

pub fn router(
    state: HttpState,
    socket_io: SocketIoLayer,
    origins: Origins,
    body_read_timeout: std::time::Duration,
    forwarding: crate::forward::Forwarding,
) -> Router {
    let connections = state.app.connections.clone();
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
        .layer(middleware::from_fn_with_state(
            forwarding,
            crate::forward::forward_foreign_sessions,
        ))
        .layer(middleware::from_fn_with_state(
            connections,
            crate::connections::count_handshakes,
        ))
        .layer(middleware::map_request(count_body_timeouts))
        .layer(RequestBodyTimeoutLayer::new(body_read_timeout))
        .layer(middleware::map_request(detach_request_head))
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let address = state.app.connections.client_of(peer.ip(), &headers);
    if !state.history_limit.allow(address) {
        metrics::counter!(crate::metrics::RATE_LIMITED, "event" => "http_history").increment(1);
        let limits = &state.app.limits;
        return error_response(&ChatError::new(
            ErrorCode::RateLimited,
            format!(
                "too many history requests: at most {} a second per address, with bursts of {}",
                limits.http_history_per_second, limits.http_history_burst
            ),
        ));
    }
    let result = async {
        let request = payload::history_query(
            &room,
            params.get("before").map(String::as_str),
            params.get("limit").map(String::as_str),
            &state.app.limits,
        )?;
        // The same check as the socket's get_history: with auth, the bearer token's user.
        let identity = match &state.app.auth {
            Some(authenticator) => {
                let token = bearer(&headers).ok_or_else(|| {
                    ChatError::new(
                        ErrorCode::Unauthorized,
                        "authentication required: send Authorization: Bearer <token>",
                    )
                })?;
                let identity = authenticator
                    .verify_token(token, &state.app.limits)
                    .map_err(|e| ChatError::new(ErrorCode::Unauthorized, e.to_string()))?;
                Some(identity)
            }
            None => None,
        };
        let grants = identity.as_ref().map(Grants::from).unwrap_or_default();
        let who = identity.as_ref().map(|identity| Who {
            user_id: &identity.user_id,
            username: &identity.name,
            grants: &grants,
        });
        state
            .app
            .access
            .check(who, &request.room, Action::History)
            .await?;
        history::page(&state.app.bus, request).await
    }
    .await;
    match result {
        Ok(page) => Json(json!({"ok": true, "messages": page.messages, "hasMore": page.has_more}))
            .into_response(),
        Err(e) => error_response(&e),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
}

fn error_response(e: &ChatError) -> Response {
    let status = match e.code {
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
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
        assert!(o.allows(None, None));
        assert!(o.allows(
            Some(&HeaderValue::from_static("http://localhost:3000")),
            None
        ));
        assert!(o.allows(
            Some(&HeaderValue::from_static("https://chat.example")),
            None
        ));
        assert!(!o.allows(
            Some(&HeaderValue::from_static("http://localhost:3001")),
            None
        ));
        assert!(!o.allows(
            Some(&HeaderValue::from_static("https://chat.example.evil")),
            None
        ));
        assert!(!o.allows(Some(&HeaderValue::from_static("null")), None));
        let any = Origins::new(&CorsSettings {
            allowed_origins: vec!["*".into()],
        });
        assert!(any.allows(Some(&HeaderValue::from_static("https://anything")), None));
        // Same-origin: the Origin names the Host the request went to.
        let host = HeaderValue::from_static("chat.internal:4001");
        for same in [
            "http://chat.internal:4001",
            "https://chat.internal:4001",
            "http://CHAT.internal:4001",
        ] {
            assert!(
                o.allows(Some(&HeaderValue::from_static(same)), Some(&host)),
                "{same}"
            );
        }
        for other in [
            "http://chat.internal:4002",
            "http://chat.internal",
            "http://evil.example",
            "chat.internal:4001",
            "null",
        ] {
            assert!(
                !o.allows(Some(&HeaderValue::from_static(other)), Some(&host)),
                "{other}"
            );
        }
    }

    /// The request a session keeps must not share hyper's read buffer: after the copy, nothing
    /// but the buffer's own handle refers to it.
    #[tokio::test]
    async fn the_kept_request_no_longer_holds_the_read_buffer() {
        let head = bytes::Bytes::from(
            b"/socket.io/?EIO=4&transport=websocket secret-token"
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b' ', 16 * 1024))
                .collect::<Vec<u8>>(),
        );
        let uri = axum::http::Uri::from_maybe_shared(head.slice(0..37)).unwrap_or_default();
        let value = HeaderValue::from_maybe_shared(head.slice(38..50))
            .unwrap_or(HeaderValue::from_static("x"));
        let mut request = axum::http::Request::builder()
            .uri(uri.clone())
            .header(header::AUTHORIZATION, value)
            .body(axum::body::Body::empty())
            .unwrap_or_default();
        request.extensions_mut().insert(OriginalUri(uri));
        if let Some(v) = request.headers_mut().get_mut(header::AUTHORIZATION) {
            v.set_sensitive(true);
        }
        assert!(!head.is_unique(), "the request shares the buffer");

        let request = detach_request_head(request).await;
        assert!(head.is_unique(), "the request still shares the buffer");
        assert_eq!(request.uri(), "/socket.io/?EIO=4&transport=websocket");
        let original = request
            .extensions()
            .get::<OriginalUri>()
            .map(|o| o.0.clone());
        assert_eq!(original, Some(request.uri().clone()));
        let auth = request.headers().get(header::AUTHORIZATION);
        assert_eq!(auth.map(HeaderValue::as_bytes), Some(&b"secret-token"[..]));
        assert!(auth.is_some_and(HeaderValue::is_sensitive));
    }
}
