//! The gateway's Prometheus metrics: names (used only through these constants) and help texts.

pub const CONNECTIONS: &str = "chatify_gateway_connections_total";
pub const CONNECTED_SOCKETS: &str = "chatify_gateway_connected_sockets";
pub const AUTH_REFUSALS: &str = "chatify_gateway_auth_refusals_total";
pub const ORIGIN_REFUSALS: &str = "chatify_gateway_origin_refusals_total";
pub const CONNECTION_REFUSALS: &str = "chatify_gateway_connection_refusals_total";
pub const PORT_FULL_REFUSALS: &str = "chatify_gateway_port_full_refusals_total";
pub const EVENTS: &str = "chatify_gateway_events_total";
pub const EVENT_ERRORS: &str = "chatify_gateway_event_errors_total";
pub const JOINS: &str = "chatify_gateway_joins_total";
pub const RATE_LIMITED: &str = "chatify_gateway_rate_limited_total";
pub const ROOMS: &str = "chatify_gateway_rooms";
pub const MESSAGES_RECEIVED: &str = "chatify_gateway_messages_received_total";
pub const DUPLICATE_SENDS: &str = "chatify_gateway_duplicate_sends_total";
pub const PUBLISH_DURATION: &str = "chatify_gateway_publish_duration_seconds";
pub const HISTORY_DURATION: &str = "chatify_gateway_history_duration_seconds";
pub const MESSAGES_FANNED_OUT: &str = "chatify_gateway_messages_fanned_out_total";
pub const MESSAGES_DELIVERED: &str = "chatify_gateway_messages_delivered_total";
pub const ORDER_GAPS: &str = "chatify_gateway_order_gaps_total";
pub const DELIVERY_DROPS: &str = "chatify_gateway_delivery_drops_total";
pub const DEAD_GATEWAYS: &str = "chatify_gateway_dead_gateways_total";
pub const ANSWER_DROPS: &str = "chatify_gateway_answer_drops_total";
pub const ANSWERS_DELAYED: &str = "chatify_gateway_answers_delayed_total";
pub const TOKEN_EXPIRIES: &str = "chatify_gateway_token_expiries_total";
pub const SLOW_CLIENT_DISCONNECTS: &str = "chatify_gateway_slow_client_disconnects_total";
pub const HTTP_TIMEOUTS: &str = "chatify_gateway_http_timeouts_total";
pub const FORWARDED: &str = "chatify_gateway_forwarded_requests_total";
pub const HANDED_OVER: &str = "chatify_gateway_handed_over_upgrades_total";
pub const MESSAGE_STATES_BYTES: &str = "chatify_gateway_message_states_bytes";
pub const MESSAGE_STATES_DROPPED: &str = "chatify_gateway_message_states_dropped_total";
pub const ACCESS_REFUSALS: &str = "chatify_gateway_access_refusals_total";
pub const ACCESS_WEBHOOK_CALLS: &str = "chatify_gateway_access_webhook_total";
pub const CHANGES_APPLIED: &str = "chatify_gateway_changes_applied_total";
pub const CHANGES_UNTOLD: &str = "chatify_gateway_changes_untold_total";
pub const DIRECT_MESSAGES: &str = "chatify_gateway_direct_message_notifications_total";

/// Registers the help texts; call once at start.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS, "Socket.IO connections accepted");
    describe_counter!(
        CHANGES_APPLIED,
        "Changes (edits, deletions, reactions) a room listener applied, by outcome"
    );
    describe_counter!(
        CHANGES_UNTOLD,
        "Changes whose message state could not be read (no persister answered): edits and deletions told as made, reactions not told"
    );
    describe_gauge!(CONNECTED_SOCKETS, "Sockets connected now");
    describe_counter!(AUTH_REFUSALS, "Connections refused by token checks");
    describe_counter!(
        CONNECTION_REFUSALS,
        "Connections refused by the per-address cap"
    );
    describe_counter!(
        PORT_FULL_REFUSALS,
        "TCP connections closed unread because the client port held limits.max_connections"
    );
    describe_counter!(
        ORIGIN_REFUSALS,
        "HTTP and WebSocket requests refused for their Origin"
    );
    describe_counter!(EVENTS, "Client events handled, by event");
    describe_counter!(
        EVENT_ERRORS,
        "Client events answered with an error, by event and code"
    );
    describe_counter!(JOINS, "Successful joins");
    describe_counter!(
        RATE_LIMITED,
        "Events refused rate_limited, by event: a connection's rate limits and its full event queue, and (event http_history) the HTTP history route's limit per client address"
    );
    describe_gauge!(
        ROOMS,
        "Rooms with members on this gateway (each one subscription)"
    );
    describe_counter!(
        MESSAGES_RECEIVED,
        "Messages accepted from clients and stored in JetStream"
    );
    describe_counter!(
        DUPLICATE_SENDS,
        "Retries (same clientId) answered with the first message"
    );
    describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "Time from publish to JetStream ack"
    );
    describe_histogram!(
        HISTORY_DURATION,
        metrics::Unit::Seconds,
        "History requests to the persisters"
    );
    describe_counter!(
        MESSAGES_FANNED_OUT,
        "Stored messages received for local rooms"
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Messages emitted to local sockets (one per socket)"
    );
    describe_counter!(
        ORDER_GAPS,
        "Times a room's next message never arrived from NATS and the later ones were delivered without it"
    );
    describe_counter!(
        DELIVERY_DROPS,
        "Emits that failed for some socket (full outgoing queue), by event"
    );
    describe_counter!(
        DEAD_GATEWAYS,
        "Gateways declared dead after missing heartbeats"
    );
    describe_counter!(
        ANSWER_DROPS,
        "Acks and error events that could not be sent: the socket closed first (or its queue stayed full for 60 s)"
    );
    describe_counter!(
        ANSWERS_DELAYED,
        "Acks and error events that found the socket's outgoing queue full and waited for room"
    );
    describe_counter!(
        FORWARDED,
        "Long-polling requests for sessions another gateway holds, by side: sent (forwarded there), failed (no answer: the client starts over), served (forwarded here)"
    );
    describe_gauge!(
        MESSAGE_STATES_BYTES,
        "Bytes of message states the rooms' listeners keep to apply changes in order (at most gateway.message_states_bytes_per_room per room)"
    );
    describe_counter!(
        MESSAGE_STATES_DROPPED,
        "Message states dropped from a room's cache past gateway.message_states_bytes_per_room (read from the persisters again when changed)"
    );
    describe_counter!(
        HANDED_OVER,
        "WebSocket upgrades of sessions another gateway holds, by outcome: tunneled (the two connections joined), refused (the holder did not switch protocols), unreachable (no connection to the holder), full (no place under limits.max_connections for the second connection)"
    );
    describe_counter!(
        ACCESS_REFUSALS,
        "Actions refused as forbidden by the room access check, by action"
    );
    describe_counter!(
        ACCESS_WEBHOOK_CALLS,
        "Access webhook checks by outcome: allowed, denied (the endpoint answered), reused (a kept answer), error (no answer: unavailable)"
    );
    describe_counter!(
        DIRECT_MESSAGES,
        "dm notifications emitted to connections not in the direct-message room"
    );
    describe_counter!(
        HTTP_TIMEOUTS,
        "HTTP requests cut off by a timeout, by phase: headers (sent too slowly, or a kept-alive connection idle too long; the connection is closed) or body (sent too slowly; 400)"
    );
    describe_counter!(
        SLOW_CLIENT_DISCONNECTS,
        "Sockets disconnected because answers to them piled up in their full outgoing queue (they did not read)"
    );
    describe_counter!(
        TOKEN_EXPIRIES,
        "Connections disconnected because their token expired (and was not refreshed)"
    );
    // Gauges show from the start, not only after their first change.
    metrics::gauge!(ROOMS).set(0.0);
    metrics::gauge!(CONNECTED_SOCKETS).set(0.0);
}

#[cfg(test)]
mod tests {
    #[test]
    fn gauges_render_with_help_from_the_start() {
        let handle = chatify_shared::telemetry::metrics_handle();
        super::describe();
        let text = handle.render();
        assert!(text.contains("# HELP chatify_gateway_rooms "), "{text}");
        assert!(text.contains("chatify_gateway_rooms 0"), "{text}");
        assert!(
            text.contains("# TYPE chatify_gateway_connected_sockets gauge"),
            "{text}"
        );
    }
}
