//! `hubagent plugins new NAME --lang rust|c|python`: a new plugin from a template that builds and
//! runs under `hubagent plugins try` as it is. The templates are the files under
//! `plugins/templates/`, compiled into the binary (an installed agent has no checkout to copy
//! them from); `{{name}}`, `{{crate}}`, `{{file}}` and `{{sdk}}` are filled in. The C template
//! carries a copy of `hubagent_plugin.h`, so it builds anywhere; the Rust one names the SDK
//! crate by path, and has a `[workspace]` table of its own so that, made inside a hubagent
//! checkout, it does not join that workspace.

use std::path::{Path, PathBuf};

/// A template's languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    C,
    Python,
}

impl Lang {
    pub fn parse(text: &str) -> Result<Lang, String> {
        match text {
            "rust" => Ok(Lang::Rust),
            "c" => Ok(Lang::C),
            "python" => Ok(Lang::Python),
            other => Err(format!("--lang '{other}': write rust, c or python")),
        }
    }
}

const RUST_CARGO: &str = include_str!("../../../plugins/templates/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("../../../plugins/templates/rust/src/lib.rs");
const RUST_IGNORE: &str = include_str!("../../../plugins/templates/rust/gitignore");
const C_SOURCE: &str = include_str!("../../../plugins/templates/c/plugin.c");
const C_MAKEFILE: &str = include_str!("../../../plugins/templates/c/Makefile");
const C_IGNORE: &str = include_str!("../../../plugins/templates/c/gitignore");
const C_HEADER: &str = include_str!("../../../plugins/sdk/include/hubagent_plugin.h");
const PYTHON_SOURCE: &str = include_str!("../../../plugins/templates/python/plugin.py");
const PYTHON_IGNORE: &str = include_str!("../../../plugins/templates/python/gitignore");

/// The SDK of the checkout this binary was built from (a developer's `cargo run`).
const BUILT_FROM_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// What was made: the plugin's directory, and the commands that build and try it.
#[derive(Debug)]
pub struct Made {
    pub dir: PathBuf,
    pub next: Vec<String>,
}

/// Writes the plugin `name` in `lang` into `parent/name`. `sdk`: the Rust SDK's directory
/// (default: the checkout this binary was built from).
pub fn create(name: &str, lang: Lang, parent: &Path, sdk: Option<&Path>) -> Result<Made, String> {
    check_name(name)?;
    let crate_name = name.replace('-', "_");
    let dir =
        std::path::absolute(parent.join(name)).map_err(|e| format!("{}: {e}", parent.display()))?;
    if dir.exists() {
        return Err(format!(
            "{} already exists: choose another name or --dir",
            dir.display()
        ));
    }
    let sdk = match lang {
        Lang::Rust => Some(sdk_dir(sdk)?),
        _ => None,
    };
    let fill = |text: &str, file: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{file}}", file)
            .replace(
                "{{sdk}}",
                &sdk.as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
    };
    let (files, next): (Vec<(String, String)>, Vec<String>) = match lang {
        Lang::Rust => (
            vec![
                ("Cargo.toml".into(), fill(RUST_CARGO, "")),
                ("src/lib.rs".into(), fill(RUST_LIB, "")),
                (".gitignore".into(), RUST_IGNORE.into()),
            ],
            vec![
                format!("cd {}", dir.display()),
                "cargo test".into(),
                "cargo build --release".into(),
                format!(
                    "hubagent plugins try target/release/lib{crate_name}.so --settings '{{\"step\": 2}}'"
                ),
            ],
        ),
        Lang::C => (
            vec![
                (format!("{crate_name}.c"), fill(C_SOURCE, "")),
                ("Makefile".into(), fill(C_MAKEFILE, "")),
                ("hubagent_plugin.h".into(), C_HEADER.into()),
                (".gitignore".into(), C_IGNORE.into()),
            ],
            vec![
                format!("cd {}", dir.display()),
                "make".into(),
                format!("hubagent plugins try ./lib{crate_name}.so --settings '{{\"step\": 2}}'"),
            ],
        ),
        Lang::Python => {
            let file = format!("{crate_name}.py");
            (
                vec![
                    (file.clone(), fill(PYTHON_SOURCE, &file)),
                    (".gitignore".into(), PYTHON_IGNORE.into()),
                ],
                vec![
                    format!("cd {}", dir.display()),
                    format!("hubagent plugins try --settings '{{\"step\": 2}}' -- python3 {file}"),
                ],
            )
        }
    };
    for (relative, content) in &files {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, content)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(Made { dir, next })
}

/// The name is the plugin's twin property name, its directory's and (with `_` for `-`) its
/// crate's and library's.
fn check_name(name: &str) -> Result<(), String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "'{name}': a plugin name is a letter, then letters, digits, '-' or '_' (it is a twin property name)"
        ))
    }
}

/// The Rust SDK's directory, checked to be the SDK crate.
fn sdk_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidate = given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(BUILT_FROM_SDK));
    let manifest = std::fs::read_to_string(candidate.join("Cargo.toml")).unwrap_or_default();
    if !manifest.contains("name = \"hubagent-plugin-sdk\"") {
        return Err(format!(
            "{} is not hubagent's plugin SDK: pass --sdk <hubagent checkout>/plugins/sdk",
            candidate.display()
        ));
    }
    candidate
        .canonicalize()
        .map_err(|e| format!("{}: {e}", candidate.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_languages_are_checked() {
        assert!(check_name("my-sensor_2").is_ok());
        assert!(check_name("2fast").unwrap_err().contains("'2fast'"));
        assert!(check_name("a.b").is_err());
        assert_eq!(Lang::parse("c").unwrap(), Lang::C);
        assert!(Lang::parse("go").unwrap_err().contains("'go'"));
    }

    #[test]
    fn a_template_is_filled_in_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let made = create("my-meter", Lang::C, dir.path(), None).unwrap();
        let source = std::fs::read_to_string(made.dir.join("my_meter.c")).unwrap();
        assert!(source.contains(".name = \"my-meter\""));
        assert!(!source.contains("{{"));
        assert!(made.dir.join("hubagent_plugin.h").is_file());
        let again = create("my-meter", Lang::Python, dir.path(), None).unwrap_err();
        assert!(again.contains("already exists"), "{again}");
        let made = create("rusty", Lang::Rust, dir.path(), None).unwrap();
        let manifest = std::fs::read_to_string(made.dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("\n[workspace]"), "{manifest}");
        assert!(!manifest.contains("{{"), "{manifest}");
        let wrong = create("other", Lang::Rust, dir.path(), Some(dir.path())).unwrap_err();
        assert!(wrong.contains("--sdk"), "{wrong}");
    }
}
