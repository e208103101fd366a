//! Port forwarding tests of the real envd binary. Each test runs envd in a network namespace
//! of its own, whose veth interface has the forward address. They check that a server on
//! 127.0.0.1 or ::1 becomes reachable on the forward address with half-close intact, that the
//! forward closes when the server does, and that a server on 0.0.0.0 gets no forward.
//!
//! They create network namespaces and veth pairs, so they need root.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Address that envd forwards on, from the benchmarking range 198.18.0.0/15. It exists only
/// inside each test's namespace.
const FORWARD_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);

/// Port envd itself listens on, free in every fresh namespace.
const ENVD_PORT: u16 = 49983;

/// Time allowed for envd to notice a listener change. It scans every 200 ms.
const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// Read timeout of test sockets, so that a lost byte or EOF fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip` with `args`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("failed to run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace with `lo` up and the forward address on a veth interface, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn create(test: &str) -> Self {
        let name = format!("hearth-pf-{}-{test}", std::process::id());
        ip(&["netns", "add", &name]);
        // From here on the guard deletes the namespace, also when a later step panics.
        let netns = Self { name };
        let address = format!("{FORWARD_ADDRESS}/32");
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns.name,
            "link",
            "add",
            "fwd0",
            "type",
            "veth",
            "peer",
            "name",
            "fwd1",
        ]);
        ip(&["-n", &netns.name, "addr", "add", &address, "dev", "fwd0"]);
        ip(&["-n", &netns.name, "link", "set", "fwd0", "up"]);
        ip(&["-n", &netns.name, "link", "set", "fwd1", "up"]);
        netns
    }

    /// Runs `work` on a thread inside the namespace. Sockets it creates stay in the
    /// namespace after the thread ends, and processes it spawns run there.
    fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).expect("failed to open the namespace");
            // SAFETY: `file` is an open network namespace descriptor for the duration of the
            // call, and setns changes only this thread, which ends after `work`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {path} failed: {}",
                std::io::Error::last_os_error()
            );
            work()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// The envd binary running inside a test namespace; killed by PID on drop.
struct Envd {
    child: Child,
}

impl Envd {
    /// Starts envd in `netns` with forwarding on `FORWARD_ADDRESS` and waits until it listens.
    fn start(netns: &TestNetns) -> Self {
        let child = netns.run(|| {
            Command::new(env!("CARGO_BIN_EXE_envd"))
                .args(["--port", &ENVD_PORT.to_string(), "--default-user", "root"])
                .env("HEARTH_ENVD_FORWARD_ADDR", FORWARD_ADDRESS.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("failed to start envd")
        });
        let envd = Self { child };
        let listening = netns.run(|| {
            connect_within(
                (Ipv4Addr::LOCALHOST, ENVD_PORT).into(),
                Duration::from_secs(10),
            )
        });
        assert!(
            listening.is_some(),
            "envd did not listen on port {ENVD_PORT} within 10 s"
        );
        envd
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forwarded(port: u16) -> SocketAddr {
    SocketAddr::from((FORWARD_ADDRESS, port))
}

/// Connects to `address` until it accepts or `limit` passes.
fn connect_within(address: SocketAddr, limit: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            return Some(stream);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Connects to `address` until the connection is refused or `limit` passes, and returns
/// whether it was refused.
fn refused_within(address: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => return true,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// Accepts one connection with a read timeout set.
fn accept(server: &TcpListener) -> (TcpStream, SocketAddr) {
    let (stream, peer) = server.accept().expect("failed to accept");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (stream, peer)
}

/// Sends a request, half-closes, and checks that the server reads EOF and can still reply.
fn check_round_trip_with_half_close(client: &mut TcpStream, accepted: &mut TcpStream) {
    client.write_all(b"ping").unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    let mut request = Vec::new();
    accepted
        .read_to_end(&mut request)
        .expect("server saw no EOF after the client's half-close");
    assert_eq!(request, b"ping");

    accepted.write_all(b"pong").unwrap();
    accepted.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("client saw no EOF after the server's half-close");
    assert_eq!(reply, b"pong");
}

/// Returns the local addresses of the LISTEN sockets on `port` in the calling thread's
/// namespace. `/proc/net` would show the namespace of the process's main thread instead.
fn listeners_on_port(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            (columns[1].ends_with(&suffix) && columns[3] == "0A").then(|| columns[1].to_owned())
        })
        .collect()
}

#[test]
fn loopback_server_is_forwarded() {
    let netns = TestNetns::create("v4");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        let mut client = connect_within(forwarded(8080), FORWARD_WAIT)
            .expect("no forward of port 8080 within 5 s");
        let (mut accepted, peer) = accept(&server);
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        check_round_trip_with_half_close(&mut client, &mut accepted);

        // Over a second, envd scans about five times and must keep its own listener open.
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let connected = TcpStream::connect_timeout(&forwarded(8080), Duration::from_secs(1));
            assert!(
                connected.is_ok(),
                "forward closed while the server listened: {connected:?}"
            );
            accept(&server);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

#[test]
fn ipv6_loopback_server_is_forwarded() {
    let netns = TestNetns::create("v6");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv6Addr::LOCALHOST, 8080)).unwrap();
        let mut client = connect_within(forwarded(8080), FORWARD_WAIT)
            .expect("no forward of port 8080 within 5 s");
        let (mut accepted, peer) = accept(&server);
        assert_eq!(peer.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        check_round_trip_with_half_close(&mut client, &mut accepted);
    });
}

#[test]
fn forward_closes_with_loopback_server() {
    let netns = TestNetns::create("close");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        let mut client = connect_within(forwarded(8080), FORWARD_WAIT)
            .expect("no forward of port 8080 within 5 s");
        let (mut accepted, _) = accept(&server);
        drop(server);

        assert!(
            refused_within(forwarded(8080), FORWARD_WAIT),
            "forward of port 8080 still open 5 s after its server closed"
        );

        // The connection relayed before the forward closed still carries data both ways.
        client.write_all(b"still open").unwrap();
        let mut request = [0u8; 10];
        accepted.read_exact(&mut request).unwrap();
        assert_eq!(&request, b"still open");
        accepted.write_all(b"yes").unwrap();
        let mut reply = [0u8; 3];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"yes");

        // With the forward gone, a server may take the port on all addresses.
        let wildcard = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080));
        assert!(
            wildcard.is_ok(),
            "binding 0.0.0.0:8080 failed after the forward closed: {wildcard:?}"
        );
    });
}

#[test]
fn wildcard_server_is_not_forwarded() {
    let netns = TestNetns::create("any");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080)).unwrap();

        // A forward of a loopback server started later shows that envd has scanned since.
        let marker = TcpListener::bind((Ipv4Addr::LOCALHOST, 8081)).unwrap();
        let marker_client = connect_within(forwarded(8081), FORWARD_WAIT);
        assert!(
            marker_client.is_some(),
            "no forward of port 8081 within 5 s"
        );
        drop(marker);

        assert_eq!(listeners_on_port(8080), vec!["00000000:1F90".to_owned()]);

        let client = connect_within(forwarded(8080), FORWARD_WAIT)
            .expect("server on 0.0.0.0:8080 unreachable");
        let (accepted, peer) = accept(&server);
        assert_eq!(accepted.local_addr().unwrap(), forwarded(8080));
        assert_eq!(peer, client.local_addr().unwrap());
    });
}
