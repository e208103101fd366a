//! Word splitting, quote removal and variable substitution as Docker's Dockerfile frontend
//! (BuildKit) performs them.
//!
//! Three steps happen to an instruction's arguments, in this order:
//! 1. [`extract_flags`] takes the leading `--name=value` words off the line.
//! 2. [`split_words`] cuts the rest at unquoted whitespace, keeping quotes and escape characters
//!    in the words (ENV, LABEL and ARG use it to find `name=value` pairs).
//! 3. [`Expander::expand_word`] / [`Expander::expand_words`] substitute `$NAME`, `${NAME}` and
//!    `${NAME:-word}` forms and remove quotes and escapes, like a POSIX shell's word expansion
//!    but without command substitution, globbing or arithmetic.

use std::fmt;

/// An error from [`Expander`], such as an unterminated quote or a bad `${...}` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpandError(pub String);

impl fmt::Display for ExpandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `rest` at unquoted whitespace. Quotes and escape characters stay in the words, so
/// that a later [`Expander`] pass can interpret them. A single quote cannot be escaped inside
/// single quotes, as in a shell.
pub(crate) fn split_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    // A word that contained quotes is kept even when it is empty (`A=""`).
    let mut keep_empty = false;
    let mut quote: Option<char> = None;
    let mut in_word = false;
    let mut pos = 0;

    while pos < chars.len() {
        let ch = chars[pos];

        if !in_word {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            in_word = true;
        }

        match quote {
            None => {
                if ch.is_whitespace() {
                    if keep_empty || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    keep_empty = false;
                    in_word = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    keep_empty = true;
                }
                if ch == escape {
                    if pos + 1 == chars.len() {
                        // An escape character at the very end is dropped.
                        pos += 1;
                        continue;
                    }
                    // Outside quotes the escape character and the next character are kept
                    // together, even when that character is a quote.
                    word.push(ch);
                    pos += 1;
                    word.push(chars[pos]);
                    pos += 1;
                    continue;
                }
                word.push(ch);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                }
                if ch == escape && q != '\'' {
                    if pos + 1 == chars.len() {
                        quote = None;
                        pos += 1;
                        continue;
                    }
                    word.push(ch);
                    pos += 1;
                    word.push(chars[pos]);
                    pos += 1;
                    continue;
                }
                word.push(ch);
            }
        }
        pos += 1;
    }

    if in_word && (keep_empty || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Takes the leading `--flag` words off an instruction's arguments and returns the rest of the
/// line with the flags. Flag words may contain quotes (`--chown="a b"`), which are removed here.
/// A bare `--` ends the flags.
pub(crate) fn extract_flags(line: &str) -> (String, Vec<String>) {
    let chars: Vec<char> = line.chars().collect();
    let mut flags = Vec::new();
    let mut word = String::new();
    let mut keep_empty = false;
    let mut quote: Option<char> = None;
    let mut in_word = false;
    let mut pos = 0;

    while pos < chars.len() {
        let ch = chars[pos];

        if !in_word {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            let starts_flag = ch == '-' && chars.get(pos + 1) == Some(&'-');
            if !starts_flag {
                return (chars[pos..].iter().collect(), flags);
            }
            in_word = true;
        }

        match quote {
            None => {
                if ch.is_whitespace() {
                    in_word = false;
                    if word == "--" {
                        return (chars[pos..].iter().collect(), flags);
                    }
                    if keep_empty || !word.is_empty() {
                        flags.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    keep_empty = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    keep_empty = true;
                    pos += 1;
                    continue;
                }
                if ch == '\\' {
                    pos += 1;
                    if let Some(&next) = chars.get(pos) {
                        word.push(next);
                    }
                    pos += 1;
                    continue;
                }
                word.push(ch);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                    pos += 1;
                    continue;
                }
                if ch == '\\' {
                    pos += 1;
                    match chars.get(pos) {
                        Some(&next) => word.push(next),
                        None => quote = None,
                    }
                    pos += 1;
                    continue;
                }
                word.push(ch);
            }
        }
        pos += 1;
    }

    if in_word && word != "--" && (keep_empty || !word.is_empty()) {
        flags.push(word);
    }
    (String::new(), flags)
}

/// Words collected while expanding, for [`Expander::expand_words`]: unquoted whitespace, also
/// whitespace produced by a variable's value, separates words; quoted text never does.
#[derive(Default)]
struct WordCollector {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl WordCollector {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_str(&mut self, text: &str) {
        for ch in text.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_str(&mut self, text: &str) {
        self.word.push_str(text);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

/// Variable substitution and quote removal with a fixed set of variables.
pub(crate) struct Expander<'a> {
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Expander<'a> {
    /// Creates an expander that reads variables through `lookup` (`None` means unset).
    pub(crate) fn new(escape: char, lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { escape, lookup }
    }

    /// Expands `word` into one string; whitespace, quoted or not, is kept as written.
    pub(crate) fn expand_word(&self, word: &str) -> Result<String, ExpandError> {
        self.run(word).map(|(text, _)| text)
    }

    /// Expands `word` and splits the result at unquoted whitespace.
    pub(crate) fn expand_words(&self, word: &str) -> Result<Vec<String>, ExpandError> {
        self.run(word).map(|(_, words)| words)
    }

    fn run(&self, word: &str) -> Result<(String, Vec<String>), ExpandError> {
        let mut scan = Scan { chars: word.chars().collect(), pos: 0 };
        self.process_until(&mut scan, None)
            .map_err(|err| ExpandError(format!("failed to process {word:?}: {err}")))
    }

    /// Processes characters until `stop` (consumed) or the end of input when `stop` is `None`.
    fn process_until(&self, scan: &mut Scan, stop: Option<char>) -> Result<(String, Vec<String>), ExpandError> {
        let mut result = String::new();
        let mut words = WordCollector::default();

        while let Some(ch) = scan.peek() {
            if Some(ch) == stop {
                scan.next();
                return Ok((result, words.finish()));
            }
            match ch {
                '\'' => {
                    let text = self.single_quoted(scan)?;
                    result.push_str(&text);
                    words.add_raw_str(&text);
                }
                '"' => {
                    let text = self.double_quoted(scan)?;
                    result.push_str(&text);
                    words.add_raw_str(&text);
                }
                '$' => {
                    let text = self.dollar(scan)?;
                    result.push_str(&text);
                    words.add_str(&text);
                }
                _ => {
                    scan.next();
                    if ch == self.escape {
                        // The escape character makes the next character literal and is
                        // dropped; at the end of the word it is dropped alone.
                        let Some(escaped) = scan.next() else { break };
                        words.add_raw_char(escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }

        if let Some(stop) = stop {
            return Err(ExpandError(format!("unexpected end of statement while looking for matching {stop}")));
        }
        Ok((result, words.finish()))
    }

    /// Everything between single quotes is literal, and a single quote cannot be escaped.
    fn single_quoted(&self, scan: &mut Scan) -> Result<String, ExpandError> {
        scan.next();
        let mut text = String::new();
        loop {
            match scan.next() {
                None => {
                    return Err(ExpandError(
                        "unexpected end of statement while looking for matching single-quote".into(),
                    ))
                }
                Some('\'') => return Ok(text),
                Some(ch) => text.push(ch),
            }
        }
    }

    /// Inside double quotes `$` still substitutes, and the escape character escapes only `"`,
    /// `$` and itself; before any other character it stays literal.
    fn double_quoted(&self, scan: &mut Scan) -> Result<String, ExpandError> {
        scan.next();
        let mut text = String::new();
        loop {
            match scan.peek() {
                None => {
                    return Err(ExpandError(
                        "unexpected end of statement while looking for matching double-quote".into(),
                    ))
                }
                Some('"') => {
                    scan.next();
                    return Ok(text);
                }
                Some('$') => text.push_str(&self.dollar(scan)?),
                Some(_) => {
                    let mut ch = scan.next().unwrap_or_default();
                    if ch == self.escape {
                        match scan.peek() {
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == self.escape => {
                                ch = next;
                                scan.next();
                            }
                            Some(_) => {}
                        }
                    }
                    text.push(ch);
                }
            }
        }
    }

    fn dollar(&self, scan: &mut Scan) -> Result<String, ExpandError> {
        scan.next();

        if scan.peek() != Some('{') {
            let name = scan.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok((self.lookup)(&name).unwrap_or_default());
        }

        scan.next();
        match scan.peek() {
            None => return Err(ExpandError("syntax error: missing '}'".into())),
            Some('{' | '}' | ':') => return Err(ExpandError("syntax error: bad substitution".into())),
            Some(_) => {}
        }
        let name = scan.name();
        let value = (self.lookup)(&name);

        match scan.next() {
            Some('}') => Ok(value.unwrap_or_default()),
            Some(':') => {
                let modifier = scan.next();
                let word = self.modifier_word(scan)?;
                let empty = value.as_deref().is_none_or(str::is_empty);
                match modifier {
                    Some('-') => Ok(if empty { word } else { value.unwrap_or_default() }),
                    Some('+') => Ok(if empty { String::new() } else { word }),
                    Some('?') if value.is_none() => Err(unset_error(&name, &word, "is not allowed to be unset")),
                    Some('?') if empty => Err(unset_error(&name, &word, "is not allowed to be empty")),
                    Some('?') => Ok(value.unwrap_or_default()),
                    other => Err(unsupported_modifier(other)),
                }
            }
            Some('-') => {
                let word = self.modifier_word(scan)?;
                Ok(value.unwrap_or(word))
            }
            Some('+') => {
                let word = self.modifier_word(scan)?;
                Ok(if value.is_some() { word } else { String::new() })
            }
            Some('?') => {
                let word = self.modifier_word(scan)?;
                value.ok_or_else(|| unset_error(&name, &word, "is not allowed to be unset"))
            }
            // NOTE: BuildKit also supports `${NAME#pattern}`, `${NAME%pattern}` and
            // `${NAME/pattern/replacement}`; they are rejected here rather than misread.
            Some(other @ ('#' | '%' | '/')) => Err(unsupported_modifier(Some(other))),
            None => Err(ExpandError("syntax error: missing '}'".into())),
            Some(_) => Err(ExpandError(format!("missing ':' in substitution of {name:?}"))),
        }
    }

    /// Reads the `word` of `${NAME:-word}` up to the closing brace, expanding it recursively.
    fn modifier_word(&self, scan: &mut Scan) -> Result<String, ExpandError> {
        match self.process_until(scan, Some('}')) {
            Ok((word, _)) => Ok(word),
            Err(_) if scan.peek().is_none() => Err(ExpandError("syntax error: missing '}'".into())),
            Err(err) => Err(err),
        }
    }
}

fn unset_error(name: &str, word: &str, default_message: &str) -> ExpandError {
    let message = if word.is_empty() { default_message } else { word };
    ExpandError(format!("{name}: {message}"))
}

fn unsupported_modifier(modifier: Option<char>) -> ExpandError {
    let modifier_text = modifier.map(String::from).unwrap_or_default();
    ExpandError(format!("unsupported modifier ({modifier_text}) in substitution"))
}

struct Scan {
    chars: Vec<char>,
    pos: usize,
}

impl Scan {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    /// Reads a variable name: letters, digits and `_`; a run of digits (positional parameter);
    /// or one shell special parameter character.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                while let Some(digit) = self.peek().filter(char::is_ascii_digit) {
                    name.push(digit);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!') {
                self.pos += 1;
                return ch.to_string();
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.pos += 1;
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("A".to_string(), "alpha".to_string()),
            ("SPACED".to_string(), "x  y".to_string()),
            ("EMPTY".to_string(), String::new()),
        ])
    }

    fn expand(word: &str) -> Result<String, ExpandError> {
        let vars = vars();
        let lookup = |name: &str| vars.get(name).cloned();
        Expander::new('\\', &lookup).expand_word(word)
    }

    fn expand_words(word: &str) -> Vec<String> {
        let vars = vars();
        let lookup = |name: &str| vars.get(name).cloned();
        Expander::new('\\', &lookup).expand_words(word).unwrap()
    }

    #[test]
    fn split_words_keeps_quotes_and_escapes() {
        let words = split_words(r#"a="x y" b=c\ d e='q " r' f="""#, '\\');
        assert_eq!(words, vec![r#"a="x y""#, r"b=c\ d", r#"e='q " r'"#, r#"f="""#]);
    }

    #[test]
    fn split_words_backtick_escape() {
        assert_eq!(split_words("a=x` y b", '`'), vec!["a=x` y", "b"]);
    }

    #[test]
    fn extract_flags_stops_at_first_argument() {
        let (rest, flags) = extract_flags("--from=build --chown=\"a b\"  src --not-a-flag /dst");
        assert_eq!(flags, vec!["--from=build", "--chown=a b"]);
        assert_eq!(rest, "src --not-a-flag /dst");
    }

    #[test]
    fn extract_flags_double_dash_ends_flags() {
        let (rest, flags) = extract_flags("--link -- --weird-name /dst");
        assert_eq!(flags, vec!["--link"]);
        assert_eq!(rest, " --weird-name /dst");
    }

    #[test]
    fn expand_variable_forms() {
        assert_eq!(expand("$A").unwrap(), "alpha");
        assert_eq!(expand("${A}-x").unwrap(), "alpha-x");
        assert_eq!(expand("${MISSING:-fallback}").unwrap(), "fallback");
        assert_eq!(expand("${EMPTY:-fallback}").unwrap(), "fallback");
        assert_eq!(expand("${EMPTY-fallback}").unwrap(), "");
        assert_eq!(expand("${A:+set}").unwrap(), "set");
        assert_eq!(expand("${MISSING:+set}").unwrap(), "");
        assert_eq!(expand("${MISSING:-${A}}").unwrap(), "alpha");
        assert_eq!(expand("$MISSING").unwrap(), "");
    }

    #[test]
    fn expand_escaped_dollar_is_literal() {
        assert_eq!(expand(r"\$A").unwrap(), "$A");
        assert_eq!(expand(r#""\$A""#).unwrap(), "$A");
    }

    #[test]
    fn expand_command_substitution_stays_literal() {
        assert_eq!(expand("$(rm -rf /)").unwrap(), "$(rm -rf /)");
        assert_eq!(expand("`id`").unwrap(), "`id`");
    }

    #[test]
    fn expand_quotes() {
        assert_eq!(expand(r#""a \"b\" \n c""#).unwrap(), r#"a "b" \n c"#);
        assert_eq!(expand(r"'single $A \n'").unwrap(), r"single $A \n");
        assert_eq!(expand(r"a\ b\\c\n").unwrap(), r"a b\cn");
        assert_eq!(expand(r#""$A's""#).unwrap(), "alpha's");
    }

    #[test]
    fn expand_errors() {
        assert!(expand("\"open").unwrap_err().0.contains("double-quote"));
        assert!(expand("'open").unwrap_err().0.contains("single-quote"));
        assert!(expand("${A").unwrap_err().0.contains("missing '}'"));
        assert!(expand("${}").unwrap_err().0.contains("bad substitution"));
        assert!(expand("${MISSING:?must be set}").unwrap_err().0.contains("MISSING: must be set"));
        assert!(expand("${A#x}").unwrap_err().0.contains("unsupported modifier"));
    }

    #[test]
    fn expand_words_splits_unquoted_values() {
        assert_eq!(expand_words("$SPACED \"q  r\" s"), vec!["x", "y", "q  r", "s"]);
        assert_eq!(expand("$SPACED").unwrap(), "x  y");
    }
}
