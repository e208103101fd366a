//! Domain proxy tests against real network namespaces. They need root (CAP_NET_ADMIN) and
//! the `ip` and `nft` commands, and send traffic only inside namespaces they create.
//!
//! Each test builds three namespaces:
//! - `client` takes the guest's place: [`GUEST_IP`] with a default route via the proxy
//!   namespace;
//! - `proxy` takes a slot's place: [`GATEWAY_IP`] toward the client, a DNAT rule that sends
//!   the client's TCP connections to the proxy port, and a link to the internet namespace;
//! - `internet` runs echo servers on [`SERVER_IP`] ports 80 and 443.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// Shares the slot tests' namespace helpers; this file uses only some of them.
#[allow(dead_code)]
mod guest;

use guest::{in_netns, ip};
use hearth_network::domain_proxy::{DomainProxy, DOMAIN_PROXY_PORT};
use hearth_network::sniff::DomainPattern;
use hearth_types::guest::{GATEWAY_IP, GUEST_IP};

/// Address of the servers in the internet namespace.
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Address of the proxy namespace toward the internet namespace.
const PROXY_OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const HTTP: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 80);
const TLS: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 443);

/// The three namespaces of one test; deleted when dropped, also when the test fails.
struct Topology {
    client: String,
    proxy: String,
    internet: String,
}

impl Topology {
    /// Creates the namespaces, named `hth-dpt-<pid>-<tag>-<role>` so that tests running at
    /// the same time do not clash.
    fn create(tag: &str) -> Topology {
        let name = |role: &str| format!("hth-dpt-{}-{tag}-{role}", std::process::id());
        let topology = Topology {
            client: name("c"),
            proxy: name("p"),
            internet: name("i"),
        };
        for netns in topology.names() {
            ip(&["netns", "add", netns]);
            ip(&["-n", netns, "link", "set", "lo", "up"]);
        }

        // Interface names are per namespace, so these fixed names fit every test.
        let (client, proxy, internet) = (&topology.client, &topology.proxy, &topology.internet);
        ip(&[
            "-n",
            proxy,
            "link",
            "add",
            "to-client",
            "type",
            "veth",
            "peer",
            "name",
            "to-proxy",
            "netns",
            client,
        ]);
        ip(&[
            "-n",
            proxy,
            "link",
            "add",
            "to-internet",
            "type",
            "veth",
            "peer",
            "name",
            "to-proxy",
            "netns",
            internet,
        ]);
        let configure = [
            (proxy, "to-client", format!("{GATEWAY_IP}/30")),
            (client, "to-proxy", format!("{GUEST_IP}/30")),
            (proxy, "to-internet", format!("{PROXY_OUTSIDE_IP}/24")),
            (internet, "to-proxy", format!("{SERVER_IP}/24")),
        ];
        for (netns, device, address) in &configure {
            ip(&["-n", netns, "addr", "add", address, "dev", device]);
            ip(&["-n", netns, "link", "set", device, "up"]);
        }
        ip(&[
            "-n",
            client,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY_IP.to_string(),
        ]);

        let rules = format!(
            "table ip domain_proxy_test {{\n\
               chain prerouting {{\n\
                 type nat hook prerouting priority dstnat; policy accept;\n\
                 iifname \"to-client\" meta l4proto tcp dnat to {GATEWAY_IP}:{DOMAIN_PROXY_PORT}\n\
               }}\n\
             }}\n"
        );
        in_netns(proxy, move || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
            let mut nft = Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("nft runs");
            nft.stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(nft.wait().unwrap().success(), "nft rejected the DNAT rule");
        });
        topology
    }

    fn names(&self) -> [&String; 3] {
        [&self.client, &self.proxy, &self.internet]
    }

    /// Opens a connection from the client namespace to `address` and sends `request`.
    fn open(&self, address: SocketAddrV4, request: &[u8]) -> TcpStream {
        let request = request.to_vec();
        in_netns(&self.client, move || {
            let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(3))
                .expect("client connects");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
                .write_all(&request)
                .expect("client sends its request");
            stream
        })
    }

    /// Sends `request` from the client namespace to `address`, half-closes, and returns
    /// everything that comes back.
    fn fetch(&self, address: SocketAddrV4, request: &[u8]) -> Vec<u8> {
        finish(self.open(address, request))
    }

    /// Asserts that a connection to `address` sending `request` is reset. When the
    /// destination alone decides, the reset may come before the request is sent or even
    /// before `connect` returns.
    fn assert_rejected(&self, address: SocketAddrV4, request: &[u8]) {
        let request = request.to_vec();
        let outcome = in_netns(&self.client, move || {
            let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(&request)?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply)?;
            Ok::<_, std::io::Error>(reply)
        });
        match outcome {
            Ok(reply) => panic!(
                "connection was not reset; reply: {}",
                String::from_utf8_lossy(&reply)
            ),
            Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for netns in self.names() {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

/// Half-closes `stream` and reads the rest of the reply.
fn finish(mut stream: TcpStream) -> Vec<u8> {
    stream
        .shutdown(Shutdown::Write)
        .expect("client half-closes");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("client reads the reply");
    reply
}

/// Servers on [`HTTP`] and [`TLS`] in the internet namespace. Each reads a connection to
/// its end and replies `port <port>: ` followed by the bytes it read. Stopped when dropped.
struct EchoServers {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    fn start(topology: &Topology) -> EchoServers {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [HTTP, TLS]
            .into_iter()
            .map(|address| {
                let listener = in_netns(&topology.internet, move || {
                    let listener = TcpListener::bind(address).expect("server binds");
                    listener.set_nonblocking(true).unwrap();
                    listener
                });
                let (accepted, stop) = (accepted.clone(), stop.clone());
                std::thread::spawn(move || serve(listener, accepted, stop))
            })
            .collect();
        EchoServers {
            accepted,
            stop,
            threads,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits up to 5 s until the servers have accepted `count` connections in all.
    fn wait_accepted(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.accepted() < count {
            assert!(
                Instant::now() < deadline,
                "servers accepted {} connections, expected {count}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve(listener: TcpListener, accepted: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    let port = listener.local_addr().unwrap().port();
    while !stop.load(Ordering::SeqCst) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(error) => panic!("server accept failed: {error}"),
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut request = Vec::new();
            if stream.read_to_end(&mut request).is_ok() {
                let mut reply = format!("port {port}: ").into_bytes();
                reply.extend(request);
                let _ = stream.write_all(&reply);
            }
        });
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn http_request(host: &str) -> Vec<u8> {
    format!("GET /path HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

/// Builds a TLS record containing a ClientHello whose `server_name` extension names `host`.
fn client_hello(host: &str) -> Vec<u8> {
    let host = host.as_bytes();
    let mut server_name = vec![0];
    server_name.extend((host.len() as u16).to_be_bytes());
    server_name.extend(host);
    let mut extension = vec![0, 0];
    extension.extend((server_name.len() as u16 + 2).to_be_bytes());
    extension.extend((server_name.len() as u16).to_be_bytes());
    extension.extend(server_name);

    let mut body = vec![3, 3];
    body.extend([0x42; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01]);
    body.extend([1, 0]);
    body.extend((extension.len() as u16).to_be_bytes());
    body.extend(extension);

    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![22, 3, 1];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

fn domains(patterns: &[&str]) -> Vec<DomainPattern> {
    patterns.iter().map(|p| p.parse().unwrap()).collect()
}

fn echo(port: u16, request: &[u8]) -> Vec<u8> {
    let mut reply = format!("port {port}: ").into_bytes();
    reply.extend(request);
    reply
}

/// Runs blocking client code off the runtime's worker threads, which run the proxy.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("client code panicked")
}

#[tokio::test(flavor = "multi_thread")]
async fn root_allowed_host_reaches_server() {
    let topology = Arc::new(Topology::create("a"));
    let servers = EchoServers::start(&topology);
    let _proxy = DomainProxy::start(&topology.proxy, domains(&["example.com"]))
        .await
        .expect("proxy starts");

    let client = topology.clone();
    blocking(move || {
        let request = http_request("Example.com:80");
        assert_eq!(client.fetch(HTTP, &request), echo(80, &request));

        let hello = client_hello("example.com");
        assert_eq!(client.fetch(TLS, &hello), echo(443, &hello));

        client.assert_rejected(HTTP, &http_request("other.com"));
        client.assert_rejected(TLS, &client_hello("other.com"));
        client.assert_rejected(HTTP, &http_request("example.com.other.com"));
        client.assert_rejected(TLS, b"SSH-2.0-OpenSSH_9.6\r\n");
    })
    .await;
    assert_eq!(servers.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn root_wildcard_matches_subdomains_only() {
    let topology = Arc::new(Topology::create("w"));
    let servers = EchoServers::start(&topology);
    let _proxy = DomainProxy::start(&topology.proxy, domains(&["*.example.com"]))
        .await
        .expect("proxy starts");

    let client = topology.clone();
    blocking(move || {
        let request = http_request("a.b.example.com");
        assert_eq!(client.fetch(HTTP, &request), echo(80, &request));

        let hello = client_hello("a.b.example.com");
        assert_eq!(client.fetch(TLS, &hello), echo(443, &hello));

        client.assert_rejected(HTTP, &http_request("example.com"));
        client.assert_rejected(TLS, &client_hello("example.com"));
    })
    .await;
    assert_eq!(servers.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn root_proxy_rejects_link_local_destination() {
    let topology = Arc::new(Topology::create("l"));
    let _proxy = DomainProxy::start(&topology.proxy, domains(&["example.com"]))
        .await
        .expect("proxy starts");

    // A guest that connects to the proxy port itself must not get a relay to the gateway.
    let client = topology.clone();
    let proxy_address = SocketAddrV4::new(GATEWAY_IP, DOMAIN_PROXY_PORT);
    blocking(move || client.assert_rejected(proxy_address, &http_request("example.com"))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn root_set_domains_applies_to_new_connections() {
    let topology = Arc::new(Topology::create("s"));
    let servers = Arc::new(EchoServers::start(&topology));
    let proxy = DomainProxy::start(&topology.proxy, domains(&["example.com"]))
        .await
        .expect("proxy starts");

    let (client, waiting) = (topology.clone(), servers.clone());
    let open = blocking(move || {
        let stream = client.open(HTTP, &http_request("example.com"));
        waiting.wait_accepted(1);
        stream
    })
    .await;

    proxy.set_domains(domains(&["other.com"]));

    let client = topology.clone();
    blocking(move || {
        client.assert_rejected(HTTP, &http_request("example.com"));

        let request = http_request("other.com");
        assert_eq!(client.fetch(HTTP, &request), echo(80, &request));

        // The connection accepted under the earlier domains keeps working.
        assert_eq!(finish(open), echo(80, &http_request("example.com")));
    })
    .await;
    assert_eq!(servers.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn root_drop_ends_open_connections() {
    let topology = Arc::new(Topology::create("d"));
    let servers = Arc::new(EchoServers::start(&topology));
    let proxy = DomainProxy::start(&topology.proxy, domains(&["example.com"]))
        .await
        .expect("proxy starts");

    let (client, waiting) = (topology.clone(), servers.clone());
    let mut open = blocking(move || {
        let stream = client.open(HTTP, &http_request("example.com"));
        waiting.wait_accepted(1);
        stream
    })
    .await;

    drop(proxy);

    let client = topology.clone();
    blocking(move || {
        // The proxy closes its end, so the client reads end of file or a reset, not a timeout.
        let mut reply = Vec::new();
        match open.read_to_end(&mut reply) {
            Ok(_) => assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply)),
            Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        }

        let address = SocketAddr::from(HTTP);
        let attempt = in_netns(&client.client, move || {
            TcpStream::connect_timeout(&address, Duration::from_secs(3))
        });
        let error = attempt.expect_err("nothing listens on the proxy port");
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    })
    .await;
}
