//! Tests of `GuestAgent` against the real envd binary on a loopback port.
//!
//! They need root, because envd runs the commands as `root`. The envd binary is
//! `HEARTH_TEST_ENVD` when set, otherwise `envd` in this test's target directory: build it
//! first with `cargo build -p envd`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hearth_template_builder::guest::{BackgroundStatus, GuestAgent, GuestError, OutputStream, RunSpec};

/// A running envd, killed on drop.
struct Envd {
    child: Child,
    agent: GuestAgent,
}

fn envd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HEARTH_TEST_ENVD") {
        return PathBuf::from(path);
    }
    // The test runs from target/<profile>/deps/, and `cargo build -p envd` writes
    // target/<profile>/envd.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("the test binary lies in target/<profile>/deps");
    let path = profile_dir.join("envd");
    assert!(
        path.is_file(),
        "envd binary {} not found; run `cargo build -p envd` first or set HEARTH_TEST_ENVD",
        path.display()
    );
    path
}

/// Returns a loopback port below Linux's ephemeral range that is free now, distinct
/// from the ports that envd's own tests pick from the process id.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};

    static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT_PORT.compare_exchange(0, 10_000 + (std::process::id() % 9_000) as u16, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "ran out of test ports below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Envd {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new(envd_binary())
            .args(["--port", &port.to_string(), "--default-user", "root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start envd");
        let agent = GuestAgent::new(format!("http://127.0.0.1:{port}"));
        let envd = Self { child, agent };
        envd.agent.wait_healthy(Duration::from_secs(10)).await.expect("envd became healthy");
        envd
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shell<'a>(args: &'a [String], env: &'a BTreeMap<String, String>, cwd: Option<&'a str>, timeout: Duration) -> RunSpec<'a> {
    RunSpec {
        cmd: "/bin/sh",
        args,
        user: "root",
        cwd,
        env,
        timeout,
    }
}

fn script(text: &str) -> Vec<String> {
    vec!["-c".to_string(), text.to_string()]
}

/// Runs `spec` and returns the exit result with every output line.
async fn run_collect(agent: &GuestAgent, spec: &RunSpec<'_>) -> (Result<i32, GuestError>, Vec<(OutputStream, String)>) {
    let lines = Mutex::new(Vec::new());
    let result = agent
        .run(spec, &|stream, line: &str| lines.lock().unwrap().push((stream, line.to_string())))
        .await;
    (result, lines.into_inner().unwrap())
}

fn process_exists(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (state Z) has ended and only waits for its parent to reap it.
    !status.is_empty() && !status.contains(") Z ")
}

#[tokio::test]
async fn wait_healthy_times_out_on_closed_port() {
    let port = free_port();
    let agent = GuestAgent::new(format!("http://127.0.0.1:{port}"));
    let started = Instant::now();
    let err = agent.wait_healthy(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, GuestError::Unhealthy { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
}

#[tokio::test]
async fn run_returns_code_and_lines_as_root() {
    let envd = Envd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = BTreeMap::new();
    env.insert("GREETING".to_string(), "hello world".to_string());
    let args = script("echo \"$GREETING\"; echo err-line >&2; pwd; id -u; printf 'a\\nb\\r\\npartial'; exit 3");
    let cwd = dir.path().to_str().unwrap();
    let spec = shell(&args, &env, Some(cwd), Duration::from_secs(20));
    let (result, lines) = run_collect(&envd.agent, &spec).await;

    assert_eq!(result.unwrap(), 3);
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|(stream, _)| *stream == OutputStream::Stdout)
        .map(|(_, line)| line.as_str())
        .collect();
    assert_eq!(stdout, ["hello world", cwd, "0", "a", "b", "partial"]);
    let stderr: Vec<&str> = lines
        .iter()
        .filter(|(stream, _)| *stream == OutputStream::Stderr)
        .map(|(_, line)| line.as_str())
        .collect();
    assert_eq!(stderr, ["err-line"]);
}

#[tokio::test]
async fn run_passes_large_output_as_root() {
    let envd = Envd::start().await;
    let env = BTreeMap::new();
    let args = script("seq 1 20000");
    let spec = shell(&args, &env, None, Duration::from_secs(30));
    let (result, lines) = run_collect(&envd.agent, &spec).await;

    assert_eq!(result.unwrap(), 0);
    assert_eq!(lines.len(), 20000);
    assert_eq!(lines.first().unwrap().1, "1");
    assert_eq!(lines.last().unwrap().1, "20000");
}

#[tokio::test]
async fn run_reports_signal_as_root() {
    let envd = Envd::start().await;
    let env = BTreeMap::new();
    let args = script("kill -9 $$");
    let spec = shell(&args, &env, None, Duration::from_secs(20));
    let (result, _) = run_collect(&envd.agent, &spec).await;

    match result {
        Err(GuestError::Signaled { status, .. }) => assert!(status.contains("killed"), "{status}"),
        other => panic!("expected a signal error, got {other:?}"),
    }
}

#[tokio::test]
async fn run_timeout_kills_process_as_root() {
    let envd = Envd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let env = BTreeMap::new();
    let args = script(&format!("echo started; echo $$ > {}; exec sleep 60", pid_file.display()));
    let spec = shell(&args, &env, None, Duration::from_millis(1500));
    let started = Instant::now();
    let (result, lines) = run_collect(&envd.agent, &spec).await;

    assert!(matches!(result, Err(GuestError::Timeout { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(lines, [(OutputStream::Stdout, "started".to_string())]);
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    // envd's own backstop kills the command only 5 s after the timeout, so a process that
    // ends within 2 s was killed by the client.
    let deadline = Instant::now() + Duration::from_secs(2);
    while process_exists(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!process_exists(pid), "process {pid} still runs after the timeout");
}

#[tokio::test]
async fn run_rejects_missing_cwd_as_root() {
    let envd = Envd::start().await;
    let env = BTreeMap::new();
    let args = script("true");
    let spec = shell(&args, &env, Some("/nonexistent/dir"), Duration::from_secs(10));
    let (result, _) = run_collect(&envd.agent, &spec).await;

    match result {
        Err(GuestError::Rpc { code, message, .. }) => {
            assert_eq!(code, "invalid_argument");
            assert!(message.contains("/nonexistent/dir"), "{message}");
        }
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[tokio::test]
async fn init_sets_env_and_workdir_as_root() {
    let envd = Envd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().to_str().unwrap();
    let mut init_env = BTreeMap::new();
    init_env.insert("FROM_INIT".to_string(), "yes".to_string());
    envd.agent.init(&init_env, Some("root"), Some(workdir)).await.unwrap();

    let env = BTreeMap::new();
    let args = script("echo \"$FROM_INIT\"; pwd");
    let spec = shell(&args, &env, None, Duration::from_secs(20));
    let (result, lines) = run_collect(&envd.agent, &spec).await;
    assert_eq!(result.unwrap(), 0);
    let lines: Vec<&str> = lines.iter().map(|(_, line)| line.as_str()).collect();
    assert_eq!(lines, ["yes", workdir]);
}

#[tokio::test]
async fn upload_writes_files_as_root() {
    let envd = Envd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("new/parent/file.bin");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    envd.agent
        .upload(target.to_str().unwrap(), "root", content.clone())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), content);

    let local = dir.path().join("local.bin");
    std::fs::write(&local, &content[..1234]).unwrap();
    let streamed = dir.path().join("streamed.bin");
    envd.agent
        .upload_file(streamed.to_str().unwrap(), "root", &local)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&streamed).unwrap(), &content[..1234]);

    let err = envd.agent.upload("/tmp/x", "no-such-user", Vec::new()).await.unwrap_err();
    assert!(matches!(err, GuestError::Status { status: 400, .. }), "{err}");
}

#[tokio::test]
async fn background_process_reports_output_and_exit_as_root() {
    let envd = Envd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let env = BTreeMap::new();
    let args = script(&format!(
        "echo first; echo oops >&2; while [ ! -e {} ]; do sleep 0.05; done; echo second; exit 7",
        go.display()
    ));
    let spec = shell(&args, &env, None, Duration::from_secs(10));
    let process = envd.agent.start_background(&spec).await.unwrap();

    assert!(process.pid() > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process.output_tail().contains("oops") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(process.status(), BackgroundStatus::Running);
    assert_eq!(process.exit_code(), None);
    let first = envd.agent.take_output(process.pid()).unwrap();
    assert!(first.contains("first\n"), "{first:?}");
    assert!(first.contains("oops\n"), "{first:?}");
    assert_eq!(process.output_tail(), "", "take_output drains the buffer");

    std::fs::write(&go, "").unwrap();
    let status = process.wait(Duration::from_secs(10)).await;
    assert_eq!(status, BackgroundStatus::Exited(7));
    assert_eq!(process.exit_code(), Some(7));
    assert_eq!(process.take_output(), "second\n");
    assert_eq!(envd.agent.take_output(999_999_999), None);
}

#[tokio::test]
async fn background_start_error_is_returned_as_root() {
    let envd = Envd::start().await;
    let env = BTreeMap::new();
    let args = Vec::new();
    let spec = RunSpec {
        cmd: "/nonexistent/program",
        args: &args,
        user: "root",
        cwd: None,
        env: &env,
        timeout: Duration::from_secs(10),
    };
    let err = envd.agent.start_background(&spec).await.unwrap_err();
    assert!(matches!(err, GuestError::Rpc { .. }), "{err}");
}
