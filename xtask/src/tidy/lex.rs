//! Finding code in Rust sources: comments, strings and `#[cfg(test)]` items blanked out, so
//! the rules match code only and line numbers still hold.

/// Rust source with comments, doc comments and the contents of string and char literals replaced
/// by spaces (newlines kept, so line numbers hold), for searching code only.
pub(crate) fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if ch == 'r'
            && (next == Some('"') || next == Some('#'))
            && !c[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
            && raw_string_hashes(&c[i + 1..]).is_some()
        {
            let hashes = raw_string_hashes(&c[i + 1..]).unwrap_or(0);
            out.push('r');
            out.extend(std::iter::repeat_n('#', hashes));
            out.push('"');
            i += 2 + hashes;
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while i < c.len() && !c[i..].starts_with(&close) {
                out.push(blank(c[i]));
                i += 1;
            }
            out.extend(close.iter());
            i += close.len();
        } else if ch == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    out.push(' ');
                    i += 1;
                }
                out.push(blank(c[i]));
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the first is blanked.
            let end = if next == Some('\\') {
                (i + 3..c.len().min(i + 12)).find(|&j| c[j] == '\'')
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.push('\'');
                    out.extend(std::iter::repeat_n(' ', e - i - 1));
                    out.push('\'');
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// Number of `#`s of a raw string starting after its `r`, if it is one.
pub(crate) fn raw_string_hashes(after_r: &[char]) -> Option<usize> {
    let n = after_r.iter().take_while(|&&ch| ch == '#').count();
    (after_r.get(n) == Some(&'"')).then_some(n)
}

/// [`code_only`] with every `#[cfg(test)]` item (a test module or function) blanked too.
pub(crate) fn code_without_tests(src: &str) -> String {
    let mut code: Vec<char> = code_only(src).chars().collect();
    let marker: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + marker.len() <= code.len() {
        if code[i..].starts_with(&marker) {
            // The item ends at its matching `}` (or at `;` for a braceless item).
            let mut j = i;
            let mut depth = 0usize;
            while j < code.len() {
                match code[j] {
                    '{' => depth += 1,
                    '}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            break;
                        }
                    }
                    ';' if depth == 0 => break,
                    _ => {}
                }
                j += 1;
            }
            let end = (j + 1).min(code.len());
            for ch in &mut code[i..end] {
                if *ch != '\n' {
                    *ch = ' ';
                }
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    code.into_iter().collect()
}

pub(crate) fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Byte offsets of `word` in `line` as a whole identifier.
pub(crate) fn word_positions(line: &str, word: &str) -> Vec<usize> {
    line.match_indices(word)
        .filter(|(at, _)| {
            let before = line[..*at].chars().next_back();
            let after = line[at + word.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
        .map(|(at, _)| at)
        .collect()
}
