//! Connecting to NATS and declaring the JetStream objects both services rely on.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, NatsAuth, NatsSettings, StreamSettings};
use crate::subjects::{
    DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SUBJECTS, LEGACY_PRESENCE_RECORDS,
    MESSAGES_REPUBLISH_DESTINATION, MESSAGES_STREAM, MESSAGES_STREAM_SUBJECTS, PRESENCE_STREAM,
    PRESENCE_STREAM_SUBJECTS, Role,
};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid NATS settings: {0}")]
    Settings(#[from] ConfigError),
    #[error("could not read the NATS credentials in {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("could not connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("could not create or update a JetStream stream: {0}")]
    Stream(#[from] jetstream::context::CreateStreamError),
    #[error("could not open a JetStream stream: {0}")]
    OpenStream(#[from] jetstream::context::GetStreamError),
    #[error(
        "stream {MESSAGES_STREAM} exists without republishing to the rooms, and JetStream cannot add that to an existing stream: let the persister write everything (its consumer has nothing pending), then delete the stream and either recreate it with `first_seq` above its last sequence ({last_sequence}; message ids and storage keys come from sequences, so they must not start again) or also start a new HarperDB table"
    )]
    MessagesStreamWithoutRepublish { last_sequence: u64 },
    #[error(
        "stream {MESSAGES_STREAM} does not exist after {waited:?}: the persister creates it (and a gateway may not), so start a persister first"
    )]
    MessagesStreamMissing { waited: Duration },
}

/// Connects as `role` (whose inbox prefix it takes, so that the NATS permissions can keep
/// each service's replies to itself) with a client name that shows in the NATS monitor,
/// authenticating as the settings say, reconnecting forever after a loss.
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    role: Role,
) -> Result<async_nats::Client, BusError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(role.inbox_prefix())
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(settings.request_timeout()))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("NATS connection lost"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    let credentials = |path: &PathBuf| {
        let path = path.display().to_string();
        move |source| BusError::Credentials { path, source }
    };
    options = match settings.auth()? {
        NatsAuth::Anonymous => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user, password.expose_secret().to_owned())
        }
        NatsAuth::Token(token) => options.token(token.expose_secret().to_owned()),
        NatsAuth::CredsFile(path) => options
            .credentials_file(&path)
            .await
            .map_err(credentials(&path))?,
        NatsAuth::NkeySeedFile(path) => {
            let seed = SecretString::from(
                tokio::fs::read_to_string(&path)
                    .await
                    .map_err(credentials(&path))?,
            );
            options.nkey(seed.expose_secret().trim().to_owned())
        }
    };
    if !settings.tls_ca_file.is_empty() {
        options = options.add_root_certificates(PathBuf::from(&settings.tls_ca_file));
    }
    if !settings.tls_cert_file.is_empty() {
        options = options.add_client_certificate(
            PathBuf::from(&settings.tls_cert_file),
            PathBuf::from(&settings.tls_key_file),
        );
    }
    if settings.tls_required() {
        options = options.require_tls(true);
    }
    options
        .connect(settings.server_urls())
        .await
        .map_err(|source| BusError::Connect {
            url: settings.url.clone(),
            source,
        })
}

/// The stream every accepted message is stored in until the persisters have written it.
///
/// Limits retention (not work-queue): a retried `clientId` is answered by reading the first
/// message back, so messages must stay readable for at least the duplicate window.
pub fn messages_stream_config(settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name: MESSAGES_STREAM.to_owned(),
        subjects: vec![MESSAGES_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(settings.max_age_secs),
        duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
        max_message_size: settings.max_message_bytes,
        num_replicas: settings.replicas,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: MESSAGES_STREAM_SUBJECTS.to_owned(),
            destination: MESSAGES_REPUBLISH_DESTINATION.to_owned(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Refuses a messages stream that does not republish to the rooms as this Chatify expects.
fn check_republish(existing: &stream::Stream, expected: &stream::Config) -> Result<(), BusError> {
    let info = existing.cached_info();
    if info.config.republish != expected.republish {
        return Err(BusError::MessagesStreamWithoutRepublish {
            last_sequence: info.state.last_sequence,
        });
    }
    Ok(())
}

/// Creates the messages stream, or brings an existing one to the configured settings (the
/// persister's job: only its NATS user may).
pub async fn ensure_messages_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, BusError> {
    let config = messages_stream_config(settings);
    if let Ok(existing) = js.get_stream(MESSAGES_STREAM).await {
        check_republish(&existing, &config)?;
    }
    js.create_or_update_stream(config).await?;
    Ok(js.get_stream(MESSAGES_STREAM).await?)
}

/// The messages stream as a gateway sees it: it may only read the stream's information and
/// messages, so it waits up to `wait` for a persister to create the stream, then checks that
/// it republishes to the rooms.
pub async fn open_messages_stream(
    js: &jetstream::Context,
    wait: Duration,
) -> Result<stream::Stream, BusError> {
    let started = std::time::Instant::now();
    let mut warned = false;
    let stream = loop {
        match js.get_stream(MESSAGES_STREAM).await {
            Ok(stream) => break stream,
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                if started.elapsed() >= wait {
                    return Err(BusError::MessagesStreamMissing { waited: wait });
                }
                if !warned {
                    tracing::warn!(
                        stream = MESSAGES_STREAM,
                        "waiting for a persister to create the messages stream"
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    check_republish(&stream, &messages_stream_config(&StreamSettings::default()))?;
    Ok(stream)
}

/// The stream of presence records: one per member, room and gateway (the last message of its
/// subject). On disk, so a NATS restart keeps it; records of gateways that died meanwhile are
/// purged by the others once those gateways miss their heartbeats.
pub fn presence_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: PRESENCE_STREAM.to_owned(),
        subjects: vec![PRESENCE_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        num_replicas: replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the presence stream, or brings an existing one to the expected settings, and drops
/// the records an older Chatify wrote (whole member lists; gateways of both kinds cannot share
/// rooms, so an upgrade restarts every gateway).
pub async fn ensure_presence_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<stream::Stream, BusError> {
    js.create_or_update_stream(presence_stream_config(replicas))
        .await?;
    let stream = js.get_stream(PRESENCE_STREAM).await?;
    if let Err(e) = stream.purge().filter(LEGACY_PRESENCE_RECORDS).await {
        tracing::warn!(error = %e, "could not purge presence records of an older Chatify");
    }
    Ok(stream)
}

/// The stream keeping messages HarperDB refused for good, for an operator to inspect (30 days).
pub async fn ensure_dead_letter_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(), BusError> {
    js.create_or_update_stream(stream::Config {
        name: DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![DEAD_LETTER_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(30 * 24 * 3600),
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Why [`drain`] could not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("could not flush to NATS: {0}")]
    Flush(#[from] async_nats::client::FlushError),
    #[error("could not drain the NATS connection: {0}")]
    Drain(#[from] async_nats::client::DrainError),
}

/// Ends a client's work before the process exits: flushes what was published (the server has
/// it once this returns), then drains subscriptions. `Client::drain` only starts the drain and
/// returns: a process that exited right after it, without the flush, could lose its last
/// publishes (a gateway's last departure notices, a persister's last acks).
pub async fn drain(client: &async_nats::Client) -> Result<(), DrainError> {
    client.flush().await?;
    client.drain().await?;
    Ok(())
}
