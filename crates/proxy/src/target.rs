//! Parsing of the sandbox and port a request is routed to.

use http::header::HOST;
use http::request::Parts;

/// Header naming the sandbox, sent by the E2B SDK (e2b 2.63.0) on every envd request.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";

/// Header naming the sandbox port, sent beside [`SANDBOX_ID_HEADER`].
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Header carrying a sandbox's traffic access token.
pub const TRAFFIC_ACCESS_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Maximum length of a sandbox ID in a Host label or header (a DNS label's maximum).
const MAX_SANDBOX_ID_LEN: usize = 63;

/// Sandbox and port a request is routed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Sandbox ID as the client sent it.
    pub sandbox_id: String,
    /// TCP port inside the sandbox.
    pub port: u16,
}

/// Error for a request that names no valid sandbox and port.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("missing Host header: expected <port>-<sandboxID>.<domain>, or the E2b-Sandbox-Id and E2b-Sandbox-Port headers")]
    MissingHost,

    #[error("invalid Host {0:?}: expected <port>-<sandboxID>.<domain>, or the E2b-Sandbox-Id and E2b-Sandbox-Port headers")]
    InvalidHost(String),

    #[error("header {present} is set but {missing} is missing: send both to route by headers")]
    IncompleteHeaders {
        present: &'static str,
        missing: &'static str,
    },

    #[error("invalid E2b-Sandbox-Port {0:?}: expected a TCP port number from 1 to 65535")]
    InvalidPortHeader(String),

    #[error("invalid E2b-Sandbox-Id {0:?}: expected 1 to 63 characters from [a-z0-9-_]")]
    InvalidIdHeader(String),
}

impl Target {
    /// Reads the target from the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers when present,
    /// else from the Host header (or, for HTTP/2, the request's authority).
    pub fn from_request(parts: &Parts) -> Result<Target, TargetError> {
        if let Some(target) = from_headers(parts)? {
            return Ok(target);
        }
        let host = match parts.headers.get(HOST) {
            Some(value) => value.to_str().map_err(|_| {
                TargetError::InvalidHost(String::from_utf8_lossy(value.as_bytes()).into_owned())
            })?,
            None => parts
                .uri
                .authority()
                .map(|a| a.as_str())
                .ok_or(TargetError::MissingHost)?,
        };
        parse_host(host)
    }
}

fn from_headers(parts: &Parts) -> Result<Option<Target>, TargetError> {
    let id = parts.headers.get(SANDBOX_ID_HEADER);
    let port = parts.headers.get(SANDBOX_PORT_HEADER);
    let (id, port) = match (id, port) {
        (None, None) => return Ok(None),
        (Some(id), Some(port)) => (id, port),
        (Some(_), None) => {
            return Err(TargetError::IncompleteHeaders {
                present: "E2b-Sandbox-Id",
                missing: "E2b-Sandbox-Port",
            })
        }
        (None, Some(_)) => {
            return Err(TargetError::IncompleteHeaders {
                present: "E2b-Sandbox-Port",
                missing: "E2b-Sandbox-Id",
            })
        }
    };

    let port_text = String::from_utf8_lossy(port.as_bytes()).into_owned();
    let port = parse_port(port_text.trim()).ok_or(TargetError::InvalidPortHeader(port_text))?;
    let id_text = String::from_utf8_lossy(id.as_bytes()).into_owned();
    let sandbox_id = id_text.trim();
    if !is_valid_sandbox_id(sandbox_id) {
        return Err(TargetError::InvalidIdHeader(id_text));
    }
    Ok(Some(Target {
        sandbox_id: sandbox_id.to_owned(),
        port,
    }))
}

/// Parses `<port>-<sandboxID>.<domain>[:<port>]`. The domain is not checked, so one proxy
/// serves whatever domain its DNS points at it.
fn parse_host(host: &str) -> Result<Target, TargetError> {
    let invalid = || TargetError::InvalidHost(host.to_owned());
    let lowercase = host.to_ascii_lowercase();
    let name = strip_port_suffix(&lowercase);
    let (label, domain) = name.split_once('.').ok_or_else(invalid)?;
    if domain.is_empty() {
        return Err(invalid());
    }
    let (port, sandbox_id) = label.split_once('-').ok_or_else(invalid)?;
    let port = parse_port(port).ok_or_else(invalid)?;
    if !is_valid_sandbox_id(sandbox_id) {
        return Err(invalid());
    }
    Ok(Target {
        sandbox_id: sandbox_id.to_owned(),
        port,
    })
}

fn strip_port_suffix(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|port| *port != 0)
}

fn is_valid_sandbox_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_SANDBOX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(host: Option<&str>, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri("/path");
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn target(id: &str, port: u16) -> Target {
        Target {
            sandbox_id: id.to_owned(),
            port,
        }
    }

    #[test]
    fn host_with_domain() {
        let parsed =
            Target::from_request(&parts(Some("49983-abc123.e2b.example.com"), &[])).unwrap();
        assert_eq!(parsed, target("abc123", 49983));
    }

    #[test]
    fn host_with_port_suffix_and_uppercase() {
        let parsed =
            Target::from_request(&parts(Some("8080-ABC-def.localhost:3000"), &[])).unwrap();
        assert_eq!(parsed, target("abc-def", 8080));
    }

    #[test]
    fn headers_win_over_host() {
        let headers = [("E2b-Sandbox-Id", "sbx1"), ("E2b-Sandbox-Port", "49983")];
        let parsed = Target::from_request(&parts(Some("localhost:3000"), &headers)).unwrap();
        assert_eq!(parsed, target("sbx1", 49983));
    }

    #[test]
    fn http2_authority_used_without_host() {
        let request = http::Request::builder()
            .uri("http://3000-sbx2.example.org/x")
            .body(())
            .unwrap();
        let parsed = Target::from_request(&request.into_parts().0).unwrap();
        assert_eq!(parsed, target("sbx2", 3000));
    }

    #[test]
    fn bad_hosts_rejected() {
        for host in [
            "localhost:3000",
            "abc.example.com",
            "0-abc.example.com",
            "70000-abc.example.com",
            "80-.example.com",
            "80-abc.",
            "80-a/b.example.com",
        ] {
            let error = Target::from_request(&parts(Some(host), &[])).unwrap_err();
            assert_eq!(
                error,
                TargetError::InvalidHost(host.to_owned()),
                "host {host}"
            );
        }
    }

    #[test]
    fn missing_host_rejected() {
        assert_eq!(
            Target::from_request(&parts(None, &[])).unwrap_err(),
            TargetError::MissingHost
        );
    }

    #[test]
    fn incomplete_headers_rejected() {
        let error = Target::from_request(&parts(
            Some("80-abc.example.com"),
            &[("E2b-Sandbox-Id", "abc")],
        ))
        .unwrap_err();
        assert!(
            matches!(error, TargetError::IncompleteHeaders { .. }),
            "{error}"
        );
    }

    #[test]
    fn bad_port_header_rejected() {
        let headers = [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "http")];
        let error = Target::from_request(&parts(None, &headers)).unwrap_err();
        assert_eq!(error, TargetError::InvalidPortHeader("http".to_owned()));
    }
}
