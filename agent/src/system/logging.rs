//! Log output: the systemd journal with structured fields when running under systemd, readable text
//! on a terminal, JSON lines on request. Secrets never reach a log line: modules log descriptions of
//! keys (`SasSigner::describe`), never key material or SAS tokens.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The identifier the agent's journal entries carry (`journalctl SYSLOG_IDENTIFIER=hubagent`).
pub const SYSLOG_IDENTIFIER: &str = "hubagent";

static TO_JOURNAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether this process's log lines go to the systemd journal (so the `logs` method may read
/// them back from there, past restarts).
pub fn logs_to_journal() -> bool {
    TO_JOURNAL.get().copied().unwrap_or(false)
}

/// Installs the global subscriber. `level` is an env-filter directive ("info", "hubagent=debug");
/// `RUST_LOG` overrides it.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let use_journal = match format {
        LogFormat::Journal => true,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
        _ => false,
    };
    let sink: Box<dyn Layer<_> + Send + Sync> = if use_journal {
        match tracing_journald::layer() {
            // Fields keep their names, upper-cased, without a prefix: `journalctl DEVICE=…` works.
            Ok(journal) => {
                let _ = TO_JOURNAL.set(true);
                journal
                    .with_field_prefix(None)
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.into())
                    .boxed()
            }
            Err(_) => text_layer(),
        }
    } else if format == LogFormat::Json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        text_layer()
    };
    // A second init (tests, demo inside a test) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(sink)
        .with(super::recent_logs::RecentLogs)
        .try_init();
}

fn text_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours for a person at a terminal; none in a file or a pipe, where escape codes
        // would get in the way of grep and of log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .boxed()
}
