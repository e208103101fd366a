//! Custom template builds against the real thing: a tiny image (busybox and a static bash)
//! as an OCI layout, build steps in a QEMU build VM, the start command awaited, then a
//! sandbox from the result; a rebuild with the last step changed reuses every earlier
//! layer; deleting the template keeps the build while the sandbox runs.
//!
//! Needs root, QEMU, the base template (`HEARTH_TEST_TEMPLATE_DIR`) for the kernel and
//! initramfs, and a static envd (`HEARTH_TEST_ENVD`), as `scripts/test.sh` sets them.
//! Without them the test prints why and passes without running.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{start_node, template_from_env};
use hearth_control_plane::runtime::{SandboxRuntime, SandboxSpec};
use hearth_oci::ImageConfig;
use hearth_proxy::RouteTable;
use hearth_storage::{DataDir, TemplateManifest};
use hearth_template_builder::base_disk::{self, BaseDiskSettings};
use hearth_template_builder::custom::{
    build_custom_template, BootArtifacts, BuildPlan, CustomBuildOptions, PlanStep, ReadyCheck, StartSpec, StepRef,
};
use hearth_template_builder::guest::{GuestAgent, RunSpec};
use hearth_template_builder::plan::write_copy_archive;
use hearth_types::{BuildId, SandboxId, TemplateId};
use hearth_vmm::MachineSize;

/// The tiny image has no `adduser`: the account is written by hand.
const ADD_USER: &str = "echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group && mkdir -p /home/app /srv/www && chown app:app /home/app";

const TRICKY: &str = "say \"hi\" \\ back\\slash $(touch /tmp/pwned) `touch /tmp/pwned2` end";

fn tiny_rootfs(root: &Path) {
    for dir in ["bin", "etc", "tmp", "root", "usr/bin", "srv"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "wc", "cat", "echo", "id", "whoami", "pwd", "printf", "mkdir", "chown", "nc", "httpd", "stat", "test", "sleep", "touch"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

fn run_step(command: &str) -> PlanStep {
    PlanStep::Run { argv: vec!["/bin/sh".into(), "-c".into(), command.into()], user: None, extra_env: vec![], force: false }
}

async fn output(agent: &GuestAgent, command: &str) -> String {
    let args = vec!["-c".to_owned(), command.to_owned()];
    let env = BTreeMap::new();
    let spec = RunSpec { cmd: "/bin/sh", args: &args, user: "", cwd: None, env: &env, timeout: Duration::from_secs(30) };
    let text = std::sync::Mutex::new(String::new());
    let code = agent
        .run(&spec, &|_, line: &str| {
            let mut text = text.lock().unwrap();
            text.push_str(line);
            text.push('\n');
        })
        .await
        .unwrap();
    let text = text.into_inner().unwrap();
    assert_eq!(code, 0, "{command}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_build_from_an_image_with_cache_start_command_and_delete() {
    let Some((data_root, base_id, base_build)) = template_from_env() else {
        eprintln!("HEARTH_TEST_TEMPLATE_DIR is not set; skipping the template build VM test");
        return;
    };
    let Some(envd) = std::env::var_os("HEARTH_TEST_ENVD") else {
        eprintln!("HEARTH_TEST_ENVD is not set; skipping the template build VM test");
        return;
    };
    let data_dir = DataDir::new(&data_root);
    let base = data_dir.template_build(&base_id, &base_build);
    let base_manifest = TemplateManifest::load(&base.manifest()).unwrap();
    let (_sweep, node) = start_node(&data_root, 1).await;

    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    tiny_rootfs(&rootfs);
    let config = ImageConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "IMAGE_VAR=from the image".into()],
        ..ImageConfig::default()
    };
    hearth_oci::write_layout(&rootfs, &config, &work.path().join("layout"), "t").unwrap();
    let image = hearth_oci::read_layout(&work.path().join("layout"), Some("t")).unwrap();
    let settings = BaseDiskSettings {
        data_dir: data_dir.clone(),
        envd_binary: envd.into(),
        hostname: "e2b".into(),
        disk_size_bytes: 1 << 30,
        plain_http_registries: vec![],
    };
    let (base_disk, _) = base_disk::from_image(&settings, "tiny", image, &|_| {}).await.unwrap();
    assert_eq!(base_disk.defaults().user, "root");
    assert_eq!(base_disk.defaults().env["IMAGE_VAR"], "from the image");

    let context = work.path().join("context");
    std::fs::create_dir_all(context.join("site")).unwrap();
    std::fs::write(context.join("site/index.html"), "hello from the build\n").unwrap();
    let copy_plan = hearth_dockerfile::plan_copy(
        &context,
        &["site/".to_owned()],
        "/srv/www/",
        "/",
        &hearth_dockerfile::IgnoreMatcher::parse(""),
    )
    .unwrap();
    let archive = work.path().join("copy.tar");
    let written = write_copy_archive(&copy_plan, &archive).unwrap();

    let template_id = TemplateId::parse(&format!("tiny-{}", &SandboxId::generate().as_str()[..8])).unwrap();
    let plan = |last: &str| BuildPlan {
        base: base_disk.clone(),
        steps: vec![
            run_step(ADD_USER),
            PlanStep::Copy {
                archive: archive.clone(),
                content_hash: written.content_hash.clone(),
                dest: written.dest.clone(),
                owner: Some("app".into()),
                mode: None,
                single_file: written.single_file,
                force: false,
                shown_dest: "/srv/www/".into(),
            },
            PlanStep::Env(vec![("TRICKY".into(), TRICKY.into())]),
            PlanStep::Workdir("/srv/www".into()),
            PlanStep::User("app".into()),
            run_step(last),
        ],
        start: Some(StartSpec {
            command: "busybox httpd -f -p 8080 -h /srv/www".into(),
            ready: Some(ReadyCheck::Ports(vec![8080])),
        }),
        ready_only: None,
        exposed_ports: vec![],
        labels: BTreeMap::new(),
    };
    let options = |build_id: &BuildId| CustomBuildOptions {
        data_dir: data_dir.clone(),
        template_id: template_id.clone(),
        build_id: build_id.clone(),
        machine: MachineSize { vcpus: 1, memory_mib: 256 },
        envd_version: base_manifest.envd_version.clone(),
        boot: BootArtifacts {
            kernel: base.kernel(),
            initrd: base.initrd(),
            kernel_release: base_manifest.kernel_release.clone(),
            cmdline: base_manifest.kernel_cmdline.clone(),
        },
        force: false,
        step_timeout: Duration::from_secs(300),
        ready_timeout: Duration::from_secs(60),
        start_settle: Duration::from_secs(1),
        boot_timeout: Duration::from_secs(120),
    };
    let log = |step: &StepRef, _kind, line: &str| eprintln!("[{step}] {line}");

    let slot = node.slots().acquire().await.unwrap();
    let first_id = BuildId::generate();
    let first = build_custom_template(&options(&first_id), &plan("echo first > /srv/www/last.txt"), node.driver(), &slot, &log)
        .await
        .unwrap();
    assert_eq!(first.cached_steps, 0);
    let guest = first.manifest.guest.clone().unwrap();
    assert_eq!(guest.user, "app");
    assert_eq!(guest.workdir.as_deref(), Some("/srv/www"));
    assert_eq!(guest.env["TRICKY"], TRICKY);

    // Only the changed last step runs again.
    let second_id = BuildId::generate();
    let second = build_custom_template(&options(&second_id), &plan("echo second > /srv/www/last.txt"), node.driver(), &slot, &log)
        .await
        .unwrap();
    assert_eq!(second.cached_steps, 5);
    let state_saved = std::fs::read_dir(data_dir.cache_dir().join("layers"))
        .unwrap()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().contains(".vm-") && entry.path().join("done").is_file());
    assert!(state_saved, "the build VM's state after each step is saved for rebuilds");
    eprintln!("full build {:.1} s, rebuild {:.1} s", first.total.as_secs_f64(), second.total.as_secs_f64());

    // A start command that exits fails the build with its output, and publishes nothing.
    let failing_id = BuildId::generate();
    let mut failing = plan("true");
    failing.start = Some(StartSpec { command: "echo said-before-exit; exit 3".into(), ready: Some(ReadyCheck::Ports(vec![8080])) });
    let failed = build_custom_template(&options(&failing_id), &failing, node.driver(), &slot, &log).await.unwrap_err();
    assert!(failed.message.contains("said-before-exit"), "{}", failed.message);
    assert_eq!(failed.step, StepRef::Finalize);
    assert!(!data_dir.template_build(&template_id, &failing_id).dir().exists());
    node.slots().release(slot).await.unwrap();

    // A sandbox of the second build: its user, directory, environment, files and server.
    let sandbox_id = SandboxId::generate();
    let manifest = &second.manifest;
    node.start(SandboxSpec {
        sandbox_id: sandbox_id.clone(),
        template_id: template_id.clone(),
        build_id: second_id.clone(),
        vcpus: manifest.vcpus,
        memory_mib: manifest.memory_mib,
        env_vars: HashMap::new(),
        envd_access_token: None,
        previous_access_token: None,
        egress: Default::default(),
        traffic_access_token: None,
    })
    .await
    .unwrap();
    let route = node.lookup(sandbox_id.as_str()).unwrap();
    let page = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}:8080/index.html", route.address))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap(), "hello from the build\n");
    let agent = GuestAgent::new(format!("http://{}:{}", route.address, hearth_types::guest::ENVD_PORT));
    assert_eq!(output(&agent, "whoami").await, "app\n");
    assert_eq!(output(&agent, "pwd").await, "/srv/www\n");
    assert_eq!(output(&agent, "printf '%s\\n' \"$TRICKY\"").await, format!("{TRICKY}\n"));
    assert_eq!(output(&agent, "printf '%s\\n' \"$IMAGE_VAR\"").await, "from the image\n");
    assert_eq!(output(&agent, "cat /srv/www/last.txt").await, "second\n");
    assert_eq!(output(&agent, "stat -c %U /srv/www/index.html").await, "app\n");
    assert_eq!(output(&agent, "test ! -e /tmp/pwned && test ! -e /tmp/pwned2 && echo clean").await, "clean\n");
    // Copy archives staged in the guest's /tmp are gone from the template's memory.
    assert_eq!(output(&agent, "ls -A /tmp/.hearth-build | wc -l").await.trim(), "0");

    // Deleting the template keeps the build the sandbox runs on until it stops.
    node.delete_template(&template_id).await.unwrap();
    assert!(!data_dir.template_build(&template_id, &first_id).dir().exists());
    assert!(data_dir.template_build(&template_id, &second_id).rootfs().exists());
    assert_eq!(output(&agent, "cat /srv/www/last.txt").await, "second\n");
    node.stop(&sandbox_id).await.unwrap();
    assert!(!data_dir.templates_dir().join(template_id.as_str()).exists());
}
