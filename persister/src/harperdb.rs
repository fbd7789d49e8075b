//! HarperDB over its HTTP operations API: the persister's tables, written in batches and read
//! by history queries. The messages table holds each message in its current state (inserted
//! as stored, then updated as changes come); the change log table beside it
//! ([`chatify_shared::storage::changes_table`]) what each change did, insert-only.
//!
//! Reads ask for every attribute (`*`) rather than naming them: a table created by an older
//! Chatify declares fewer attributes, and HarperDB 4.7 refuses to name an undeclared one in a
//! read (while it stores them in writes), so naming them would break history on such a table.
//!
//! HarperDB 4.7's `search_by_conditions` silently drops a `<` condition combined with a room
//! filter and a sort, on tables of realistic size. So the table has one index only, its primary
//! key, which sorts by room and then by the room's order ([`chatify_shared::storage`]), and every
//! history query is one `between` on that key, sorted by it, with a limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatify_shared::changes::MessageState;
use chatify_shared::config::HarperDbSettings;
use chatify_shared::storage::{
    ATTRIBUTES, CHANGE_ATTRIBUTES, RoomKey, StoredChangeRecord, StoredRecord, changes_table,
    room_keys_end, storage_key,
};
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
    /// only read, insert and update its messages table and read and insert into its change log
    /// (see [`crate::setup`]), and setting the tables up is an admin's work.
    #[error(
        "HarperDB does not allow this user to do that ({message}); the database, the tables and the persister's user are set up by `chatify-persister setup` with a super user's credentials (harperdb.admin_username and harperdb.admin_password)"
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
    /// The messages table.
    table: String,
    /// The change log table beside it.
    changes_table: String,
}

/// A page of a room's messages in their current state, oldest first, and whether older ones
/// matched beyond it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatePage {
    pub states: Vec<MessageState>,
    pub has_more: bool,
}

impl StatePage {
    /// The page as clients see it.
    pub fn into_page(self) -> HistoryPage {
        HistoryPage {
            messages: self.states.into_iter().map(|s| s.message).collect(),
            has_more: self.has_more,
            ..HistoryPage::default()
        }
    }
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
            changes_table: changes_table(&settings.table),
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

    /// The change log table beside it, in the same database.
    pub fn changes_table(&self) -> &str {
        &self.changes_table
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

    /// Creates the database, the messages table and the change log table if missing, and
    /// declares the attributes an existing table (of an older Chatify) lacks. Safe to run from
    /// several persisters. A user that may not declare attributes (the persister's own, see
    /// [`crate::setup`]) leaves that to `chatify-persister setup`, with a warning.
    pub async fn ensure_schema(&self) -> Result<(), HarperError> {
        let tables = [
            (self.table.as_str(), &ATTRIBUTES[..]),
            (self.changes_table.as_str(), &CHANGE_ATTRIBUTES[..]),
        ];
        let mut database_checked = false;
        for (table, attributes) in tables {
            if let Some(described) = self.describe_attributes(table).await? {
                self.declare_missing(table, attributes, &described).await?;
                continue;
            }
            if !database_checked {
                self.ensure_database().await?;
                database_checked = true;
            }
            self.create_table(table, attributes).await?;
        }
        Ok(())
    }

    /// Whether `table` exists (HarperDB describes it).
    async fn describe(&self, table: &str) -> Result<bool, HarperError> {
        Ok(self.describe_attributes(table).await?.is_some())
    }

    /// The attributes `table` declares, or `None` when it does not exist.
    async fn describe_attributes(&self, table: &str) -> Result<Option<Vec<String>>, HarperError> {
        let described = self
            .operation(
                &json!({"operation": "describe_table", "database": self.database, "table": table}),
            )
            .await;
        match described {
            Ok(answer) => Ok(Some(
                answer
                    .get("attributes")
                    .and_then(Value::as_array)
                    .map(|attributes| {
                        attributes
                            .iter()
                            .filter_map(|a| a.get("attribute").and_then(Value::as_str))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            )),
            Err(HarperError::TableMissing { .. } | HarperError::Rejected { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Declares the `attributes` of `table` missing from `described`.
    async fn declare_missing(
        &self,
        table: &str,
        attributes: &[(&str, &str)],
        described: &[String],
    ) -> Result<(), HarperError> {
        for (name, _) in attributes {
            if described.iter().any(|d| d == name) {
                continue;
            }
            let created = self
                .operation(&json!({
                    "operation": "create_attribute",
                    "database": self.database,
                    "table": table,
                    "attribute": name,
                }))
                .await;
            match created {
                Ok(_) => tracing::info!(table, attribute = name, "attribute declared"),
                Err(HarperError::Rejected { message, .. })
                    if message.contains("already exists") => {}
                Err(HarperError::Forbidden { message }) => {
                    tracing::warn!(table, attribute = name, %message, "an attribute of this Chatify is not declared and this user may not declare it: run `chatify-persister setup`");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn ensure_database(&self) -> Result<(), HarperError> {
        match self
            .operation(&json!({"operation": "create_database", "database": self.database}))
            .await
        {
            Ok(_) => Ok(()),
            Err(HarperError::Rejected { message, .. }) if message.contains("already exists") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Creates `table` with `attributes` (the primary key first), indexed by its primary key
    /// only, and waits until HarperDB describes it.
    async fn create_table(
        &self,
        table: &str,
        attributes: &[(&str, &str)],
    ) -> Result<(), HarperError> {
        let primary_key = attributes.first().map(|(name, _)| *name).unwrap_or("pk");
        let attributes: Vec<Value> = attributes
            .iter()
            .map(|(name, kind)| json!({"name": name, "type": kind}))
            .collect();
        let created = self
            .operation(&json!({
                "operation": "create_table",
                "database": self.database,
                "table": table,
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
            if self.describe(table).await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(HarperError::Decode(format!(
            "table {}.{table} did not appear after creation",
            self.database
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
        confirm_insert(answer, records.len())
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
        Ok(self.history_states(query).await?.into_page())
    }

    /// [`HarperDb::history`] with each message's whole state (who reacted, the last change).
    pub async fn history_states(&self, query: &HistoryQuery) -> Result<StatePage, HarperError> {
        let room = RoomKey::new(&query.room);
        let (after, before) = query.sequence_bounds();
        let lower = storage_key(&room, after);
        let upper = match query.before {
            Some(_) => storage_key(&room, before),
            None => room_keys_end(&room),
        };
        let wanted = query.limit as usize + 1;
        let records: Vec<StoredRecord> =
            self.range(&self.table, &lower, &upper, wanted + 2).await?;
        // `between` is inclusive: the bounds were asked for too, and are dropped here.
        let mut newest_first: Vec<MessageState> = records
            .into_iter()
            .filter(|r| r.pk != lower && r.pk != upper)
            .take(wanted)
            .map(StoredRecord::into_state)
            .collect();
        let has_more = newest_first.len() > query.limit as usize;
        newest_first.truncate(query.limit as usize);
        newest_first.reverse();
        Ok(StatePage {
            states: newest_first,
            has_more,
        })
    }

    /// Up to `limit` records of `table` with keys from `lower` to `upper` (both included),
    /// newest first: one `between` on the primary key, sorted by it (see the module's notes on
    /// HarperDB's searches).
    async fn range<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        lower: &str,
        upper: &str,
        limit: usize,
    ) -> Result<Vec<T>, HarperError> {
        let answer = self
            .read(&json!({
                "operation": "search_by_conditions",
                "database": self.database,
                "table": table,
                "operator": "and",
                "limit": limit,
                "sort": {"attribute": "pk", "descending": true},
                "get_attributes": ["*"],
                "conditions": [{"search_attribute": "pk", "search_type": "between", "search_value": [lower, upper]}],
            }))
            .await?;
        serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))
    }

    /// The messages stored under `keys` ([`storage_key`]s), in their current state; keys with
    /// no message are left out. One `search_by_hash`.
    pub async fn states(&self, keys: &[String]) -> Result<Vec<MessageState>, HarperError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let answer = self
            .read(&json!({
                "operation": "search_by_hash",
                "database": self.database,
                "table": self.table,
                "hash_values": keys,
                "get_attributes": ["*"],
            }))
            .await?;
        let records: Vec<StoredRecord> =
            serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))?;
        Ok(records.into_iter().map(StoredRecord::into_state).collect())
    }

    /// Writes messages' states over their rows in one request (an `upsert`, which needs the
    /// table's insert and update permissions). Every attribute is written, those a state does
    /// not have as null: an upsert keeps the attributes a record leaves out, and a deleted
    /// message must lose its text, author and reactions.
    pub async fn update(&self, states: &[MessageState]) -> Result<(), HarperError> {
        let records = states
            .iter()
            .map(|s| {
                let mut record = serde_json::to_value(StoredRecord::from_state(s))
                    .map_err(|e| HarperError::Decode(e.to_string()))?;
                if let Some(fields) = record.as_object_mut() {
                    for (name, _) in ATTRIBUTES {
                        fields.entry(name).or_insert(Value::Null);
                    }
                }
                Ok(record)
            })
            .collect::<Result<Vec<Value>, HarperError>>()?;
        let answer = self
            .operation(&json!({
                "operation": "upsert",
                "database": self.database,
                "table": self.table,
                "records": records,
            }))
            .await?;
        #[derive(Deserialize)]
        struct UpsertAnswer {
            #[serde(default)]
            upserted_hashes: Vec<Value>,
        }
        let answer: UpsertAnswer =
            serde_json::from_value(answer).map_err(|e| HarperError::Decode(e.to_string()))?;
        if answer.upserted_hashes.len() != records.len() {
            return Err(HarperError::Decode(format!(
                "upsert confirmed {} of {} records",
                answer.upserted_hashes.len(),
                records.len()
            )));
        }
        Ok(())
    }

    /// Inserts change log records in one request; one whose key exists is skipped, so logging
    /// a change twice leaves one record.
    pub async fn log_changes(&self, records: &[StoredChangeRecord]) -> Result<(), HarperError> {
        let answer = self
            .operation(&json!({
                "operation": "insert",
                "database": self.database,
                "table": self.changes_table,
                "records": records,
            }))
            .await?;
        confirm_insert(answer, records.len())
    }

    /// The change log of `room` after stream sequence `after`, oldest first: the newest
    /// `limit` records, and whether older ones were left out.
    pub async fn changes_after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<StoredChangeRecord>, bool), HarperError> {
        let room = RoomKey::new(room);
        let lower = storage_key(&room, after);
        let upper = room_keys_end(&room);
        let records: Vec<StoredChangeRecord> = self
            .range(&self.changes_table, &lower, &upper, limit + 2)
            .await?;
        let mut newest_first: Vec<StoredChangeRecord> = records
            .into_iter()
            .filter(|r| r.pk != lower && r.pk != upper)
            .collect();
        let more = newest_first.len() > limit;
        newest_first.truncate(limit);
        newest_first.reverse();
        Ok((newest_first, more))
    }
}

/// Checks that HarperDB confirmed every record of an insert: inserted, or skipped because its
/// key exists.
fn confirm_insert(answer: Value, records: usize) -> Result<(), HarperError> {
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
    if confirmed != records {
        return Err(HarperError::Decode(format!(
            "insert confirmed {confirmed} of {records} records"
        )));
    }
    Ok(())
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
