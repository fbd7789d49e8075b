//! `chatify-persister migrate-keys`: rewrites the rows an older Chatify stored for rooms whose
//! names make keys too long for HarperDB to range over (see `chatify_shared::storage`). Their
//! history was lost to every reader; moved to their room's current key, it is found again.
//! Safe to run while the system runs and to run again: each row is inserted under its new key
//! (an insert skips a key that exists) before its old key is deleted.

use chatify_shared::storage::StoredRecord;

use crate::harperdb::{HarperDb, HarperError};

/// Rows moved per round.
const ROUND: usize = 500;

/// Moves every legacy long-key row to its room's current key; returns how many moved.
pub async fn migrate_long_keys(db: &HarperDb) -> Result<usize, HarperError> {
    let mut moved = 0;
    loop {
        let legacy = db.legacy_long_key_records(ROUND).await?;
        if legacy.is_empty() {
            return Ok(moved);
        }
        let old_keys: Vec<String> = legacy.iter().map(|r| r.pk.clone()).collect();
        let messages: Vec<_> = legacy.into_iter().map(StoredRecord::into_message).collect();
        db.insert(&messages).await?;
        db.delete(&old_keys).await?;
        moved += old_keys.len();
        tracing::info!(moved, "rows moved to their room's current key");
    }
}
