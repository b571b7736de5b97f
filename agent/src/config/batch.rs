//! A plugin's `batch` and `compress` keys: several of its readings packed into one hub message
//! (docs/configuration.md, "Batching to the hub"). Errors name the key at fault.

use std::time::Duration;

use super::plugin::SpecError;

/// The largest `max_bytes`: the hub takes messages up to 256 KiB, and the topic with the
/// batch's properties must fit beside the body.
pub const MAX_BATCH_BYTES: usize = 192 * 1024;

/// How one plugin's readings are packed for the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    /// A batch is at most this many bytes as the hub meters it (body as sent, after gzip, plus
    /// its properties). The hub bills 4 KB blocks; 65536 (the default) leaves about one
    /// partly filled block per 16 (docs/configuration.md, "Which `max_bytes`").
    pub max_bytes: usize,
    /// How long the first reading of a batch may wait for more when fewer are queued than fill
    /// one; readings already queued never wait.
    pub max_delay: Duration,
    /// `compress = "gzip"`: the batch's body is gzipped, `contentEncoding = gzip`.
    pub gzip: bool,
}

impl BatchSpec {
    pub const DEFAULT_MAX_BYTES: usize = 65536;
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);

    /// `batch = { max_bytes = 65536, max_delay = "1s" }` and `compress = "gzip"` of a
    /// `[[plugin]]` table; `None` when the plugin does not batch.
    pub fn from_table(table: &toml::Table) -> Result<Option<BatchSpec>, SpecError> {
        let gzip = match table.get("compress") {
            None => false,
            Some(toml::Value::String(s)) if s == "gzip" => true,
            Some(toml::Value::String(s)) if s == "none" => false,
            Some(_) => {
                return Err(err("compress", "must be \"gzip\" or \"none\""));
            }
        };
        let Some(batch) = table.get("batch") else {
            if gzip {
                return Err(err(
                    "compress",
                    "compresses batches: set batch = {} (or batch = { max_bytes = 65536, max_delay = \"1s\" }) too",
                ));
            }
            return Ok(None);
        };
        let toml::Value::Table(batch) = batch else {
            return Err(err(
                "batch",
                "must be a table such as { max_bytes = 65536, max_delay = \"1s\" }",
            ));
        };
        if let Some(unknown) = batch
            .keys()
            .find(|k| !["max_bytes", "max_delay"].contains(&k.as_str()))
        {
            return Err(err(
                &format!("batch.{unknown}"),
                "unknown key (known: max_bytes, max_delay)",
            ));
        }
        let max_bytes = match batch.get("max_bytes") {
            None => Self::DEFAULT_MAX_BYTES,
            Some(toml::Value::Integer(n)) if (1024..=MAX_BATCH_BYTES as i64).contains(n) => {
                *n as usize
            }
            Some(toml::Value::String(s)) => s
                .parse::<bytesize::ByteSize>()
                .ok()
                .map(|b| b.as_u64() as usize)
                .filter(|n| (1024..=MAX_BATCH_BYTES).contains(n))
                .ok_or_else(|| err("batch.max_bytes", bytes_range()))?,
            Some(_) => return Err(err("batch.max_bytes", bytes_range())),
        };
        let max_delay = match batch.get("max_delay") {
            None => Self::DEFAULT_MAX_DELAY,
            Some(toml::Value::String(text)) => humantime::parse_duration(text).map_err(|e| {
                err(
                    "batch.max_delay",
                    format!("'{text}' is not a duration ({e}); write e.g. \"1s\""),
                )
            })?,
            Some(_) => {
                return Err(err(
                    "batch.max_delay",
                    "must be a duration string such as \"1s\"",
                ));
            }
        };
        if max_delay > Duration::from_secs(3600) {
            return Err(err("batch.max_delay", "must be at most 1h"));
        }
        Ok(Some(BatchSpec {
            max_bytes,
            max_delay,
            gzip,
        }))
    }
}

fn bytes_range() -> String {
    format!("must be a size from 1024 to {MAX_BATCH_BYTES} bytes (e.g. 65536 or \"64KiB\")")
}

fn err(key: &str, message: impl Into<String>) -> SpecError {
    (key.to_string(), message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<BatchSpec>, SpecError> {
        BatchSpec::from_table(&text.parse::<toml::Table>().unwrap())
    }

    #[test]
    fn batch_and_compress() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(
            parse("batch = {}\n").unwrap(),
            Some(BatchSpec {
                max_bytes: 65536,
                max_delay: Duration::from_secs(1),
                gzip: false
            })
        );
        assert_eq!(
            parse("batch = { max_bytes = \"8KiB\", max_delay = \"250ms\" }\ncompress = \"gzip\"\n")
                .unwrap(),
            Some(BatchSpec {
                max_bytes: 8192,
                max_delay: Duration::from_millis(250),
                gzip: true
            })
        );
    }

    #[test]
    fn a_plugin_table_takes_batch_and_compress() {
        let table: toml::Table = "name = \"e\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\nbatch = { max_bytes = 8192 }\ncompress = \"gzip\"\n"
            .parse()
            .unwrap();
        let spec = crate::config::plugin::PluginSpec::from_table(&table).unwrap();
        assert_eq!(
            spec.batch.map(|b| (b.max_bytes, b.gzip)),
            Some((8192, true))
        );
    }

    #[test]
    fn mistakes_name_their_key() {
        assert_eq!(parse("compress = \"gzip\"\n").unwrap_err().0, "compress");
        assert_eq!(
            parse("batch = {}\ncompress = \"zstd\"\n").unwrap_err().0,
            "compress"
        );
        assert_eq!(
            parse("batch = { max_bytes = 100 }\n").unwrap_err().0,
            "batch.max_bytes"
        );
        assert_eq!(
            parse("batch = { max_delay = 5 }\n").unwrap_err().0,
            "batch.max_delay"
        );
        assert_eq!(parse("batch = { size = 5 }\n").unwrap_err().0, "batch.size");
        assert_eq!(parse("batch = 4096\n").unwrap_err().0, "batch");
    }
}
