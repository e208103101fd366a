//! REST API tests through the axum router, against a real SQLite file and the recording runtime.

mod common;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Utc};
use common::{assert_error, harness, harness_in, Harness, API_KEY, BASE_TEMPLATE_ID};
use hearth_control_plane::testing::RecordingRuntime;
use hearth_types::SandboxId;
use serde_json::{json, Value};

fn time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("a time string"))
        .unwrap()
        .with_timezone(&Utc)
}

fn lifetime_secs(detail: &Value) -> i64 {
    (time(&detail["endAt"]) - time(&detail["startedAt"])).num_seconds()
}

#[tokio::test]
async fn create_v2_returns_sdk_fields() {
    let h = harness().await;
    let reply = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "timeout": 60, "metadata": {"user": "ann"}, "envVars": {"FOO": "bar"}})),
        )
        .await;

    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let body = &reply.body;
    assert_eq!(body["templateID"], BASE_TEMPLATE_ID);
    assert_eq!(body["alias"], "base");
    assert_eq!(body["clientID"], "hearth");
    assert_eq!(body["envdVersion"], hearth_types::ENVD_VERSION);
    assert!(body["trafficAccessToken"].is_null());
    assert!(body["domain"].is_null());
    let token = body["envdAccessToken"]
        .as_str()
        .expect("v2 always issues a token");
    assert_eq!(token.len(), 64);

    let started = h.runtime.started();
    assert_eq!(started.len(), 1);
    let spec = &started[0];
    assert_eq!(
        spec.sandbox_id.as_str(),
        body["sandboxID"].as_str().unwrap()
    );
    assert_eq!(spec.template_id.as_str(), BASE_TEMPLATE_ID);
    assert_eq!(spec.vcpus, 2);
    assert_eq!(spec.memory_mib, 512);
    assert_eq!(spec.env_vars.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(spec.envd_access_token.as_deref(), Some(token));
    assert!(spec.egress.is_open());
    assert!(spec.traffic_access_token.is_none());
}

#[tokio::test]
async fn create_v1_defaults() {
    let h = harness().await;
    let reply = h
        .call(
            Method::POST,
            "/sandboxes",
            Some(json!({"templateID": BASE_TEMPLATE_ID})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert!(
        reply.body.get("envdAccessToken").is_none(),
        "no token without secure: {}",
        reply.text
    );
    assert!(
        reply.body.get("alias").is_none(),
        "created by ID, so no alias: {}",
        reply.text
    );

    let id = reply.body["sandboxID"].as_str().unwrap();
    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(lifetime_secs(&detail.body), 15);

    let secure = h
        .call(
            Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base", "secure": true})),
        )
        .await;
    assert!(
        secure.body["envdAccessToken"].is_string(),
        "{}",
        secure.text
    );
}

#[tokio::test]
async fn create_passes_internet_access_to_runtime() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "allow_internet_access": false}))
        .await;
    assert_eq!(
        h.runtime.started()[0].egress.deny,
        vec!["0.0.0.0/0".parse().unwrap()]
    );

    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(detail.body["allowInternetAccess"], false);
}

#[tokio::test]
async fn get_returns_detail() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "timeout": 120, "metadata": {"k": "v"}}))
        .await;

    let reply = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = &reply.body;
    assert_eq!(body["sandboxID"], id.as_str());
    assert_eq!(body["templateID"], BASE_TEMPLATE_ID);
    assert_eq!(body["state"], "running");
    assert_eq!(body["cpuCount"], 2);
    assert_eq!(body["memoryMB"], 512);
    assert_eq!(body["diskSizeMB"], 2048);
    assert_eq!(body["metadata"], json!({"k": "v"}));
    assert_eq!(
        body["lifecycle"],
        json!({"autoResume": false, "onTimeout": "kill"})
    );
    assert!(body["allowInternetAccess"].is_null());
    assert_eq!(lifetime_secs(body), 120);
}

#[tokio::test]
async fn get_unknown_sandbox_is_404() {
    let h = harness().await;
    let reply = h.call(Method::GET, "/sandboxes/doesnotexist", None).await;
    assert_error(&reply, StatusCode::NOT_FOUND);
    assert!(reply.body["message"]
        .as_str()
        .unwrap()
        .contains("doesnotexist"));

    let invalid = h.call(Method::GET, "/sandboxes/Not..Valid", None).await;
    assert_error(&invalid, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn list_v1_filters_by_metadata() {
    let h = harness().await;
    let ann = h
        .create(json!({"templateID": "base", "metadata": {"user name": "a&b=c", "team": "x"}}))
        .await;
    let _bob = h
        .create(json!({"templateID": "base", "metadata": {"user name": "bob"}}))
        .await;

    let all = h.call(Method::GET, "/sandboxes", None).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text);
    assert_eq!(all.body.as_array().unwrap().len(), 2);

    // The SDK quotes key and value, urlencodes the pairs, and the query string encodes again.
    let uri = "/sandboxes?metadata=user%252520name%3Da%252526b%25253Dc";
    let filtered = h.call(Method::GET, uri, None).await;
    assert_eq!(filtered.status, StatusCode::OK, "{}", filtered.text);
    let items = filtered.body.as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", filtered.text);
    assert_eq!(items[0]["sandboxID"], ann.as_str());
    assert_eq!(items[0]["state"], "running");
    assert_eq!(items[0]["envdVersion"], hearth_types::ENVD_VERSION);
}

#[tokio::test]
async fn list_v2_filters_by_state() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;

    let running = h
        .call(Method::GET, "/v2/sandboxes?state=running", None)
        .await;
    assert_eq!(
        running.body.as_array().unwrap().len(),
        1,
        "{}",
        running.text
    );
    assert_eq!(running.body[0]["sandboxID"], id.as_str());

    let paused = h
        .call(Method::GET, "/v2/sandboxes?state=paused", None)
        .await;
    assert_eq!(paused.status, StatusCode::OK);
    assert_eq!(paused.body, json!([]));

    let both = h
        .call(Method::GET, "/v2/sandboxes?state=running%2Cpaused", None)
        .await;
    assert_eq!(both.body.as_array().unwrap().len(), 1);

    let bad = h
        .call(Method::GET, "/v2/sandboxes?state=sleeping", None)
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn list_v2_filters_by_template_and_metadata() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "metadata": {"env": "prod"}}))
        .await;
    h.create(json!({"templateID": "base", "metadata": {"env": "dev"}}))
        .await;

    let by_meta = h
        .call(Method::GET, "/v2/sandboxes?metadata=env%3Dprod", None)
        .await;
    assert_eq!(
        by_meta.body.as_array().unwrap().len(),
        1,
        "{}",
        by_meta.text
    );
    assert_eq!(by_meta.body[0]["sandboxID"], id.as_str());

    let by_alias = h
        .call(Method::GET, "/v2/sandboxes?template=base", None)
        .await;
    assert_eq!(by_alias.body.as_array().unwrap().len(), 2);

    let by_unknown = h
        .call(Method::GET, "/v2/sandboxes?template=nosuch", None)
        .await;
    assert_eq!(by_unknown.body, json!([]));
}

#[tokio::test]
async fn list_v2_paginates_without_overlap() {
    let h = harness().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(h.create(json!({"templateID": "base"})).await);
    }

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut uri = "/v2/sandboxes?limit=2".to_owned();
    loop {
        let reply = h.call(Method::GET, &uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        pages += 1;
        let items = reply.body.as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|item| item["sandboxID"].as_str().unwrap().to_owned()),
        );
        match reply.headers.get("x-next-token") {
            Some(token) => {
                uri = format!(
                    "/v2/sandboxes?limit=2&nextToken={}",
                    token.to_str().unwrap()
                )
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }

    assert_eq!(pages, 3);
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    sorted_seen.dedup();
    assert_eq!(sorted_seen.len(), 5, "duplicates in {seen:?}");
    created.sort();
    assert_eq!(sorted_seen, created);
}

#[tokio::test]
async fn list_v2_orders_newest_first_by_default() {
    let h = harness().await;
    let first = h.create(json!({"templateID": "base"})).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = h.create(json!({"templateID": "base"})).await;

    let desc = h.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(desc.body[0]["sandboxID"], second.as_str());
    let asc = h.call(Method::GET, "/v2/sandboxes?order=asc", None).await;
    assert_eq!(asc.body[0]["sandboxID"], first.as_str());
}

#[tokio::test]
async fn list_v2_rejects_bad_paging() {
    let h = harness().await;
    for uri in [
        "/v2/sandboxes?limit=0",
        "/v2/sandboxes?limit=101",
        "/v2/sandboxes?limit=abc",
        "/v2/sandboxes?nextToken=garbage",
        "/v2/sandboxes?order=sideways",
        "/v2/sandboxes?startedAfter=yesterday",
        "/v2/sandboxes?unknown=1",
    ] {
        let reply = h.call(Method::GET, uri, None).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn kill_stops_and_hides_sandbox() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;

    let reply = h
        .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    assert_eq!(h.runtime.stopped(), vec![SandboxId::parse(&id).unwrap()]);

    let get = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_error(&get, StatusCode::NOT_FOUND);
    let list = h.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(list.body, json!([]));

    let again = h
        .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_error(&again, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reaper_kills_expired_sandbox() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base", "timeout": 1})).await;
    let keep = h
        .create(json!({"templateID": "base", "timeout": 600}))
        .await;
    let reaper = h.control_plane.spawn_reaper();

    let sandbox_id = SandboxId::parse(&id).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.runtime.is_running(&sandbox_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reaper did not stop the sandbox within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The row is marked killed right after the stop; give the reaper that step.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let get = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_error(&get, StatusCode::NOT_FOUND);
    let kept = h
        .call(Method::GET, &format!("/sandboxes/{keep}"), None)
        .await;
    assert_eq!(kept.status, StatusCode::OK);
    assert!(h.runtime.is_running(&SandboxId::parse(&keep).unwrap()));

    h.control_plane.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), reaper)
        .await
        .expect("reaper stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn set_timeout_moves_end_time() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "timeout": 600}))
        .await;

    let shorter = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 30})),
        )
        .await;
    assert_eq!(shorter.status, StatusCode::NO_CONTENT, "{}", shorter.text);
    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    let remaining = (time(&detail.body["endAt"]) - Utc::now()).num_seconds();
    assert!((28..=30).contains(&remaining), "remaining {remaining}");

    // A timeout that has already passed lets the reaper kill it on its next pass.
    h.call(
        Method::POST,
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({"timeout": 1})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.control_plane.reap_expired().await.unwrap(), 1);
    assert!(!h.runtime.is_running(&SandboxId::parse(&id).unwrap()));
}

#[tokio::test]
async fn set_timeout_rejects_bad_values() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    let uri = format!("/sandboxes/{id}/timeout");

    for body in [
        json!({"timeout": 0}),
        json!({"timeout": -1}),
        json!({"timeout": 3601}),
        json!({"timeout": "10"}),
        json!({}),
    ] {
        let reply = h.call(Method::POST, &uri, Some(body.clone())).await;
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }

    let unknown = h
        .call(
            Method::POST,
            "/sandboxes/nosuch/timeout",
            Some(json!({"timeout": 10})),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn refresh_extends_but_never_shortens() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base", "timeout": 5})).await;
    let uri = format!("/sandboxes/{id}/refreshes");

    let extended = h
        .call(Method::POST, &uri, Some(json!({"duration": 60})))
        .await;
    assert_eq!(extended.status, StatusCode::NO_CONTENT, "{}", extended.text);
    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    let end_after_extend = time(&detail.body["endAt"]);
    assert!((end_after_extend - Utc::now()).num_seconds() >= 58);

    // No body: the default 15 s is shorter than what is left, so nothing changes.
    let default = h.call_raw(Method::POST, &uri, Some(API_KEY), None).await;
    assert_eq!(default.status, StatusCode::NO_CONTENT, "{}", default.text);
    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(time(&detail.body["endAt"]), end_after_extend);

    let bad = h
        .call(Method::POST, &uri, Some(json!({"duration": 0})))
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn connect_returns_sandbox_and_extends() {
    let h = harness().await;
    let create = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "timeout": 10})),
        )
        .await;
    let id = create.body["sandboxID"].as_str().unwrap().to_owned();

    let reply = h
        .call(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 300})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["sandboxID"], id.as_str());
    assert_eq!(reply.body["envdVersion"], hearth_types::ENVD_VERSION);
    assert_eq!(
        reply.body["envdAccessToken"],
        create.body["envdAccessToken"]
    );
    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert!((time(&detail.body["endAt"]) - Utc::now()).num_seconds() >= 298);

    let v1 = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 20})),
        )
        .await;
    assert_eq!(v1.status, StatusCode::OK, "{}", v1.text);
    let v1_missing = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/connect"),
            Some(json!({})),
        )
        .await;
    assert_error(&v1_missing, StatusCode::BAD_REQUEST);

    let unknown = h
        .call(
            Method::POST,
            "/v2/sandboxes/nosuch/connect",
            Some(json!({})),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn auth_rejects_missing_and_unknown_keys() {
    let h = harness().await;
    let missing = h.call_raw(Method::GET, "/sandboxes", None, None).await;
    assert_error(&missing, StatusCode::UNAUTHORIZED);

    let malformed = h
        .call_raw(Method::GET, "/sandboxes", Some("not-a-key"), None)
        .await;
    assert_error(&malformed, StatusCode::UNAUTHORIZED);

    let unknown_key = "e2b_ffffffffffffffffffffffffffffffffffffffff";
    let unknown = h
        .call_raw(Method::GET, "/sandboxes", Some(unknown_key), None)
        .await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED);

    let unknown_route = h.call_raw(Method::GET, "/nowhere", None, None).await;
    assert_error(&unknown_route, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn auth_accepts_stored_key() {
    let h = harness().await;
    let created = h.control_plane.store().create_api_key("ci").await.unwrap();
    let reply = h
        .call_raw(Method::GET, "/sandboxes", Some(&created.key), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    let keys = h.control_plane.store().list_api_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].last_used_at.is_some());
    assert!(created.key.starts_with(&keys[0].key_prefix));

    assert!(h
        .control_plane
        .store()
        .delete_api_key(&created.key_id)
        .await
        .unwrap());
    let revoked = h
        .call_raw(Method::GET, "/sandboxes", Some(&created.key), None)
        .await;
    assert_error(&revoked, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn create_api_key_helper_writes_usable_key() {
    let data_dir = tempfile::tempdir().unwrap();
    let created = hearth_control_plane::create_api_key(data_dir.path(), "cli")
        .await
        .unwrap();
    assert!(hearth_control_plane::auth::is_valid_api_key_format(
        &created.key
    ));

    let h = harness_in(data_dir, RecordingRuntime::new()).await;
    let reply = h
        .call_raw(Method::GET, "/sandboxes", Some(&created.key), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

#[tokio::test]
async fn build_rejects_malformed_configured_key() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = common::config(data_dir.path());
    config.api_keys_from_env = vec!["secret".to_owned()];
    let result =
        hearth_control_plane::build(config, std::sync::Arc::new(RecordingRuntime::new())).await;
    assert!(matches!(
        result,
        Err(hearth_control_plane::BuildError::InvalidApiKey { index: 0 })
    ));
}

#[tokio::test]
async fn create_rejects_bad_input() {
    let h = harness().await;
    let cases = [
        json!({"templateID": "base", "timeout": 0}),
        json!({"templateID": "base", "timeout": 3601}),
        json!({"templateID": "base", "timeout": "60"}),
        json!({"templateID": "base", "metadata": {"k": 1}}),
        json!({"templateID": "base", "metadata": "k=v"}),
        json!({"templateID": "base", "envVars": {"1BAD": "x"}}),
        json!({"templateID": "base", "envVars": {"OK": true}}),
        json!({"templateID": "base", "unknownField": 1}),
        json!({"templateID": ""}),
        json!({"timeout": 10}),
        json!({"templateID": "base", "network": {"denyOut": ["example.com"]}}),
        json!({"templateID": "base", "network": {"allowOut": ["bad domain!"]}}),
        json!({"templateID": "base", "network": {"allowOut": ["10.0.0.1/8"]}}),
        json!({"templateID": "base", "network": {"dnsServers": ["dns.google"]}}),
        json!({"templateID": "base", "network": {"maskRequestHost": "x.example.com"}}),
        json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/data"}]}),
        json!({"templateID": "base", "autoResume": {"enabled": true}}),
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": "yes"}}),
    ];
    for body in cases {
        let reply = h
            .call(Method::POST, "/v2/sandboxes", Some(body.clone()))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.text
        );
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
    assert!(h.runtime.started().is_empty());
}

#[tokio::test]
async fn create_accepts_sdk_defaults() {
    let h = harness().await;
    // What the SDK sends for Sandbox.create() with lifecycle and network defaults.
    let body = json!({
        "templateID": "base", "timeout": 300, "autoPause": false, "autoPauseMemory": true,
        "metadata": {}, "envVars": {}, "network": {"allowPublicTraffic": true}, "mcp": null
    });
    let reply = h.call(Method::POST, "/v2/sandboxes", Some(body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
}

#[tokio::test]
async fn malformed_json_is_400_json() {
    let h = harness().await;
    let reply = h
        .call_raw(
            Method::POST,
            "/v2/sandboxes",
            Some(API_KEY),
            Some("{not json".to_owned()),
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{}",
        reply.text
    );

    let timeout = h
        .call_raw(
            Method::POST,
            "/sandboxes/x/timeout",
            Some(API_KEY),
            Some("[".to_owned()),
        )
        .await;
    assert_error(&timeout, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_template_is_404_naming_it() {
    let h = harness().await;
    let reply = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "nosuch-template"})),
        )
        .await;
    assert_error(&reply, StatusCode::NOT_FOUND);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("nosuch-template"),
        "{}",
        reply.text
    );
}

#[tokio::test]
async fn runtime_failure_is_500_and_records_nothing() {
    let h = harness().await;
    h.runtime.fail_starts(Some("VMM exited during restore"));
    let reply = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_error(&reply, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.body["error_code"], "sandbox_create_failed");
    assert!(reply.body["message"]
        .as_str()
        .unwrap()
        .contains("VMM exited during restore"));

    let list = h.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(list.body, json!([]));
}

#[tokio::test]
async fn unimplemented_routes_are_501_json() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    for (method, uri) in [
        (Method::GET, format!("/sandboxes/{id}/metrics")),
        (Method::POST, "/v3/templates".to_owned()),
        (Method::GET, format!("/sandboxes/{id}/logs")),
    ] {
        let reply = h.call(method.clone(), &uri, Some(json!({}))).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_IMPLEMENTED,
            "{method} {uri}: {}",
            reply.text
        );
        assert_error(&reply, StatusCode::NOT_IMPLEMENTED);
    }

    let unknown = h.call(Method::GET, "/no/such/route", None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND);
    let wrong_method = h.call(Method::PUT, "/sandboxes", None).await;
    assert_error(&wrong_method, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn templates_list_get_and_alias() {
    let h = harness().await;
    h.create(json!({"templateID": "base"})).await;

    let list = h.call(Method::GET, "/templates", None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let template = &list.body[0];
    assert_eq!(template["templateID"], BASE_TEMPLATE_ID);
    assert_eq!(template["aliases"], json!(["base"]));
    assert_eq!(template["buildStatus"], "ready");
    assert_eq!(template["spawnCount"], 1);
    assert_eq!(template["buildCount"], 1);
    assert!(template["createdBy"].is_null());
    assert!(template["lastSpawnedAt"].is_string());

    let by_alias = h.call(Method::GET, "/templates/base", None).await;
    assert_eq!(by_alias.status, StatusCode::OK, "{}", by_alias.text);
    assert_eq!(by_alias.body["builds"].as_array().unwrap().len(), 1);
    let build_id = by_alias.body["builds"][0]["buildID"].as_str().unwrap();
    assert!(
        uuid_like(build_id),
        "SDK parses buildID as a UUID: {build_id}"
    );

    let alias = h.call(Method::GET, "/templates/aliases/base", None).await;
    assert_eq!(
        alias.body,
        json!({"templateID": BASE_TEMPLATE_ID, "public": false})
    );

    let missing = h.call(Method::GET, "/templates/aliases/nosuch", None).await;
    assert_error(&missing, StatusCode::NOT_FOUND);
}

fn uuid_like(value: &str) -> bool {
    value.len() == 36 && value.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn reconcile_on_start_marks_and_stops() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_owned();
    let h = harness_in(data_dir, RecordingRuntime::new()).await;
    let lost = h.create(json!({"templateID": "base"})).await;
    let survivor = h.create(json!({"templateID": "base"})).await;
    let Harness { data_dir, .. } = h;

    // A new server over the same database whose node runs only one of the two, plus one
    // sandbox the database never recorded.
    let survivor_id = SandboxId::parse(&survivor).unwrap();
    let orphan_id = SandboxId::parse("orphan").unwrap();
    let h = harness_in(
        data_dir,
        RecordingRuntime::with_running([survivor_id.clone(), orphan_id.clone()]),
    )
    .await;
    assert_eq!(h.data_dir.path(), path);

    let lost_reply = h
        .call(Method::GET, &format!("/sandboxes/{lost}"), None)
        .await;
    assert_error(&lost_reply, StatusCode::NOT_FOUND);
    let survivor_reply = h
        .call(Method::GET, &format!("/sandboxes/{survivor}"), None)
        .await;
    assert_eq!(survivor_reply.status, StatusCode::OK);
    assert_eq!(h.runtime.stopped(), vec![orphan_id]);
    assert!(h.runtime.is_running(&survivor_id));
}

#[tokio::test]
async fn shutdown_kills_running_sandboxes() {
    let h = harness().await;
    let a = h.create(json!({"templateID": "base"})).await;
    let b = h.create(json!({"templateID": "base"})).await;

    h.control_plane.shutdown().await.unwrap();
    for id in [&a, &b] {
        assert!(!h.runtime.is_running(&SandboxId::parse(id).unwrap()));
        let reply = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
        assert_error(&reply, StatusCode::NOT_FOUND);
    }

    let create = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_error(&create, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn openapi_is_public_and_lists_routes() {
    let h = harness().await;
    let reply = h.call_raw(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(reply.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = reply.body["paths"].as_object().unwrap();
    for path in [
        "/sandboxes",
        "/v2/sandboxes",
        "/sandboxes/{sandboxID}",
        "/sandboxes/{sandboxID}/timeout",
        "/templates/aliases/{alias}",
    ] {
        assert!(paths.contains_key(path), "missing {path}");
    }
    assert!(reply.body["components"]["schemas"]["NewSandbox"].is_object());
}
