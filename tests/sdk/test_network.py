"""Sandbox networking through the SDK: isolation, egress policy, DNS, tokens, ports.

Every destination is a test host that this module creates (see net_helpers.py): the
"internet" namespace, a service on the host, other sandboxes. The server must run with
`--dns-server 198.18.0.2` (scripts/test.sh starts it so). Every check that a connection
fails is paired with one that the same probe succeeds somewhere it should, so a broken
probe cannot pass for a working rule.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Iterator

import httpx
import pytest
from e2b import Sandbox

from net_helpers import (
    INET_HOST_IP,
    INET_IP,
    INET_IP_2,
    LINK_LOCAL_IP,
    InternetHost,
    host_ipv4_addresses,
    install_probe,
    probe,
    slot_addresses,
    wait_for,
)
from sdk_helpers import REQUEST_TIMEOUT, proxy_get_by_host, routing_headers, sandbox_url

TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"

# Opens a connection, then sends a request on it once /tmp/go exists; writes the outcome.
HELD_CONNECTION = """
import os, socket, time
conn = socket.create_connection(("ADDRESS", 80), timeout=5)
open("/tmp/open", "w").write("1")
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
try:
    conn.sendall(b"GET / HTTP/1.1\\r\\nHost: held.test\\r\\n\\r\\n")
    reply = conn.recv(100)
    outcome = "failed: no reply" if not reply else "answered " + repr(reply[:20])
except OSError as err:
    outcome = "failed " + repr(err)
open("/tmp/result", "w").write(outcome)
"""


@pytest.fixture(scope="module")
def internet() -> Iterator[InternetHost]:
    net = InternetHost()
    yield net
    net.close()


@pytest.fixture
def probed(new_sandbox, internet):
    """Factory: a new sandbox with the probe program installed."""

    def factory(**kwargs) -> Sandbox:
        sbx = new_sandbox(**kwargs)
        install_probe(sbx)
        return sbx

    return factory


def test_default_egress_and_dns_resolver(probed):
    sbx = probed()
    http, by_name, other_server = probe(
        sbx,
        ["http", INET_IP, "plain.test"],
        # The guest's resolv.conf names 8.8.8.8; the slot sends the query to 198.18.0.2.
        ["resolve", "three.example.test"],
        # A query to any other server lands at the same resolver.
        ["dns_query", "192.0.2.53", "web.example.test"],
    )
    assert http["ok"], http
    assert http["detail"] == f"inet-http plain.test {INET_IP}"
    assert by_name == {"ok": True, "detail": INET_IP_2}, by_name
    assert other_server == {"ok": True, "detail": INET_IP}, other_server


def test_no_internet_access_blocks_egress(probed):
    sbx = probed(allow_internet_access=False)
    http, dns = probe(sbx, ["http", INET_IP, "plain.test"], ["dns_query", "8.8.8.8", "a.test"])
    assert not http["ok"], http
    assert not dns["ok"], dns
    # Inbound through the proxy still works: the SDK reached envd to run the probe.
    assert sbx.commands.run("echo inbound").stdout.strip() == "inbound"


def test_allow_out_cidr_overrides_deny_all(probed):
    sbx = probed(network={"allow_out": [f"{INET_IP_2}/32"], "deny_out": ["0.0.0.0/0"]})
    allowed, denied = probe(sbx, ["http", INET_IP_2, "a.test"], ["http", INET_IP, "a.test"])
    assert allowed["ok"], allowed
    assert not denied["ok"], denied


def test_deny_out_cidr_blocks_only_that_range(probed):
    sbx = probed(network={"deny_out": [INET_IP_2]})
    allowed, denied, raw = probe(
        sbx, ["http", INET_IP, "a.test"], ["http", INET_IP_2, "a.test"], ["send", INET_IP, 80, "ping\r\n\r\n"]
    )
    assert allowed["ok"], allowed
    assert not denied["ok"], denied
    assert raw["ok"] and "Error" in raw["detail"], raw


def test_allow_out_domains_match_host_and_sni(probed):
    sbx = probed(network={"allow_out": ["*.allowed.test", "exact.test"], "deny_out": ["0.0.0.0/0"]})
    results = probe(
        sbx,
        ["http", INET_IP, "api.allowed.test"],
        ["http", INET_IP, "exact.test:80"],
        ["tls", INET_IP, "deep.sub.allowed.test"],
        ["http", INET_IP, "allowed.test"],  # the apex is not covered by *.allowed.test
        ["http", INET_IP, "other.test"],
        ["tls", INET_IP, "evil.test"],
        # Neither TLS nor HTTP: no name to match, so refused. The same bytes get the
        # HTTP server's 400 where nothing is in the way (see the deny-CIDR test).
        ["send", INET_IP, 80, "ping\r\n\r\n"],
        # DNS to the default dnsServers entry (8.8.8.8) is allowed, and answered by Hearth's resolver.
        ["dns_query", "8.8.8.8", "api.allowed.test"],
        ["dns_query", "192.0.2.53", "api.allowed.test"],
    )
    http_ok, exact_ok, tls_ok, apex, other, tls_evil, raw, dns_ok, dns_other = results
    assert http_ok["ok"] and http_ok["detail"] == f"inet-http api.allowed.test {INET_IP}", http_ok
    assert exact_ok["ok"], exact_ok
    assert tls_ok["ok"] and tls_ok["detail"] == f"inet-tls deep.sub.allowed.test {INET_IP}", tls_ok
    for denied in (apex, other, tls_evil, raw):
        assert not denied["ok"], results
    assert dns_ok == {"ok": True, "detail": INET_IP}, dns_ok
    assert not dns_other["ok"], dns_other


def test_update_network_replaces_rules_of_a_running_sandbox(probed):
    sbx = probed()
    assert probe(sbx, ["http", INET_IP, "a.test"])[0]["ok"]

    # A connection opened before the update must not outlive it: its next request fails.
    sbx.files.write("/tmp/held.py", HELD_CONNECTION.replace("ADDRESS", INET_IP))
    sbx.commands.run("python3 /tmp/held.py", background=True)
    assert wait_for(lambda: sbx.files.exists("/tmp/open"), 30)

    started = time.monotonic()
    sbx.update_network({"deny_out": [INET_IP], "allow_out": [INET_IP_2]})
    elapsed = time.monotonic() - started
    denied, allowed = probe(sbx, ["http", INET_IP, "a.test"], ["http", INET_IP_2, "a.test"])
    assert not denied["ok"], denied
    assert allowed["ok"], allowed
    sbx.files.write("/tmp/go", "1")
    assert wait_for(lambda: sbx.files.exists("/tmp/result"), 30)
    open_connection_outcome = sbx.files.read("/tmp/result")
    assert open_connection_outcome.startswith("failed"), open_connection_outcome
    print(f"update_network took {elapsed * 1000:.0f} ms")

    sbx.update_network({"allow_internet_access": False})
    assert not probe(sbx, ["http", INET_IP_2, "a.test"])[0]["ok"]

    sbx.update_network({})
    assert probe(sbx, ["http", INET_IP, "a.test"])[0]["ok"]


def test_update_network_rejects_bad_rules(probed):
    sbx = probed()
    with pytest.raises(Exception) as raised:
        sbx.update_network({"deny_out": ["example.com"]})
    assert "denyOut" in str(raised.value)


def test_sandbox_cannot_reach_host_services(probed, internet):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    accepted = []

    def accept_loop():
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            accepted.append(peer)
            conn.close()

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        sbx = probed()
        targets = sorted(set(host_ipv4_addresses()))
        assert INET_HOST_IP in targets
        api_port = int(os.environ["E2B_API_URL"].rsplit(":", 1)[1].strip("/"))
        proxy_port = int(sandbox_url().rsplit(":", 1)[1])
        probes = [["tcp", address, port] for address in targets]
        probes += [["tcp", address, api_port] for address in targets]
        probes += [["tcp", address, proxy_port] for address in targets]
        probes.append(["http", INET_IP, "control.test"])
        results = probe(sbx, *probes)
        control = results.pop()
        assert control["ok"], control  # the probe itself works
        reached = [p for p, r in zip(probes, results) if r["ok"]]
        assert reached == [], f"sandbox reached host services: {reached}"
        assert accepted == [], accepted
        # The host service itself is up: the host reaches it.
        socket.create_connection((INET_HOST_IP, port), timeout=3).close()
        assert wait_for(lambda: len(accepted) == 1, 5)
    finally:
        listener.close()


def test_sandbox_cannot_reach_link_local_addresses(probed):
    # The host reaches the address (it is routed into the test namespace)...
    with httpx.Client(timeout=5) as client:
        assert client.get(f"http://{LINK_LOCAL_IP}/").text.startswith("inet-http")
    # ...the sandbox does not, while it reaches the same service at an ordinary address.
    sbx = probed()
    link_local, control = probe(sbx, ["http", LINK_LOCAL_IP, "meta.test"], ["http", INET_IP, "x.test"])
    assert not link_local["ok"], link_local
    assert control["ok"], control


def test_two_sandboxes_cannot_reach_each_other(probed):
    first = probed()
    second = probed()
    first.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
    # The proxy reaches the first sandbox's server...
    assert wait_for(lambda: proxy_get_by_host(first, 8000).status_code == 200, 30)
    # ...and the second sandbox reaches it at none of the slot addresses.
    addresses = slot_addresses()
    assert len(addresses) >= 2, addresses
    results = probe(second, *[["tcp", address, 8000] for address in addresses], ["http", INET_IP, "x.test"])
    assert results.pop()["ok"]
    reached = [address for address, result in zip(addresses, results) if result["ok"]]
    assert reached == [], f"the second sandbox reached {reached}"


def test_outside_hosts_cannot_open_connections_to_a_sandbox(probed, internet):
    sbx = probed()
    sbx.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
    assert wait_for(lambda: proxy_get_by_host(sbx, 8000).status_code == 200, 30)
    # The test's internet host routes through this host, so the host would forward its
    # connections to any slot address if no rule stopped them.
    targets = [[address, port] for address in slot_addresses() for port in (8000, 49983)]
    # The check itself works: the internet host reaches a listener on the host.
    listener = socket.socket()
    listener.bind((INET_HOST_IP, 0))
    listener.listen(16)
    control = [INET_HOST_IP, listener.getsockname()[1]]
    try:
        reached = internet.reachable(targets + [control])
    finally:
        listener.close()
    assert control in reached
    reached.remove(control)
    assert reached == [], f"the internet host reached sandbox ports: {reached}"


def test_private_traffic_needs_the_traffic_token(new_sandbox):
    sbx = new_sandbox(network={"allow_public_traffic": False})
    token = sbx.traffic_access_token
    assert token
    sbx.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
    assert wait_for(
        lambda: proxy_get_by_host(sbx, 8000, headers={TRAFFIC_TOKEN_HEADER: token}).status_code == 200, 30
    )
    without = proxy_get_by_host(sbx, 8000)
    assert without.status_code == 403, without.text
    assert TRAFFIC_TOKEN_HEADER in without.json()["message"]
    wrong = proxy_get_by_host(sbx, 8000, headers={TRAFFIC_TOKEN_HEADER: "0" * len(token)})
    assert wrong.status_code == 403
    # envd's own port is guarded by its access token instead, so the SDK keeps working.
    assert sbx.commands.run("echo ok").stdout.strip() == "ok"


def test_public_sandbox_serves_without_a_token(new_sandbox):
    sbx = new_sandbox()
    assert sbx.traffic_access_token is None
    sbx.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
    assert wait_for(lambda: proxy_get_by_host(sbx, 8000).status_code == 200, 30)


def test_secure_sandbox_envd_requires_its_token(new_sandbox):
    sbx = new_sandbox(secure=True)
    url = f"{sandbox_url()}/health"
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        files = client.get(
            f"{sandbox_url()}/files",
            params={"path": "/etc/hostname"},
            headers=routing_headers(sbx, 49983),
        )
        assert files.status_code == 401, files.text
        assert client.get(url, headers=routing_headers(sbx, 49983)).status_code in (200, 204)
    assert sbx.files.read("/etc/hostname")


def test_server_on_loopback_is_reachable_through_the_proxy(new_sandbox):
    sbx = new_sandbox()
    sbx.commands.run("python3 -m http.server 8001 --bind 127.0.0.1", background=True)
    assert wait_for(lambda: proxy_get_by_host(sbx, 8001).status_code == 200, 30)
    # A closed port still gets the SDK's "port is not open" error.
    closed = proxy_get_by_host(sbx, 8002)
    assert closed.status_code == 502
    assert "port is not open" in closed.json()["message"]


def test_metrics_show_the_slot_pool():
    api = os.environ["E2B_API_URL"].rstrip("/")
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        text = client.get(f"{api}/metrics").text
    values = {
        line.split()[0]: int(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["hearth_slot_pool_ready_target"] >= 1, text
    assert values["hearth_slot_pool_capacity"] >= values["hearth_slot_pool_ready_target"]
    for name in ("hearth_slot_pool_ready", "hearth_slot_pool_in_use", "hearth_sandboxes_running"):
        assert name in values, text
