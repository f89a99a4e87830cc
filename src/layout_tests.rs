//! The folders of the library must not lean on each other in a circle: this reads the `crate::`
//! and folder-escaping `super::` paths of every source file and fails on a cycle in the graph of
//! top-level modules, or on a leaf module that grew a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules (a folder under `src/` or a file `src/<name>.rs`) whose dependency graph must
/// stay acyclic. To check another one, move it here from [`NOT_YET_CHECKED`].
const CHECKED: &[&str] = &[
    "archive",
    "config",
    "control",
    "hook",
    "layer",
    "metrics",
    "replicator",
    "snapshotter",
    "state",
    "store",
    "sys",
    "types",
    "util",
];

/// Modules left out for now; edges to and from them are ignored.
/// `cmd` is the binary's (it sits on top of everything). The snapshotter's inner rule (its
/// core never names the persistence plug-in) is checked in `snapshotter::layering_tests`.
const NOT_YET_CHECKED: &[&str] = &["cmd"];

/// Modules that must depend on no other module of the crate.
const LEAVES: &[&str] = &["metrics", "types", "util"];

type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[test]
fn top_level_modules_have_no_dependency_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src, CHECKED);
    assert!(
        graph.values().map(BTreeMap::len).sum::<usize>() > 0,
        "no dependencies found at all: the scan is broken"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("{}", describe_cycle(&graph, &cycle));
    }
    for leaf in LEAVES {
        let deps = &graph[*leaf];
        assert!(
            deps.is_empty(),
            "{leaf} must stay a leaf module but uses {:?}",
            deps
        );
    }
    // fuzz/ compiles src/archive (with src/util.rs) by path, without the rest of the crate.
    let archive: Vec<&String> = graph["archive"].keys().collect();
    assert!(
        archive.iter().all(|d| *d == "util"),
        "archive may only use util (fuzz/fuzz_targets/archive_reader.rs includes it by path), \
         but uses {archive:?}"
    );
    // fuzz/ also compiles the WAL reader and the segment codec by path, on their own.
    for file in ["replicator/wal.rs", "replicator/segment.rs"] {
        let text = std::fs::read_to_string(src.join(file)).expect("replicator parser source");
        assert!(
            !text.contains("crate::") && !text.contains("super::"),
            "{file} is included by path in fuzz/fuzz_targets/replicator.rs: it may use no other \
             module of the crate"
        );
    }
    // The poststop hook runs inside `runc delete` (small and synchronous), and the daemon's
    // control server imports `hook::wire`: the hook must not pull in the daemon's folders.
    let hook: Vec<&String> = graph["hook"].keys().collect();
    assert!(
        hook.iter()
            .all(|d| ["util", "types", "config"].contains(&d.as_str())),
        "hook may only use util, types and config, but uses {hook:?}"
    );
    for m in NOT_YET_CHECKED {
        assert!(
            !CHECKED.contains(m) && src.join(m).exists(),
            "{m}: listed as not yet checked but checked or missing"
        );
    }
}

#[test]
fn the_scan_sees_grouped_uses_and_escaping_super_paths_and_finds_cycles() {
    let refs = |file: &str, text: &str| {
        let mut out = referenced_modules(Path::new(file), text);
        out.sort();
        out
    };
    let text = "use crate::{\n    archive::X,\n    store::{self, Y},\n};\n\
                // use crate::layer::Ignored;\nfn f() { crate::config::load(); }";
    assert_eq!(
        refs("layer/sync.rs", text),
        ["archive", "config", "store"].map(String::from)
    );
    // `super::super::state` from src/store/s3/x.rs stays in store: only store's own `s3`.
    assert!(refs("store/s3/x.rs", "use super::super::s3::Y;").is_empty());
    assert_eq!(refs("store/mod.rs", "use super::state::Db;"), ["state"]);
    assert_eq!(refs("store/local.rs", "use super::super::sys::X;"), ["sys"]);

    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), vec![format!("{a}.rs")]);
        g.entry(b.into()).or_default();
    }
    let cycle = find_cycle(&g).expect("a → b → c → a");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}

/// For each of `modules`: the other modules of `modules` it uses, with the files that use them.
fn module_graph(src: &Path, modules: &[&str]) -> Graph {
    let mut graph = Graph::new();
    for module in modules {
        let deps = graph.entry((*module).to_string()).or_default();
        for file in module_files(src, module) {
            let rel = file.strip_prefix(src).unwrap_or(&file).to_path_buf();
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            for dep in referenced_modules(&rel, &text) {
                if dep != *module && modules.contains(&dep.as_str()) {
                    deps.entry(dep).or_default().push(rel.display().to_string());
                }
            }
        }
    }
    graph
}

/// `src/<module>.rs`, or every `.rs` file under `src/<module>/`.
fn module_files(src: &Path, module: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let dir = src.join(module);
    assert!(
        dir.is_dir(),
        "module {module} not found under {}",
        src.display()
    );
    let mut out = Vec::new();
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Top-level modules named by the paths in `text`, a file at `rel` (relative to `src/`):
/// `crate::m`, `crate::{m::…, n::…}`, and `super::…` chains that climb out of the file's
/// top-level module. Comments are skipped.
fn referenced_modules(rel: &Path, text: &str) -> Vec<String> {
    // Module depth of the file: src/a.rs and src/a/mod.rs are 1, src/a/b.rs is 2, ...
    let mut depth = rel.components().count();
    if rel.file_name().is_some_and(|n| n == "mod.rs") {
        depth -= 1;
    }
    let code: String = text
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        // Both prefixes are ASCII, so a match starts on a char boundary.
        if starts_word && bytes[i..].starts_with(b"crate::") {
            found.extend(path_heads(&code[i + "crate::".len()..]));
            i += "crate::".len();
        } else if starts_word && bytes[i..].starts_with(b"super::") {
            let mut ups = 0;
            let mut tail = &code[i..];
            while let Some(t) = tail.strip_prefix("super::") {
                ups += 1;
                tail = t;
            }
            if ups >= depth {
                found.extend(path_heads(tail));
            }
            i += "super::".len() * ups;
        } else {
            i += 1;
        }
    }
    found.into_iter().collect()
}

/// The first segment(s) of a path tail: `m::…` → `[m]`, `{m::…, n}` → `[m, n]`.
fn path_heads(tail: &str) -> Vec<String> {
    let tail = tail.trim_start();
    if let Some(group) = tail.strip_prefix('{') {
        let mut heads = Vec::new();
        let (mut level, mut at_item_start) = (0usize, true);
        let mut word = String::new();
        for c in group.chars() {
            match c {
                '{' => level += 1,
                '}' if level == 0 => break,
                '}' => level -= 1,
                ',' if level == 0 => at_item_start = true,
                c if level == 0 && at_item_start && (c.is_alphanumeric() || c == '_') => {
                    word.push(c);
                }
                _ if level == 0 && at_item_start && !word.is_empty() => {
                    heads.push(std::mem::take(&mut word));
                    at_item_start = false;
                }
                _ => {}
            }
        }
        if !word.is_empty() {
            heads.push(word);
        }
        heads.retain(|h| h != "self");
        heads
    } else {
        let head: String = tail
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if head.is_empty() { vec![] } else { vec![head] }
    }
}

/// A cycle of the graph as its modules in order, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|n| n == node) {
            return Some(stack[pos..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(BTreeMap::keys) {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

fn describe_cycle(graph: &Graph, cycle: &[String]) -> String {
    let mut out = format!(
        "dependency cycle between top-level modules: {} → {}\n",
        cycle.join(" → "),
        cycle[0]
    );
    for (i, from) in cycle.iter().enumerate() {
        let to = &cycle[(i + 1) % cycle.len()];
        out.push_str(&format!("  {from} → {to} in {:?}\n", graph[from][to]));
    }
    out
}
