//! Any load balancer: a long-polling request for a session another gateway holds is served by
//! that gateway.
//!
//! A gateway's Engine.IO session ids start with the first characters of its id (the vendored
//! engineioxide's `sid_prefix`), so the receiving gateway knows the holder from the request
//! alone. It sends the request over NATS to the holder's subject; the holder runs it through its
//! own Engine.IO service and answers with the response. Sticky sessions (HAProxy's cookie) then
//! only save that hop.
//!
//! A WebSocket upgrade of a session held elsewhere cannot travel as one request and answer: it
//! is handed over. The receiving gateway opens a TCP connection to the holder (at the address
//! the holder's heartbeats give, `gateway.advertise_address`), sends it the upgrade request as
//! it came, and once the holder switches protocols joins the two connections byte for byte
//! until either ends. The second connection takes a place under `limits.max_connections` like
//! the first, so a port full of handed-over WebSockets still keeps its file descriptors.

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

/// How long the holder may take to accept the connection and switch protocols.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes buffered each way by a handed-over WebSocket's relay: chat frames are small, and an
/// idle connection should cost little more than a direct one.
const RELAY_BUFFER_BYTES: usize = 4096;

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
    session_sid(uri, "transport=polling")
}

/// The session id of an Engine.IO WebSocket upgrade of an existing session, if it is one.
fn upgrade_sid(request: &Request) -> Option<&str> {
    let upgrade = request.headers().get(axum::http::header::UPGRADE)?;
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    session_sid(request.uri(), "transport=websocket")
}

/// The `sid` of an Engine.IO request on `transport` (its `transport=` query pair).
fn session_sid<'a>(uri: &'a Uri, transport: &str) -> Option<&'a str> {
    if !uri.path().starts_with("/socket.io") {
        return None;
    }
    let query = uri.query()?;
    if !query.split('&').any(|p| p == transport) {
        return None;
    }
    query.split('&').find_map(|p| p.strip_prefix("sid="))
}

/// Middleware: a polling request for a session of another live gateway goes there, and a
/// WebSocket upgrade of one is handed over to it.
pub async fn forward_foreign_sessions(
    State(forwarding): State<Forwarding>,
    request: Request,
    next: Next,
) -> Response {
    let foreign = |sid: &str| {
        (!sid.starts_with(forwarding.me.sid_prefix()))
            .then(|| forwarding.liveness.owner_of(sid))
            .flatten()
    };
    if let Some(owner) = upgrade_sid(&request).and_then(foreign) {
        return match forwarding.liveness.address_of(&owner) {
            Some(address) => forwarding.hand_over(&address, request).await,
            // A gateway that does not say where it is (an older one): refused as unknown, the
            // client goes on polling.
            None => next.run(request).await,
        };
    }
    match polling_sid(request.uri()).and_then(foreign) {
        Some(owner) => forwarding.forward(&owner, request).await,
        None => next.run(request).await,
    }
}

/// Why an upgrade could not be handed over.
#[derive(Debug, thiserror::Error)]
enum HandOverError {
    #[error("no place under limits.max_connections for the connection to the holder")]
    Full,
    #[error("could not reach the holder at {address}: {reason}")]
    Unreachable { address: String, reason: String },
}

impl Forwarding {
    /// Hands a WebSocket upgrade to the gateway at `address`, which holds its session: answers
    /// what the holder answered, and on a switch relays the two connections until either ends.
    async fn hand_over(&self, address: &str, mut request: Request) -> Response {
        match self.try_hand_over(address, &mut request).await {
            Ok(response) => response,
            Err(e) => {
                let outcome = match e {
                    HandOverError::Full => "full",
                    HandOverError::Unreachable { .. } => "unreachable",
                };
                metrics::counter!(m::HANDED_OVER, "outcome" => outcome).increment(1);
                tracing::debug!(error = %e, "a WebSocket upgrade was not handed over");
                // As Engine.IO answers an upgrade it cannot take: the client goes on polling.
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({"code": 3, "message": "Bad request"})),
                )
                    .into_response()
            }
        }
    }

    async fn try_hand_over(
        &self,
        address: &str,
        request: &mut Request,
    ) -> Result<Response, HandOverError> {
        // The connection to the holder is a second file descriptor for this client.
        let place = match request.extensions().get::<chatify_shared::serve::Places>() {
            Some(places) => Some(places.take().ok_or(HandOverError::Full)?),
            None => None,
        };
        let unreachable = |reason: String| HandOverError::Unreachable {
            address: address.to_owned(),
            reason,
        };
        let client_side = hyper::upgrade::on(&mut *request);
        let mut upstream = axum::http::Request::builder()
            .method(request.method().clone())
            .uri(request.uri().path_and_query().map_or("/", |p| p.as_str()))
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        *upstream.headers_mut() = request.headers().clone();
        let switched = tokio::time::timeout(HAND_OVER_TIMEOUT, async {
            let stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    tracing::trace!(error = %e, "a handed-over connection ended with an error");
                }
            });
            sender
                .send_request(upstream)
                .await
                .map_err(|e| unreachable(e.to_string()))
        })
        .await;
        let mut response = match switched {
            Ok(response) => response?,
            Err(_) => return Err(unreachable("no answer in time".into())),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            metrics::counter!(m::HANDED_OVER, "outcome" => "refused").increment(1);
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, self.max_body)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Ok(Response::from_parts(parts, Body::from(body)));
        }
        metrics::counter!(m::HANDED_OVER, "outcome" => "tunneled").increment(1);
        let holder_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            // Held for as long as the relay runs.
            let _place = place;
            let (client, holder) = match tokio::try_join!(client_side, holder_side) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "a handed-over WebSocket did not open");
                    return;
                }
            };
            let (mut client, mut holder) = (
                hyper_util::rt::TokioIo::new(client),
                hyper_util::rt::TokioIo::new(holder),
            );
            if let Err(e) = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut holder,
                RELAY_BUFFER_BYTES,
                RELAY_BUFFER_BYTES,
            )
            .await
            {
                tracing::trace!(error = %e, "a handed-over WebSocket ended with an error");
            }
        });
        let (parts, _) = response.into_parts();
        Ok(Response::from_parts(parts, Body::empty()))
    }

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
