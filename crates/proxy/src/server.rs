//! The proxy's HTTP server and its forwarding of requests to sandboxes.

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use hearth_types::guest::ENVD_PORT;

use crate::error::ProxyError;
use crate::resolve::{backend_host, SandboxResolver};
use crate::forward::{prepare_request, root_cause, strip_hop_by_hop, wants_upgrade};
use crate::port_forward::{connect_or_forward, ForwardingConnector};
use crate::route::{Route, RouteTable};
use crate::target::{Target, TRAFFIC_ACCESS_TOKEN_HEADER};

/// Body of every response the proxy sends: the backend's body, streamed, or an error body.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// HTTP/2 flow-control windows. The protocol's 64 KiB default limits one stream to 64 KiB
/// per round trip, far below what a large download through the proxy needs.
const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const HTTP2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Settings of a [`Proxy`].
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Time allowed to open a TCP connection to a sandbox port before responding with 502.
    pub connect_timeout: Duration,
    /// Idle connections to backends are closed after this long.
    pub pool_idle_timeout: Duration,
    /// On shutdown, time open connections get to finish before they are dropped.
    pub drain_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The edge proxy. Share it with `Arc` and run [`Proxy::serve`] on a listener.
pub struct Proxy {
    routes: Arc<dyn RouteTable>,
    client: Client<ForwardingConnector, Incoming>,
    config: ProxyConfig,
}

impl Proxy {
    /// Creates a proxy that finds sandboxes through `routes`.
    pub fn new(routes: Arc<dyn RouteTable>, config: ProxyConfig) -> Proxy {
        let mut connector = HttpConnector::new_with_resolver(SandboxResolver::new(routes.clone()));
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(ForwardingConnector::new(connector));
        Proxy {
            routes,
            client,
            config,
        }
    }

    /// Accepts connections on `listener` (HTTP/1.1, h2c with prior knowledge, and
    /// HTTP/1.1 upgrades) until `shutdown` completes, then lets open connections finish
    /// for up to the drain timeout.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW);
        let graceful = GracefulShutdown::new();
        let local_address = listener.local_addr()?;
        tracing::info!(address = %local_address, "proxy listening");

        tokio::pin!(shutdown);
        loop {
            let (stream, client) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Running out of file descriptors must not end the server.
                        tracing::warn!(%error, "failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);

            let proxy = self.clone();
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request, client).await) }
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%client, %error, "client connection ended with an error");
                }
            });
        }

        drop(listener);
        tracing::info!(address = %local_address, "proxy stopped accepting; draining connections");
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(self.config.drain_timeout) => {
                tracing::warn!(timeout = ?self.config.drain_timeout, "connections still open after the drain timeout; dropping them");
            }
        }
        Ok(())
    }

    /// Forwards one request and returns the backend's response, or a JSON error response.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        match self.forward(request, client).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%client, %method, %path, status = error.status().as_u16(), %error, "proxy request failed");
                error.to_response()
            }
        }
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = wants_upgrade(request.version(), request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

        let (mut parts, body) = request.into_parts();
        let target = Target::from_request(&parts)?;
        let route = match self.routes.lookup(&target.sandbox_id) {
            Some(route) => Some(route),
            None => self.routes.wake(&target.sandbox_id).await,
        };
        let route = route.ok_or_else(|| ProxyError::SandboxNotFound {
            sandbox_id: target.sandbox_id.clone(),
        })?;
        check_traffic_token(&route, &target, &parts.headers)?;

        let upstream = SocketAddrV4::new(route.address, target.port);
        // The pool key names the sandbox and its current address, so connections of a
        // sandbox that moved (a resume into another slot) or of an address that passed to
        // another sandbox are never reused. Sandbox IDs are DNS labels ([a-z0-9]) and the
        // address is written with dashes, so both form a valid authority.
        let authority = format!("{}:{}", backend_host(&target.sandbox_id, route.address), target.port);
        prepare_request(&mut parts, &authority, client, upgrade);
        let request = Request::from_parts(parts, body);

        let mut response = match client_upgrade {
            Some(client_upgrade) => {
                self.forward_upgrade(request, client_upgrade, &target, upstream)
                    .await?
            }
            None => self
                .client
                .request(request)
                .await
                .map_err(|error| classify(&error, &target, error.is_connect()))?,
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(response.headers_mut(), switching);
        Ok(response.map(|body| body.boxed()))
    }

    /// Sends an upgrade request on a connection of its own (an upgraded connection never
    /// returns to the pool) and, when the backend switches protocols, joins the two
    /// upgraded connections.
    async fn forward_upgrade(
        &self,
        request: Request<Incoming>,
        client_upgrade: OnUpgrade,
        target: &Target,
        upstream: SocketAddrV4,
    ) -> Result<Response<Incoming>, ProxyError> {
        let connect_timeout = self.config.connect_timeout;
        let connect = || async move {
            match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {connect_timeout:?}"),
                )),
            }
        };
        let stream = connect_or_forward(*upstream.ip(), upstream.port(), connect)
            .await
            .map_err(|error| port_not_open(target, error.to_string()))?;
        let _ = stream.set_nodelay(true);

        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(stream))
                .await
                .map_err(|error| classify(&error, target, false))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "backend upgrade connection ended with an error");
            }
        });

        let mut response = sender
            .send_request(request)
            .await
            .map_err(|error| classify(&error, target, false))?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let backend_upgrade = hyper::upgrade::on(&mut response);
            let sandbox_id = target.sandbox_id.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok((client, backend)) => {
                        let mut client = TokioIo::new(client);
                        let mut backend = TokioIo::new(backend);
                        if let Err(error) =
                            tokio::io::copy_bidirectional(&mut client, &mut backend).await
                        {
                            tracing::debug!(%sandbox_id, %error, "upgraded connection ended with an error");
                        }
                    }
                    Err(error) => tracing::warn!(%sandbox_id, %error, "protocol upgrade failed"),
                }
            });
        }
        Ok(response)
    }
}

/// Requires the sandbox's traffic access token when it has one. The envd port is exempt:
/// the SDK (e2b 2.63.0) sends no traffic token on envd calls, and envd checks its own
/// access token.
fn check_traffic_token(
    route: &Route,
    target: &Target,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    let Some(expected) = &route.traffic_access_token else {
        return Ok(());
    };
    if target.port == ENVD_PORT {
        return Ok(());
    }
    let presented = headers
        .get(TRAFFIC_ACCESS_TOKEN_HEADER)
        .map(|v| v.as_bytes());
    if presented.is_some_and(|token| constant_time_eq(token, expected.as_bytes())) {
        Ok(())
    } else {
        Err(ProxyError::TrafficTokenRejected {
            sandbox_id: target.sandbox_id.clone(),
            port: target.port,
        })
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn port_not_open(target: &Target, reason: String) -> ProxyError {
    ProxyError::PortNotOpen {
        sandbox_id: target.sandbox_id.clone(),
        port: target.port,
        reason,
    }
}

fn classify(
    error: &(dyn std::error::Error + 'static),
    target: &Target,
    is_connect: bool,
) -> ProxyError {
    let reason = root_cause(error);
    if is_connect {
        port_not_open(target, reason)
    } else {
        ProxyError::Upstream {
            sandbox_id: target.sandbox_id.clone(),
            port: target.port,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> Target {
        Target {
            sandbox_id: "sbx".into(),
            port,
        }
    }

    fn route(token: Option<&str>) -> Route {
        Route {
            address: "127.0.0.1".parse().unwrap(),
            traffic_access_token: token.map(str::to_owned),
        }
    }

    #[test]
    fn token_not_required_without_one() {
        assert!(check_traffic_token(&route(None), &target(8080), &HeaderMap::new()).is_ok());
    }

    #[test]
    fn token_required_when_set() {
        let error =
            check_traffic_token(&route(Some("t0k")), &target(8080), &HeaderMap::new()).unwrap_err();
        assert_eq!(error.status(), StatusCode::FORBIDDEN);

        let mut wrong = HeaderMap::new();
        wrong.insert(TRAFFIC_ACCESS_TOKEN_HEADER, "t0x".parse().unwrap());
        assert!(check_traffic_token(&route(Some("t0k")), &target(8080), &wrong).is_err());

        let mut right = HeaderMap::new();
        right.insert(TRAFFIC_ACCESS_TOKEN_HEADER, "t0k".parse().unwrap());
        assert!(check_traffic_token(&route(Some("t0k")), &target(8080), &right).is_ok());
    }

    #[test]
    fn envd_port_exempt_from_token() {
        assert!(
            check_traffic_token(&route(Some("t0k")), &target(ENVD_PORT), &HeaderMap::new()).is_ok()
        );
    }
}
