//! Reaching servers that listen only on a sandbox's loopback addresses.
//!
//! The proxy connects to the sandbox's address, so a server inside the sandbox that listens
//! only on 127.0.0.1 or ::1 refuses it. When a connection to a port other than envd's is
//! refused, the proxy sends `POST /hearth/port-forward/{port}` to envd, which then listens on
//! the sandbox's address at that port and relays to the loopback server. When envd responds
//! with 200, the proxy connects once more. envd keeps the forward open while the server listens,
//! so only the first connection to such a port pays for the extra request, and requests on
//! pooled connections pay nothing.

use std::error::Error as StdError;
use std::future::Future;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use hearth_types::guest::ENVD_PORT;

use crate::resolve::SandboxResolver;

/// Time allowed for envd to respond to a forward request, connection included.
pub(crate) const FORWARD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Maximum size of envd's response body, which is a short JSON object.
const MAX_RESPONSE_BYTES: usize = 4096;

/// Error of any connection attempt, as hyper's client takes it.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Error for a refused port that has no loopback server either, according to envd.
#[derive(Debug, thiserror::Error)]
#[error("connection refused, and nothing listens on port {port}, also not on 127.0.0.1 or ::1 (the only loopback addresses the proxy reaches)")]
pub(crate) struct NothingListens {
    pub port: u16,
}

/// envd's response to a forward request.
#[derive(Debug, PartialEq, Eq)]
enum ForwardReply {
    /// 200: a forward is open, or a server already listens on the sandbox's address.
    Reachable,
    /// 404: no server listens on the port, or envd has forwarding off.
    NothingListens,
    /// No response or an unexpected one, described for the log.
    Failed(String),
}

/// Runs `connect` and, when the sandbox at `address` refuses `port`, requests a forward from
/// envd and runs `connect` once more if envd responds with 200. On a 404 from envd the error is
/// [`NothingListens`]. When the request fails, the first connection error is returned.
pub(crate) async fn connect_or_forward<T, E, F, Fut>(
    address: Ipv4Addr,
    port: u16,
    mut connect: F,
) -> Result<T, BoxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    let error: BoxError = match connect().await {
        Ok(connection) => return Ok(connection),
        Err(error) => error.into(),
    };
    if port == ENVD_PORT || !is_connection_refused(&*error) {
        return Err(error);
    }

    match request_forward(address, port).await {
        ForwardReply::Reachable => {
            tracing::debug!(%address, port, "envd made the port reachable; connecting again");
            connect().await.map_err(Into::into)
        }
        ForwardReply::NothingListens => Err(Box::new(NothingListens { port })),
        ForwardReply::Failed(reason) => {
            tracing::warn!(%address, port, %reason, "failed to request a forward of a loopback server from envd");
            Err(error)
        }
    }
}

/// Returns whether `error` or one of its sources is a refused TCP connection.
fn is_connection_refused(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        let refused = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::ConnectionRefused);
        if refused {
            return true;
        }
        current = error.source();
    }
    false
}

/// Sends `POST /hearth/port-forward/{port}` to envd at `address` and classifies its response.
async fn request_forward(address: Ipv4Addr, port: u16) -> ForwardReply {
    let exchange = send_forward_request(address, port);
    let (status, body) = match tokio::time::timeout(FORWARD_REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return ForwardReply::Failed(error.to_string()),
        Err(_) => {
            return ForwardReply::Failed(format!(
                "envd did not respond within {FORWARD_REQUEST_TIMEOUT:?}"
            ))
        }
    };
    match status {
        StatusCode::OK => ForwardReply::Reachable,
        StatusCode::NOT_FOUND => ForwardReply::NothingListens,
        status => ForwardReply::Failed(format!(
            "envd responded with {status}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Sends the forward request on a new HTTP/1.1 connection and returns the status and body.
async fn send_forward_request(
    address: Ipv4Addr,
    port: u16,
) -> Result<(StatusCode, Bytes), BoxError> {
    let stream = TcpStream::connect((address, ENVD_PORT)).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection of a forward request to envd failed");
        }
    });

    let request = Request::post(format!("/hearth/port-forward/{port}"))
        .header(header::HOST, format!("{address}:{ENVD_PORT}"))
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok((status, body))
}

/// Connector of the proxy's pooled client: [`HttpConnector`] with a forward request to envd
/// when a sandbox refuses the connection (see [`connect_or_forward`]).
#[derive(Clone)]
pub(crate) struct ForwardingConnector {
    inner: HttpConnector<SandboxResolver>,
}

impl ForwardingConnector {
    pub fn new(inner: HttpConnector<SandboxResolver>) -> Self {
        Self { inner }
    }
}

impl tower_service::Service<Uri> for ForwardingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some((address, port)) = sandbox_address(&uri) else {
                let mut inner = inner;
                return inner.call(uri).await.map_err(Into::into);
            };
            connect_or_forward(address, port, || {
                // SandboxResolver is always ready, and so is a clone of the connector.
                let mut inner = inner.clone();
                let uri = uri.clone();
                async move { inner.call(uri).await }
            })
            .await
        })
    }
}

/// Reads the sandbox address and port of a backend URI, `http://<sandboxID>.<a-b-c-d>:<port>/`.
fn sandbox_address(uri: &Uri) -> Option<(Ipv4Addr, u16)> {
    let (_, dashed) = uri.host()?.rsplit_once('.')?;
    let address = Ipv4Addr::from_str(&dashed.replace('-', ".")).ok()?;
    Some((address, uri.port_u16()?))
}

#[cfg(test)]
mod tests {
    use tower_service::Service;

    use super::*;

    #[test]
    fn sandbox_address_from_backend_uri() {
        let uri: Uri = "http://sbx-1.10-11-0-2:8080/path".parse().unwrap();
        assert_eq!(
            sandbox_address(&uri),
            Some((Ipv4Addr::new(10, 11, 0, 2), 8080))
        );
    }

    #[test]
    fn sandbox_address_rejects_other_hosts() {
        for uri in [
            "http://sbx.example:8080/",
            "http://sbx.10-11-0-2/",
            "http://10.11.0.2:80/",
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(sandbox_address(&uri), None, "{uri}");
        }
    }

    #[tokio::test]
    async fn refused_found_in_connector_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);

        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        let error = HttpConnector::new().call(uri).await.unwrap_err();
        assert!(is_connection_refused(&error), "{error:?}");
    }

    #[test]
    fn timeout_is_not_refused() {
        let timed_out = std::io::Error::from(ErrorKind::TimedOut);
        assert!(!is_connection_refused(&timed_out));
    }
}
