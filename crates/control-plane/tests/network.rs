//! Network settings through the REST API: create, `PUT /sandboxes/{id}/network`, resume
//! and fork, against a real SQLite file and the recording runtime.

mod common;

use axum::http::{Method, StatusCode};
use common::{assert_error, harness};
use hearth_control_plane::testing::RuntimeCall;
use hearth_network::egress::EgressPolicy;
use serde_json::json;

fn subnets(policy: &EgressPolicy, list: &str) -> Vec<String> {
    let subnets = if list == "allow" {
        &policy.allow
    } else {
        &policy.deny
    };
    subnets.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn create_sets_policy_and_token() {
    let h = harness().await;
    let reply = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({
                "templateID": "base",
                "network": {
                    "allowPublicTraffic": false,
                    "allowOut": ["api.example.com", "*.example.org", "192.0.2.7"],
                    "denyOut": ["0.0.0.0/0"],
                    "dnsServers": ["198.18.0.2"]
                }
            })),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let token = reply.body["trafficAccessToken"]
        .as_str()
        .expect("a traffic token");
    assert_eq!(token.len(), 64);

    let spec = &h.runtime.started()[0];
    assert_eq!(spec.traffic_access_token.as_deref(), Some(token));
    assert_eq!(
        subnets(&spec.egress, "allow"),
        ["192.0.2.7/32", "198.18.0.2/32"]
    );
    assert_eq!(subnets(&spec.egress, "deny"), ["0.0.0.0/0"]);
    assert_eq!(spec.egress.allow_domains.len(), 2);

    // Connect returns the same token.
    let id = reply.body["sandboxID"].as_str().unwrap();
    let connected = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(
        connected.body["trafficAccessToken"], token,
        "{}",
        connected.text
    );
}

#[tokio::test]
async fn public_traffic_by_default_has_no_token() {
    let h = harness().await;
    let reply = h
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "network": {"allowPublicTraffic": true}})),
        )
        .await;
    assert!(reply.body["trafficAccessToken"].is_null(), "{}", reply.text);
    assert!(h.runtime.started()[0].traffic_access_token.is_none());
}

#[tokio::test]
async fn update_replaces_running_rules() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "network": {"denyOut": ["10.0.0.0/8"]}}))
        .await;
    let reply = h
        .call(
            Method::PUT,
            &format!("/sandboxes/{id}/network"),
            Some(json!({"allowOut": ["203.0.113.0/24"], "allow_internet_access": false})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    let updates: Vec<EgressPolicy> = h
        .runtime
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            RuntimeCall::UpdateNetwork(sandbox_id, policy) if sandbox_id.as_str() == id => {
                Some(policy)
            }
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1);
    // The old denyOut is gone: fields left out are cleared.
    assert_eq!(subnets(&updates[0], "allow"), ["203.0.113.0/24"]);
    assert_eq!(subnets(&updates[0], "deny"), ["0.0.0.0/0"]);

    let detail = h.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(detail.body["allowInternetAccess"], false, "{}", detail.text);
    assert_eq!(
        detail.body["network"],
        json!({"allowOut": ["203.0.113.0/24"]}),
        "{}",
        detail.text
    );

    // An empty body opens everything again.
    let reply = h
        .call(
            Method::PUT,
            &format!("/sandboxes/{id}/network"),
            Some(json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    let last = h
        .runtime
        .calls()
        .into_iter()
        .rev()
        .find_map(|call| match call {
            RuntimeCall::UpdateNetwork(_, policy) => Some(policy),
            _ => None,
        });
    assert!(last.expect("a second update").is_open());
}

#[tokio::test]
async fn update_rejects_bad_input() {
    let h = harness().await;
    let id = h.create(json!({"templateID": "base"})).await;
    for body in [
        json!({"denyOut": ["example.com"]}),
        json!({"allowOut": ["*"]}),
        json!({"allowOut": "10.0.0.0/8"}),
        json!({"egressProxy": {"address": "127.0.0.1:1080"}}),
        json!({"rules": {"example.com": [{"transform": {}}]}}),
        json!({"allowPublicTraffic": false}),
    ] {
        let reply = h
            .call(
                Method::PUT,
                &format!("/sandboxes/{id}/network"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.text
        );
        assert_error(&reply, StatusCode::BAD_REQUEST);
    }
    assert!(!h
        .runtime
        .calls()
        .iter()
        .any(|call| matches!(call, RuntimeCall::UpdateNetwork(..))));

    let reply = h
        .call(
            Method::PUT,
            "/sandboxes/nosuchsandbox00000000/network",
            Some(json!({})),
        )
        .await;
    assert_error(&reply, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn paused_update_applies_at_resume() {
    let h = harness().await;
    let id = h
        .create(json!({"templateID": "base", "autoPause": true}))
        .await;
    let paused = h
        .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
        .await;
    assert_eq!(paused.status, StatusCode::NO_CONTENT, "{}", paused.text);
    let reply = h
        .call(
            Method::PUT,
            &format!("/sandboxes/{id}/network"),
            Some(json!({"denyOut": ["198.51.100.0/24"]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    let resumed = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::CREATED, "{}", resumed.text);
    let spec = h
        .runtime
        .calls()
        .into_iter()
        .find_map(|call| match call {
            RuntimeCall::Resume(spec) => Some(spec),
            _ => None,
        })
        .expect("a resume");
    assert_eq!(subnets(&spec.egress, "deny"), ["198.51.100.0/24"]);

    let forked = h
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/fork"),
            Some(json!({"count": 1})),
        )
        .await;
    assert!(forked.status.is_success(), "{}", forked.text);
    let fork = h
        .runtime
        .calls()
        .into_iter()
        .find_map(|call| match call {
            RuntimeCall::Fork(_, specs) => Some(specs),
            _ => None,
        })
        .expect("a fork");
    assert_eq!(subnets(&fork[0].egress, "deny"), ["198.51.100.0/24"]);
}

#[tokio::test]
async fn lost_vm_marks_sandbox_killed() {
    use hearth_control_plane::runtime::SandboxRuntime;

    let h = harness().await;
    let lost = h.create(json!({"templateID": "base"})).await;
    let healthy = h.create(json!({"templateID": "base"})).await;
    // The node agent's watchdog removes a sandbox whose VMM died; the runtime then no
    // longer lists it.
    let lost_id = hearth_types::SandboxId::parse(&lost).unwrap();
    h.runtime.stop(&lost_id).await.unwrap();

    assert_eq!(h.control_plane.reap_lost().await.unwrap(), 1);
    let reply = h
        .call(Method::GET, &format!("/sandboxes/{lost}"), None)
        .await;
    assert_error(&reply, StatusCode::NOT_FOUND);
    assert!(
        reply.text.contains("its VM exited unexpectedly"),
        "{}",
        reply.text
    );
    let reply = h
        .call(Method::GET, &format!("/sandboxes/{healthy}"), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(h.control_plane.reap_lost().await.unwrap(), 0);
}
