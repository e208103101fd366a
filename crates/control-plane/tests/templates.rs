//! Template build, file upload and tag routes, against a real SQLite store and the
//! recording builder and runtime.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use hearth_control_plane::builds::BuildSource;
use hearth_control_plane::testing::{RecordingBuilder, RecordingRuntime};
use hearth_control_plane::{build_with_template_builder, new_build_id};
use hearth_types::TemplateId;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{assert_error, config, harness, register_base_template, Harness, Reply, API_KEY, BASE_TEMPLATE_ID};

/// Hash of a file uploaded in the tests (the SDK sends hex SHA-256).
const HASH: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

async fn builder_harness() -> (Harness, Arc<RecordingBuilder>) {
    builder_harness_in(tempfile::tempdir().unwrap()).await
}

async fn builder_harness_in(data_dir: tempfile::TempDir) -> (Harness, Arc<RecordingBuilder>) {
    let runtime = Arc::new(RecordingRuntime::new());
    let builder = Arc::new(RecordingBuilder::new());
    let (router, control_plane) =
        build_with_template_builder(config(data_dir.path()), runtime.clone(), Some(builder.clone()))
            .await
            .expect("build control plane");
    register_base_template(&control_plane).await;
    let harness = Harness { router, control_plane, runtime, data_dir };
    (harness, builder)
}

/// Sends a request with the given extra headers and optional raw body.
async fn send(h: &Harness, method: Method, uri: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
    let response = h.router.clone().oneshot(request).await.expect("router never fails");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply { status, headers, body, text }
}

/// Requests a build through `POST /v3/templates` and returns (templateID, buildID).
async fn request_build(h: &Harness, body: Value) -> (String, String) {
    let reply = h.call(Method::POST, "/v3/templates", Some(body)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    (
        reply.body["templateID"].as_str().unwrap().to_owned(),
        reply.body["buildID"].as_str().unwrap().to_owned(),
    )
}

async fn start_build(h: &Harness, template_id: &str, build_id: &str, body: Value) -> Reply {
    h.call(Method::POST, &format!("/v2/templates/{template_id}/builds/{build_id}"), Some(body))
        .await
}

async fn status(h: &Harness, template_id: &str, build_id: &str, query: &str) -> Reply {
    h.call(Method::GET, &format!("/templates/{template_id}/builds/{build_id}/status{query}"), None)
        .await
}

/// Polls the build status until it is `ready` or `error`, and returns the last reply.
async fn wait_finished(h: &Harness, template_id: &str, build_id: &str) -> Reply {
    for _ in 0..200 {
        let reply = status(h, template_id, build_id, "?limit=0").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        if matches!(reply.body["status"].as_str(), Some("ready" | "error")) {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("build {build_id} did not finish within 5 s");
}

/// Builds a template from the base image and returns (templateID, buildID) once it is ready.
async fn build_ready(h: &Harness, name: &str) -> (String, String) {
    let (template_id, build_id) = request_build(h, json!({"name": name})).await;
    let started = start_build(h, &template_id, &build_id, json!({"fromImage": "e2bdev/base"})).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.text);
    let finished = wait_finished(h, &template_id, &build_id).await;
    assert_eq!(finished.body["status"], "ready", "{}", finished.text);
    (template_id, build_id)
}

/// Uploads `content` as the file `hash` of a template through the returned upload URL.
async fn upload(h: &Harness, template_id: &str, hash: &str, content: &[u8]) {
    let link = send(
        h,
        Method::GET,
        &format!("/templates/{template_id}/files/{hash}"),
        &[("x-api-key", API_KEY), ("host", "api.test:3000")],
        None,
    )
    .await;
    assert_eq!(link.status, StatusCode::CREATED, "{}", link.text);
    let url = link.body["url"].as_str().unwrap();
    let path = url.strip_prefix("http://api.test:3000").expect("URL on the request's host");
    let put = send(h, Method::PUT, path, &[], Some(content.to_vec())).await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.text);
}

fn is_uuid(value: &Value) -> bool {
    value.as_str().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
}

#[tokio::test]
async fn v3_request_returns_ids_and_default_tag() {
    let (h, _) = builder_harness().await;
    let reply = h.call(Method::POST, "/v3/templates", Some(json!({"name": "my-app", "cpuCount": 1}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert!(is_uuid(&reply.body["buildID"]), "{}", reply.text);
    assert_eq!(reply.body["names"], json!(["my-app"]));
    assert_eq!(reply.body["aliases"], json!(["my-app"]));
    assert_eq!(reply.body["tags"], json!(["default"]));
    assert_eq!(reply.body["public"], false);

    let again = h.call(Method::POST, "/v3/templates", Some(json!({"name": "my-app:v2", "tags": ["x"]}))).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    assert_eq!(again.body["templateID"], reply.body["templateID"]);
    assert_ne!(again.body["buildID"], reply.body["buildID"]);
    assert_eq!(again.body["tags"], json!(["v2", "x"]));

    let deprecated = h.call(Method::POST, "/v3/templates", Some(json!({"alias": "old-style"}))).await;
    assert_eq!(deprecated.status, StatusCode::ACCEPTED, "{}", deprecated.text);
    assert_eq!(deprecated.body["names"], json!(["old-style"]));

    let template = h.call(Method::GET, "/templates/my-app", None).await;
    assert_eq!(template.body["buildStatus"], "waiting");
    assert_eq!(template.body["builds"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn v3_request_validation() {
    let (h, _) = builder_harness().await;
    let long = "a".repeat(129);
    for (body, needle) in [
        (json!({}), "missing name"),
        (json!({"name": "My-App"}), "lowercase"),
        (json!({"name": ""}), "empty"),
        (json!({"name": long}), "longer than"),
        (json!({"name": "-app"}), "start with"),
        (json!({"name": "app:Bad"}), "tag"),
        (json!({"name": "app", "tags": ["a b"]}), "tags"),
        (json!({"name": "app", "cpuCount": 0}), "cpuCount"),
        (json!({"name": "app", "memoryMB": 64}), "memoryMB"),
        (json!({"name": "app", "minFreeDiskMb": -1}), "minFreeDiskMb"),
        (json!({"name": "app", "unknownField": 1}), "unknownField"),
    ] {
        let reply = h.call(Method::POST, "/v3/templates", Some(body.clone())).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
        assert!(reply.body["message"].as_str().unwrap().contains(needle), "{body}: {}", reply.text);
    }
}

#[tokio::test]
async fn build_routes_are_501_without_builder() {
    let h = harness().await;
    let reply = h.call(Method::POST, "/v3/templates", Some(json!({"name": "app"}))).await;
    assert_error(&reply, StatusCode::NOT_IMPLEMENTED);
    let dockerfile = h
        .call(Method::POST, "/templates", Some(json!({"alias": "app", "dockerfile": "FROM alpine"})))
        .await;
    assert_error(&dockerfile, StatusCode::NOT_IMPLEMENTED);
    let start = h
        .call(Method::POST, &format!("/v2/templates/base/builds/{}", new_build_id()), Some(json!({"fromImage": "alpine"})))
        .await;
    assert_error(&start, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test]
async fn file_link_and_upload() {
    let (h, _) = builder_harness().await;
    let (template_id, _) = request_build(&h, json!({"name": "files"})).await;
    let uri = format!("/templates/{template_id}/files/{HASH}");

    let link = send(&h, Method::GET, &uri, &[("x-api-key", API_KEY), ("host", "api.test:3000")], None).await;
    assert_eq!(link.status, StatusCode::CREATED, "{}", link.text);
    assert_eq!(link.body["present"], false);
    let url = link.body["url"].as_str().unwrap();
    let prefix = format!("http://api.test:3000/templates/{template_id}/files/{HASH}/upload?token=");
    assert!(url.starts_with(&prefix), "{url}");

    let https = send(
        &h,
        Method::GET,
        &uri,
        &[("x-api-key", API_KEY), ("host", "api.test"), ("x-forwarded-proto", "https")],
        None,
    )
    .await;
    assert!(https.body["url"].as_str().unwrap().starts_with("https://api.test/"), "{}", https.text);

    upload(&h, &template_id, HASH, b"archive bytes").await;
    let stored = std::fs::read(h.data_dir.path().join("template-files").join(HASH)).unwrap();
    assert_eq!(stored, b"archive bytes");
    let present = send(&h, Method::GET, &uri, &[("x-api-key", API_KEY), ("host", "api.test")], None).await;
    assert_eq!(present.body["present"], true);
    assert!(present.body["url"].is_string(), "a forced upload needs the URL: {}", present.text);

    let bad_hash = send(&h, Method::GET, &format!("/templates/{template_id}/files/..%2Fx"), &[("x-api-key", API_KEY), ("host", "a")], None).await;
    assert_error(&bad_hash, StatusCode::BAD_REQUEST);
    let unknown = send(&h, Method::GET, &format!("/templates/nosuch/files/{HASH}"), &[("x-api-key", API_KEY), ("host", "a")], None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
    let no_key = send(&h, Method::GET, &uri, &[("host", "a")], None).await;
    assert_error(&no_key, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn upload_token_rejection() {
    let (h, _) = builder_harness().await;
    let (template_id, _) = request_build(&h, json!({"name": "tokens"})).await;
    let link = send(
        &h,
        Method::GET,
        &format!("/templates/{template_id}/files/{HASH}"),
        &[("x-api-key", API_KEY), ("host", "api.test")],
        None,
    )
    .await;
    let url = link.body["url"].as_str().unwrap();
    let token = url.split("token=").nth(1).unwrap();
    let other_hash = "a".repeat(64);

    let wrong_file = send(
        &h,
        Method::PUT,
        &format!("/templates/{template_id}/files/{other_hash}/upload?token={token}"),
        &[],
        Some(b"x".to_vec()),
    )
    .await;
    assert_error(&wrong_file, StatusCode::FORBIDDEN);
    let wrong_template = send(
        &h,
        Method::PUT,
        &format!("/templates/other0template/files/{HASH}/upload?token={token}"),
        &[],
        Some(b"x".to_vec()),
    )
    .await;
    assert_error(&wrong_template, StatusCode::FORBIDDEN);
    let (expiry, signature) = token.split_once('.').unwrap();
    let later = expiry.parse::<i64>().unwrap() + 3600;
    let extended = send(
        &h,
        Method::PUT,
        &format!("/templates/{template_id}/files/{HASH}/upload?token={later}.{signature}"),
        &[],
        Some(b"x".to_vec()),
    )
    .await;
    assert_error(&extended, StatusCode::FORBIDDEN);
    let malformed = send(
        &h,
        Method::PUT,
        &format!("/templates/{template_id}/files/{HASH}/upload?token=garbage"),
        &[],
        Some(b"x".to_vec()),
    )
    .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST);
    let missing = send(&h, Method::PUT, &format!("/templates/{template_id}/files/{HASH}/upload"), &[], Some(b"x".to_vec())).await;
    assert_error(&missing, StatusCode::BAD_REQUEST);

    let files: Vec<_> = std::fs::read_dir(h.data_dir.path().join("template-files")).unwrap().collect();
    assert!(files.is_empty(), "a rejected upload left files behind");
}

#[tokio::test]
async fn v2_start_runs_builder_with_steps() {
    let (h, builder) = builder_harness().await;
    let (template_id, build_id) =
        request_build(&h, json!({"name": "steps", "cpuCount": 4, "memoryMB": 1024})).await;
    upload(&h, &template_id, HASH, b"tar").await;

    let body = json!({
        "fromImage": "e2bdev/base:latest",
        "force": false,
        "steps": [
            {"type": "RUN", "args": ["apt-get update", "root"], "force": false},
            {"type": "COPY", "args": ["src", "/app", "", ""], "filesHash": HASH, "force": true, "forceUpload": null},
            {"type": "ENV", "args": ["A", "1", "B", "2"], "force": false},
            {"type": "WORKDIR", "args": ["/app"], "force": false},
            {"type": "USER", "args": ["user"], "force": false},
        ],
        "startCmd": "python app.py",
        "readyCmd": "curl -f localhost:8000",
    });
    let started = start_build(&h, &template_id, &build_id, body).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.text);
    let finished = wait_finished(&h, &template_id, &build_id).await;
    assert_eq!(finished.body["status"], "ready", "{}", finished.text);
    assert_eq!(finished.body["logs"], json!([]));
    assert!(finished.body.get("reason").is_none(), "{}", finished.text);

    let specs = builder.specs();
    assert_eq!(specs.len(), 1);
    let spec = &specs[0];
    assert_eq!(spec.build_id.as_str(), build_id);
    assert!(
        matches!(&spec.source, BuildSource::Template { template_id, .. } if template_id.as_str() == BASE_TEMPLATE_ID),
        "{:?}",
        spec.source
    );
    assert_eq!(spec.steps.len(), 5);
    assert_eq!(spec.steps[0].args, vec!["apt-get update", "root"]);
    assert_eq!(spec.steps[1].files_hash.as_deref(), Some(HASH));
    assert!(spec.steps[1].force);
    assert_eq!(spec.start_cmd.as_deref(), Some("python app.py"));
    assert_eq!(spec.ready_cmd.as_deref(), Some("curl -f localhost:8000"));
    assert_eq!(spec.vcpus, 4);
    assert_eq!(spec.memory_mib, 1024);
    assert_eq!(spec.files_dir, h.data_dir.path().join("template-files"));

    let template = h.call(Method::GET, &format!("/templates/{template_id}"), None).await;
    assert_eq!(template.body["buildID"], build_id);
    assert_eq!(template.body["buildStatus"], "ready");
    assert_eq!(template.body["cpuCount"], 4);
    assert_eq!(template.body["builds"][0]["status"], "ready");

    let sandbox = h.create(json!({"templateID": "steps"})).await;
    let last = h.runtime.started().pop().unwrap();
    assert_eq!(last.sandbox_id.as_str(), sandbox);
    assert_eq!(last.build_id.as_str(), build_id);

    let twice = start_build(&h, &template_id, &build_id, json!({"fromImage": "alpine"})).await;
    assert_error(&twice, StatusCode::CONFLICT);
}

#[tokio::test]
async fn v2_start_validation() {
    let (h, builder) = builder_harness().await;
    let (template_id, build_id) = request_build(&h, json!({"name": "checks"})).await;
    let long_run = json!({"type": "RUN", "args": []});
    for (body, needle) in [
        (json!({}), "missing fromImage"),
        (json!({"fromImage": "alpine", "fromTemplate": "base"}), "not both"),
        (json!({"fromImage": "alpine", "fromImageRegistry": {"type": "aws", "awsAccessKeyId": "a"}}), "not supported by Hearth"),
        (json!({"fromImage": "alpine", "fromImageRegistry": {"type": "gcp", "serviceAccountJson": "{}"}}), "not supported by Hearth"),
        (json!({"fromImage": "alpine", "fromImageRegistry": {"type": "registry", "username": "u"}}), "password"),
        (json!({"fromTemplate": "nosuch"}), "fromTemplate"),
        (json!({"fromImage": "bad image"}), "fromImage"),
        (json!({"fromImage": "alpine", "steps": [{"type": "ADD", "args": ["a", "b"]}]}), "step 1"),
        (json!({"fromImage": "alpine", "steps": [{"type": "RUN", "args": ["ls"]}, long_run]}), "step 2"),
        (json!({"fromImage": "alpine", "steps": [{"type": "ENV", "args": ["A"]}]}), "key/value"),
        (json!({"fromImage": "alpine", "steps": [{"type": "WORKDIR", "args": ["/a", "/b"]}]}), "step 1"),
        (json!({"fromImage": "alpine", "steps": [{"type": "COPY", "args": ["a", "/b", "", ""]}]}), "filesHash"),
        (
            json!({"fromImage": "alpine", "steps": [{"type": "RUN", "args": ["ls"]}, {"type": "USER", "args": ["u"]}, {"type": "COPY", "args": ["a", "/b", "", ""], "filesHash": HASH}]}),
            "step 3 (COPY)",
        ),
        (json!({"fromImage": "alpine", "unknown": true}), "unknown"),
    ] {
        let reply = start_build(&h, &template_id, &build_id, body.clone()).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
        assert!(reply.body["message"].as_str().unwrap().contains(needle), "{body}: {}", reply.text);
    }
    assert!(builder.specs().is_empty());
    let waiting = status(&h, &template_id, &build_id, "").await;
    assert_eq!(waiting.body["status"], "waiting");

    let unknown_build = start_build(&h, &template_id, &new_build_id().to_string(), json!({"fromImage": "alpine"})).await;
    assert_error(&unknown_build, StatusCode::NOT_FOUND);
    let unknown_template = start_build(&h, "nosuch", &build_id, json!({"fromImage": "alpine"})).await;
    assert_error(&unknown_template, StatusCode::NOT_FOUND);

    let image = start_build(
        &h,
        &template_id,
        &build_id,
        json!({"fromImage": "registry.test/app:1", "fromImageRegistry": {"type": "registry", "username": "u", "password": "p"}}),
    )
    .await;
    assert_eq!(image.status, StatusCode::ACCEPTED, "{}", image.text);
    wait_finished(&h, &template_id, &build_id).await;
    match &builder.specs()[0].source {
        BuildSource::Image { reference, credentials } => {
            assert_eq!(reference, "registry.test/app:1");
            assert_eq!(credentials.as_ref().unwrap().username, "u");
        }
        other => panic!("unexpected source {other:?}"),
    }
}

#[tokio::test]
async fn failed_build_reports_reason_with_step() {
    let (h, builder) = builder_harness().await;
    builder.fail_builds(Some(("step 2 failed: RUN exit status 1", Some("2"))));
    let (template_id, build_id) = request_build(&h, json!({"name": "broken"})).await;
    start_build(&h, &template_id, &build_id, json!({"fromTemplate": "base"})).await;
    let finished = wait_finished(&h, &template_id, &build_id).await;

    assert_eq!(finished.body["status"], "error", "{}", finished.text);
    let reason = &finished.body["reason"];
    assert_eq!(reason["message"], "step 2 failed: RUN exit status 1");
    assert_eq!(reason["step"], "2");
    let entries = reason["logEntries"].as_array().unwrap();
    assert!(!entries.is_empty());
    assert_eq!(entries.last().unwrap()["level"], "error");

    let template = h.call(Method::GET, "/templates/broken", None).await;
    assert_eq!(template.body["buildStatus"], "error");
    let create = h.call(Method::POST, "/v2/sandboxes", Some(json!({"templateID": "broken"}))).await;
    assert_error(&create, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn rebuild_keeps_old_build_for_running_sandbox() {
    let (h, builder) = builder_harness().await;
    let (template_id, first_build) = build_ready(&h, "app").await;
    let sandbox = h.create(json!({"templateID": "app"})).await;

    builder.fail_builds(Some(("broken", None)));
    let (_, failed_build) = request_build(&h, json!({"name": "app"})).await;
    start_build(&h, &template_id, &failed_build, json!({"fromImage": "alpine"})).await;
    assert_eq!(wait_finished(&h, &template_id, &failed_build).await.body["status"], "error");
    let template = h.call(Method::GET, "/templates/app", None).await;
    assert_eq!(template.body["buildID"], first_build, "a failed build replaced the ready one");
    assert_eq!(template.body["buildStatus"], "ready");

    builder.fail_builds(None);
    let (same_template, second_build) = request_build(&h, json!({"name": "app"})).await;
    assert_eq!(same_template, template_id);
    start_build(&h, &template_id, &second_build, json!({"fromImage": "alpine"})).await;
    assert_eq!(wait_finished(&h, &template_id, &second_build).await.body["status"], "ready");
    let template = h.call(Method::GET, "/templates/app", None).await;
    assert_eq!(template.body["buildID"], second_build);

    let old = h.call(Method::GET, &format!("/sandboxes/{sandbox}"), None).await;
    assert_eq!(old.status, StatusCode::OK, "{}", old.text);
    let first_spec = h.runtime.started().into_iter().find(|s| s.sandbox_id.as_str() == sandbox).unwrap();
    assert_eq!(first_spec.build_id.as_str(), first_build);
    h.create(json!({"templateID": "app"})).await;
    assert_eq!(h.runtime.started().last().unwrap().build_id.as_str(), second_build);

    let deleted = h.call(Method::DELETE, "/templates/app", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text);
    let still_running = h.call(Method::GET, &format!("/sandboxes/{sandbox}"), None).await;
    assert_eq!(still_running.status, StatusCode::OK, "{}", still_running.text);
}

#[tokio::test]
async fn status_pages_logs_by_offset() {
    let (h, builder) = builder_harness().await;
    builder.set_log_lines(250);
    let (template_id, build_id) = build_ready(&h, "chatty").await;

    let first = status(&h, &template_id, &build_id, "").await;
    let entries = first.body["logEntries"].as_array().unwrap();
    assert_eq!(entries.len(), 100);
    assert_eq!(entries[0]["message"], "line 0");
    assert_eq!(entries[0]["level"], "info");
    assert_eq!(entries[0]["step"], "1");
    assert!(entries[0]["timestamp"].is_string());

    let second = status(&h, &template_id, &build_id, "?logsOffset=100").await;
    assert_eq!(second.body["logEntries"][0]["message"], "line 100");
    let third = status(&h, &template_id, &build_id, "?logsOffset=200").await;
    let tail = third.body["logEntries"].as_array().unwrap();
    assert_eq!(tail.len(), 51, "50 builder lines and the final line");
    assert!(tail[50]["message"].as_str().unwrap().starts_with("Build finished"));
    let past_end = status(&h, &template_id, &build_id, "?logsOffset=251").await;
    assert_eq!(past_end.body["logEntries"], json!([]));
    let limited = status(&h, &template_id, &build_id, "?logsOffset=5&limit=2").await;
    assert_eq!(limited.body["logEntries"][1]["message"], "line 6");
    let errors_only = status(&h, &template_id, &build_id, "?level=error").await;
    assert_eq!(errors_only.body["logEntries"], json!([]));

    for query in ["?limit=101", "?logsOffset=-1", "?level=loud"] {
        let reply = status(&h, &template_id, &build_id, query).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
    let unknown = status(&h, &template_id, &new_build_id().to_string(), "").await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn logs_route_by_cursor_and_direction() {
    let (h, builder) = builder_harness().await;
    builder.set_log_lines(5);
    let (template_id, build_id) = build_ready(&h, "logged").await;
    let uri = format!("/templates/{template_id}/builds/{build_id}/logs");

    let forward = h.call(Method::GET, &uri, None).await;
    assert_eq!(forward.status, StatusCode::OK, "{}", forward.text);
    let logs = forward.body["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 6);
    assert_eq!(logs[0]["message"], "line 0");

    let backward = h.call(Method::GET, &format!("{uri}?direction=backward&limit=2&source=persistent"), None).await;
    let logs = backward.body["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 2);
    assert!(logs[0]["message"].as_str().unwrap().starts_with("Build finished"));
    assert_eq!(logs[1]["message"], "line 4");

    let future = chrono::Utc::now().timestamp_millis() + 60_000;
    let none = h.call(Method::GET, &format!("{uri}?cursor={future}"), None).await;
    assert_eq!(none.body["logs"], json!([]));
    for query in ["?direction=sideways", "?source=elsewhere", "?cursor=-5", "?limit=500"] {
        let reply = h.call(Method::GET, &format!("{uri}{query}"), None).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn tags_assign_list_and_resolve() {
    let (h, _) = builder_harness().await;
    let (template_id, first) = request_build(&h, json!({"name": "tagged:v1", "tags": ["stable"]})).await;
    start_build(&h, &template_id, &first, json!({"fromImage": "alpine"})).await;
    wait_finished(&h, &template_id, &first).await;

    let tags = h.call(Method::GET, &format!("/templates/{template_id}/tags"), None).await;
    assert_eq!(tags.status, StatusCode::OK, "{}", tags.text);
    let names: Vec<_> = tags.body.as_array().unwrap().iter().map(|t| t["tag"].clone()).collect();
    assert_eq!(names, vec![json!("stable"), json!("v1")]);
    assert_eq!(tags.body[0]["buildID"], first);
    assert!(tags.body[0]["createdAt"].is_string());

    let assigned = h
        .call(Method::POST, "/templates/tags", Some(json!({"target": "tagged:v1", "tags": ["prod"]})))
        .await;
    assert_eq!(assigned.status, StatusCode::CREATED, "{}", assigned.text);
    assert_eq!(assigned.body, json!({"tags": ["prod"], "buildID": first}));
    let count = h.call(Method::GET, "/templates/tagged/tags/count", None).await;
    assert_eq!(count.body, json!({"total": 3}));
    let exists = h.call(Method::GET, "/templates/tagged/tags/exists?tag=%20PROD", None).await;
    assert_eq!(exists.body, json!({"exists": true, "normalizedTag": "prod"}));
    let absent = h.call(Method::GET, "/templates/tagged/tags/exists?tag=nope", None).await;
    assert_eq!(absent.body["exists"], false);

    let (_, second) = request_build(&h, json!({"name": "tagged:v2"})).await;
    start_build(&h, &template_id, &second, json!({"fromImage": "alpine"})).await;
    wait_finished(&h, &template_id, &second).await;
    h.call(Method::POST, "/templates/tags", Some(json!({"target": "tagged:v2", "tags": ["prod"]}))).await;

    for (reference, expected) in [("tagged:v1", &first), ("tagged:v2", &second), ("tagged", &second), ("tagged:prod", &second)] {
        h.create(json!({"templateID": reference})).await;
        let started = h.runtime.started().pop().unwrap();
        assert_eq!(started.build_id.as_str(), expected.as_str(), "{reference}");
    }
    let missing_tag = h.call(Method::POST, "/v2/sandboxes", Some(json!({"templateID": "tagged:nope"}))).await;
    assert_error(&missing_tag, StatusCode::NOT_FOUND);

    let assignments = h.call(Method::GET, "/templates/tagged/tags/prod/assignments?limit=1", None).await;
    assert_eq!(assignments.status, StatusCode::OK, "{}", assignments.text);
    assert_eq!(assignments.body["data"][0]["buildId"], second);
    assert!(is_uuid(&assignments.body["data"][0]["assignmentId"]));
    assert_eq!(assignments.body["nextCursor"], "1");
    let next = h.call(Method::GET, "/templates/tagged/tags/prod/assignments?limit=1&cursor=1", None).await;
    assert_eq!(next.body["data"][0]["buildId"], first);
    assert_eq!(next.body["nextCursor"], Value::Null);

    let groups = h.call(Method::GET, "/templates/tagged/tags/groups?sort=name_asc&assignmentLimit=1", None).await;
    assert_eq!(groups.status, StatusCode::OK, "{}", groups.text);
    assert_eq!(groups.body["tags"][0]["tag"], "prod");
    assert_eq!(groups.body["tags"][0]["hasMore"], true);
    assert_eq!(groups.body["nextCursor"], Value::Null);

    let removed = h.call(Method::DELETE, "/templates/tags", Some(json!({"name": "tagged", "tags": ["prod"]}))).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{}", removed.text);
    let again = h.call(Method::DELETE, "/templates/tags", Some(json!({"name": "tagged", "tags": ["prod"]}))).await;
    assert_error(&again, StatusCode::NOT_FOUND);
    let bad = h.call(Method::POST, "/templates/tags", Some(json!({"target": "tagged", "tags": []}))).await;
    assert_error(&bad, StatusCode::BAD_REQUEST);
    let unknown = h.call(Method::POST, "/templates/tags", Some(json!({"target": "nosuch:v1", "tags": ["x"]}))).await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn from_template_uses_tagged_build() {
    let (h, builder) = builder_harness().await;
    let (parent_id, parent_build) = build_ready(&h, "parent").await;
    let (template_id, build_id) = request_build(&h, json!({"name": "child"})).await;
    let started = start_build(&h, &template_id, &build_id, json!({"fromTemplate": "parent:default"})).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.text);
    wait_finished(&h, &template_id, &build_id).await;
    assert_eq!(
        builder.specs().last().unwrap().source,
        BuildSource::Template {
            template_id: TemplateId::parse(&parent_id).unwrap(),
            build_id: hearth_types::BuildId::parse(&parent_build).unwrap(),
        }
    );
}

#[tokio::test]
async fn delete_rules() {
    let (h, builder) = builder_harness().await;
    let base = h.call(Method::DELETE, "/templates/base", None).await;
    assert_error(&base, StatusCode::BAD_REQUEST);
    assert!(base.body["message"].as_str().unwrap().contains("cannot be deleted"));

    builder.hold_builds(true);
    let (template_id, build_id) = request_build(&h, json!({"name": "busy"})).await;
    start_build(&h, &template_id, &build_id, json!({"fromImage": "alpine"})).await;
    let building = status(&h, &template_id, &build_id, "").await;
    assert_eq!(building.body["status"], "building");
    let busy = h.call(Method::DELETE, "/templates/busy", None).await;
    assert_error(&busy, StatusCode::CONFLICT);

    builder.hold_builds(false);
    wait_finished(&h, &template_id, &build_id).await;
    let deleted = h.call(Method::DELETE, "/templates/busy", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text);
    let gone = h.call(Method::GET, &format!("/templates/{template_id}"), None).await;
    assert_error(&gone, StatusCode::NOT_FOUND);
    let missing = h.call(Method::DELETE, "/templates/busy", None).await;
    assert_error(&missing, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn startup_marks_unfinished_builds_failed() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_owned();
    let (h, builder) = builder_harness_in(data_dir).await;
    builder.hold_builds(true);
    let (template_id, building) = request_build(&h, json!({"name": "interrupted"})).await;
    start_build(&h, &template_id, &building, json!({"fromImage": "alpine"})).await;
    let (_, waiting) = request_build(&h, json!({"name": "interrupted"})).await;

    let (router, _) = build_with_template_builder(
        config(&path),
        Arc::new(RecordingRuntime::new()),
        Some(Arc::new(RecordingBuilder::new())),
    )
    .await
    .expect("restart control plane");
    let restarted = Harness { router, ..h };
    for build_id in [&building, &waiting] {
        let reply = status(&restarted, &template_id, build_id, "").await;
        assert_eq!(reply.body["status"], "error", "{}", reply.text);
        assert_eq!(reply.body["reason"]["message"], "the server stopped during the build");
    }
    let template = restarted.call(Method::GET, &format!("/templates/{template_id}"), None).await;
    assert_eq!(template.body["buildStatus"], "error");
}

#[tokio::test]
async fn dockerfile_flow() {
    let (h, builder) = builder_harness().await;
    let dockerfile = "FROM alpine:3.20\nRUN echo hi\n";
    let reply = h
        .call(
            Method::POST,
            "/templates",
            Some(json!({"alias": "df", "dockerfile": dockerfile, "startCmd": "sleep 1", "cpuCount": 1, "memoryMB": 256})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let template_id = reply.body["templateID"].as_str().unwrap().to_owned();
    let build_id = reply.body["buildID"].as_str().unwrap().to_owned();
    assert_eq!(reply.body["names"], json!(["df"]));
    let start_uri = format!("/templates/{template_id}/builds/{build_id}");

    let wrong_route = start_build(&h, &template_id, &build_id, json!({"fromImage": "alpine"})).await;
    assert_error(&wrong_route, StatusCode::BAD_REQUEST);
    let missing_context = h.call(Method::POST, &start_uri, Some(json!({"contextHash": HASH}))).await;
    assert_error(&missing_context, StatusCode::BAD_REQUEST);

    upload(&h, &template_id, HASH, b"context tar").await;
    let started = h.call(Method::POST, &start_uri, Some(json!({"contextHash": HASH}))).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.text);
    assert_eq!(wait_finished(&h, &template_id, &build_id).await.body["status"], "ready");
    let spec = builder.specs().pop().unwrap();
    assert_eq!(
        spec.source,
        BuildSource::Dockerfile { text: dockerfile.to_owned(), context_hash: Some(HASH.to_owned()) }
    );
    assert_eq!(spec.start_cmd.as_deref(), Some("sleep 1"));
    assert_eq!(spec.memory_mib, 256);

    let rebuild = h
        .call(Method::POST, &format!("/templates/{template_id}"), Some(json!({"dockerfile": "FROM alpine"})))
        .await;
    assert_eq!(rebuild.status, StatusCode::ACCEPTED, "{}", rebuild.text);
    assert_eq!(rebuild.body["templateID"], template_id);
    let second = rebuild.body["buildID"].as_str().unwrap();
    let no_body = send(&h, Method::POST, &format!("/templates/{template_id}/builds/{second}"), &[("x-api-key", API_KEY)], None).await;
    assert_eq!(no_body.status, StatusCode::ACCEPTED, "{}", no_body.text);
    assert_eq!(wait_finished(&h, &template_id, second).await.body["status"], "ready");

    for body in [json!({"dockerfile": "FROM alpine"}), json!({"alias": "x", "dockerfile": "  "})] {
        let reply = h.call(Method::POST, "/templates", Some(body)).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn patch_list_v2_and_openapi() {
    let (h, _) = builder_harness().await;
    build_ready(&h, "one").await;
    build_ready(&h, "two").await;

    let patched = h.call(Method::PATCH, "/templates/one", Some(json!({"public": true}))).await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
    assert_eq!(patched.body, json!({"names": ["one"]}));
    let one = h.call(Method::GET, "/templates/one", None).await;
    assert_eq!(one.body["public"], true);
    let v2 = h.call(Method::PATCH, "/v2/templates/one", Some(json!({"public": false}))).await;
    assert_eq!(v2.status, StatusCode::OK, "{}", v2.text);
    let bad = h.call(Method::PATCH, "/v2/templates/one", Some(json!({"public": "yes"}))).await;
    assert_error(&bad, StatusCode::BAD_REQUEST);

    let page = h.call(Method::GET, "/v2/templates?limit=2", None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert_eq!(page.body.as_array().unwrap().len(), 2);
    let token = page.headers.get("x-next-token").unwrap().to_str().unwrap().to_owned();
    let rest = h.call(Method::GET, &format!("/v2/templates?limit=2&nextToken={token}"), None).await;
    assert_eq!(rest.body.as_array().unwrap().len(), 1);
    assert!(rest.headers.get("x-next-token").is_none());

    let doc = h.call_raw(Method::GET, "/openapi.json", None, None).await;
    let paths = doc.body["paths"].as_object().unwrap();
    for path in [
        "/v3/templates",
        "/v2/templates/{templateID}/builds/{buildID}",
        "/templates/{templateID}/builds/{buildID}",
        "/templates/{templateID}/builds/{buildID}/status",
        "/templates/{templateID}/files/{hash}",
        "/templates/{templateID}/files/{hash}/upload",
        "/templates/tags",
        "/templates/{templateID}/tags/{tag}/assignments",
    ] {
        assert!(paths.contains_key(path), "missing {path}");
    }
}

/// Builds through the e2b Python SDK (2.63.0) on 127.0.0.1. Needs
/// `/opt/hearth-venv/bin/python` or `HEARTH_SDK_PYTHON`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_builds_template() {
    let (h, builder) = builder_harness().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = h.router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("hello.txt"), "hello").unwrap();
    let python = std::env::var("HEARTH_SDK_PYTHON").unwrap_or_else(|_| "/opt/hearth-venv/bin/python".to_owned());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/template_build_check.py");

    // The second build, "sdk-fail", fails: the builder fails every build once the first is ready.
    let fail_after_first = {
        let builder = builder.clone();
        let store = h.control_plane.store().clone();
        tokio::spawn(async move {
            loop {
                let first = store.find_template("sdk-app").await.unwrap();
                if first.is_some_and(|t| t.status == hearth_control_plane::store::BuildStatus::Ready) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            builder.fail_builds(Some(("injected failure at step 1", Some("1"))));
        })
    };
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .env("E2B_API_URL", format!("http://{address}"))
        .env("E2B_API_KEY", API_KEY)
        .env("E2B_SANDBOX_URL", "http://127.0.0.1:9")
        .env("CONTEXT_DIR", context.path())
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("SDK check finished within 120 s")
        .expect("run the SDK check");
    server.abort();
    fail_after_first.abort();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK check failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("sdk template check passed"), "{stdout}\n{stderr}");

    let spec = &builder.specs()[0];
    assert_eq!(spec.steps.len(), 4, "{:?}", spec.steps);
    assert_eq!(spec.steps[0].kind, "COPY");
    let hash = spec.steps[0].files_hash.as_deref().unwrap();
    assert!(h.data_dir.path().join("template-files").join(hash).is_file());
    assert_eq!(spec.start_cmd.as_deref(), Some("sleep infinity"));
    assert_eq!(spec.ready_cmd.as_deref(), Some("true"));
}
