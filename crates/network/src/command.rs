//! Running `ip` and `nft`, on the host or inside a slot's network namespace.

use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

/// Error from a command that configures the network.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("failed to start `{program}`: is it installed and on PATH?")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Failed {
        program: &'static str,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("failed to enter network namespace {netns}")]
    EnterNetns {
        netns: String,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to write sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("worker thread for network namespace {netns} panicked")]
    ThreadPanicked { netns: String },
}

/// Runs `program args`, feeding `stdin` when given, and returns its standard output.
pub(crate) fn run(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|source| CommandError::Spawn { program, source })?;

    if let Some(input) = stdin {
        // A write error means the child exited early; its status and stderr show why.
        if let Some(mut pipe) = child.stdin.take() {
            let _ = pipe.write_all(input.as_bytes());
        }
    }

    let output = child
        .wait_with_output()
        .map_err(|source| CommandError::Spawn { program, source })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            program,
            args: args.join(" "),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `work` on a new thread that has joined the network namespace `netns` (as under
/// `/run/netns`). Processes that `work` starts inherit the namespace, and `/proc/sys/net`
/// opened there shows the namespace's settings. The thread exits afterwards, so no
/// thread of the caller's pools ever changes namespace.
pub(crate) fn in_netns<T, F>(netns: &str, work: F) -> Result<T, CommandError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CommandError> + Send + 'static,
{
    let path = format!("/run/netns/{netns}");
    let name = netns.to_owned();
    let handle = std::thread::spawn(move || {
        let file = File::open(&path).map_err(|source| CommandError::EnterNetns {
            netns: name.clone(),
            source,
        })?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| CommandError::EnterNetns {
            netns: name,
            source: errno.into(),
        })?;
        work()
    });
    handle.join().map_err(|_| CommandError::ThreadPanicked {
        netns: netns.to_owned(),
    })?
}

/// Writes `value` to a sysctl file such as `/proc/sys/net/ipv4/ip_forward`, for the network
/// namespace of the calling thread.
pub(crate) fn write_sysctl(path: &str, value: &str) -> Result<(), CommandError> {
    std::fs::write(path, value).map_err(|source| CommandError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// Returns whether an `ip` or `nft` failure means the object was already gone.
pub(crate) fn is_not_found(error: &CommandError) -> bool {
    match error {
        CommandError::Failed { stderr, .. } => {
            stderr.contains("No such file or directory")
                || stderr.contains("Cannot find device")
                || stderr.contains("does not exist")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout() {
        let output = run("cat", &[], Some("hello")).unwrap();
        assert_eq!(output, "hello");
    }

    #[test]
    fn run_reports_failure_with_stderr() {
        let error = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("oops"), "{message}");
        assert!(message.contains("sh -c"), "{message}");
    }

    #[test]
    fn run_reports_missing_program() {
        let error = run("hearth-no-such-program", &[], None).unwrap_err();
        assert!(matches!(error, CommandError::Spawn { .. }), "{error}");
    }
}
