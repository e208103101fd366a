//! Slot pool tests against real network namespaces. They need root (CAP_NET_ADMIN) and the
//! `ip` and `nft` commands, and send traffic only to addresses inside namespaces they create.

mod guest;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use guest::{fetch, ip, TestGuest};
use hearth_network::sweep::sweep_instance;
use hearth_network::{InstanceId, PoolError, SlotPool, SlotPoolConfig};

/// A pool with its own instance ID; deletes everything of the instance when dropped, also
/// when the test fails.
struct TestPool {
    pool: SlotPool,
    _data_dir: tempfile::TempDir,
}

impl TestPool {
    async fn start(ready_target: usize) -> TestPool {
        let data_dir = tempfile::tempdir().unwrap();
        let instance = InstanceId::from_data_dir(data_dir.path()).unwrap();
        let mut config = SlotPoolConfig::new(instance);
        config.ready_target = ready_target;
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

    // A stand-in for the internet: a namespace behind a veth pair on the host, with a
    // documentation address (TEST-NET-2) that only exists inside it.
    let outside = guest_netns_name(&test.pool, "out");
    let host_end = format!("hgo{}", test.pool.instance());
    ip(&["netns", "add", &outside]);
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &outside,
    ]);
    ip(&["addr", "add", "198.51.100.1/30", "dev", &host_end]);
    ip(&["link", "set", &host_end, "up"]);
    ip(&[
        "-n",
        &outside,
        "addr",
        "add",
        "198.51.100.2/30",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &outside, "link", "set", "eth0", "up"]);
    let listener = guest::in_netns(&outside, || {
        std::net::TcpListener::bind("198.51.100.2:9000").unwrap()
    });

    let connected = guest.connect("198.51.100.2:9000".parse().unwrap());
    let accepted = connected
        .as_ref()
        .ok()
        .map(|_| listener.accept().unwrap().1);

    let _ = std::process::Command::new("ip")
        .args(["link", "del", &host_end])
        .status();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &outside])
        .status();
    assert!(
        connected.is_ok(),
        "guest could not reach the outside: {:?}",
        connected.err()
    );
    let source = accepted.unwrap().ip();
    assert_eq!(
        source,
        std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
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
