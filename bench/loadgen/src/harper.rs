//! HarperDB's operations API, for seeding, reading back and the direct-insert ceiling; and the
//! persister's /metrics counter.

use std::time::Duration;

use anyhow::{Context, bail};
use chatify_shared::id::now_millis;
use chatify_shared::storage::{ATTRIBUTES, RoomKey, StoredRecord, room_keys_end, storage_key};
use chatify_shared::wire::StoredMessage;
use serde_json::{Value, json};

/// Batches the direct ceiling writes on one connection before it takes a fresh one, as the
/// persister's lanes do (`RECONNECT_EVERY` in persister/src/lanes.rs: change both together).
pub const RECONNECT_EVERY: u32 = 64;

/// How long a dedicated connection may stay idle before its client closes it, as the
/// persister's (`DEDICATED_IDLE` in persister/src/harperdb.rs).
const DEDICATED_IDLE: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct Harper {
    http: reqwest::Client,
    url: String,
    user: String,
    pass: String,
}

/// One message in the persister's record shape, as if it had been stored at stream `sequence`
/// just now (its id carries the sequence, as Chatify's ids do).
pub fn record(room: &str, sequence: u64, text: &str) -> StoredRecord {
    let message = StoredMessage {
        room: room.to_owned(),
        username: "seed".to_owned(),
        message: text.to_owned(),
        created_time: now_millis(),
        user_id: None,
        reply_to: None,
    };
    StoredRecord::new(&message.into_message(sequence))
}

impl Harper {
    pub fn new(url: &str, user: &str, pass: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            url: url.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
        })
    }

    /// The same client on a connection of its own, as the persister's writer lanes are
    /// (`HarperDb::dedicated` in persister/src/harperdb.rs); calling it again reconnects.
    pub fn dedicated(&self) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(1)
                .pool_idle_timeout(DEDICATED_IDLE)
                .build()?,
            ..self.clone()
        })
    }

    pub async fn op(&self, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(&self.url)
            .basic_auth(&self.user, Some(&self.pass))
            .json(body)
            .send()
            .await
            .context("HarperDB request")?;
        let status = r.status();
        let text = r.text().await.context("HarperDB answer")?;
        if !status.is_success() {
            bail!(
                "HarperDB {status}: {}",
                text.chars().take(200).collect::<String>()
            );
        }
        serde_json::from_str(&text).context("HarperDB answer is not JSON")
    }

    /// Creates `db.table` with the persister's schema (primary key `pk`, nothing else indexed).
    pub async fn ensure_table(&self, db: &str, table: &str) -> anyhow::Result<()> {
        if self
            .op(&json!({"operation": "describe_table", "database": db, "table": table}))
            .await
            .is_ok()
        {
            return Ok(());
        }
        let _ = self
            .op(&json!({"operation": "create_database", "database": db}))
            .await;
        let (primary_key, _) = ATTRIBUTES[0];
        let attributes: Vec<Value> = ATTRIBUTES
            .iter()
            .map(|(name, kind)| json!({"name": name, "type": kind}))
            .collect();
        let _ = self
            .op(&json!({
                "operation": "create_table", "database": db, "table": table,
                "primary_key": primary_key, "audit": false, "attributes": attributes,
            }))
            .await;
        for _ in 0..100 {
            if self
                .op(&json!({"operation": "describe_table", "database": db, "table": table}))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("table {db}.{table} did not appear")
    }

    pub async fn insert(
        &self,
        db: &str,
        table: &str,
        records: Vec<StoredRecord>,
    ) -> anyhow::Result<usize> {
        let n = records.len();
        let answer = self
            .op(&json!({"operation": "insert", "database": db, "table": table, "records": records}))
            .await?;
        let done = answer
            .get("inserted_hashes")
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
            + answer
                .get("skipped_hashes")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
        if done != n {
            bail!("insert confirmed {done} of {n} records");
        }
        Ok(n)
    }

    /// The message ids stored for `room` (a `between` on the primary key, as the persister reads).
    pub async fn room_ids(&self, db: &str, table: &str, room: &str) -> anyhow::Result<Vec<String>> {
        let key = RoomKey::new(room);
        let (lo, hi) = (storage_key(&key, 0), room_keys_end(&key));
        let answer = self
            .op(&json!({
                "operation": "search_by_conditions", "database": db, "table": table,
                "get_attributes": ["id"],
                "conditions": [{"search_attribute": "pk", "search_type": "between", "search_value": [lo, hi]}],
            }))
            .await?;
        Ok(answer
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// `chatify_persister_messages_stored_total` from a Prometheus text page (0 when absent: the
/// counter appears only after the first write).
pub fn stored_total(metrics: &str) -> Option<u64> {
    let mut found = None;
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("chatify_persister_messages_stored_total") {
            let value = rest.split_ascii_whitespace().last()?;
            found = Some(found.unwrap_or(0) + value.parse::<f64>().ok()? as u64);
        }
    }
    Some(found.unwrap_or(0))
}

pub async fn fetch_stored_total(http: &reqwest::Client, metrics_url: &str) -> anyhow::Result<u64> {
    let text = http
        .get(metrics_url)
        .send()
        .await
        .context("persister /metrics")?
        .text()
        .await?;
    stored_total(&text).context("unparsable /metrics")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatify_shared::id::sequence_of;

    #[test]
    fn records_are_stored_as_at_their_sequence_now() {
        let r = record("r", 7, "hi");
        assert_eq!(r.pk, storage_key(&RoomKey::new("r"), 7));
        assert_eq!(sequence_of(&r.id), Some(7));
        assert_eq!((r.username.as_str(), r.message.as_str()), ("seed", "hi"));
        assert!(r.created_time > 1_700_000_000_000);
    }

    #[test]
    fn metrics_counter() {
        let page = "# HELP x\nchatify_persister_messages_stored_total 1234\nother 5\n";
        assert_eq!(stored_total(page), Some(1234));
        assert_eq!(stored_total("other 1\n"), Some(0));
        assert_eq!(
            stored_total("chatify_persister_messages_stored_total nope"),
            None
        );
    }
}
