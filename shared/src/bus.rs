//! Connecting to NATS and declaring the JetStream objects both services rely on.

use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, ErrorCode, stream};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, NatsAuth, NatsSettings, StreamSettings};
use crate::subjects::{
    DEAD_LETTER_STREAM, DEAD_LETTER_STREAM_SUBJECTS, LEGACY_PRESENCE_RECORDS,
    MESSAGES_REPUBLISH_DESTINATION, MESSAGES_STREAM, MESSAGES_STREAM_SUBJECTS, PRESENCE_STREAM,
    PRESENCE_STREAM_SUBJECTS, READS_BUCKET, Role,
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
    #[error("could not open or create the read markers' bucket {READS_BUCKET}: {0}")]
    Bucket(String),
    #[error(
        "stream {MESSAGES_STREAM} exists without republishing to the rooms, and JetStream cannot add that to an existing stream: let the persister write everything (its consumer has nothing pending), then delete the stream and either recreate it with `first_seq` above its last sequence ({last_sequence}; message ids and storage keys come from sequences, so they must not start again) or also start a new HarperDB table"
    )]
    MessagesStreamWithoutRepublish { last_sequence: u64 },
    #[error(
        "stream {MESSAGES_STREAM} does not exist after {waited:?}: the persister creates it (and a gateway may not), so start a persister first"
    )]
    MessagesStreamMissing { waited: Duration },
}

/// How long a starting service repeats the JetStream requests that set it up (streams, the
/// persisters' consumer) while JetStream cannot answer them yet.
pub const JETSTREAM_SETUP_WAIT: Duration = Duration::from_secs(60);

/// Whether a JetStream API error may pass by itself: on a cluster, while no meta leader is
/// elected (no answer, "JetStream system temporarily unavailable") or while a stream's nodes are
/// not all back ("no suitable peers for placement", "insufficient resources"). A bad request or a
/// stream of another configuration will not.
pub fn jetstream_error_is_transient(e: &jetstream::Error) -> bool {
    e.code() >= 500
        || [
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NO_PEERS,
            ErrorCode::CLUSTER_NOT_LEADER,
            ErrorCode::CLUSTER_NOT_ACTIVE,
            ErrorCode::CLUSTER_INCOMPLETE,
            ErrorCode::INSUFFICIENT_RESOURCES,
        ]
        .contains(&e.error_code())
}

fn create_stream_error_is_transient(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::TimedOut | K::JetStreamUnavailable | K::Response => true,
        K::JetStream(j) => jetstream_error_is_transient(&j),
        _ => false,
    }
}

fn get_stream_error_is_transient(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::GetStreamErrorKind as K;
    match e.kind() {
        K::Request => true,
        K::JetStream(j) => jetstream_error_is_transient(&j),
        _ => false,
    }
}

/// Whether creating or reading a consumer failed for a reason that may pass by itself (see
/// [`jetstream_error_is_transient`]).
pub fn consumer_error_is_transient(e: &jetstream::stream::ConsumerError) -> bool {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::TimedOut | K::Request => true,
        K::JetStream(j) => jetstream_error_is_transient(&j),
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails in a way `transient` says will not pass, or has failed for
/// `wait` (then with its last error), pausing 250 ms, then longer, up to 2 s, between attempts.
/// A service starting while a NATS cluster elects its JetStream leader, or while one of its
/// nodes restarts, waits for that instead of exiting.
pub async fn retry_jetstream<T, E, F, Fut>(
    what: &str,
    wait: Duration,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(
                        failures,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "{what}: done"
                    );
                }
                return Ok(value);
            }
            Err(e) if transient(&e) && started.elapsed() < wait => {
                failures += 1;
                tracing::warn!(
                    error = %e,
                    retry_in_ms = pause.as_millis() as u64,
                    "{what}: JetStream cannot answer yet (a cluster electing its leader, or a node away?); retrying"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
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
    let existing = retry_jetstream(
        "reading the messages stream",
        JETSTREAM_SETUP_WAIT,
        get_stream_error_is_transient,
        || async {
            match js.get_stream(MESSAGES_STREAM).await {
                Ok(stream) => Ok(Some(stream)),
                Err(e) if is_stream_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        },
    )
    .await?;
    if let Some(existing) = existing {
        check_republish(&existing, &config)?;
    }
    retry_jetstream(
        "creating the messages stream",
        JETSTREAM_SETUP_WAIT,
        create_stream_error_is_transient,
        || js.create_or_update_stream(config.clone()),
    )
    .await?;
    Ok(retry_jetstream(
        "reading the messages stream",
        JETSTREAM_SETUP_WAIT,
        get_stream_error_is_transient,
        || js.get_stream(MESSAGES_STREAM),
    )
    .await?)
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The messages stream as a gateway sees it: it may only read the stream's information and
/// messages, so it waits up to `wait` for a persister to create the stream (and for JetStream to
/// answer at all: a cluster electing its leader), then checks that it republishes to the rooms.
pub async fn open_messages_stream(
    js: &jetstream::Context,
    wait: Duration,
) -> Result<stream::Stream, BusError> {
    let started = Instant::now();
    let mut warned = false;
    let stream = loop {
        let remaining = wait.saturating_sub(started.elapsed());
        let found = retry_jetstream(
            "reading the messages stream",
            remaining,
            get_stream_error_is_transient,
            || js.get_stream(MESSAGES_STREAM),
        )
        .await;
        match found {
            Ok(stream) => break stream,
            Err(e) if is_stream_not_found(&e) => {
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
    retry_jetstream(
        "creating the presence stream",
        JETSTREAM_SETUP_WAIT,
        create_stream_error_is_transient,
        || js.create_or_update_stream(presence_stream_config(replicas)),
    )
    .await?;
    let stream = retry_jetstream(
        "reading the presence stream",
        JETSTREAM_SETUP_WAIT,
        get_stream_error_is_transient,
        || js.get_stream(PRESENCE_STREAM),
    )
    .await?;
    if let Err(e) = stream.purge().filter(LEGACY_PRESENCE_RECORDS).await {
        tracing::warn!(error = %e, "could not purge presence records of an older Chatify");
    }
    Ok(stream)
}

/// The bucket of read markers ([`READS_BUCKET`]), created by the first gateway that needs it:
/// one value per room and user, on disk and replicated like the streams. Declared as the
/// stream a key-value bucket is (async-nats's `create_key_value` first reads the account's
/// limits, in a form nats-server 2.9 does not answer).
pub async fn ensure_reads_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, BusError> {
    if let Ok(store) = js.get_key_value(READS_BUCKET).await {
        return Ok(store);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{READS_BUCKET}"),
        description: Some(
            "Chatify read markers: the last message each user read in each room".to_owned(),
        ),
        subjects: vec![format!("$KV.{READS_BUCKET}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::Bucket(e.to_string()))?;
    js.get_key_value(READS_BUCKET)
        .await
        .map_err(|e| BusError::Bucket(e.to_string()))
}

/// The stream keeping messages HarperDB refused for good, for an operator to inspect (30 days).
pub async fn ensure_dead_letter_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(), BusError> {
    let config = stream::Config {
        name: DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![DEAD_LETTER_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(30 * 24 * 3600),
        num_replicas: replicas,
        ..Default::default()
    };
    retry_jetstream(
        "creating the dead-letter stream",
        JETSTREAM_SETUP_WAIT,
        create_stream_error_is_transient,
        || js.create_or_update_stream(config.clone()),
    )
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Failure {
        transient: bool,
    }

    impl Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transient: {}", self.transient)
        }
    }

    /// An operation that fails `failures` times (transiently or not), then succeeds.
    async fn attempt(calls: &AtomicU32, failures: u32, transient: bool) -> Result<u32, Failure> {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        if n < failures {
            Err(Failure { transient })
        } else {
            Ok(n)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_the_operation_succeeds() {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let result = retry_jetstream(
            "test",
            Duration::from_secs(60),
            |f: &Failure| f.transient,
            || attempt(&calls, 5, true),
        )
        .await;
        assert_eq!(result.ok(), Some(5));
        // 250 + 500 + 1000 + 2000 + 2000 ms of pauses
        assert_eq!(started.elapsed(), Duration::from_millis(5750));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_failure_is_returned_after_the_wait_and_a_permanent_one_at_once() {
        let calls = AtomicU32::new(0);
        let result = retry_jetstream(
            "test",
            Duration::from_secs(10),
            |f: &Failure| f.transient,
            || attempt(&calls, u32::MAX, true),
        )
        .await;
        assert!(result.is_err_and(|f| f.transient));
        // 0.25 + 0.5 + 1 + 2 + 2 + 2 + 2 = 9.75 s, one more attempt and the 11.75 s one fails
        assert_eq!(calls.load(Ordering::SeqCst), 9);

        let calls = AtomicU32::new(0);
        let result = retry_jetstream(
            "test",
            Duration::from_secs(10),
            |f: &Failure| f.transient,
            || attempt(&calls, 1, false),
        )
        .await;
        assert!(result.is_err_and(|f| !f.transient));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
