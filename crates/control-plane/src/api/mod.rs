//! The REST router and its OpenAPI document.

mod sandboxes;
mod templates;

use axum::middleware::from_fn_with_state;
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::error::{self, ApiError, ErrorBody};
use crate::template_models as tm;
use crate::{auth, models, ControlPlane};

/// OpenAPI 3 description of the implemented routes, served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Hearth API", description = "E2B-compatible sandbox API of a Hearth server."),
    paths(
        sandboxes::create_v1,
        sandboxes::create_v2,
        sandboxes::list_v1,
        sandboxes::list_v2,
        sandboxes::get,
        sandboxes::kill,
        sandboxes::set_timeout,
        sandboxes::refresh,
        sandboxes::connect_v1,
        sandboxes::connect_v2,
        sandboxes::pause,
        sandboxes::update_network,
        sandboxes::resume,
        sandboxes::fork,
        sandboxes::create_snapshot,
        sandboxes::list_snapshots,
        templates::list,
        templates::list_v2,
        templates::get,
        templates::get_alias,
        templates::delete,
        templates::update_v1,
        templates::update_v2,
        templates::request_v3,
        templates::request_dockerfile,
        templates::rebuild_dockerfile,
        templates::start_v2,
        templates::start_dockerfile,
        templates::build_status,
        templates::build_logs,
        templates::file_upload_link,
        templates::upload_file,
        templates::assign_tags,
        templates::delete_tags,
        templates::list_tags,
        templates::count_tags,
        templates::tag_exists,
        templates::tag_groups,
        templates::tag_assignments,
    ),
    components(schemas(
        ErrorBody,
        models::NewSandbox,
        crate::network::NetworkUpdate,
        models::CreatedSandbox,
        models::SandboxDetail,
        models::SandboxLifecycle,
        models::ListedSandbox,
        models::SandboxTimeoutRequest,
        models::SandboxRefreshRequest,
        models::ConnectSandbox,
        models::SandboxPauseRequest,
        models::ResumedSandbox,
        models::SandboxForkRequest,
        models::SandboxForkResult,
        models::SandboxSnapshotRequest,
        models::SnapshotInfo,
        models::Template,
        models::TemplateBuild,
        models::TemplateWithBuilds,
        models::TemplateAliasResponse,
        tm::TemplateBuildRequestV3,
        tm::TemplateRequestResponseV3,
        tm::TemplateBuildStartV2,
        tm::TemplateStep,
        tm::TemplateBuildFileUpload,
        tm::BuildLogEntry,
        tm::BuildStatusReason,
        tm::TemplateBuildInfo,
        tm::TemplateBuildLogsResponse,
        tm::DockerfileBuildRequest,
        tm::DockerfileBuildStart,
        tm::TemplateUpdateRequest,
        tm::TemplateUpdateResponse,
        tm::AssignTemplateTagsRequest,
        tm::AssignedTemplateTags,
        tm::DeleteTemplateTagsRequest,
        tm::TemplateTag,
        tm::TemplateTagsCountResponse,
        tm::TemplateTagExistsResponse,
        tm::TemplateTagAssignment,
        tm::TemplateTagAssignmentsResponse,
        tm::TemplateTagGroup,
        tm::TemplateTagGroupsResponse,
    )),
    modifiers(&ApiKeySecurity),
    security(("ApiKeyAuth" = [])),
    tags((name = "sandboxes"), (name = "templates"))
)]
pub struct ApiDoc;

/// Adds the `X-API-Key` security scheme.
struct ApiKeySecurity;

impl utoipa::Modify for ApiKeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "ApiKeyAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Builds the router: `/openapi.json` and `/health` are public, everything else needs a key.
pub(crate) fn router(control_plane: ControlPlane) -> Router {
    let api = Router::new()
        .route(
            "/sandboxes",
            get(sandboxes::list_v1).post(sandboxes::create_v1),
        )
        .route(
            "/v2/sandboxes",
            get(sandboxes::list_v2).post(sandboxes::create_v2),
        )
        .route(
            "/sandboxes/{sandbox_id}",
            get(sandboxes::get).delete(sandboxes::kill),
        )
        .route(
            "/sandboxes/{sandbox_id}/timeout",
            post(sandboxes::set_timeout),
        )
        .route(
            "/sandboxes/{sandbox_id}/refreshes",
            post(sandboxes::refresh),
        )
        .route(
            "/sandboxes/{sandbox_id}/connect",
            post(sandboxes::connect_v1),
        )
        .route(
            "/v2/sandboxes/{sandbox_id}/connect",
            post(sandboxes::connect_v2),
        )
        .route("/sandboxes/{sandbox_id}/pause", post(sandboxes::pause))
        .route(
            "/sandboxes/{sandbox_id}/network",
            put(sandboxes::update_network),
        )
        .route("/sandboxes/{sandbox_id}/resume", post(sandboxes::resume))
        .route("/sandboxes/{sandbox_id}/fork", post(sandboxes::fork))
        .route(
            "/sandboxes/{sandbox_id}/snapshots",
            post(sandboxes::create_snapshot),
        )
        .route("/snapshots", get(sandboxes::list_snapshots));
    let api = add_template_routes(api);
    let api = add_unsupported_routes(api)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(from_fn_with_state(
            control_plane.clone(),
            auth::require_api_key,
        ))
        .with_state(control_plane.clone());

    // The upload URL carries its own token in place of the API key.
    let uploads = Router::new()
        .route(
            "/templates/{template_id}/files/{hash}/upload",
            put(templates::upload_file),
        )
        .with_state(control_plane);

    Router::new()
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .merge(uploads)
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .merge(api)
}

/// Template routes: E2B's, plus Hearth's Dockerfile build flow (`POST /templates`,
/// `POST /templates/{templateID}` and `POST /templates/{templateID}/builds/{buildID}`).
fn add_template_routes(router: Router<ControlPlane>) -> Router<ControlPlane> {
    router
        .route(
            "/templates",
            get(templates::list).post(templates::request_dockerfile),
        )
        .route(
            "/templates/{template_id}",
            get(templates::get)
                .patch(templates::update_v1)
                .delete(templates::delete)
                .post(templates::rebuild_dockerfile),
        )
        .route("/templates/aliases/{alias}", get(templates::get_alias))
        .route("/v2/templates", get(templates::list_v2))
        .route("/v2/templates/{template_id}", patch(templates::update_v2))
        .route("/v3/templates", post(templates::request_v3))
        .route(
            "/v2/templates/{template_id}/builds/{build_id}",
            post(templates::start_v2),
        )
        .route(
            "/templates/{template_id}/builds/{build_id}",
            post(templates::start_dockerfile),
        )
        .route(
            "/templates/{template_id}/builds/{build_id}/status",
            get(templates::build_status),
        )
        .route(
            "/templates/{template_id}/builds/{build_id}/logs",
            get(templates::build_logs),
        )
        .route(
            "/templates/{template_id}/files/{hash}",
            get(templates::file_upload_link),
        )
        .route(
            "/templates/tags",
            post(templates::assign_tags).delete(templates::delete_tags),
        )
        .route("/templates/{template_id}/tags", get(templates::list_tags))
        .route(
            "/templates/{template_id}/tags/count",
            get(templates::count_tags),
        )
        .route(
            "/templates/{template_id}/tags/exists",
            get(templates::tag_exists),
        )
        .route(
            "/templates/{template_id}/tags/groups",
            get(templates::tag_groups),
        )
        .route(
            "/templates/{template_id}/tags/{tag}/assignments",
            get(templates::tag_assignments),
        )
}

/// Routes the E2B SDK calls that Hearth does not implement yet. Each returns 501 with a
/// JSON error naming the feature, which the SDK raises as a `SandboxException`.
fn add_unsupported_routes(router: Router<ControlPlane>) -> Router<ControlPlane> {
    router
        .route("/sandboxes/metrics", get(unsupported("sandbox metrics")))
        .route(
            "/sandboxes/{sandbox_id}/logs",
            get(unsupported("sandbox logs")),
        )
        .route(
            "/v2/sandboxes/{sandbox_id}/logs",
            get(unsupported("sandbox logs")),
        )
        .route(
            "/sandboxes/{sandbox_id}/metrics",
            get(unsupported("sandbox metrics")),
        )
        .route("/default-templates", get(unsupported("default templates")))
        .route(
            "/volumes",
            get(unsupported("volumes")).post(unsupported("volumes")),
        )
        .route(
            "/volumes/{volume_id}",
            get(unsupported("volumes")).delete(unsupported("volumes")),
        )
        .route(
            "/secrets",
            get(unsupported("secrets")).post(unsupported("secrets")),
        )
        .route(
            "/secrets/{secret_id}",
            get(unsupported("secrets"))
                .post(unsupported("secrets"))
                .delete(unsupported("secrets")),
        )
}

/// Returns a handler that responds 501 naming `feature`.
fn unsupported(
    feature: &'static str,
) -> impl Fn() -> std::future::Ready<ApiError> + Clone + Send + Sync + 'static {
    move || std::future::ready(ApiError::not_implemented(feature))
}
