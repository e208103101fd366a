//! Rewriting a request for its backend, and the errors of talking to it.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Uri, Version};

use crate::target::TRAFFIC_ACCESS_TOKEN_HEADER;

/// Headers that belong to one connection and are never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Returns whether an HTTP/1.1 request requests a switch of protocol (for example to WebSocket).
pub(crate) fn wants_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has_token(headers, "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the Connection header names. With
/// `keep_upgrade`, keeps `Connection: upgrade` and `Upgrade` so a protocol switch passes.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|item| HeaderName::from_bytes(item.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && *name == header::UPGRADE))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Turns the client's request head into the backend's: HTTP/1.1 to `authority`, the
/// original Host kept (taken from the authority for HTTP/2 clients), hop-by-hop headers
/// and the traffic access token removed, and the client address appended to
/// `X-Forwarded-For`.
pub(crate) fn prepare_request(
    parts: &mut Parts,
    authority: &str,
    client: SocketAddr,
    upgrade: bool,
) {
    if !parts.headers.contains_key(header::HOST) {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(TRAFFIC_ACCESS_TOKEN_HEADER);

    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(previous) => format!("{previous}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", value);
    }

    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .expect("a sandbox ID or address, a port and a path parsed from a URI form a valid URI");
    parts.version = Version::HTTP_11;
}

/// Innermost message of an error chain: the cause a reader can act on, such as
/// "Connection refused (os error 111)".
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-access-token", HeaderValue::from_static("secret"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-access-token"));
    }

    #[test]
    fn upgrade_headers_kept_for_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(Version::HTTP_11, &headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn request_rewritten_for_backend() {
        let request = http::Request::builder()
            .version(Version::HTTP_2)
            .uri("https://8080-sbx.example.com/a/b?c=d")
            .header(TRAFFIC_ACCESS_TOKEN_HEADER, "token")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        prepare_request(
            &mut parts,
            "sbx:8080",
            "127.0.0.1:5000".parse().unwrap(),
            false,
        );
        assert_eq!(parts.uri, "http://sbx:8080/a/b?c=d");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(
            parts.headers.get(header::HOST).unwrap(),
            "8080-sbx.example.com"
        );
        assert_eq!(parts.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert!(!parts.headers.contains_key(TRAFFIC_ACCESS_TOKEN_HEADER));
    }
}
