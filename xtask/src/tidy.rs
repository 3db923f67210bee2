//! `cargo xtask tidy`: fast checks that keep the repository's written rules true.
//!
//! Each rule is a pure function from file contents to violations, so the unit tests below can
//! feed it small in-memory examples; `run` walks the tree (plain std, no dependencies) and prints
//! every violation as `path:line: why`.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

mod docs;
mod lex;

use docs::{check_cli_names, check_links, clap_longs, clap_subcommands, CliNames};
use lex::{code_only, code_without_tests, word_positions};

/// One broken rule at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub path: String,
    pub line: usize,
    pub why: String,
}

impl Violation {
    fn new(path: &str, line: usize, why: impl Into<String>) -> Self {
        Violation {
            path: path.to_string(),
            line,
            why: why.into(),
        }
    }
}

/// Library crates: no environment reads, no panicking tch calls in `src/`.
const LIBRARY_CRATES: [&str; 5] = [
    "nsa-select",
    "nsa-attn",
    "nsa-model",
    "nsa-ddp",
    "nsa-bench",
];

/// Crates whose clap flags and subcommands make up the `nsa-train` command line (nsa-bench
/// holds the flags of `bench select | attn | branches`).
const TRAIN_CLI_CRATES: [&str; 2] = ["nsa-train", "nsa-bench"];

/// Files of nsa-train's `src/` (besides `config.rs`) that may read the environment, and why.
const ENV_ALLOWLIST: &[(&str, &str)] = &[
    (
        "nsa-train/src/main.rs",
        "hands `std::env::vars()` to config::resolve and config::kernel_cache_dir, which interpret it",
    ),
    (
        "nsa-train/src/launch.rs",
        "hands `std::env::vars()` to config::dist_plan, which interprets it",
    ),
];

/// tch methods that panic on a libtorch error and have a fallible `f_` twin. Library code must
/// call the `f_` form so a libtorch failure is an `Err`. The bool says whether tch's form always
/// takes arguments: then an argument-less call of the same name (`iter.sum()`, `vec.sort()`,
/// `option.transpose()`) is another type's method and is not flagged.
const PANICKING_TCH: &[(&str, bool)] = &[
    ("view", true),
    ("reshape", true),
    ("matmul", true),
    ("softmax", true),
    ("sum", true),
    ("to_kind", true),
    ("to_device", true),
    ("narrow", true),
    ("index_select", true),
    ("gather", true),
    ("cat", true),
    ("stack", true),
    ("masked_fill", true),
    ("transpose", true),
    ("permute", true),
    ("contiguous", false),
    ("unsqueeze", true),
    ("squeeze", false),
    ("expand", true),
    ("exp", false),
    ("log", false),
    ("max_dim", true),
    ("topk", true),
    ("sort", true),
    ("argsort", true),
    ("cumsum", true),
    ("zeros", true),
    ("ones", true),
    ("arange", true),
    ("randn", true),
    ("double_value", true),
    ("int64_value", true),
    ("backward", false),
    ("copy_", true),
    ("fill_", true),
    ("zero_", false),
    ("detach", false),
    // `nn::Path`'s variable constructors (`vs.var(…)`, `vs.zeros(…)` above, …) unwrap too.
    ("var", true),
    ("var_copy", true),
    ("zeros_no_train", true),
    ("ones_no_train", true),
    ("randn_standard", true),
    ("uniform", true),
    ("kaiming_uniform", true),
    ("kaiming_normal", true),
];

/// tch's layer constructors (`nn::linear(…)`, …): they create their variables with the
/// unwrapping `nn::Path::var` and have no `f_` twin. Library code builds layers with
/// `nsa_attn::f_linear` or from `nn::Path::f_var`.
const PANICKING_TCH_LAYERS: &[&str] = &[
    "linear",
    "embedding",
    "layer_norm",
    "group_norm",
    "batch_norm1d",
    "batch_norm2d",
    "batch_norm3d",
    "conv",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "lstm",
    "gru",
];

/// Longest source file, in lines, without an entry in [`LONG_FILES`].
const MAX_LINES: usize = 800;

/// Source files allowed over [`MAX_LINES`], and why.
const LONG_FILES: &[(&str, &str)] = &[
    (
        "nsa-train/src/config.rs",
        "every config section, its validation and the environment/dist mapping, with their unit tests",
    ),
    (
        "nsa-attn/tests/attn.rs",
        "test file with many cases (path parity, finite differences)",
    ),
    (
        "nsa-select/tests/select.rs",
        "test file with many cases (reference vs vectorized)",
    ),
    (
        "nsa-ddp/tests/ddp.rs",
        "test file with many cases (collectives, buckets, overlap)",
    ),
];

/// Markdown files whose relative links must resolve (plus every crate's README.md).
const LINKED_DOCS: [&str; 3] = ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"];

const SOURCE_EXTENSIONS: [&str; 7] = ["rs", "cpp", "h", "cu", "cuh", "sh", "py"];

/// Runs every rule on the tree at `root`; fails if any rule is broken.
pub(crate) fn run(root: &Path) -> Result<()> {
    let files = walk(root)?;
    let rel = |p: &Path| -> String {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    let mut sources: Vec<(String, String)> = Vec::new();
    for f in &files {
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
        if SOURCE_EXTENSIONS.contains(&ext) {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            sources.push((rel(f), text));
        }
    }
    let rust = || sources.iter().filter(|(p, _)| p.ends_with(".rs"));
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).with_context(|| format!("reading {p}"));

    let mut failed = 0;
    let mut report = |title: &str, v: Vec<Violation>| {
        println!("tidy: {title}");
        for x in &v {
            println!("  {}:{}: {}", x.path, x.line, x.why);
        }
        if !v.is_empty() {
            failed += 1;
        }
    };

    // 1. unsafe only in nsa-sys.
    let workspace = read("Cargo.toml")?;
    let mut v = Vec::new();
    for (p, t) in rust() {
        v.extend(check_unsafe(p, t));
    }
    let members = workspace_members(&workspace);
    let mut manifests = Vec::new();
    let mut roots = Vec::new();
    for m in &members {
        if m == "nsa-sys" {
            continue;
        }
        let manifest = format!("{m}/Cargo.toml");
        manifests.push((manifest.clone(), read(&manifest)?));
        for r in ["src/lib.rs", "src/main.rs"] {
            let path = format!("{m}/{r}");
            if root.join(&path).exists() {
                roots.push((path.clone(), read(&path)?));
            }
        }
    }
    v.extend(check_unsafe_lints(&workspace, &manifests, &roots));
    report(
        "unsafe and extern only under nsa-sys/; every other crate denies unsafe_code (workspace lint) and its roots forbid it",
        v,
    );

    // 2. environment reads.
    let test_files = test_module_files(&sources);
    let rust_outside_tests = || rust().filter(|(p, _)| !test_files.contains(p));
    let mut v = Vec::new();
    for (p, t) in rust_outside_tests() {
        v.extend(check_env(p, t));
    }
    report(
        "no environment reads in library src/; in nsa-train only config.rs and the allowlist",
        v,
    );

    // 3. panicking tch calls.
    let mut v = Vec::new();
    for (p, t) in rust_outside_tests() {
        v.extend(check_panicking_tch(p, t));
    }
    report(
        "library and nsa-train src/ call tch's fallible f_ methods (no panicking forms outside #[cfg(test)])",
        v,
    );

    // 4. Markdown links.
    let mut docs: Vec<String> = LINKED_DOCS.iter().map(|s| s.to_string()).collect();
    for m in &members {
        if root.join(m).join("README.md").exists() {
            docs.push(format!("{m}/README.md"));
        }
    }
    let mut v = Vec::new();
    for d in &docs {
        let text = read(d)?;
        v.extend(check_links(d, &text, &|target: &str| {
            let path = Path::new(d).parent().unwrap_or(Path::new("")).join(target);
            let full = root.join(&path);
            if !full.exists() {
                return None;
            }
            Some(std::fs::read_to_string(full).unwrap_or_default())
        }));
    }
    report(
        "relative Markdown links (and #anchors) in README.md, ARCHITECTURE.md, BENCHMARKS.md and crate READMEs resolve",
        v,
    );

    // 5. commands and flags named in README.md exist.
    let train_sources: Vec<&str> = sources
        .iter()
        .filter(|(p, _)| {
            TRAIN_CLI_CRATES
                .iter()
                .any(|c| p.starts_with(&format!("{c}/src/")))
                && p.ends_with(".rs")
        })
        .map(|(_, t)| t.as_str())
        .collect();
    let xtask_sources: Vec<&str> = sources
        .iter()
        .filter(|(p, _)| p.starts_with("xtask/src/") && p.ends_with(".rs"))
        .map(|(_, t)| t.as_str())
        .collect();
    let cli = CliNames {
        train_flags: clap_longs(&train_sources),
        train_commands: clap_subcommands(&train_sources),
        xtask_commands: clap_subcommands(&xtask_sources),
    };
    let v = check_cli_names("README.md", &read("README.md")?, &cli);
    report(
        "every `nsa-train <cmd> --flag` and `cargo xtask <cmd>` in README.md exists",
        v,
    );

    // 6. file length.
    let mut v = Vec::new();
    for (p, t) in &sources {
        v.extend(check_length(p, t));
    }
    report(
        &format!(
            "no source file over {MAX_LINES} lines outside the allowlist in xtask/src/tidy.rs"
        ),
        v,
    );
    // Not an error (a split may land on another branch first), but an entry to remove.
    for (p, _) in LONG_FILES {
        let under = sources
            .iter()
            .find(|(q, _)| q == p)
            .is_none_or(|(_, t)| t.lines().count() <= MAX_LINES);
        if under {
            println!("  note: {p} is allowlisted but not over {MAX_LINES} lines");
        }
    }

    if failed > 0 {
        bail!("tidy: {failed} rule(s) broken (see above)");
    }
    println!("tidy: all rules hold");
    Ok(())
}

/// Every file under `root`, skipping hidden folders and build or run outputs.
fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || ["target", "runs", "dist"].contains(&name.as_ref()) {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `members = [...]` of the workspace manifest.
fn workspace_members(manifest: &str) -> Vec<String> {
    let Some(start) = manifest.find("members") else {
        return Vec::new();
    };
    let rest = &manifest[start..];
    let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) else {
        return Vec::new();
    };
    rest[open + 1..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Rule 1 (code): `unsafe` and `extern "…"` / `extern {` only under nsa-sys/.
pub(crate) fn check_unsafe(path: &str, src: &str) -> Vec<Violation> {
    if path.starts_with("nsa-sys/") || !path.ends_with(".rs") {
        return Vec::new();
    }
    let mut v = Vec::new();
    for (n, line) in code_only(src).lines().enumerate() {
        if !word_positions(line, "unsafe").is_empty() {
            v.push(Violation::new(
                path,
                n + 1,
                "`unsafe` outside nsa-sys (all unsafe code lives in nsa-sys)",
            ));
        }
        for at in word_positions(line, "extern") {
            let rest = line[at + "extern".len()..].trim_start();
            if rest.starts_with('"') || rest.starts_with('{') {
                v.push(Violation::new(
                    path,
                    n + 1,
                    "`extern` block or ABI outside nsa-sys (FFI lives in nsa-sys)",
                ));
            }
        }
    }
    v
}

/// Rule 1 (lints): the workspace denies `unsafe_code`, every crate but nsa-sys inherits the
/// workspace lints, and every crate root but nsa-sys's forbids unsafe code outright.
pub(crate) fn check_unsafe_lints(
    workspace: &str,
    manifests: &[(String, String)],
    roots: &[(String, String)],
) -> Vec<Violation> {
    let mut v = Vec::new();
    let deny = workspace.lines().any(|l| {
        l.replace(' ', "") == "unsafe_code=\"deny\""
            || l.replace(' ', "") == "unsafe_code=\"forbid\""
    });
    if !workspace.contains("[workspace.lints.rust]") || !deny {
        v.push(Violation::new(
            "Cargo.toml",
            1,
            "[workspace.lints.rust] must set unsafe_code = \"deny\"",
        ));
    }
    for (path, text) in manifests {
        let inherits = text
            .split("[lints]")
            .nth(1)
            .and_then(|rest| rest.lines().map(str::trim).find(|l| !l.is_empty()))
            .is_some_and(|l| l.replace(' ', "") == "workspace=true");
        if !inherits {
            v.push(Violation::new(
                path,
                1,
                "needs `[lints] workspace = true` (the workspace denies unsafe_code)",
            ));
        }
    }
    for (path, text) in roots {
        if !code_only(text).contains("#![forbid(unsafe_code)]") {
            v.push(Violation::new(
                path,
                1,
                "crate root needs `#![forbid(unsafe_code)]`",
            ));
        }
    }
    v
}

/// Rule 2: environment reads. Library `src/` reads nothing; nsa-train's `src/` only in config.rs
/// and [`ENV_ALLOWLIST`]. Tests (`tests/`, `#[cfg(test)]`), examples, build.rs and xtask are
/// exempt; `env!` is compile time and fine.
pub(crate) fn check_env(path: &str, src: &str) -> Vec<Violation> {
    let library = LIBRARY_CRATES
        .iter()
        .chain(["nsa-sys"].iter())
        .any(|c| path.starts_with(&format!("{c}/src/")));
    let train = path.starts_with("nsa-train/src/");
    if !(library || train)
        || path == "nsa-train/src/config.rs"
        || ENV_ALLOWLIST.iter().any(|(p, _)| *p == path)
    {
        return Vec::new();
    }
    let why = if library {
        "environment read in a library (options are typed config fields; the binary reads the environment)"
    } else {
        "environment read outside nsa-train/src/config.rs (move it there, or add an entry with a reason to ENV_ALLOWLIST in xtask/src/tidy.rs)"
    };
    let mut v = Vec::new();
    for (n, line) in code_without_tests(src).lines().enumerate() {
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        let read = ["env::var(", "env::var_os(", "env::vars(", "env::vars_os("]
            .iter()
            .any(|p| compact.contains(p))
            || (compact.contains("usestd::env::") && compact.contains("var"));
        if read {
            v.push(Violation::new(path, n + 1, why));
        }
    }
    v
}

/// Rule 3: tch's panicking methods ([`PANICKING_TCH`]) and layer constructors
/// ([`PANICKING_TCH_LAYERS`]) in a library's or the trainer's `src/` (where a libtorch
/// failure should end a run with an error and its context, not a panic), outside
/// `#[cfg(test)]`, comments and strings. `.name(` and `Tensor::name(` are flagged, and
/// `nn::name(` or a `use` of `nn::name`.
pub(crate) fn check_panicking_tch(path: &str, src: &str) -> Vec<Violation> {
    if !LIBRARY_CRATES
        .iter()
        .chain(["nsa-train"].iter())
        .any(|c| path.starts_with(&format!("{c}/src/")))
    {
        return Vec::new();
    }
    let mut v = Vec::new();
    for (n, line) in code_without_tests(src).lines().enumerate() {
        for (name, needs_args) in PANICKING_TCH {
            for at in word_positions(line, name) {
                let before = line[..at].trim_end();
                let method = before.ends_with('.') || before.ends_with("Tensor::");
                let Some(args) = line[at + name.len()..].strip_prefix('(') else {
                    continue;
                };
                let empty = args.trim_start().starts_with(')');
                if method && !(*needs_args && empty) {
                    v.push(Violation::new(
                        path,
                        n + 1,
                        format!("`{name}(…)` panics on a libtorch error: use `f_{name}(…)?`"),
                    ));
                }
            }
        }
        let imports_nn = line.trim_start().starts_with("use ") && line.contains("nn::");
        for name in PANICKING_TCH_LAYERS {
            for at in word_positions(line, name) {
                let called = line[..at].trim_end().ends_with("nn::")
                    && line[at + name.len()..].starts_with('(');
                if called || imports_nn {
                    let instead = if *name == "linear" {
                        "nsa_attn::f_linear(…)?"
                    } else {
                        "variables from `nn::Path::f_var(…)?`"
                    };
                    v.push(Violation::new(
                        path,
                        n + 1,
                        format!("`nn::{name}(…)` panics on a libtorch error (tch creates its variables with an unwrap): use {instead}"),
                    ));
                }
            }
        }
    }
    v
}

/// The files of `#[cfg(test)] mod name;` declarations: test code, as inline `#[cfg(test)]`
/// items are (rules 2 and 3 skip them). `name` declared in `dir/file.rs` lives in
/// `dir/file/name.rs` (or `…/name/mod.rs`); declared in a `lib.rs`, `main.rs` or `mod.rs`, in
/// `dir/name.rs`.
pub(crate) fn test_module_files(sources: &[(String, String)]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (path, src) in sources.iter().filter(|(p, _)| p.ends_with(".rs")) {
        let code = code_only(src);
        let (dir, file) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        let base = match file {
            "lib.rs" | "main.rs" | "mod.rs" => format!("{dir}/"),
            other => format!("{dir}/{}/", other.trim_end_matches(".rs")),
        };
        for (at, _) in code.match_indices("#[cfg(test)]") {
            let rest = code[at + "#[cfg(test)]".len()..].trim_start();
            let Some(decl) = rest.strip_prefix("mod ") else {
                continue;
            };
            let name: String = decl
                .trim_start()
                .chars()
                .take_while(|&c| lex::is_ident(c))
                .collect();
            let after = decl.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with(';') {
                found.insert(format!("{base}{name}.rs"));
                found.insert(format!("{base}{name}/mod.rs"));
            }
        }
    }
    found
}

/// Rule 6: no source file over [`MAX_LINES`] lines unless listed in [`LONG_FILES`].
pub(crate) fn check_length(path: &str, src: &str) -> Vec<Violation> {
    let lines = src.lines().count();
    if lines > MAX_LINES && !LONG_FILES.iter().any(|(p, _)| *p == path) {
        vec![Violation::new(
            path,
            lines,
            format!("{lines} lines (limit {MAX_LINES}): split it, or add it with a reason to LONG_FILES in xtask/src/tidy.rs"),
        )]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests;
