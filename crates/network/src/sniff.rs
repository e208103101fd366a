//! Domain patterns for egress rules, and reading the host name a TCP client asks for from
//! the first bytes it sends: the server name (SNI) of a TLS ClientHello or the `Host`
//! header of an HTTP/1.x request.
//!
//! Pure parsing without I/O. [`crate::domain_proxy`] feeds it a connection's first bytes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Maximum number of bytes read from a connection to find its host name: the maximum
/// size of an HTTP request head, and a bound on how much of a ClientHello is buffered.
pub const MAX_SNIFF_LEN: usize = 16 * 1024;

/// Maximum length of a domain name in text form, without a trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;

/// Maximum length of one label of a domain name (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// A domain name, or a wildcard `*.` followed by a domain name, that egress rules allow.
///
/// `example.com` matches only `example.com`. `*.example.com` matches every subdomain at any
/// depth (`a.example.com`, `a.b.example.com`) but not `example.com` itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// Lowercase domain name without a trailing dot; after `*.` for a wildcard pattern.
    name: String,
    wildcard: bool,
}

/// Error from parsing a [`DomainPattern`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainPatternError {
    #[error("invalid domain: the name is empty")]
    Empty,

    #[error("invalid domain `*`: a wildcard needs a domain after it, as in `*.example.com`")]
    BareWildcard,

    #[error(
        "invalid domain `{0}`: `*` is allowed only as the whole first label, as in `*.example.com`"
    )]
    MisplacedWildcard(String),

    #[error("invalid domain `{0}`: it contains non-ASCII characters; write internationalized names in punycode (`xn--...`)")]
    NonAscii(String),

    #[error("invalid domain `{0}`: it is an IP address; write IP addresses and CIDR ranges as such, not as domains")]
    IpAddress(String),

    #[error(
        "invalid domain `{name}`: it is {length} characters long, the maximum is {MAX_NAME_LEN}"
    )]
    NameTooLong { name: String, length: usize },

    #[error(
        "invalid domain `{0}`: it contains an empty label (two dots in a row, or a leading dot)"
    )]
    EmptyLabel(String),

    #[error("invalid domain `{name}`: label `{label}` is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong { name: String, label: String },

    #[error("invalid domain `{name}`: character `{character}` is not allowed; use letters, digits, `-` and `_`")]
    InvalidCharacter { name: String, character: char },
}

impl DomainPattern {
    /// Returns whether `host` is allowed by this pattern. The comparison ignores case and
    /// one trailing dot of `host`.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.name);
        }

        // `host` must be `<one or more labels>.<name>`.
        let Some(prefix_len) = host.len().checked_sub(self.name.len() + 1) else {
            return false;
        };
        prefix_len > 0
            && host.is_char_boundary(prefix_len)
            && host[prefix_len..].starts_with('.')
            && host[prefix_len + 1..].eq_ignore_ascii_case(&self.name)
    }
}

impl FromStr for DomainPattern {
    type Err = DomainPatternError;

    /// Parses `example.com` or `*.example.com`, lowercased, with one trailing dot removed.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.strip_suffix('.').unwrap_or(input);
        if text.is_empty() {
            return Err(DomainPatternError::Empty);
        }
        if text == "*" {
            return Err(DomainPatternError::BareWildcard);
        }
        if !text.is_ascii() {
            return Err(DomainPatternError::NonAscii(input.to_owned()));
        }
        if text.parse::<IpAddr>().is_ok() {
            return Err(DomainPatternError::IpAddress(input.to_owned()));
        }
        if text.len() > MAX_NAME_LEN {
            return Err(DomainPatternError::NameTooLong {
                name: input.to_owned(),
                length: text.len(),
            });
        }

        let text = text.to_ascii_lowercase();
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, text.as_str()),
        };
        if name.contains('*') {
            return Err(DomainPatternError::MisplacedWildcard(input.to_owned()));
        }
        check_labels(input, name)?;

        Ok(Self {
            name: name.to_owned(),
            wildcard,
        })
    }
}

/// Checks each label of the lowercase `name`. Errors quote `input`, the text the user wrote.
fn check_labels(input: &str, name: &str) -> Result<(), DomainPatternError> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err(DomainPatternError::EmptyLabel(input.to_owned()));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(DomainPatternError::LabelTooLong {
                name: input.to_owned(),
                label: label.to_owned(),
            });
        }
        let invalid = label
            .chars()
            .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'));
        if let Some(character) = invalid {
            return Err(DomainPatternError::InvalidCharacter {
                name: input.to_owned(),
                character,
            });
        }
    }

    // No top-level domain is numeric, and a name whose last label is numeric, such as `10.1`
    // or `*.1.2.3.4`, reads as an IPv4 address to the WHATWG URL host parser and `inet_aton`.
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DomainPatternError::IpAddress(input.to_owned()));
    }
    Ok(())
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// Returns whether an egress entry that did not parse as an IP address or CIDR range is
/// meant as a domain, so its parse error is the one to show. Entries made only of digits,
/// dots, `/` and `:` (such as `10.0.0.0/33` or `fe80::1/200`) are meant as IP addresses.
pub fn is_domain_like(entry: &str) -> bool {
    let ipv4_like = entry
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '/'));
    let ipv6_like = entry.contains(':')
        && entry
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | '/' | ':'));
    !(ipv4_like || ipv6_like)
}

/// Outcome of reading the first bytes of a TCP connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// Host name the client asks for: the TLS server name, or the HTTP `Host` header
    /// without its port. As sent, so not necessarily lowercase.
    Host(String),
    /// The bytes are an incomplete TLS ClientHello or HTTP request head.
    NeedMore,
    /// The bytes are neither, are malformed, or name no host (a ClientHello without a
    /// server name, an HTTP request without exactly one `Host` header).
    Unknown,
}

/// Reads the host name from the first bytes a client sent on a TCP connection.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(&TLS_HANDSHAKE) => sniff_tls(buf),
        Some(_) => sniff_http(buf),
    }
}

/// Returns whether `host` is safe to use and log as a host name: non-empty, printable
/// ASCII without spaces, and not longer than a domain name can be.
fn is_valid_host(host: &[u8]) -> bool {
    !host.is_empty() && host.len() <= MAX_NAME_LEN + 1 && host.iter().all(u8::is_ascii_graphic)
}

fn host_string(host: &[u8]) -> Option<String> {
    is_valid_host(host).then(|| String::from_utf8_lossy(host).into_owned())
}

// TLS (RFC 8446 sections 4 and 5.1, RFC 6066 section 3).

/// Content type of a TLS record that carries handshake messages.
const TLS_HANDSHAKE: u8 = 22;

/// Handshake message type of a ClientHello.
const TLS_CLIENT_HELLO: u8 = 1;

/// Extension type of `server_name`.
const TLS_SERVER_NAME: u16 = 0;

/// Name type of a DNS host name in the `server_name` extension.
const TLS_HOST_NAME: u8 = 0;

/// Length of a TLS record header: content type, legacy version, length.
const TLS_RECORD_HEADER_LEN: usize = 5;

/// Maximum length of a plaintext TLS record's content.
const TLS_MAX_RECORD_LEN: usize = 1 << 14;

/// Length of a handshake message header: message type, 24-bit length.
const TLS_HANDSHAKE_HEADER_LEN: usize = 4;

fn sniff_tls(buf: &[u8]) -> Sniffed {
    let message = match join_handshake_records(buf) {
        Ok(message) => message,
        Err(error) => return error.into(),
    };
    if message.len() < TLS_HANDSHAKE_HEADER_LEN {
        return Sniffed::NeedMore;
    }
    if message[0] != TLS_CLIENT_HELLO {
        return Sniffed::Unknown;
    }

    let length =
        usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
    let body = &message[TLS_HANDSHAKE_HEADER_LEN..];
    let complete = body.len() >= length;
    match client_hello_server_name(&body[..body.len().min(length)]) {
        Ok(Some(host)) => host_string(host).map_or(Sniffed::Unknown, Sniffed::Host),
        Ok(None) => Sniffed::Unknown,
        // Inside a complete message, running out of bytes means a length field is wrong.
        Err(ParseError::Truncated) if !complete => Sniffed::NeedMore,
        Err(_) => Sniffed::Unknown,
    }
}

/// Concatenates the contents of the handshake records at the start of `buf`, including the
/// received part of a record that is still incomplete, until the first handshake message
/// is complete. A ClientHello may be split over several records (RFC 8446 section 5.1).
fn join_handshake_records(mut buf: &[u8]) -> Result<Vec<u8>, ParseError> {
    let mut message = Vec::new();
    while !buf.is_empty() {
        let header = &buf[..buf.len().min(TLS_RECORD_HEADER_LEN)];
        // Every TLS version since SSL 3.0 writes 3 as the major version.
        if header[0] != TLS_HANDSHAKE || header.get(1).is_some_and(|&major| major != 3) {
            return Err(ParseError::Invalid);
        }
        if header.len() < TLS_RECORD_HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > TLS_MAX_RECORD_LEN {
            return Err(ParseError::Invalid);
        }

        let content = &buf[TLS_RECORD_HEADER_LEN..];
        let received = content.len().min(length);
        message.extend_from_slice(&content[..received]);
        if received < length || handshake_message_complete(&message) {
            break;
        }
        buf = &content[length..];
    }
    Ok(message)
}

fn handshake_message_complete(message: &[u8]) -> bool {
    match message {
        [_, a, b, c, body @ ..] => {
            body.len() >= usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c)
        }
        _ => false,
    }
}

/// Returns the host name in the `server_name` extension of a ClientHello message body,
/// `None` when the ClientHello has no such extension or no host name in it.
fn client_hello_server_name(body: &[u8]) -> Result<Option<&[u8]>, ParseError> {
    let mut hello = Reader::new(body);
    let _legacy_version = hello.take(2)?;
    let _random = hello.take(32)?;
    let session_id = hello.u8_prefixed()?;
    let cipher_suites = hello.u16_prefixed()?;
    let compression_methods = hello.u8_prefixed()?;
    if session_id.len() > 32
        || cipher_suites.is_empty()
        || cipher_suites.len() % 2 != 0
        || compression_methods.is_empty()
    {
        return Err(ParseError::Invalid);
    }

    // A ClientHello without extensions ends here. Before the whole message has arrived,
    // this reads as truncated and the caller waits for more.
    let mut extensions = Reader::new(hello.u16_prefixed()?);
    while !extensions.is_empty() {
        let extension_type = extensions.u16()?;
        let data = extensions.u16_prefixed()?;
        if extension_type == TLS_SERVER_NAME {
            return server_name_host(data);
        }
    }
    Ok(None)
}

fn server_name_host(data: &[u8]) -> Result<Option<&[u8]>, ParseError> {
    let mut extension = Reader::new(data);
    let mut names = Reader::new(extension.u16_prefixed()?);
    while !names.is_empty() {
        let name_type = names.u8()?;
        let name = names.u16_prefixed()?;
        if name_type == TLS_HOST_NAME {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Reason a TLS structure could not be read.
#[derive(Debug)]
enum ParseError {
    /// The bytes end before the structure does.
    Truncated,
    /// The bytes are not a valid structure.
    Invalid,
}

impl From<ParseError> for Sniffed {
    fn from(error: ParseError) -> Self {
        match error {
            ParseError::Truncated => Sniffed::NeedMore,
            ParseError::Invalid => Sniffed::Unknown,
        }
    }
}

/// Bounds-checked reader of big-endian TLS fields.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, length: usize) -> Result<&'a [u8], ParseError> {
        if self.rest.len() < length {
            return Err(ParseError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// Reads a vector with a one-byte length prefix.
    fn u8_prefixed(&mut self) -> Result<&'a [u8], ParseError> {
        let length = self.u8()?;
        self.take(usize::from(length))
    }

    /// Reads a vector with a two-byte length prefix.
    fn u16_prefixed(&mut self) -> Result<&'a [u8], ParseError> {
        let length = self.u16()?;
        self.take(usize::from(length))
    }
}

// HTTP/1.x (RFC 9112 sections 2 to 5).

/// Request methods recognized as the start of an HTTP request (RFC 9110 section 9, and
/// PATCH from RFC 5789).
const HTTP_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

fn sniff_http(buf: &[u8]) -> Sniffed {
    if !starts_with_method(buf) {
        return if is_method_prefix(buf) {
            Sniffed::NeedMore
        } else {
            Sniffed::Unknown
        };
    }

    let Some(head_len) = find_head_end(buf) else {
        let request_line_ok = match buf.iter().position(|&b| b == b'\n') {
            Some(end) => is_request_line(trim_cr(&buf[..end])),
            None => true,
        };
        return if request_line_ok && buf.len() < MAX_SNIFF_LEN {
            Sniffed::NeedMore
        } else {
            Sniffed::Unknown
        };
    };
    if head_len > MAX_SNIFF_LEN {
        return Sniffed::Unknown;
    }

    // The head without the newline that ends its last header line.
    let head = &buf[..head_len - 1];
    let mut lines = head.split(|&b| b == b'\n').map(trim_cr);
    if !lines.next().is_some_and(is_request_line) {
        return Sniffed::Unknown;
    }
    match single_host_header(lines) {
        Some(value) => strip_port(value)
            .and_then(host_string)
            .map_or(Sniffed::Unknown, Sniffed::Host),
        None => Sniffed::Unknown,
    }
}

fn starts_with_method(buf: &[u8]) -> bool {
    HTTP_METHODS.iter().any(|method| {
        buf.len() > method.len() && buf.starts_with(method) && buf[method.len()] == b' '
    })
}

/// Returns whether `buf` is shorter than a method and its space, and could still become one.
fn is_method_prefix(buf: &[u8]) -> bool {
    HTTP_METHODS
        .iter()
        .any(|method| buf.len() <= method.len() && method.starts_with(buf))
}

/// Returns the offset of the empty line that ends the request head, or `None` when no empty
/// line has arrived yet. Lines may end in `\n` alone, which RFC 9112 section 2.2 allows
/// recipients to accept.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (index, &byte) in buf.iter().enumerate() {
        if byte != b'\n' {
            continue;
        }
        if trim_cr(&buf[line_start..index]).is_empty() && line_start > 0 {
            return Some(line_start);
        }
        line_start = index + 1;
    }
    None
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Returns whether `line` is `METHOD SP request-target SP HTTP/1.x`.
fn is_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !target.is_empty() && matches!(version, b"HTTP/1.0" | b"HTTP/1.1")
}

/// Returns the value of the only `Host` header among the header `lines`, trimmed, or
/// `None` when there is none, more than one, or a folded header line.
fn single_host_header<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    let mut host = None;
    for line in lines {
        // Obsolete line folding (a line starting with whitespace continues the previous
        // header) could hide a second host; RFC 9112 section 5.2 lets servers reject it.
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return None;
        }
        let colon = line.iter().position(|&b| b == b':')?;
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        if host.is_some() {
            return None;
        }
        host = Some(line[colon + 1..].trim_ascii());
    }
    host
}

/// Removes the port from a `Host` value: `example.com:8080` becomes `example.com`, and
/// `[::1]:80` becomes `[::1]`. Returns `None` when the port is not a number.
fn strip_port(value: &[u8]) -> Option<&[u8]> {
    let host_end = if value.starts_with(b"[") {
        value.iter().position(|&b| b == b']')? + 1
    } else {
        value.iter().position(|&b| b == b':').unwrap_or(value.len())
    };
    let (host, port) = value.split_at(host_end);
    match port {
        [] => Some(host),
        [b':', digits @ ..] if digits.iter().all(u8::is_ascii_digit) => Some(host),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> DomainPattern {
        text.parse().unwrap()
    }

    #[test]
    fn pattern_exact_matches_only_itself() {
        let exact = pattern("example.com");
        assert!(exact.matches("example.com"));
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("a.example.com"));
        assert!(!exact.matches("badexample.com"));
        assert!(!exact.matches("example.com.."));
    }

    #[test]
    fn pattern_wildcard_matches_subdomains_only() {
        let wildcard = pattern("*.Example.COM.");
        assert_eq!(wildcard.to_string(), "*.example.com");
        assert!(wildcard.matches("a.example.com"));
        assert!(wildcard.matches("a.b.EXAMPLE.com."));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches(".example.com"));
        assert!(!wildcard.matches("badexample.com"));
        assert!(!wildcard.matches("a.example.com.evil"));
        assert!(!wildcard.matches("éexample.com"), "split character");
    }

    #[test]
    fn pattern_rejects_invalid_input() {
        use DomainPatternError::*;
        let cases = [
            ("", Empty),
            (".", Empty),
            ("*", BareWildcard),
            ("*.", BareWildcard),
            ("a.*.com", MisplacedWildcard("a.*.com".into())),
            ("*a.com", MisplacedWildcard("*a.com".into())),
            ("*.*.com", MisplacedWildcard("*.*.com".into())),
            ("a..com", EmptyLabel("a..com".into())),
            (".a.com", EmptyLabel(".a.com".into())),
            ("bücher.de", NonAscii("bücher.de".into())),
            ("10.0.0.1", IpAddress("10.0.0.1".into())),
            ("::1", IpAddress("::1".into())),
            ("*.1.2", IpAddress("*.1.2".into())),
            (
                "a b.com",
                InvalidCharacter {
                    name: "a b.com".into(),
                    character: ' ',
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<DomainPattern>(), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn pattern_checks_lengths() {
        let label = "a".repeat(63);
        assert!(format!("{label}.com").parse::<DomainPattern>().is_ok());
        let error = format!("a{label}.com")
            .parse::<DomainPattern>()
            .unwrap_err();
        assert!(
            matches!(error, DomainPatternError::LabelTooLong { .. }),
            "{error}"
        );

        let longest = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(longest.len(), 253);
        assert!(longest.parse::<DomainPattern>().is_ok());
        let error = format!("{longest}b").parse::<DomainPattern>().unwrap_err();
        assert!(
            matches!(error, DomainPatternError::NameTooLong { length: 254, .. }),
            "{error}"
        );
    }

    #[test]
    fn pattern_error_names_input() {
        let error = "a_b.c%m".parse::<DomainPattern>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid domain `a_b.c%m`: character `%` is not allowed; use letters, digits, `-` and `_`"
        );
    }

    #[test]
    fn domain_like_tells_domains_from_addresses() {
        for entry in [
            "example.com",
            "*.example.com",
            "bücher.de",
            "a/b.com",
            "dead.beef",
        ] {
            assert!(is_domain_like(entry), "{entry}");
        }
        for entry in ["10.0.0.0/33", "1.2.3.4.5", "fe80::1/200", "::", "300.1.1.1"] {
            assert!(!is_domain_like(entry), "{entry}");
        }
    }

    /// Builds a TLS 1.3-style ClientHello handshake message with the given extensions.
    fn client_hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7; 32]);
        body.push(32);
        body.extend([9; 32]);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        let mut block = Vec::new();
        for (extension_type, data) in extensions {
            block.extend(extension_type.to_be_bytes());
            block.extend((data.len() as u16).to_be_bytes());
            block.extend(data);
        }
        body.extend((block.len() as u16).to_be_bytes());
        body.extend(block);

        let mut message = vec![TLS_CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    fn server_name_extension(host: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![TLS_HOST_NAME];
        entry.extend((host.len() as u16).to_be_bytes());
        entry.extend(host.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (TLS_SERVER_NAME, data)
    }

    /// Wraps `message` in TLS records of at most `record_len` bytes each.
    fn records(message: &[u8], record_len: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for chunk in message.chunks(record_len) {
            bytes.extend([TLS_HANDSHAKE, 3, 1]);
            bytes.extend((chunk.len() as u16).to_be_bytes());
            bytes.extend(chunk);
        }
        bytes
    }

    fn client_hello(host: &str) -> Vec<u8> {
        let message = client_hello_message(&[
            (10, vec![0, 2, 0, 29]),
            server_name_extension(host),
            (43, vec![2, 3, 4]),
        ]);
        records(&message, TLS_MAX_RECORD_LEN)
    }

    #[test]
    fn tls_sni_found() {
        let hello = client_hello("Api.Example.com");
        assert_eq!(sniff(&hello), Sniffed::Host("Api.Example.com".into()));
    }

    /// Checks that every proper prefix of `hello` asks for more bytes.
    fn assert_prefixes_need_more(hello: &[u8]) {
        for end in 1..hello.len() {
            assert_eq!(
                sniff(&hello[..end]),
                Sniffed::NeedMore,
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn tls_every_prefix_needs_more() {
        assert_prefixes_need_more(&client_hello("example.com"));
    }

    #[test]
    fn tls_hello_split_over_records() {
        let message = client_hello_message(&[server_name_extension("split.example.com")]);
        let hello = records(&message, 10);
        assert_eq!(sniff(&hello), Sniffed::Host("split.example.com".into()));
        assert_prefixes_need_more(&hello);
    }

    #[test]
    fn tls_without_sni_is_unknown() {
        let no_extensions = client_hello_message(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(sniff(&records(&no_extensions, 512)), Sniffed::Unknown);

        let mut bare = client_hello_message(&[]);
        bare.truncate(bare.len() - 2);
        let length = (bare.len() - 4) as u32;
        bare[1..4].copy_from_slice(&length.to_be_bytes()[1..]);
        assert_eq!(sniff(&records(&bare, 512)), Sniffed::Unknown);
    }

    #[test]
    fn tls_malformed_is_unknown() {
        let hello = client_hello("example.com");

        let mut wrong_type = hello.clone();
        wrong_type[5] = 2;
        assert_eq!(sniff(&wrong_type), Sniffed::Unknown, "ServerHello type");

        let mut wrong_version = hello.clone();
        wrong_version[1] = 2;
        assert_eq!(
            sniff(&wrong_version[..2]),
            Sniffed::Unknown,
            "record version"
        );

        let mut long_session = hello.clone();
        long_session[5 + 4 + 34] = 33;
        assert_eq!(sniff(&long_session), Sniffed::Unknown, "session ID length");

        let mut short_message = hello.clone();
        short_message[8] -= 1;
        assert_eq!(sniff(&short_message), Sniffed::Unknown, "handshake length");

        assert_eq!(
            sniff(&client_hello("bad host")),
            Sniffed::Unknown,
            "space in SNI"
        );
        assert_eq!(
            sniff(&[TLS_HANDSHAKE, 3, 1, 0, 0]),
            Sniffed::Unknown,
            "empty record"
        );
    }

    #[test]
    fn http_host_found() {
        let request =
            b"GET /index.html HTTP/1.1\r\nUser-Agent: t\r\nhOsT:  Example.com:8080 \r\n\r\nbody";
        assert_eq!(sniff(request), Sniffed::Host("Example.com".into()));

        let bare_newlines = b"POST / HTTP/1.0\nHost: a.example.com\n\n";
        assert_eq!(sniff(bare_newlines), Sniffed::Host("a.example.com".into()));

        let ipv6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(sniff(ipv6), Sniffed::Host("[::1]".into()));
    }

    #[test]
    fn http_every_prefix_needs_more() {
        let request = b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
        for end in 1..request.len() {
            assert_eq!(
                sniff(&request[..end]),
                Sniffed::NeedMore,
                "prefix of {end} bytes"
            );
        }
        assert_eq!(sniff(request), Sniffed::Host("example.com".into()));
    }

    #[test]
    fn http_unknown_cases() {
        let cases: [&[u8]; 9] = [
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"get / HTTP/1.1\r\nHost: a.com\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a.com\r\n\r\n",
            b"GET /\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.com\r\n x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.com:http\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        ];
        for request in cases {
            assert_eq!(
                sniff(request),
                Sniffed::Unknown,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn http_head_over_limit_is_unknown() {
        let mut request = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(MAX_SNIFF_LEN, b'a');
        assert_eq!(sniff(&request[..MAX_SNIFF_LEN - 1]), Sniffed::NeedMore);
        assert_eq!(sniff(&request), Sniffed::Unknown);

        request.extend(b"\r\nHost: a.com\r\n\r\n");
        assert_eq!(sniff(&request), Sniffed::Unknown);
    }

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(sniff(b""), Sniffed::NeedMore);
    }
}
