//! Shell patterns for one path component, with the rules of Go's `path/filepath.Match`, which
//! Docker uses for COPY and ADD sources. `*` matches any run of characters and `?` one
//! character. `[...]` is a class (`[^...]` negated, `a-z` ranges), and `\` makes the next
//! character literal. Unlike a shell, `*` also matches a leading dot.

/// An invalid pattern, such as an unterminated `[` class or a trailing `\`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadPattern;

/// Returns whether `pattern` contains characters that make it a pattern rather than a name.
pub(crate) fn has_meta(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '\\'])
}

/// Reports whether the component `name` matches `pattern`; an invalid pattern is an error even
/// when the name would not match.
pub(crate) fn matches(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    validate(&pattern)?;
    Ok(match_from(&pattern, &name))
}

fn validate(pattern: &[char]) -> Result<(), BadPattern> {
    let mut index = 0;
    while index < pattern.len() {
        match pattern[index] {
            '[' => index += parse_class(&pattern[index..], None)?.1,
            '\\' if index + 1 == pattern.len() => return Err(BadPattern),
            '\\' => index += 2,
            _ => index += 1,
        }
    }
    Ok(())
}

fn match_from(pattern: &[char], name: &[char]) -> bool {
    let Some(&first) = pattern.first() else {
        return name.is_empty();
    };
    match first {
        '*' => (0..=name.len()).any(|skip| match_from(&pattern[1..], &name[skip..])),
        '?' => !name.is_empty() && match_from(&pattern[1..], &name[1..]),
        '[' => match name.first() {
            Some(&ch) => match parse_class(pattern, Some(ch)) {
                Ok((true, used)) => match_from(&pattern[used..], &name[1..]),
                _ => false,
            },
            None => false,
        },
        '\\' => name.first() == pattern.get(1) && match_from(&pattern[2..], &name[1..]),
        literal => name.first() == Some(&literal) && match_from(&pattern[1..], &name[1..]),
    }
}

/// Parses the class at the start of `pattern` (which begins with `[`) and returns whether `ch`
/// is in it and how many pattern characters the class used.
fn parse_class(pattern: &[char], ch: Option<char>) -> Result<(bool, usize), BadPattern> {
    let mut index = 1;
    let negated = pattern.get(index) == Some(&'^');
    if negated {
        index += 1;
    }

    let mut found = false;
    let mut ranges = 0;
    loop {
        if pattern.get(index) == Some(&']') && ranges > 0 {
            index += 1;
            break;
        }
        let low = class_char(pattern, &mut index)?;
        let mut high = low;
        if pattern.get(index) == Some(&'-') {
            index += 1;
            high = class_char(pattern, &mut index)?;
        }
        if ch.is_some_and(|ch| low <= ch && ch <= high) {
            found = true;
        }
        ranges += 1;
    }
    Ok((found != negated, index))
}

fn class_char(pattern: &[char], index: &mut usize) -> Result<char, BadPattern> {
    let mut ch = *pattern.get(*index).ok_or(BadPattern)?;
    if ch == '-' || ch == ']' {
        return Err(BadPattern);
    }
    if ch == '\\' {
        *index += 1;
        ch = *pattern.get(*index).ok_or(BadPattern)?;
    }
    *index += 1;
    if *index >= pattern.len() {
        // A class must be closed by `]` after its last character.
        return Err(BadPattern);
    }
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_go() {
        let cases = [
            ("*.txt", "a.txt", true),
            ("*.txt", ".hidden.txt", true),
            ("*.txt", "a.txt.bak", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("[^a-c]x", "dx", true),
            (r"\*", "*", true),
            (r"\*", "a", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern, name), Ok(expected), "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn glob_rejects_bad_patterns() {
        for pattern in ["[a", "[]", "a\\", "[a-]"] {
            assert_eq!(matches(pattern, "zzz"), Err(BadPattern), "{pattern:?}");
        }
    }

    #[test]
    fn glob_has_meta() {
        assert!(has_meta("src/*.rs"));
        assert!(has_meta("a[bc]"));
        assert!(!has_meta("plain/path.txt"));
    }
}
