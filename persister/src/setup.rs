//! `chatify-persister setup`: prepares HarperDB for a persister that has only the rights it
//! needs. Run with a super user's credentials (`harperdb.admin_username` and
//! `harperdb.admin_password`), it creates the database, the messages table (with the attributes
//! of [`chatify_shared::storage::ATTRIBUTES`], as [`HarperDb::ensure_schema`] does, which also
//! declares attributes a table of an older Chatify lacks) and the change log table beside it
//! ([`chatify_shared::storage::changes_table`]), a role that may only read, insert and update
//! the messages table (changes are written as upserts of a message's state) and read and
//! insert into the change log, and the persister's user (`harperdb.username` and
//! `harperdb.password`) with that role. Running it again brings the role's permissions and the
//! user's password and role to what the settings say, so it is safe on every deployment.

use std::time::Duration;

use chatify_shared::config::HarperDbSettings;
use chatify_shared::storage::changes_table;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::harperdb::{HarperDb, HarperError};

/// Why HarperDB could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "harperdb.admin_username and harperdb.admin_password (CHATIFY_HARPERDB__ADMIN_USERNAME, CHATIFY_HARPERDB__ADMIN_PASSWORD) must name a HarperDB super user"
    )]
    NoAdmin,
    #[error(
        "harperdb.username and harperdb.password (CHATIFY_HARPERDB__USERNAME, CHATIFY_HARPERDB__PASSWORD) must name the persister's user to create"
    )]
    NoUser,
    #[error(
        "the persister's user {0:?} is the admin user: give the persister a user of its own, which setup creates with only the rights it needs"
    )]
    SameUser(String),
    #[error("could not create the database and the table: {0}")]
    Schema(#[source] HarperError),
    #[error("could not create or update the role {role}: {source}")]
    Role { role: String, source: HarperError },
    #[error("could not create or update the user {user}: {source}")]
    User { user: String, source: HarperError },
    #[error("the user {user} cannot read its table after setup: {source}")]
    Check { user: String, source: HarperError },
}

/// The name of the role of the persisters writing to `database.table`.
pub fn role_name(database: &str, table: &str) -> String {
    format!("{database}_{table}_persister")
}

/// The role's permission: read, insert and update the messages table (a change upserts its
/// message's state), read and insert into its change log; nothing else (no delete, no other
/// table, no schema or user operation: those are a super user's).
pub fn role_permission(database: &str, table: &str) -> Value {
    json!({
        "super_user": false,
        database: {
            "tables": {
                table: {
                    "read": true,
                    "insert": true,
                    "update": true,
                    "delete": false,
                    "attribute_permissions": [],
                },
                changes_table(table): {
                    "read": true,
                    "insert": true,
                    "update": false,
                    "delete": false,
                    "attribute_permissions": [],
                }
            }
        }
    })
}

fn already_exists(e: &HarperError) -> bool {
    matches!(e, HarperError::Rejected { message, .. } if message.contains("already exists"))
}

/// Sets HarperDB up as the module says; `db` is a client for the persister's table (its user
/// is replaced by the admin for the work).
pub async fn setup(db: &HarperDb, settings: &HarperDbSettings) -> Result<(), SetupError> {
    if settings.admin_username.is_empty() || settings.admin_password.expose_secret().is_empty() {
        return Err(SetupError::NoAdmin);
    }
    if settings.username.is_empty() || settings.password.expose_secret().is_empty() {
        return Err(SetupError::NoUser);
    }
    if settings.username == settings.admin_username {
        return Err(SetupError::SameUser(settings.username.clone()));
    }
    let admin = db.as_user(&settings.admin_username, &settings.admin_password);
    admin.ensure_schema().await.map_err(SetupError::Schema)?;

    let (database, table) = db.table();
    let role = role_name(database, table);
    let permission = role_permission(database, table);
    let added = admin
        .operation(&json!({"operation": "add_role", "role": role, "permission": permission}))
        .await;
    match added {
        Ok(_) => tracing::info!(%role, "role created"),
        Err(e) if already_exists(&e) => {
            admin
                .operation(&json!({"operation": "alter_role", "id": role, "role": role, "permission": permission}))
                .await
                .map_err(|source| SetupError::Role {
                    role: role.clone(),
                    source,
                })?;
            tracing::info!(%role, "role updated");
        }
        Err(source) => return Err(SetupError::Role { role, source }),
    }

    let user = &settings.username;
    let password = settings.password.expose_secret();
    let fields = json!({"username": user, "password": password, "role": role, "active": true});
    let mut add = fields.clone();
    add["operation"] = "add_user".into();
    match admin.operation(&add).await {
        Ok(_) => tracing::info!(%user, %role, "user created"),
        Err(e) if already_exists(&e) => {
            let mut alter = fields;
            alter["operation"] = "alter_user".into();
            admin
                .operation(&alter)
                .await
                .map_err(|source| SetupError::User {
                    user: user.clone(),
                    source,
                })?;
            tracing::info!(%user, %role, "user updated");
        }
        Err(source) => {
            return Err(SetupError::User {
                user: user.clone(),
                source,
            });
        }
    }

    // The new user logs in and sees its table (HarperDB's threads learn of it in a moment).
    let describe = json!({"operation": "describe_table", "database": database, "table": table});
    let mut tries = 0;
    loop {
        match db.operation(&describe).await {
            Ok(_) => return Ok(()),
            Err(e) if tries < 50 && e.is_outage() => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(SetupError::Check {
                    user: user.clone(),
                    source,
                });
            }
        }
    }
}
