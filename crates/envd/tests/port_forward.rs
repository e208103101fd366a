//! Port forwarding tests of the real envd binary. Each test runs envd in a network namespace
//! of its own, whose veth interface has the forward address, and requests forwards as the
//! proxy does, with `POST /hearth/port-forward/{port}` to envd at the forward address.
//! They check that a server on 127.0.0.1 or ::1 becomes reachable on the forward address
//! with half-close intact, and that the forward closes when the server does. They also
//! check that a server on 0.0.0.0 gets no forward, and the route's responses for ports
//! without a loopback server.
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

/// Time allowed for envd to close a forward after its server closed. It checks every second.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Time allowed for a connection to a forward that envd reported open. The forward listens
/// before envd responds, so the first attempt should succeed.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

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
        Self::start_with_forwarding(netns, true)
    }

    /// Starts envd in `netns`, with forwarding on `FORWARD_ADDRESS` when `forwarding` is
    /// set, and waits until it listens. envd is not PID 1 here, so without the variable
    /// forwarding is off.
    fn start_with_forwarding(netns: &TestNetns, forwarding: bool) -> Self {
        let child = netns.run(move || {
            let mut command = Command::new(env!("CARGO_BIN_EXE_envd"));
            command
                .args(["--port", &ENVD_PORT.to_string(), "--default-user", "root"])
                .env_remove("HEARTH_ENVD_FORWARD_ADDR")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if forwarding {
                command.env("HEARTH_ENVD_FORWARD_ADDR", FORWARD_ADDRESS.to_string());
            }
            command.spawn().expect("failed to start envd")
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

/// Sends an HTTP/1.1 request to envd at the forward address, as the proxy reaches it, and
/// returns the status code and the body.
fn envd_request(method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&forwarded(ENVD_PORT), IO_TIMEOUT)
        .expect("failed to connect to envd at the forward address");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {FORWARD_ADDRESS}:{ENVD_PORT}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("envd sent no complete response");

    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("response without a header end: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("response without a status code: {head:?}"));
    (status, body.to_owned())
}

/// Requests a forward of `port` (sent as written, so that invalid values can be tested) and
/// returns the status code and the JSON body.
fn request_forward(port: &str) -> (u16, serde_json::Value) {
    let (status, body) = envd_request("POST", &format!("/hearth/port-forward/{port}"), "", "");
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|err| panic!("response body {body:?} is not JSON: {err}"));
    (status, json)
}

/// Requests a forward of `port` and checks that envd reports it forwarded.
fn expect_forwarded(port: u16) {
    let (status, body) = request_forward(&port.to_string());
    assert_eq!(status, 200, "body {body}");
    assert_eq!(body["forwarded"], true, "body {body}");
}

/// Returns the voluntary context switches of `pid`'s main thread, which runs envd's
/// runtime. The count grows each time the thread sleeps, so it grows with every timer.
fn voluntary_context_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("no voluntary_ctxt_switches line in the thread status")
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
        expect_forwarded(8080);

        let mut client = connect_within(forwarded(8080), CONNECT_WAIT)
            .expect("forward of port 8080 refused after envd reported it open");
        let (mut accepted, peer) = accept(&server);
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        check_round_trip_with_half_close(&mut client, &mut accepted);

        // A second request finds the forward open and keeps it.
        expect_forwarded(8080);

        // Over 2.5 s, envd checks its forwards at least twice and must keep this one open.
        let deadline = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < deadline {
            let connected = TcpStream::connect_timeout(&forwarded(8080), Duration::from_secs(1));
            assert!(
                connected.is_ok(),
                "forward closed while the server listened: {connected:?}"
            );
            accept(&server);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

#[test]
fn ipv6_loopback_server_is_forwarded() {
    let netns = TestNetns::create("v6");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv6Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);

        let mut client = connect_within(forwarded(8080), CONNECT_WAIT)
            .expect("forward of port 8080 refused after envd reported it open");
        let (mut accepted, peer) = accept(&server);
        assert_eq!(peer.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        check_round_trip_with_half_close(&mut client, &mut accepted);
    });
}

#[test]
fn loopback_port_is_refused_before_request() {
    let netns = TestNetns::create("lazy");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let _server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        std::thread::sleep(Duration::from_millis(500));

        let connected = TcpStream::connect_timeout(&forwarded(8080), Duration::from_secs(1));
        let refused = matches!(&connected, Err(err) if err.kind() == ErrorKind::ConnectionRefused);
        assert!(
            refused,
            "port 8080 reachable without a forward request: {connected:?}"
        );
        assert_eq!(listeners_on_port(8080), vec!["0100007F:1F90".to_owned()]);
    });
}

#[test]
fn forward_closes_with_loopback_server() {
    let netns = TestNetns::create("close");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);
        let mut client = connect_within(forwarded(8080), CONNECT_WAIT)
            .expect("forward of port 8080 refused after envd reported it open");
        let (mut accepted, _) = accept(&server);
        drop(server);

        assert!(
            refused_within(forwarded(8080), CLOSE_WAIT),
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
fn forward_reopens_after_server_restart() {
    let netns = TestNetns::create("again");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);
        drop(server);
        assert!(
            refused_within(forwarded(8080), CLOSE_WAIT),
            "forward of port 8080 still open 5 s after its server closed"
        );

        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);
        let mut client = connect_within(forwarded(8080), CONNECT_WAIT)
            .expect("second forward of port 8080 refused after envd reported it open");
        let (mut accepted, _) = accept(&server);
        check_round_trip_with_half_close(&mut client, &mut accepted);
    });
}

#[test]
fn idle_envd_stops_checking() {
    let netns = TestNetns::create("idle");
    let envd = Envd::start(&netns);
    let pid = envd.child.id();
    netns.run(move || {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);
        drop(server);
        assert!(
            refused_within(forwarded(8080), CLOSE_WAIT),
            "forward of port 8080 still open 5 s after its server closed"
        );

        // The check that closed the last forward ends the check task. After it, envd's
        // runtime thread must sleep through 3 s without a wakeup.
        std::thread::sleep(Duration::from_millis(500));
        let before = voluntary_context_switches(pid);
        std::thread::sleep(Duration::from_secs(3));
        let after = voluntary_context_switches(pid);
        assert_eq!(
            after - before,
            0,
            "envd's runtime thread woke {} times in 3 s without forwards",
            after - before
        );
    });
}

#[test]
fn wildcard_server_is_not_forwarded() {
    let netns = TestNetns::create("any");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let server = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080)).unwrap();
        let (status, body) = request_forward("8080");
        assert_eq!(status, 200, "body {body}");
        assert_eq!(body["forwarded"], false, "body {body}");
        assert_eq!(listeners_on_port(8080), vec!["00000000:1F90".to_owned()]);

        let client = connect_within(forwarded(8080), CONNECT_WAIT)
            .expect("server on 0.0.0.0:8080 unreachable");
        let (accepted, peer) = accept(&server);
        assert_eq!(accepted.local_addr().unwrap(), forwarded(8080));
        assert_eq!(peer, client.local_addr().unwrap());
    });
}

#[test]
fn port_without_loopback_server_is_404() {
    let netns = TestNetns::create("none");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let (status, body) = request_forward("8080");
        assert_eq!(status, 404, "body {body}");
        assert_eq!(body["code"], 404, "body {body}");
        assert_eq!(
            body["message"], "nothing listens on port 8080",
            "body {body}"
        );

        // Other loopback addresses are not forwarded.
        let _server = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 8081)).unwrap();
        let (status, body) = request_forward("8081");
        assert_eq!(status, 404, "body {body}");
        assert_eq!(listeners_on_port(8081), vec!["0200007F:1F91".to_owned()]);
    });
}

#[test]
fn invalid_ports_are_400() {
    let netns = TestNetns::create("bad");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        for port in ["0", "49983", "http", "65536", "-1"] {
            let (status, body) = request_forward(port);
            assert_eq!(status, 400, "port {port}: body {body}");
            assert_eq!(body["code"], 400, "port {port}: body {body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "port {port}: body {body}"
            );
        }
    });
}

#[test]
fn route_needs_no_access_token() {
    let netns = TestNetns::create("token");
    let _envd = Envd::start(&netns);
    netns.run(|| {
        let (status, body) = envd_request(
            "POST",
            "/init",
            "Content-Type: application/json\r\n",
            r#"{"accessToken":"secret-token"}"#,
        );
        assert_eq!(status, 204, "body {body}");
        let (status, body) = envd_request("GET", "/envs", "", "");
        assert_eq!(status, 401, "envd accepted /envs without its token: {body}");

        let _server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        expect_forwarded(8080);
        assert!(
            connect_within(forwarded(8080), CONNECT_WAIT).is_some(),
            "forward of port 8080 refused after envd reported it open"
        );
    });
}

#[test]
fn route_is_404_with_forwarding_off() {
    let netns = TestNetns::create("off");
    let _envd = Envd::start_with_forwarding(&netns, false);
    netns.run(|| {
        let _server = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
        let (status, body) = request_forward("8080");
        assert_eq!(status, 404, "body {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("forwarding of loopback servers is off"),
            "body {body}"
        );
        assert_eq!(listeners_on_port(8080), vec!["0100007F:1F90".to_owned()]);
    });
}
