//! A stand-in guest for the slot tests: a network namespace whose tap `gtap` has the
//! guest address and MAC, joined to the slot's `tap0` by two threads that copy Ethernet
//! frames between the two tap file descriptors, as a VMM's virtio-net device does.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hearth_network::Slot;
use hearth_types::guest::{GATEWAY_IP, GUEST_IP, GUEST_MAC, GUEST_PREFIX_LEN, TAP_NAME};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _padding: [u8; 22],
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `work` on a thread inside the network namespace `netns`.
pub fn in_netns<T: Send + 'static>(netns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("namespace exists");
        // SAFETY: `file` is an open namespace file descriptor for the duration of the call,
        // and setns only changes the calling thread, which exits after `work`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .expect("namespace thread panicked")
}

/// Opens (creating if needed) the tap `name` in the calling thread's namespace.
fn open_tap(name: &str) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut request = InterfaceRequest {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _padding: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `request` is a properly laid out `struct ifreq` prefix that outlives the call,
    // and the kernel writes at most `sizeof(struct ifreq)` (40 bytes) into it.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETIFF,
            &mut request as *mut InterfaceRequest,
        )
    };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Waits up to 100 ms for `file` to become readable.
fn readable(file: &File) -> bool {
    let mut poll = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` points to one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut poll, 1, 100) };
    rc > 0 && poll.revents & libc::POLLIN != 0
}

fn copy_frames(mut from: File, mut to: File, stop: Arc<AtomicBool>) {
    let mut frame = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if !readable(&from) {
            continue;
        }
        let Ok(length) = from.read(&mut frame) else {
            return;
        };
        // A frame the peer cannot take (for example while it is being deleted) is dropped.
        let _ = to.write(&frame[..length]);
    }
}

/// A guest attached to a slot; deleted when dropped.
pub struct TestGuest {
    pub netns: String,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

impl TestGuest {
    /// Creates the guest namespace `netns` and joins it to `slot`'s tap.
    pub fn attach(slot: &Slot, netns: &str) -> TestGuest {
        ip(&["netns", "add", netns]);
        let guest_tap = in_netns(netns, || open_tap("gtap"));
        let guest_prefix = format!("{GUEST_IP}/{GUEST_PREFIX_LEN}");
        let gateway = GATEWAY_IP.to_string();
        ip(&["-n", netns, "link", "set", "lo", "up"]);
        ip(&["-n", netns, "link", "set", "gtap", "address", GUEST_MAC]);
        ip(&["-n", netns, "addr", "add", &guest_prefix, "dev", "gtap"]);
        ip(&["-n", netns, "link", "set", "gtap", "up"]);
        ip(&["-n", netns, "route", "add", "default", "via", &gateway]);

        let slot_tap = in_netns(&slot.netns, || open_tap(TAP_NAME));
        let stop = Arc::new(AtomicBool::new(false));
        let relays = vec![
            spawn_copy(
                guest_tap.try_clone().unwrap(),
                slot_tap.try_clone().unwrap(),
                stop.clone(),
            ),
            spawn_copy(slot_tap, guest_tap, stop.clone()),
        ];
        TestGuest {
            netns: netns.to_owned(),
            stop,
            relays,
        }
    }

    /// Starts a TCP server on the guest address at `port` that replies to each connection with
    /// `"<reply> <peer address>"` and closes it.
    pub fn serve(&self, port: u16, reply: &str) {
        let listener = in_netns(&self.netns, move || {
            TcpListener::bind((GUEST_IP, port)).expect("bind guest port")
        });
        let reply = reply.to_owned();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let peer = stream
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = stream.write_all(format!("{reply} {peer}").as_bytes());
            }
        });
    }

    /// Opens a TCP connection from inside the guest.
    pub fn connect(&self, address: SocketAddr) -> std::io::Result<TcpStream> {
        in_netns(&self.netns, move || {
            TcpStream::connect_timeout(&address, Duration::from_secs(2))
        })
    }
}

fn spawn_copy(from: File, to: File, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || copy_frames(from, to, stop))
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Reads everything a server sends on a new connection to `address`.
pub fn fetch(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}
