//! `.dockerignore` matching with Docker's rules (moby's `patternmatcher` package).
//!
//! Each non-comment line is a pattern, cleaned like a path and taken relative to the context
//! root. `*` and `?` do not cross `/`, `**` crosses any number of directories, `[...]` is a
//! character class and `\` escapes. A pattern that matches a directory also excludes everything
//! under it. A line starting with `!` is an exception that re-includes what it matches. The last
//! pattern that matches a path decides.

use std::path::{Component, Path};

use regex::Regex;

use crate::unix_path;

/// An invalid `.dockerignore` pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
pub struct IgnoreError {
    pub line: usize,
    pub pattern: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Pattern {
    regex: Regex,
    exception: bool,
}

/// Compiled `.dockerignore` rules.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

impl IgnoreMatcher {
    /// Parses `.dockerignore` text. An invalid pattern (an unterminated `[`, a lone `!`) is
    /// dropped with a warning; use [`IgnoreMatcher::try_parse`] to reject it instead.
    pub fn parse(text: &str) -> Self {
        let mut patterns = Vec::new();
        for (line, raw) in patterns_of(text) {
            match compile(&raw) {
                Ok(pattern) => patterns.push(pattern),
                Err(reason) => tracing::warn!(line, pattern = %raw, %reason, "ignoring invalid .dockerignore pattern"),
            }
        }
        Self { patterns }
    }

    /// Parses `.dockerignore` text, failing on the first invalid pattern.
    pub fn try_parse(text: &str) -> Result<Self, IgnoreError> {
        let mut patterns = Vec::new();
        for (line, raw) in patterns_of(text) {
            let pattern = compile(&raw).map_err(|reason| IgnoreError { line, pattern: raw.clone(), reason })?;
            patterns.push(pattern);
        }
        Ok(Self { patterns })
    }

    /// Reports whether `rel`, a path relative to the context root, is excluded from the
    /// context. The root itself (`""` or `.`) is never excluded.
    pub fn is_ignored(&self, rel: &Path) -> bool {
        let path = normalize(rel);
        if path == "." || self.patterns.is_empty() {
            return false;
        }

        let parents: Vec<&str> = match path.rsplit_once('/') {
            Some((parent, _)) => parent.split('/').collect(),
            None => Vec::new(),
        };
        let mut ignored = false;
        for pattern in &self.patterns {
            // An exclusion can only change an unmatched path and an exception a matched one.
            if pattern.exception != ignored {
                continue;
            }
            let mut matched = pattern.regex.is_match(&path);
            for depth in 1..=parents.len() {
                if matched {
                    break;
                }
                matched = pattern.regex.is_match(&parents[..depth].join("/"));
            }
            if matched {
                ignored = !pattern.exception;
            }
        }
        ignored
    }
}

/// Yields `(line number, pattern)` for each pattern line, `!` kept, with Docker's
/// normalisation: comments dropped, whitespace trimmed, the path cleaned, a leading `/` removed.
fn patterns_of(text: &str) -> Vec<(usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut patterns = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let exception = pattern.starts_with('!');
        if exception {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = unix_path::clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        if exception {
            cleaned.insert(0, '!');
        }
        patterns.push((index + 1, cleaned));
    }
    patterns
}

fn compile(raw: &str) -> Result<Pattern, String> {
    let (exception, body) = match raw.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    if exception && body.is_empty() {
        return Err("an exception (!) needs a pattern after it".into());
    }
    let source = regex_source(&unix_path::clean(body));
    let regex = Regex::new(&source).map_err(|err| err.to_string())?;
    Ok(Pattern { regex, exception })
}

/// Translates a pattern into an anchored regular expression.
fn regex_source(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut source = String::from("^");
    let mut index = 0;
    while index < chars.len() {
        let ch = chars[index];
        index += 1;
        match ch {
            '*' if chars.get(index) == Some(&'*') => {
                index += 1;
                // `**/` is the same as `**`.
                if chars.get(index) == Some(&'/') {
                    index += 1;
                }
                if index == chars.len() {
                    source.push_str(".*");
                } else {
                    source.push_str("(.*/)?");
                }
            }
            '*' => source.push_str("[^/]*"),
            '?' => source.push_str("[^/]"),
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                source.push('\\');
                source.push(ch);
            }
            '\\' => match chars.get(index) {
                Some(&next) => {
                    index += 1;
                    source.push_str(&regex::escape(&next.to_string()));
                }
                None => source.push_str("\\\\"),
            },
            other => source.push(other),
        }
    }
    source.push('$');
    source
}

/// Turns a relative path into the cleaned `/`-separated form patterns are matched against.
fn normalize(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .components()
        .filter_map(|component| match component {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    unix_path::clean(&parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignored(rules: &str, path: &str) -> bool {
        IgnoreMatcher::try_parse(rules).unwrap().is_ignored(Path::new(path))
    }

    #[test]
    fn ignore_plain_names_and_directories() {
        let rules = "# comment\nnode_modules\n/build/\n*.log\n";
        assert!(ignored(rules, "node_modules"));
        assert!(ignored(rules, "node_modules/pkg/index.js"));
        assert!(ignored(rules, "build/out.o"));
        assert!(ignored(rules, "debug.log"));
        assert!(!ignored(rules, "src/debug.log"), "* does not cross directories");
        assert!(!ignored(rules, "src/main.rs"));
        assert!(!ignored(rules, "# comment"));
    }

    #[test]
    fn ignore_double_star() {
        let rules = "**/*.pyc\ndocs/**\n";
        assert!(ignored(rules, "a.pyc"));
        assert!(ignored(rules, "pkg/sub/a.pyc"));
        assert!(ignored(rules, "docs/x/y.md"));
        assert!(!ignored(rules, "pkg/a.py"));
    }

    #[test]
    fn ignore_exceptions_last_match_wins() {
        let rules = "*.md\n!README.md\nREADME-secret.md\n";
        assert!(ignored(rules, "CHANGES.md"));
        assert!(!ignored(rules, "README.md"));
        assert!(ignored(rules, "README-secret.md"));
    }

    #[test]
    fn ignore_exception_inside_excluded_directory() {
        let rules = "vendor\n!vendor/keep.txt\n";
        assert!(ignored(rules, "vendor"));
        assert!(ignored(rules, "vendor/other.txt"));
        assert!(!ignored(rules, "vendor/keep.txt"));
    }

    #[test]
    fn ignore_cleans_patterns_and_paths() {
        let rules = "  ./a/../b/c  \n/leading\n";
        assert!(ignored(rules, "b/c"));
        assert!(ignored(rules, "./b/c/d"));
        assert!(ignored(rules, "leading"));
        assert!(!ignored(rules, "."));
    }

    #[test]
    fn ignore_character_classes_and_escapes() {
        let rules = "file[0-9].txt\nliteral\\*star\nq?.txt\n";
        assert!(ignored(rules, "file7.txt"));
        assert!(!ignored(rules, "filex.txt"));
        assert!(ignored(rules, "literal*star"));
        assert!(!ignored(rules, "literalXstar"));
        assert!(ignored(rules, "qa.txt"));
        assert!(!ignored(rules, "q/.txt"));
    }

    #[test]
    fn ignore_dots_are_literal() {
        assert!(!ignored("a.b\n", "aXb"));
        assert!(ignored("a.b\n", "a.b"));
    }

    #[test]
    fn ignore_invalid_pattern() {
        let err = IgnoreMatcher::try_parse("ok\n[unclosed\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(!IgnoreMatcher::parse("[unclosed\n").is_ignored(Path::new("x")));
        assert!(IgnoreMatcher::try_parse("!\n").is_err());
    }
}
