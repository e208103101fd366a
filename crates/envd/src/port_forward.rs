//! Forwarding of loopback-only TCP servers to the guest address.
//!
//! The edge proxy on the host reaches a sandbox port by connecting to the guest address
//! (`hearth_types::guest::GUEST_IP`), so a server that listens only on 127.0.0.1 or ::1
//! refuses it. E2B users expect such a server to be reachable, so envd bridges it:
//!
//! 1. Every 200 ms a task reads the kernel's TCP tables (`/proc/net/tcp` and
//!    `/proc/net/tcp6`) and keeps the sockets in state LISTEN.
//! 2. A port is forwarded when it has a listener on 127.0.0.1 or ::1 and no listener that
//!    accepts connections to the guest address (0.0.0.0, :: or the guest address itself).
//!    envd's own forwarding listeners are recognised by their socket inode and never count.
//! 3. For such a port envd listens on guest-address:port and relays each connection to the
//!    loopback server, 127.0.0.1 if it listens there and ::1 otherwise.
//! 4. When the loopback listener is gone, envd closes its forwarding listener at the next
//!    scan. Connections already relayed stay open until either side closes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Interval between two scans of the TCP tables.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);

/// Environment variable that sets the IPv4 address to forward on, instead of the guest address.
/// Setting it also turns forwarding on when envd does not run as PID 1 (tests, development).
pub const ADDRESS_ENV: &str = "HEARTH_ENVD_FORWARD_ADDR";

/// Socket state LISTEN in the `st` column of `/proc/net/tcp` (`TCP_LISTEN` in the kernel).
pub const TCP_LISTEN: u8 = 0x0A;

/// Delay after a failed `accept`, so that running out of file descriptors does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Tables read at each scan. The second is missing when the kernel has no IPv6.
const TCP_TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

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
#[derive(Debug, Default)]
struct PortListeners {
    ipv4_loopback: bool,
    ipv6_loopback: bool,
    /// A listener on 0.0.0.0, :: or the forward address, which already serves the proxy.
    reaches_forward_address: bool,
}

/// Computes the ports to forward and, for each, the loopback address to relay to.
///
/// Only LISTEN rows count. Rows whose inode is in `own_inodes` (envd's forwarding listeners)
/// are ignored, and ports in `excluded_ports` are never forwarded. A `::` listener counts as
/// reaching the forward address although it may have `IPV6_V6ONLY` set, because the TCP
/// tables do not show that option.
pub fn plan_forwards(
    entries: &[SocketEntry],
    forward_address: Ipv4Addr,
    own_inodes: &HashSet<u64>,
    excluded_ports: &[u16],
) -> BTreeMap<u16, SocketAddr> {
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

    let mut plan = BTreeMap::new();
    for (port, listeners) in ports {
        if listeners.reaches_forward_address || excluded_ports.contains(&port) {
            continue;
        }
        let target = if listeners.ipv4_loopback {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else if listeners.ipv6_loopback {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            continue;
        };
        plan.insert(port, SocketAddr::new(target, port));
    }
    plan
}

/// Starts the forwarder on the current Tokio runtime, unless it is off.
///
/// Forwarding is on when envd runs as the guest's PID 1 (`is_guest`) or when `ADDRESS_ENV`
/// is set. Without either, envd runs on a host, whose loopback servers must stay private.
/// `envd_port` is never forwarded, and neither is the E2B envd port.
pub fn spawn(is_guest: bool, envd_port: u16) {
    let forward_address = match std::env::var(ADDRESS_ENV) {
        Ok(value) => match value.parse::<Ipv4Addr>() {
            Ok(address) => address,
            Err(_) => {
                tracing::error!(variable = ADDRESS_ENV, %value, "invalid IPv4 address, so port forwarding is off until the variable is unset or set to an address such as 169.254.0.21");
                return;
            }
        },
        Err(_) if is_guest => hearth_types::guest::GUEST_IP,
        Err(_) => return,
    };
    let excluded_ports = vec![hearth_types::guest::ENVD_PORT, envd_port];
    tracing::info!(%forward_address, "port forwarding of loopback servers started");
    tokio::spawn(Forwarder::new(forward_address, excluded_ports).run());
}

/// A forwarding listener on the forward address and its accept task.
struct Forward {
    target: SocketAddr,
    inode: u64,
    accept_task: JoinHandle<()>,
}

/// State of the scan loop.
struct Forwarder {
    forward_address: Ipv4Addr,
    excluded_ports: Vec<u16>,
    forwards: HashMap<u16, Forward>,
    /// Ports whose failed bind was logged, so each failure is logged once until it clears.
    bind_failures_logged: HashSet<u16>,
    address_missing_logged: bool,
    read_failure_logged: bool,
}

impl Forwarder {
    fn new(forward_address: Ipv4Addr, excluded_ports: Vec<u16>) -> Self {
        Self {
            forward_address,
            excluded_ports,
            forwards: HashMap::new(),
            bind_failures_logged: HashSet::new(),
            address_missing_logged: false,
            read_failure_logged: false,
        }
    }

    async fn run(mut self) {
        let mut interval = tokio::time::interval(SCAN_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let entries = self.read_listeners().await;
            self.apply(&entries);
        }
    }

    /// Reads the LISTEN rows of both TCP tables.
    async fn read_listeners(&mut self) -> Vec<SocketEntry> {
        let mut entries = Vec::new();
        for path in TCP_TABLES {
            let text = match tokio::fs::read_to_string(path).await {
                Ok(text) => text,
                Err(err) if err.kind() == ErrorKind::NotFound => continue,
                Err(err) => {
                    if !self.read_failure_logged {
                        tracing::warn!(path, %err, "failed to read the TCP table, retrying at every scan");
                        self.read_failure_logged = true;
                    }
                    continue;
                }
            };
            let listeners = text.lines().filter_map(parse_socket_line);
            entries.extend(listeners.filter(|entry| entry.state == TCP_LISTEN));
        }
        entries
    }

    /// Closes the forwards that are no longer wanted and opens the missing ones.
    fn apply(&mut self, entries: &[SocketEntry]) {
        let own_inodes: HashSet<u64> = self
            .forwards
            .values()
            .map(|forward| forward.inode)
            .collect();
        let plan = plan_forwards(
            entries,
            self.forward_address,
            &own_inodes,
            &self.excluded_ports,
        );

        // A port whose target changed is closed here and reopened at the next scan, because
        // an aborted accept task releases its listener only when the runtime drops it.
        let mut closed = Vec::new();
        for (&port, forward) in &self.forwards {
            if plan.get(&port) != Some(&forward.target) {
                closed.push(port);
            }
        }
        for port in &closed {
            if let Some(forward) = self.forwards.remove(port) {
                forward.accept_task.abort();
                tracing::info!(port, target = %forward.target, "stopped forwarding port");
            }
        }
        self.bind_failures_logged
            .retain(|port| plan.contains_key(port));

        for (&port, &target) in &plan {
            if self.forwards.contains_key(&port) || closed.contains(&port) {
                continue;
            }
            self.open(port, target);
        }
    }

    /// Listens on the forward address at `port` and starts relaying to `target`.
    fn open(&mut self, port: u16, target: SocketAddr) {
        let address = SocketAddr::new(IpAddr::V4(self.forward_address), port);
        let listener = match bind_listener(address) {
            Ok(listener) => listener,
            Err(err) => {
                self.log_bind_failure(address, &err);
                return;
            }
        };
        let inode = match nix::sys::stat::fstat(&listener) {
            Ok(stat) => stat.st_ino,
            Err(err) => {
                // Without its inode the listener would count as a server of its own port at
                // the next scan, and the forward would close again.
                tracing::warn!(%address, %err, "failed to read the inode of the forwarding listener, so the port is not forwarded");
                return;
            }
        };

        self.bind_failures_logged.remove(&port);
        self.address_missing_logged = false;
        tracing::info!(%address, %target, "forwarding port to a loopback server");
        let accept_task = tokio::spawn(accept_connections(listener, target));
        self.forwards.insert(
            port,
            Forward {
                target,
                inode,
                accept_task,
            },
        );
    }

    fn log_bind_failure(&mut self, address: SocketAddr, err: &std::io::Error) {
        if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            if !self.address_missing_logged {
                tracing::warn!(%address, %err, "forward address is not assigned to any interface, retrying at every scan");
                self.address_missing_logged = true;
            }
            return;
        }
        if self.bind_failures_logged.insert(address.port()) {
            tracing::debug!(%address, %err, "failed to listen for port forwarding, retrying at every scan");
        }
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

/// Accepts connections on `listener` and relays each to `target` on a task of its own, so
/// that aborting this task closes the listener but not the connections.
async fn accept_connections(listener: TcpListener, target: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, peer)) => {
                tokio::spawn(relay(inbound, peer, target));
            }
            Err(err) => {
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
