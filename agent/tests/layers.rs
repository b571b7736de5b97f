//! The layer map in `src/lib.rs` is true: every module of the library uses only modules of lower
//! layers (docs/architecture.md). Reads the table from lib.rs's documentation and every `crate::`
//! path (and `super::` path that climbs to the crate root) in the library's non-test code, so a
//! `use` that crosses a layer upwards, or a module missing from the table, fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → layer number, from the rows `//! | N | \`a\`, \`b\` | …` of lib.rs.
fn layer_map(lib_rs: &str) -> BTreeMap<String, u32> {
    let mut layers = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue; // the header and separator rows
        };
        for module in cells[1].split(',') {
            let name = module.trim().trim_matches('`');
            assert!(
                layers.insert(name.to_string(), layer).is_none(),
                "lib.rs: `{name}` appears twice in the layer table"
            );
        }
    }
    layers
}

/// The modules lib.rs declares (`pub mod x;`, with or without a `#[cfg]` above it).
fn declared_modules(lib_rs: &str) -> BTreeSet<String> {
    lib_rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A source file under a module directory: its path relative to it, its path's parts without
/// `.rs`, how many `super::` climb from it to that directory (`a.rs` and `a/mod.rs` one, `a/b.rs`
/// two), and its production code.
struct SourceFile {
    relative: PathBuf,
    parts: Vec<String>,
    depth: usize,
    code: String,
}

fn source_files(dir: &Path) -> Vec<SourceFile> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files
        .into_iter()
        .map(|file| {
            let relative = file.strip_prefix(dir).unwrap().to_path_buf();
            let parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod"));
            let code = production_code(&std::fs::read_to_string(&file).unwrap());
            SourceFile {
                relative,
                parts,
                depth,
                code,
            }
        })
        .collect()
}

/// The code of a file without comments and without its trailing `#[cfg(test)] mod tests`.
fn production_code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|line| match line.find("//") {
            // `//` inside a string ("https://…") would cut too much, but the rest of such a line
            // holds no module path in this code base; the check errs on the side of less text.
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level modules named right after `crate::` (also inside `crate::{a, b::c}` groups) and
/// after enough `super::` to reach the crate root from a module `depth` levels down. An inline
/// `mod x { use super::Item; }` climbs one level less than its file suggests, so a climb counts
/// only when it lands on a name of `modules`.
fn referenced_modules(code: &str, depth: usize, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut level = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => level += 1,
                    '}' if level == 0 => break,
                    '}' => level -= 1,
                    ',' if level == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(identifier(&group[i..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(identifier(rest).to_string());
        }
    }
    for (at, _) in code.match_indices("super::") {
        if code[..at].ends_with("super::") {
            continue; // counted from the first of a chain
        }
        let mut rest = &code[at..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        let name = identifier(rest);
        if climbs >= depth && modules.contains(name) {
            out.insert(name.to_string());
        }
    }
    out
}

#[test]
fn no_module_uses_a_module_of_its_own_or_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let layers = layer_map(&lib_rs);
    let declared = declared_modules(&lib_rs);
    let in_table: BTreeSet<String> = layers.keys().cloned().collect();
    assert_eq!(
        declared, in_table,
        "lib.rs: the layer table must list exactly the modules lib.rs declares"
    );

    let mut violations = Vec::new();
    for SourceFile {
        relative,
        parts,
        depth,
        code,
    } in source_files(&src)
    {
        if parts[0] == "bin" || parts[0] == "lib" {
            continue; // the binary is the face above every layer; lib.rs only declares
        }
        let module = &parts[0];
        let own = layers[module];
        for used in referenced_modules(&code, depth, &in_table) {
            if used == *module || used == "self" {
                continue;
            }
            let Some(&layer) = layers.get(&used) else {
                violations.push(format!(
                    "{}: uses `{used}`, not in lib.rs's table",
                    relative.display()
                ));
                continue;
            };
            if layer >= own {
                violations.push(format!(
                    "{}: `{module}` (layer {own}) uses `{used}` (layer {layer})",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "uses that cross a layer upwards or sideways:\n  {}",
        violations.join("\n  ")
    );
}

/// A top-level module with its own table (`identity/mod.rs`) is layered inside too: each of its
/// submodules reaches a sibling only through `super::` (or `crate::<module>::`), and only one of
/// a lower row.
#[test]
fn layered_modules_keep_their_own_order_inside() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in ["identity"] {
        let dir = src.join(module);
        let mod_rs = std::fs::read_to_string(dir.join("mod.rs")).unwrap();
        let layers = layer_map(&mod_rs);
        let declared = declared_modules(&mod_rs);
        let in_table: BTreeSet<String> = layers.keys().cloned().collect();
        assert_eq!(
            declared, in_table,
            "{module}/mod.rs: the table must list its submodules"
        );
        assert!(
            !mod_rs
                .lines()
                .any(|l| l.trim_start().starts_with("pub use")),
            "{module}/mod.rs re-exports: a sibling's path through `{module}` would loop back"
        );
        let mut violations = Vec::new();
        for SourceFile {
            relative,
            parts,
            depth,
            code,
        } in source_files(&dir)
        {
            if parts[0] == "mod" {
                continue;
            }
            let own_name = &parts[0];
            let mut used = referenced_modules(&code, depth, &in_table);
            used.retain(|name| in_table.contains(name));
            for (at, _) in code.match_indices(&format!("crate::{module}::")) {
                let rest = &code[at + "crate::::".len() + module.len()..];
                used.insert(identifier(rest).to_string());
            }
            for name in used {
                if name == *own_name {
                    continue;
                }
                let (own, layer) = (layers[own_name], layers.get(&name).copied());
                if layer.is_none_or(|layer| layer >= own) {
                    violations.push(format!(
                        "{module}/{}: `{own_name}` (row {own}) uses `{name}` (row {layer:?})",
                        relative.display()
                    ));
                }
            }
        }
        assert!(
            violations.is_empty(),
            "uses inside `{module}` that cross its table upwards or sideways:\n  {}",
            violations.join("\n  ")
        );
    }
}

#[test]
fn the_reference_scanner_sees_groups_nested_paths_and_climbs() {
    let code = "use crate::{config::{A, B}, util::time};\nlet x = crate::hub::spawn();\nuse super::super::telemetry::Queue;\nuse super::sibling;";
    let modules: BTreeSet<String> = ["config", "util", "hub", "telemetry", "sibling"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let found = referenced_modules(code, 2, &modules);
    let expected: BTreeSet<String> = ["config", "util", "hub", "telemetry"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
    assert!(production_code("a // crate::x\n#[cfg(test)]\nmod tests { crate::y }").trim() == "a");
}
