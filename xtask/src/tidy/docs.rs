//! Rules on the Markdown docs: links resolve (rule 4), named commands and flags exist (rule 5).
use std::collections::BTreeSet;

use super::lex::{code_only, is_ident, word_positions};
use super::Violation;

/// GitHub's anchor of a Markdown heading's text.
pub(crate) fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Lines of a Markdown file outside fenced code blocks, with their 1-based numbers.
pub(crate) fn prose_lines(md: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (n, line) in md.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((n + 1, line));
        }
    }
    out
}

/// Anchors of every heading of a Markdown file.
pub(crate) fn anchors(md: &str) -> BTreeSet<String> {
    prose_lines(md)
        .into_iter()
        .filter_map(|(_, l)| l.strip_prefix('#'))
        .map(|h| anchor_of(h.trim_start_matches('#')))
        .collect()
}

/// `line` with inline code spans blanked (links inside code are not links).
pub(crate) fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut code = false;
    for ch in line.chars() {
        if ch == '`' {
            code = !code;
            out.push(ch);
        } else {
            out.push(if code { ' ' } else { ch });
        }
    }
    out
}

/// Rule 4: every relative link `[…](path)` / `[…](path#anchor)` / `[…](#anchor)` resolves.
/// `read` returns a target's text (relative to the document), or None if it does not exist.
pub(crate) fn check_links(
    path: &str,
    md: &str,
    read: &dyn Fn(&str) -> Option<String>,
) -> Vec<Violation> {
    let mut v = Vec::new();
    for (n, line) in prose_lines(md) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].trim();
            rest = &after[end..];
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target, None),
            };
            let text = if file.is_empty() {
                Some(md.to_string())
            } else {
                read(file)
            };
            match (text, anchor) {
                (None, _) => v.push(Violation::new(
                    path,
                    n,
                    format!("link to `{file}`: no such file"),
                )),
                (Some(t), Some(a))
                    if (file.is_empty() || file.ends_with(".md")) && !anchors(&t).contains(a) =>
                {
                    v.push(Violation::new(
                        path,
                        n,
                        format!("link to `{target}`: no heading with anchor `#{a}`"),
                    ))
                }
                _ => {}
            }
        }
    }
    v
}

/// Names clap accepts, gathered from sources.
#[derive(Debug, Default)]
pub(crate) struct CliNames {
    pub train_flags: BTreeSet<String>,
    pub train_commands: BTreeSet<String>,
    pub xtask_commands: BTreeSet<String>,
}

/// `--long` flags declared with `#[arg(long…)]` (the field name, `_` → `-`) or
/// `#[arg(long = "…")]`, plus clap's own `--help` and `--version`.
pub(crate) fn clap_longs(sources: &[&str]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = ["help", "version"].iter().map(|s| s.to_string()).collect();
    for src in sources {
        let code = code_only(src);
        let lines: Vec<&str> = code.lines().collect();
        let full: Vec<&str> = src.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with("#[arg(") || word_positions(t, "long").is_empty() {
                continue;
            }
            // The explicit name lives in a string, blanked in `code`: read it from the source.
            let raw = full.get(i).copied().unwrap_or("");
            if let Some(at) = raw.find("long = \"") {
                let name = &raw[at + "long = \"".len()..];
                if let Some(end) = name.find('"') {
                    out.insert(name[..end].to_string());
                    continue;
                }
            }
            let field = lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !l.starts_with("#["));
            if let Some(f) = field {
                let f = f.strip_prefix("pub ").unwrap_or(f);
                let f = f.strip_prefix("pub(crate) ").unwrap_or(f);
                if let Some((name, _)) = f.split_once(':') {
                    out.insert(name.trim().replace('_', "-"));
                }
            }
        }
    }
    out
}

/// Variants of `#[derive(…Subcommand)]` enums, in clap's kebab-case.
pub(crate) fn clap_subcommands(sources: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for src in sources {
        let code = code_only(src);
        let mut lines = code.lines();
        while let Some(line) = lines.next() {
            if !(line.contains("derive(") && line.contains("Subcommand")) {
                continue;
            }
            let mut depth = 0i32;
            let mut entered = false;
            for l in lines.by_ref() {
                let t = l.trim();
                if depth == 1 && !t.starts_with('#') {
                    let name: String = t.chars().take_while(|c| is_ident(*c)).collect();
                    if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                        out.insert(kebab(&name));
                    }
                }
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                entered |= depth > 0;
                if entered && depth <= 0 {
                    break;
                }
            }
        }
    }
    out
}

pub(crate) fn kebab(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// Code in a Markdown file: inline spans and fenced lines, with their line numbers.
pub(crate) fn code_in_markdown(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in md.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            // A shell comment is prose.
            out.push((n + 1, line.split(" #").next().unwrap_or("").to_string()));
        } else {
            for (k, span) in line.split('`').enumerate() {
                if k % 2 == 1 {
                    out.push((n + 1, span.to_string()));
                }
            }
        }
    }
    out
}

/// Rule 5: in code of `md`, the subcommand and every `--flag` after `nsa-train`, and the command
/// after `cargo xtask`, exist in the sources.
pub(crate) fn check_cli_names(path: &str, md: &str, cli: &CliNames) -> Vec<Violation> {
    let plain = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '-');
    let mut v = Vec::new();
    for (n, code) in code_in_markdown(md) {
        let words: Vec<&str> = code.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if *w == "nsa-train" {
                let after: Vec<&str> = words[i + 1..]
                    .iter()
                    .copied()
                    .filter(|w| *w != "--")
                    .collect();
                if let Some(cmd) = after.first().filter(|c| plain(c)) {
                    if !cli.train_commands.contains(*cmd) {
                        v.push(Violation::new(
                            path,
                            n,
                            format!("`nsa-train {cmd}`: no such subcommand"),
                        ));
                    }
                }
                for flag in after.iter().filter_map(|w| w.strip_prefix("--")) {
                    let flag = flag.split('=').next().unwrap_or("");
                    let flag = flag.trim_end_matches(|c: char| !c.is_alphanumeric());
                    if plain(flag) && !cli.train_flags.contains(flag) {
                        v.push(Violation::new(
                            path,
                            n,
                            format!("`--{flag}`: no nsa-train flag of that name"),
                        ));
                    }
                }
            }
            if *w == "cargo" && words.get(i + 1) == Some(&"xtask") {
                if let Some(cmd) = words.get(i + 2).filter(|c| plain(c)) {
                    if !cli.xtask_commands.contains(*cmd) {
                        v.push(Violation::new(
                            path,
                            n,
                            format!("`cargo xtask {cmd}`: no such command"),
                        ));
                    }
                }
            }
        }
    }
    v
}
