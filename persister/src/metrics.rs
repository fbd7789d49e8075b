//! The persister's Prometheus metrics: names (used only through these constants) and help texts.

pub const HTTP_TIMEOUTS: &str = "chatify_persister_http_timeouts_total";
pub const PORT_FULL_REFUSALS: &str = "chatify_persister_port_full_refusals_total";
pub const MESSAGES_STORED: &str = "chatify_persister_messages_stored_total";
pub const BATCH_MESSAGES: &str = "chatify_persister_batch_messages";
pub const WRITE_DURATION: &str = "chatify_persister_write_duration_seconds";
pub const WRITE_RETRIES: &str = "chatify_persister_write_retries_total";
pub const REDELIVERIES: &str = "chatify_persister_redeliveries_total";
pub const POISON_MESSAGES: &str = "chatify_persister_poison_messages_total";
pub const DEAD_LETTERED: &str = "chatify_persister_dead_lettered_total";
pub const CHANGES_APPLIED: &str = "chatify_persister_changes_applied_total";
pub const CHANGES_SKIPPED: &str = "chatify_persister_changes_skipped_total";
pub const CHANGE_FLOOR_WAIT: &str = "chatify_persister_change_floor_wait_seconds";
pub const CHANGE_BATCHES_HANDED_BACK: &str = "chatify_persister_change_batches_handed_back_total";
pub const CHANGE_RUNS_REFUSED: &str = "chatify_persister_change_runs_refused_total";
pub const CHANGES_SCAN_CUT: &str = "chatify_persister_changes_scan_cut_total";
pub const UNREAD_SCAN_CUT: &str = "chatify_persister_unread_scan_cut_total";
pub const HARPERDB_RECONNECTS: &str = "chatify_persister_harperdb_reconnects_total";
pub const CONSUMER_PENDING: &str = "chatify_persister_consumer_pending_messages";
pub const HISTORY_DURATION: &str = "chatify_persister_history_duration_seconds";
pub const HISTORY_CACHE: &str = "chatify_persister_history_cache_total";
pub const HISTORY_CACHE_BYTES: &str = "chatify_persister_history_cache_bytes";
pub const HISTORY_CACHE_ROOMS: &str = "chatify_persister_history_cache_rooms";

/// Registers the help texts; call once at start.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_TIMEOUTS,
        "HTTP connections closed by a timeout, by phase: headers (sent too slowly, or a kept-alive connection idle too long)"
    );
    describe_counter!(
        PORT_FULL_REFUSALS,
        "TCP connections closed unread because the HTTP port held as many as the open-file limit allows"
    );
    describe_counter!(
        MESSAGES_STORED,
        "Messages written to HarperDB (and then acked)"
    );
    describe_histogram!(BATCH_MESSAGES, "Messages per HarperDB insert");
    describe_histogram!(
        WRITE_DURATION,
        metrics::Unit::Seconds,
        "Time to write a batch, retries included"
    );
    describe_counter!(WRITE_RETRIES, "Failed HarperDB operations retried");
    describe_counter!(REDELIVERIES, "Messages JetStream delivered more than once");
    describe_counter!(
        DEAD_LETTERED,
        "Messages HarperDB refused for good, moved to the dead-letter stream"
    );
    describe_counter!(POISON_MESSAGES, "Undecodable messages terminated");
    describe_counter!(
        CHANGES_APPLIED,
        "Changes (edits, deletions, reactions) applied to their message in HarperDB, in stream order (a change seen again is not counted)"
    );
    describe_counter!(
        CHANGES_SKIPPED,
        "Changes skipped because their target is no stored message of their room"
    );
    describe_histogram!(
        CHANGE_FLOOR_WAIT,
        metrics::Unit::Seconds,
        "Time a batch holding changes waited for the consumer's ack floor to pass every earlier event"
    );
    describe_counter!(
        CHANGE_BATCHES_HANDED_BACK,
        "Batches holding changes handed back to JetStream (NAK) because the ack floor did not pass the events before them in time"
    );
    describe_counter!(
        CHANGE_RUNS_REFUSED,
        "Runs of events holding changes handed back to JetStream (NAK) at once because as many as the persister holds were already waiting for the ack floor (the one the floor would reach last is refused)"
    );
    describe_counter!(
        CHANGES_SCAN_CUT,
        "Join answers whose changes since the cursor were cut at persister.changes_scan_max change log records (the latest kept, changesCut told)"
    );
    describe_counter!(
        UNREAD_SCAN_CUT,
        "Unread counts answered as the cap because more than persister.unread_scan_max messages followed the read marker"
    );
    describe_counter!(
        HARPERDB_RECONNECTS,
        "Writer connections replaced by fresh ones (one in every 64 batches on a connection), so that the kernel draws their HarperDB worker thread anew"
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "Messages in JetStream not yet written (pending plus unacked)"
    );
    describe_counter!(
        HISTORY_CACHE,
        "History queries by where their answer came from: hit (recent messages in memory) or miss (HarperDB)"
    );
    describe_gauge!(
        HISTORY_CACHE_ROOMS,
        "Rooms whose recent messages the history service keeps in memory (empty rooms included)"
    );
    describe_gauge!(
        HISTORY_CACHE_BYTES,
        "Bytes of recent messages the history service keeps in memory"
    );
    describe_histogram!(
        HISTORY_DURATION,
        metrics::Unit::Seconds,
        "History queries answered, by outcome"
    );
}
