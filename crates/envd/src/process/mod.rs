//! Running processes: the table of live processes, output fan-out to subscribers, and
//! the `process.Process` service.
//!
//! Output moves from the process to each subscribed stream through a bounded channel,
//! and a reader waits while any subscriber's channel is full. Memory per process is so
//! bounded by `SUBSCRIBER_CHANNEL_EVENTS * READ_CHUNK_BYTES` per subscriber, and a slow
//! client slows the process's output down through its pipe instead of buffering it.

mod fd_io;
pub mod service;
pub mod spawn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hearth_envd_proto::process::process_event::{data_event::Output, DataEvent, EndEvent, Event};
use hearth_envd_proto::process::{ProcessConfig, ProcessEvent};
use tokio::sync::{mpsc, watch};

use fd_io::AsyncFdIo;
use spawn::SpawnedProcess;

/// Size of one read from a process's output, and so the maximum payload of a data event.
const READ_CHUNK_BYTES: usize = 32 * 1024;

/// Events buffered per subscriber before the readers wait for it.
pub const SUBSCRIBER_CHANNEL_EVENTS: usize = 16;

/// A process that envd started and that has not ended yet.
pub struct ManagedProcess {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    pub is_pty: bool,
    /// Input sink: the stdin pipe or the PTY master. `None` once stdin is closed.
    input: tokio::sync::Mutex<Option<Arc<AsyncFdIo>>>,
    /// PTY master, kept for resizing.
    pty_master: Option<Arc<AsyncFdIo>>,
    subscribers: Mutex<Subscribers>,
}

struct Subscribers {
    senders: Vec<mpsc::Sender<ProcessEvent>>,
    /// The end event once the process ended and its output was drained.
    end: Option<EndEvent>,
}

/// Failure of an input operation.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("process {pid} has no open stdin; start it with stdin enabled")]
    NoStdin { pid: u32 },
    #[error("process {pid} has a PTY; send PTY input instead of stdin")]
    ExpectedPty { pid: u32 },
    #[error("process {pid} has no PTY; send stdin input instead of PTY input")]
    ExpectedStdin { pid: u32 },
    #[error("failed to write input to process {pid}")]
    Write {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl ManagedProcess {
    /// Subscribes to the process's future output. The returned receiver ends with the
    /// end event; when the process has already ended it carries only that event.
    pub fn subscribe(&self) -> mpsc::Receiver<ProcessEvent> {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_CHANNEL_EVENTS);
        let mut subscribers = lock(&self.subscribers);
        match &subscribers.end {
            Some(end) => {
                let _ = sender.try_send(event(Event::End(end.clone())));
            }
            None => subscribers.senders.push(sender),
        }
        receiver
    }

    /// Writes input to the process. `pty` is true for PTY input and false for stdin.
    pub async fn write_input(&self, data: &[u8], pty: bool) -> Result<(), InputError> {
        let pid = self.pid;
        if pty && !self.is_pty {
            return Err(InputError::ExpectedStdin { pid });
        }
        if !pty && self.is_pty {
            return Err(InputError::ExpectedPty { pid });
        }
        let input = self.input.lock().await;
        let sink = input.as_ref().ok_or(InputError::NoStdin { pid })?;
        sink.write_all(data)
            .await
            .map_err(|source| InputError::Write { pid, source })
    }

    /// Closes stdin so that the process reads end of file.
    pub async fn close_stdin(&self) -> Result<(), InputError> {
        if self.is_pty {
            return Err(InputError::ExpectedPty { pid: self.pid });
        }
        let mut input = self.input.lock().await;
        match input.take() {
            Some(_) => Ok(()),
            None => Err(InputError::NoStdin { pid: self.pid }),
        }
    }

    /// Sets the terminal size; fails when the process has no PTY.
    pub fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        match &self.pty_master {
            Some(master) => spawn::resize_pty(master, cols, rows),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("process {} has no PTY to resize", self.pid),
            )),
        }
    }

    /// Sends `signal` to the process's group, which `setsid` made it lead, so that
    /// children of a shell get it too.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill has no memory effects; a stale pid fails with ESRCH.
        if unsafe { libc::kill(-pid, signal) } == 0 {
            return Ok(());
        }
        // SAFETY: as above, for the process alone.
        if unsafe { libc::kill(pid, signal) } == 0 {
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    }

    /// Sends an output chunk to every subscriber, waiting while a channel is full, and
    /// drops subscribers whose stream went away.
    async fn publish(&self, message: ProcessEvent) {
        let senders = lock(&self.subscribers).senders.clone();
        let mut closed = false;
        for sender in &senders {
            if sender.send(message.clone()).await.is_err() {
                closed = true;
            }
        }
        if closed {
            lock(&self.subscribers).senders.retain(|sender| !sender.is_closed());
        }
    }

    async fn finish(&self, end: EndEvent) {
        let senders = {
            let mut subscribers = lock(&self.subscribers);
            subscribers.end = Some(end.clone());
            std::mem::take(&mut subscribers.senders)
        };
        for sender in senders {
            let _ = sender.send(event(Event::End(end.clone()))).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn event(event: Event) -> ProcessEvent {
    ProcessEvent { event: Some(event) }
}

/// Live processes by pid.
#[derive(Default)]
pub struct ProcessTable {
    processes: Mutex<HashMap<u32, Arc<ManagedProcess>>>,
}

impl ProcessTable {
    pub fn get(&self, pid: u32) -> Option<Arc<ManagedProcess>> {
        lock(&self.processes).get(&pid).cloned()
    }

    pub fn find_by_tag(&self, tag: &str) -> Option<Arc<ManagedProcess>> {
        lock(&self.processes)
            .values()
            .find(|process| process.tag.as_deref() == Some(tag))
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<ManagedProcess>> {
        lock(&self.processes).values().cloned().collect()
    }

    fn remove(&self, pid: u32) {
        lock(&self.processes).remove(&pid);
    }

    /// Registers a started process, subscribes `first_subscriber` before any output is
    /// read, and starts the tasks that move its output and wait for its end.
    pub fn insert(
        self: &Arc<Self>,
        spawned: SpawnedProcess,
        config: ProcessConfig,
        tag: Option<String>,
    ) -> (Arc<ManagedProcess>, mpsc::Receiver<ProcessEvent>) {
        let SpawnedProcess {
            mut child,
            stdout,
            stderr,
            stdin,
            is_pty,
        } = spawned;
        let pid = child.id().unwrap_or_default();
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_CHANNEL_EVENTS);
        let process = Arc::new(ManagedProcess {
            pid,
            tag,
            config,
            is_pty,
            input: tokio::sync::Mutex::new(stdin),
            pty_master: is_pty.then(|| stdout.clone()),
            subscribers: Mutex::new(Subscribers {
                senders: vec![sender],
                end: None,
            }),
        });
        lock(&self.processes).insert(pid, process.clone());

        let (exited_sender, exited) = watch::channel(false);
        let stdout_kind = if is_pty { OutputKind::Pty } else { OutputKind::Stdout };
        let stdout_task = tokio::spawn(pump_output(process.clone(), stdout, stdout_kind, exited.clone()));
        let stderr_task = stderr.map(|stderr| {
            tokio::spawn(pump_output(process.clone(), Arc::new(stderr), OutputKind::Stderr, exited))
        });

        let table = self.clone();
        let waited = process.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_sender.send(true);
            let _ = stdout_task.await;
            if let Some(task) = stderr_task {
                let _ = task.await;
            }
            let end = end_event(status);
            tracing::info!(pid, exit_code = end.exit_code, status = %end.status, "process ended");
            table.remove(pid);
            waited.finish(end).await;
        });

        (process, receiver)
    }
}

#[derive(Clone, Copy)]
enum OutputKind {
    Stdout,
    Stderr,
    Pty,
}

fn data_event(kind: OutputKind, data: Bytes) -> ProcessEvent {
    let output = match kind {
        OutputKind::Stdout => Output::Stdout(data),
        OutputKind::Stderr => Output::Stderr(data),
        OutputKind::Pty => Output::Pty(data),
    };
    event(Event::Data(DataEvent {
        output: Some(output),
    }))
}

/// Moves output from one descriptor to the subscribers until end of file. After the
/// process exits it reads only what is already buffered: a background child that
/// inherited the descriptor could keep it open forever.
async fn pump_output(
    process: Arc<ManagedProcess>,
    source: Arc<AsyncFdIo>,
    kind: OutputKind,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        tokio::select! {
            biased;
            _ = async { let _ = exited.wait_for(|exited| *exited).await; } => break,
            result = source.read(&mut buffer) => match result {
                Ok(0) => return,
                Ok(count) => {
                    process.publish(data_event(kind, Bytes::copy_from_slice(&buffer[..count]))).await;
                }
                Err(err) => {
                    tracing::warn!(pid = process.pid, %err, "failed to read process output");
                    return;
                }
            },
        }
    }
    loop {
        match source.try_read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => {
                process.publish(data_event(kind, Bytes::copy_from_slice(&buffer[..count]))).await;
            }
        }
    }
}

fn end_event(status: std::io::Result<std::process::ExitStatus>) -> EndEvent {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => EndEvent {
                exit_code: code,
                exited: true,
                status: format!("exit status {code}"),
                error: None,
            },
            (None, Some(signal)) => EndEvent {
                exit_code: -1,
                exited: false,
                status: format!("signal: {}", signal_name(signal)),
                error: None,
            },
            (None, None) => EndEvent {
                exit_code: -1,
                exited: false,
                status: "unknown".to_string(),
                error: None,
            },
        },
        Err(err) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".to_string(),
            error: Some(format!("failed to wait for the process: {err}")),
        },
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "killed".to_string(),
        libc::SIGTERM => "terminated".to_string(),
        libc::SIGINT => "interrupt".to_string(),
        libc::SIGHUP => "hangup".to_string(),
        libc::SIGPIPE => "broken pipe".to_string(),
        libc::SIGSEGV => "segmentation fault".to_string(),
        libc::SIGABRT => "aborted".to_string(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_end_event_is_not_exited() {
        use std::os::unix::process::ExitStatusExt;
        let end = end_event(Ok(std::process::ExitStatus::from_raw(libc::SIGKILL)));
        assert_eq!(end.exit_code, -1);
        assert!(!end.exited);
        assert_eq!(end.status, "signal: killed");
    }

    #[test]
    fn exit_end_event_has_code() {
        use std::os::unix::process::ExitStatusExt;
        let end = end_event(Ok(std::process::ExitStatus::from_raw(3 << 8)));
        assert_eq!(end.exit_code, 3);
        assert!(end.exited);
        assert_eq!(end.status, "exit status 3");
    }
}
