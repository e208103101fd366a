//! A minimal QMP (QEMU Machine Protocol) client: newline-delimited JSON over a Unix socket.
//!
//! Commands are sent one at a time; asynchronous events that arrive before a command's
//! reply are logged at debug level and dropped.

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("invalid QMP message {line:?}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("unexpected QMP message {0}")]
    Unexpected(Value),
}

/// A QMP connection in command mode.
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
}

impl QmpClient {
    /// Reads the greeting on a connected stream and enters command mode.
    pub async fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let (read, writer) = stream.into_split();
        let mut client = Self { reader: BufReader::new(read), writer, line: String::new() };

        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Unexpected(greeting));
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let request = match arguments {
            Some(arguments) => json!({ "execute": command, "arguments": arguments }),
            None => json!({ "execute": command }),
        };
        let mut bytes = serde_json::to_vec(&request).expect("a JSON value always serializes");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        self.read_reply(command).await
    }

    /// Reads messages until the reply to `command`, logging and dropping events.
    async fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if let Some(event) = message.get("event") {
                tracing::debug!(command, event = %event, "QMP event");
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name| error.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Unexpected(message));
        }
    }

    /// Runs `command` like [`QmpClient::execute`], passing the open descriptor `fd` along
    /// with the request (`SCM_RIGHTS`), as `getfd` expects.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use std::os::fd::AsRawFd;

        let request = json!({ "execute": command, "arguments": arguments });
        let mut bytes = serde_json::to_vec(&request).expect("a JSON value always serializes");
        bytes.push(b'\n');
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(&bytes)];
                let control = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &control,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == bytes.len() => break,
                // The descriptor went with the first byte; send the rest as plain data.
                Ok(n) => {
                    self.writer.write_all(&bytes[n..]).await?;
                    break;
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err.into()),
            }
        }
        self.read_reply(command).await
    }

    /// Returns the VM's run state (`running`, `paused`, `inmigrate`, ...).
    pub async fn run_state(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None).await?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(QmpError::Unexpected(status))
    }

    /// Returns the migration status (`setup`, `active`, `completed`, `failed`, ...) and
    /// the error description QEMU gives for a failure.
    pub async fn migration_status(&mut self) -> Result<(String, Option<String>), QmpError> {
        let info = self.execute("query-migrate", None).await?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("none").to_owned();
        let error = info.get("error-desc").and_then(Value::as_str).map(str::to_owned);
        Ok((status, error))
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&self.line)
            .map_err(|source| QmpError::Parse { line: self.line.trim_end().to_owned(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// Runs a fake QEMU that greets, then answers each request with the next scripted line.
    async fn fake_qemu(replies: Vec<&'static str>) -> UnixStream {
        let (client, server) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            for reply in replies {
                if lines.next_line().await.unwrap().is_none() {
                    return;
                }
                write.write_all(reply.as_bytes()).await.unwrap();
                write.write_all(b"\n").await.unwrap();
            }
        });
        client
    }

    #[tokio::test]
    async fn execute_skips_events_before_return() {
        let stream = fake_qemu(vec![
            r#"{"return": {}}"#,
            "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\"}}",
        ])
        .await;
        let mut qmp = QmpClient::handshake(stream).await.unwrap();

        assert_eq!(qmp.run_state().await.unwrap(), "running");
    }

    #[tokio::test]
    async fn execute_reports_command_error() {
        let stream = fake_qemu(vec![
            r#"{"return": {}}"#,
            r#"{"error": {"class": "GenericError", "desc": "no such thing"}}"#,
        ])
        .await;
        let mut qmp = QmpClient::handshake(stream).await.unwrap();

        let err = qmp.execute("cont", None).await.unwrap_err();

        assert!(matches!(err, QmpError::Command { ref desc, .. } if desc == "no such thing"));
    }
}
