//! The agent's recent log lines, kept in memory for the `logs` direct method: remote diagnostics
//! without SSH, whichever sink (journal, text, JSON) the lines went to. A bounded ring: the newest
//! `CAPACITY` lines, each cut at `MAX_LINE` bytes. They are the lines the journal gets, which never
//! hold a secret (logging.rs); plugin lines have their settings' secrets cut out before they are
//! logged. Under systemd the `logs` method reads the journal instead (journal.rs), which reaches
//! back past restarts; both answer through [`Filter`] and [`pick`].

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// Lines kept.
const CAPACITY: usize = 2000;
/// Bytes kept of one line's message and fields.
const MAX_LINE: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// RFC 3339 UTC.
    pub time: String,
    /// `error`, `warn`, `info`, `debug`, `trace`.
    pub level: &'static str,
    /// The plugin the line is about, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// The message and the line's other fields (`key=value`).
    pub message: String,
}

fn ring() -> &'static Mutex<VecDeque<LogLine>> {
    static RING: OnceLock<Mutex<VecDeque<LogLine>>> = OnceLock::new();
    RING.get_or_init(|| Mutex::new(VecDeque::with_capacity(CAPACITY)))
}

/// The layer that keeps them; installed by `logging::init` beside the sink.
pub struct RecentLogs;

impl<S: tracing::Subscriber> Layer<S> for RecentLogs {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut message = fields.message;
        message.push_str(&fields.rest);
        let line = LogLine {
            time: crate::util::time::now_rfc3339(),
            level: level_name(*event.metadata().level()),
            plugin: fields.plugin,
            message: cut_line(message),
        };
        let mut ring = ring().lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(line);
    }
}

fn level_name(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// A line's message cut at `MAX_LINE` bytes (on a character boundary), marked when cut.
pub fn cut_line(mut message: String) -> String {
    if message.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// The levels, most severe first: a level's rank is its index.
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// 0 for error … 4 for trace: a line passes a `level` filter when its rank is at most the filter's.
fn rank(level: &str) -> Option<u8> {
    LEVELS.iter().position(|l| *l == level).map(|p| p as u8)
}

#[derive(Default)]
struct Fields {
    message: String,
    plugin: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "plugin" => self.plugin = Some(value.to_string()),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "plugin" => self.plugin = Some(format!("{value:?}")),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

/// What the `logs` method asks for; every field optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// Only lines about this plugin.
    pub plugin: Option<String>,
    /// This level and more severe (`warn`: warnings and errors).
    pub level: Option<String>,
    /// Only lines at or after this RFC 3339 time.
    pub since: Option<String>,
    /// At most this many lines, the newest (default 200).
    pub limit: Option<usize>,
}

/// A checked [`Query`]: what a line must be to be answered.
#[derive(Debug, Clone)]
pub struct Filter {
    pub plugin: Option<String>,
    /// The least severe rank answered (`u8::MAX`: every level).
    pub max_rank: u8,
    pub since: Option<time::OffsetDateTime>,
    pub limit: usize,
}

impl Filter {
    /// The query's filter, or what is wrong with it (an unknown level, a time that is not RFC 3339).
    pub fn new(query: &Query) -> Result<Filter, String> {
        let max_rank = match &query.level {
            None => u8::MAX,
            Some(level) => rank(level).ok_or_else(|| {
                format!("level '{level}' is not one of error, warn, info, debug, trace")
            })?,
        };
        let since = match &query.since {
            None => None,
            Some(text) => Some(
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| format!("since '{text}' is not an RFC 3339 time: {e}"))?,
            ),
        };
        Ok(Filter {
            plugin: query.plugin.clone(),
            max_rank,
            since,
            limit: query.limit.unwrap_or(200),
        })
    }

    fn accepts(&self, line: &LogLine) -> bool {
        rank(line.level).is_some_and(|r| r <= self.max_rank)
            && self
                .plugin
                .as_ref()
                .is_none_or(|p| line.plugin.as_ref() == Some(p))
            && self.since.is_none_or(|since| {
                time::OffsetDateTime::parse(
                    &line.time,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok_and(|t| t >= since)
            })
    }
}

/// Of `newest_first`, the newest lines `filter` accepts, oldest first, at most `filter.limit` and
/// `max_bytes` of JSON in all; whether older matching lines were left out.
pub fn pick(
    newest_first: impl Iterator<Item = LogLine>,
    filter: &Filter,
    max_bytes: usize,
) -> (Vec<LogLine>, bool) {
    let (mut picked, mut bytes, mut left_out) = (Vec::new(), 0, false);
    for line in newest_first.filter(|line| filter.accepts(line)) {
        let size = serde_json::to_string(&line).map(|s| s.len()).unwrap_or(0) + 1;
        if picked.len() == filter.limit || bytes + size > max_bytes {
            left_out = true;
            break;
        }
        bytes += size;
        picked.push(line);
    }
    picked.reverse();
    (picked, left_out)
}

/// The newest lines in memory matching `filter`, as [`pick`] answers them.
pub fn recent(filter: &Filter, max_bytes: usize) -> (Vec<LogLine>, bool) {
    let ring = ring().lock().unwrap_or_else(|e| e.into_inner());
    pick(ring.iter().rev().cloned(), filter, max_bytes)
}
