//! Any load balancer: a long-polling request for a session another gateway holds is served by
//! that gateway.
//!
//! A gateway's Engine.IO session ids start with the first characters of its id (the vendored
//! engineioxide's `sid_prefix`), so the receiving gateway knows the holder from the request
//! alone. It sends the request over NATS to the holder's subject; the holder runs it through its
//! own Engine.IO service and answers with the response. Sticky sessions (HAProxy's cookie) then
//! only save that hop. A WebSocket upgrade of a session held elsewhere is not forwarded: it is
//! refused as an unknown session, and the client goes on polling.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::HeaderMap;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chatify_shared::subjects::{GatewayId, gateway_http_subject};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::liveness::Liveness;
use crate::metrics as m;

/// NATS headers of a forwarded request and of its answer.
const METHOD: &str = "Chatify-Method";
const URI: &str = "Chatify-Uri";
const STATUS: &str = "Chatify-Status";
/// HTTP headers that travel with a forwarded request or answer (the rest are the hop's own).
const KEPT_HEADERS: [&str; 8] = [
    "host",
    "content-type",
    "origin",
    "user-agent",
    "x-forwarded-for",
    "cookie",
    "set-cookie",
    "cache-control",
];

/// What the forwarding layer needs.
#[derive(Clone)]
pub struct Forwarding {
    pub nats: async_nats::Client,
    /// This gateway: requests for its own sessions are served here.
    pub me: GatewayId,
    /// The live gateways, by whose ids a session id is placed.
    pub liveness: std::sync::Arc<Liveness>,
    /// How long a forwarded request may take: a long poll waits up to the ping interval.
    pub timeout: Duration,
    /// The largest body forwarded (the Engine.IO payload limit).
    pub max_body: usize,
}

/// The session id of an Engine.IO polling request, if it has one.
fn polling_sid(uri: &Uri) -> Option<&str> {
    if !uri.path().starts_with("/socket.io") {
        return None;
    }
    let query = uri.query()?;
    if !query.split('&').any(|p| p == "transport=polling") {
        return None;
    }
    query.split('&').find_map(|p| p.strip_prefix("sid="))
}

/// Middleware: a polling request for a session of another live gateway goes there.
pub async fn forward_foreign_sessions(
    State(forwarding): State<Forwarding>,
    request: Request,
    next: Next,
) -> Response {
    let owner = polling_sid(request.uri())
        .filter(|sid| !sid.starts_with(forwarding.me.sid_prefix()))
        .and_then(|sid| forwarding.liveness.owner_of(sid));
    match owner {
        Some(owner) => forwarding.forward(&owner, request).await,
        None => next.run(request).await,
    }
}

impl Forwarding {
    async fn forward(&self, owner: &GatewayId, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = match http_body_util::Limited::new(body, self.max_body)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(METHOD, parts.method.as_str());
        headers.insert(URI, parts.uri.to_string().as_str());
        for name in KEPT_HEADERS {
            if let Some(value) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name, value);
            }
        }
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(self.timeout));
        metrics::counter!(m::FORWARDED, "side" => "sent").increment(1);
        match self
            .nats
            .send_request(gateway_http_subject(owner), request)
            .await
        {
            Ok(answer) => into_response(answer),
            Err(e) => {
                metrics::counter!(m::FORWARDED, "side" => "failed").increment(1);
                tracing::debug!(error = %e, %owner, "a forwarded request failed");
                // As Engine.IO answers a session it does not know: the client starts over.
                (
                    StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"code": 1, "message": "Session ID unknown"})),
                )
                    .into_response()
            }
        }
    }
}

fn into_response(answer: async_nats::Message) -> Response {
    let headers = answer.headers.unwrap_or_default();
    let status = headers
        .get(STATUS)
        .and_then(|s| s.as_str().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(Body::from(answer.payload));
    *response.status_mut() = status;
    for name in KEPT_HEADERS {
        if let Some(value) = headers.get(name)
            && let Ok(value) = HeaderValue::from_str(value.as_str())
        {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

/// Serves, until `shutdown`, the requests other gateways forward for this gateway's sessions,
/// through `engine` (this gateway's Socket.IO service, without the HTTP layers around it: the
/// receiving gateway applied those).
pub async fn serve<S>(
    nats: async_nats::Client,
    me: GatewayId,
    engine: S,
    max_body: usize,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut requests = match nats.subscribe(gateway_http_subject(&me)).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!(error = %e, "could not serve forwarded requests; polling needs sticky sessions");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            message = requests.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let (nats, engine) = (nats.clone(), engine.clone());
        tokio::spawn(async move {
            let Some(reply) = message.reply.clone() else {
                return;
            };
            metrics::counter!(m::FORWARDED, "side" => "served").increment(1);
            let (headers, payload) = match serve_one(engine, message, max_body).await {
                Ok(answer) => answer,
                Err(status) => {
                    let mut headers = HeaderMap::new();
                    headers.insert(STATUS, status.as_str());
                    (headers, Bytes::new())
                }
            };
            if let Err(e) = nats.publish_with_headers(reply, headers, payload).await {
                tracing::debug!(error = %e, "could not answer a forwarded request");
            }
        });
    }
}

async fn serve_one<S>(
    engine: S,
    message: async_nats::Message,
    max_body: usize,
) -> Result<(HeaderMap, Bytes), StatusCode>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let headers = message.headers.unwrap_or_default();
    let method = headers
        .get(METHOD)
        .and_then(|m| Method::from_bytes(m.as_str().as_bytes()).ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let uri: Uri = headers
        .get(URI)
        .and_then(|u| u.as_str().parse().ok())
        .filter(|u: &Uri| polling_sid(u).is_some())
        .ok_or(StatusCode::BAD_REQUEST)?;
    if message.payload.len() > max_body {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let mut request = Request::new(Body::from(message.payload));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for name in KEPT_HEADERS {
        if let Some(value) = headers.get(name)
            && let Ok(value) = HeaderValue::from_str(value.as_str())
        {
            request
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    let Ok(response) = engine.oneshot(request).await;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?
        .to_bytes();
    let mut answer = HeaderMap::new();
    answer.insert(STATUS, parts.status.as_str());
    for name in KEPT_HEADERS {
        if let Some(value) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            answer.insert(name, value);
        }
    }
    Ok((answer, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_polling_requests_with_a_session_are_placed() {
        let sid =
            |uri: &str| polling_sid(&uri.parse::<Uri>().unwrap_or_default()).map(str::to_owned);
        assert_eq!(
            sid("/socket.io/?EIO=4&transport=polling&sid=abc123XYZ&t=1"),
            Some("abc123XYZ".into())
        );
        assert_eq!(
            sid("/socket.io/?EIO=4&transport=polling"),
            None,
            "a handshake"
        );
        assert_eq!(
            sid("/socket.io/?EIO=4&transport=websocket&sid=abc"),
            None,
            "an upgrade"
        );
        assert_eq!(sid("/api/rooms/x/messages?sid=abc&transport=polling"), None);
    }
}
