//! Forwarding of loopback-only TCP servers to the guest address.
//!
//! The edge proxy on the host reaches a sandbox port by connecting to the guest address
//! (`hearth_types::guest::GUEST_IP`), so a server that listens only on 127.0.0.1 or ::1
//! refuses it. E2B users expect such a server to be reachable, so envd bridges it on demand:
//!
//! 1. When the proxy's connection to a port is refused, the proxy sends
//!    `POST /hearth/port-forward/{port}` to envd.
//! 2. envd reads the kernel's TCP tables (`/proc/net/tcp` and `/proc/net/tcp6`) once and
//!    keeps the sockets in state LISTEN. The port is forwarded when it has a listener on
//!    127.0.0.1 or ::1 and no listener that accepts connections to the guest address
//!    (0.0.0.0, :: or the guest address itself). envd's own forwarding listeners are
//!    recognised by their socket inode and never count.
//! 3. For such a port envd listens on guest-address:port and relays each connection to the
//!    loopback server, 127.0.0.1 if it listens there and ::1 otherwise.
//! 4. While at least one forward is open, a task reads the tables every second and closes
//!    the forwards whose loopback listener is gone. It ends with the last forward, so an
//!    idle guest without forwards does no periodic work. Connections already relayed stay
//!    open until either side closes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Interval between two checks of the open forwards.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Environment variable that sets the IPv4 address to forward on, instead of the guest address.
/// Setting it also turns forwarding on when envd does not run as PID 1 (tests, development).
pub const ADDRESS_ENV: &str = "HEARTH_ENVD_FORWARD_ADDR";

/// Route through which the proxy requests a forward. It needs no envd access token, because
/// it only makes a loopback server of this guest reachable at the guest's own address, and
/// the proxy guards that address with the sandbox's traffic access token.
pub const ROUTE: &str = "/hearth/port-forward/{port}";

/// Socket state LISTEN in the `st` column of `/proc/net/tcp` (`TCP_LISTEN` in the kernel).
pub const TCP_LISTEN: u8 = 0x0A;

/// Delay after a failed `accept`, so that running out of file descriptors does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Table of IPv4 sockets, which every kernel has.
const TCP_TABLE: &str = "/proc/net/tcp";

/// Table of IPv6 sockets, missing when the kernel has no IPv6.
const TCP6_TABLE: &str = "/proc/net/tcp6";

/// One socket row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketEntry {
    /// Local address and port.
    pub local: SocketAddr,
    /// Kernel TCP state (`TCP_LISTEN` for listeners).
    pub state: u8,
    /// Inode of the socket, as `fstat` reports it for the socket's file descriptor.
    pub inode: u64,
}

/// Parses one row of `/proc/net/tcp` or `/proc/net/tcp6`. Returns `None` for the header row
/// and for rows that do not have the expected columns.
///
/// Columns are separated by spaces: `sl local_address rem_address st tx:rx tr:when retrnsmt
/// uid timeout inode ...`. An IPv4 address is 8 hex digits and an IPv6 address 32, each
/// 32-bit word printed as the integer that its network-order bytes form in host byte order
/// (127.0.0.1 reads `0100007F` on little-endian machines). Ports are 4 hex digits in the
/// usual numeric order.
pub fn parse_socket_line(line: &str) -> Option<SocketEntry> {
    let columns: Vec<&str> = line.split_whitespace().collect();
    if columns.len() < 10 || !columns[0].ends_with(':') {
        return None;
    }
    let local = parse_hex_socket_address(columns[1])?;
    let state = u8::from_str_radix(columns[3], 16).ok()?;
    let inode = columns[9].parse().ok()?;
    Some(SocketEntry {
        local,
        state,
        inode,
    })
}

/// Parses `ADDRESS:PORT` in the hex form of the kernel's TCP tables.
fn parse_hex_socket_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_hex_word(address)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (index, chunk) in octets.chunks_exact_mut(4).enumerate() {
                let word = address.get(index * 8..index * 8 + 8)?;
                chunk.copy_from_slice(&parse_hex_word(word)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Converts one 8-digit hex word of a TCP table address back into its four address bytes.
fn parse_hex_word(word: &str) -> Option<[u8; 4]> {
    if word.len() != 8 {
        return None;
    }
    // The kernel printed the bytes as a host-order integer, so native order restores them.
    u32::from_str_radix(word, 16).ok().map(u32::to_ne_bytes)
}

/// Returns `ip` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Listeners seen on one port.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortListeners {
    ipv4_loopback: bool,
    ipv6_loopback: bool,
    /// A listener on 0.0.0.0, :: or the forward address, which already serves the proxy.
    reaches_forward_address: bool,
}

impl PortListeners {
    /// Returns the loopback address to relay `port` to, or `None` when the port needs no
    /// forward: it has no loopback listener, or a listener already reaches the forward address.
    fn forward_target(&self, port: u16) -> Option<SocketAddr> {
        if self.reaches_forward_address {
            return None;
        }
        if self.ipv4_loopback {
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        } else if self.ipv6_loopback {
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
        } else {
            None
        }
    }
}

/// Groups the LISTEN rows by port. Rows whose inode is in `own_inodes` (envd's forwarding
/// listeners) are ignored. A `::` listener counts as reaching the forward address although
/// it may have `IPV6_V6ONLY` set, because the TCP tables do not show that option.
pub fn listeners_by_port(
    entries: &[SocketEntry],
    forward_address: Ipv4Addr,
    own_inodes: &HashSet<u64>,
) -> BTreeMap<u16, PortListeners> {
    let mut ports: BTreeMap<u16, PortListeners> = BTreeMap::new();
    for entry in entries {
        if entry.state != TCP_LISTEN || own_inodes.contains(&entry.inode) {
            continue;
        }
        let listeners = ports.entry(entry.local.port()).or_default();
        match canonical_ip(entry.local.ip()) {
            IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => listeners.ipv4_loopback = true,
            IpAddr::V6(ip) if ip == Ipv6Addr::LOCALHOST => listeners.ipv6_loopback = true,
            ip if ip.is_unspecified() || ip == IpAddr::V4(forward_address) => {
                listeners.reaches_forward_address = true;
            }
            _ => {}
        }
    }
    ports
}

/// Computes the ports to forward and, for each, the loopback address to relay to.
///
/// A port is forwarded when it has a loopback listener and no listener that reaches the
/// forward address (see [`listeners_by_port`]). Ports in `excluded_ports` never are.
pub fn plan_forwards(
    entries: &[SocketEntry],
    forward_address: Ipv4Addr,
    own_inodes: &HashSet<u64>,
    excluded_ports: &[u16],
) -> BTreeMap<u16, SocketAddr> {
    listeners_by_port(entries, forward_address, own_inodes)
        .into_iter()
        .filter(|(port, _)| !excluded_ports.contains(port))
        .filter_map(|(port, listeners)| Some((port, listeners.forward_target(port)?)))
        .collect()
}

/// Reads the LISTEN rows of both TCP tables. A missing IPv6 table counts as empty.
///
/// The reads are synchronous because the kernel generates the tables in memory, and callers
/// hold the forwarder's lock across them, so that no forward opens or closes between the
/// read and the decision based on it.
fn read_listeners() -> std::io::Result<Vec<SocketEntry>> {
    let mut entries = Vec::new();
    for path in [TCP_TABLE, TCP6_TABLE] {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == ErrorKind::NotFound && path == TCP6_TABLE => continue,
            Err(err) => {
                return Err(std::io::Error::new(
                    err.kind(),
                    format!("failed to read {path}: {err}"),
                ))
            }
        };
        let listeners = text.lines().filter_map(parse_socket_line);
        entries.extend(listeners.filter(|entry| entry.state == TCP_LISTEN));
    }
    Ok(entries)
}

/// Forwarding of loopback servers on one address, shared by the route and the check task.
pub struct PortForwarding {
    forward_address: Ipv4Addr,
    excluded_ports: Vec<u16>,
    state: Mutex<ForwardState>,
}

#[derive(Default)]
struct ForwardState {
    forwards: HashMap<u16, Forward>,
    /// Whether the task that closes stale forwards runs. It runs exactly while `forwards`
    /// is not empty, and both change only under the lock.
    check_running: bool,
}

/// A forwarding listener on the forward address and its accept task.
struct Forward {
    /// Loopback server that new connections are relayed to.
    target: watch::Sender<SocketAddr>,
    inode: u64,
    accept_task: JoinHandle<()>,
}

/// Result of a forward request for a port that a server listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardOutcome {
    /// A listener on 0.0.0.0, :: or the forward address already accepts the connections.
    AlreadyReachable,
    /// envd forwards the port to the loopback listener (opened now or before).
    Forwarded,
}

/// Reason a port is not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("invalid port {0:?}: expected a TCP port number from 1 to 65535")]
    InvalidPort(String),

    #[error("port {0} is envd's own port and is never forwarded")]
    ExcludedPort(u16),

    #[error("port forwarding of loopback servers is off: envd is not the guest's PID 1 and {ADDRESS_ENV} is not set")]
    Disabled,

    #[error("nothing listens on port {0}")]
    NothingListens(u16),

    #[error(transparent)]
    ReadTable(std::io::Error),

    #[error("failed to listen on {address} to forward port {}: {source}", address.port())]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },

    #[error("failed to read the inode of the forwarding listener on {address}: {source}")]
    Inode {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl ForwardError {
    fn status(&self) -> StatusCode {
        match self {
            ForwardError::InvalidPort(_) | ForwardError::ExcludedPort(_) => StatusCode::BAD_REQUEST,
            ForwardError::Disabled | ForwardError::NothingListens(_) => StatusCode::NOT_FOUND,
            ForwardError::Bind { source, .. }
                if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
            {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ForwardError::ReadTable(_) | ForwardError::Bind { .. } | ForwardError::Inode { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ForwardError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "code": status.as_u16(), "message": self.to_string() });
        (status, Json(body)).into_response()
    }
}

impl PortForwarding {
    /// Returns the forwarder, or `None` when forwarding is off.
    ///
    /// Forwarding is on when envd runs as the guest's PID 1 (`is_guest`) or when `ADDRESS_ENV`
    /// is set. Without either, envd runs on a host, whose loopback servers must stay private.
    /// `envd_port` is never forwarded, and neither is the E2B envd port.
    pub fn from_environment(is_guest: bool, envd_port: u16) -> Option<Arc<Self>> {
        let forward_address = match std::env::var(ADDRESS_ENV) {
            Ok(value) => match value.parse::<Ipv4Addr>() {
                Ok(address) => address,
                Err(_) => {
                    tracing::error!(variable = ADDRESS_ENV, %value, "invalid IPv4 address, so port forwarding is off until the variable is unset or set to an address such as 169.254.0.21");
                    return None;
                }
            },
            Err(_) if is_guest => hearth_types::guest::GUEST_IP,
            Err(_) => return None,
        };
        tracing::info!(%forward_address, "port forwarding of loopback servers is on, on request");
        Some(Arc::new(Self {
            forward_address,
            excluded_ports: vec![hearth_types::guest::ENVD_PORT, envd_port],
            state: Mutex::new(ForwardState::default()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, ForwardState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Forwards `port` to its loopback listener unless a listener already reaches the
    /// forward address, and starts the check task when it is not running.
    pub fn forward_port(self: &Arc<Self>, port: u16) -> Result<ForwardOutcome, ForwardError> {
        if port == 0 {
            return Err(ForwardError::InvalidPort(port.to_string()));
        }
        if self.excluded_ports.contains(&port) {
            return Err(ForwardError::ExcludedPort(port));
        }

        let mut state = self.lock();
        let entries = read_listeners().map_err(ForwardError::ReadTable)?;
        let listeners = listeners_by_port(&entries, self.forward_address, &state.own_inodes());
        let listeners = listeners.get(&port).copied().unwrap_or_default();
        if listeners.reaches_forward_address {
            return Ok(ForwardOutcome::AlreadyReachable);
        }
        let target = listeners
            .forward_target(port)
            .ok_or(ForwardError::NothingListens(port))?;

        match state.forwards.get(&port) {
            Some(forward) => retarget(port, forward, target),
            None => {
                let forward = open(self.forward_address, port, target)?;
                state.forwards.insert(port, forward);
            }
        }
        if !state.check_running {
            state.check_running = true;
            tokio::spawn(self.clone().check_forwards());
        }
        Ok(ForwardOutcome::Forwarded)
    }

    /// Closes, every `CHECK_INTERVAL`, the forwards that are no longer wanted, and ends when
    /// none is left.
    async fn check_forwards(self: Arc<Self>) {
        let mut read_failure_logged = false;
        loop {
            tokio::time::sleep(CHECK_INTERVAL).await;

            let mut state = self.lock();
            match read_listeners() {
                Ok(entries) => {
                    read_failure_logged = false;
                    let plan = plan_forwards(
                        &entries,
                        self.forward_address,
                        &state.own_inodes(),
                        &self.excluded_ports,
                    );
                    state.apply(&plan);
                }
                Err(err) => {
                    if !read_failure_logged {
                        tracing::warn!(%err, "failed to read the TCP tables, so no forward closes until a read succeeds");
                        read_failure_logged = true;
                    }
                }
            }
            if state.forwards.is_empty() {
                state.check_running = false;
                return;
            }
        }
    }
}

impl ForwardState {
    fn own_inodes(&self) -> HashSet<u64> {
        self.forwards
            .values()
            .map(|forward| forward.inode)
            .collect()
    }

    /// Closes the forwards whose port is not in `plan` and points the others at the
    /// target the plan names. Opens none: forwards open only on request.
    fn apply(&mut self, plan: &BTreeMap<u16, SocketAddr>) {
        self.forwards.retain(|&port, forward| match plan.get(&port) {
            Some(&target) => {
                retarget(port, forward, target);
                true
            }
            None => {
                // The runtime drops the aborted task, and with it the listener, at its next
                // turn. NOTE: a request for this port handled before that turn fails to bind
                // with EADDRINUSE, and the proxy reports the port as not open.
                forward.accept_task.abort();
                tracing::info!(port, target = %*forward.target.borrow(), "stopped forwarding port");
                false
            }
        });
    }
}

/// Points `forward` at `target` when its loopback server moved between 127.0.0.1 and ::1.
fn retarget(port: u16, forward: &Forward, target: SocketAddr) {
    let previous = forward.target.send_replace(target);
    if previous != target {
        tracing::info!(port, %previous, %target, "forwarding port to another loopback server");
    }
}

/// Listens on the forward address at `port` and starts relaying to `target`.
fn open(forward_address: Ipv4Addr, port: u16, target: SocketAddr) -> Result<Forward, ForwardError> {
    let address = SocketAddr::new(IpAddr::V4(forward_address), port);
    let listener = bind_listener(address).map_err(|source| {
        tracing::warn!(%address, err = %source, "failed to listen for port forwarding");
        ForwardError::Bind { address, source }
    })?;
    // Without its inode the listener would count as a server that reaches the forward
    // address, and the check task would close the forward.
    let inode = nix::sys::stat::fstat(&listener)
        .map_err(|errno| {
            let source = std::io::Error::from(errno);
            tracing::warn!(%address, err = %source, "failed to read the inode of the forwarding listener");
            ForwardError::Inode { address, source }
        })?
        .st_ino;

    tracing::info!(%address, %target, "forwarding port to a loopback server");
    let (target, target_receiver) = watch::channel(target);
    let accept_task = tokio::spawn(accept_connections(listener, target_receiver));
    Ok(Forward {
        target,
        inode,
        accept_task,
    })
}

/// Adds `POST /hearth/port-forward/{port}`. With forwarding off, it responds with 404.
pub fn router(forwarding: Option<Arc<PortForwarding>>) -> Router {
    Router::new()
        .route(ROUTE, post(request_forward))
        .with_state(forwarding)
}

/// Handles `POST /hearth/port-forward/{port}`: 200 `{"forwarded": true}` when envd forwards
/// the port, 200 `{"forwarded": false}` when a listener already reaches the forward
/// address, and a JSON error otherwise (404 when nothing listens on loopback).
async fn request_forward(
    State(forwarding): State<Option<Arc<PortForwarding>>>,
    Path(port): Path<String>,
) -> Response {
    let Some(forwarding) = forwarding else {
        return ForwardError::Disabled.into_response();
    };
    let result = match port.parse::<u16>() {
        Ok(port) => forwarding.forward_port(port),
        Err(_) => Err(ForwardError::InvalidPort(port)),
    };
    match result {
        Ok(outcome) => {
            let forwarded = outcome == ForwardOutcome::Forwarded;
            Json(serde_json::json!({ "forwarded": forwarded })).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// Binds a listener on `address` with `SO_REUSEADDR`, so that a forward closed a moment ago
/// does not block a new one on the same port while its connections are in TIME_WAIT.
fn bind_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// Accepts connections on `listener` and relays each to the current `target` on a task of
/// its own, so that aborting this task closes the listener but not the connections.
async fn accept_connections(listener: TcpListener, target: watch::Receiver<SocketAddr>) {
    loop {
        match listener.accept().await {
            Ok((inbound, peer)) => {
                let target = *target.borrow();
                tokio::spawn(relay(inbound, peer, target));
            }
            Err(err) => {
                let target = *target.borrow();
                tracing::debug!(%target, %err, "failed to accept a forwarded connection");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
}

/// Copies bytes both ways between `inbound` and a new connection to `target`. When one
/// side ends its stream, the other side's write half is shut down, so half-close passes
/// through. A refused or failed connection resets the other side instead of closing it.
async fn relay(mut inbound: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut outbound = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(%peer, %target, %err, "failed to connect a forwarded connection");
            let _ = inbound.set_zero_linger();
            return;
        }
    };
    // Relayed writes are as small as the peer's, so Nagle's algorithm would only delay them.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);

    if let Err(err) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        tracing::debug!(%peer, %target, %err, "forwarded connection failed");
        let _ = inbound.set_zero_linger();
        let _ = outbound.set_zero_linger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);

    fn listener(address: &str, inode: u64) -> SocketEntry {
        SocketEntry {
            local: address.parse().unwrap(),
            state: TCP_LISTEN,
            inode,
        }
    }

    fn target(address: &str) -> SocketAddr {
        address.parse().unwrap()
    }

    #[test]
    fn parse_ipv4_listener_line() {
        let line = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41234 1 0000000000000000 100 0 0 10 0";
        let entry = parse_socket_line(line).unwrap();
        assert_eq!(entry.local, target("127.0.0.1:8080"));
        assert_eq!(entry.state, TCP_LISTEN);
        assert_eq!(entry.inode, 41234);
    }

    #[test]
    fn parse_ipv4_guest_address_and_state() {
        // 169.254.0.21:49983, established (state 01).
        let line = "   3: 1500FEA9:C33F 1600FEA9:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let entry = parse_socket_line(line).unwrap();
        assert_eq!(entry.local, target("169.254.0.21:49983"));
        assert_eq!(entry.state, 0x01);
    }

    #[test]
    fn parse_ipv6_loopback_line() {
        let line = "   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 100 0 0 10 0";
        let entry = parse_socket_line(line).unwrap();
        assert_eq!(entry.local, target("[::1]:3000"));
        assert_eq!(entry.state, TCP_LISTEN);
        assert_eq!(entry.inode, 5555);
    }

    #[test]
    fn parse_ipv6_wildcard_and_mapped_lines() {
        let wildcard = "   1: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0000000000000000 100 0 0 10 0";
        let mapped = "   2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_socket_line(wildcard).unwrap().local,
            target("[::]:8080")
        );
        assert_eq!(
            parse_socket_line(mapped).unwrap().local,
            target("[::ffff:127.0.0.1]:8080")
        );
    }

    #[test]
    fn parse_ipv6_global_address() {
        // 2001:db8::5, whose words the kernel prints in host order.
        let line = "   0: B80D0120000000000000000005000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_socket_line(line).unwrap().local,
            target("[2001:db8::5]:80")
        );
    }

    #[test]
    fn parse_rejects_header_and_malformed_lines() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(parse_socket_line(header), None);
        assert_eq!(parse_socket_line(""), None);
        let short_address =
            "   0: 0100007:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1";
        assert_eq!(parse_socket_line(short_address), None);
        let bad_port =
            "   0: 0100007F:1F9 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1";
        assert_eq!(parse_socket_line(bad_port), None);
        let bad_state =
            "   0: 0100007F:1F90 00000000:0000 ZZ 00000000:00000000 00:00000000 00000000 0 0 1 1";
        assert_eq!(parse_socket_line(bad_state), None);
        let missing_inode =
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0";
        assert_eq!(parse_socket_line(missing_inode), None);
    }

    #[test]
    fn parse_reads_this_machines_tables() {
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
        for line in text.lines().skip(1) {
            assert!(parse_socket_line(line).is_some(), "unparsed row {line:?}");
        }
    }

    #[test]
    fn plan_forwards_ipv4_loopback_only() {
        let plan = plan_forwards(
            &[listener("127.0.0.1:8080", 1)],
            GUEST,
            &HashSet::new(),
            &[],
        );
        assert_eq!(plan.get(&8080), Some(&target("127.0.0.1:8080")));
        assert_eq!(plan.len(), 1);
    }

    #[test]
    fn plan_forwards_ipv6_loopback_only() {
        let plan = plan_forwards(&[listener("[::1]:3000", 1)], GUEST, &HashSet::new(), &[]);
        assert_eq!(plan.get(&3000), Some(&target("[::1]:3000")));
    }

    #[test]
    fn plan_prefers_ipv4_loopback() {
        let entries = [listener("[::1]:3000", 1), listener("127.0.0.1:3000", 2)];
        let plan = plan_forwards(&entries, GUEST, &HashSet::new(), &[]);
        assert_eq!(plan.get(&3000), Some(&target("127.0.0.1:3000")));
    }

    #[test]
    fn plan_treats_mapped_loopback_as_ipv4() {
        let plan = plan_forwards(
            &[listener("[::ffff:127.0.0.1]:3000", 1)],
            GUEST,
            &HashSet::new(),
            &[],
        );
        assert_eq!(plan.get(&3000), Some(&target("127.0.0.1:3000")));
    }

    #[test]
    fn plan_skips_ports_that_reach_the_guest() {
        for reaching in [
            "0.0.0.0:8080",
            "[::]:8080",
            "169.254.0.21:8080",
            "[::ffff:169.254.0.21]:8080",
        ] {
            let entries = [listener("127.0.0.1:8080", 1), listener(reaching, 2)];
            let plan = plan_forwards(&entries, GUEST, &HashSet::new(), &[]);
            assert!(plan.is_empty(), "forwarded beside {reaching}");
        }
    }

    #[test]
    fn plan_ignores_own_listeners() {
        let entries = [
            listener("127.0.0.1:8080", 1),
            listener("169.254.0.21:8080", 2),
        ];
        let plan = plan_forwards(&entries, GUEST, &HashSet::from([2]), &[]);
        assert_eq!(plan.get(&8080), Some(&target("127.0.0.1:8080")));
    }

    #[test]
    fn plan_drops_own_listener_without_loopback() {
        let plan = plan_forwards(
            &[listener("169.254.0.21:8080", 2)],
            GUEST,
            &HashSet::from([2]),
            &[],
        );
        assert!(plan.is_empty());
    }

    #[test]
    fn plan_skips_excluded_ports() {
        let plan = plan_forwards(
            &[listener("127.0.0.1:49983", 1)],
            GUEST,
            &HashSet::new(),
            &[49983],
        );
        assert!(plan.is_empty());
    }

    #[test]
    fn plan_ignores_non_listen_sockets() {
        let mut established = listener("127.0.0.1:8080", 1);
        established.state = 0x01;
        assert!(plan_forwards(&[established], GUEST, &HashSet::new(), &[]).is_empty());

        let mut wildcard_in_time_wait = listener("0.0.0.0:8080", 2);
        wildcard_in_time_wait.state = 0x06;
        let entries = [listener("127.0.0.1:8080", 1), wildcard_in_time_wait];
        assert_eq!(
            plan_forwards(&entries, GUEST, &HashSet::new(), &[]).len(),
            1
        );
    }

    #[test]
    fn plan_ignores_other_addresses() {
        let entries = [listener("127.0.0.2:8080", 1), listener("10.0.0.5:9090", 2)];
        assert!(plan_forwards(&entries, GUEST, &HashSet::new(), &[]).is_empty());

        let entries = [listener("127.0.0.1:8080", 1), listener("10.0.0.5:8080", 2)];
        assert_eq!(
            plan_forwards(&entries, GUEST, &HashSet::new(), &[]).len(),
            1
        );
    }
}
