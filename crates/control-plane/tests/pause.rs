//! Pause, resume, fork and snapshot routes through the axum router, against a real SQLite
//! file and the recording runtime, including injected pause failures.

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use hearth_control_plane::testing::{PauseFailure, RecordingRuntime};
use hearth_types::SandboxId;
use serde_json::json;

async fn state_of(h: &Harness, id: &str) -> String {
    let reply = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.body["state"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pause_resume_moves_state_and_list() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;

    let paused = h
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;
    assert_eq!(paused.status, StatusCode::NO_CONTENT, "{}", paused.text);
    assert_eq!(state_of(&h, &id).await, "paused");
    assert!(h.runtime.is_paused(&SandboxId::parse(&id).unwrap()));
    let listed = h
        .call(Method::GET, "/v2/sandboxes?state=paused", None)
        .await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    let running = h
        .call(Method::GET, "/v2/sandboxes?state=running", None)
        .await;
    assert_eq!(running.body, json!([]));

    let again = h
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;
    assert_error(&again, StatusCode::CONFLICT);

    let resumed = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::CREATED, "{}", resumed.text);
    assert_eq!(resumed.body["sandboxID"], id);
    assert_eq!(state_of(&h, &id).await, "running");

    let twice = h
        .call(Method::POST, &format!("/sandboxes/{id}/resume"), None)
        .await;
    assert_error(&twice, StatusCode::CONFLICT);
}

#[tokio::test]
async fn connect_resumes_a_paused_sandbox() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    h.call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;

    let connected = h
        .call(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 30})),
        )
        .await;

    assert_eq!(connected.status, StatusCode::OK, "{}", connected.text);
    assert_eq!(state_of(&h, &id).await, "running");
}

#[tokio::test]
async fn failed_pause_keeps_sandbox_running() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    h.runtime.fail_pauses(Some(PauseFailure::KeepsRunning));

    let reply = h
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;

    assert_error(&reply, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("still running"),
        "{}",
        reply.text
    );
    assert_eq!(state_of(&h, &id).await, "running");
}

#[tokio::test]
async fn failed_pause_kills_with_reason() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    h.runtime.fail_pauses(Some(PauseFailure::Killed));

    let reply = h
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;

    assert_error(&reply, StatusCode::INTERNAL_SERVER_ERROR);
    let get = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_error(&get, StatusCode::NOT_FOUND);
    assert!(
        get.body["message"]
            .as_str()
            .unwrap()
            .contains("pause failed"),
        "{}",
        get.text
    );
    let listed = h.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(listed.body, json!([]));
}

#[tokio::test]
async fn auto_pause_at_timeout() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "timeout": 1, "autoPause": true}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    h.control_plane.reap_expired().await.unwrap();

    assert_eq!(state_of(&h, &id).await, "paused");
}

#[tokio::test]
async fn kill_of_a_paused_sandbox_deletes_its_state() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    h.call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;

    let reply = h
        .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;

    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(!h.runtime.is_paused(&SandboxId::parse(&id).unwrap()));
}

#[tokio::test]
async fn fork_count_and_bad_counts() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;

    let reply = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/fork"),
            Some(json!({"count": 3, "timeout": 60})),
        )
        .await;

    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let forks = reply.body.as_array().unwrap();
    assert_eq!(forks.len(), 3);
    for fork in forks {
        let fork_id = fork["sandbox"]["sandboxID"].as_str().unwrap();
        assert_ne!(fork_id, id);
        assert_eq!(state_of(&h, fork_id).await, "running");
    }
    let bad = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/fork"),
            Some(json!({"count": 21})),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn snapshot_registers_template() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;

    let reply = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            Some(json!({"name": "my-snap"})),
        )
        .await;

    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let snapshot_id = reply.body["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(reply.body["names"], json!(["my-snap"]));
    let listed = h
        .call(Method::GET, &format!("/snapshots?sandboxID={id}"), None)
        .await;
    assert_eq!(
        listed.body,
        json!([{"snapshotID": snapshot_id, "names": ["my-snap"]}])
    );
    for template in [snapshot_id.as_str(), "my-snap"] {
        let created = h
            .call(
                Method::POST,
                "/v2/sandboxes",
                Some(json!({"templateID": template})),
            )
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{template}: {}",
            created.text
        );
    }
    let bad = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            Some(json!({"name": "../x"})),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn restart_keeps_paused_sandboxes() {
    let data_dir = tempfile::tempdir().unwrap();
    let h = harness_in(data_dir, RecordingRuntime::new()).await;
    let kept = h.create(json!({"templateID": "base"})).await;
    let lost = h.create(json!({"templateID": "base"})).await;
    let running = h.create(json!({"templateID": "base"})).await;
    for id in [&kept, &lost] {
        h.call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
            .await;
    }
    let Harness { data_dir, .. } = h;

    // The node finds only `kept` paused on disk and runs nothing.
    let runtime = RecordingRuntime::new();
    runtime.set_paused([SandboxId::parse(&kept).unwrap()]);
    let h = harness_in(data_dir, runtime).await;

    assert_eq!(state_of(&h, &kept).await, "paused");
    for id in [&lost, &running] {
        let reply = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
        assert_error(&reply, StatusCode::NOT_FOUND);
        assert!(
            reply.body["message"]
                .as_str()
                .unwrap()
                .contains("was killed"),
            "{}",
            reply.text
        );
    }
    let resumed = h
        .call(Method::POST, &format!("/sandboxes/{kept}/resume"), None)
        .await;
    assert_eq!(resumed.status, StatusCode::CREATED, "{}", resumed.text);
}

#[tokio::test]
async fn shutdown_pauses_auto_pause_sandboxes() {
    let h = harness().await;
    let kept = h
        .create(json!({"templateID": "base", "autoPause": true}))
        .await;
    let killed = h.create(json!({"templateID": "base"})).await;

    h.control_plane.shutdown().await.unwrap();

    assert!(h.runtime.is_paused(&SandboxId::parse(&kept).unwrap()));
    assert_eq!(state_of(&h, &kept).await, "paused");
    let reply = h
        .call(Method::GET, &format!("/sandboxes/{killed}"), None)
        .await;
    assert_error(&reply, StatusCode::NOT_FOUND);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("server stopped"),
        "{}",
        reply.text
    );
}

#[tokio::test]
async fn wake_resumes_only_auto_resume_sandboxes() {
    let h = harness().await;
    let waking = h
        .create(json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}}))
        .await;
    let plain = h.create(json!({"templateID": "base", "autoPause": true})).await;
    let detail = h.call(Method::GET, &format!("/sandboxes/{waking}"), None).await;
    assert_eq!(detail.body["lifecycle"]["autoResume"], true, "{}", detail.text);
    for id in [&waking, &plain] {
        h.call(Method::POST, &format!("/sandboxes/{id}/pause"), None).await;
    }

    assert!(h.control_plane.wake_sandbox(&SandboxId::parse(&waking).unwrap()).await);
    assert!(!h.control_plane.wake_sandbox(&SandboxId::parse(&plain).unwrap()).await);

    assert_eq!(state_of(&h, &waking).await, "running");
    assert_eq!(state_of(&h, &plain).await, "paused");
}

#[tokio::test]
async fn auto_resume_without_auto_pause_is_rejected() {
    let h = harness().await;

    let reply = h
        .call(Method::POST, "/v2/sandboxes", Some(json!({"templateID": "base", "autoResume": {"enabled": true}})))
        .await;

    assert_error(&reply, StatusCode::BAD_REQUEST);
    assert!(reply.body["message"].as_str().unwrap().contains("autoPause"), "{}", reply.text);
}

#[tokio::test]
async fn snapshot_delete_waits_for_its_sandboxes() {
    let h = harness().await;
    let source = h.create(json!({"templateID": "base"})).await;
    let first = h.call(Method::POST, &format!("/sandboxes/{source}/snapshots"), Some(json!({"name": "snap"}))).await;
    let second = h.call(Method::POST, &format!("/sandboxes/{source}/snapshots"), Some(json!({"name": "snap"}))).await;
    let first_id = first.body["snapshotID"].as_str().unwrap().to_owned();
    let second_id = second.body["snapshotID"].as_str().unwrap().to_owned();
    // Both may carry the same millisecond, so the list order between them is not fixed.
    let listed = h.call(Method::GET, "/snapshots", None).await;
    let names_of = |id: &str| {
        listed.body.as_array().unwrap().iter().find(|entry| entry["snapshotID"] == id).map(|entry| entry["names"].clone())
    };
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    assert_eq!(names_of(&first_id), Some(json!([])));
    assert_eq!(names_of(&second_id), Some(json!(["snap"])));
    let child = h.create(json!({"templateID": "snap"})).await;

    let busy = h.call(Method::DELETE, &format!("/templates/{second_id}"), None).await;
    assert_error(&busy, StatusCode::CONFLICT);
    h.call(Method::DELETE, &format!("/sandboxes/{child}"), None).await;
    let deleted = h.call(Method::DELETE, &format!("/templates/{second_id}"), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text);

    let gone = h.call(Method::GET, &format!("/templates/{second_id}"), None).await;
    assert_error(&gone, StatusCode::NOT_FOUND);
    let listed = h.call(Method::GET, "/snapshots", None).await;
    assert_eq!(listed.body, json!([{"snapshotID": first_id, "names": []}]));
    let base = h.call(Method::DELETE, "/templates/base", None).await;
    assert_error(&base, StatusCode::BAD_REQUEST);
}
