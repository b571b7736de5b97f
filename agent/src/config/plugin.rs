//! A `[[plugin]]` table, validated: what runs (kind, path or command), how it is isolated and
//! limited, and its base settings. Errors name the key at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

/// How a library plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// In a supervised child process (`hubagent-plugin-host`): a crash or hang is contained.
    Process,
    /// Loaded into the daemon: for trusted plugins only (a crash takes the agent down).
    InProcess,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Builtin(String),
    Library {
        path: PathBuf,
        isolation: Isolation,
        /// Added to the plugin-host process's cleared environment (e.g. `RUST_BACKTRACE`);
        /// only with `isolation = "process"`.
        env: BTreeMap<String, String>,
    },
    Exec {
        command: Vec<String>,
        env: BTreeMap<String, String>,
    },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Builtin(_) => "builtin",
            Kind::Library { .. } => "library",
            Kind::Exec { .. } => "exec",
        }
    }
}

/// Supervision limits; see docs/plugins.md for the defaults and what they do.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Messages per second (token bucket refill); excess messages are dropped and counted.
    pub max_rate: f64,
    /// Bucket size: how many messages may be published at once after a quiet spell.
    pub burst: f64,
    /// RLIMIT_AS of the plugin process, bytes (None: unlimited).
    pub memory_limit: Option<u64>,
    /// How long start, apply-settings, stop and liveness pings may take.
    pub callback_timeout: Duration,
    /// How long a direct method to the plugin may take before the caller gets 504. The hub
    /// does not tell the device the caller's `responseTimeoutInSeconds`; the default stays
    /// below the hub's default of 30 s so the caller hears the agent's answer.
    pub method_timeout: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// This many failures within `quarantine_window` quarantine the plugin...
    pub quarantine_after: u32,
    pub quarantine_window: Duration,
    /// ...and it is tried again this often while quarantined.
    pub quarantine_retry: Duration,
    /// Exec plugins: warn (log and status) when a running plugin has written no line the agent
    /// understands for this long (an unflushed stdout looks like that); None: never.
    pub warn_if_silent: Option<Duration>,
    /// The log level of a plugin's stderr line that names none (`<3>`, `WARN:` …).
    pub stderr_level: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rate: 20.0,
            burst: 40.0,
            memory_limit: Some(512 * 1024 * 1024),
            callback_timeout: Duration::from_secs(10),
            method_timeout: Duration::from_secs(20),
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(300),
            quarantine_after: 5,
            quarantine_window: Duration::from_secs(600),
            quarantine_retry: Duration::from_secs(1800),
            warn_if_silent: Some(Duration::from_secs(120)),
            stderr_level: hubagent_plugin_sdk::abi::LOG_INFO,
        }
    }
}

/// What the operator allows one plugin beyond the default sandbox (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SandboxSettings {
    /// `allow_read`: files and directories it may read.
    pub allow_read: Vec<PathBuf>,
    /// `allow_write`: files and directories it may read and write.
    pub allow_write: Vec<PathBuf>,
    /// `allow_devices`: device files it may open and operate (a serial port, a GPIO chip).
    pub allow_devices: Vec<PathBuf>,
    /// `network`: IP sockets (default true).
    pub network: bool,
    /// `unix_sockets`: UNIX sockets (default false: the control socket is one).
    pub unix_sockets: bool,
    /// `private_dir`: a writable directory of its own under the state directory.
    pub private_dir: bool,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            allow_read: Vec::new(),
            allow_write: Vec::new(),
            allow_devices: Vec::new(),
            network: true,
            unix_sockets: false,
            private_dir: false,
        }
    }
}

/// The keys of [`SandboxSettings`].
const SANDBOX_KEYS: &[&str] = &[
    "allow_read",
    "allow_write",
    "allow_devices",
    "network",
    "unix_sockets",
    "private_dir",
];

impl SandboxSettings {
    fn from_table(table: &toml::Table) -> Result<SandboxSettings, SpecError> {
        let paths = |key: &str| -> Result<Vec<PathBuf>, SpecError> {
            let Some(value) = table.get(key) else {
                return Ok(Vec::new());
            };
            let items = value
                .as_array()
                .ok_or_else(|| err(key, "must be a list of absolute paths"))?;
            items
                .iter()
                .map(|item| match item.as_str() {
                    Some(p) if Path::new(p).is_absolute() => Ok(PathBuf::from(p)),
                    Some(p) => Err(err(key, format!("'{p}' is not an absolute path"))),
                    None => Err(err(key, "must be a list of absolute paths")),
                })
                .collect()
        };
        let flag = |key: &str, default: bool| match table.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(_) => Err(err(key, "must be true or false")),
        };
        Ok(SandboxSettings {
            allow_read: paths("allow_read")?,
            allow_write: paths("allow_write")?,
            allow_devices: paths("allow_devices")?,
            network: flag("network", true)?,
            unix_sockets: flag("unix_sockets", false)?,
            private_dir: flag("private_dir", false)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub kind: Kind,
    /// The `settings` table (what the twin's `desired.plugins.<name>` is merged over).
    pub settings: Map<String, Value>,
    pub limits: Limits,
    /// What the sandbox lets it reach beyond the default (hosted libraries and exec plugins).
    pub sandbox: SandboxSettings,
    /// `batch` and `compress`: its readings packed into hub messages (None: one each).
    pub batch: Option<super::batch::BatchSpec>,
}

impl PluginSpec {
    /// Whether the plugin runs in a process of its own that the sandbox can confine (not
    /// in-process libraries, not built-ins: those run inside the agent).
    pub fn confinable(&self) -> bool {
        matches!(
            self.kind,
            Kind::Exec { .. }
                | Kind::Library {
                    isolation: Isolation::Process,
                    ..
                }
        )
    }
}

/// (key, message)
pub type SpecError = (String, String);

fn err(key: &str, message: impl Into<String>) -> SpecError {
    (key.to_string(), message.into())
}

fn duration(table: &toml::Table, key: &str, default: Duration) -> Result<Duration, SpecError> {
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::String(text)) => humantime::parse_duration(text).map_err(|e| {
            err(
                key,
                format!("'{text}' is not a duration ({e}); write e.g. \"5s\""),
            )
        }),
        Some(_) => Err(err(key, "must be a duration string such as \"5s\"")),
    }
}

fn number(table: &toml::Table, key: &str, default: f64) -> Result<f64, SpecError> {
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(n)) => Ok(*n as f64),
        Some(toml::Value::Float(f)) => Ok(*f),
        Some(_) => Err(err(key, "must be a number")),
    }
}

/// Every key a `[[plugin]]` table may hold.
const KEYS: &[&str] = &[
    "name",
    "kind",
    "builtin",
    "path",
    "isolation",
    "command",
    "env",
    "settings",
    "interval",
    "max_rate",
    "burst",
    "memory_limit",
    "callback_timeout",
    "method_timeout",
    "restart_backoff",
    "restart_backoff_max",
    "quarantine_after",
    "quarantine_window",
    "quarantine_retry",
    "warn_if_silent",
    "stderr_level",
    "allow_read",
    "allow_write",
    "allow_devices",
    "network",
    "unix_sockets",
    "private_dir",
    "batch",
    "compress",
];

fn string(table: &toml::Table, key: &str) -> Result<Option<String>, SpecError> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(key, "must be a string")),
    }
}

/// Keys of the other kinds are mistakes, not ignored.
fn forbid(table: &toml::Table, keys: &[&str], kind: &str) -> Result<(), SpecError> {
    match keys.iter().find(|k| table.contains_key(**k)) {
        Some(k) => Err(err(k, format!("does not apply to kind = \"{kind}\""))),
        None => Ok(()),
    }
}

impl PluginSpec {
    /// Checks one table; the first problem found is returned with the key it is about.
    pub fn from_table(table: &toml::Table) -> Result<PluginSpec, SpecError> {
        check_known_keys(table)?;
        let name = twin_property_name(table)?;
        let kind_name = string(table, "kind")?
            .ok_or_else(|| err("kind", "required: \"library\", \"exec\" or \"builtin\""))?;
        let mut settings = settings(table)?;
        let kind = match kind_name.as_str() {
            "builtin" => builtin(table, &mut settings)?,
            "library" => library(table)?,
            "exec" => exec(table)?,
            other => {
                return Err(err(
                    "kind",
                    format!("'{other}': write \"library\", \"exec\" or \"builtin\""),
                ));
            }
        };
        let spec = PluginSpec {
            name,
            kind,
            settings,
            limits: Limits::from_table(table)?,
            sandbox: SandboxSettings::from_table(table)?,
            batch: super::batch::BatchSpec::from_table(table)?,
        };
        if !spec.confinable()
            && let Some(key) = SANDBOX_KEYS.iter().find(|k| table.contains_key(**k))
        {
            return Err(err(
                key,
                "applies only to plugins in a process of their own (exec, or library with isolation = \"process\"): this one runs inside the agent and cannot be sandboxed",
            ));
        }
        Ok(spec)
    }
}

fn check_known_keys(table: &toml::Table) -> Result<(), SpecError> {
    match table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        Some(unknown) => Err(err(
            unknown,
            format!(
                "unknown key (plugin settings go in [plugin.settings]; known: {})",
                KEYS.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// The name is the plugin's key under `desired.plugins` and `reported.plugins`.
fn twin_property_name(table: &toml::Table) -> Result<String, SpecError> {
    let name = table
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err("name", "every [[plugin]] needs a name"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            "name",
            format!("'{name}' must be letters, digits, '-' or '_' (it is a twin property name)"),
        ));
    }
    Ok(name.to_string())
}

/// `[plugin.settings]` as the JSON object the twin's desired settings are merged over. Secret
/// references (`{ file = "/abs/path" }`) stay references here: the plugins layer reads them when
/// it hands the settings to the plugin, so the configuration never holds their content.
fn settings(table: &toml::Table) -> Result<Map<String, Value>, SpecError> {
    match table.get("settings") {
        None => Ok(Map::new()),
        Some(toml::Value::Table(t)) => match serde_json::to_value(t) {
            Ok(Value::Object(m)) => {
                check_secret_references(&m, "settings")?;
                // An exec plugin tells the agent's calls from settings by `$call` (twin keys
                // cannot hold `$` either).
                if let Some(k) = m.keys().find(|k| k.starts_with('$')) {
                    return Err(err(
                        &format!("settings.{k}"),
                        "keys starting with '$' are reserved for the agent (as in the twin)",
                    ));
                }
                Ok(m)
            }
            _ => Err(err("settings", "cannot be represented as JSON")),
        },
        Some(_) => Err(err("settings", "must be a table ([plugin.settings])")),
    }
}

/// A settings value `{ file = "…" }`: a secret the plugin receives as the file's text. Only
/// `[plugin.settings]` in the configuration can hold one; the same object from the twin is plain
/// data (the cloud cannot make the agent read a file).
pub fn secret_reference(value: &Value) -> Option<&str> {
    match value {
        Value::Object(m) if m.len() == 1 => m.get("file").and_then(Value::as_str),
        _ => None,
    }
}

/// The secret references of `settings`, as (dotted key under `settings`, file), in key order.
pub fn secret_references(settings: &Map<String, Value>) -> Vec<(String, String)> {
    fn walk(settings: &Map<String, Value>, at: &str, out: &mut Vec<(String, String)>) {
        for (key, value) in settings {
            let here = format!("{at}.{key}");
            match (secret_reference(value), value) {
                (Some(path), _) => out.push((here, path.to_string())),
                (None, Value::Object(inner)) => walk(inner, &here, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(settings, "settings", &mut out);
    out
}

/// Every table holding `file` is a secret reference: `{ file = "/abs/path" }` and nothing else.
fn check_secret_references(settings: &Map<String, Value>, at: &str) -> Result<(), SpecError> {
    for (key, value) in settings {
        let Value::Object(inner) = value else {
            continue;
        };
        let here = format!("{at}.{key}");
        if !inner.contains_key("file") {
            check_secret_references(inner, &here)?;
            continue;
        }
        match secret_reference(value) {
            Some(path) if Path::new(path).is_absolute() => {}
            Some(path) => {
                return Err(err(
                    &format!("{here}.file"),
                    format!("'{path}' is not an absolute path"),
                ));
            }
            None => {
                return Err(err(
                    &here,
                    "a secret from a file is written { file = \"/etc/hubagent/<name>.secret\" } and holds nothing else",
                ));
            }
        }
    }
    Ok(())
}

fn builtin(table: &toml::Table, settings: &mut Map<String, Value>) -> Result<Kind, SpecError> {
    forbid(table, &["path", "isolation", "command", "env"], "builtin")?;
    let builtin = string(table, "builtin")?
        .ok_or_else(|| err("builtin", "required for kind = \"builtin\""))?;
    if builtin != "simulated-sensor" {
        return Err(err(
            "builtin",
            format!("unknown built-in plugin '{builtin}' (built-in: simulated-sensor)"),
        ));
    }
    // `interval` beside the table's keys is the historical shorthand for settings.interval.
    if let Some(interval) = table.get("interval") {
        settings
            .entry("interval")
            .or_insert_with(|| serde_json::to_value(interval).unwrap_or(Value::Null));
    }
    Ok(Kind::Builtin(builtin))
}

fn library(table: &toml::Table) -> Result<Kind, SpecError> {
    forbid(table, &["builtin", "command", "interval"], "library")?;
    let path = PathBuf::from(
        string(table, "path")?.ok_or_else(|| err("path", "required for kind = \"library\""))?,
    );
    if !path.is_absolute() {
        return Err(err("path", "must be an absolute path"));
    }
    let isolation = match string(table, "isolation")?.as_deref() {
        None | Some("process") => Isolation::Process,
        Some("in-process") => Isolation::InProcess,
        Some(other) => {
            return Err(err(
                "isolation",
                format!("'{other}': write \"process\" (default) or \"in-process\""),
            ));
        }
    };
    let env = env(table)?;
    if isolation == Isolation::InProcess && !env.is_empty() {
        return Err(err(
            "env",
            "a library loaded in-process shares the agent's environment: give it env with isolation = \"process\" (the default)",
        ));
    }
    Ok(Kind::Library {
        path,
        isolation,
        env,
    })
}

fn exec(table: &toml::Table) -> Result<Kind, SpecError> {
    forbid(table, &["builtin", "path", "isolation", "interval"], "exec")?;
    let command: Vec<String> = match table.get("command") {
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("command", "must be an array of strings"))?,
        Some(_) => {
            return Err(err(
                "command",
                "must be an array of strings: [\"/usr/bin/python3\", \"/path/sensor.py\"]",
            ));
        }
        None => return Err(err("command", "required for kind = \"exec\"")),
    };
    if command.is_empty() || command[0].is_empty() {
        return Err(err("command", "must name a program"));
    }
    Ok(Kind::Exec {
        command,
        env: env(table)?,
    })
}

/// `env = { NAME = "value" }`: added to the plugin process's cleared environment.
fn env(table: &toml::Table) -> Result<BTreeMap<String, String>, SpecError> {
    Ok(match table.get("env") {
        None => BTreeMap::new(),
        Some(toml::Value::Table(t)) => t
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or_else(|| err("env", "values must be strings"))?,
        Some(_) => return Err(err("env", "must be a table of strings")),
    })
}

/// `stderr_level`: the level of a stderr line without its own (`<3>`, `WARN:`).
fn stderr_level(table: &toml::Table, default: i32) -> Result<i32, SpecError> {
    use hubagent_plugin_sdk::abi;
    Ok(match string(table, "stderr_level")?.as_deref() {
        None => default,
        Some("error") => abi::LOG_ERROR,
        Some("warn") => abi::LOG_WARN,
        Some("info") => abi::LOG_INFO,
        Some("debug") => abi::LOG_DEBUG,
        Some("trace") => abi::LOG_TRACE,
        Some(other) => {
            return Err(err(
                "stderr_level",
                format!(
                    "'{other}': write \"error\", \"warn\", \"info\" (default), \"debug\" or \"trace\""
                ),
            ));
        }
    })
}

/// `warn_if_silent`: a duration, or "off".
fn warn_if_silent(
    table: &toml::Table,
    default: Option<Duration>,
) -> Result<Option<Duration>, SpecError> {
    match table.get("warn_if_silent") {
        Some(toml::Value::String(s)) if s == "off" => Ok(None),
        None => Ok(default),
        Some(_) => {
            let d = duration(table, "warn_if_silent", Duration::ZERO)?;
            if d < Duration::from_secs(1) {
                return Err(err("warn_if_silent", "must be at least 1s, or \"off\""));
            }
            Ok(Some(d))
        }
    }
}

impl Limits {
    /// The table's limits over the defaults, checked in the order the keys are documented.
    fn from_table(table: &toml::Table) -> Result<Limits, SpecError> {
        let d = Limits::default();
        let max_rate = number(table, "max_rate", d.max_rate)?;
        if !(max_rate > 0.0 && max_rate.is_finite()) {
            return Err(err(
                "max_rate",
                "must be a positive number of messages per second",
            ));
        }
        let burst = number(table, "burst", (max_rate * 2.0).max(1.0))?;
        if !(burst >= 1.0 && burst.is_finite()) {
            return Err(err("burst", "must be at least 1"));
        }
        let memory_limit = memory_limit(table, d.memory_limit)?;
        let quarantine_after = number(table, "quarantine_after", d.quarantine_after as f64)?;
        if !(1.0..=1000.0).contains(&quarantine_after) || quarantine_after.fract() != 0.0 {
            return Err(err(
                "quarantine_after",
                "must be a whole number from 1 to 1000",
            ));
        }
        let limits = Limits {
            max_rate,
            burst,
            memory_limit,
            callback_timeout: duration(table, "callback_timeout", d.callback_timeout)?,
            method_timeout: duration(table, "method_timeout", d.method_timeout)?,
            restart_backoff: duration(table, "restart_backoff", d.restart_backoff)?,
            restart_backoff_max: duration(table, "restart_backoff_max", d.restart_backoff_max)?,
            quarantine_after: quarantine_after as u32,
            quarantine_window: duration(table, "quarantine_window", d.quarantine_window)?,
            quarantine_retry: duration(table, "quarantine_retry", d.quarantine_retry)?,
            warn_if_silent: warn_if_silent(table, d.warn_if_silent)?,
            stderr_level: stderr_level(table, d.stderr_level)?,
        };
        if limits.callback_timeout < Duration::from_millis(100) {
            return Err(err("callback_timeout", "must be at least 100ms"));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&limits.method_timeout)
        {
            return Err(err(
                "method_timeout",
                "must be from 100ms to 300s (the longest responseTimeoutInSeconds the hub takes)",
            ));
        }
        if limits.restart_backoff.is_zero() || limits.restart_backoff > limits.restart_backoff_max {
            return Err(err(
                "restart_backoff",
                "must be above zero and at most restart_backoff_max",
            ));
        }
        Ok(limits)
    }
}

/// A size, "unlimited" (`None`), or a positive number of bytes; at least 16MiB.
fn memory_limit(table: &toml::Table, default: Option<u64>) -> Result<Option<u64>, SpecError> {
    let limit = match table.get("memory_limit") {
        None => default,
        Some(toml::Value::String(s)) if s == "unlimited" => None,
        Some(toml::Value::String(s)) => Some(
            s.parse::<bytesize::ByteSize>()
                .map_err(|e| err("memory_limit", format!("'{s}' is not a size ({e})")))?
                .as_u64(),
        ),
        Some(toml::Value::Integer(n)) if *n > 0 => Some(*n as u64),
        Some(_) => {
            return Err(err(
                "memory_limit",
                "must be a size such as \"256MiB\" or \"unlimited\"",
            ));
        }
    };
    if limit.is_some_and(|m| m < 16 * 1024 * 1024) {
        return Err(err("memory_limit", "must be at least 16MiB"));
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PluginSpec, SpecError> {
        PluginSpec::from_table(&text.parse::<toml::Table>().unwrap())
    }

    #[test]
    fn library_defaults_and_settings() {
        let spec = parse(
            "name = \"m\"\nkind = \"library\"\npath = \"/usr/lib/hubagent/plugins/libm.so\"\n[settings]\ninterval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(
            spec.kind,
            Kind::Library {
                path: "/usr/lib/hubagent/plugins/libm.so".into(),
                isolation: Isolation::Process,
                env: BTreeMap::new(),
            }
        );
        assert_eq!(spec.settings["interval"], "5s");
        assert_eq!(spec.limits, Limits::default());
    }

    #[test]
    fn secret_references_are_kept_as_references_and_checked() {
        let exec = "name = \"m\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n[settings]\n";
        let spec = parse(&format!(
            "{exec}db = {{ password = {{ file = \"/etc/hubagent/db.secret\" }} }}\n"
        ))
        .unwrap();
        // The configuration holds the path, never the content.
        assert_eq!(
            spec.settings["db"]["password"],
            serde_json::json!({"file": "/etc/hubagent/db.secret"})
        );
        assert_eq!(
            secret_reference(&spec.settings["db"]["password"]),
            Some("/etc/hubagent/db.secret")
        );
        let e = parse(&format!("{exec}token = {{ file = \"db.secret\" }}\n")).unwrap_err();
        assert_eq!(e.0, "settings.token.file", "{e:?}");
        assert!(e.1.contains("absolute"), "{e:?}");
        let e = parse(&format!(
            "{exec}token = {{ file = \"/etc/x\", mode = \"0600\" }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.0, "settings.token", "{e:?}");
        let e = parse(&format!("{exec}a = {{ b = {{ file = 7 }} }}\n")).unwrap_err();
        assert_eq!(e.0, "settings.a.b", "{e:?}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("name = \"m\"\nkind = \"library\"\npath = \"rel.so\"\n").unwrap_err();
        assert_eq!(e.0, "path");
        let e = parse("name = \"m\"\nkind = \"exec\"\ncommand = \"python3 x.py\"\n").unwrap_err();
        assert_eq!(e.0, "command");
        let e = parse("name = \"m\"\nkind = \"exec\"\ncommand = [\"x\"]\ninterval = \"1s\"\n")
            .unwrap_err();
        assert_eq!(e.0, "interval");
        let e = parse("name = \"m\"\nkind = \"library\"\npath = \"/x.so\"\nmax_rate = 0\n")
            .unwrap_err();
        assert_eq!(e.0, "max_rate");
        let e =
            parse("name = \"m\"\nkind = \"library\"\npath = \"/x.so\"\ncolour = 1\n").unwrap_err();
        assert_eq!(e.0, "colour");
        let e = parse("name = \"a b\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\n")
            .unwrap_err();
        assert_eq!(e.0, "name");
        let e =
            parse("name = \"m\"\nkind = \"library\"\npath = \"/x.so\"\nmethod_timeout = \"10m\"\n")
                .unwrap_err();
        assert_eq!(e.0, "method_timeout");
        // `$call` tells an exec plugin the agent's calls from its settings.
        let e =
            parse("name = \"m\"\nkind = \"exec\"\ncommand = [\"x\"]\n[settings]\n\"$call\" = 1\n")
                .unwrap_err();
        assert_eq!(e.0, "settings.$call");
    }

    #[test]
    fn builtin_interval_shorthand_and_exec_env() {
        let spec = parse(
            "name = \"s\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(spec.settings["interval"], "1s");
        let spec = parse(
            "name = \"e\"\nkind = \"exec\"\ncommand = [\"/usr/bin/python3\", \"/s.py\"]\nmax_rate = 5\nmemory_limit = \"64MiB\"\n[env]\nA = \"b\"\n",
        )
        .unwrap();
        assert!(matches!(spec.kind, Kind::Exec { ref env, .. } if env["A"] == "b"));
        assert_eq!(spec.limits.max_rate, 5.0);
        assert_eq!(spec.limits.burst, 10.0);
        assert_eq!(spec.limits.memory_limit, Some(64 * 1024 * 1024));
    }
}
