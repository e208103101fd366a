//! Transparent egress proxy that lets a sandbox reach allowed domain names.
//!
//! Egress rules in the slot's namespace work on IP addresses. For domain entries, the
//! namespace's nftables rules redirect (DNAT) the guest's TCP connections that the IP rules
//! deny to `GATEWAY_IP:DOMAIN_PROXY_PORT`, where a [`DomainProxy`] listens. For each
//! connection the proxy:
//! 1. reads the address the guest connected to (`SO_ORIGINAL_DST`, from conntrack);
//! 2. reads the first bytes until they name a host: the server name (SNI) of a TLS
//!    ClientHello or the `Host` header of an HTTP/1.x request (see [`crate::sniff`]);
//! 3. if an allowed [`DomainPattern`] matches the host, connects to the original address
//!    from a socket created in the slot's namespace. That connection leaves through the
//!    slot like any other, so the host's rules for slots still apply to it. The proxy
//!    sends the bytes read so far and relays both directions until both sides have closed;
//! 4. otherwise resets the connection.
//!
//! NOTE: the proxy trusts the host name the guest sends and does not check that the
//! destination address belongs to it. A guest that sends an allowed name can reach any
//! address outside 169.254.0.0/16 and loopback, on any TCP port.

use std::error::Error;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hearth_types::guest::GATEWAY_IP;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinError, JoinHandle, JoinSet};

use crate::command::{self, CommandError};
use crate::sniff::{self, DomainPattern, Sniffed, MAX_SNIFF_LEN};

/// TCP port of the proxy on [`GATEWAY_IP`] inside each slot's namespace.
pub const DOMAIN_PROXY_PORT: u16 = 15001;

/// Maximum time from accepting a connection until its first bytes name a host.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum time to connect to the original destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept, so a lasting error (such as too many open files) does not
/// keep a core busy.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Error from starting a [`DomainProxy`].
#[derive(Debug, thiserror::Error)]
pub enum DomainProxyError {
    #[error("failed to enter the slot's network namespace for the domain proxy")]
    Command(#[from] CommandError),

    #[error("failed to listen on {address} in network namespace {netns}: the namespace needs that address on an interface and no other listener on the port")]
    Listen {
        netns: String,
        address: SocketAddrV4,
        #[source]
        source: io::Error,
    },

    #[error("a blocking network task failed to complete")]
    Blocking(#[from] JoinError),
}

/// Reason for closing a connection before relaying it. The connection task logs it.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("failed to read the original destination (SO_ORIGINAL_DST); connections must reach the proxy through the slot's DNAT rule")]
    OriginalDestination(#[source] nix::errno::Errno),

    #[error("destination {0} is a link-local, loopback or unspecified address, which the proxy never connects to")]
    ForbiddenDestination(SocketAddrV4),

    #[error("failed to read from the client")]
    Read(#[source] io::Error),

    #[error(
        "client closed the connection before it sent a TLS server name or an HTTP Host header"
    )]
    ClosedEarly,

    #[error("client sent no TLS server name or HTTP Host header within {SNIFF_TIMEOUT:?}")]
    SniffTimeout,

    #[error("client's first bytes are not a TLS ClientHello with a server name or an HTTP/1.x request head with one Host header")]
    NoHost,

    #[error("host `{0}` matches no allowed domain")]
    NotAllowed(String),

    #[error("failed to enter the slot's network namespace for the outbound connection")]
    Command(#[from] CommandError),

    #[error("failed to create the outbound socket")]
    Socket(#[source] io::Error),

    #[error("failed to connect to the destination")]
    Connect(#[source] io::Error),

    #[error("connecting to the destination timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,

    #[error("failed to send the client's first bytes to the destination")]
    SendFirstBytes(#[source] io::Error),

    #[error("a blocking network task failed to complete")]
    Blocking(#[from] JoinError),
}

/// A running domain proxy in one slot's namespace. Dropping it stops accepting connections
/// and closes the ones it relays.
pub struct DomainProxy {
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

/// State that the accept loop and the connection tasks read.
struct Shared {
    netns: String,
    domains: RwLock<Vec<DomainPattern>>,
}

impl Shared {
    fn allows(&self, host: &str) -> bool {
        let domains = self.domains.read().unwrap_or_else(PoisonError::into_inner);
        domains.iter().any(|domain| domain.matches(host))
    }
}

impl DomainProxy {
    /// Starts a proxy listening on `GATEWAY_IP:DOMAIN_PROXY_PORT` in the network namespace
    /// `netns` (as under `/run/netns`) that relays connections to hosts matching `domains`.
    /// Its tasks run on the caller's Tokio runtime.
    pub async fn start(
        netns: &str,
        domains: Vec<DomainPattern>,
    ) -> Result<DomainProxy, DomainProxyError> {
        let address = SocketAddrV4::new(GATEWAY_IP, DOMAIN_PROXY_PORT);
        let listen_error = |source| DomainProxyError::Listen {
            netns: netns.to_owned(),
            address,
            source,
        };

        // A socket stays in the namespace it was created in, wherever it is used later.
        let name = netns.to_owned();
        let listener = tokio::task::spawn_blocking(move || {
            command::in_netns(&name, move || Ok(listen(address)))
        })
        .await??
        .map_err(listen_error)?;
        let listener = TcpListener::from_std(listener).map_err(listen_error)?;

        tracing::info!(%netns, %address, domains = domains.len(), "domain proxy started");
        let shared = Arc::new(Shared {
            netns: netns.to_owned(),
            domains: RwLock::new(domains),
        });
        let accept_task = tokio::spawn(accept_connections(listener, shared.clone()));
        Ok(DomainProxy {
            shared,
            accept_task,
        })
    }

    /// Replaces the allowed domains. The new domains apply to every connection whose host is
    /// checked afterwards, and connections already relayed stay open.
    pub fn set_domains(&self, domains: Vec<DomainPattern>) {
        tracing::debug!(netns = %self.shared.netns, domains = domains.len(), "domain proxy domains replaced");
        *self
            .shared
            .domains
            .write()
            .unwrap_or_else(PoisonError::into_inner) = domains;
    }
}

impl Drop for DomainProxy {
    fn drop(&mut self) {
        // The accept task owns the listener and the set of connection tasks. Cancelling it
        // drops both, which closes the listener and aborts every connection task.
        self.accept_task.abort();
        tracing::info!(netns = %self.shared.netns, "domain proxy stopped");
    }
}

/// Opens a non-blocking listening socket in the calling thread's namespace.
fn listen(address: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                connections.spawn(serve_connection(client, shared.clone()));
            }
            Err(error) => {
                tracing::warn!(netns = %shared.netns, %error, "domain proxy failed to accept a connection; retrying in {ACCEPT_RETRY_DELAY:?}");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }

        // Reap finished tasks, so the set only grows with the open connections.
        while let Some(finished) = connections.try_join_next() {
            if let Err(error) = finished {
                tracing::error!(netns = %shared.netns, %error, "domain proxy connection task failed");
            }
        }
    }
}

async fn serve_connection(mut client: TcpStream, shared: Arc<Shared>) {
    let netns = shared.netns.as_str();
    let destination = match original_destination(&client) {
        Ok(destination) => destination,
        Err(error) => {
            tracing::debug!(%netns, error = &error as &dyn Error, "domain proxy rejected a connection");
            reset(client, netns);
            return;
        }
    };

    let (mut upstream, first_bytes_len) = match open_upstream(&mut client, destination, &shared)
        .await
    {
        Ok(opened) => opened,
        Err(error) => {
            tracing::debug!(%netns, %destination, error = &error as &dyn Error, "domain proxy rejected a connection");
            reset(client, netns);
            return;
        }
    };

    // Copies each direction until end of file, then shuts down the other side's writing
    // half, so a half-closed connection keeps working in the open direction.
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_destination, to_client)) => {
            let to_destination = to_destination + first_bytes_len as u64;
            tracing::debug!(%netns, %destination, to_destination, to_client, "domain proxy connection closed");
        }
        Err(error) => {
            tracing::debug!(%netns, %destination, %error, "domain proxy connection ended with an error");
        }
    }
}

/// Reads the address the client connected to before the DNAT rule redirected it.
fn original_destination(client: &TcpStream) -> Result<SocketAddrV4, ConnectionError> {
    let address = socket::getsockopt(client, sockopt::OriginalDst)
        .map_err(ConnectionError::OriginalDestination)?;
    // `sockaddr_in` contains the address and port in network byte order.
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)),
        u16::from_be(address.sin_port),
    ))
}

/// Reads the client's host name and, if an allowed domain matches it, connects to
/// `destination` and sends the bytes read so far. Returns the connection and the number
/// of bytes sent.
async fn open_upstream(
    client: &mut TcpStream,
    destination: SocketAddrV4,
    shared: &Shared,
) -> Result<(TcpStream, usize), ConnectionError> {
    // Link-local covers the guest, the gateway (the proxy itself) and metadata services.
    let ip = destination.ip();
    if ip.is_link_local() || ip.is_loopback() || ip.is_unspecified() {
        return Err(ConnectionError::ForbiddenDestination(destination));
    }

    let (host, first_bytes) = read_host(client).await?;
    if !shared.allows(&host) {
        return Err(ConnectionError::NotAllowed(host));
    }

    let mut upstream = connect_in_netns(&shared.netns, destination).await?;
    upstream
        .write_all(&first_bytes)
        .await
        .map_err(ConnectionError::SendFirstBytes)?;
    tracing::debug!(netns = %shared.netns, %destination, host, "domain proxy relaying a connection");
    Ok((upstream, first_bytes.len()))
}

/// Reads from `client` until its bytes name a host. Returns the host and the bytes read.
async fn read_host(client: &mut TcpStream) -> Result<(String, Vec<u8>), ConnectionError> {
    let mut buffer = vec![0; MAX_SNIFF_LEN];
    let mut filled = 0;
    let reading = async {
        loop {
            let count = client
                .read(&mut buffer[filled..])
                .await
                .map_err(ConnectionError::Read)?;
            if count == 0 {
                return Err(ConnectionError::ClosedEarly);
            }
            filled += count;

            match sniff::sniff(&buffer[..filled]) {
                Sniffed::Host(host) => return Ok(host),
                Sniffed::NeedMore if filled < MAX_SNIFF_LEN => {}
                Sniffed::NeedMore | Sniffed::Unknown => return Err(ConnectionError::NoHost),
            }
        }
    };
    let host = tokio::time::timeout(SNIFF_TIMEOUT, reading)
        .await
        .map_err(|_| ConnectionError::SniffTimeout)??;

    buffer.truncate(filled);
    Ok((host, buffer))
}

/// Connects to `destination` from a socket created in the network namespace `netns`.
async fn connect_in_netns(
    netns: &str,
    destination: SocketAddrV4,
) -> Result<TcpStream, ConnectionError> {
    // NOTE: this starts a thread per connection, because a thread must join the namespace
    // to create a socket there.
    let name = netns.to_owned();
    let socket =
        tokio::task::spawn_blocking(move || command::in_netns(&name, || Ok(new_tcp_socket())))
            .await??
            .map_err(ConnectionError::Socket)?;

    let connecting = TcpSocket::from_std_stream(socket).connect(destination.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(ConnectionError::Connect),
        Err(_) => Err(ConnectionError::ConnectTimeout),
    }
}

/// Creates an unconnected, non-blocking IPv4 TCP socket in the calling thread's namespace.
fn new_tcp_socket() -> io::Result<std::net::TcpStream> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(std::net::TcpStream::from(fd))
}

/// Closes `client` with a TCP RST, so the guest gets a connection reset rather than an
/// orderly end of stream.
fn reset(client: TcpStream, netns: &str) {
    // A zero linger timeout makes close send a RST without blocking.
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(error) = socket::setsockopt(&client, sockopt::Linger, &linger) {
        tracing::debug!(%netns, %error, "failed to set SO_LINGER; closing the rejected connection without a reset");
    }
}
