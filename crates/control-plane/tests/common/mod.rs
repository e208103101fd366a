//! Shared set-up: a control plane over a real SQLite file in a temporary directory, with
//! the recording runtime, a configured API key and a ready `base` template.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use hearth_control_plane::store::TemplateBuildRecord;
use hearth_control_plane::testing::RecordingRuntime;
use hearth_control_plane::{build, new_build_id, ControlPlane, ControlPlaneConfig};
use hearth_types::TemplateId;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The key passed in as if from `HEARTH_API_KEY`.
pub const API_KEY: &str = "e2b_0123456789abcdef0123456789abcdef01234567";

/// ID of the template registered with alias `base`.
pub const BASE_TEMPLATE_ID: &str = "base0template0id";

pub struct Harness {
    pub router: Router,
    pub control_plane: ControlPlane,
    pub runtime: Arc<RecordingRuntime>,
    pub data_dir: tempfile::TempDir,
}

pub fn config(data_dir: &std::path::Path) -> ControlPlaneConfig {
    let mut config = ControlPlaneConfig::new(data_dir);
    config.api_keys_from_env = vec![API_KEY.to_owned()];
    config.max_timeout = Duration::from_secs(3600);
    config.reaper_interval = Duration::from_millis(100);
    config
}

pub async fn harness() -> Harness {
    let data_dir = tempfile::tempdir().expect("create temp dir");
    harness_in(data_dir, RecordingRuntime::new()).await
}

pub async fn harness_in(data_dir: tempfile::TempDir, runtime: RecordingRuntime) -> Harness {
    let runtime = Arc::new(runtime);
    let (router, control_plane) = build(config(data_dir.path()), runtime.clone())
        .await
        .expect("build control plane");
    register_base_template(&control_plane).await;
    Harness {
        router,
        control_plane,
        runtime,
        data_dir,
    }
}

/// Registers a ready `base` template, as `hearth serve` does on its first start.
pub async fn register_base_template(control_plane: &hearth_control_plane::ControlPlane) {
    control_plane
        .store()
        .register_template_build(&TemplateBuildRecord {
            template_id: TemplateId::parse(BASE_TEMPLATE_ID).unwrap(),
            build_id: new_build_id(),
            vcpus: 2,
            memory_mib: 512,
            disk_mb: 2048,
            envd_version: hearth_types::ENVD_VERSION.to_owned(),
            aliases: vec!["base".to_owned()],
        })
        .await
        .expect("register base template");
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Harness {
    pub async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        self.call_raw(method, uri, Some(API_KEY), body.map(|b| b.to_string()))
            .await
    }

    pub async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body)),
            None => request.body(Body::empty()),
        }
        .unwrap();

        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router never fails");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    /// Creates a sandbox through `POST /v2/sandboxes` and returns its ID.
    pub async fn create(&self, body: Value) -> String {
        let reply = self.call(Method::POST, "/v2/sandboxes", Some(body)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        reply.body["sandboxID"].as_str().unwrap().to_owned()
    }
}

/// Checks that an error reply has the JSON shape the SDK reads.
pub fn assert_error(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(
        reply.body["code"].as_u64(),
        Some(u64::from(status.as_u16())),
        "{}",
        reply.text
    );
    assert!(
        reply.body["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        reply.text
    );
}
