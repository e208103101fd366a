//! Sandbox routes.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{AppendHeaders, IntoResponse};
use axum::Json;
use chrono::{DateTime, Utc};
use hearth_types::SandboxId;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiJson, ApiQuery, ErrorBody};
use crate::network::NetworkUpdate;
use crate::models::{
    ConnectSandbox, CreatedSandbox, ListSandboxesQuery, ListSandboxesV2Query, ListSnapshotsQuery,
    ListedSandbox, NewSandbox, ResumedSandbox, SandboxDetail, SandboxForkRequest,
    SandboxForkResult, SandboxLifecycle, SandboxPauseRequest, SandboxRefreshRequest,
    SandboxSnapshotRequest, SandboxTimeoutRequest, SnapshotInfo,
};
use crate::sandboxes::{
    sandbox_not_found, CreateApi, ServerTiming, CONNECT_DEFAULT_TIMEOUT_SECS, REFRESH_DEFAULT_SECS,
};
use crate::store::{SandboxListFilter, SandboxRecord, SandboxState};
use crate::{validate, ControlPlane, CLIENT_ID};

/// Default and maximum page size of `GET /v2/sandboxes`.
const MAX_PAGE_SIZE: usize = 100;

/// Response header of a pause with the bytes it wrote (memory and device state).
const BYTES_WRITTEN_HEADER: &str = "hearth-bytes-written";

/// Response header carrying the token of the next page.
const NEXT_TOKEN_HEADER: &str = "x-next-token";

#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    responses((status = 201, body = CreatedSandbox), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn create_v1(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<NewSandbox>,
) -> Result<(StatusCode, [(HeaderName, String); 1], Json<CreatedSandbox>), ApiError> {
    let (record, timing) = cp.create_sandbox(CreateApi::V1, body).await?;
    Ok((
        StatusCode::CREATED,
        server_timing_header(&timing),
        Json(created_sandbox(&cp, &record)),
    ))
}

#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    responses((status = 201, body = CreatedSandbox), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn create_v2(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<NewSandbox>,
) -> Result<(StatusCode, [(HeaderName, String); 1], Json<CreatedSandbox>), ApiError> {
    let (record, timing) = cp.create_sandbox(CreateApi::V2, body).await?;
    Ok((
        StatusCode::CREATED,
        server_timing_header(&timing),
        Json(created_sandbox(&cp, &record)),
    ))
}

#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes", params(ListSandboxesQuery),
    responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)))]
pub(crate) async fn list_v1(
    State(cp): State<ControlPlane>,
    ApiQuery(query): ApiQuery<ListSandboxesQuery>,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let filter = SandboxListFilter {
        states: vec![SandboxState::Running],
        metadata: validate::metadata_filter(query.metadata.as_deref())?,
        ..SandboxListFilter::default()
    };
    let sandboxes = cp.store().list_sandboxes(&filter).await?;
    Ok(Json(sandboxes.iter().map(listed_sandbox).collect()))
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes", params(ListSandboxesV2Query),
    responses((status = 200, body = Vec<ListedSandbox>,
               headers(("x-next-token" = String, description = "Token of the next page, absent on the last page"))),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_v2(
    State(cp): State<ControlPlane>,
    ApiQuery(query): ApiQuery<ListSandboxesV2Query>,
) -> Result<impl IntoResponse, ApiError> {
    let descending = match query.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid order {other:?}: expected \"asc\" or \"desc\""
            )))
        }
    };
    let limit = parse_limit(query.limit.as_deref())?;
    let cursor = query
        .next_token
        .as_deref()
        .map(PageCursor::parse)
        .transpose()?;

    let mut filter = SandboxListFilter {
        states: parse_states(query.state.as_deref())?,
        metadata: validate::metadata_filter(query.metadata.as_deref())?,
        started_after: parse_started_after(query.started_after.as_deref())?,
        template_id: None,
    };
    if let Some(template) = query.template.as_deref().filter(|t| !t.is_empty()) {
        match cp.store().find_template(template).await? {
            Some(found) => filter.template_id = Some(found.template_id),
            // No template by that name means no sandbox of it either.
            None => return Ok((HeaderMap::new(), Json(Vec::new()))),
        }
    }

    let mut sandboxes = cp.store().list_sandboxes(&filter).await?;
    if descending {
        sandboxes.reverse();
    }
    if let Some(cursor) = &cursor {
        sandboxes.retain(|sandbox| cursor.is_before(sandbox, descending));
    }

    let has_more = sandboxes.len() > limit;
    sandboxes.truncate(limit);
    let mut headers = HeaderMap::new();
    if has_more {
        if let Some(last) = sandboxes.last() {
            let token = PageCursor::after(last).to_token();
            headers.insert(
                NEXT_TOKEN_HEADER,
                HeaderValue::from_str(&token).expect("cursor tokens are ASCII"),
            );
        }
    }
    Ok((
        headers,
        Json(sandboxes.iter().map(listed_sandbox).collect::<Vec<_>>()),
    ))
}

#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    responses((status = 200, body = SandboxDetail), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let record = cp.live_sandbox(&sandbox_id).await?;
    Ok(Json(sandbox_detail(&cp, &record)))
}

#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    responses((status = 204, description = "Killed"), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn kill(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    if cp.kill_sandbox(&sandbox_id, "request").await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(sandbox_not_found(&sandbox_id))
    }
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body = SandboxTimeoutRequest,
    responses((status = 204, description = "Timeout set"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn set_timeout(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    ApiJson(body): ApiJson<SandboxTimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    cp.set_sandbox_timeout(&sandbox_id, body.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/refreshes", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<SandboxRefreshRequest>),
    responses((status = 204, description = "Timeout extended"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn refresh(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let body: SandboxRefreshRequest = parse_optional_body(&body)?;
    let duration = body.duration.unwrap_or(REFRESH_DEFAULT_SECS);
    cp.extend_sandbox_timeout(&sandbox_id, "duration", duration)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/connect", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body = ConnectSandbox,
    responses((status = 200, body = CreatedSandbox), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn connect_v1(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<ConnectResponse, ApiError> {
    let body: ConnectSandbox = parse_optional_body(&body)?;
    if body.timeout.is_none() {
        return Err(ApiError::bad_request(
            "missing timeout: POST /sandboxes/{sandboxID}/connect requires it",
        ));
    }
    connect(cp, &sandbox_id, body).await
}

#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<ConnectSandbox>),
    responses((status = 200, body = CreatedSandbox), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn connect_v2(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<ConnectResponse, ApiError> {
    let body: ConnectSandbox = parse_optional_body(&body)?;
    connect(cp, &sandbox_id, body).await
}

/// A connect's sandbox, with a `Server-Timing` header when the connect resumed it.
type ConnectResponse = (
    AppendHeaders<Vec<(HeaderName, String)>>,
    Json<CreatedSandbox>,
);

/// Connects to a sandbox: a paused one is resumed, and the timeout becomes at least
/// `timeout` seconds from now.
async fn connect(
    cp: ControlPlane,
    sandbox_id: &str,
    body: ConnectSandbox,
) -> Result<ConnectResponse, ApiError> {
    let sandbox_id = parse_sandbox_id(sandbox_id)?;
    if body.memory == Some(false) {
        return Err(ApiError::bad_request(
            "invalid memory false: Hearth resumes paused sandboxes with their memory only",
        ));
    }
    let timeout = body.timeout.unwrap_or(CONNECT_DEFAULT_TIMEOUT_SECS);
    let (record, timing) = cp.resume_sandbox(&sandbox_id, timeout, None, false).await?;
    tracing::info!(sandbox_id = %sandbox_id, end_at = %record.end_at, "client connected to sandbox");
    let headers: Vec<(HeaderName, String)> = timing.iter().flat_map(server_timing_header).collect();
    Ok((AppendHeaders(headers), Json(created_sandbox(&cp, &record))))
}

/// Parses a JSON body that may be empty, in which case the type's default applies.
fn parse_optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))
}

/// Parses a sandbox ID from a path. A malformed ID cannot name a sandbox, so it is 404.
fn parse_sandbox_id(value: &str) -> Result<SandboxId, ApiError> {
    SandboxId::parse(value).map_err(|_| {
        ApiError::not_found(format!(
            "sandbox {value:?} not found: not a valid sandbox ID"
        ))
    })
}

fn parse_limit(value: Option<&str>) -> Result<usize, ApiError> {
    let Some(value) = value else {
        return Ok(MAX_PAGE_SIZE);
    };
    match value.parse::<usize>() {
        Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => Ok(limit),
        _ => Err(ApiError::bad_request(format!(
            "invalid limit {value:?}: expected 1 to {MAX_PAGE_SIZE}"
        ))),
    }
}

fn parse_states(value: Option<&str>) -> Result<Vec<SandboxState>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(|state| match state.trim() {
            "running" => Ok(SandboxState::Running),
            "paused" => Ok(SandboxState::Paused),
            other => Err(ApiError::bad_request(format!(
                "invalid state {other:?}: expected \"running\" or \"paused\""
            ))),
        })
        .collect()
}

fn parse_started_after(value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|time| time.with_timezone(&Utc))
                .map_err(|err| {
                    ApiError::bad_request(format!(
                        "invalid startedAfter {v:?}: expected an RFC 3339 time ({err})"
                    ))
                })
        })
        .transpose()
}

/// Position in a list ordered by (start time, sandbox ID): the last item of a page.
/// Encoded as `<start time in ms>.<sandbox ID>`.
struct PageCursor {
    started_at_ms: i64,
    sandbox_id: String,
}

impl PageCursor {
    fn after(sandbox: &SandboxRecord) -> Self {
        Self {
            started_at_ms: sandbox.started_at.timestamp_millis(),
            sandbox_id: sandbox.sandbox_id.to_string(),
        }
    }

    fn parse(token: &str) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::bad_request(format!(
                "invalid nextToken {token:?}: pass the x-next-token header of the previous page"
            ))
        };
        let (millis, id) = token.split_once('.').ok_or_else(invalid)?;
        let started_at_ms = millis.parse().map_err(|_| invalid())?;
        let sandbox_id = SandboxId::parse(id).map_err(|_| invalid())?;
        Ok(Self {
            started_at_ms,
            sandbox_id: sandbox_id.to_string(),
        })
    }

    fn to_token(&self) -> String {
        format!("{}.{}", self.started_at_ms, self.sandbox_id)
    }

    /// Whether `sandbox` comes after this cursor in the list's order.
    fn is_before(&self, sandbox: &SandboxRecord, descending: bool) -> bool {
        let key = (
            sandbox.started_at.timestamp_millis(),
            sandbox.sandbox_id.as_str(),
        );
        let cursor = (self.started_at_ms, self.sandbox_id.as_str());
        if descending {
            key < cursor
        } else {
            key > cursor
        }
    }
}

pub(crate) fn created_sandbox(cp: &ControlPlane, record: &SandboxRecord) -> CreatedSandbox {
    CreatedSandbox {
        template_id: record.template_id.to_string(),
        sandbox_id: record.sandbox_id.to_string(),
        alias: record.alias.clone(),
        client_id: CLIENT_ID.to_owned(),
        envd_version: record.envd_version.clone(),
        envd_access_token: record.envd_access_token.clone(),
        traffic_access_token: record.traffic_access_token.clone(),
        domain: cp.config().domain.clone(),
    }
}

fn sandbox_detail(cp: &ControlPlane, record: &SandboxRecord) -> SandboxDetail {
    SandboxDetail {
        template_id: record.template_id.to_string(),
        alias: record.alias.clone(),
        sandbox_id: record.sandbox_id.to_string(),
        client_id: CLIENT_ID.to_owned(),
        started_at: record.started_at,
        end_at: record.end_at,
        envd_version: record.envd_version.clone(),
        envd_access_token: record.envd_access_token.clone(),
        allow_internet_access: record.allow_internet_access,
        network: record.network.clone(),
        domain: cp.config().domain.clone(),
        cpu_count: record.vcpus,
        memory_mb: record.memory_mib,
        disk_size_mb: record.disk_mb,
        metadata: record.metadata.clone(),
        state: record.state.as_str().to_owned(),
        lifecycle: SandboxLifecycle {
            auto_resume: record.auto_resume,
            on_timeout: if record.auto_pause { "pause" } else { "kill" }.to_owned(),
        },
    }
}

fn listed_sandbox(record: &SandboxRecord) -> ListedSandbox {
    ListedSandbox {
        template_id: record.template_id.to_string(),
        alias: record.alias.clone(),
        sandbox_id: record.sandbox_id.to_string(),
        client_id: CLIENT_ID.to_owned(),
        started_at: record.started_at,
        end_at: record.end_at,
        cpu_count: record.vcpus,
        memory_mb: record.memory_mib,
        disk_size_mb: record.disk_mb,
        metadata: record.metadata.clone(),
        state: record.state.as_str().to_owned(),
        envd_version: record.envd_version.clone(),
    }
}

/// Builds the `Server-Timing` header of a create response. It lists each phase's duration,
/// so clients and benchmarks can tell Hearth's share from the VMM's restore.
fn server_timing_header(timing: &ServerTiming) -> [(HeaderName, String); 1] {
    [(
        HeaderName::from_static("server-timing"),
        timing.header_value(),
    )]
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/pause", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<SandboxPauseRequest>),
    responses((status = 204, description = "Paused"), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 500, body = ErrorBody)))]
pub(crate) async fn pause(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, [(HeaderName, String); 2]), ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let body: SandboxPauseRequest = parse_optional_body(&body)?;
    if body.memory == Some(false) {
        return Err(ApiError::bad_request(
            "invalid memory false: Hearth pauses with memory only (mode \"full\")",
        ));
    }
    match cp.pause_sandbox(&sandbox_id, "request").await? {
        Some((paused, timing)) => Ok((
            StatusCode::NO_CONTENT,
            [
                (
                    HeaderName::from_static("server-timing"),
                    timing.header_value(),
                ),
                (
                    HeaderName::from_static(BYTES_WRITTEN_HEADER),
                    paused.bytes_written.to_string(),
                ),
            ],
        )),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {sandbox_id} is already paused"),
        )),
    }
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/resume", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<ResumedSandbox>),
    responses((status = 201, body = CreatedSandbox), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn resume(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<
    (
        StatusCode,
        AppendHeaders<Vec<(HeaderName, String)>>,
        Json<CreatedSandbox>,
    ),
    ApiError,
> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let body: ResumedSandbox = parse_optional_body(&body)?;
    if body.memory == Some(false) {
        return Err(ApiError::bad_request(
            "invalid memory false: Hearth resumes paused sandboxes with their memory only",
        ));
    }
    let timeout = body
        .timeout
        .unwrap_or(crate::pausing::RESUME_DEFAULT_TIMEOUT_SECS);
    let (record, timing) = cp
        .resume_sandbox(&sandbox_id, timeout, body.auto_pause, true)
        .await?;
    let headers: Vec<(HeaderName, String)> = timing.iter().flat_map(server_timing_header).collect();
    Ok((
        StatusCode::CREATED,
        AppendHeaders(headers),
        Json(created_sandbox(&cp, &record)),
    ))
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/fork", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<SandboxForkRequest>),
    responses((status = 201, body = Vec<SandboxForkResult>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn fork(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Vec<SandboxForkResult>>), ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let body: SandboxForkRequest = parse_optional_body(&body)?;
    let forks = cp
        .fork_sandbox(
            &sandbox_id,
            body.timeout
                .unwrap_or(crate::pausing::RESUME_DEFAULT_TIMEOUT_SECS),
            body.count.unwrap_or(1),
        )
        .await?;
    let results = forks
        .into_iter()
        .map(|fork| match fork {
            Ok(record) => SandboxForkResult {
                sandbox: Some(created_sandbox(&cp, &record)),
                error: None,
            },
            Err(err) => SandboxForkResult {
                sandbox: None,
                error: Some(err.body()),
            },
        })
        .collect();
    Ok((StatusCode::CREATED, Json(results)))
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/snapshots", tag = "snapshots",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body(content = Option<SandboxSnapshotRequest>),
    responses((status = 201, body = SnapshotInfo), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn create_snapshot(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    let body: SandboxSnapshotRequest = parse_optional_body(&body)?;
    if body.memory == Some(false) {
        return Err(ApiError::bad_request(
            "invalid memory false: Hearth snapshots memory and filesystem together (mode \"full\")",
        )
        .with_error_code("snapshot_filesystem_only_disabled"));
    }
    let (snapshot_id, names) = cp.snapshot_sandbox(&sandbox_id, body.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotInfo {
            snapshot_id: snapshot_id.to_string(),
            names,
        }),
    ))
}

#[utoipa::path(get, path = "/snapshots", tag = "snapshots",
    params(ListSnapshotsQuery),
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)))]
pub(crate) async fn list_snapshots(
    State(cp): State<ControlPlane>,
    ApiQuery(query): ApiQuery<ListSnapshotsQuery>,
) -> Result<(HeaderMap, Json<Vec<SnapshotInfo>>), ApiError> {
    let limit = parse_limit(query.limit.as_deref())?;
    let offset = match query
        .next_token
        .as_deref()
        .filter(|token| !token.is_empty())
    {
        Some(token) => token
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid nextToken {token:?}")))?,
        None => 0,
    };
    let all = cp
        .store()
        .list_snapshots(query.sandbox_id.as_deref(), query.name.as_deref())
        .await?;
    let total = all.len();
    let page: Vec<SnapshotInfo> = all
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|snapshot| SnapshotInfo {
            snapshot_id: snapshot.snapshot_id.to_string(),
            names: snapshot.name.into_iter().collect(),
        })
        .collect();
    let mut headers = HeaderMap::new();
    if offset + page.len() < total {
        headers.insert(
            HeaderName::from_static(NEXT_TOKEN_HEADER),
            (offset + page.len())
                .to_string()
                .parse()
                .expect("digits are a valid header value"),
        );
    }
    Ok((headers, Json(page)))
}

#[utoipa::path(put, path = "/sandboxes/{sandboxID}/network", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "Sandbox ID")),
    request_body = NetworkUpdate,
    responses((status = 204, description = "Rules replaced"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 500, body = ErrorBody)))]
pub(crate) async fn update_network(
    State(cp): State<ControlPlane>,
    Path(sandbox_id): Path<String>,
    ApiJson(body): ApiJson<NetworkUpdate>,
) -> Result<StatusCode, ApiError> {
    let sandbox_id = parse_sandbox_id(&sandbox_id)?;
    cp.update_network(&sandbox_id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}
