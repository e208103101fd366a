//! Splitting Dockerfile text into logical lines: parser directives, comments, blank lines and
//! line continuations.

use std::sync::LazyLock;

use regex::Regex;

use crate::ParseError;

/// One instruction's text with continuations joined, and the line number (1-based) it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogicalLine {
    pub line: usize,
    pub text: String,
}

/// The logical lines of a Dockerfile and the escape character its directives chose.
#[derive(Debug)]
pub(crate) struct SplitText {
    pub lines: Vec<LogicalLine>,
    pub escape: char,
}

static DIRECTIVE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$").expect("valid regex"));

/// Frontend images that `# syntax=` may name: Docker's own Dockerfile frontend, any tag or digest.
static DOCKERFILE_FRONTEND: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(docker\.io/)?docker/dockerfile(-upstream)?(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?(@sha256:[0-9a-f]{64})?$")
        .expect("valid regex")
});

/// Splits `text` into logical lines.
///
/// Parser directives (`# escape=`, `# syntax=`, `# check=`) are read only from the top of the
/// file: the first line that is not a directive (an instruction, a blank line or another
/// comment) ends them. Comment lines are dropped, also inside a continued instruction, and
/// so are blank lines inside one.
pub(crate) fn split_lines(text: &str) -> Result<SplitText, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let physical: Vec<&str> = text.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line)).collect();

    let mut escape = '\\';
    let mut directives_done = false;
    let mut seen_directives: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    let mut index = 0;

    while index < physical.len() {
        let raw = physical[index];
        index += 1;
        let line_number = index;

        if !directives_done {
            match read_directive(raw, line_number, &mut seen_directives)? {
                Some(Directive::Escape(ch)) => {
                    escape = ch;
                    continue;
                }
                Some(Directive::Ignored) => continue,
                None => directives_done = true,
            }
        }

        let trimmed = raw.trim_start();
        let first = if trimmed.starts_with('#') { "" } else { trimmed };
        let (first, mut complete) = trim_continuation(first, escape);
        if complete && first.is_empty() {
            continue;
        }

        let mut joined = first.to_string();
        while !complete && index < physical.len() {
            let next = physical[index];
            index += 1;
            let next_trimmed = next.trim_start();
            if next_trimmed.starts_with('#') || next_trimmed.is_empty() {
                continue;
            }
            let (part, done) = trim_continuation(next, escape);
            joined.push_str(part);
            complete = done;
        }

        lines.push(LogicalLine { line: line_number, text: joined });
    }

    Ok(SplitText { lines, escape })
}

enum Directive {
    Escape(char),
    Ignored,
}

/// Reads a parser directive from `raw`, or returns `None` when the line is not one.
fn read_directive(raw: &str, line: usize, seen: &mut Vec<String>) -> Result<Option<Directive>, ParseError> {
    let Some(captures) = DIRECTIVE.captures(raw.trim_start()) else {
        return Ok(None);
    };
    let name = captures[1].to_ascii_lowercase();
    let value = captures[2].to_string();
    let error = |message: String| ParseError { line, instruction: format!("# {name}"), message };

    if !matches!(name.as_str(), "escape" | "syntax" | "check") {
        // An unknown directive name makes the line an ordinary comment, as in Docker.
        return Ok(None);
    }
    if seen.contains(&name) {
        return Err(error(format!("only one {name} parser directive can be used")));
    }
    seen.push(name.clone());

    match name.as_str() {
        "escape" => match value.as_str() {
            "\\" => Ok(Some(Directive::Escape('\\'))),
            "`" => Ok(Some(Directive::Escape('`'))),
            other => Err(error(format!("invalid escape character {other:?}: use \\ or `"))),
        },
        "syntax" if DOCKERFILE_FRONTEND.is_match(&value) => Ok(Some(Directive::Ignored)),
        "syntax" => Err(error(format!(
            "frontend {value:?} is not supported: Hearth parses Dockerfiles itself, so only \
             docker/dockerfile frontends may be named (or remove the directive)"
        ))),
        // `# check=` configures BuildKit's lint checks, which have no effect on the result.
        _ => Ok(Some(Directive::Ignored)),
    }
}

/// Removes a trailing escape character (followed only by spaces or tabs) and returns whether
/// the instruction ends on this line.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let without_blanks = line.trim_end_matches([' ', '\t']);
    match without_blanks.strip_suffix(escape) {
        Some(stripped) => (stripped, false),
        None => (line, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(input: &str) -> Vec<(usize, String)> {
        split_lines(input).unwrap().lines.into_iter().map(|l| (l.line, l.text)).collect()
    }

    #[test]
    fn split_joins_continuations_and_skips_comments() {
        let input = "# comment\nFROM a\n\nRUN echo a \\\n  # inside\n\n   b\nENV X=1\n";
        assert_eq!(
            texts(input),
            vec![(2, "FROM a".to_string()), (4, "RUN echo a    b".to_string()), (8, "ENV X=1".to_string())]
        );
    }

    #[test]
    fn split_handles_crlf_and_bom() {
        let input = "\u{feff}FROM a\r\nRUN x \\\r\n y\r\n";
        assert_eq!(texts(input), vec![(1, "FROM a".to_string()), (2, "RUN x  y".to_string())]);
    }

    #[test]
    fn escape_directive_changes_continuation() {
        let split = split_lines("# escape=`\nFROM a\nRUN dir c:\\ `\n  /b\n").unwrap();
        assert_eq!(split.escape, '`');
        assert_eq!(split.lines[1].text, "RUN dir c:\\   /b");
    }

    #[test]
    fn directive_after_comment_is_a_comment() {
        let split = split_lines("# hello\n# escape=`\nFROM a\n").unwrap();
        assert_eq!(split.escape, '\\');
    }

    #[test]
    fn duplicate_directive_is_rejected() {
        let err = split_lines("# escape=`\n# escape=\\\nFROM a\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("only one escape"));
    }

    #[test]
    fn syntax_directive_accepts_dockerfile_frontend_only() {
        for value in ["docker/dockerfile:1", "docker/dockerfile:1.7-labs", "docker.io/docker/dockerfile:1", "docker/dockerfile"] {
            assert!(split_lines(&format!("# syntax={value}\nFROM a\n")).is_ok(), "{value}");
        }
        let err = split_lines("# syntax=example.com/other/frontend:1\nFROM a\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert_eq!(err.instruction, "# syntax");
    }

    #[test]
    fn invalid_escape_directive_is_rejected() {
        let err = split_lines("# escape=x\nFROM a\n").unwrap_err();
        assert_eq!(err.to_string(), "line 1: # escape: invalid escape character \"x\": use \\ or `");
    }
}
