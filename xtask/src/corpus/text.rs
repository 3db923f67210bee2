//! The pure half of `cargo xtask corpus`: reStructuredText → plain text, document names and the
//! deterministic train/validation split. No I/O except [`build`], which reads a folder of
//! extracted sources and writes `train/` and `val/` — so the tests can run it on a fixture.
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

/// Directives whose body is not prose (code, tables of contents, includes, images, indices):
/// the directive and its indented block are dropped. Every other directive (`note`, `warning`,
/// Python's `function`/`class`/…) keeps its argument as a line and its body, dedented.
const DROPPED_DIRECTIVES: &[&str] = &[
    "toctree",
    "code-block",
    "code",
    "sourcecode",
    "literalinclude",
    "include",
    "kernel-doc",
    "kernel-abi",
    "kernel-feat",
    "kernel-include",
    "kernel-figure",
    "kernel-render",
    "image",
    "figure",
    "raw",
    "only",
    "ifconfig",
    "tabularcolumns",
    "flat-table",
    "list-table",
    "csv-table",
    "table",
    "index",
    "highlight",
    "doctest",
    "testcode",
    "testsetup",
    "testcleanup",
    "testoutput",
    "productionlist",
    "graphviz",
    "math",
    "cssclass",
    "sectionauthor",
    "moduleauthor",
    "codeauthor",
    "contents",
    "default-role",
    "role",
    "c:namespace",
    "c:namespace-push",
    "c:namespace-pop",
    "module",
    "currentmodule",
    "program",
    "audit-event",
    "impl-detail",
    "availability",
];

/// Indentation of a line, in characters (tabs count as 8, as docutils reads them).
fn indent(line: &str) -> usize {
    let mut n = 0;
    for c in line.chars() {
        match c {
            ' ' => n += 1,
            '\t' => n = (n / 8 + 1) * 8,
            _ => break,
        }
    }
    n
}

/// A section title's over- or underline: one punctuation character repeated (at least 3).
fn is_adornment(line: &str) -> bool {
    let t = line.trim_end();
    let mut chars = t.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    t.len() >= 3 && "=-~^\"'*+#:._`".contains(first) && chars.all(|c| c == first)
}

/// A grid table's border (`+----+----+`, `+====+`) or a simple table's (`=== ====`).
fn is_table_rule(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty()
        && (t.starts_with('+') || t.starts_with('='))
        && t.chars().all(|c| "+-=| ".contains(c))
}

/// Inline markup → its text: ``` :role:`text <target>` ``` → `text`, ``` ``literal`` ``` → `literal`,
/// `` `link <url>`_ `` → `link`, `**strong**`/`*emphasis*` → the words.
pub(crate) fn strip_inline(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // ``literal``
        if c == '`' && chars.get(i + 1) == Some(&'`') {
            if let Some(end) = find(&chars, i + 2, &['`', '`']) {
                out.extend(&chars[i + 2..end]);
                i = end + 2;
                continue;
            }
            out.push_str("``");
            i += 2;
            continue;
        }
        // :role:`text` (the role is dropped) and `text`_ / `text <url>`_ / `text`
        let role_end = if c == ':' { role_at(&chars, i) } else { None };
        let tick = match role_end {
            Some(e) => Some(e),
            None if c == '`' => Some(i),
            None => None,
        };
        if let Some(t) = tick {
            if let Some(end) = find(&chars, t + 1, &['`']) {
                let inner: String = chars[t + 1..end].iter().collect();
                out.push_str(&role_text(&inner));
                i = end + 1;
                // `text`_ and `text`__
                while chars.get(i) == Some(&'_') {
                    i += 1;
                }
                continue;
            }
        }
        // **strong** and *emphasis*: the asterisks go when they open a word and close one.
        if c == '*' {
            let n = if chars.get(i + 1) == Some(&'*') { 2 } else { 1 };
            let opens = chars
                .get(i + n)
                .is_some_and(|c| !c.is_whitespace() && *c != '*')
                && (i == 0 || !chars[i - 1].is_alphanumeric());
            if opens {
                let close = if n == 2 { vec!['*', '*'] } else { vec!['*'] };
                if let Some(end) = find(&chars, i + n, &close) {
                    if !chars[end - 1].is_whitespace() {
                        out.extend(&chars[i + n..end]);
                        i = end + n;
                        continue;
                    }
                }
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Where `pat` next starts in `chars` at or after `from`.
fn find(chars: &[char], from: usize, pat: &[char]) -> Option<usize> {
    (from..chars.len().saturating_sub(pat.len() - 1)).find(|&j| chars[j..j + pat.len()] == *pat)
}

/// At `:name:` or `:domain:name:` (letters, digits, `-`, `_`, `.`) directly followed by a
/// backtick, the backtick's index.
fn role_at(chars: &[char], i: usize) -> Option<usize> {
    if i > 0 && chars[i - 1].is_alphanumeric() {
        return None;
    }
    let name_char = |c: char| c.is_alphanumeric() || "-_.".contains(c);
    let mut j = i + 1;
    loop {
        let start = j;
        while j < chars.len() && name_char(chars[j]) {
            j += 1;
        }
        if j == start || chars.get(j) != Some(&':') {
            return None;
        }
        j += 1;
        match chars.get(j) {
            Some('`') => return Some(j),
            Some(&c) if name_char(c) => continue,
            _ => return None,
        }
    }
}

/// The text of a role or reference: `title <target>` → `title`, `~a.b.c` → `c`, `!x` → `x`.
fn role_text(inner: &str) -> String {
    let inner = inner.trim();
    if let (Some(open), true) = (inner.rfind(" <"), inner.ends_with('>')) {
        return inner[..open].trim().to_string();
    }
    let inner = inner.trim_start_matches('!');
    match inner.strip_prefix('~') {
        Some(path) => path.rsplit('.').next().unwrap_or(path).to_string(),
        None => inner.to_string(),
    }
}

/// The name of the directive on an explicit-markup line (`.. note::` → `note`), if it is one.
fn directive(rest: &str) -> Option<(&str, &str)> {
    let (name, arg) = rest.split_once("::")?;
    let name = name.trim();
    let ok = !name.is_empty()
        && !name.starts_with('|')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || "-_:".contains(c));
    ok.then_some((name, arg.trim()))
}

/// reStructuredText → plain text: section adornments, table borders, comments, targets,
/// substitution definitions and the directives in [`DROPPED_DIRECTIVES`] (with their blocks)
/// go; other directives leave their argument and dedented body; inline markup leaves its text
/// ([`strip_inline`]); a paragraph's closing `::` becomes `:`; runs of blank lines become one.
pub fn rst_to_text(rst: &str) -> String {
    let lines: Vec<&str> = rst.lines().collect();
    let mut out: Vec<String> = Vec::new();
    // The open explicit-markup block: the markup line's indentation, whether its block is
    // dropped, whether option lines may still follow, and its body's indentation once seen.
    let mut block: Option<(usize, bool, bool, Option<usize>)> = None;
    for line in lines {
        let blank = line.trim().is_empty();
        let ind = indent(line);
        if let Some((base, drop, options, body)) = block {
            if blank {
                block = Some((base, drop, false, body));
                if drop {
                    continue;
                }
            } else if ind > base {
                if drop {
                    continue;
                }
                // `:option: value` lines right under a directive are its options.
                let t = line.trim();
                if options && t.starts_with(':') && t[1..].contains(':') {
                    continue;
                }
                let body = body.unwrap_or(ind);
                block = Some((base, drop, false, Some(body)));
                push_text(&mut out, line.trim_start(), ind.saturating_sub(body));
                continue;
            } else {
                block = None;
            }
        }
        let t = line.trim_start();
        if let Some(rest) = t
            .strip_prefix("..")
            .filter(|r| r.is_empty() || r.starts_with(' '))
        {
            let keep = match directive(rest) {
                Some((name, arg)) if !DROPPED_DIRECTIVES.contains(&name) => {
                    if !arg.is_empty() {
                        push_text(&mut out, arg, 0);
                    }
                    true
                }
                // Comments, targets (`.. _x:`), substitutions, footnotes, dropped directives.
                _ => false,
            };
            block = Some((ind, !keep, true, None));
            continue;
        }
        if is_adornment(line) || is_table_rule(line) {
            continue;
        }
        if blank {
            out.push(String::new());
        } else {
            push_text(&mut out, line, 0);
        }
    }
    // One blank line between paragraphs, none at either end.
    let mut text = String::new();
    let mut blank_run = true;
    for l in out {
        if l.trim().is_empty() {
            if !blank_run {
                text.push('\n');
            }
            blank_run = true;
        } else {
            text.push_str(&l);
            text.push('\n');
            blank_run = false;
        }
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    text
}

/// One line of text (relative indentation kept) with inline markup stripped and a closing
/// `::` made `:` (`Example::` → `Example:`; a lone `::` line goes).
fn push_text(out: &mut Vec<String>, line: &str, extra_indent: usize) {
    let mut s = strip_inline(line.trim_end());
    if s.trim() == "::" {
        return;
    }
    if s.ends_with("::") {
        s.pop();
    }
    out.push(format!("{}{s}", " ".repeat(extra_indent)));
}

/// FNV-1a, 64 bits: a stable hash (std's `DefaultHasher` may change between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Which split a document goes to: validation when the hash of its name falls in the first
/// `val_permille` of 1000 buckets. A function of the name alone, so adding or removing other
/// documents never moves one.
pub fn is_validation(name: &str, val_permille: u32) -> bool {
    fnv1a(name.as_bytes()) % 1000 < u64::from(val_permille)
}

/// A document's output file name: the source path relative to its root, `/` → `--`, the
/// `.rst.txt`/`.txt`/`.rst` ending replaced by `.txt`, behind the package's short name.
pub fn doc_name(prefix: &str, rel: &Path) -> String {
    let rel = rel.to_string_lossy().replace('\\', "/");
    let stem = rel
        .strip_suffix(".rst.txt")
        .or_else(|| rel.strip_suffix(".txt"))
        .or_else(|| rel.strip_suffix(".rst"))
        .unwrap_or(&rel);
    format!("{prefix}--{}.txt", stem.replace('/', "--"))
}

/// One source of documents: a folder of reStructuredText files (`*.rst.txt`, `*.rst`, `*.txt`)
/// whose subfolders named in `skip` are left out.
#[derive(Debug, Clone)]
pub struct Source {
    /// Short name in the output file names.
    pub prefix: String,
    pub root: PathBuf,
    pub skip: Vec<String>,
}

/// Sizes of what [`build`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitSizes {
    pub train_files: usize,
    pub train_bytes: u64,
    pub val_files: usize,
    pub val_bytes: u64,
    /// Documents left out: under `min_bytes` of text once stripped.
    pub skipped: usize,
}

/// Every document file under `root` (sorted), skipping the subfolders in `skip`.
fn documents(root: &Path, skip: &[String]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let p = e?.path();
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            if skip
                .iter()
                .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if [".rst.txt", ".rst", ".txt"]
                .iter()
                .any(|e| rel.ends_with(e))
            {
                found.push(p);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Strips every document of `sources` to plain text and writes it to `out/train/NAME` or
/// `out/val/NAME` ([`is_validation`]); documents under `min_bytes` once stripped (stubs,
/// indices) are skipped. `out/train` and `out/val` must not exist yet.
pub fn build(
    sources: &[Source],
    out: &Path,
    val_permille: u32,
    min_bytes: usize,
) -> Result<SplitSizes> {
    ensure!(
        val_permille <= 1000,
        "the validation share is at most 1000 per mille"
    );
    let (train_dir, val_dir) = (out.join("train"), out.join("val"));
    for d in [&train_dir, &val_dir] {
        ensure!(!d.exists(), "{} exists already", d.display());
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut sizes = SplitSizes::default();
    for src in sources {
        for path in documents(&src.root, &src.skip)? {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let text = rst_to_text(&String::from_utf8_lossy(&bytes));
            if text.len() < min_bytes {
                sizes.skipped += 1;
                continue;
            }
            let name = doc_name(&src.prefix, path.strip_prefix(&src.root).unwrap_or(&path));
            let val = is_validation(&name, val_permille);
            let dir = if val { &val_dir } else { &train_dir };
            std::fs::write(dir.join(&name), &text)
                .with_context(|| format!("writing {}", dir.join(&name).display()))?;
            if val {
                sizes.val_files += 1;
                sizes.val_bytes += text.len() as u64;
            } else {
                sizes.train_files += 1;
                sizes.train_bytes += text.len() as u64;
            }
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests;
