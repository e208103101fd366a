//! Lexical handling of guest (Unix) paths, independent of the host's path rules.

/// Returns the shortest path equivalent to `path` by purely lexical processing, with Go's
/// `path.Clean` rules: repeated slashes collapse, `.` elements go, `..` removes the element
/// before it, `..` at the root stays the root, and an empty result is `.`.
pub(crate) fn clean(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }

    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Resolves `path` against the absolute directory `base` and cleans the result.
pub(crate) fn resolve(base: &str, path: &str) -> String {
    if path.starts_with('/') {
        clean(path)
    } else {
        clean(&format!("{base}/{path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_matches_go_rules() {
        let cases = [
            ("", "."),
            ("/", "/"),
            ("a/b/../c", "a/c"),
            ("/../a", "/a"),
            ("../a/..", ".."),
            ("./a//b/", "a/b"),
            ("/a/./b/.", "/a/b"),
        ];
        for (input, expected) in cases {
            assert_eq!(clean(input), expected, "clean({input:?})");
        }
    }

    #[test]
    fn resolve_relative_and_absolute() {
        assert_eq!(resolve("/app", "src"), "/app/src");
        assert_eq!(resolve("/app", "../etc"), "/etc");
        assert_eq!(resolve("/app", "/opt/x/"), "/opt/x");
    }
}
