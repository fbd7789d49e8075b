//! Tracing setup: human-readable lines by default, JSON with `log.format = "json"`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogFormat, LogSettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Libraries that log whole packets (client tokens, chat text) at debug and trace: they stay
/// at info unless the configured filter names them.
const PACKET_LOGGERS: [&str; 4] = [
    "socketioxide",
    "engineioxide",
    "tungstenite",
    "tokio_tungstenite",
];

/// The filter for a configured level: packet-logging libraries capped at info unless named.
pub fn filter_for(level: &str) -> String {
    let mut filter = level.to_owned();
    for target in PACKET_LOGGERS {
        if !level.contains(target) {
            filter.push_str(&format!(",{target}=info"));
        }
    }
    filter
}

/// Installs the global subscriber. `RUST_LOG`, when set, replaces `log.level` as it is.
/// Colours only on a terminal.
pub fn init(settings: &LogSettings) -> Result<(), TelemetryError> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter_for(&settings.level));
    let env_filter = EnvFilter::try_new(&filter).map_err(|source| TelemetryError::Filter {
        filter: filter.clone(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(true);
    let result = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}

/// The process's Prometheus recorder, installed on first use; `/metrics` renders it.
///
/// Installed once per process, so several applications in one test process share it.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let sizes = [
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
            ];
            // Histograms (not summaries), so they aggregate across instances.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_messages".into()), &sizes)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours just stays empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn packet_loggers_stay_at_info_unless_named() {
        let f = super::filter_for("trace");
        assert!(f.starts_with("trace,"));
        assert!(f.contains("socketioxide=info") && f.contains("engineioxide=info"));
        assert!(tracing_subscriber::EnvFilter::try_new(&f).is_ok());
        let named = super::filter_for("info,socketioxide=debug");
        assert!(!named.contains("socketioxide=info"), "{named}");
        assert!(named.contains("tungstenite=info"));
    }

    #[test]
    fn recorded_metrics_render() {
        let handle = super::metrics_handle();
        metrics::describe_gauge!("chatify_test_gauge", "a test gauge");
        metrics::gauge!("chatify_test_gauge").set(3.0);
        let text = handle.render();
        assert!(
            text.contains("# HELP chatify_test_gauge a test gauge"),
            "{text}"
        );
        assert!(text.contains("chatify_test_gauge 3"), "{text}");
    }
}
