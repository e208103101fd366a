//! Removing what an earlier run of the same server instance left behind: the processes
//! still inside its network namespaces, the namespaces, its host veth ends and its
//! nftables table. Objects of other instances, whose names carry another instance ID, are
//! never touched.
//!
//! Also the pieces that [`crate::SlotPool`] uses to clean up single slots: finding and
//! killing the processes in given namespaces, and clearing the host's conntrack entries
//! of a slot address.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::command::CommandError;
use crate::instance::InstanceId;
use crate::setup;

/// Time to wait for killed processes to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between checks whether killed processes have exited.
const KILL_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Counts of the objects a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Processes killed because they were inside a removed or ready slot's namespace.
    pub processes: usize,
    /// Network namespaces deleted.
    pub namespaces: usize,
    /// Host interfaces deleted.
    pub interfaces: usize,
    /// Whether the instance's nftables table existed and was deleted.
    pub nft_table: bool,
}

impl SweepReport {
    /// Returns whether the sweep removed nothing.
    pub fn is_empty(&self) -> bool {
        *self == SweepReport::default()
    }
}

/// Error from removing processes, namespaces, interfaces or conntrack entries.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Command(#[from] CommandError),

    #[error("failed to list the processes in /proc")]
    ListProcesses(#[source] std::io::Error),

    #[error("failed to send SIGKILL to process {pid} in network namespace {netns}")]
    Kill {
        pid: u32,
        netns: String,
        #[source]
        source: Errno,
    },

    #[error("processes {pids:?} were still running {timeout:?} after SIGKILL; check whether they are stuck in uninterruptible sleep (state D in /proc/<pid>/stat)")]
    ProcessesRemain { pids: Vec<u32>, timeout: Duration },

    #[error("the `conntrack` command was not found: install the Debian package `conntrack` (scripts/install-deps.sh installs it)")]
    ConntrackMissing,
}

/// A process whose network namespace is one of the namespaces searched for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsProcess {
    /// Process ID.
    pub pid: u32,
    /// Name of the network namespace (as under `/run/netns`) that the process is in.
    pub netns: String,
    /// Device and inode number of the namespace, to check again right before the kill.
    netns_id: (u64, u64),
}

/// Removes every process, namespace, host interface and the nftables table of `instance`.
/// Processes go first, because a namespace outlives its name in `/run/netns` for as long
/// as a process is still in it. Blocking.
pub fn sweep_instance(instance: &InstanceId) -> Result<SweepReport, SweepError> {
    let mut report = SweepReport::default();

    let namespaces = list_names("/run/netns", &instance.netns_prefix());
    let processes = find_netns_processes(&namespaces)?;
    report.processes = kill_processes(&processes)?;

    // Host veth ends before namespaces: deleting one removes its peer at once.
    for name in list_names("/sys/class/net", &instance.host_veth_prefix()) {
        setup::delete_link(&name)?;
        report.interfaces += 1;
    }

    for name in &namespaces {
        setup::delete_netns(name)?;
        report.namespaces += 1;
    }

    report.nft_table = setup::remove_host_rules(instance)?;
    Ok(report)
}

/// Finds every process whose network namespace is one of `netns_names` (names under
/// `/run/netns`), by comparing the device and inode number of `/proc/<pid>/ns/net` with
/// those of `/run/netns/<name>`. Names that do not exist are skipped, and so is a
/// namespace that the calling process or thread is in, and the calling process itself.
///
/// Only each process's main thread is checked: a process whose main thread stays in
/// another namespace while one of its threads joined a searched one is not found.
pub fn find_netns_processes(netns_names: &[String]) -> Result<Vec<NetnsProcess>, SweepError> {
    let own_namespaces = [
        namespace_id(Path::new("/proc/self/ns/net")),
        namespace_id(Path::new("/proc/thread-self/ns/net")),
    ];
    let mut searched: HashMap<(u64, u64), &str> = HashMap::new();
    for name in netns_names {
        let Some(id) = namespace_id(&Path::new("/run/netns").join(name)) else {
            continue;
        };
        if !own_namespaces.contains(&Some(id)) {
            searched.insert(id, name);
        }
    }
    if searched.is_empty() {
        return Ok(Vec::new());
    }

    let own_pid = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(SweepError::ListProcesses)? {
        let entry = entry.map_err(SweepError::ListProcesses)?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        // A process that exited since the listing, or a zombie, has no namespace link.
        let Some(id) = process_netns_id(pid) else {
            continue;
        };
        if let Some(name) = searched.get(&id) {
            found.push(NetnsProcess {
                pid,
                netns: (*name).to_owned(),
                netns_id: id,
            });
        }
    }
    Ok(found)
}

/// Sends SIGKILL to each process and waits up to 5 seconds until all of them have
/// exited. A process that has already exited, or whose PID now belongs to a process in
/// another namespace, is skipped. Returns the number of processes killed. Blocking.
pub fn kill_processes(processes: &[NetnsProcess]) -> Result<usize, SweepError> {
    let mut killed = Vec::new();
    for process in processes {
        // Checked again right before the signal, so that a PID reused since the search
        // is not killed.
        if process_netns_id(process.pid) != Some(process.netns_id) {
            continue;
        }
        let pid = Pid::from_raw(process.pid as i32);
        match kill(pid, Signal::SIGKILL) {
            Ok(()) => {
                tracing::info!(pid = process.pid, netns = %process.netns, "killed a process left in a network slot");
                killed.push(process.pid);
            }
            Err(Errno::ESRCH) => {}
            Err(source) => {
                return Err(SweepError::Kill {
                    pid: process.pid,
                    netns: process.netns.clone(),
                    source,
                });
            }
        }
    }

    wait_for_exit(&killed)?;
    Ok(killed.len())
}

/// Deletes the host's conntrack entries whose original source or destination is
/// `address`: flows the host NATed for a slot and connections from the host to it.
/// Returns the number of entries deleted. Blocking.
pub(crate) fn clear_conntrack(address: Ipv4Addr) -> Result<usize, SweepError> {
    let address = address.to_string();
    let mut deleted = 0;
    for direction in ["-s", "-d"] {
        deleted += delete_conntrack_entries(&["-D", direction, &address])?;
    }
    Ok(deleted)
}

fn delete_conntrack_entries(args: &[&str]) -> Result<usize, SweepError> {
    let output = match Command::new("conntrack").args(args).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(SweepError::ConntrackMissing)
        }
        Err(source) => {
            return Err(CommandError::Spawn {
                program: "conntrack",
                source,
            }
            .into())
        }
    };

    // conntrack-tools 1.4.7 (Debian 12) reports "N flow entries have been deleted." on
    // stderr and exits with status 1 when N is 0.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let count = stderr
        .split(':')
        .next_back()
        .and_then(|tail| tail.split_whitespace().next())
        .and_then(|word| word.parse::<usize>().ok());
    match count {
        Some(count) if stderr.contains("flow entries have been deleted") => Ok(count),
        _ if output.status.success() => Ok(0),
        _ => Err(CommandError::Failed {
            program: "conntrack",
            args: args.join(" "),
            status: output.status,
            stderr: stderr.trim().to_owned(),
        }
        .into()),
    }
}

/// Waits until every process in `pids` has exited or become a zombie, which has already
/// left its namespaces.
fn wait_for_exit(pids: &[u32]) -> Result<(), SweepError> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut remaining: Vec<u32> = pids.to_vec();
    loop {
        remaining.retain(|pid| is_running(*pid));
        if remaining.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SweepError::ProcessesRemain {
                pids: remaining,
                timeout: KILL_TIMEOUT,
            });
        }
        std::thread::sleep(KILL_POLL_INTERVAL);
    }
}

/// Returns whether `/proc/<pid>` shows a process that is neither gone nor a zombie.
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

fn process_netns_id(pid: u32) -> Option<(u64, u64)> {
    namespace_id(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Returns the device and inode number that identify the namespace at `path`.
fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// Names of the entries of the directory `path` that start with `prefix`; none when the
/// directory does not exist.
pub(crate) fn list_names(path: &str, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_running() {
        assert!(is_running(std::process::id()));
    }

    #[test]
    fn exited_child_is_not_running() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Until it is reaped the child is a zombie, which counts as exited.
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_running(pid) && Instant::now() < deadline {
            std::thread::sleep(KILL_POLL_INTERVAL);
        }
        assert!(!is_running(pid), "zombie {pid} counted as running");
        child.wait().unwrap();
        assert!(!is_running(pid), "reaped {pid} counted as running");
    }

    #[test]
    fn kill_skips_processes_in_other_namespaces() {
        let mut child = Command::new("sleep").arg("1000").spawn().unwrap();
        let process = NetnsProcess {
            pid: child.id(),
            netns: "hearth-test".to_owned(),
            netns_id: (u64::MAX, u64::MAX),
        };
        let killed = kill_processes(&[process]);
        let still_running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(killed.unwrap(), 0);
        assert!(still_running, "process in another namespace was killed");
    }
}
