//! Slot pool tests against real network namespaces. They need root (CAP_NET_ADMIN) and the
//! `ip`, `nft` and `conntrack` commands, and send traffic only to addresses inside
//! namespaces they create. The processes they kill are `sleep` processes they started.

mod guest;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use guest::{fetch, ip, TestGuest};
use hearth_network::egress::{self, EgressPolicy, EgressSettings};
use hearth_network::sweep::{find_netns_processes, sweep_instance};
use hearth_network::{InstanceId, PoolError, SlotPool, SlotPoolConfig};

/// A pool with its own instance ID; deletes everything of the instance when dropped, also
/// when the test fails.
struct TestPool {
    pool: SlotPool,
    _data_dir: tempfile::TempDir,
}

impl TestPool {
    async fn start(ready_target: usize) -> TestPool {
        Self::start_with_sweeps(ready_target, Duration::ZERO).await
    }

    /// Starts a pool that sweeps for orphaned slots every `sweep_interval` (never when zero).
    async fn start_with_sweeps(ready_target: usize, sweep_interval: Duration) -> TestPool {
        let data_dir = tempfile::tempdir().unwrap();
        let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
        let mut config = SlotPoolConfig::new(instance);
        config.ready_target = ready_target;
        config.sweep_interval = sweep_interval;
        let pool = SlotPool::start(config).await.expect("slot pool starts");
        TestPool {
            pool,
            _data_dir: data_dir,
        }
    }

    async fn wait_ready(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.pool.stats().ready < count {
            assert!(
                Instant::now() < deadline,
                "pool did not prepare {count} slots: {:?}",
                self.pool.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let _ = sweep_instance(self.pool.instance());
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn nft_table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .unwrap()
        .status
        .success()
}

fn guest_netns_name(pool: &SlotPool, tag: &str) -> String {
    format!("hgtest-{}-{tag}", pool.instance())
}

/// Device and inode number of a network namespace file.
fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// Number of the host's conntrack entries with `address` as original source (`-s`) or
/// original destination (`-d`).
fn conntrack_entries(direction: &str, address: Ipv4Addr) -> usize {
    let output = Command::new("conntrack")
        .args(["-L", direction, &address.to_string()])
        .output()
        .expect("conntrack runs");
    assert!(
        output.status.success(),
        "conntrack -L {direction} {address}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).lines().count()
}

/// A `sleep` process inside a network namespace, standing in for a VMM. Killed when
/// dropped, also when the test fails.
struct ProcessInNetns {
    child: Child,
}

impl ProcessInNetns {
    /// Starts `sleep 1000` in `netns` and waits until it runs there.
    fn start(netns: &str) -> ProcessInNetns {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "sleep", "1000"])
            .spawn()
            .expect("ip netns exec starts");
        let process = ProcessInNetns { child };

        // `ip netns exec` joins the namespace and then replaces itself with `sleep`.
        let expected = namespace_id(&Path::new("/run/netns").join(netns));
        let deadline = Instant::now() + Duration::from_secs(10);
        while namespace_id(&process.netns_path()) != expected || !process.runs_sleep() {
            assert!(
                Instant::now() < deadline,
                "process {} did not start in {netns}",
                process.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn netns_path(&self) -> std::path::PathBuf {
        Path::new("/proc")
            .join(self.pid().to_string())
            .join("ns/net")
    }

    fn runs_sleep(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))
            .is_ok_and(|name| name.trim() == "sleep")
    }

    /// Returns whether the process has exited because of SIGKILL. Does not wait: a killed
    /// process has already exited when the sweep returns.
    fn was_killed(&mut self) -> bool {
        match self.child.try_wait().unwrap() {
            Some(status) => status.signal() == Some(libc::SIGKILL),
            None => false,
        }
    }
}

impl Drop for ProcessInNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in for the internet: a namespace behind a veth pair on the host, with a
/// documentation address (TEST-NET-2) that only exists inside it. Deleted when dropped.
struct OutsideHost {
    netns: String,
    host_end: String,
    // Every outside host has the same addresses, so tests that run at the same time would
    // route into each other's: one exists at a time.
    _exclusive: std::sync::MutexGuard<'static, ()>,
}

static OUTSIDE_HOST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl OutsideHost {
    /// Address of the host's end of the veth pair.
    const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    /// Address of the outside host.
    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn create(pool: &SlotPool) -> OutsideHost {
        let exclusive = OUTSIDE_HOST_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outside = OutsideHost {
            netns: guest_netns_name(pool, "out"),
            host_end: format!("hgo{}", pool.instance()),
            _exclusive: exclusive,
        };
        let netns = outside.netns.as_str();
        let host_end = outside.host_end.as_str();
        ip(&["netns", "add", netns]);
        ip(&[
            "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", Self::HOST_IP),
            "dev",
            host_end,
        ]);
        ip(&["link", "set", host_end, "up"]);
        let inside = format!("{}/30", Self::IP);
        ip(&["-n", netns, "addr", "add", &inside, "dev", "eth0"]);
        ip(&["-n", netns, "link", "set", "eth0", "up"]);
        outside
    }

    fn listen(&self, port: u16) -> std::net::TcpListener {
        guest::in_netns(&self.netns, move || {
            std::net::TcpListener::bind((Self::IP, port)).unwrap()
        })
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Creates a namespace and host veth with the instance's names for slot `index`, as if
/// the instance's pool had created them. The pool's sweep or the test's final sweep deletes them.
fn create_stray_slot(instance: &InstanceId, index: u32) -> (String, String) {
    let netns = instance.netns_name(index);
    let host_veth = instance.host_veth_name(index);
    ip(&["netns", "add", &netns]);
    ip(&[
        "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
    ]);
    (netns, host_veth)
}

#[tokio::test(flavor = "multi_thread")]
async fn root_host_reaches_guest_ports() {
    let test = TestPool::start(1).await;
    test.wait_ready(1).await;

    let started = Instant::now();
    let slot = test.pool.acquire().await.unwrap();
    let acquire_time = started.elapsed();
    println!("acquire from a ready pool: {acquire_time:?}");
    assert!(
        acquire_time < Duration::from_millis(5),
        "acquire took {acquire_time:?}"
    );

    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));
    guest.serve(8080, "guest-8080");
    guest.serve(49983, "guest-envd");

    let reply = fetch(SocketAddr::from((slot.guest_route_ip, 8080))).unwrap();
    assert_eq!(reply, format!("guest-8080 {}", slot.host_ip));
    let reply = fetch(SocketAddr::from((slot.guest_route_ip, 49983))).unwrap();
    assert_eq!(reply, format!("guest-envd {}", slot.host_ip));

    drop(guest);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_two_slots_coexist_isolated() {
    let test = TestPool::start(2).await;
    let first = test.pool.acquire().await.unwrap();
    let second = test.pool.acquire().await.unwrap();
    assert_ne!(first.guest_route_ip, second.guest_route_ip);
    assert_ne!(first.netns, second.netns);

    let guest_a = TestGuest::attach(&first, &guest_netns_name(&test.pool, "a"));
    let guest_b = TestGuest::attach(&second, &guest_netns_name(&test.pool, "b"));
    guest_a.serve(8000, "first");
    guest_b.serve(8000, "second");

    let reply = fetch(SocketAddr::from((first.guest_route_ip, 8000))).unwrap();
    assert!(reply.starts_with("first "), "{reply}");
    let reply = fetch(SocketAddr::from((second.guest_route_ip, 8000))).unwrap();
    assert!(reply.starts_with("second "), "{reply}");

    // One sandbox cannot reach another through the host.
    let cross = guest_a.connect(SocketAddr::from((second.guest_route_ip, 8000)));
    assert!(
        cross.is_err(),
        "guest of slot {} reached slot {}",
        first.index,
        second.index
    );

    drop((guest_a, guest_b));
    test.pool.release(first).await.unwrap();
    test.pool.release(second).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_guest_cannot_open_host_connections() {
    let test = TestPool::start(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));

    let host_listener = std::net::TcpListener::bind((slot.host_ip, 0)).unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let attempt = guest.connect(SocketAddr::from((slot.host_ip, port)));
    assert!(
        attempt.is_err(),
        "guest opened a connection to the host at {}:{port}",
        slot.host_ip
    );

    drop(guest);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_guest_egress_is_masqueraded() {
    let test = TestPool::start(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));

    let outside = OutsideHost::create(&test.pool);
    let listener = outside.listen(9000);

    let connected = guest.connect(SocketAddr::from((OutsideHost::IP, 9000)));
    let accepted = connected
        .as_ref()
        .ok()
        .map(|_| listener.accept().unwrap().1);

    drop(outside);
    assert!(
        connected.is_ok(),
        "guest could not reach the outside: {:?}",
        connected.err()
    );
    let source = accepted.unwrap().ip();
    assert_eq!(
        source,
        std::net::IpAddr::V4(OutsideHost::HOST_IP),
        "source was not masqueraded"
    );

    drop(guest);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_release_leaves_nothing() {
    let test = TestPool::start(0).await;
    let instance = test.pool.instance().clone();
    let slot = test.pool.acquire().await.unwrap();
    let host_veth = instance.host_veth_name(slot.index);
    assert!(netns_exists(&slot.netns));
    assert!(link_exists(&host_veth));

    test.pool.release(slot.clone()).await.unwrap();
    assert!(!netns_exists(&slot.netns), "namespace {} left", slot.netns);
    assert!(!link_exists(&host_veth), "interface {host_veth} left");
    assert_eq!(test.pool.stats().in_use, 0);

    let second_release = test.pool.release(slot).await;
    assert!(
        matches!(second_release, Err(PoolError::UnknownSlot { .. })),
        "{second_release:?}"
    );

    test.pool.shutdown().await.unwrap();
    assert!(
        !nft_table_exists(&instance.nft_table()),
        "nft table left after shutdown"
    );
    assert!(matches!(test.pool.acquire().await, Err(PoolError::Closed)));
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sweep_removes_only_own_leftovers() {
    let data_dir = tempfile::tempdir().unwrap();
    let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
    let mut config = SlotPoolConfig::new(instance.clone());
    config.ready_target = 3;

    // Another instance's namespace must survive the sweep.
    let other = TestPool::start(1).await;
    other.wait_ready(1).await;
    let other_slot = other.pool.acquire().await.unwrap();

    let pool = SlotPool::start(config.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().ready < 3 {
        assert!(
            Instant::now() < deadline,
            "pool did not fill: {:?}",
            pool.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dropping the pool without shutdown leaves its slots, as a crash would.
    drop(pool);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(netns_exists(&instance.netns_name(0)));

    let restarted = SlotPool::start(config).await.unwrap();
    restarted.shutdown().await.unwrap();
    let report = sweep_instance(&instance).unwrap();
    assert_eq!(report.namespaces, 0, "second sweep found namespaces");
    for index in 0..3 {
        assert!(
            !netns_exists(&instance.netns_name(index)),
            "namespace {index} left"
        );
        assert!(
            !link_exists(&instance.host_veth_name(index)),
            "interface {index} left"
        );
    }
    assert!(!nft_table_exists(&instance.nft_table()));

    assert!(
        netns_exists(&other_slot.netns),
        "sweep removed another instance's namespace"
    );
    other.pool.release(other_slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sweep_counts_leftovers() {
    let data_dir = tempfile::tempdir().unwrap();
    let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
    let netns = instance.netns_name(7);
    let host_veth = instance.host_veth_name(7);
    ip(&["netns", "add", &netns]);
    ip(&[
        "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
    ]);

    let report = sweep_instance(&instance).unwrap();
    assert_eq!(report.namespaces, 1);
    assert_eq!(report.interfaces, 1);
    assert!(!report.nft_table);
    assert!(!netns_exists(&netns));
    assert!(!link_exists(&host_veth));
}

#[tokio::test(flavor = "multi_thread")]
async fn root_instances_do_not_collide() {
    let first = TestPool::start(1).await;
    let second = TestPool::start(1).await;
    assert_ne!(first.pool.instance(), second.pool.instance());
    assert!(
        !first.pool.subnet().overlaps(&second.pool.subnet()),
        "{} overlaps {}",
        first.pool.subnet(),
        second.pool.subnet()
    );
    assert!(nft_table_exists(&first.pool.instance().nft_table()));
    assert!(nft_table_exists(&second.pool.instance().nft_table()));

    // The same subnet or the same instance cannot be taken twice.
    let mut same_subnet = SlotPoolConfig::new(InstanceId::parse("fffff0").unwrap());
    same_subnet.subnet = Some(first.pool.subnet());
    let error = SlotPool::start(same_subnet)
        .await
        .err()
        .expect("held subnet rejected");
    assert!(error.to_string().contains("subnet"), "{error}");
    let duplicate = SlotPool::start(SlotPoolConfig::new(first.pool.instance().clone())).await;
    assert!(
        matches!(duplicate, Err(PoolError::InstanceHeld(_))),
        "{:?}",
        duplicate.err()
    );

    let a = first.pool.acquire().await.unwrap();
    let b = second.pool.acquire().await.unwrap();
    first.pool.shutdown().await.unwrap();
    assert!(
        netns_exists(&b.netns),
        "shutdown of one instance removed the other's slot"
    );
    assert!(nft_table_exists(&second.pool.instance().nft_table()));
    assert!(!netns_exists(&a.netns));
    second.pool.release(b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_slot_creation_time() {
    let test = TestPool::start(0).await;
    let count = 10;
    let started = Instant::now();
    let mut slots = Vec::new();
    for _ in 0..count {
        slots.push(test.pool.acquire().await.unwrap());
    }
    let per_slot = started.elapsed() / count;
    println!("slot creation without a ready pool: {per_slot:?} per slot ({count} slots)");

    let started = Instant::now();
    for slot in slots {
        test.pool.release(slot).await.unwrap();
    }
    println!("slot release: {:?} per slot", started.elapsed() / count);
    assert!(
        per_slot < Duration::from_secs(1),
        "slot creation took {per_slot:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn root_restart_kills_processes_in_slots() {
    let data_dir = tempfile::tempdir().unwrap();
    let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
    let mut config = SlotPoolConfig::new(instance.clone());
    config.ready_target = 0;
    config.sweep_interval = Duration::ZERO;

    let pool = SlotPool::start(config.clone()).await.unwrap();
    let slot = pool.acquire().await.unwrap();
    let mut vmm = ProcessInNetns::start(&slot.netns);
    // Dropping the pool without releasing the slot leaves it, as a crash would.
    drop(pool);

    let restarted = SlotPool::start(config).await.unwrap();
    let killed = vmm.was_killed();
    restarted.shutdown().await.unwrap();
    assert!(
        killed,
        "process {} in {} survived the restart",
        vmm.pid(),
        slot.netns
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sweep_counts_killed_processes() {
    let data_dir = tempfile::tempdir().unwrap();
    let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
    let (netns, host_veth) = create_stray_slot(&instance, 3);
    let mut first = ProcessInNetns::start(&netns);
    let mut second = ProcessInNetns::start(&netns);

    let report = sweep_instance(&instance);
    let first_killed = first.was_killed();
    let second_killed = second.was_killed();
    let report = report.unwrap();
    assert_eq!(report.processes, 2);
    assert_eq!(report.namespaces, 1);
    assert_eq!(report.interfaces, 1);
    assert!(first_killed, "process {} survived the sweep", first.pid());
    assert!(second_killed, "process {} survived the sweep", second.pid());
    assert!(!netns_exists(&netns), "namespace {netns} left");
    assert!(!link_exists(&host_veth), "interface {host_veth} left");
}

#[tokio::test(flavor = "multi_thread")]
async fn root_process_search_skips_own_namespace() {
    let test = TestPool::start(0).await;
    let slot = test.pool.acquire().await.unwrap();
    let vmm = ProcessInNetns::start(&slot.netns);

    // A name under /run/netns for the namespace this test runs in, as if a slot's name
    // pointed at the host's namespace. Deleting the name only unmounts it.
    let own = guest_netns_name(&test.pool, "self");
    ip(&["netns", "attach", &own, &std::process::id().to_string()]);
    let found = find_netns_processes(&[own.clone(), slot.netns.clone()]);
    ip(&["netns", "del", &own]);

    let found = found.unwrap();
    let pids: Vec<u32> = found.iter().map(|process| process.pid).collect();
    assert_eq!(pids, vec![vmm.pid()], "{found:?}");
    assert_eq!(found[0].netns, slot.netns);

    drop(vmm);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sweep_orphans_removes_unknown_slots() {
    let test = TestPool::start(1).await;
    let instance = test.pool.instance().clone();
    test.wait_ready(1).await;
    let in_use = test.pool.acquire().await.unwrap();
    test.wait_ready(1).await;
    let ready_netns: Vec<String> = (0..4)
        .map(|index| instance.netns_name(index))
        .filter(|name| netns_exists(name) && *name != in_use.netns)
        .collect();
    assert_eq!(ready_netns.len(), 1, "{ready_netns:?}");

    let (stray_netns, stray_veth) = create_stray_slot(&instance, 40);
    let mut stray_vmm = ProcessInNetns::start(&stray_netns);
    let mut in_use_vmm = ProcessInNetns::start(&in_use.netns);

    let report = test.pool.sweep_orphans().await.unwrap();
    assert_eq!(report.processes, 1);
    assert_eq!(report.namespaces, 1);
    assert_eq!(report.interfaces, 1);
    assert!(stray_vmm.was_killed(), "process in {stray_netns} survived");
    assert!(!netns_exists(&stray_netns), "namespace {stray_netns} left");
    assert!(!link_exists(&stray_veth), "interface {stray_veth} left");

    assert!(
        !in_use_vmm.was_killed(),
        "process in the slot in use was killed"
    );
    assert!(netns_exists(&in_use.netns), "slot in use was deleted");
    assert!(
        link_exists(&instance.host_veth_name(in_use.index)),
        "veth of the slot in use was deleted"
    );
    assert!(netns_exists(&ready_netns[0]), "ready slot was deleted");
    let stats = test.pool.stats();
    assert_eq!((stats.ready, stats.in_use), (1, 1), "{stats:?}");

    let report = test.pool.sweep_orphans().await.unwrap();
    assert_eq!(report, Default::default(), "second sweep removed something");

    drop(in_use_vmm);
    test.pool.release(in_use).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sweep_orphans_replaces_ready_slot_with_process() {
    let test = TestPool::start(1).await;
    let instance = test.pool.instance().clone();
    test.wait_ready(1).await;
    let ready_netns = instance.netns_name(0);
    assert!(netns_exists(&ready_netns));
    let mut intruder = ProcessInNetns::start(&ready_netns);

    let report = test.pool.sweep_orphans().await.unwrap();
    assert_eq!(report.processes, 1);
    assert_eq!(report.namespaces, 1);
    assert!(intruder.was_killed(), "process in the ready slot survived");

    // The fill task prepares a fresh slot, which contains no process.
    test.wait_ready(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let found = find_netns_processes(std::slice::from_ref(&slot.netns)).unwrap();
    assert!(found.is_empty(), "{found:?}");
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_periodic_sweep_spares_active_slots() {
    let test = TestPool::start_with_sweeps(2, Duration::from_millis(20)).await;
    let instance = test.pool.instance().clone();
    let (stray_netns, stray_veth) = create_stray_slot(&instance, 60);

    // Slots are acquired, checked and released while sweeps run in the background; none
    // of them may lose its namespace or veth to a sweep.
    for round in 0..30 {
        let slot = test.pool.acquire().await.unwrap();
        let host_veth = instance.host_veth_name(slot.index);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            netns_exists(&slot.netns),
            "round {round}: {} deleted",
            slot.netns
        );
        assert!(
            link_exists(&host_veth),
            "round {round}: {host_veth} deleted"
        );
        test.pool.release(slot).await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    while netns_exists(&stray_netns) || link_exists(&stray_veth) {
        assert!(
            Instant::now() < deadline,
            "periodic sweep did not remove {stray_netns} and {stray_veth}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn root_release_clears_conntrack_entries() {
    let test = TestPool::start(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));
    let outside = OutsideHost::create(&test.pool);
    let listener = outside.listen(9000);

    // A flow the host NATs for the slot: original source is the slot's address.
    let outbound = guest.connect(SocketAddr::from((OutsideHost::IP, 9000)));
    assert!(
        outbound.is_ok(),
        "guest could not reach the outside: {outbound:?}"
    );
    let _accepted = listener.accept().unwrap();
    // A connection from the host to the slot: original destination is the slot's address.
    guest.serve(8080, "guest-8080");
    fetch(SocketAddr::from((slot.guest_route_ip, 8080))).unwrap();

    let from_slot = conntrack_entries("-s", slot.guest_route_ip);
    let to_slot = conntrack_entries("-d", slot.guest_route_ip);
    drop(outbound);
    drop(guest);
    assert!(
        from_slot > 0,
        "no conntrack entry from {}",
        slot.guest_route_ip
    );
    assert!(to_slot > 0, "no conntrack entry to {}", slot.guest_route_ip);

    // The outside host stays until after the release, because deleting its veth would
    // flush the masqueraded entries by itself.
    let address = slot.guest_route_ip;
    let released = test.pool.release(slot).await;
    let from_slot = conntrack_entries("-s", address);
    let to_slot = conntrack_entries("-d", address);
    drop(outside);
    released.unwrap();
    assert_eq!(from_slot, 0, "entries from {address} left");
    assert_eq!(to_slot, 0, "entries to {address} left");
}

/// Applies `policy` to `slot` the way the node agent does.
async fn apply_policy(slot: &hearth_network::Slot, policy: EgressPolicy, reset_connections: bool) {
    let slot = slot.clone();
    tokio::task::spawn_blocking(move || egress::apply(&slot, &policy, reset_connections))
        .await
        .unwrap()
        .expect("egress rules load");
}

fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
    let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
    let deny: Vec<String> = deny.iter().map(|s| (*s).to_owned()).collect();
    EgressPolicy::from_settings(&EgressSettings {
        allow_out: &allow,
        deny_out: &deny,
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn root_egress_policy_allows_and_denies() {
    let test = TestPool::start(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));
    let outside = OutsideHost::create(&test.pool);
    let _listener = outside.listen(9000);
    let target = SocketAddr::from((OutsideHost::IP, 9000));
    assert!(guest.connect(target).is_ok(), "open policy");

    apply_policy(&slot, policy(&[], &[&OutsideHost::IP.to_string()]), false).await;
    let denied = guest.connect(target);
    assert_eq!(
        denied.as_ref().err().map(std::io::Error::kind),
        Some(std::io::ErrorKind::ConnectionRefused),
        "a denied address gets a reset: {denied:?}"
    );

    let allowed = format!("{}/32", OutsideHost::IP);
    apply_policy(&slot, policy(&[&allowed], &["0.0.0.0/0"]), false).await;
    assert!(guest.connect(target).is_ok(), "allowOut wins over denyOut");

    apply_policy(&slot, EgressPolicy::default(), false).await;
    assert!(guest.connect(target).is_ok(), "open policy again");

    drop(outside);
    drop(guest);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_egress_update_cuts_open_connections() {
    use std::io::{Read, Write};

    let test = TestPool::start(1).await;
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));
    let outside = OutsideHost::create(&test.pool);
    let listener = outside.listen(9000);
    let mut stream = guest
        .connect(SocketAddr::from((OutsideHost::IP, 9000)))
        .unwrap();
    let (mut server_side, _) = listener.accept().unwrap();
    stream.write_all(b"before").unwrap();
    let mut buffer = [0u8; 6];
    server_side.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"before");

    apply_policy(&slot, policy(&[], &["0.0.0.0/0"]), true).await;
    // The next packet is judged by the new rules and gets a reset.
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = stream.write_all(b"after");
    let mut reply = [0u8; 1];
    let outcome = stream.read(&mut reply);
    assert!(
        matches!(&outcome, Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset),
        "the open connection was not cut: {outcome:?}"
    );

    drop(outside);
    drop(guest);
    test.pool.release(slot).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_dns_goes_to_the_chosen_resolver() {
    let data_dir = tempfile::tempdir().unwrap();
    let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
    let mut config = SlotPoolConfig::new(instance);
    config.ready_target = 1;
    config.sweep_interval = Duration::ZERO;
    config.dns_server = OutsideHost::IP;
    let test = TestPool {
        pool: SlotPool::start(config).await.unwrap(),
        _data_dir: data_dir,
    };
    let slot = test.pool.acquire().await.unwrap();
    let guest = TestGuest::attach(&slot, &guest_netns_name(&test.pool, "a"));
    let outside = OutsideHost::create(&test.pool);
    let resolver = guest::in_netns(&outside.netns, || {
        let socket = std::net::UdpSocket::bind((OutsideHost::IP, 53)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
    });

    // The guest queries a server that does not exist, and the query reaches the resolver.
    guest::in_netns(&guest.netns, || {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        socket.send_to(b"query", ("192.0.2.53", 53)).unwrap();
    });
    let mut buffer = [0u8; 16];
    let (length, _) = resolver
        .recv_from(&mut buffer)
        .expect("the resolver got the query");
    assert_eq!(&buffer[..length], b"query");

    drop(outside);
    drop(guest);
    test.pool.release(slot).await.unwrap();
}
