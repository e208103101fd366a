//! Client of envd inside a build VM: health, `/init`, commands through the
//! `process.Process` Connect service, and file uploads through `/files`.
//!
//! Commands use Connect's server-streaming protocol with the protobuf codec. The request
//! body is one envelope: a flags byte, a 4-byte big-endian length, the encoded
//! `StartRequest`. The response is a sequence of envelopes with `StartResponse` messages.
//! It ends with an envelope whose flags have bit 1 set and whose payload is the JSON
//! end-of-stream message, `{}` or `{"error": {"code", "message"}}`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use hearth_envd_proto::process::process_event::{data_event::Output, Event};
use hearth_envd_proto::process::{
    process_selector, ProcessConfig, ProcessEvent, ProcessSelector, SendSignalRequest, Signal,
    StartRequest, StartResponse,
};
use prost::Message;
use tokio::sync::watch;

/// Maximum output that a [`BackgroundProcess`] keeps; older bytes are dropped first.
pub const BACKGROUND_OUTPUT_LIMIT: usize = 64 * 1024;

/// Maximum length of one output line passed to `on_output`; longer lines arrive in pieces.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Flag bit of a Connect envelope that carries the end-of-stream message.
const END_STREAM_FLAG: u8 = 0b10;

/// Extra time envd gets beyond a command's timeout before it kills the command itself,
/// in case this client's own kill request never arrives.
const ENVD_DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// Interval between `/health` requests while waiting for envd.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Time limit of one `/health` request.
const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Failure of a request to envd, with the URL, RPC or command involved.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("envd at {url} was not healthy within {timeout:?}; last error: {last_error}")]
    Unhealthy {
        url: String,
        timeout: Duration,
        last_error: String,
    },
    #[error("request to envd at {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("envd at {url} returned HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("envd rejected {rpc} with {code}: {message}")]
    Rpc {
        rpc: &'static str,
        code: String,
        message: String,
    },
    #[error("invalid response from envd's {rpc}: {reason}")]
    Protocol { rpc: &'static str, reason: String },
    #[error("command {cmd:?} was terminated: {status}")]
    Signaled { cmd: String, status: String },
    #[error("command {cmd:?} timed out after {timeout:?} and was killed")]
    Timeout { cmd: String, timeout: Duration },
    #[error("failed to open {path} for upload")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Stream of a line of command output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A command to run in the guest.
#[derive(Debug, Clone)]
pub struct RunSpec<'a> {
    /// Executable, resolved by envd through `PATH` when it has no slash.
    pub cmd: &'a str,
    pub args: &'a [String],
    /// User that runs the command; must exist in the guest's `/etc/passwd`.
    pub user: &'a str,
    /// Working directory; `None` means the default workdir from `/init`, else the user's home.
    pub cwd: Option<&'a str>,
    /// Variables added to the environment from `/init`.
    pub env: &'a BTreeMap<String, String>,
    /// Limit of [`GuestAgent::run`]; for [`GuestAgent::start_background`], the limit of
    /// waiting for the process to start.
    pub timeout: Duration,
}

/// Client of one envd, at `http://<guest address>:49983` for a build VM.
#[derive(Debug, Clone)]
pub struct GuestAgent {
    client: reqwest::Client,
    base_url: String,
    /// Output buffers of background processes by pid, for [`GuestAgent::take_output`].
    background: Arc<Mutex<HashMap<u32, Weak<Mutex<OutputBuffer>>>>>,
}

impl GuestAgent {
    /// Creates a client of the envd at `base_url` (for example `http://10.0.0.2:49983`),
    /// which ignores proxy settings of the environment.
    pub fn new(base_url: impl Into<String>) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client without TLS or proxy settings always builds");
        Self {
            client,
            base_url: base_url.into().trim_end_matches('/').to_string(),
            background: Arc::default(),
        }
    }

    /// Returns envd's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Polls `GET /health` until it returns a success status or `timeout` passes.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), GuestError> {
        let url = self.url("/health");
        let started = Instant::now();
        loop {
            let response = self.client.get(&url).timeout(HEALTH_REQUEST_TIMEOUT).send().await;
            let last_error = match response {
                Ok(response) if response.status().is_success() => {
                    tracing::debug!(%url, waited_ms = started.elapsed().as_millis() as u64, "envd is healthy");
                    return Ok(());
                }
                Ok(response) => format!("HTTP {}", response.status().as_u16()),
                Err(err) => error_chain(&err),
            };
            if started.elapsed() >= timeout {
                return Err(GuestError::Unhealthy { url, timeout, last_error });
            }
            tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
        }
    }

    /// Sends `POST /init` with the environment variables, default user and default
    /// workdir of later commands, and the host's current time for the guest clock.
    pub async fn init(
        &self,
        env: &BTreeMap<String, String>,
        user: Option<&str>,
        workdir: Option<&str>,
    ) -> Result<(), GuestError> {
        let mut body = serde_json::json!({
            "envVars": env,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        });
        if let Some(user) = user {
            body["defaultUser"] = user.into();
        }
        if let Some(workdir) = workdir {
            body["defaultWorkdir"] = workdir.into();
        }
        let url = self.url("/init");
        let response = self
            .client
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|source| GuestError::Http { url: url.clone(), source })?;
        check_status(&url, response).await?;
        Ok(())
    }

    /// Runs a command to completion and returns its exit code. Every output line goes to
    /// `on_output` without its line ending; a last line without one is passed at the end.
    /// After `spec.timeout` the command is killed with SIGKILL and [`GuestError::Timeout`]
    /// is returned; a command ended by a signal returns [`GuestError::Signaled`].
    pub async fn run(
        &self,
        spec: &RunSpec<'_>,
        on_output: &(dyn Fn(OutputStream, &str) + Send + Sync),
    ) -> Result<i32, GuestError> {
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let mut stdout = LineSplitter::default();
        let mut stderr = LineSplitter::default();
        let mut pid = None;
        let started = Instant::now();

        let outcome = tokio::time::timeout_at(deadline, async {
            let mut events = self.start_stream(spec, Some(spec.timeout.saturating_add(ENVD_DEADLINE_MARGIN))).await?;
            loop {
                let Some(event) = events.next_event().await? else {
                    return Err(GuestError::Protocol {
                        rpc: START_RPC,
                        reason: "the stream ended without an end event".into(),
                    });
                };
                match event {
                    Event::Start(start) => pid = Some(start.pid),
                    Event::Data(data) => match data.output {
                        Some(Output::Stdout(bytes)) => stdout.push(&bytes, |line| on_output(OutputStream::Stdout, line)),
                        Some(Output::Stderr(bytes)) => stderr.push(&bytes, |line| on_output(OutputStream::Stderr, line)),
                        Some(Output::Pty(_)) | None => {}
                    },
                    Event::End(end) => return Ok(end),
                    Event::Keepalive(_) => {}
                }
            }
        })
        .await;
        stdout.flush(|line| on_output(OutputStream::Stdout, line));
        stderr.flush(|line| on_output(OutputStream::Stderr, line));

        let end = match outcome {
            Ok(result) => result?,
            Err(_elapsed) => {
                if let Some(pid) = pid {
                    if let Err(err) = self.kill(pid).await {
                        tracing::warn!(pid, cmd = spec.cmd, error = %error_chain(&err), "failed to kill a command that timed out");
                    }
                }
                return Err(GuestError::Timeout {
                    cmd: spec.cmd.to_string(),
                    timeout: spec.timeout,
                });
            }
        };
        tracing::debug!(?pid, cmd = spec.cmd, status = %end.status, elapsed_ms = started.elapsed().as_millis() as u64, "guest command ended");
        if end.exited {
            Ok(end.exit_code)
        } else {
            Err(GuestError::Signaled {
                cmd: spec.cmd.to_string(),
                status: end.status,
            })
        }
    }

    /// Starts a process and returns once envd reports its pid. A task collects its output
    /// and end until the returned handle is dropped; the process keeps running after that.
    pub async fn start_background(&self, spec: &RunSpec<'_>) -> Result<BackgroundProcess, GuestError> {
        let events = tokio::time::timeout(spec.timeout, async {
            let mut events = self.start_stream(spec, None).await?;
            loop {
                match events.next_event().await? {
                    Some(Event::Start(start)) => return Ok((start.pid, events)),
                    Some(_) => continue,
                    None => {
                        return Err(GuestError::Protocol {
                            rpc: START_RPC,
                            reason: "the stream ended before the start event".into(),
                        })
                    }
                }
            }
        })
        .await
        .map_err(|_| GuestError::Timeout {
            cmd: spec.cmd.to_string(),
            timeout: spec.timeout,
        })??;
        let pid = events.0;

        let output = Arc::new(Mutex::new(OutputBuffer::default()));
        let (status_sender, status) = watch::channel(BackgroundStatus::Running);
        {
            let mut registry = lock(&self.background);
            registry.retain(|_, buffer| buffer.strong_count() > 0);
            registry.insert(pid, Arc::downgrade(&output));
        }
        let reader = tokio::spawn(collect_background(events.1, output.clone(), status_sender));
        tracing::info!(pid, cmd = spec.cmd, user = spec.user, "started background process in the guest");
        Ok(BackgroundProcess {
            pid,
            output,
            status,
            reader,
        })
    }

    /// Drains the output collected so far from the background process `pid`, or returns
    /// `None` when no live [`BackgroundProcess`] of this client has that pid.
    pub fn take_output(&self, pid: u32) -> Option<String> {
        let buffer = lock(&self.background).get(&pid)?.upgrade()?;
        let text = lock(&buffer).take();
        Some(text)
    }

    /// Sends SIGKILL to the guest process `pid` through `process.Process/SendSignal`.
    pub async fn kill(&self, pid: u32) -> Result<(), GuestError> {
        let request = SendSignalRequest {
            process: Some(ProcessSelector {
                selector: Some(process_selector::Selector::Pid(pid)),
            }),
            signal: Signal::Sigkill as i32,
        };
        let url = self.url("/process.Process/SendSignal");
        let response = self
            .client
            .post(&url)
            .header("content-type", "application/proto")
            .header("connect-protocol-version", "1")
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|source| GuestError::Http { url: url.clone(), source })?;
        if !response.status().is_success() {
            return Err(rpc_error_from_response("process.Process/SendSignal", response).await);
        }
        Ok(())
    }

    /// Writes `body` to `guest_path` as `user` through `POST /files`; envd creates
    /// missing parent directories.
    pub async fn upload(&self, guest_path: &str, user: &str, body: Vec<u8>) -> Result<(), GuestError> {
        self.post_file(guest_path, user, reqwest::Body::from(body), None).await
    }

    /// Streams the host file `local_path` to `guest_path` as `user` through `POST /files`.
    pub async fn upload_file(&self, guest_path: &str, user: &str, local_path: &Path) -> Result<(), GuestError> {
        let read_error = |source| GuestError::ReadFile {
            path: local_path.display().to_string(),
            source,
        };
        let file = tokio::fs::File::open(local_path).await.map_err(read_error)?;
        let length = file.metadata().await.map_err(read_error)?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
        self.post_file(guest_path, user, body, Some(length)).await
    }

    async fn post_file(
        &self,
        guest_path: &str,
        user: &str,
        body: reqwest::Body,
        length: Option<u64>,
    ) -> Result<(), GuestError> {
        let url = reqwest::Url::parse_with_params(&self.url("/files"), [("path", guest_path), ("username", user)])
            .map_err(|err| GuestError::Protocol {
                rpc: "/files",
                reason: format!("invalid upload URL for {guest_path:?}: {err}"),
            })?;
        let mut request = self
            .client
            .post(url.clone())
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(length) = length {
            request = request.header("content-length", length);
        }
        let response = request.send().await.map_err(|source| GuestError::Http {
            url: url.to_string(),
            source,
        })?;
        check_status(url.as_str(), response).await?;
        Ok(())
    }

    /// Sends `process.Process/Start` and returns the response's event stream.
    /// Opens a Start stream. `envd_deadline`, when given, ends the process in envd after
    /// that long; a background process gets none.
    async fn start_stream(&self, spec: &RunSpec<'_>, envd_deadline: Option<Duration>) -> Result<EventStream, GuestError> {
        let request = StartRequest {
            process: Some(ProcessConfig {
                cmd: spec.cmd.to_string(),
                args: spec.args.to_vec(),
                envs: spec.env.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
                cwd: spec.cwd.map(str::to_string),
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:", spec.user))
        );
        let url = self.url("/process.Process/Start");
        let mut request_builder = self
            .client
            .post(&url)
            .header("content-type", "application/connect+proto")
            .header("connect-protocol-version", "1");
        if let Some(deadline) = envd_deadline {
            request_builder = request_builder.header("connect-timeout-ms", deadline.as_millis().to_string());
        }
        let response = request_builder
            .header("authorization", authorization)
            .body(envelope(0, &request.encode_to_vec()))
            .send()
            .await
            .map_err(|source| GuestError::Http { url: url.clone(), source })?;
        if !response.status().is_success() {
            return Err(rpc_error_from_response(START_RPC, response).await);
        }
        Ok(EventStream {
            body: Box::pin(response.bytes_stream()),
            buffer: BytesMut::new(),
            pending: VecDeque::new(),
        })
    }
}

const START_RPC: &str = "process.Process/Start";

/// State of a background process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackgroundStatus {
    Running,
    /// The process exited with this code.
    Exited(i32),
    /// The process was ended by a signal; the text is envd's status, e.g. `signal: killed`.
    Signaled(String),
    /// The event stream broke before the end event, so the process's fate is unknown.
    Lost(String),
}

/// A process started by [`GuestAgent::start_background`]. Dropping it stops collecting
/// output and closes the stream, but does not stop the process.
#[derive(Debug)]
pub struct BackgroundProcess {
    pid: u32,
    output: Arc<Mutex<OutputBuffer>>,
    status: watch::Receiver<BackgroundStatus>,
    reader: tokio::task::JoinHandle<()>,
}

impl BackgroundProcess {
    /// Returns the process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Returns whether the process runs, or how it ended.
    pub fn status(&self) -> BackgroundStatus {
        self.status.borrow().clone()
    }

    /// Waits up to `timeout` for the process to end and returns its status, which is
    /// [`BackgroundStatus::Running`] when it still runs.
    pub async fn wait(&self, timeout: Duration) -> BackgroundStatus {
        let mut status = self.status.clone();
        let ended = tokio::time::timeout(timeout, status.wait_for(|status| *status != BackgroundStatus::Running)).await;
        match ended {
            Ok(Ok(status)) => status.clone(),
            _ => self.status(),
        }
    }

    /// Returns the exit code once the process ended, `None` while it runs. A process
    /// ended by a signal, or whose stream broke, returns -1, and [`Self::status`] tells which.
    pub fn exit_code(&self) -> Option<i32> {
        match self.status() {
            BackgroundStatus::Running => None,
            BackgroundStatus::Exited(code) => Some(code),
            BackgroundStatus::Signaled(_) | BackgroundStatus::Lost(_) => Some(-1),
        }
    }

    /// Returns the output collected so far (stdout and stderr interleaved, at most the
    /// last [`BACKGROUND_OUTPUT_LIMIT`] bytes) without draining it.
    pub fn output_tail(&self) -> String {
        lock(&self.output).snapshot()
    }

    /// Returns and drains the output collected so far.
    pub fn take_output(&self) -> String {
        lock(&self.output).take()
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads a background process's events until its end, into `output` and `status`.
async fn collect_background(
    mut events: EventStream,
    output: Arc<Mutex<OutputBuffer>>,
    status: watch::Sender<BackgroundStatus>,
) {
    loop {
        let final_status = match events.next_event().await {
            Ok(Some(Event::Data(data))) => {
                if let Some(Output::Stdout(bytes) | Output::Stderr(bytes) | Output::Pty(bytes)) = data.output {
                    lock(&output).push(&bytes);
                }
                continue;
            }
            Ok(Some(Event::End(end))) if end.exited => BackgroundStatus::Exited(end.exit_code),
            Ok(Some(Event::End(end))) => BackgroundStatus::Signaled(end.status),
            Ok(Some(Event::Start(_) | Event::Keepalive(_))) => continue,
            Ok(None) => BackgroundStatus::Lost("the stream ended without an end event".into()),
            Err(err) => BackgroundStatus::Lost(error_chain(&err)),
        };
        tracing::info!(status = ?final_status, "background process in the guest ended");
        let _ = status.send(final_status);
        return;
    }
}

/// Last bytes of a background process's output.
#[derive(Debug, Default)]
struct OutputBuffer {
    bytes: VecDeque<u8>,
}

impl OutputBuffer {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(BACKGROUND_OUTPUT_LIMIT);
        self.bytes.drain(..excess);
    }

    fn snapshot(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let mut joined = Vec::with_capacity(self.bytes.len());
        joined.extend_from_slice(front);
        joined.extend_from_slice(back);
        String::from_utf8_lossy(&joined).into_owned()
    }

    fn take(&mut self) -> String {
        let text = self.snapshot();
        self.bytes.clear();
        text
    }
}

/// Splits a byte stream into lines, holding back a partial last line until more data or
/// `flush`.
#[derive(Debug, Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, data: &[u8], mut emit: impl FnMut(&str)) {
        self.partial.extend_from_slice(data);
        let mut start = 0;
        while let Some(offset) = self.partial[start..].iter().position(|byte| *byte == b'\n') {
            emit_line(&self.partial[start..start + offset], &mut emit);
            start += offset + 1;
        }
        self.partial.drain(..start);
        while self.partial.len() >= MAX_LINE_BYTES {
            let piece: Vec<u8> = self.partial.drain(..MAX_LINE_BYTES).collect();
            emit_line(&piece, &mut emit);
        }
    }

    fn flush(&mut self, mut emit: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            emit_line(&rest, &mut emit);
        }
    }
}

fn emit_line(line: &[u8], emit: &mut impl FnMut(&str)) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    emit(&String::from_utf8_lossy(line));
}

/// Decoder of a Connect server stream of `StartResponse` messages.
struct EventStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: BytesMut,
    pending: VecDeque<Frame>,
}

#[derive(Debug, PartialEq)]
enum Frame {
    Message(Bytes),
    End(Bytes),
}

impl EventStream {
    /// Returns the next process event, `None` after a successful end of stream, or the
    /// error of an end-of-stream message or of the connection.
    async fn next_event(&mut self) -> Result<Option<Event>, GuestError> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                match frame {
                    Frame::Message(payload) => {
                        let response = StartResponse::decode(payload).map_err(|err| GuestError::Protocol {
                            rpc: START_RPC,
                            reason: format!("invalid protobuf message: {err}"),
                        })?;
                        match response.event {
                            Some(ProcessEvent { event: Some(event) }) => return Ok(Some(event)),
                            _ => continue,
                        }
                    }
                    Frame::End(payload) => return end_of_stream(&payload).map(|()| None),
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    self.buffer.extend_from_slice(&chunk);
                    self.pending.extend(split_frames(&mut self.buffer));
                }
                Some(Err(source)) => {
                    return Err(GuestError::Http {
                        url: START_RPC.to_string(),
                        source,
                    })
                }
                None => return Ok(None),
            }
        }
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Removes every complete envelope from the front of `buffer`.
fn split_frames(buffer: &mut BytesMut) -> Vec<Frame> {
    let mut frames = Vec::new();
    while buffer.len() >= 5 {
        let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + length {
            break;
        }
        let flags = buffer[0];
        buffer.advance(5);
        let payload = buffer.split_to(length).freeze();
        if flags & END_STREAM_FLAG != 0 {
            frames.push(Frame::End(payload));
        } else {
            frames.push(Frame::Message(payload));
        }
    }
    frames
}

/// Checks a JSON end-of-stream message: `{}` is success, `{"error": {...}}` a failure.
fn end_of_stream(payload: &[u8]) -> Result<(), GuestError> {
    let end: serde_json::Value = serde_json::from_slice(payload).map_err(|err| GuestError::Protocol {
        rpc: START_RPC,
        reason: format!("invalid end-of-stream message: {err}"),
    })?;
    match end.get("error") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(error) => Err(GuestError::Rpc {
            rpc: START_RPC,
            code: error["code"].as_str().unwrap_or("unknown").to_string(),
            message: error["message"].as_str().unwrap_or_default().to_string(),
        }),
    }
}

/// Turns a non-success Connect response (a JSON body `{"code", "message"}`) into an error.
async fn rpc_error_from_response(rpc: &'static str, response: reqwest::Response) -> GuestError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|value| value.get(name))
            .and_then(|value| value.as_str())
            .map(str::to_string)
    };
    GuestError::Rpc {
        rpc,
        code: field("code").unwrap_or_else(|| format!("HTTP {status}")),
        message: field("message").unwrap_or(body),
    }
}

/// Returns the response when its status is a success, else an error with the body's
/// `message` field (or the whole body).
async fn check_status(url: &str, response: reqwest::Response) -> Result<reqwest::Response, GuestError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value.get("message").and_then(|message| message.as_str()).map(str::to_string))
        .unwrap_or(body);
    Err(GuestError::Status {
        url: url.to_string(),
        status,
        message,
    })
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(splitter: &mut LineSplitter, chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, |line| lines.push(line.to_string()));
        }
        splitter.flush(|line| lines.push(line.to_string()));
        lines
    }

    #[test]
    fn line_splitter_joins_chunks() {
        let mut splitter = LineSplitter::default();
        let lines = collect(&mut splitter, &[b"one\ntw", b"o\r\n", b"\nlast"]);
        assert_eq!(lines, ["one", "two", "", "last"]);
    }

    #[test]
    fn line_splitter_cuts_long_lines() {
        let mut splitter = LineSplitter::default();
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let lines = collect(&mut splitter, &[&long]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1].len(), 10);
    }

    #[test]
    fn output_buffer_keeps_last_bytes() {
        let mut buffer = OutputBuffer::default();
        buffer.push(&vec![b'a'; BACKGROUND_OUTPUT_LIMIT]);
        buffer.push(b"tail");
        let text = buffer.take();
        assert_eq!(text.len(), BACKGROUND_OUTPUT_LIMIT);
        assert!(text.ends_with("aatail"));
        assert_eq!(buffer.take(), "");
    }

    #[test]
    fn split_frames_waits_for_whole_envelope() {
        let mut buffer = BytesMut::new();
        let first = envelope(0, b"abc");
        let end = envelope(END_STREAM_FLAG, b"{}");
        buffer.extend_from_slice(&first);
        buffer.extend_from_slice(&end[..3]);
        assert_eq!(split_frames(&mut buffer), [Frame::Message(Bytes::from_static(b"abc"))]);
        buffer.extend_from_slice(&end[3..]);
        assert_eq!(split_frames(&mut buffer), [Frame::End(Bytes::from_static(b"{}"))]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn end_of_stream_error_is_rpc_error() {
        assert!(end_of_stream(b"{}").is_ok());
        let err = end_of_stream(br#"{"error":{"code":"invalid_argument","message":"bad cwd"}}"#).unwrap_err();
        match err {
            GuestError::Rpc { code, message, .. } => {
                assert_eq!(code, "invalid_argument");
                assert_eq!(message, "bad cwd");
            }
            other => panic!("expected an RPC error, got {other:?}"),
        }
    }
}
