//! Runs the e2b Python SDK (2.63.0) against the REST API on 127.0.0.1 to check that it
//! parses every response. The recording runtime starts no VMs, so only REST calls are made.
//!
//! Needs the SDK's virtualenv: `/opt/hearth-venv/bin/python`, or the interpreter named by
//! `HEARTH_SDK_PYTHON`. The test fails when neither exists.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{harness, API_KEY};

const DEFAULT_PYTHON: &str = "/opt/hearth-venv/bin/python";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_parses_rest_responses() {
    let h = harness().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = h.router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let python = std::env::var("HEARTH_SDK_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.to_owned());
    assert!(
        Path::new(&python).exists(),
        "Python with the e2b SDK not found at {python}; set HEARTH_SDK_PYTHON"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/rest_check.py");

    let mut command = tokio::process::Command::new(&python);
    command
        .arg(&script)
        .env("E2B_API_URL", format!("http://{address}"))
        .env("E2B_API_KEY", API_KEY)
        // Nothing listens on port 9 of loopback: any envd call fails at once instead of
        // reaching E2B's default domain.
        .env("E2B_SANDBOX_URL", "http://127.0.0.1:9")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("SDK check finished within 120 s")
        .expect("run the SDK check");

    server.abort();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("sdk rest check passed"),
        "{stdout}\n{stderr}"
    );
}
