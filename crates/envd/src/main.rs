//! envd: the agent inside every Hearth sandbox VM. It serves the E2B envd protocol
//! (Connect RPC process and filesystem services, and the HTTP files, health and init
//! endpoints) on port 49983.
//!
//! As PID 1 of the guest it forks, and the child runs the server. The parent reaps every
//! process that ends, orphans included, and restarts the server child when that dies.

mod api;
mod build_copy;
mod connect;
mod files;
mod filesystem;
mod port_forward;
mod process;
mod state;
mod users;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Port of envd in the sandbox, fixed by the E2B protocol.
const DEFAULT_PORT: u16 = 49983;

/// Delay before the init process restarts a server child that died.
const RESPAWN_DELAY: Duration = Duration::from_secs(1);

const USAGE: &str = "usage: envd [--port PORT] [--default-user NAME] [--version]\n\
       envd build-copy --archive TAR --dest PATH [...]  (see envd build-copy --help)\n\
       envd build-sync  (flush file system buffers to disk)\n\
  --port PORT          TCP port to listen on, on all IPv4 addresses (default 49983)\n\
  --default-user NAME  user of requests that name none, until /init sets one (default user)\n\
  --version            print the envd protocol version and exit";

#[derive(Debug)]
struct Options {
    port: u16,
    default_user: String,
}

fn parse_options() -> Result<Option<Options>, String> {
    let mut options = Options {
        port: DEFAULT_PORT,
        default_user: "user".to_string(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let value = args.next().ok_or("--port needs a value")?;
                options.port = value.parse().map_err(|_| format!("invalid port {value:?}"))?;
            }
            "--default-user" => {
                options.default_user = args.next().ok_or("--default-user needs a value")?;
            }
            "--version" => {
                println!("{}", hearth_types::ENVD_VERSION);
                return Ok(None);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Some(options))
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("build-copy") => std::process::exit(build_copy::run(std::env::args().skip(2))),
        Some("build-sync") => std::process::exit(build_copy::run_sync()),
        _ => {}
    }
    let options = match parse_options() {
        Ok(Some(options)) => options,
        Ok(None) => return,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();

    let is_init = std::process::id() == 1;
    if is_init {
        run_init();
    }
    if let Err(err) = serve(options, is_init) {
        tracing::error!(error = %format!("{err:#}"), "envd stopped");
        std::process::exit(1);
    }
}

/// Runs the PID 1 loop in the parent and returns only in a freshly forked server child.
fn run_init() {
    loop {
        // SAFETY: no other thread exists yet (the runtime starts after this), so the
        // child may run arbitrary code after fork.
        let child = unsafe { libc::fork() };
        match child {
            0 => return,
            pid if pid < 0 => {
                tracing::error!(error = %std::io::Error::last_os_error(), "failed to fork the server");
                std::thread::sleep(RESPAWN_DELAY);
            }
            server_pid => {
                tracing::info!(server_pid, "envd init started the server");
                reap_until_exit(server_pid);
                tracing::error!(server_pid, "server process ended; restarting it");
                std::thread::sleep(RESPAWN_DELAY);
            }
        }
    }
}

/// Reaps every child of PID 1 until `server_pid` ends.
fn reap_until_exit(server_pid: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid `c_int`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == server_pid {
            return;
        }
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(%err, "waitpid failed");
                std::thread::sleep(RESPAWN_DELAY);
            }
        }
    }
}

fn serve(options: Options, is_guest: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(Duration::from_secs(10))
        .build()?;
    runtime.block_on(async move {
        let state = state::AppState::new(options.default_user.clone());
        let port_forwarding = port_forward::PortForwarding::from_environment(is_guest, options.port);
        let app = api::router(state, is_guest, port_forwarding);
        let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, options.port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|err| anyhow::anyhow!("failed to listen on {address}: {err}"))?;
        tracing::info!(%address, version = hearth_types::ENVD_VERSION, default_user = %options.default_user, "envd listening");
        axum::serve(listener, app).await?;
        Ok(())
    })
}
