//! Template routes: listing, lookups, updates, deletion, builds, build files and tags.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::Json;

use crate::error::{ApiError, ApiJson, ApiQuery, ErrorBody};
use crate::models::{Template, TemplateAliasResponse, TemplateBuild, TemplateWithBuilds};
use crate::store::TemplateRecord;
use crate::template_files::TokenError;
use crate::template_models::{
    AssignTemplateTagsRequest, AssignedTemplateTags, AssignmentsQuery, BuildLogsQuery, BuildStatusQuery,
    DeleteTemplateTagsRequest, DockerfileBuildRequest, DockerfileBuildStart, PageQuery, TagExistsQuery,
    TagGroupsQuery, TemplateBuildFileUpload, TemplateBuildInfo, TemplateBuildLogsResponse, TemplateBuildRequestV3,
    TemplateBuildStartV2, TemplateRequestResponseV3, TemplateTag, TemplateTagAssignmentsResponse,
    TemplateTagExistsResponse, TemplateTagGroupsResponse, TemplateTagsCountResponse, TemplateUpdateRequest,
    TemplateUpdateResponse, UploadQuery,
};
use crate::template_names;
use crate::template_tags::paginate;
use crate::ControlPlane;

/// Response header that carries the token of the next page.
const NEXT_TOKEN_HEADER: &str = "x-next-token";

/// Default and maximum page size of the paged template routes.
const MAX_PAGE: i64 = 100;

#[utoipa::path(get, path = "/templates", tag = "templates",
    responses((status = 200, body = Vec<Template>), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(State(cp): State<ControlPlane>) -> Result<Json<Vec<Template>>, ApiError> {
    let templates = cp.store().list_templates().await?;
    Ok(Json(templates.iter().map(template).collect()))
}

#[utoipa::path(get, path = "/v2/templates", tag = "templates", params(PageQuery),
    responses((status = 200, body = Vec<Template>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)))]
pub(crate) async fn list_v2(
    State(cp): State<ControlPlane>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Template>>), ApiError> {
    let (offset, limit) = page(&query)?;
    let templates = cp.store().list_templates().await?;
    let (templates, next) = paginate(templates, offset, limit);
    Ok((next_token_header(next), Json(templates.iter().map(template).collect())))
}

#[utoipa::path(get, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"), PageQuery),
    responses((status = 200, body = TemplateWithBuilds, description = "The template and a page of its builds, newest first"),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<(HeaderMap, Json<TemplateWithBuilds>), ApiError> {
    let (offset, limit) = page(&query)?;
    let record = find(&cp, &id_or_alias).await?;
    let builds = cp.store().list_template_builds(&record.template_id).await?;
    let (builds, next) = paginate(builds, offset, limit);
    let builds = builds
        .into_iter()
        .map(|build| TemplateBuild {
            build_id: build.build_id.to_string(),
            status: build.status.as_str().to_owned(),
            created_at: build.created_at,
            updated_at: build.updated_at,
            finished_at: build.finished_at,
            cpu_count: build.vcpus,
            memory_mb: build.memory_mib,
            disk_size_mb: build.disk_mb,
            envd_version: build.envd_version,
        })
        .collect();
    Ok((
        next_token_header(next),
        Json(TemplateWithBuilds {
            template: template(&record),
            builds,
        }),
    ))
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates",
    params(("alias" = String, Path, description = "Template alias")),
    responses((status = 200, body = TemplateAliasResponse), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn get_alias(
    State(cp): State<ControlPlane>,
    Path(alias): Path<String>,
) -> Result<Json<TemplateAliasResponse>, ApiError> {
    let record = find(&cp, &alias).await?;
    Ok(Json(TemplateAliasResponse {
        template_id: record.template_id.to_string(),
        public: record.public,
    }))
}

async fn find(cp: &ControlPlane, id_or_alias: &str) -> Result<TemplateRecord, ApiError> {
    cp.store().find_template(id_or_alias).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "template {id_or_alias:?} not found: no template has this ID or alias"
        ))
    })
}

fn template(record: &TemplateRecord) -> Template {
    Template {
        template_id: record.template_id.to_string(),
        build_id: record.build_id.to_string(),
        cpu_count: record.vcpus,
        memory_mb: record.memory_mib,
        disk_size_mb: record.disk_mb,
        public: record.public,
        aliases: record.aliases.clone(),
        names: record.aliases.clone(),
        created_at: record.created_at,
        updated_at: record.updated_at,
        created_by: None,
        last_spawned_at: record.last_spawned_at,
        spawn_count: record.spawn_count,
        build_count: record.build_count,
        envd_version: record.envd_version.clone(),
        build_status: record.status.as_str().to_owned(),
    }
}

#[utoipa::path(delete, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template or snapshot ID, or alias")),
    responses((status = 204, description = "Deleted"),
              (status = 400, body = ErrorBody, description = "The base template cannot be deleted"),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "A build is running, or snapshots need the template")))]
pub(crate) async fn delete(
    State(cp): State<ControlPlane>,
    Path(template_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    cp.delete_template(&template_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    request_body = TemplateUpdateRequest,
    responses((status = 200, body = TemplateUpdateResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn update_v1(
    state: State<ControlPlane>,
    path: Path<String>,
    body: ApiJson<TemplateUpdateRequest>,
) -> Result<Json<TemplateUpdateResponse>, ApiError> {
    update_v2(state, path, body).await
}

#[utoipa::path(patch, path = "/v2/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    request_body = TemplateUpdateRequest,
    responses((status = 200, body = TemplateUpdateResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn update_v2(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
    ApiJson(body): ApiJson<TemplateUpdateRequest>,
) -> Result<Json<TemplateUpdateResponse>, ApiError> {
    let record = find(&cp, &id_or_alias).await?;
    if let Some(public) = body.public {
        cp.store().set_template_public(&record.template_id, public).await?;
        tracing::info!(template_id = %record.template_id, public, "template updated");
    }
    Ok(Json(TemplateUpdateResponse { names: record.aliases }))
}

#[utoipa::path(post, path = "/v3/templates", tag = "templates",
    request_body = TemplateBuildRequestV3,
    responses((status = 202, body = TemplateRequestResponseV3, description = "Build recorded; upload files, then start it"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 501, body = ErrorBody, description = "No template builder")))]
pub(crate) async fn request_v3(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<TemplateBuildRequestV3>,
) -> Result<(StatusCode, Json<TemplateRequestResponseV3>), ApiError> {
    let response = cp.request_v3_build(body).await?;
    Ok((StatusCode::ACCEPTED, Json(response)))
}

/// Hearth's own route, not E2B's: records a build of a new or named template from a whole
/// Dockerfile. Start it with `POST /templates/{templateID}/builds/{buildID}`.
#[utoipa::path(post, path = "/templates", tag = "templates",
    request_body = DockerfileBuildRequest,
    responses((status = 202, body = TemplateRequestResponseV3), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 501, body = ErrorBody, description = "No template builder")))]
pub(crate) async fn request_dockerfile(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<DockerfileBuildRequest>,
) -> Result<(StatusCode, Json<TemplateRequestResponseV3>), ApiError> {
    let response = cp.request_dockerfile_build(None, body).await?;
    Ok((StatusCode::ACCEPTED, Json(response)))
}

/// Hearth's own route, not E2B's: records a new Dockerfile build of an existing template.
#[utoipa::path(post, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    request_body = DockerfileBuildRequest,
    responses((status = 202, body = TemplateRequestResponseV3), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 501, body = ErrorBody, description = "No template builder")))]
pub(crate) async fn rebuild_dockerfile(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
    ApiJson(body): ApiJson<DockerfileBuildRequest>,
) -> Result<(StatusCode, Json<TemplateRequestResponseV3>), ApiError> {
    let response = cp.request_dockerfile_build(Some(&id_or_alias), body).await?;
    Ok((StatusCode::ACCEPTED, Json(response)))
}

#[utoipa::path(post, path = "/v2/templates/{templateID}/builds/{buildID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("buildID" = String, Path, description = "Build ID from POST /v3/templates")),
    request_body = TemplateBuildStartV2,
    responses((status = 202, description = "Build started"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The build was started already"),
              (status = 501, body = ErrorBody, description = "No template builder")))]
pub(crate) async fn start_v2(
    State(cp): State<ControlPlane>,
    Path((template_id, build_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<TemplateBuildStartV2>,
) -> Result<StatusCode, ApiError> {
    cp.start_v2_build(&template_id, &build_id, body).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Hearth's own route, not E2B's: starts a build recorded by `POST /templates`. The
/// optional body names an uploaded build context.
#[utoipa::path(post, path = "/templates/{templateID}/builds/{buildID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("buildID" = String, Path, description = "Build ID from POST /templates")),
    request_body(content = Option<DockerfileBuildStart>),
    responses((status = 202, description = "Build started"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The build was started already"),
              (status = 501, body = ErrorBody, description = "No template builder")))]
pub(crate) async fn start_dockerfile(
    State(cp): State<ControlPlane>,
    Path((template_id, build_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let body: DockerfileBuildStart = if body.iter().all(u8::is_ascii_whitespace) {
        DockerfileBuildStart::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))?
    };
    cp.start_dockerfile_build(&template_id, &build_id, body).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/status", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("buildID" = String, Path, description = "Build ID"), BuildStatusQuery),
    responses((status = 200, body = TemplateBuildInfo), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn build_status(
    State(cp): State<ControlPlane>,
    Path((template_id, build_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<BuildStatusQuery>,
) -> Result<Json<TemplateBuildInfo>, ApiError> {
    Ok(Json(cp.build_status(&template_id, &build_id, query).await?))
}

#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/logs", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("buildID" = String, Path, description = "Build ID"), BuildLogsQuery),
    responses((status = 200, body = TemplateBuildLogsResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn build_logs(
    State(cp): State<ControlPlane>,
    Path((template_id, build_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<BuildLogsQuery>,
) -> Result<Json<TemplateBuildLogsResponse>, ApiError> {
    Ok(Json(cp.build_logs(&template_id, &build_id, query).await?))
}

#[utoipa::path(get, path = "/templates/{templateID}/files/{hash}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("hash" = String, Path, description = "Hash of the files (the SDK sends lowercase hex SHA-256)")),
    responses((status = 201, body = TemplateBuildFileUpload, description = "Whether the file is present, and where to upload it"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn file_upload_link(
    State(cp): State<ControlPlane>,
    Path((id_or_alias, hash)): Path<(String, String)>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<(StatusCode, Json<TemplateBuildFileUpload>), ApiError> {
    template_names::check_hash("hash", &hash)?;
    let record = find(&cp, &id_or_alias).await?;
    let base_url = request_base_url(&headers, &uri)?;
    let token = cp.files().issue_token(record.template_id.as_str(), &hash);
    let url = format!("{base_url}/templates/{}/files/{hash}/upload?token={token}", record.template_id);
    Ok((
        StatusCode::CREATED,
        Json(TemplateBuildFileUpload {
            present: cp.files().is_present(&hash),
            url: Some(url),
        }),
    ))
}

/// Hearth's own route, not E2B's: the upload URL that `GET /templates/{templateID}/files/{hash}`
/// returns. It needs no API key: the token in the URL authorises one template and file.
#[utoipa::path(put, path = "/templates/{templateID}/files/{hash}/upload", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID"),
           ("hash" = String, Path, description = "Hash of the files"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The tar archive"),
    responses((status = 201, description = "Stored"), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "Invalid or expired token"),
              (status = 413, body = ErrorBody)),
    security(()))]
pub(crate) async fn upload_file(
    State(cp): State<ControlPlane>,
    Path((template_id, hash)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    template_names::check_hash("hash", &hash)?;
    cp.files()
        .verify_token(&template_id, &hash, &query.token)
        .map_err(|err| {
            tracing::warn!(template_id = %template_id, hash = %hash, error = %err, "template file upload rejected");
            let status = if err == TokenError::Malformed { StatusCode::BAD_REQUEST } else { StatusCode::FORBIDDEN };
            ApiError::new(status, format!("upload rejected: {err}"))
        })?;
    let bytes = cp.files().write(&hash, body).await.map_err(|err| match err {
        crate::template_files::FileStoreError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, err.to_string())
        }
        crate::template_files::FileStoreError::Body(_) => {
            ApiError::bad_request(format!("upload of {hash} failed: {}", crate::error::error_chain(&err)))
        }
        other => ApiError::internal("failed to store the uploaded file", &other),
    })?;
    tracing::info!(template_id = %template_id, hash = %hash, bytes, "template file uploaded");
    Ok(StatusCode::CREATED)
}

#[utoipa::path(post, path = "/templates/tags", tag = "templates",
    request_body = AssignTemplateTagsRequest,
    responses((status = 201, body = AssignedTemplateTags), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn assign_tags(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<AssignTemplateTagsRequest>,
) -> Result<(StatusCode, Json<AssignedTemplateTags>), ApiError> {
    Ok((StatusCode::CREATED, Json(cp.assign_tags(body).await?)))
}

#[utoipa::path(delete, path = "/templates/tags", tag = "templates",
    request_body = DeleteTemplateTagsRequest,
    responses((status = 204, description = "Removed"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_tags(
    State(cp): State<ControlPlane>,
    ApiJson(body): ApiJson<DeleteTemplateTagsRequest>,
) -> Result<StatusCode, ApiError> {
    cp.delete_tags(body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/templates/{templateID}/tags", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    responses((status = 200, body = Vec<TemplateTag>), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn list_tags(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
) -> Result<Json<Vec<TemplateTag>>, ApiError> {
    Ok(Json(cp.list_tags(&id_or_alias).await?))
}

#[utoipa::path(get, path = "/templates/{templateID}/tags/count", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    responses((status = 200, body = TemplateTagsCountResponse), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn count_tags(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
) -> Result<Json<TemplateTagsCountResponse>, ApiError> {
    let total = cp.list_tags(&id_or_alias).await?.len() as i64;
    Ok(Json(TemplateTagsCountResponse { total }))
}

#[utoipa::path(get, path = "/templates/{templateID}/tags/exists", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"), TagExistsQuery),
    responses((status = 200, body = TemplateTagExistsResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn tag_exists(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
    ApiQuery(query): ApiQuery<TagExistsQuery>,
) -> Result<Json<TemplateTagExistsResponse>, ApiError> {
    Ok(Json(cp.tag_exists(&id_or_alias, &query.tag).await?))
}

#[utoipa::path(get, path = "/templates/{templateID}/tags/groups", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"), TagGroupsQuery),
    responses((status = 200, body = TemplateTagGroupsResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn tag_groups(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
    ApiQuery(query): ApiQuery<TagGroupsQuery>,
) -> Result<Json<TemplateTagGroupsResponse>, ApiError> {
    Ok(Json(cp.tag_groups(&id_or_alias, query).await?))
}

#[utoipa::path(get, path = "/templates/{templateID}/tags/{tag}/assignments", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias"),
           ("tag" = String, Path, description = "Tag"), AssignmentsQuery),
    responses((status = 200, body = TemplateTagAssignmentsResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn tag_assignments(
    State(cp): State<ControlPlane>,
    Path((id_or_alias, tag)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<AssignmentsQuery>,
) -> Result<Json<TemplateTagAssignmentsResponse>, ApiError> {
    Ok(Json(cp.tag_assignments(&id_or_alias, &tag, query).await?))
}

/// Reads `nextToken` (an offset issued by a previous page) and `limit` (1 to 100, default 100).
fn page(query: &PageQuery) -> Result<(usize, usize), ApiError> {
    let limit = query.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("invalid limit {limit}: expected 1 to {MAX_PAGE}")));
    }
    let offset = match query.next_token.as_deref() {
        None | Some("") => 0,
        Some(token) => token.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid nextToken {token:?}: pass the X-Next-Token header of the previous page"
            ))
        })?,
    };
    Ok((offset, limit as usize))
}

fn next_token_header(next: Option<usize>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(next) = next {
        headers.insert(NEXT_TOKEN_HEADER, HeaderValue::from(next));
    }
    headers
}

/// Returns `scheme://host` of this API as the client reached it: the `Host` header (or the
/// HTTP/2 authority), and https only when a proxy in front sets `X-Forwarded-Proto: https`.
fn request_base_url(headers: &HeaderMap, uri: &axum::http::Uri) -> Result<String, ApiError> {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| uri.authority().map(|authority| authority.as_str()))
        .ok_or_else(|| ApiError::bad_request("missing Host header: it is needed to build the upload URL"))?;
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'));
    if !valid {
        return Err(ApiError::bad_request(format!("invalid Host header {host:?}")));
    }
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    let scheme = if https { "https" } else { "http" };
    Ok(format!("{scheme}://{host}"))
}
