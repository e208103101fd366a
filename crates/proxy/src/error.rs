//! Errors the proxy responds with itself, as JSON `{"code": <status>, "message": "..."}`.
//!
//! The E2B SDK (e2b 2.63.0, `e2b/exceptions.py`) reads a 502 from the proxy in front of
//! envd by its message: one containing "was not found" becomes `SandboxNotRunningException`
//! (the sandbox was killed or timed out), one containing "port is not open" becomes
//! `SandboxUnreachableException`. For Connect calls it maps the integer `code` of a JSON
//! error body to the RPC status (502 to `unavailable`). The messages below keep those
//! phrases.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::server::ProxyBody;
use crate::target::TargetError;

/// A request the proxy could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    BadTarget(#[from] TargetError),

    #[error("The sandbox {sandbox_id} was not found")]
    SandboxNotFound { sandbox_id: String },

    #[error("missing or invalid e2b-traffic-access-token header for sandbox {sandbox_id}: port {port} requires the sandbox's traffic access token")]
    TrafficTokenRejected { sandbox_id: String, port: u16 },

    #[error("The sandbox {sandbox_id} is running but port is not open: nothing accepted a connection on port {port} ({reason})")]
    PortNotOpen {
        sandbox_id: String,
        port: u16,
        reason: String,
    },

    #[error("request to port {port} of sandbox {sandbox_id} failed: {reason}")]
    Upstream {
        sandbox_id: String,
        port: u16,
        reason: String,
    },
}

impl ProxyError {
    /// HTTP status of the error response.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadTarget(_) => StatusCode::BAD_REQUEST,
            ProxyError::TrafficTokenRejected { .. } => StatusCode::FORBIDDEN,
            ProxyError::SandboxNotFound { .. }
            | ProxyError::PortNotOpen { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Builds the JSON error response.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let body = serde_json::json!({ "code": status.as_u16(), "message": self.to_string() });
        let body = Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_message_matches_sdk_phrase() {
        let error = ProxyError::SandboxNotFound {
            sandbox_id: "abc".into(),
        };
        assert!(error.to_string().contains("was not found"));
        assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn port_not_open_message_matches_sdk_phrase() {
        let error = ProxyError::PortNotOpen {
            sandbox_id: "abc".into(),
            port: 8080,
            reason: "connection refused".into(),
        };
        let message = error.to_string();
        assert!(message.contains("port is not open"), "{message}");
        assert!(message.contains("8080"), "{message}");
        assert!(message.contains("abc"), "{message}");
    }
}
