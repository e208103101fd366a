//! Pause, resume, fork and named snapshots against the real thing: QEMU restores of the
//! base template in real network slots, with files written through envd and compared
//! after every resume, and failures injected into pauses (a full disk, a dead VMM).
//!
//! Needs root, QEMU and a built base template: `HEARTH_TEST_TEMPLATE_DIR` names its build
//! directory, as `scripts/test.sh` sets it. Without it the test prints why and passes
//! without running.

mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{start_node, template_from_env, vmm_pids};
use hearth_control_plane::runtime::{RuntimeError, SandboxRuntime, SandboxSpec, SnapshotSpec};
use hearth_node_agent::NodeAgent;
use hearth_proxy::RouteTable;
use hearth_storage::DataDir;
use hearth_types::guest::ENVD_PORT;
use hearth_types::{BuildId, SandboxId, TemplateId};
use rand::RngCore;
use sha2::{Digest, Sha256};

const TOKEN: &str = "pause-test-token";

/// Unmounts a test mount when dropped.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Deletes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Guest {
    http: reqwest::Client,
    address: Ipv4Addr,
}

impl Guest {
    fn of(node: &NodeAgent, id: &SandboxId) -> Self {
        let route = node
            .lookup(id.as_str())
            .unwrap_or_else(|| panic!("sandbox {id} has no route"));
        Self {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            address: route.address,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{ENVD_PORT}{path}", self.address)
    }

    async fn write(&self, path: &str, content: Vec<u8>) {
        let response = self
            .http
            .post(self.url(&format!("/files?path={path}&username=user")))
            .header("X-Access-Token", TOKEN)
            .header("Content-Type", "application/octet-stream")
            .body(content)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "write {path}: {}",
            response.status()
        );
    }

    async fn read(&self, path: &str) -> Vec<u8> {
        let response = self
            .http
            .get(self.url(&format!("/files?path={path}&username=user")))
            .header("X-Access-Token", TOKEN)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "read {path}: {}",
            response.status()
        );
        response.bytes().await.unwrap().to_vec()
    }

    async fn healthy(&self) -> bool {
        matches!(self.http.get(self.url("/health")).timeout(Duration::from_secs(5)).send().await, Ok(r) if r.status().is_success())
    }

    /// Returns the guest's wall clock in seconds, from envd's metrics.
    async fn clock_secs(&self) -> i64 {
        let metrics: serde_json::Value = self
            .http
            .get(self.url("/metrics"))
            .header("X-Access-Token", TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        metrics["ts"].as_i64().expect("metrics carry ts")
    }
}

fn spec(template_id: &TemplateId, build_id: &BuildId, vcpus: u32, memory_mib: u32) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: SandboxId::generate(),
        template_id: template_id.clone(),
        build_id: build_id.clone(),
        vcpus,
        memory_mib,
        env_vars: HashMap::new(),
        envd_access_token: Some(TOKEN.to_owned()),
        previous_access_token: None,
        egress: Default::default(),
        traffic_access_token: None,
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_fork_and_snapshot_lose_nothing() {
    let Some((data_root, template_id, build_id)) = template_from_env() else {
        eprintln!("HEARTH_TEST_TEMPLATE_DIR is not set; skipping the pause and resume VM test");
        return;
    };
    let data = DataDir::new(&data_root);
    let manifest = hearth_storage::TemplateManifest::load(
        &data.template_build(&template_id, &build_id).manifest(),
    )
    .unwrap();
    let (_sweep, node) = start_node(&data_root, 2).await;
    let new_spec = || spec(&template_id, &build_id, manifest.vcpus, manifest.memory_mib);

    // Five pause/resume cycles with writes between them, and a 100 MiB file.
    let first = new_spec();
    let id = first.sandbox_id.clone();
    let _cleanup = RemoveOnDrop(data.sandbox(&id).dir().to_path_buf());
    node.start(first).await.unwrap();
    let mut big = vec![0u8; 100 << 20];
    rand::rng().fill_bytes(&mut big);
    let big_sum = Sha256::digest(&big);
    Guest::of(&node, &id).write("/home/user/big.bin", big).await;

    let mut written = Vec::new();
    let mut pause_bytes = Vec::new();
    for cycle in 0..5 {
        let guest = Guest::of(&node, &id);
        let content = format!("cycle {cycle} {}", "x".repeat(cycle * 1000)).into_bytes();
        guest
            .write(&format!("/home/user/cycle-{cycle}.txt"), content.clone())
            .await;
        written.push(content);

        let run_dir = data.sandbox(&id).dir().to_path_buf();
        let paused = node.pause(&id).await.unwrap();
        assert!(paused.bytes_written > 0);
        assert!(
            data.sandbox(&id).pause_record().is_file(),
            "cycle {cycle}: no pause record"
        );
        assert!(
            vmm_pids(&run_dir).is_empty(),
            "cycle {cycle}: a VMM still runs for a paused sandbox"
        );
        assert!(node.lookup(id.as_str()).is_none());
        assert_eq!(node.paused().await, vec![id.clone()]);
        println!("cycle {cycle}: pause wrote {} bytes", paused.bytes_written);
        pause_bytes.push(paused.bytes_written);
        // From the third pause on, the memory is in the sandbox's own file and a pause
        // writes only what changed: far less than the first pause's full copy.
        if cycle >= 2 {
            assert!(
                paused.bytes_written < pause_bytes[0] / 4,
                "cycle {cycle}: pause wrote {} bytes, the first wrote {}",
                paused.bytes_written,
                pause_bytes[0]
            );
        }

        // The guest clock must follow the host's, however long the pause.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut resume_spec = new_spec();
        resume_spec.sandbox_id = id.clone();
        node.resume(resume_spec).await.unwrap();
        let guest = Guest::of(&node, &id);
        let (host, guest_clock) = (now_secs(), guest.clock_secs().await);
        assert!(
            (guest_clock - host).abs() <= 1,
            "cycle {cycle}: guest clock {guest_clock}, host {host}"
        );
        for (earlier, content) in written.iter().enumerate() {
            assert_eq!(
                &guest.read(&format!("/home/user/cycle-{earlier}.txt")).await,
                content,
                "cycle {cycle}: file {earlier} changed"
            );
        }
    }
    let big_back = Guest::of(&node, &id).read("/home/user/big.bin").await;
    assert_eq!(
        Sha256::digest(&big_back),
        big_sum,
        "the 100 MiB file changed across five pauses"
    );
    drop(big_back);

    // A pause that cannot write its state (a 16 KiB file system, smaller than the device
    // state) leaves the sandbox running.
    let paused_dir = data.sandbox(&id).paused_dir();
    std::fs::create_dir_all(&paused_dir).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "hearth-test-full"])
        .arg(&paused_dir)
        .status()
        .unwrap()
        .success());
    let mount = MountGuard(paused_dir.clone());
    let err = node.pause(&id).await.unwrap_err();
    assert!(
        matches!(err, RuntimeError::PauseFailedRunning(_)),
        "unexpected error: {err}"
    );
    println!("injected full disk: {err}");
    assert_eq!(node.running().await, vec![id.clone()]);
    let guest = Guest::of(&node, &id);
    assert!(
        guest.healthy().await,
        "envd does not answer after the failed pause"
    );
    assert_eq!(guest.read("/home/user/cycle-4.txt").await, written[4]);
    guest
        .write("/home/user/after-failure.txt", b"still here".to_vec())
        .await;
    drop(mount);
    node.pause(&id)
        .await
        .expect("a pause after the disk has room again");
    let mut resume_spec = new_spec();
    resume_spec.sandbox_id = id.clone();
    node.resume(resume_spec).await.unwrap();
    assert_eq!(
        Guest::of(&node, &id)
            .read("/home/user/after-failure.txt")
            .await,
        b"still here"
    );

    // Fork: both children see the parent's files; their writes stay their own.
    let forks = node.fork(&id, vec![new_spec(), new_spec()]).await.unwrap();
    let fork_ids: Vec<SandboxId> = node
        .running()
        .await
        .into_iter()
        .filter(|other| *other != id)
        .collect();
    assert_eq!(forks.len(), 2);
    assert!(forks.iter().all(Result::is_ok), "a fork failed: {forks:?}");
    assert_eq!(fork_ids.len(), 2);
    for (n, fork) in fork_ids.iter().enumerate() {
        let guest = Guest::of(&node, fork);
        assert_eq!(
            guest.read("/home/user/after-failure.txt").await,
            b"still here"
        );
        guest
            .write("/home/user/fork.txt", format!("fork {n}").into_bytes())
            .await;
    }
    let parent = Guest::of(&node, &id);
    assert!(
        parent.healthy().await,
        "the parent does not answer after the fork"
    );
    let status = parent
        .http
        .get(parent.url("/files?path=/home/user/fork.txt&username=user"))
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404, "a fork's write reached the parent");
    assert_eq!(
        Guest::of(&node, &fork_ids[0])
            .read("/home/user/fork.txt")
            .await,
        b"fork 0"
    );

    // A named snapshot creates new sandboxes with the parent's files.
    let snapshot_template =
        TemplateId::parse(&format!("snap-test-{}", SandboxId::generate())).unwrap();
    let snapshot_build = BuildId::parse("b1").unwrap();
    let _snapshot_cleanup = RemoveOnDrop(data.templates_dir().join(snapshot_template.as_str()));
    node.snapshot(
        &id,
        SnapshotSpec {
            template_id: snapshot_template.clone(),
            build_id: snapshot_build.clone(),
        },
    )
    .await
    .unwrap();
    let from_snapshot = spec(
        &snapshot_template,
        &snapshot_build,
        manifest.vcpus,
        manifest.memory_mib,
    );
    let snapshot_child = from_snapshot.sandbox_id.clone();
    node.start(from_snapshot).await.unwrap();
    assert_eq!(
        Guest::of(&node, &snapshot_child)
            .read("/home/user/cycle-2.txt")
            .await,
        written[2]
    );
    assert!(
        Guest::of(&node, &id).healthy().await,
        "the parent does not answer after the snapshot"
    );
    node.stop(&snapshot_child).await.unwrap();
    for fork in &fork_ids {
        node.stop(fork).await.unwrap();
    }

    // A VMM that dies during the pause: the sandbox is stopped and reported so.
    let run_dir = data.sandbox(&id).dir().to_path_buf();
    let pids = vmm_pids(&run_dir);
    assert_eq!(pids.len(), 1);
    // SAFETY: kill(2) on the QEMU process this test started; no memory is involved.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = node.pause(&id).await.unwrap_err();
    assert!(
        matches!(err, RuntimeError::PauseFailedKilled(_)),
        "unexpected error: {err}"
    );
    println!("injected VMM death: {err}");
    assert!(node.running().await.is_empty());
    assert!(
        !run_dir.exists(),
        "run dir of the failed sandbox left behind"
    );

    // Restart: a paused sandbox is found again, stray directories are removed.
    let second = new_spec();
    let second_id = second.sandbox_id.clone();
    let _second_cleanup = RemoveOnDrop(data.sandbox(&second_id).dir().to_path_buf());
    node.start(second).await.unwrap();
    Guest::of(&node, &second_id)
        .write("/home/user/kept.txt", b"kept".to_vec())
        .await;
    node.pause(&second_id).await.unwrap();
    let stray = data.sandbox(&SandboxId::generate()).dir().to_path_buf();
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("disk.qcow2"), b"stale").unwrap();
    assert_eq!(node.recover(), vec![second_id.clone()]);
    assert!(!stray.exists(), "recover left a stray sandbox directory");
    let mut resume_spec = new_spec();
    resume_spec.sandbox_id = second_id.clone();
    node.resume(resume_spec).await.unwrap();
    assert_eq!(
        Guest::of(&node, &second_id)
            .read("/home/user/kept.txt")
            .await,
        b"kept"
    );
    node.stop(&second_id).await.unwrap();

    node.shutdown().await.unwrap();
}
