//! Template routes: listing and lookups. Building templates through the API comes later.

use axum::extract::{Path, State};
use axum::Json;

use crate::error::{ApiError, ErrorBody};
use crate::models::{Template, TemplateAliasResponse, TemplateBuild, TemplateWithBuilds};
use crate::store::TemplateRecord;
use crate::ControlPlane;

#[utoipa::path(get, path = "/templates", tag = "templates",
    responses((status = 200, body = Vec<Template>), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(State(cp): State<ControlPlane>) -> Result<Json<Vec<Template>>, ApiError> {
    let templates = cp.store().list_templates().await?;
    Ok(Json(templates.iter().map(template).collect()))
}

#[utoipa::path(get, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template ID or alias")),
    responses((status = 200, body = TemplateWithBuilds), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(cp): State<ControlPlane>,
    Path(id_or_alias): Path<String>,
) -> Result<Json<TemplateWithBuilds>, ApiError> {
    let record = find(&cp, &id_or_alias).await?;
    let builds = cp.store().list_template_builds(&record.template_id).await?;
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
    Ok(Json(TemplateWithBuilds {
        template: template(&record),
        builds,
    }))
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
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 501, body = ErrorBody)))]
pub(crate) async fn delete(
    State(cp): State<ControlPlane>,
    Path(template_id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    cp.delete_snapshot(&template_id).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
