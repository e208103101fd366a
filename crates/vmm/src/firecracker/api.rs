//! HTTP/1.1 client for Firecracker's API socket.
//!
//! Each request opens its own connection and sends `Connection: close`, so a response ends
//! at its `Content-Length` or at end of stream. The client parses only what Firecracker
//! sends: a status line, headers, and an optional JSON body. Error bodies are
//! `{"fault_message": "..."}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::config::ApiRequest;

/// Largest response accepted; Firecracker's replies are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("failed to connect to the Firecracker API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket {path} did not appear within {timeout_ms} ms")]
    SocketTimeout { path: PathBuf, timeout_ms: u64 },
    #[error("{method} {path} failed on the connection")]
    Io {
        method: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path} returned an invalid HTTP response: {reason}")]
    InvalidResponse { method: &'static str, path: String, reason: String },
    #[error("{method} {path} was rejected with HTTP {status}: {fault_message}")]
    Rejected { method: &'static str, path: String, status: u16, fault_message: String },
}

impl ApiError {
    /// Firecracker's `fault_message` of a rejected request.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            Self::Rejected { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }

    /// HTTP status of a rejected request.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful response.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiResponse {
    /// HTTP status (2xx).
    pub status: u16,
    /// Body, empty for 204.
    pub body: String,
}

/// Client for one Firecracker process's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// Creates a client for the socket at `socket`; no connection is made yet.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// Path of the API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until the socket accepts connections, polling every millisecond, or until
    /// `alive` returns false (the process exited) or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration, mut alive: impl FnMut() -> bool) -> Result<(), ApiError> {
        let started = Instant::now();
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(_) => return Ok(()),
                Err(source) => {
                    let waiting = matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    );
                    if !waiting || !alive() {
                        return Err(ApiError::Connect { path: self.socket.clone(), source });
                    }
                }
            }
            if started.elapsed() >= timeout {
                return Err(ApiError::SocketTimeout {
                    path: self.socket.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends one request and returns its response if the status is 2xx. Any other status
    /// becomes [`ApiError::Rejected`] with Firecracker's `fault_message`.
    pub async fn send(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let method = request.method.as_str();
        let io_error = |source| ApiError::Io { method, path: request.path.clone(), source };

        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect { path: self.socket.clone(), source })?;
        let message = encode_request(request);
        stream.write_all(&message).await.map_err(io_error)?;

        let mut raw = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.map_err(io_error)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buffer[..n]);
            if raw.len() > MAX_RESPONSE_BYTES {
                return Err(self.invalid(request, format!("response exceeds {MAX_RESPONSE_BYTES} bytes")));
            }
            if response_complete(&raw) {
                break;
            }
        }

        let (status, body) = parse_response(&raw).map_err(|reason| self.invalid(request, reason))?;
        tracing::trace!(method, path = %request.path, status, "Firecracker API request");
        if (200..300).contains(&status) {
            return Ok(ApiResponse { status, body });
        }
        Err(ApiError::Rejected { method, path: request.path.clone(), status, fault_message: fault_message(&body) })
    }

    fn invalid(&self, request: &ApiRequest, reason: String) -> ApiError {
        ApiError::InvalidResponse { method: request.method.as_str(), path: request.path.clone(), reason }
    }
}

/// Serializes `request` as an HTTP/1.1 message.
fn encode_request(request: &ApiRequest) -> Vec<u8> {
    let body = request.body.as_ref().map(|body| body.to_string()).unwrap_or_default();
    let mut message = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
        request.method.as_str(),
        request.path
    );
    if request.body.is_some() {
        message.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    message.push_str("\r\n");
    message.push_str(&body);
    message.into_bytes()
}

/// Returns whether `raw` holds the full header block and as many body bytes as its
/// `Content-Length` states (0 when absent).
fn response_complete(raw: &[u8]) -> bool {
    let Some(header_end) = find_header_end(raw) else {
        return false;
    };
    let headers = String::from_utf8_lossy(&raw[..header_end]);
    let length = content_length(&headers).unwrap_or(0);
    raw.len() >= header_end + 4 + length
}

fn find_header_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|window| window == b"\r\n\r\n")
}

fn content_length(headers: &str) -> Option<usize> {
    headers.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok()).flatten()
    })
}

/// Splits a response into its status and body.
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let header_end = find_header_end(raw).ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let headers = String::from_utf8_lossy(&raw[..header_end]);
    let status_line = headers.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("invalid status line {status_line:?}"))?;

    let body = &raw[header_end + 4..];
    let body = match content_length(&headers) {
        Some(length) if length <= body.len() => &body[..length],
        Some(length) => return Err(format!("body has {} of {length} bytes", body.len())),
        None => body,
    };
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

/// Extracts `fault_message` from an error body, or returns the body itself.
fn fault_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("fault_message").and_then(|message| message.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::config::ApiRequest;
    use serde_json::json;

    #[test]
    fn encode_put_has_length_and_body() {
        let request = ApiRequest::put("/vm", &json!({"state": "Paused"}));

        let message = String::from_utf8(encode_request(&request)).unwrap();

        assert!(message.starts_with("PUT /vm HTTP/1.1\r\n"));
        assert!(message.contains("Content-Length: 18\r\n"));
        assert!(message.ends_with("\r\n\r\n{\"state\":\"Paused\"}"));
    }

    #[test]
    fn encode_get_has_no_body() {
        let message = String::from_utf8(encode_request(&ApiRequest::get("/"))).unwrap();

        assert!(!message.contains("Content-Length"));
        assert!(message.ends_with("\r\n\r\n"));
    }

    #[test]
    fn parse_no_content() {
        let raw = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";

        assert!(response_complete(raw));
        assert_eq!(parse_response(raw).unwrap(), (204, String::new()));
    }

    #[test]
    fn parse_fault_message() {
        let raw = b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 24\r\n\r\n{\"fault_message\":\"bad\"}\n";

        let (status, body) = parse_response(raw).unwrap();

        assert_eq!(status, 400);
        assert_eq!(fault_message(&body), "bad");
    }

    #[test]
    fn incomplete_body_is_not_complete() {
        let raw = b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\n{\"a\":";

        assert!(!response_complete(raw));
    }
}
