//! Node agent against the real thing: a QEMU restore of the base template in a real network
//! slot, envd initialised over the slot's network, and nothing left after the stop.
//!
//! Needs root, QEMU and a built base template: `HEARTH_TEST_TEMPLATE_DIR` names its build
//! directory (`<data-dir>/templates/<template>/<build>`), as `scripts/test.sh` sets it.
//! Without it the test prints why and passes without running.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{start_node, template_from_env, vmm_pids};
use hearth_control_plane::runtime::{RuntimeError, SandboxRuntime, SandboxSpec};
use hearth_network::InstanceId;
use hearth_proxy::RouteTable;
use hearth_storage::DataDir;
use hearth_types::SandboxId;

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_start_init_and_stop_cleanly() {
    let Some((data_root, template_id, build_id)) = template_from_env() else {
        eprintln!("HEARTH_TEST_TEMPLATE_DIR is not set; skipping the node agent VM test");
        return;
    };
    let manifest = hearth_storage::TemplateManifest::load(
        &DataDir::new(&data_root)
            .template_build(&template_id, &build_id)
            .manifest(),
    )
    .unwrap();

    let (_sweep, node) = start_node(&data_root, 1).await;

    let sandbox_id = SandboxId::generate();
    let spec = SandboxSpec {
        sandbox_id: sandbox_id.clone(),
        template_id: template_id.clone(),
        build_id: build_id.clone(),
        vcpus: manifest.vcpus,
        memory_mib: manifest.memory_mib,
        env_vars: HashMap::from([("HEARTH_TEST_VAR".to_owned(), "value with spaces".to_owned())]),
        envd_access_token: Some("test-token".to_owned()),
        previous_access_token: None,
        egress: Default::default(),
        traffic_access_token: None,
    };
    let started = node.start(spec).await.unwrap();
    assert_eq!(started.envd_version, manifest.envd_version);
    let phases: Vec<&str> = started.timings.iter().map(|(name, _)| *name).collect();
    assert_eq!(phases, ["disk", "slot", "vmm_restore", "envd_init"]);

    let route = node
        .lookup(sandbox_id.as_str())
        .expect("a started sandbox has a route");
    let envs_url = format!(
        "http://{}:{}/envs",
        route.address,
        hearth_types::guest::ENVD_PORT
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let unauthenticated = http.get(&envs_url).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let envs: HashMap<String, String> = http
        .get(&envs_url)
        .header("X-Access-Token", "test-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        envs.get("HEARTH_TEST_VAR").map(String::as_str),
        Some("value with spaces")
    );
    assert_eq!(node.running().await, vec![sandbox_id.clone()]);

    let run_dir = DataDir::new(&data_root)
        .sandbox(&sandbox_id)
        .dir()
        .to_path_buf();
    let vmm_pids = vmm_pids(&run_dir);
    assert_eq!(
        vmm_pids.len(),
        1,
        "expected one QEMU process for the sandbox"
    );

    node.stop(&sandbox_id).await.unwrap();
    assert!(node.lookup(sandbox_id.as_str()).is_none());
    assert!(
        !run_dir.exists(),
        "run dir {} left behind",
        run_dir.display()
    );
    assert!(
        !process_exists(vmm_pids[0]),
        "QEMU pid {} still exists",
        vmm_pids[0]
    );
    assert!(matches!(
        node.stop(&sandbox_id).await,
        Err(RuntimeError::NotFound(_))
    ));

    let netns_prefix = format!(
        "hearth-{}-",
        InstanceId::from_data_dir(&data_root).unwrap().as_str()
    );
    node.shutdown().await.unwrap();
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|name| !name.starts_with(&netns_prefix)),
        "namespaces left: {left:?}"
    );
    assert!(!netns_exists(&format!("{netns_prefix}0")));
}
