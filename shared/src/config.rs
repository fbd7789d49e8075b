//! Configuration: built-in defaults, then an optional TOML file, then `CHATIFY_` environment
//! variables (a `.env` file in the working directory is loaded into the environment first).
//!
//! Nested keys are joined by `__` in variable names: `gateway.port` is `CHATIFY_GATEWAY__PORT`.
//! The file is `chatify.toml` in the working directory if it exists, or the file named by
//! `CHATIFY_CONFIG` (which must then exist).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Environment variable naming the configuration file.
pub const CONFIG_FILE_VAR: &str = "CHATIFY_CONFIG";
/// The configuration file read when [`CONFIG_FILE_VAR`] is not set, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "chatify.toml";
const ENV_PREFIX: &str = "CHATIFY";

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the .env file: {0}")]
    DotEnv(#[from] dotenvy::Error),
    #[error("invalid configuration: {0}")]
    Source(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A setting the configuration names that Chatify does not have: most likely a typo, which
/// would otherwise leave the setting at its default without a word. Reported at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownKey {
    /// A `CHATIFY_` environment variable that is no setting (nor `CHATIFY_CONFIG`).
    Variable(String),
    /// A key of the configuration file that is no setting.
    FileKey { file: PathBuf, key: String },
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Variable(name) => {
                write!(
                    f,
                    "the environment variable {name} is not a Chatify setting and is ignored"
                )?;
                match meant_variable(name) {
                    Some(meant) => write!(f, " (did you mean {meant}?)"),
                    None => Ok(()),
                }
            }
            Self::FileKey { file, key } => write!(
                f,
                "{key:?} in {} is not a Chatify setting and is ignored",
                file.display()
            ),
        }
    }
}

/// Logs each unknown key as a warning (once logging is set up).
pub fn warn_unknown(unknown: &[UnknownKey]) {
    for key in unknown {
        tracing::warn!("{key}; see docs/configuration.md for the settings");
    }
}

/// Every setting of both binaries; each reads the sections it needs.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Settings {
    pub nats: NatsSettings,
    pub stream: StreamSettings,
    pub harperdb: HarperDbSettings,
    pub gateway: GatewaySettings,
    pub persister: PersisterSettings,
    pub limits: Limits,
    pub cors: CorsSettings,
    pub auth: AuthSettings,
    pub access: AccessSettings,
    pub log: LogSettings,
}

/// Where NATS is and how to log in to it. At most one way of authenticating is set: `user`
/// and `password`, `token`, `creds_file` or `nkey_seed_file` (none: an anonymous connection,
/// which a NATS set up as docs/security.md says refuses).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct NatsSettings {
    /// Server URL(s), comma separated.
    pub url: String,
    /// How long a request to another service (history) may take before `unavailable`.
    pub request_timeout_ms: u64,
    /// User name, with `password`; empty for none.
    pub user: String,
    /// The user's password.
    #[serde(serialize_with = "redacted")]
    pub password: SecretString,
    /// An authentication token (a server with `authorization { token }`); empty for none.
    #[serde(serialize_with = "redacted")]
    pub token: SecretString,
    /// A `.creds` file (a user JWT and its nkey seed, as `nsc` writes them); empty for none.
    pub creds_file: String,
    /// A file holding a user nkey seed (`SU...`); empty for none.
    pub nkey_seed_file: String,
    /// PEM file of the CA certificates the server's certificate is checked against; set, the
    /// connection must use TLS.
    pub tls_ca_file: String,
    /// PEM client certificate (with `tls_key_file`) for servers that verify clients; set, the
    /// connection must use TLS.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            request_timeout_ms: 5000,
            user: String::new(),
            password: SecretString::from(""),
            token: SecretString::from(""),
            creds_file: String::new(),
            nkey_seed_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// How a client proves who it is to NATS, from [`NatsSettings`].
#[derive(Debug, Clone)]
pub enum NatsAuth {
    /// No credentials.
    Anonymous,
    /// `user` and `password`.
    UserPassword {
        /// The user name.
        user: String,
        /// Its password.
        password: SecretString,
    },
    /// A token.
    Token(SecretString),
    /// A `.creds` file.
    CredsFile(PathBuf),
    /// A file holding an nkey seed.
    NkeySeedFile(PathBuf),
}

impl NatsSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The one way of authenticating that is set; an error when several are, or a user lacks
    /// its password (or a password its user).
    pub fn auth(&self) -> Result<NatsAuth, ConfigError> {
        let password = !self.password.expose_secret().is_empty();
        let mut ways = Vec::new();
        if !self.user.is_empty() || password {
            if self.user.is_empty() || !password {
                return Err(ConfigError::Invalid(
                    "nats.user and nats.password go together: set both or neither".into(),
                ));
            }
            ways.push(NatsAuth::UserPassword {
                user: self.user.clone(),
                password: self.password.clone(),
            });
        }
        if !self.token.expose_secret().is_empty() {
            ways.push(NatsAuth::Token(self.token.clone()));
        }
        if !self.creds_file.is_empty() {
            ways.push(NatsAuth::CredsFile(PathBuf::from(&self.creds_file)));
        }
        if !self.nkey_seed_file.is_empty() {
            ways.push(NatsAuth::NkeySeedFile(PathBuf::from(&self.nkey_seed_file)));
        }
        match ways.len() {
            0 => Ok(NatsAuth::Anonymous),
            1 => Ok(ways.remove(0)),
            _ => Err(ConfigError::Invalid(
                "set at most one of nats.user/nats.password, nats.token, nats.creds_file and nats.nkey_seed_file".into(),
            )),
        }
    }

    /// Whether TLS is required: a CA or a client certificate is configured (or the URL says
    /// `tls://`, which the client honours by itself).
    pub fn tls_required(&self) -> bool {
        !self.tls_ca_file.is_empty() || !self.tls_cert_file.is_empty()
    }

    /// The servers of `url`: its comma-separated URLs, trimmed, empty ones left out. The client
    /// tries them in turn (and the servers a cluster advertises), at the start and after a loss.
    pub fn server_urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.auth()?;
        if self.server_urls().is_empty() {
            return Err(ConfigError::Invalid(
                "nats.url must name at least one server".into(),
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(ConfigError::Invalid(
                "nats.tls_cert_file and nats.tls_key_file go together: set both or neither".into(),
            ));
        }
        Ok(())
    }
}

/// The JetStream stream that holds messages between the gateways and the persisters.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Window in which a repeated `Nats-Msg-Id` (a retried `clientId`) is stored only once.
    pub duplicate_window_secs: u64,
    /// How long a message stays in the stream after it was stored (it must outlive the
    /// duplicate window, since a retry's ack reads the first message back).
    pub max_age_secs: u64,
    /// Largest message the stream accepts, in bytes.
    pub max_message_bytes: i32,
    /// Stream replicas (1 on a single server, 3 on a cluster).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            duplicate_window_secs: 120,
            max_age_secs: 24 * 3600,
            max_message_bytes: 64 * 1024,
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct HarperDbSettings {
    /// Operations API base URL.
    pub url: String,
    /// The persister's user: it may only read, insert and update its messages table and read and insert into its change log (`chatify-persister
    /// setup` creates it).
    pub username: String,
    /// That user's password.
    #[serde(serialize_with = "redacted")]
    pub password: SecretString,
    /// A super user of HarperDB, for `chatify-persister setup` only (it creates the database,
    /// the table, the persister's role and user); never needed by the running persister.
    pub admin_username: String,
    /// That super user's password.
    #[serde(serialize_with = "redacted")]
    pub admin_password: SecretString,
    /// The database holding the table.
    pub database: String,
    /// The table of messages.
    pub table: String,
    /// Timeout of one operations API request.
    pub timeout_ms: u64,
}

impl Default for HarperDbSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:9925".into(),
            username: "chatify_persister".into(),
            password: SecretString::from(""),
            admin_username: String::new(),
            admin_password: SecretString::from(""),
            database: "chatify".into(),
            table: "messages".into(),
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewaySettings {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Instance name for logs.
    pub name: String,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// Outgoing packets queued per socket before emits to it fail (a slow client).
    pub max_buffer_size: usize,
    /// Bytes of outgoing packets queued per socket from which emits to it fail the same way.
    pub max_buffer_bytes: usize,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may wait for its next request, before the connection is closed.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body.
    pub body_read_timeout_ms: u64,
    /// How long a new connection may take to join the namespace before it is closed.
    pub connect_timeout_ms: u64,
    /// How often the gateway tells the others it is alive.
    pub heartbeat_interval_ms: u64,
    /// After how long without a heartbeat a gateway's members are dropped from every room.
    pub gateway_timeout_ms: u64,
    /// How long shutdown may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
    /// Bytes of message states (reactions and who made them) a room's listener keeps to
    /// apply changes in order; the least recently changed messages are dropped beyond.
    pub message_states_bytes_per_room: usize,
    /// `host:port` at which the other gateways reach this one, to hand it a WebSocket upgrade
    /// of one of its sessions that reached them; empty: the listener's own address (loopback
    /// when it listens on every interface).
    pub advertise_address: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 4001,
            name: "gateway".into(),
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            max_buffer_size: 128,
            max_buffer_bytes: 1024 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            connect_timeout_ms: 5000,
            heartbeat_interval_ms: 2000,
            gateway_timeout_ms: 7000,
            shutdown_timeout_ms: 10_000,
            message_states_bytes_per_room: 64 * 1024,
            advertise_address: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PersisterSettings {
    pub host: String,
    /// Port of the small HTTP server for /healthz, /readyz and /metrics; 0 picks a free one.
    pub port: u16,
    /// Most messages written to HarperDB in one request.
    pub batch_size: usize,
    /// How long a batch waits to fill once it has its first message.
    pub batch_wait_ms: u64,
    /// HarperDB connections the writer inserts on, one insert at a time on each, each replaced
    /// by a fresh one after 64 batches (so two the kernel put on one HarperDB worker thread do
    /// not stay there). Best at HarperDB's thread count (`threads.count`, by default its cores).
    pub write_connections: usize,
    /// First delay before a failed write is retried; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How many times a message HarperDB refuses (not a failure, a refusal) is tried before it
    /// is moved to the dead-letter stream.
    pub max_attempts: u32,
    /// Most bytes of recent messages the history service keeps in memory (the newest 100 of the
    /// rooms asked for lately); 0 turns the cache off.
    pub history_cache_bytes: usize,
    /// Most rooms the history service keeps recent messages of (empty rooms included).
    pub history_cache_rooms: usize,
    /// Most messages after a user's read marker the history service reads to count the user's
    /// unread ones; when more follow the marker the count is the cap (1000).
    pub unread_scan_max: usize,
    /// Most change log records read to answer a join's changes since its cursor; beyond, the
    /// latest are kept and the answer says `changesCut`.
    pub changes_scan_max: usize,
    /// How long a batch holding changes waits for every earlier event to be written (the
    /// consumer's ack floor) before it is handed back to JetStream; keep it well under the
    /// 30 s ack wait.
    pub change_floor_wait_ms: u64,
    /// How long shutdown may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
    /// How long a client of the HTTP port may take to send a request's headers, and how long
    /// a kept-alive connection may wait for its next request.
    pub header_read_timeout_ms: u64,
}

impl Default for PersisterSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 4100,
            batch_size: 500,
            batch_wait_ms: 20,
            write_connections: 2,
            retry_initial_ms: 100,
            retry_max_ms: 5000,
            max_attempts: 3,
            history_cache_bytes: 64 * 1024 * 1024,
            history_cache_rooms: 20_000,
            unread_scan_max: 2000,
            changes_scan_max: 5000,
            change_floor_wait_ms: 10_000,
            shutdown_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
        }
    }
}

/// Client input limits of the contract.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    /// Message text bytes after trimming.
    pub message_max_bytes: usize,
    pub username_max_chars: usize,
    pub room_max_chars: usize,
    pub rooms_per_socket: usize,
    /// Sustained `send_message` rate per socket, and the burst allowed above it.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Engine.IO payload limit (polling bodies, WebSocket messages and frames).
    pub max_payload_bytes: u64,
    /// `join_room` rate per socket (new rooms only), and the burst allowed above it.
    pub joins_per_second: u32,
    pub join_burst: u32,
    /// Live connections per client address; 0 for no cap.
    pub connections_per_address: usize,
    /// TCP connections the client port holds at a time; 0 for the open-file limit less the
    /// descriptors the gateway keeps for itself.
    pub max_connections: usize,
    /// Peers (load balancers) whose `X-Forwarded-For` names the client address; comma
    /// separated in the environment.
    pub trusted_proxies: Vec<String>,
    /// Rooms with more members than this are not listed to their members (`chatroom_users`,
    /// join and leave notices), only counted (`room_presence`).
    pub presence_list_max: usize,
    /// A socket's events received and not finished (each waits for the ones before it); more
    /// are answered `rate_limited` at once.
    pub events_queued_per_socket: usize,
    /// Answers (acks, `error` events) waiting for room in a socket's full outgoing queue; a
    /// socket that would need more is not reading, and is disconnected.
    pub answers_waiting_per_socket: usize,
    /// `typing` rate per socket, and the burst allowed above it.
    pub typing_per_second: u32,
    pub typing_burst: u32,
    /// `get_history` rate per socket, and the burst allowed above it.
    pub history_per_second: u32,
    pub history_burst: u32,
    /// Requests to the HTTP history route per client address, and the burst above it.
    pub http_history_per_second: u32,
    pub http_history_burst: u32,
    /// `edit_message`, `delete_message`, `react` and `mark_read` rate per socket (together),
    /// and the burst allowed above it.
    pub changes_per_second: u32,
    pub changes_burst: u32,
    /// Longest emoji of a reaction, in bytes.
    pub emoji_max_bytes: usize,
    /// Most distinct emoji one message may carry.
    pub reactions_per_message: u32,
    /// How long after sending its author may edit a message.
    pub edit_window_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_max_bytes: 4096,
            username_max_chars: 64,
            room_max_chars: 128,
            rooms_per_socket: 50,
            messages_per_second: 20,
            message_burst: 40,
            max_payload_bytes: 64 * 1024,
            joins_per_second: 10,
            join_burst: 50,
            connections_per_address: 256,
            max_connections: 0,
            trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
            presence_list_max: 500,
            events_queued_per_socket: 64,
            answers_waiting_per_socket: 16,
            typing_per_second: 2,
            typing_burst: 5,
            history_per_second: 10,
            history_burst: 20,
            http_history_per_second: 5,
            http_history_burst: 20,
            changes_per_second: 10,
            changes_burst: 20,
            emoji_max_bytes: 32,
            reactions_per_message: 20,
            edit_window_secs: 24 * 60 * 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CorsSettings {
    /// Origins browsers may connect from (polling and WebSocket); comma separated in the
    /// environment. `*` allows any.
    pub allowed_origins: Vec<String>,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: vec!["http://localhost:3000".into()],
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthSettings {
    /// HS256 secret; when set, every connection needs `auth: { token }`.
    #[serde(serialize_with = "redacted_option")]
    pub jwt_secret: Option<SecretString>,
    /// Required `aud` claim, if set.
    pub jwt_audience: Option<String>,
}

impl AuthSettings {
    /// The secret, unless unset or empty.
    pub fn secret(&self) -> Option<&str> {
        self.jwt_secret
            .as_ref()
            .map(|s| s.expose_secret())
            .filter(|s| !s.is_empty())
    }
}

/// Which rooms an authenticated user may use (without auth every room is open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessPolicy {
    /// Every authenticated user may use every room.
    #[default]
    Open,
    /// The token's `rooms` claim lists the rooms: exact names, or prefixes ending in `*`.
    Token,
    /// The operator's HTTP endpoint decides (see [`AccessSettings::webhook_url`]).
    Webhook,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AccessSettings {
    pub policy: AccessPolicy,
    /// With the webhook policy: where `POST { userId, username, room, action }` goes; 2xx allows,
    /// 403 denies, anything else (or no answer in time) answers `unavailable`.
    pub webhook_url: String,
    /// Sent to the webhook as `Authorization: Bearer <secret>`, when set.
    #[serde(serialize_with = "redacted_option")]
    pub webhook_secret: Option<SecretString>,
    /// How long one webhook call may take.
    pub webhook_timeout_ms: u64,
    /// How long an answer (allow or deny) is reused.
    pub webhook_cache_ms: u64,
    /// Most answers kept (least recently used go first).
    pub webhook_cache_entries: usize,
    /// Most webhook calls in flight at once per gateway; a check waiting longer than the timeout
    /// for its turn answers `unavailable`.
    pub webhook_concurrency: usize,
}

impl Default for AccessSettings {
    fn default() -> Self {
        Self {
            policy: AccessPolicy::Open,
            webhook_url: String::new(),
            webhook_secret: None,
            webhook_timeout_ms: 2000,
            webhook_cache_ms: 60_000,
            webhook_cache_entries: 100_000,
            webhook_concurrency: 32,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `chatify_gateway=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Settings serialize (for the configuration reference) without their secrets.
fn redacted<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        "<redacted>"
    })
}

fn redacted_option<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => redacted(secret, s),
        None => s.serialize_none(),
    }
}

impl Settings {
    /// Loads `.env`, then the layers from the process environment. Also returns the keys the
    /// file or the environment named that are no settings.
    pub fn load() -> Result<(Self, Vec<UnknownKey>), ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let env: HashMap<String, String> = std::env::vars().collect();
        let (path, required) = match env.get(CONFIG_FILE_VAR) {
            Some(path) => (PathBuf::from(path), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let unknown = unknown_keys(Some(&path), &env)?;
        let settings = Self::load_from(Some((path.as_path(), required)), env)?;
        Ok((settings, unknown))
    }

    /// Builds settings from defaults, an optional file (`(path, required)`) and the given
    /// environment, without touching the process environment.
    pub fn load_from(
        file: Option<(&Path, bool)>,
        env: HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some((path, required)) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(required),
            );
        }
        let env = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CHATIFY_") && k != CONFIG_FILE_VAR)
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("cors.allowed_origins")
                .with_list_parse_key("limits.trusted_proxies")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: &str| Err(ConfigError::Invalid(what.to_owned()));
        self.nats.validate()?;
        let l = &self.limits;
        if l.message_max_bytes == 0 || l.username_max_chars == 0 || l.room_max_chars == 0 {
            return invalid(
                "limits.message_max_bytes, username_max_chars and room_max_chars must be at least 1",
            );
        }
        if l.joins_per_second == 0 || l.join_burst == 0 {
            return invalid("limits.joins_per_second and join_burst must be at least 1");
        }
        if l.typing_per_second == 0
            || l.typing_burst == 0
            || l.history_per_second == 0
            || l.history_burst == 0
            || l.http_history_per_second == 0
            || l.http_history_burst == 0
        {
            return invalid(
                "limits.typing_per_second, typing_burst, history_per_second, history_burst, http_history_per_second and http_history_burst must be at least 1",
            );
        }
        if l.changes_per_second == 0
            || l.changes_burst == 0
            || l.emoji_max_bytes == 0
            || l.reactions_per_message == 0
        {
            return invalid(
                "limits.changes_per_second, changes_burst, emoji_max_bytes and reactions_per_message must be at least 1",
            );
        }
        if l.answers_waiting_per_socket == 0 {
            return invalid("limits.answers_waiting_per_socket must be at least 1");
        }
        if l.events_queued_per_socket <= l.message_burst as usize {
            return invalid(
                "limits.events_queued_per_socket must be above limits.message_burst (a burst of sends the rate limit allows must fit)",
            );
        }
        if let Some(bad) = l
            .trusted_proxies
            .iter()
            .find(|p| p.trim().parse::<std::net::IpAddr>().is_err())
        {
            return Err(ConfigError::Invalid(format!(
                "limits.trusted_proxies: {bad:?} is not an IP address"
            )));
        }
        if l.rooms_per_socket == 0 || l.messages_per_second == 0 || l.message_burst == 0 {
            return invalid(
                "limits.rooms_per_socket, messages_per_second and message_burst must be at least 1",
            );
        }
        if l.max_payload_bytes < 1024 {
            return invalid("limits.max_payload_bytes must be at least 1024");
        }
        if self.persister.batch_size == 0 {
            return invalid("persister.batch_size must be at least 1");
        }
        if !(1..=64).contains(&self.persister.write_connections) {
            return invalid("persister.write_connections must be between 1 and 64");
        }
        if self.persister.unread_scan_max == 0 || self.persister.changes_scan_max == 0 {
            return invalid(
                "persister.unread_scan_max and persister.changes_scan_max must be at least 1",
            );
        }
        if !(1..30_000).contains(&self.persister.change_floor_wait_ms) {
            return invalid(
                "persister.change_floor_wait_ms must be between 1 and 29999 (under the 30 s ack wait)",
            );
        }
        if self.stream.max_age_secs < self.stream.duplicate_window_secs {
            return invalid("stream.max_age_secs must be at least stream.duplicate_window_secs");
        }
        if self.gateway.max_buffer_size == 0 || self.gateway.max_buffer_bytes < 1024 {
            return invalid(
                "gateway.max_buffer_size must be at least 1 and gateway.max_buffer_bytes at least 1024",
            );
        }
        if self.gateway.header_read_timeout_ms == 0
            || self.gateway.body_read_timeout_ms == 0
            || self.persister.header_read_timeout_ms == 0
        {
            return invalid("header and body read timeouts must be at least 1 ms");
        }
        if self.gateway.gateway_timeout_ms <= self.gateway.heartbeat_interval_ms {
            return invalid(
                "gateway.gateway_timeout_ms must be longer than gateway.heartbeat_interval_ms",
            );
        }
        let a = &self.access;
        if a.policy == AccessPolicy::Webhook && !a.webhook_url.starts_with("http") {
            return invalid(
                "access.webhook_url must be an http(s) URL with access.policy = webhook",
            );
        }
        if a.policy != AccessPolicy::Open && self.auth.secret().is_none() {
            return invalid(
                "access.policy token and webhook need auth (auth.jwt_secret): without it every room is open",
            );
        }
        if a.webhook_timeout_ms == 0 || a.webhook_concurrency == 0 {
            return invalid("access.webhook_timeout_ms and webhook_concurrency must be at least 1");
        }
        if self
            .cors
            .allowed_origins
            .iter()
            .any(|o| o.trim().is_empty())
        {
            return invalid("cors.allowed_origins has an empty entry");
        }
        Ok(())
    }
}

/// Every setting's key (`gateway.port`), from the defaults.
fn known_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    leaf_keys(
        "",
        &serde_json::to_value(Settings::default()).unwrap_or_default(),
        &mut keys,
    );
    keys
}

/// The dotted keys of the leaves of a nested map (a list is a leaf).
fn leaf_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(&key, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// The setting a variable with one `_` where `__` belongs names (`CHATIFY_GATEWAY_PORT`).
fn meant_variable(name: &str) -> Option<String> {
    let rest = name.strip_prefix("CHATIFY_")?;
    let known = known_keys();
    rest.match_indices('_').find_map(|(at, _)| {
        let key = format!("{}.{}", &rest[..at], &rest[at + 1..]).to_ascii_lowercase();
        known
            .contains(&key)
            .then(|| format!("CHATIFY_{}__{}", &rest[..at], &rest[at + 1..]))
    })
}

/// The keys the file (if it exists) and the `CHATIFY_` variables name that are no settings.
pub fn unknown_keys(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<Vec<UnknownKey>, ConfigError> {
    let known = known_keys();
    let mut unknown = Vec::new();
    if let Some(path) = file.filter(|p| p.exists()) {
        let contents: serde_json::Value = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        let mut keys = BTreeSet::new();
        leaf_keys("", &contents, &mut keys);
        unknown.extend(
            keys.into_iter()
                .filter(|k| !k.is_empty() && !known.contains(k))
                .map(|key| UnknownKey::FileKey {
                    file: path.to_owned(),
                    key,
                }),
        );
    }
    let mut variables: Vec<&String> = env
        .keys()
        .filter(|name| name.starts_with("CHATIFY_") && *name != CONFIG_FILE_VAR)
        .filter(|name| {
            let key = name["CHATIFY_".len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            !known.contains(&key)
        })
        .collect();
    variables.sort();
    unknown.extend(variables.into_iter().cloned().map(UnknownKey::Variable));
    Ok(unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() -> Result<(), ConfigError> {
        let s = Settings::load_from(None, HashMap::new())?;
        assert_eq!(s.limits.message_max_bytes, 4096);
        assert_eq!(s.limits.username_max_chars, 64);
        assert_eq!(s.limits.room_max_chars, 128);
        assert_eq!(s.limits.rooms_per_socket, 50);
        assert_eq!(
            (s.limits.messages_per_second, s.limits.message_burst),
            (20, 40)
        );
        assert_eq!(s.limits.max_payload_bytes, 65536);
        assert_eq!(s.cors.allowed_origins, vec!["http://localhost:3000"]);
        assert_eq!(s.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(s.auth.secret(), None);
        Ok(())
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut file = tempfile::NamedTempFile::with_suffix(".toml")?;
        writeln!(
            file,
            "[gateway]\nport = 5001\nname = \"from-file\"\n[limits]\nrooms_per_socket = 7\n[nats]\nurl = \"nats://file:1\""
        )?;
        let s = Settings::load_from(
            Some((file.path(), true)),
            env(&[
                ("CHATIFY_GATEWAY__PORT", "6001"),
                ("CHATIFY_NATS__URL", "nats://env:2"),
                (
                    "CHATIFY_CORS__ALLOWED_ORIGINS",
                    "http://a.test,http://b.test",
                ),
                ("CHATIFY_HARPERDB__PASSWORD", "12345"),
                ("OTHER_VAR", "ignored"),
            ]),
        )?;
        assert_eq!(s.gateway.port, 6001, "env beats file");
        assert_eq!(s.gateway.name, "from-file", "file beats default");
        assert_eq!(s.limits.rooms_per_socket, 7);
        assert_eq!(s.limits.message_burst, 40, "default kept");
        assert_eq!(s.nats.url, "nats://env:2");
        assert_eq!(
            s.cors.allowed_origins,
            vec!["http://a.test", "http://b.test"]
        );
        assert_eq!(
            s.harperdb.password.expose_secret(),
            "12345",
            "digits stay text"
        );
        Ok(())
    }

    #[test]
    fn nats_url_takes_every_node_of_a_cluster() -> Result<(), ConfigError> {
        let s = Settings::load_from(
            None,
            env(&[(
                "CHATIFY_NATS__URL",
                "nats://127.0.0.1:4222, nats://127.0.0.1:4223,,nats://127.0.0.1:4224",
            )]),
        )?;
        assert_eq!(
            s.nats.server_urls(),
            [
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "nats://127.0.0.1:4224"
            ]
        );
        let err = Settings::load_from(None, env(&[("CHATIFY_NATS__URL", " , ")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nats.url"), "{err}");
        Ok(())
    }

    #[test]
    fn a_missing_optional_file_is_fine_and_a_missing_required_one_is_an_error() {
        let missing = Path::new("/nonexistent/chatify.toml");
        assert!(Settings::load_from(Some((missing, false)), HashMap::new()).is_ok());
        assert!(Settings::load_from(Some((missing, true)), HashMap::new()).is_err());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = Settings::load_from(None, env(&[("CHATIFY_GATEWAY__PORT", "not-a-port")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("port"), "{err}");
        let err = Settings::load_from(None, env(&[("CHATIFY_LIMITS__ROOMS_PER_SOCKET", "0")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("rooms_per_socket"), "{err}");
        let err = Settings::load_from(None, env(&[("CHATIFY_PERSISTER__WRITE_CONNECTIONS", "0")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("write_connections"), "{err}");
    }

    #[test]
    fn an_empty_jwt_secret_means_no_auth() -> Result<(), ConfigError> {
        let s = Settings::load_from(None, env(&[("CHATIFY_AUTH__JWT_SECRET", "")]))?;
        assert_eq!(s.auth.secret(), None);
        let s = Settings::load_from(None, env(&[("CHATIFY_AUTH__JWT_SECRET", "k")]))?;
        assert_eq!(s.auth.secret(), Some("k"));
        Ok(())
    }

    /// Every key with its default as text (lists comma separated, unset as `None`).
    fn default_keys() -> Vec<(String, Option<String>)> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, Option<String>)>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                serde_json::Value::Null => out.push((prefix.to_owned(), None)),
                serde_json::Value::String(s) => out.push((prefix.to_owned(), Some(s.clone()))),
                serde_json::Value::Array(items) => {
                    let items: Vec<String> = items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                        .collect();
                    out.push((prefix.to_owned(), Some(items.join(","))));
                }
                other => out.push((prefix.to_owned(), Some(other.to_string()))),
            }
        }
        let mut out = Vec::new();
        walk(
            "",
            &serde_json::to_value(Settings::default()).unwrap_or_default(),
            &mut out,
        );
        out.sort();
        out
    }

    /// The rows of docs/configuration.md's configuration table:
    /// `| `key` [/ `key`] | `VARIABLE` [/ `VARIABLE`] | default [/ default] | meaning |`.
    fn documented_keys() -> Vec<(String, Option<String>)> {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap_or_default();
        let section = doc
            .split("\n## Configuration")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .unwrap_or_default();
        let mut out = Vec::new();
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let keys: Vec<&str> = cells[1].split(" / ").collect();
            let vars: Vec<&str> = cells[2].split(" / ").collect();
            let defaults: Vec<&str> = cells[3].split(" / ").collect();
            assert_eq!(
                keys.len(),
                defaults.len(),
                "docs/configuration.md row {line:?} pairs keys and defaults"
            );
            assert_eq!(
                keys.len(),
                vars.len(),
                "docs/configuration.md row {line:?} pairs keys and variables"
            );
            for ((k, d), var) in keys.iter().zip(defaults).zip(vars) {
                let k = k.trim().trim_matches('`');
                let expected_var = format!("CHATIFY_{}", k.replace('.', "__").to_uppercase());
                assert_eq!(
                    var.trim().trim_matches('`'),
                    expected_var,
                    "docs/configuration.md row {line:?}"
                );
                let default = match d.trim() {
                    "unset" => None,
                    "empty" => Some(String::new()),
                    d => Some(d.trim_matches('`').replace(", ", ",")),
                };
                out.push((k.to_owned(), default));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn configuration_doc_documents_every_key_with_its_default() {
        let documented = documented_keys();
        assert!(
            !documented.is_empty(),
            "docs/configuration.md has no configuration table"
        );
        assert_eq!(
            documented,
            default_keys(),
            "docs/configuration.md's configuration table and Settings differ"
        );
    }

    #[test]
    fn env_example_lists_every_key() {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.env.example"))
                .unwrap_or_default();
        for (key, _) in default_keys() {
            let var = format!("CHATIFY_{}", key.replace('.', "__").to_uppercase());
            assert!(
                example.contains(&format!("{var}=")),
                ".env.example lacks {var}"
            );
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() -> Result<(), ConfigError> {
        let s = Settings::load_from(
            None,
            env(&[
                ("CHATIFY_HARPERDB__PASSWORD", "hunter2-password"),
                ("CHATIFY_HARPERDB__ADMIN_PASSWORD", "admin-password-value"),
                ("CHATIFY_AUTH__JWT_SECRET", "jwt-secret-value"),
                ("CHATIFY_NATS__USER", "chatify-gateway"),
                ("CHATIFY_NATS__PASSWORD", "nats-password-value"),
            ]),
        )?;
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2-password"), "{debug}");
        assert!(!debug.contains("jwt-secret-value"), "{debug}");
        assert!(!debug.contains("nats-password-value"), "{debug}");
        assert!(!debug.contains("admin-password-value"), "{debug}");
        let auth = format!("{:?}", s.nats.auth()?);
        assert!(!auth.contains("nats-password-value"), "{auth}");
        let serialized = serde_json::to_string(&s).unwrap_or_default();
        assert!(!serialized.contains("nats-password-value"), "{serialized}");
        assert!(!serialized.contains("admin-password-value"), "{serialized}");
        let s = Settings::load_from(None, env(&[("CHATIFY_NATS__TOKEN", "nats-token-value")]))?;
        let debug = format!("{s:?} {:?}", s.nats.auth()?);
        assert!(!debug.contains("nats-token-value"), "{debug}");
        Ok(())
    }

    #[test]
    fn nats_takes_one_way_of_authenticating() -> Result<(), ConfigError> {
        let auth = |pairs: &[(&str, &str)]| {
            Settings::load_from(None, env(pairs)).map(|s| s.nats.auth().map(|a| format!("{a:?}")))
        };
        assert!(matches!(
            Settings::load_from(None, HashMap::new())?.nats.auth()?,
            NatsAuth::Anonymous
        ));
        let s = Settings::load_from(
            None,
            env(&[("CHATIFY_NATS__USER", "u"), ("CHATIFY_NATS__PASSWORD", "p")]),
        )?;
        assert!(matches!(s.nats.auth()?, NatsAuth::UserPassword { user, .. } if user == "u"));
        let s = Settings::load_from(None, env(&[("CHATIFY_NATS__CREDS_FILE", "/x.creds")]))?;
        assert!(matches!(s.nats.auth()?, NatsAuth::CredsFile(p) if p == Path::new("/x.creds")));
        for bad in [
            &[("CHATIFY_NATS__USER", "u")][..],
            &[("CHATIFY_NATS__PASSWORD", "p")],
            &[
                ("CHATIFY_NATS__TOKEN", "t"),
                ("CHATIFY_NATS__CREDS_FILE", "/x.creds"),
            ],
            &[
                ("CHATIFY_NATS__USER", "u"),
                ("CHATIFY_NATS__PASSWORD", "p"),
                ("CHATIFY_NATS__NKEY_SEED_FILE", "/seed"),
            ],
            &[("CHATIFY_NATS__TLS_CERT_FILE", "/cert.pem")],
            &[("CHATIFY_NATS__TLS_KEY_FILE", "/key.pem")],
        ] {
            let err = auth(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("nats."), "{bad:?}: {err}");
        }
        let s = Settings::load_from(
            None,
            env(&[
                ("CHATIFY_NATS__TLS_CERT_FILE", "/cert.pem"),
                ("CHATIFY_NATS__TLS_KEY_FILE", "/key.pem"),
            ]),
        )?;
        assert!(s.nats.tls_required());
        assert!(!Settings::default().nats.tls_required());
        Ok(())
    }

    #[test]
    fn unknown_variables_and_file_keys_are_named() -> Result<(), Box<dyn std::error::Error>> {
        let mut file = tempfile::NamedTempFile::with_suffix(".toml")?;
        writeln!(
            file,
            "[gateway]\nport = 5001\nprot = 5002\n[limit]\nrooms_per_socket = 7\n[cors]\nallowed_origins = [\"http://a\"]"
        )?;
        let env = env(&[
            ("CHATIFY_GATEWAY__PORT", "6001"),
            ("CHATIFY_GATEWAY_PORT", "6002"),
            ("CHATIFY_AUTH__JWT_SECRET", "k"),
            ("CHATIFY_CONFIG", "x.toml"),
            ("CHATIFY_LIMITS__ROOMS_PER_SOKCET", "3"),
            ("OTHER", "x"),
        ]);
        let unknown = unknown_keys(Some(file.path()), &env)?;
        let path = file.path().to_owned();
        assert_eq!(
            unknown,
            vec![
                UnknownKey::FileKey {
                    file: path.clone(),
                    key: "gateway.prot".into()
                },
                UnknownKey::FileKey {
                    file: path,
                    key: "limit.rooms_per_socket".into()
                },
                UnknownKey::Variable("CHATIFY_GATEWAY_PORT".into()),
                UnknownKey::Variable("CHATIFY_LIMITS__ROOMS_PER_SOKCET".into()),
            ]
        );
        assert!(
            unknown[2].to_string().contains(
                "CHATIFY_GATEWAY_PORT is not a Chatify setting and is ignored (did you mean CHATIFY_GATEWAY__PORT?)"
            ),
            "{}",
            unknown[2]
        );
        assert!(
            !unknown[3].to_string().contains("did you mean"),
            "{}",
            unknown[3]
        );
        // Every documented key is known, in the file and in the environment.
        let all: HashMap<String, String> = known_keys()
            .into_iter()
            .map(|k| {
                (
                    format!("CHATIFY_{}", k.replace('.', "__").to_uppercase()),
                    "1".into(),
                )
            })
            .collect();
        assert_eq!(unknown_keys(None, &all)?, Vec::new());
        Ok(())
    }
}
