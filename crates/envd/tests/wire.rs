//! Wire tests of the real envd binary on a loopback port: Connect unary, server and
//! client streams in both codecs, the HTTP endpoints, access tokens, and init mode.
//!
//! They run commands as root and as `nobody`, and the init-mode test creates a PID
//! namespace, so they need root.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use hearth_envd_proto::filesystem::{FileType, ListDirRequest, ListDirResponse, StatRequest, StatResponse};
use hearth_envd_proto::process::process_event::{data_event::Output, Event};
use hearth_envd_proto::process::{
    process_input, process_selector, stream_input_request, ConnectRequest, ConnectResponse,
    ProcessConfig, ProcessInput, ProcessSelector, SendSignalRequest, SendSignalResponse,
    StartRequest, StartResponse, StreamInputRequest, StreamInputResponse,
};
use prost::Message;

/// A running envd binary, killed on drop.
struct Envd {
    child: Child,
    base_url: String,
}

/// Returns a free loopback port below Linux's ephemeral range (32768 and up). The kernel
/// can give a port from `bind(0)` to a parallel test again once it is released, and then
/// two envd processes race for it. Ports from this counter are unique within the test
/// process, and the kernel never picks them for another socket.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};

    static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT_PORT.compare_exchange(0, 20_000 + (std::process::id() % 10_000) as u16, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "ran out of test ports below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Envd {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .args(["--port", &port.to_string(), "--default-user", "root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start envd");
        Self::wait_ready(child, port)
    }

    /// Starts envd as PID 1 of a new PID namespace, as in the guest.
    fn start_as_init() -> Self {
        let port = free_port();
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
            .arg(env!("CARGO_BIN_EXE_envd"))
            .args(["--port", &port.to_string(), "--default-user", "root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start envd under unshare");
        Self::wait_ready(child, port)
    }

    fn wait_ready(child: Child, port: u16) -> Self {
        let base_url = format!("http://127.0.0.1:{port}");
        let envd = Self { child, base_url };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                drop(stream);
                return envd;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("envd did not listen on port {port} within 10 s");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![flags];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Incremental splitter of a Connect stream response.
#[derive(Default)]
struct FrameDecoder {
    buffer: BytesMut,
}

enum Frame {
    Message(Bytes),
    End(serde_json::Value),
}

impl FrameDecoder {
    fn push(&mut self, chunk: &[u8]) -> Vec<Frame> {
        self.buffer.extend_from_slice(chunk);
        let mut frames = Vec::new();
        while self.buffer.len() >= 5 {
            let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
            if self.buffer.len() < 5 + length {
                break;
            }
            let flags = self.buffer[0];
            self.buffer.advance(5);
            let payload = self.buffer.split_to(length).freeze();
            if flags & 0b10 != 0 {
                frames.push(Frame::End(serde_json::from_slice(&payload).unwrap()));
            } else {
                frames.push(Frame::Message(payload));
            }
        }
        frames
    }
}

async fn open_stream(url: &str, body: Vec<u8>, content_type: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client()
        .post(url)
        .header("content-type", content_type)
        .header("connect-protocol-version", "1")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response
}

/// Collects a whole server stream in the protobuf codec.
async fn server_stream_proto<Res: Message + Default>(
    url: &str,
    request: &impl Message,
    headers: &[(&str, &str)],
) -> (Vec<Res>, serde_json::Value) {
    let response = open_stream(url, envelope(0, &request.encode_to_vec()), "application/connect+proto", headers).await;
    let mut decoder = FrameDecoder::default();
    let mut messages = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        for frame in decoder.push(&chunk.unwrap()) {
            match frame {
                Frame::Message(payload) => messages.push(Res::decode(payload).unwrap()),
                Frame::End(end) => return (messages, end),
            }
        }
    }
    panic!("stream ended without an end-of-stream message");
}

fn bash(cmd: &str) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), cmd.into()],
            envs: HashMap::new(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

struct CommandOutput {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: Option<i32>,
    keepalives: usize,
}

fn collect_output(events: Vec<StartResponse>) -> CommandOutput {
    let mut output = CommandOutput { pid: 0, stdout: Vec::new(), stderr: Vec::new(), exit_code: None, keepalives: 0 };
    for response in events {
        match response.event.and_then(|event| event.event) {
            Some(Event::Start(start)) => output.pid = start.pid,
            Some(Event::Data(data)) => match data.output {
                Some(Output::Stdout(bytes)) => output.stdout.extend_from_slice(&bytes),
                Some(Output::Stderr(bytes)) => output.stderr.extend_from_slice(&bytes),
                _ => {}
            },
            Some(Event::End(end)) => output.exit_code = Some(end.exit_code),
            Some(Event::Keepalive(_)) => output.keepalives += 1,
            None => {}
        }
    }
    output
}

#[tokio::test]
async fn start_streams_output_and_exit_code() {
    let envd = Envd::start();
    let (events, end) = server_stream_proto::<StartResponse>(
        &envd.url("/process.Process/Start"),
        &bash("printf 'a\\xffb'; echo oops >&2; exit 4"),
        &[],
    )
    .await;
    assert_eq!(end, serde_json::json!({}));
    let output = collect_output(events);
    assert!(output.pid > 0);
    assert_eq!(output.stdout, b"a\xffb");
    assert_eq!(output.stderr, b"oops\n");
    assert_eq!(output.exit_code, Some(4));
}

#[tokio::test]
async fn start_runs_as_user_with_env_and_cwd() {
    let envd = Envd::start();
    let mut request = bash("id -un; echo $HEARTH_T; pwd; echo $HOME");
    let config = request.process.as_mut().unwrap();
    config.envs.insert("HEARTH_T".into(), "value".into());
    config.cwd = Some("/tmp".into());
    let user = base64::engine::general_purpose::STANDARD.encode("nobody:");
    let authorization = format!("Basic {user}");
    let (events, _) = server_stream_proto::<StartResponse>(
        &envd.url("/process.Process/Start"),
        &request,
        &[("authorization", authorization.as_str())],
    )
    .await;
    let output = collect_output(events);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "nobody\nvalue\n/tmp\n/nonexistent\n");
}

#[tokio::test]
async fn start_sends_keepalives_at_header_interval() {
    let envd = Envd::start();
    let (events, _) = server_stream_proto::<StartResponse>(
        &envd.url("/process.Process/Start"),
        &bash("sleep 2.5"),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    let output = collect_output(events);
    assert!(output.keepalives >= 2, "got {} keepalives", output.keepalives);
    assert_eq!(output.exit_code, Some(0));
}

#[tokio::test]
async fn start_json_codec_stream() {
    let envd = Envd::start();
    let request = serde_json::to_vec(&bash("echo hi")).unwrap();
    let response = open_stream(
        &envd.url("/process.Process/Start"),
        envelope(0, &request),
        "application/connect+json",
        &[],
    )
    .await;
    assert_eq!(response.headers()["content-type"], "application/connect+json");
    let body = response.bytes().await.unwrap();
    let frames = FrameDecoder::default().push(&body);
    let mut stdout = Vec::new();
    let mut ended = false;
    for frame in frames {
        match frame {
            Frame::Message(payload) => {
                let message: StartResponse = serde_json::from_slice(&payload).unwrap();
                if let Some(Event::Data(data)) = message.event.and_then(|event| event.event) {
                    if let Some(Output::Stdout(bytes)) = data.output {
                        stdout.extend_from_slice(&bytes);
                    }
                }
            }
            Frame::End(end) => ended = end == serde_json::json!({}),
        }
    }
    assert_eq!(stdout, b"hi\n");
    assert!(ended);
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap()
}

/// Reads a whole process stream and returns the number of output bytes.
async fn count_output_bytes(response: reqwest::Response) -> (usize, bool) {
    let mut decoder = FrameDecoder::default();
    let mut total = 0;
    let mut saw_end_event = false;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        for frame in decoder.push(&chunk.unwrap()) {
            if let Frame::Message(payload) = frame {
                let event = ConnectResponse::decode(payload).unwrap().event.and_then(|event| event.event);
                match event {
                    Some(Event::Data(data)) => {
                        if let Some(Output::Stdout(bytes)) = data.output {
                            total += bytes.len();
                        }
                    }
                    Some(Event::End(_)) => saw_end_event = true,
                    _ => {}
                }
            }
        }
    }
    (total, saw_end_event)
}

#[tokio::test]
async fn large_output_with_two_subscribers_has_bounded_memory() {
    const OUTPUT_BYTES: usize = 256 * 1024 * 1024;
    let envd = Envd::start();
    let mut request = bash(&format!("sleep 0.5; head -c {OUTPUT_BYTES} /dev/zero"));
    request.tag = Some("big".into());
    let first = open_stream(
        &envd.url("/process.Process/Start"),
        envelope(0, &request.encode_to_vec()),
        "application/connect+proto",
        &[],
    )
    .await;
    let connect = ConnectRequest {
        process: Some(ProcessSelector { selector: Some(process_selector::Selector::Tag("big".into())) }),
    };
    let second = open_stream(
        &envd.url("/process.Process/Connect"),
        envelope(0, &connect.encode_to_vec()),
        "application/connect+proto",
        &[],
    )
    .await;

    let ((first_total, first_end), (second_total, second_end)) =
        tokio::join!(count_output_bytes(first), count_output_bytes(second));
    assert_eq!(first_total, OUTPUT_BYTES);
    assert!(first_end);
    assert_eq!(second_total, OUTPUT_BYTES);
    assert!(second_end);
    let peak_kib = vm_hwm_kib(envd.pid());
    assert!(peak_kib < 64 * 1024, "envd peak RSS {peak_kib} KiB for {OUTPUT_BYTES} bytes of output");
}

#[tokio::test]
async fn stream_input_feeds_stdin() {
    let envd = Envd::start();
    let mut request = bash("cat");
    request.stdin = Some(true);
    let started = open_stream(
        &envd.url("/process.Process/Start"),
        envelope(0, &request.encode_to_vec()),
        "application/connect+proto",
        &[],
    )
    .await;
    let mut body = started.bytes_stream();
    let mut decoder = FrameDecoder::default();
    let mut pid = 0;
    while pid == 0 {
        for frame in decoder.push(&body.next().await.unwrap().unwrap()) {
            if let Frame::Message(payload) = frame {
                if let Some(Event::Start(start)) = StartResponse::decode(payload).unwrap().event.and_then(|e| e.event) {
                    pid = start.pid;
                }
            }
        }
    }

    let selector = ProcessSelector { selector: Some(process_selector::Selector::Pid(pid)) };
    let mut input = Vec::new();
    input.extend(envelope(0, &StreamInputRequest {
        event: Some(stream_input_request::Event::Start(stream_input_request::StartEvent { process: Some(selector.clone()) })),
    }.encode_to_vec()));
    for word in ["one ", "two\n"] {
        input.extend(envelope(0, &StreamInputRequest {
            event: Some(stream_input_request::Event::Data(stream_input_request::DataEvent {
                input: Some(ProcessInput { input: Some(process_input::Input::Stdin(word.as_bytes().to_vec().into())) }),
            })),
        }.encode_to_vec()));
    }
    input.extend(envelope(0b10, b"{}"));
    let response = open_stream(&envd.url("/process.Process/StreamInput"), input, "application/connect+proto", &[]).await;
    let frames = FrameDecoder::default().push(&response.bytes().await.unwrap());
    assert!(matches!(frames.first(), Some(Frame::Message(payload)) if StreamInputResponse::decode(payload.clone()).is_ok()));
    assert!(matches!(frames.last(), Some(Frame::End(end)) if *end == serde_json::json!({})));

    let close = serde_json::json!({ "process": { "pid": pid } });
    let closed = client()
        .post(envd.url("/process.Process/CloseStdin"))
        .header("content-type", "application/json")
        .body(close.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 200);

    let mut stdout = Vec::new();
    let mut exit_code = None;
    while let Some(chunk) = body.next().await {
        for frame in decoder.push(&chunk.unwrap()) {
            if let Frame::Message(payload) = frame {
                match StartResponse::decode(payload).unwrap().event.and_then(|e| e.event) {
                    Some(Event::Data(data)) => {
                        if let Some(Output::Stdout(bytes)) = data.output {
                            stdout.extend_from_slice(&bytes);
                        }
                    }
                    Some(Event::End(end)) => exit_code = Some(end.exit_code),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(stdout, b"one two\n");
    assert_eq!(exit_code, Some(0));
}

#[tokio::test]
async fn unary_errors_use_connect_json() {
    let envd = Envd::start();
    let request = SendSignalRequest {
        process: Some(ProcessSelector { selector: Some(process_selector::Selector::Pid(999_999)) }),
        signal: 9,
    };
    let response = client()
        .post(envd.url("/process.Process/SendSignal"))
        .header("content-type", "application/proto")
        .body(request.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    let _ = SendSignalResponse::default();

    let unsupported = client()
        .post(envd.url("/process.Process/List"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(unsupported.status(), 415);
}

#[tokio::test]
async fn filesystem_stat_and_list_over_h2c() {
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
    std::fs::write(dir.path().join("a/b/file"), b"12345").unwrap();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();

    let stat = StatRequest { path: dir.path().join("a/b/file").display().to_string() };
    let response = h2
        .post(envd.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/proto")
        .body(stat.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let entry = StatResponse::decode(response.bytes().await.unwrap()).unwrap().entry.unwrap();
    assert_eq!(entry.size, 5);
    assert_eq!(entry.r#type(), FileType::File);
    assert_eq!(entry.owner, "root");

    let list = ListDirRequest { path: dir.path().display().to_string(), depth: 2 };
    let response = h2
        .post(envd.url("/filesystem.Filesystem/ListDir"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&list).unwrap())
        .send()
        .await
        .unwrap();
    let listing: ListDirResponse = response.json().await.unwrap();
    let names: Vec<&str> = listing.entries.iter().map(|entry| entry.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test]
async fn files_upload_download_and_missing() {
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/dir/data.bin");
    let path_text = path.display().to_string();
    let data: Vec<u8> = (0..300_000u32).map(|value| (value % 251) as u8).collect();

    let uploaded = client()
        .post(envd.url("/files"))
        .query(&[("path", path_text.as_str()), ("username", "nobody")])
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 200);
    let written: serde_json::Value = uploaded.json().await.unwrap();
    assert_eq!(written[0]["path"], path_text);
    assert_eq!(written[0]["type"], "file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().uid(), 65534);

    let downloaded = client().get(envd.url("/files")).query(&[("path", path_text.as_str())]).send().await.unwrap();
    assert_eq!(downloaded.status(), 200);
    assert_eq!(downloaded.bytes().await.unwrap().as_ref(), data.as_slice());

    let missing = client()
        .get(envd.url("/files"))
        .query(&[("path", dir.path().join("missing").to_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("missing"));
}

#[tokio::test]
async fn access_token_guards_requests() {
    let envd = Envd::start();
    let init = serde_json::json!({ "accessToken": "secret", "envVars": { "FROM_INIT": "1" } });
    let response = client().post(envd.url("/init")).json(&init).send().await.unwrap();
    assert_eq!(response.status(), 204);

    let health = client().get(envd.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 204);
    let denied = client().get(envd.url("/envs")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let envs: HashMap<String, String> = client()
        .get(envd.url("/envs"))
        .header("x-access-token", "secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(envs["FROM_INIT"], "1");

    let again = client().post(envd.url("/init")).json(&init).send().await.unwrap();
    assert_eq!(again.status(), 204);
    let other = serde_json::json!({ "accessToken": "other" });
    let hijack = client().post(envd.url("/init")).json(&other).send().await.unwrap();
    assert_eq!(hijack.status(), 401);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signed.txt");
    std::fs::write(&path, b"signed").unwrap();
    let path_text = path.display().to_string();
    let raw = format!("{path_text}:read::secret");
    let digest = <sha2::Sha256 as sha2::Digest>::digest(raw.as_bytes());
    let signature = format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest));
    let signed = client()
        .get(envd.url("/files"))
        .query(&[("path", path_text.as_str()), ("signature", signature.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    assert_eq!(signed.bytes().await.unwrap().as_ref(), b"signed");
    let unsigned = client().get(envd.url("/files")).query(&[("path", path_text.as_str())]).send().await.unwrap();
    assert_eq!(unsigned.status(), 401);

    let (events, _) = server_stream_proto::<StartResponse>(
        &envd.url("/process.Process/Start"),
        &bash("echo $FROM_INIT"),
        &[("x-access-token", "secret")],
    )
    .await;
    assert_eq!(collect_output(events).stdout, b"1\n");
}

/// Needs root: creates a PID namespace in which envd is PID 1.
#[tokio::test]
async fn init_mode_reaps_orphans_and_respawns_server_root() {
    let envd = Envd::start_as_init();
    // The subshell's `sleep` is orphaned and reparented to envd's init process.
    let (events, _) = server_stream_proto::<StartResponse>(
        &envd.url("/process.Process/Start"),
        &bash("(sleep 0.3 &); sleep 1.5; ps -eo stat=,comm= | grep -c '^Z' || true"),
        &[],
    )
    .await;
    let output = collect_output(events);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0");

    // Kill the server (PID 2 in the namespace, the child of init); init starts a new one.
    let kill = client()
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+proto")
        .body(envelope(0, &bash("kill -9 2").encode_to_vec()))
        .send()
        .await;
    if let Ok(response) = kill {
        // The stream breaks off when the server dies.
        let _ = response.bytes().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut healthy = false;
    while Instant::now() < deadline && !healthy {
        tokio::time::sleep(Duration::from_millis(200)).await;
        healthy = client()
            .get(envd.url("/health"))
            .send()
            .await
            .map(|response| response.status() == 204)
            .unwrap_or(false);
    }
    assert!(healthy, "server did not come back after it was killed");
}
