//! Starting a command as a given user, with pipes or a pseudo-terminal.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::pty::Winsize;

use super::fd_io::AsyncFdIo;
use crate::users::User;

/// `PATH` of commands when neither `/init` nor the call sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("failed to create a pipe")]
    Pipe(#[source] nix::Error),
    #[error("failed to open a pseudo-terminal")]
    OpenPty(#[source] nix::Error),
    #[error("failed to register a descriptor with the reactor")]
    Register(#[source] std::io::Error),
    #[error("failed to start {cmd:?} in {cwd}")]
    Spawn {
        cmd: String,
        cwd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Command, environment, user and standard streams of a process to start.
pub struct SpawnRequest {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: PathBuf,
    pub user: User,
    /// Terminal size (columns, rows) when the process gets a pseudo-terminal.
    pub pty_size: Option<(u16, u16)>,
    /// Whether the process gets a stdin pipe; without one its stdin is `/dev/null`.
    pub stdin: bool,
}

/// A started process and the parent's ends of its standard streams.
pub struct SpawnedProcess {
    pub child: tokio::process::Child,
    /// stdout pipe, or the PTY master.
    pub stdout: Arc<AsyncFdIo>,
    /// stderr pipe; `None` with a PTY, whose output arrives on `stdout`.
    pub stderr: Option<AsyncFdIo>,
    /// Input sink: the stdin pipe, or the PTY master.
    pub stdin: Option<Arc<AsyncFdIo>>,
    pub is_pty: bool,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)
}

fn register(fd: OwnedFd) -> Result<AsyncFdIo, SpawnError> {
    AsyncFdIo::new(fd).map_err(SpawnError::Register)
}

/// Builds the environment of a command: account variables, then `/init` variables, then
/// the call's variables, each overriding the ones before.
pub fn build_env(
    user: &User,
    init_env: &HashMap<String, String>,
    call_env: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), user.home.display().to_string());
    env.insert("USER".to_string(), user.name.clone());
    env.insert("LOGNAME".to_string(), user.name.clone());
    if !user.shell.is_empty() {
        env.insert("SHELL".to_string(), user.shell.clone());
    }
    env.extend(init_env.iter().map(|(key, value)| (key.clone(), value.clone())));
    env.extend(call_env.iter().map(|(key, value)| (key.clone(), value.clone())));
    env
}

/// Starts the process described by `request`.
pub fn spawn(request: SpawnRequest) -> Result<SpawnedProcess, SpawnError> {
    let mut command = tokio::process::Command::new(&request.cmd);
    command
        .args(&request.args)
        .env_clear()
        .envs(&request.env)
        .current_dir(&request.cwd)
        .kill_on_drop(false);

    let (stdout, stderr, stdin, is_pty) = match request.pty_size {
        Some((cols, rows)) => {
            let size = Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(&size, None).map_err(SpawnError::OpenPty)?;
            set_cloexec(&pty.master);
            let slave_out = pty.slave.try_clone().map_err(SpawnError::Register)?;
            let slave_err = pty.slave.try_clone().map_err(SpawnError::Register)?;
            command
                .stdin(Stdio::from(pty.slave))
                .stdout(Stdio::from(slave_out))
                .stderr(Stdio::from(slave_err));
            let master = Arc::new(register(pty.master)?);
            (master.clone(), None, Some(master), true)
        }
        None => {
            let (stdout_read, stdout_write) = pipe()?;
            let (stderr_read, stderr_write) = pipe()?;
            command
                .stdout(Stdio::from(stdout_write))
                .stderr(Stdio::from(stderr_write));
            let stdin = if request.stdin {
                let (stdin_read, stdin_write) = pipe()?;
                command.stdin(Stdio::from(stdin_read));
                Some(Arc::new(register(stdin_write)?))
            } else {
                command.stdin(Stdio::null());
                None
            };
            (
                Arc::new(register(stdout_read)?),
                Some(register(stderr_read)?),
                stdin,
                false,
            )
        }
    };

    let uid = request.user.uid;
    let gid = request.user.gid;
    let groups: Vec<libc::gid_t> = request.user.groups.clone();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe system calls. It allocates nothing, because `groups` was built
    // before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if is_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let child = command.spawn().map_err(|source| SpawnError::Spawn {
        cmd: request.cmd.clone(),
        cwd: request.cwd.display().to_string(),
        source,
    })?;
    // `command` owns the child's ends of the pipes and the PTY slave: dropping it closes
    // them in the parent, so reads see end of file once the child's side closes.
    drop(command);

    Ok(SpawnedProcess {
        child,
        stdout,
        stderr,
        stdin,
        is_pty,
    })
}

fn set_cloexec(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with F_SETFD on a descriptor that `fd` owns only sets FD_CLOEXEC.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// Sets the terminal size of a PTY master.
pub fn resize_pty(master: &AsyncFdIo, cols: u16, rows: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer; the descriptor is an
    // open PTY master.
    let result = unsafe { libc::ioctl(master.raw_fd(), libc::TIOCSWINSZ, &size) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_env_call_overrides_init() {
        let user = User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        };
        let init = HashMap::from([("A".to_string(), "init".to_string()), ("B".to_string(), "init".to_string())]);
        let call = HashMap::from([("B".to_string(), "call".to_string())]);
        let env = build_env(&user, &init, &call);
        assert_eq!(env["A"], "init");
        assert_eq!(env["B"], "call");
        assert_eq!(env["HOME"], "/home/user");
        assert_eq!(env["USER"], "user");
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }
}
