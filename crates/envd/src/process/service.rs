//! Handlers of the `process.Process` Connect service.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use hearth_envd_proto::process::process_event::{Event, KeepAlive, StartEvent};
use hearth_envd_proto::process::{
    process_input, process_selector, stream_input_request, CloseStdinRequest, CloseStdinResponse,
    ConnectRequest, ConnectResponse, ListRequest, ListResponse, ProcessConfig, ProcessEvent,
    ProcessInfo, ProcessInput, ProcessSelector, SendInputRequest, SendInputResponse,
    SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse, StreamInputRequest,
    StreamInputResponse, UpdateRequest, UpdateResponse,
};
use tokio::sync::mpsc;

use super::spawn::{build_env, spawn, SpawnRequest};
use super::{InputError, ManagedProcess};
use crate::connect::{self, Code, RequestStream, ResponseStream, RpcContext, RpcError};
use crate::state::{resolve_path, AppState};

/// Default PTY size when the request's size is zero.
const DEFAULT_PTY_SIZE: (u16, u16) = (80, 24);

/// Routes of the service under `/process.Process/`.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_process))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
}

fn select(state: &AppState, selector: Option<&ProcessSelector>) -> Result<Arc<ManagedProcess>, RpcError> {
    match selector.and_then(|selector| selector.selector.as_ref()) {
        Some(process_selector::Selector::Pid(pid)) => state
            .processes
            .get(*pid)
            .ok_or_else(|| RpcError::not_found(format!("process with pid {pid} not found"))),
        Some(process_selector::Selector::Tag(tag)) => state
            .processes
            .find_by_tag(tag)
            .ok_or_else(|| RpcError::not_found(format!("process with tag {tag:?} not found"))),
        None => Err(RpcError::invalid_argument("process selector is missing a pid or tag")),
    }
}

fn input_error(err: InputError) -> RpcError {
    match err {
        InputError::Write { .. } => RpcError::internal(format!("{err}: {}", error_source(&err))),
        _ => RpcError::new(Code::FailedPrecondition, err.to_string()),
    }
}

fn error_source(err: &dyn std::error::Error) -> String {
    err.source().map(|source| source.to_string()).unwrap_or_default()
}

fn pty_size(size: Option<&hearth_envd_proto::process::pty::Size>) -> (u16, u16) {
    match size {
        Some(size) if size.cols > 0 && size.rows > 0 => (
            size.cols.min(u16::MAX as u32) as u16,
            size.rows.min(u16::MAX as u32) as u16,
        ),
        _ => DEFAULT_PTY_SIZE,
    }
}

async fn start(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::server_stream(request, |context, message: StartRequest| async move {
        let (process, events) = start_process(&state, &context, message)?;
        if let Some(deadline) = context.deadline {
            // The call's timeout bounds the command's life, as the SDK's `timeout`
            // documents; a client that only disconnects leaves the command running.
            let process = process.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if state.processes.get(process.pid).is_some() {
                    tracing::info!(pid = process.pid, "killing process whose start call timed out");
                    let _ = process.signal(libc::SIGKILL);
                }
            });
        }
        Ok(event_stream(process.pid, events, context.keepalive, |event| StartResponse {
            event: Some(event),
        }))
    })
    .await
}

fn start_process(
    state: &Arc<AppState>,
    context: &RpcContext,
    message: StartRequest,
) -> Result<(Arc<ManagedProcess>, mpsc::Receiver<ProcessEvent>), RpcError> {
    let config = message
        .process
        .ok_or_else(|| RpcError::invalid_argument("start request is missing the process config"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::invalid_argument("process config has an empty cmd"));
    }
    let user = state
        .request_user(&context.headers)
        .map_err(|err| RpcError::invalid_argument(err.to_string()))?;
    let cwd = match config.cwd.as_deref().filter(|cwd| !cwd.is_empty()) {
        Some(cwd) => resolve_path(cwd, &user.home),
        None => state.default_cwd(&user),
    };
    if !cwd.is_dir() {
        return Err(RpcError::invalid_argument(format!(
            "working directory {} does not exist or is not a directory",
            cwd.display()
        )));
    }

    let init = state.config();
    let env = build_env(&user, &init.env_vars, &config.envs);
    let pty_size = message.pty.as_ref().map(|pty| pty_size(pty.size.as_ref()));
    let spawn_request = SpawnRequest {
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        env,
        cwd: cwd.clone(),
        user: user.clone(),
        pty_size,
        // Before the SDK could choose, every process had stdin, so unset means enabled.
        stdin: message.stdin.unwrap_or(true),
    };
    let spawned = spawn(spawn_request).map_err(|err| {
        tracing::warn!(cmd = %config.cmd, user = %user.name, %err, source = %error_source(&err), "failed to start process");
        RpcError::invalid_argument(format!("{err}: {}", error_source(&err)))
    })?;

    let stored_config = ProcessConfig {
        cwd: Some(cwd.display().to_string()),
        ..config
    };
    let (process, events) = state.processes.insert(spawned, stored_config, message.tag);
    tracing::info!(pid = process.pid, cmd = %process.config.cmd, user = %user.name, pty = process.is_pty, "process started");
    Ok((process, events))
}

/// Turns a subscription into the response stream: a start event, the output, keepalive
/// events at the requested interval, and the end event.
fn event_stream<T, F>(
    pid: u32,
    events: mpsc::Receiver<ProcessEvent>,
    keepalive: Option<Duration>,
    wrap: F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    F: Fn(ProcessEvent) -> T + Send + 'static,
{
    let start = ProcessEvent {
        event: Some(Event::Start(StartEvent { pid })),
    };
    let keepalive = keepalive.map(|interval| {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });

    struct StreamState {
        events: mpsc::Receiver<ProcessEvent>,
        keepalive: Option<tokio::time::Interval>,
        ended: bool,
    }

    let rest = futures::stream::unfold(
        StreamState {
            events,
            keepalive,
            ended: false,
        },
        |mut state| async move {
            if state.ended {
                return None;
            }
            let next = match state.keepalive.as_mut() {
                Some(ticker) => tokio::select! {
                    event = state.events.recv() => event,
                    _ = ticker.tick() => Some(ProcessEvent { event: Some(Event::Keepalive(KeepAlive {})) }),
                },
                None => state.events.recv().await,
            };
            match next {
                Some(event) => {
                    state.ended = matches!(event.event, Some(Event::End(_)));
                    Some((event, state))
                }
                None => None,
            }
        },
    );
    Box::pin(futures::stream::iter([start]).chain(rest).map(move |event| Ok(wrap(event))))
}

async fn connect_process(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::server_stream(request, |context, message: ConnectRequest| async move {
        let process = select(&state, message.process.as_ref())?;
        let events = process.subscribe();
        Ok(event_stream(process.pid, events, context.keepalive, |event| ConnectResponse {
            event: Some(event),
        }))
    })
    .await
}

async fn list(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, _message: ListRequest| async move {
        let processes = state
            .processes
            .list()
            .into_iter()
            .map(|process| ProcessInfo {
                config: Some(process.config.clone()),
                pid: process.pid,
                tag: process.tag.clone(),
            })
            .collect();
        Ok(ListResponse { processes })
    })
    .await
}

async fn write_input(process: &ManagedProcess, input: Option<ProcessInput>) -> Result<(), RpcError> {
    match input.and_then(|input| input.input) {
        Some(process_input::Input::Stdin(data)) => process.write_input(&data, false).await,
        Some(process_input::Input::Pty(data)) => process.write_input(&data, true).await,
        None => return Ok(()),
    }
    .map_err(input_error)
}

async fn send_input(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: SendInputRequest| async move {
        let process = select(&state, message.process.as_ref())?;
        write_input(&process, message.input).await?;
        Ok(SendInputResponse {})
    })
    .await
}

async fn stream_input(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::client_stream(
        request,
        |_context, mut messages: RequestStream<StreamInputRequest>| async move {
            let mut process: Option<Arc<ManagedProcess>> = None;
            while let Some(message) = messages.next().await {
                match message?.event {
                    Some(stream_input_request::Event::Start(start)) => {
                        process = Some(select(&state, start.process.as_ref())?);
                    }
                    Some(stream_input_request::Event::Data(data)) => {
                        let target = process.as_ref().ok_or_else(|| {
                            RpcError::invalid_argument("input stream sent data before its start event")
                        })?;
                        write_input(target, data.input).await?;
                    }
                    Some(stream_input_request::Event::Keepalive(_)) | None => {}
                }
            }
            Ok(StreamInputResponse {})
        },
    )
    .await
}

async fn send_signal(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: SendSignalRequest| async move {
        let process = select(&state, message.process.as_ref())?;
        let signal = match Signal::try_from(message.signal) {
            Ok(Signal::Sigkill) => libc::SIGKILL,
            Ok(Signal::Sigterm) => libc::SIGTERM,
            _ => {
                return Err(RpcError::invalid_argument(format!(
                    "unsupported signal {}; use SIGNAL_SIGTERM or SIGNAL_SIGKILL",
                    message.signal
                )))
            }
        };
        process.signal(signal).map_err(|err| {
            RpcError::internal(format!("failed to send signal {signal} to process {}: {err}", process.pid))
        })?;
        Ok(SendSignalResponse {})
    })
    .await
}

async fn close_stdin(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: CloseStdinRequest| async move {
        let process = select(&state, message.process.as_ref())?;
        process.close_stdin().await.map_err(input_error)?;
        Ok(CloseStdinResponse {})
    })
    .await
}

async fn update(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: UpdateRequest| async move {
        let process = select(&state, message.process.as_ref())?;
        if let Some(pty) = message.pty {
            let (cols, rows) = pty_size(pty.size.as_ref());
            process.resize(cols, rows).map_err(|err| {
                RpcError::new(Code::FailedPrecondition, format!("failed to resize PTY: {err}"))
            })?;
        }
        Ok(UpdateResponse {})
    })
    .await
}
