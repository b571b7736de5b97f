//! Secrets in plugin settings: a `[plugin.settings]` value `{ file = "/abs/path" }` reaches the
//! plugin as the file's text (trailing whitespace trimmed, as for the agent's key files), and is
//! never echoed: wherever the agent shows settings (`reported.plugins.<name>.settings`,
//! `hubagent status`, `hubagent plugins list`) the reference stands in for the value, and a
//! plugin's error text has it cut out. docs/plugins.md, "Secrets in settings".

use std::path::PathBuf;

use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use crate::config::plugin::secret_reference;

/// The secrets one plugin's settings were resolved with: (file, text). Only the files show in
/// `Debug`.
#[derive(Clone, Default)]
pub struct Secrets(Vec<(PathBuf, Zeroizing<String>)>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(p, _)| p))
            .finish()
    }
}

/// The configuration's settings with every secret reference replaced by the file's text. A file
/// that cannot be read leaves its reference in place and is logged (plugin, key, file, why; never
/// any content); a file readable by group or others is used, with a warning, as key files are.
pub fn resolve(plugin: &str, settings: &Map<String, Value>) -> (Map<String, Value>, Secrets) {
    let mut secrets = Secrets::default();
    let resolved = resolve_map(plugin, settings, "settings", &mut secrets);
    (resolved, secrets)
}

fn resolve_map(
    plugin: &str,
    settings: &Map<String, Value>,
    at: &str,
    secrets: &mut Secrets,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in settings {
        let here = format!("{at}.{key}");
        let resolved = match (secret_reference(value), value) {
            (Some(path), _) => match read(path) {
                Ok(text) => {
                    if let Some(warning) = crate::identity::keys::check_private(path.as_ref()) {
                        tracing::warn!(plugin, key = %here, "{warning}");
                    }
                    let resolved = Value::String(text.to_string());
                    secrets.0.push((path.into(), text));
                    resolved
                }
                Err(e) => {
                    tracing::error!(plugin, key = %here, file = path, "cannot read the secret: {e}");
                    value.clone()
                }
            },
            (None, Value::Object(inner)) => {
                Value::Object(resolve_map(plugin, inner, &here, secrets))
            }
            (None, other) => other.clone(),
        };
        out.insert(key.clone(), resolved);
    }
    out
}

fn read(path: &str) -> std::io::Result<Zeroizing<String>> {
    let text = Zeroizing::new(std::fs::read_to_string(path)?);
    Ok(Zeroizing::new(text.trim().to_string()))
}

impl Secrets {
    /// `settings` as the agent may show them: every string equal to a secret becomes the
    /// reference it came from, `{"file": "/abs/path"}`.
    pub fn redact(&self, settings: &Value) -> Value {
        match settings {
            Value::String(s) => match self
                .0
                .iter()
                .find(|(_, text)| !text.is_empty() && **text == *s)
            {
                Some((path, _)) => json!({"file": path}),
                None => settings.clone(),
            },
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), self.redact(v))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(|v| self.redact(v)).collect()),
            other => other.clone(),
        }
    }

    /// A plugin's text (an error, a reason) with every secret cut out.
    pub fn redact_text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (path, secret) in &self.0 {
            if !secret.is_empty() {
                out = out.replace(
                    secret.as_str(),
                    &format!("<secret from {}>", path.display()),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_reach_the_plugin_and_only_their_file_is_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db.secret");
        std::fs::write(&file, "hunter2-9f1c\n").unwrap();
        let settings = json!({
            "user": "meter",
            "db": {"password": {"file": file}, "host": "db.local"},
            "missing": {"file": "/nonexistent/secret"},
        });
        let (resolved, secrets) = resolve("p", settings.as_object().unwrap());
        assert_eq!(resolved["db"]["password"], "hunter2-9f1c");
        assert_eq!(resolved["db"]["host"], "db.local");
        // Unreadable: the reference stays (and is logged), never an empty password.
        assert_eq!(resolved["missing"], json!({"file": "/nonexistent/secret"}));
        assert!(!format!("{secrets:?}").contains("hunter2"));

        let shown = secrets.redact(&Value::Object(resolved));
        assert_eq!(shown, settings);
        assert_eq!(
            secrets.redact_text("login refused for hunter2-9f1c"),
            format!("login refused for <secret from {}>", file.display())
        );
    }
}
