//! The configuration files as text: reading `config.toml` and its `config.d` drop-ins, merging
//! them, and turning toml's errors (byte spans) into `file:line:column: dotted.key: message`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    AgentSettings, Attestation, ConfigError, HubSettings, IssuedCertificate, QueueConfig, Secret,
    Source,
};

/// Reads `path`, then `config.d/*.toml` beside it (lexical order; tables merge, later files win,
/// `[[plugin]]` entries add up), and deserializes the merge. Syntax errors come first, then type
/// errors checked on each file alone (so they point at a line), then those of the merge.
pub(super) fn read_merged<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let (mut merged, text) = read_table(path)?;
    let mut texts = vec![(path.to_path_buf(), text)];
    for dropin in dropins(path) {
        let (table, text) = read_table(&dropin)?;
        merge_tables(&mut merged, table);
        texts.push((dropin, text));
    }
    for (file, text) in &texts {
        check_types(file, text)?;
    }
    toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| merged_error(path, &texts, &e))
}

/// The `*.toml` files in `config.d` beside `path`, in lexical order (none when it is missing).
fn dropins(path: &Path) -> Vec<PathBuf> {
    let dropin_dir = path.parent().unwrap_or(Path::new(".")).join("config.d");
    let Ok(entries) = std::fs::read_dir(&dropin_dir) else {
        return Vec::new();
    };
    let mut dropins: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    dropins.sort();
    dropins
}

/// One file's text and its table; a syntax error names the file, line and column.
fn read_table(path: &Path) -> Result<(toml::Table, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| parse_error(path, &text, &e))?;
    Ok((table, text))
}

/// Deserializes one file on its own to report type errors with its line; missing sections are
/// fine here (a drop-in may hold a single key).
fn check_types(path: &Path, text: &str) -> Result<(), ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Partial {
        agent: Option<AgentSettings>,
        provisioning: Option<PartialProvisioning>,
        hub: Option<HubSettings>,
        queue: Option<QueueConfig>,
        plugin: Option<Vec<toml::Table>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct PartialProvisioning {
        source: Option<Source>,
        global_endpoint: Option<String>,
        id_scope: Option<String>,
        registration_id: Option<String>,
        payload: Option<toml::Table>,
        model_id: Option<String>,
        iothub_hostname: Option<String>,
        device_id: Option<String>,
        connection_string: Option<Secret>,
        attestation: Option<Attestation>,
        issued_certificate: Option<IssuedCertificate>,
    }
    // Key sources first, outside the internally tagged attestation (where serde loses positions),
    // so a mistake in one points at its own line.
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct KeySources {
        provisioning: Option<ProvisioningKeySources>,
    }
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct ProvisioningKeySources {
        connection_string: Option<Secret>,
        attestation: Option<AttestationKeySources>,
    }
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct AttestationKeySources {
        key: Option<Secret>,
        group_key: Option<Secret>,
    }
    toml::from_str::<KeySources>(text).map_err(|e| parse_error(path, text, &e))?;
    match toml::from_str::<Partial>(text) {
        Ok(_) => Ok(()),
        // A drop-in may change the key file alone, without repeating `method`: the merged
        // configuration is checked for it.
        Err(e) if e.message().trim() == "missing field `method`" => Ok(()),
        Err(e) => Err(parse_error(path, text, &e)),
    }
}

/// A toml error as file:line:column, with the dotted key it is about.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let (key, offset) = match e.span() {
        Some(span) => locate(text, span.start, &message),
        None => (String::new(), usize::MAX),
    };
    let (line, column) = if offset == usize::MAX {
        (0, 0)
    } else {
        line_column(text, offset)
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The dotted key at byte `offset` of `text`, and the offset to report. serde reports errors
/// inside an internally tagged table (`[provisioning.attestation]`) against the whole table; for
/// "unknown field `x`" the key's own line is found inside it.
fn locate(text: &str, offset: usize, message: &str) -> (String, usize) {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return (String::new(), offset); // a syntax error: no keys to name
    };
    let root = toml::de::DeValue::Table(doc.into_inner());
    let mut path = Vec::new();
    let Some(node) = find_at(&root, offset, &mut path) else {
        return (String::new(), offset);
    };
    let mut offset = offset;
    if let Some(unknown) = unknown_field(message)
        && let Some(key_offset) = find_key(node, unknown, &mut path)
    {
        offset = key_offset;
    }
    (join_path(&path), offset)
}

/// The innermost value (or key) whose span holds `offset`, pushing the keys leading to it.
fn find_at<'a, 'i>(
    value: &'a toml::de::DeValue<'i>,
    offset: usize,
    path: &mut Vec<String>,
) -> Option<&'a toml::de::DeValue<'i>> {
    match value {
        toml::de::DeValue::Table(table) => {
            for (key, child) in table.iter() {
                path.push(key.get_ref().to_string());
                if key.span().contains(&offset) {
                    return Some(child.get_ref());
                }
                if let Some(found) = find_at(child.get_ref(), offset, path) {
                    return Some(found);
                }
                if child.span().contains(&offset) {
                    return Some(child.get_ref());
                }
                path.pop();
            }
        }
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(format!("[{i}]"));
                if let Some(found) = find_at(item.get_ref(), offset, path) {
                    return Some(found);
                }
                if item.span().contains(&offset) {
                    return Some(item.get_ref());
                }
                path.pop();
            }
        }
        _ => {}
    }
    None
}

/// Depth-first search for a key named `name` under `value`; extends `path` and returns the key's
/// offset when found.
fn find_key(value: &toml::de::DeValue<'_>, name: &str, path: &mut Vec<String>) -> Option<usize> {
    match value {
        toml::de::DeValue::Table(table) => {
            for (key, child) in table.iter() {
                path.push(key.get_ref().to_string());
                if key.get_ref() == name {
                    return Some(key.span().start);
                }
                if let Some(found) = find_key(child.get_ref(), name, path) {
                    return Some(found);
                }
                path.pop();
            }
        }
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(format!("[{i}]"));
                if let Some(found) = find_key(item.get_ref(), name, path) {
                    return Some(found);
                }
                path.pop();
            }
        }
        _ => {}
    }
    None
}

/// `x` from serde's "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
}

/// `["plugin", "[1]", "name"]` → `plugin[1].name`.
fn join_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !out.is_empty() && !part.starts_with('[') {
            out.push('.');
        }
        out.push_str(part);
    }
    out
}

/// An error found only once the files are merged (each file alone was fine). An unknown key is
/// traced back to the last file that sets it.
fn merged_error(main: &Path, texts: &[(PathBuf, String)], e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    if let Some(name) = unknown_field(&message) {
        for (file, text) in texts.iter().rev() {
            let Ok(doc) = toml::de::DeTable::parse(text) else {
                continue;
            };
            let mut path = Vec::new();
            let root = toml::de::DeValue::Table(doc.into_inner());
            if let Some(offset) = find_key(&root, name, &mut path) {
                let (line, column) = line_column(text, offset);
                return ConfigError::Parse {
                    path: file.clone(),
                    line,
                    column,
                    key: join_path(&path),
                    message: format!("{message} (in the configuration merged from config.d)"),
                };
            }
        }
    }
    let (key, message) = match message.as_str() {
        "missing field `provisioning`" => (
            "provisioning",
            "missing: every configuration needs a [provisioning] section".to_string(),
        ),
        "missing field `method`" => (
            "provisioning.attestation.method",
            "missing: \"symmetric_key\", \"x509\" or \"tpm\"".to_string(),
        ),
        _ => ("(merged with config.d)", message),
    };
    ConfigError::Invalid {
        path: main.to_path_buf(),
        key: key.to_string(),
        message,
    }
}

/// Deep merge: tables merge key by key, arrays of tables append, anything else is replaced.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (Some(toml::Value::Array(b)), toml::Value::Array(o)) if key == "plugin" => b.extend(o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters_from_one() {
        let text = "a = 1\nb = \"é\"\nc = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, text.find('b').unwrap()), (2, 1));
        // A column counts characters, not bytes: the quote after the two-byte 'é' is the 7th.
        assert_eq!(line_column(text, text.find("\"\n").unwrap()), (2, 7));
        assert_eq!(line_column(text, usize::MAX), (4, 1));
    }

    #[test]
    fn unknown_fields_and_paths_are_read_and_written_as_operators_see_them() {
        assert_eq!(
            unknown_field("unknown field `sas_tll`, expected one of `port`"),
            Some("sas_tll")
        );
        assert_eq!(unknown_field("invalid type: string"), None);
        let path = ["plugin", "[1]", "settings", "x"].map(String::from);
        assert_eq!(join_path(&path), "plugin[1].settings.x");
    }

    #[test]
    fn plugin_keys_are_named_with_their_index() {
        let text =
            "[[plugin]]\nname = \"a\"\n\n[[plugin]]\nname = \"b\"\n[plugin.settings]\nx = 1\n";
        let (key, offset) = locate(text, text.find("x = 1").unwrap(), "invalid type");
        assert_eq!(key, "plugin[1].settings.x");
        let line = text.lines().position(|l| l == "x = 1").unwrap() + 1;
        assert_eq!(line_column(text, offset), (line, 1));
    }

    #[test]
    fn merging_appends_plugins_and_replaces_other_arrays() {
        let mut base: toml::Table = "a = [1]\n[t]\nx = 1\ny = 2\n[[plugin]]\nname = \"p\"\n"
            .parse()
            .unwrap();
        let over: toml::Table = "a = [2]\n[t]\ny = 3\n[[plugin]]\nname = \"q\"\n"
            .parse()
            .unwrap();
        merge_tables(&mut base, over);
        let expected: toml::Table =
            "a = [2]\n[t]\nx = 1\ny = 3\n[[plugin]]\nname = \"p\"\n[[plugin]]\nname = \"q\"\n"
                .parse()
                .unwrap();
        assert_eq!(base, expected);
    }
}
