//! HarperDB over its HTTP operations API: the persister's table, written in batches and read
//! by history queries.
//!
//! HarperDB 4.7's `search_by_conditions` silently drops a `<` condition combined with a room
//! filter and a sort, on tables of realistic size. So the table has one index only, its primary
//! key, which sorts by room and then by the room's order ([`chatify_shared::storage`]), and every
//! history query is one `between` on that key, sorted by it, with a limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatify_shared::config::HarperDbSettings;
use chatify_shared::storage::{ATTRIBUTES, RoomKey, StoredRecord, room_keys_end, storage_key};
use chatify_shared::wire::{ChatMessage, HistoryPage, HistoryQuery};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

/// Why an operation failed; [`HarperError::is_outage`] tells HarperDB being out from the
/// request being refused.
#[derive(Debug, thiserror::Error)]
pub enum HarperError {
    #[error("HarperDB is unreachable: {0}")]
    Unreachable(reqwest::Error),
    #[error("HarperDB refused the configured credentials")]
    Unauthorized,
    /// The user is known but its role does not allow the operation: the persister's user may
    /// only read and insert into its table, and setting the table up is an admin's work.
    #[error(
        "HarperDB does not allow this user to do that ({message}); the database, the table and the persister's user are set up by `chatify-persister setup` with a super user's credentials (harperdb.admin_username and harperdb.admin_password)"
    )]
    Forbidden { message: String },
    #[error("HarperDB rejected the request ({status}): {message}")]
    Rejected { status: StatusCode, message: String },
    #[error("HarperDB failed ({status}): {message}")]
    Server { status: StatusCode, message: String },
    /// HarperDB answered that the database or table does not exist. Right after a table is
    /// created this is HarperDB's worker threads learning of it one at a time; later, someone
    /// dropped it. Either way retrying is right: nothing is refused for good because of it.
    #[error("HarperDB does not have the table ({status}): {message}")]
    TableMissing { status: StatusCode, message: String },
    #[error("unexpected answer from HarperDB: {0}")]
    Decode(String),
}

impl HarperError {
    /// Whether HarperDB is out: unreachable, failing, refusing the configured credentials, or
    /// without the table. That can pass, so writes are retried until it does, and meanwhile
    /// history is unavailable. A rejection of the request itself, or an answer that cannot be
    /// read, is no outage: retrying the same request will not help.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Unreachable(_)
            | Self::Unauthorized
            | Self::Forbidden { .. }
            | Self::Server { .. }
            | Self::TableMissing { .. } => true,
            Self::Rejected { .. } | Self::Decode(_) => false,
        }
    }
}

/// A client for one table.
#[derive(Clone)]
pub struct HarperDb {
    /// Keep-alive connection pool to the operations API.
    http: reqwest::Client,
    /// Whether HarperDB answered the last operation (shared by the clones): history answered
    /// from memory is given only while it does (see [`HarperDb::answering`]).
    answering: Arc<AtomicBool>,
    /// Each request's limit, for the clients [`HarperDb::dedicated`] builds.
    timeout: Duration,
    url: String,
    username: String,
    password: SecretString,
    database: String,
    table: String,
}

/// Answers that the database or table is missing: `Table messages not found` (from a worker
/// thread that has not seen a new table yet), `Table 'chatify.messages' does not exist`,
/// `database 'chatify' does not exist`.
fn is_missing_table(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    (lower.starts_with("table ") || lower.starts_with("database "))
        && (lower.ends_with(" not found") || lower.ends_with(" does not exist"))
}

/// How often, and how far apart, a read is tried while HarperDB's threads learn of a new
/// table (a few milliseconds in practice; a table that is really gone fails after a second).
const MISSING_TABLE_TRIES: u32 = 20;
const MISSING_TABLE_PAUSE: Duration = Duration::from_millis(50);

/// Server errors that are refusals of the request, not failures of the server.
fn is_refusal(message: &str) -> bool {
    ["is too large", "must be a", "Invalid"]
        .iter()
        .any(|m| message.contains(m))
}

/// How long a connection to HarperDB may stay idle before its client closes it: before
/// HarperDB, which closes keep-alive connections idle for 30 s, so that no request goes out on
/// a connection the server is closing.
const CONNECTION_IDLE: Duration = Duration::from_secs(20);

/// A client for the operations API keeping at most `idle_connections` idle connections open.
fn client(
    timeout: Duration,
    idle_connections: usize,
    idle_timeout: Duration,
) -> Result<reqwest::Client, HarperError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(idle_connections)
        .build()
        .map_err(|e| HarperError::Unreachable(e.without_url()))
}

impl HarperDb {
    pub fn new(settings: &HarperDbSettings) -> Result<Self, HarperError> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        Ok(Self {
            http: client(timeout, usize::MAX, CONNECTION_IDLE)?,
            answering: Arc::new(AtomicBool::new(true)),
            timeout,
            url: settings.url.trim_end_matches('/').to_owned(),
            username: settings.username.clone(),
            password: settings.password.clone(),
            database: settings.database.clone(),
            table: settings.table.clone(),
        })
    }

    /// The same client on a connection of its own: used one request at a time, it keeps one
    /// keep-alive connection (closed after [`CONNECTION_IDLE`] idle), so the HarperDB thread
    /// that connection landed on serves all its requests. Calling it again is how a writer lane
    /// takes a fresh connection (see [`crate::lanes`]).
    pub fn dedicated(&self) -> Result<Self, HarperError> {
        Ok(Self {
            http: client(self.timeout, 1, CONNECTION_IDLE)?,
            ..self.clone()
        })
    }

    /// False from a failed operation (unreachable, failing, refusing the credentials) until
    /// one succeeds again: HarperDB is down, and history is to answer `unavailable`.
    pub fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    /// The same table, as another user (the admin, for `chatify-persister setup`).
    pub fn as_user(&self, username: &str, password: &SecretString) -> Self {
        Self {
            username: username.to_owned(),
            password: password.clone(),
            ..self.clone()
        }
    }

    /// The database and table this client works on.
    pub fn table(&self) -> (&str, &str) {
        (&self.database, &self.table)
    }

    pub(crate) async fn operation(&self, body: &Value) -> Result<Value, HarperError> {
        let result = self.operation_once(body).await;
        let down = result.as_ref().is_err_and(HarperError::is_outage);
        self.answering.store(!down, Ordering::Relaxed);
        result
    }

    async fn operation_once(&self, body: &Value) -> Result<Value, HarperError> {
        let response = self
            .http
            .post(&self.url)
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .json(body)
            .send()
            .await
            .map_err(|e| HarperError::Unreachable(e.without_url()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| HarperError::Unreachable(e.without_url()))?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| HarperError::Decode(e.to_string()));
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        Err(match status {
            StatusCode::UNAUTHORIZED => HarperError::Unauthorized,
            StatusCode::FORBIDDEN => HarperError::Forbidden { message },
            _ if is_missing_table(&message) => HarperError::TableMissing { status, message },
            s if s.is_client_error() => HarperError::Rejected { status, message },
            // HarperDB answers 500 to some refusals of the request itself.
            _ if is_refusal(&message) => HarperError::Rejected { status, message },
            _ => HarperError::Server { status, message },
        })
    }

    /// A read: tried again for a moment while HarperDB answers that the table is missing, so
    /// the first queries after a table's creation do not fail on a thread that has not
    /// seen it yet.
    async fn read(&self, body: &Value) -> Result<Value, HarperError> {
        let mut tries = 1;
        loop {
            match self.operation(body).await {
                Err(HarperError::TableMissing { .. }) if tries < MISSING_TABLE_TRIES => {
                    tries += 1;
                    tokio::time::sleep(MISSING_TABLE_PAUSE).await;
                }
                result => return result,
            }
        }
    }

    /// Creates the database and the table if missing. Safe to run from several persisters.
    pub async fn ensure_schema(&self) -> Result<(), HarperError> {
        let described = self
            .operation(&json!({"operation": "describe_table", "database": self.database, "table": self.table}))
            .await;
        match described {
            Ok(_) => return Ok(()),
            Err(HarperError::TableMissing { .. } | HarperError::Rejected { .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .operation(&json!({"operation": "create_database", "database": self.database}))
            .await
        {
            Ok(_) => {}
            Err(HarperError::Rejected { message, .. }) if message.contains("already exists") => {}
            Err(e) => return Err(e),
        }
        let (primary_key, _) = ATTRIBUTES[0];
        let attributes: Vec<Value> = ATTRIBUTES
            .iter()
            .map(|(name, kind)| json!({"name": name, "type": kind}))
            .collect();
        let created = self
            .operation(&json!({
                "operation": "create_table",
                "database": self.database,
                "table": self.table,
                "primary_key": primary_key,
                "audit": false,
                "attributes": attributes,
            }))
            .await;
        match created {
            Ok(_) => {}
            Err(HarperError::Rejected { message, .. }) if message.contains("already exists") => {}
            Err(e) => return Err(e),
        }
        // Table creation settles asynchronously in HarperDB; wait until it is usable.
        for _ in 0..50 {
            match self
                .operation(&json!({"operation": "describe_table", "database": self.database, "table": self.table}))
                .await
            {
                Ok(_) => return Ok(()),
                Err(HarperError::TableMissing { .. } | HarperError::Rejected { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(HarperError::Decode(format!(
            "table {}.{} did not appear after creation",
            self.database, self.table
        )))
    }

    /// Inserts messages in one request; a message whose key exists is skipped, so storing the
    /// same message twice leaves one record. All-or-nothing: one bad record rejects the batch.
    pub async fn insert(&self, messages: &[ChatMessage]) -> Result<(), HarperError> {
        let records: Vec<StoredRecord> = messages.iter().map(StoredRecord::new).collect();
        let answer = self
            .operation(&json!({
                "operation": "insert",
                "database": self.database,
                "table": self.table,
                "records": records,
            }))
            .await?;
        #[derive(Deserialize)]
        struct InsertAnswer {
            #[serde(default)]
            inserted_hashes: Vec<Value>,
            #[serde(default)]
            skipped_hashes: Vec<Value>,
        }
        let answer: InsertAnswer =
            serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))?;
        let confirmed = answer.inserted_hashes.len() + answer.skipped_hashes.len();
        if confirmed != records.len() {
            return Err(HarperError::Decode(format!(
                "insert confirmed {confirmed} of {} records",
                records.len()
            )));
        }
        Ok(())
    }

    /// Up to `limit` records whose keys an older Chatify wrote for long rooms (see
    /// [`RoomKey::is_legacy_long_key`]). A scan of the whole table (HarperDB's SQL), for the
    /// one-off migration only.
    pub async fn legacy_long_key_records(
        &self,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, HarperError> {
        let min_len = chatify_shared::storage::LEGACY_KEY_MIN_LEN;
        // The names come from the configuration; refuse anything that is not a plain name
        // rather than quote it into SQL.
        for name in [&self.database, &self.table] {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(HarperError::Rejected {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("{name:?} is not a plain database or table name"),
                });
            }
        }
        let sql = format!(
            "SELECT * FROM {}.{} WHERE LENGTH(pk) >= {min_len} AND pk NOT LIKE '-%' LIMIT {limit}",
            self.database, self.table
        );
        let answer = self
            .operation(&json!({"operation": "sql", "sql": sql}))
            .await?;
        let records: Vec<StoredRecord> =
            serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))?;
        Ok(records
            .into_iter()
            .filter(|r| RoomKey::is_legacy_long_key(&r.pk))
            .collect())
    }

    /// Deletes records by key.
    pub async fn delete(&self, keys: &[String]) -> Result<(), HarperError> {
        self.operation(&json!({
            "operation": "delete",
            "database": self.database,
            "table": self.table,
            "hash_values": keys,
        }))
        .await?;
        Ok(())
    }

    /// The newest `query.limit` messages of the room with `after < id < before`, oldest first.
    pub async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, HarperError> {
        let room = RoomKey::new(&query.room);
        let (after, before) = query.sequence_bounds();
        let lower = storage_key(&room, after);
        let upper = match query.before {
            Some(_) => storage_key(&room, before),
            None => room_keys_end(&room),
        };
        let wanted = query.limit as usize + 1;
        // `between` is inclusive: ask for the bounds too and drop them below.
        let answer = self
            .read(&json!({
                "operation": "search_by_conditions",
                "database": self.database,
                "table": self.table,
                "operator": "and",
                "limit": wanted + 2,
                "sort": {"attribute": "pk", "descending": true},
                "get_attributes": ATTRIBUTES.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
                "conditions": [{"search_attribute": "pk", "search_type": "between", "search_value": [lower, upper]}],
            }))
            .await?;
        let records: Vec<StoredRecord> =
            serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))?;
        let mut newest_first: Vec<ChatMessage> = records
            .into_iter()
            .filter(|r| r.pk != lower && r.pk != upper)
            .take(wanted)
            .map(StoredRecord::into_message)
            .collect();
        let has_more = newest_first.len() > query.limit as usize;
        newest_first.truncate(query.limit as usize);
        newest_first.reverse();
        Ok(HistoryPage {
            messages: newest_first,
            has_more,
            ..HistoryPage::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn only_a_refused_request_or_an_unreadable_answer_is_no_outage() {
        let rejected = HarperError::Rejected {
            status: StatusCode::BAD_REQUEST,
            message: "bad".into(),
        };
        assert!(!rejected.is_outage());
        assert!(!HarperError::Decode("x".into()).is_outage());
        assert!(HarperError::Unauthorized.is_outage());
        assert!(
            HarperError::Server {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "x".into()
            }
            .is_outage()
        );
        assert!(
            HarperError::TableMissing {
                status: StatusCode::NOT_FOUND,
                message: "x".into()
            }
            .is_outage()
        );
    }

    #[test]
    fn missing_tables_are_told_apart_from_refusals() {
        for missing in [
            "Table messages not found",
            "Table 'chatify.messages' does not exist",
            "database 'chatify' does not exist",
        ] {
            assert!(is_missing_table(missing), "{missing}");
        }
        for other in [
            "Attribute 'x' was not found in 'chatify.messages'",
            "Table 'chatify.messages' already exists",
            "value for room must be a string",
            "not found",
        ] {
            assert!(!is_missing_table(other), "{other}");
        }
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// What the fake operations API saw: the requests and the connections they came on.
    #[derive(Default)]
    struct Seen {
        calls: std::sync::atomic::AtomicUsize,
        peers: std::sync::Mutex<HashSet<std::net::SocketAddr>>,
    }

    impl Seen {
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn peers(&self) -> HashSet<std::net::SocketAddr> {
            self.peers.lock().map(|p| p.clone()).unwrap_or_default()
        }
    }

    /// A fake operations API: answers `missing` "table not found" errors, then empty results.
    async fn fake_harperdb(
        missing: usize,
    ) -> Result<(HarperDb, Arc<Seen>), Box<dyn std::error::Error>> {
        use axum::extract::ConnectInfo;
        use axum::{Json, http::StatusCode as Code, routing::post};
        let seen = Arc::new(Seen::default());
        let recorder = seen.clone();
        let app = axum::Router::new().route(
            "/",
            post(
                move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| {
                    let call = recorder.calls.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut peers) = recorder.peers.lock() {
                        peers.insert(peer);
                    }
                    async move {
                        if call < missing {
                            (
                                Code::BAD_REQUEST,
                                Json(json!({"error": "Table messages not found"})),
                            )
                        } else {
                            (Code::OK, Json(json!([])))
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, service).await });
        let settings = HarperDbSettings {
            url,
            ..HarperDbSettings::default()
        };
        Ok((HarperDb::new(&settings)?, seen))
    }

    fn latest(room: &str) -> HistoryQuery {
        HistoryQuery {
            room: room.into(),
            before: None,
            after: None,
            limit: 50,
            ..HistoryQuery::default()
        }
    }

    #[tokio::test]
    async fn a_read_waits_for_a_table_that_a_thread_has_not_seen_yet() -> TestResult {
        let (db, seen) = fake_harperdb(3).await?;
        let page = db.history(&latest("r")).await?;
        assert!(page.messages.is_empty() && !page.has_more);
        assert_eq!(seen.calls(), 4);
        assert!(db.answering());
        Ok(())
    }

    #[tokio::test]
    async fn a_table_that_stays_missing_is_reported_as_missing() -> TestResult {
        let (db, seen) = fake_harperdb(usize::MAX).await?;
        let Err(e) = db.history(&latest("r")).await else {
            panic!("a table that is never there gave an answer");
        };
        assert!(matches!(e, HarperError::TableMissing { .. }), "{e}");
        assert!(e.is_outage());
        assert_eq!(seen.calls(), MISSING_TABLE_TRIES as usize);
        assert!(!db.answering());
        Ok(())
    }

    #[tokio::test]
    async fn a_dedicated_client_keeps_its_connection_until_it_is_replaced() -> TestResult {
        let (db, seen) = fake_harperdb(0).await?;
        let lane = db.dedicated()?;
        for _ in 0..20 {
            lane.history(&latest("r")).await?;
        }
        let first = seen.peers();
        assert_eq!(first.len(), 1, "one lane, one request at a time: {first:?}");
        // Reconnecting is a new client: a new connection, so a new draw of HarperDB's thread.
        let lane = lane.dedicated()?;
        for _ in 0..20 {
            lane.history(&latest("r")).await?;
        }
        let both = seen.peers();
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(first.is_subset(&both));
        assert_eq!(seen.calls(), 40);
        Ok(())
    }
}
