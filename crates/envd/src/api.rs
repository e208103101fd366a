//! The HTTP router: Connect services, `/files`, `/health`, `/envs`, `/metrics`, `/init`,
//! Hearth's `/hearth/port-forward/{port}`, and the access-token check in front of them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::files::{self, signature_is_valid, FilesQuery};
use crate::port_forward::PortForwarding;
use crate::state::AppState;

/// Header that carries the access token set by `/init`.
const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Builds the whole router. `set_clock` allows `/init` to set the system clock, which
/// only the guest may do. `port_forwarding` serves the proxy's forward requests, and is
/// `None` when forwarding is off.
pub fn router(
    state: Arc<AppState>,
    set_clock: bool,
    port_forwarding: Option<Arc<PortForwarding>>,
) -> Router {
    Router::new()
        .merge(crate::process::service::router())
        .merge(crate::filesystem::router())
        // Uploads stream to disk, so their size needs no limit.
        .route(
            "/files",
            get(files::download)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .route(
            "/init",
            axum::routing::post(
                move |state: State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Bytes| {
                    init(state, headers, body, set_clock)
                },
            ),
        )
        .layer(middleware::from_fn_with_state(state.clone(), check_access_token))
        // `/health` and the port forward route are added after the layer, so they respond
        // without a token. The proxy, which requests forwards, does not have envd's token.
        .route("/health", get(health))
        .with_state(state)
        .merge(crate::port_forward::router(port_forwarding))
}

fn unauthorized(message: &str) -> Response {
    // The body works for both kinds of client: Connect clients read the string `code`,
    // and the SDK's HTTP error handling reads `message`.
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "code": "unauthenticated", "message": message })),
    )
        .into_response()
}

fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(ACCESS_TOKEN_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.as_bytes() == token.as_bytes())
        .unwrap_or(false)
}

async fn check_access_token(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(token) = state.config().access_token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    // `/init` checks the token itself because it may also come in the body.
    if path == "/init" || token_matches(request.headers(), &token) {
        return next.run(request).await;
    }
    if path == "/files" {
        let operation = if request.method() == http::Method::GET { "read" } else { "write" };
        let query = Query::<FilesQuery>::try_from_uri(request.uri()).ok();
        if query.is_some_and(|query| signature_is_valid(&query, operation, &token)) {
            return next.run(request).await;
        }
        return unauthorized("missing or invalid X-Access-Token header or file URL signature");
    }
    unauthorized("missing or invalid X-Access-Token header")
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn envs(State(state): State<Arc<AppState>>) -> Json<HashMap<String, String>> {
    Json(state.config().env_vars)
}

/// Body of `POST /init`; every field is optional. Unknown fields are ignored so that a
/// newer node agent can send more than this envd reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    /// Variables added to the environment of every command.
    env_vars: Option<HashMap<String, String>>,
    /// Token that every later request must carry in `X-Access-Token`.
    access_token: Option<String>,
    /// Host wall-clock time in RFC 3339, to which the guest clock is set.
    timestamp: Option<String>,
    /// User of requests that name none.
    default_user: Option<String>,
    /// Working directory of commands that name none.
    default_workdir: Option<String>,
}

async fn init(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    set_clock: bool,
) -> Response {
    let request: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(err) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(serde_json::json!({ "code": 400, "message": format!("invalid /init body: {err}") })),
                )
                    .into_response()
            }
        }
    };

    if let Some(current) = state.config().access_token {
        let body_matches = request.access_token.as_deref() == Some(current.as_str());
        if !body_matches && !token_matches(&headers, &current) {
            tracing::warn!("rejected /init without the current access token");
            return unauthorized("an access token is set; send it in X-Access-Token or as accessToken");
        }
    }

    if let Some(timestamp) = &request.timestamp {
        if set_clock {
            if let Err(message) = set_system_clock(timestamp) {
                tracing::warn!(%timestamp, error = %message, "failed to set the clock");
            }
        } else {
            tracing::debug!(%timestamp, "not setting the clock outside the guest");
        }
    }

    let env_count = request.env_vars.as_ref().map(HashMap::len).unwrap_or(0);
    state.update_config(|config| {
        if let Some(env_vars) = request.env_vars {
            config.env_vars.extend(env_vars);
        }
        if let Some(token) = request.access_token.filter(|token| !token.is_empty()) {
            config.access_token = Some(token);
        }
        if let Some(user) = request.default_user.filter(|user| !user.is_empty()) {
            config.default_user = user;
        }
        if let Some(workdir) = request.default_workdir.filter(|dir| !dir.is_empty()) {
            config.default_workdir = Some(workdir.into());
        }
    });
    let config = state.config();
    tracing::info!(
        env_vars = env_count,
        access_token_set = config.access_token.is_some(),
        default_user = %config.default_user,
        "initialized"
    );
    StatusCode::NO_CONTENT.into_response()
}

fn set_system_clock(timestamp: &str) -> Result<(), String> {
    let time = chrono::DateTime::parse_from_rfc3339(timestamp)
        .map_err(|err| format!("invalid RFC 3339 timestamp: {err}"))?;
    let spec = libc::timespec {
        tv_sec: time.timestamp() as libc::time_t,
        tv_nsec: time.timestamp_subsec_nanos() as libc::c_long,
    };
    // SAFETY: clock_settime reads one valid `timespec`.
    let result = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &spec) };
    if result != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Resource use of the guest: the fields of `GET /metrics`.
#[derive(Debug, serde::Serialize)]
struct Metrics {
    /// Unix time of the sample in seconds.
    ts: i64,
    cpu_count: usize,
    /// CPU use in percent over the last 100 ms.
    cpu_used_pct: f64,
    /// Memory in bytes.
    mem_total: u64,
    mem_used: u64,
    /// Memory in MiB.
    mem_total_mib: u64,
    mem_used_mib: u64,
    /// Disk space of `/` in bytes.
    disk_total: u64,
    disk_used: u64,
}

async fn metrics() -> Json<Metrics> {
    let first = read_cpu_times();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let second = read_cpu_times();
    let cpu_used_pct = match (first, second) {
        (Some((busy_a, total_a)), Some((busy_b, total_b))) if total_b > total_a => {
            100.0 * (busy_b - busy_a) as f64 / (total_b - total_a) as f64
        }
        _ => 0.0,
    };
    let (mem_total, mem_available) = read_memory();
    let mem_used = mem_total.saturating_sub(mem_available);
    let (disk_total, disk_free) = read_disk("/");
    Json(Metrics {
        ts: chrono::Utc::now().timestamp(),
        cpu_count: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        cpu_used_pct: (cpu_used_pct * 100.0).round() / 100.0,
        mem_total,
        mem_used,
        mem_total_mib: mem_total / (1024 * 1024),
        mem_used_mib: mem_used / (1024 * 1024),
        disk_total,
        disk_used: disk_total.saturating_sub(disk_free),
    })
}

/// Returns busy and total jiffies of all CPUs from `/proc/stat`.
fn read_cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|value| value.parse().ok()).collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Returns total and available memory in bytes from `/proc/meminfo`.
fn read_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Returns total and free bytes of the filesystem at `path`.
fn read_disk(path: &str) -> (u64, u64) {
    let Ok(c_path) = std::ffi::CString::new(path) else {
        return (0, 0);
    };
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `stat` is valid for one `statvfs` write.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return (0, 0);
    }
    // SAFETY: statvfs returned 0, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize as u64;
    (stat.f_blocks as u64 * block, stat.f_bavail as u64 * block)
}
