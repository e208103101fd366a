//! The node agent's side of envd's HTTP API: readiness and initialisation after a restore.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hearth_types::guest::ENVD_PORT;
use serde::Serialize;

/// Interval between connection attempts while a restored guest's envd is not reachable yet.
/// envd usually accepts the first attempt, so a short interval keeps create latency low
/// without busy-looping.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Timeout of one probe or `/init` request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors talking to envd in a guest.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// envd did not accept a connection in time.
    #[error("envd at {address} did not become healthy within {waited:?}")]
    NotReady { address: Ipv4Addr, waited: Duration },
    /// `/init` failed.
    #[error("envd at {address} rejected /init: {reason}")]
    Init { address: Ipv4Addr, reason: String },
}

/// Body of envd's `POST /init`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest<'a> {
    /// Environment variables every process inherits.
    pub env_vars: &'a HashMap<String, String>,
    /// Token envd requires in `X-Access-Token`; `None` leaves envd open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<&'a str>,
    /// Token the guest's envd already requires, sent in `X-Access-Token`.
    #[serde(skip)]
    pub previous_access_token: Option<&'a str>,
    /// Host wall clock in RFC 3339, so a guest restored from an old snapshot is not in the
    /// past. [`EnvdClient::init_when_ready`] replaces it with the time of each attempt.
    pub timestamp: String,
    /// User that commands run as unless a request names one; `None` keeps the one the
    /// template's snapshot holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<&'a str>,
    /// Working directory of commands unless a request names one; `None` keeps the
    /// template's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<&'a str>,
}

/// HTTP client for the envd of guests on this node.
#[derive(Clone)]
pub struct EnvdClient {
    http: reqwest::Client,
}

impl EnvdClient {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .expect("a client without TLS or proxies always builds");
        Self { http }
    }

    /// Sends `POST /init` as soon as envd accepts connections, retrying refused or reset
    /// connections until `deadline` passes. The response to `/init` doubles as the
    /// readiness check, which saves a separate `/health` round trip on the create path.
    pub async fn init_when_ready(
        &self,
        address: Ipv4Addr,
        request: &InitRequest<'_>,
        deadline: Duration,
    ) -> Result<(), EnvdError> {
        let url = format!("http://{address}:{ENVD_PORT}/init");
        let started = Instant::now();
        for attempt in 1.. {
            // Each attempt carries the time it is sent, so retries never set a stale clock.
            let mut body = serde_json::to_value(request).expect("the init request always serializes");
            body["timestamp"] = serde_json::Value::String(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            );
            let mut post = self.http.post(&url).json(&body);
            if let Some(previous) = request.previous_access_token {
                post = post.header("X-Access-Token", previous);
            }
            match post.send().await {
                Ok(response) if response.status().is_success() => {
                    tracing::debug!(%address, attempt, waited_us = started.elapsed().as_micros() as u64, "envd initialised");
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    return Err(EnvdError::Init { address, reason: format!("HTTP {status}: {body}") });
                }
                Err(err) => tracing::trace!(%address, attempt, error = %err, "envd not reachable yet"),
            }
            if started.elapsed() >= deadline {
                return Err(EnvdError::NotReady { address, waited: started.elapsed() });
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
        unreachable!("the retry loop only ends by returning")
    }
}

impl EnvdClient {
    /// Waits until envd responds to `GET /health`, retrying until `deadline` passes.
    pub async fn health(&self, address: Ipv4Addr, deadline: Duration) -> Result<(), EnvdError> {
        let url = format!("http://{address}:{ENVD_PORT}/health");
        let started = Instant::now();
        loop {
            match self.http.get(&url).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => tracing::debug!(%address, status = %response.status(), "envd not healthy yet"),
                Err(err) => tracing::trace!(%address, error = %err, "envd not reachable yet"),
            }
            if started.elapsed() >= deadline {
                return Err(EnvdError::NotReady { address, waited: started.elapsed() });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Default for EnvdClient {
    fn default() -> Self {
        Self::new()
    }
}
