//! Running the host tools the builder needs (apt-get, dpkg-deb, debootstrap, mkfs.ext4,
//! tar, chroot), with their output captured for errors.

use std::path::Path;
use std::process::Stdio;

/// Error of an external command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("failed to start {program}; is it installed?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} exited with {status}: {stderr}")]
    Failed { program: String, args: String, status: std::process::ExitStatus, stderr: String },
}

/// Runs `program` with `args` (in `cwd` if given) and returns its standard output.
pub async fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, CommandError> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    tracing::debug!(program, ?args, "running command");
    let output = command
        .output()
        .await
        .map_err(|source| CommandError::Spawn { program: program.to_owned(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(CommandError::Failed {
            program: program.to_owned(),
            args: args.join(" "),
            status: output.status,
            stderr: tail.trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
