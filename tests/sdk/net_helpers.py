"""Test hosts for the network tests, in network namespaces the tests create.

`InternetHost` is a namespace joined to the host by a veth pair. It plays the internet
that a sandbox may or may not reach. It has two addresses (198.18.0.2 and
198.18.0.3, from the benchmarking range 198.18.0.0/15) and runs

- an HTTP server on port 80 that replies `inet-http <Host header> <address>`,
- a TLS server on port 443 (self-signed) that answers `inet-tls <SNI> <address>`,
- a DNS server on port 53 (UDP) that answers every A query with 198.18.0.2, or with
  198.18.0.3 for names that start with `three.`.

Hearth's test server runs with `--dns-server 198.18.0.2`, so every DNS query of every
sandbox lands here. A host route also sends one link-local address, 169.254.77.77, into
the namespace, so a test can show that sandboxes cannot reach link-local addresses that
the host itself can. Nothing here sends traffic anywhere else.

`PROBE_SCRIPT` is a small Python program the tests write into a sandbox to open
connections and print what happened, as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

INET_HOST_IP = "198.18.0.1"  # host end of the veth pair
INET_IP = "198.18.0.2"  # services and the DNS server
INET_IP_2 = "198.18.0.3"  # a second address of the same host
LINK_LOCAL_IP = "169.254.77.77"  # routed into the namespace by the host

_SERVICES = r'''
import socket, socketserver, ssl, struct, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key = sys.argv[1], sys.argv[2]

class Http(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"inet-http {self.headers.get('Host', '')} {self.connection.getsockname()[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

ThreadingHTTPServer.allow_reuse_address = True
http = ThreadingHTTPServer(("0.0.0.0", 80), Http)
threading.Thread(target=http.serve_forever, daemon=True).start()

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
names = {}
def remember(sock, name, ctx):
    names[id(sock)] = name
context.sni_callback = remember

def tls_client(raw):
    try:
        with context.wrap_socket(raw, server_side=True) as conn:
            conn.recv(100)
            conn.sendall(f"inet-tls {names.pop(id(conn), None)} {conn.getsockname()[0]}".encode())
    except Exception:
        pass

tls = socket.socket()
tls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tls.bind(("0.0.0.0", 443))
tls.listen(64)
def tls_loop():
    while True:
        raw, _ = tls.accept()
        threading.Thread(target=tls_client, args=(raw,), daemon=True).start()
threading.Thread(target=tls_loop, daemon=True).start()

dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    query, peer = dns.recvfrom(512)
    if len(query) < 12:
        continue
    labels, i = [], 12
    while i < len(query) and query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode(errors="replace"))
        i += query[i] + 1
    question = query[12:i + 5]
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0] if i + 3 <= len(query) else 0
    answer_ip = "198.18.0.3" if labels and labels[0] == "three" else "198.18.0.2"
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if qtype == 1 else 0, 0, 0)
    answer = b""
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(answer_ip)
    dns.sendto(header + question + answer, peer)
'''

PROBE_SCRIPT = r'''
import json, socket, ssl, sys

def tcp(ip, port, timeout=3):
    try:
        with socket.create_connection((ip, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            try:
                data = conn.recv(1)
            except socket.timeout:
                return {"ok": True, "detail": "connected"}
            # A proxy that accepted and then refused closes with no data.
            return {"ok": bool(data), "detail": "connected" if data else "closed at once"}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

def send(ip, port, text, timeout=3):
    """Sends `text` first and succeeds when any reply comes back."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(text.encode())
            data = conn.recv(100)
        return {"ok": bool(data), "detail": data.decode(errors="replace") or "closed without a reply"}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

def http(ip, host, port=80, timeout=3):
    try:
        with socket.create_connection((ip, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
        return {"ok": body.startswith("inet-http"), "detail": body or "empty reply"}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

def tls(ip, sni, timeout=3):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((ip, 443), timeout=timeout) as raw:
            raw.settimeout(timeout)
            with context.wrap_socket(raw, server_hostname=sni) as conn:
                conn.sendall(b"hi")
                body = conn.recv(200).decode(errors="replace")
        return {"ok": body.startswith("inet-tls"), "detail": body}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

def resolve(name):
    try:
        return {"ok": True, "detail": socket.gethostbyname(name)}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

def dns_query(server, name, timeout=3):
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\x00\x00\x01\x00\x01"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(query, (server, 53))
            reply = sock.recv(512)
        answers = int.from_bytes(reply[6:8], "big") if len(reply) >= 12 else 0
        return {"ok": answers > 0, "detail": socket.inet_ntoa(reply[-4:]) if answers else "no answer"}
    except Exception as err:
        return {"ok": False, "detail": repr(err)}

# Probes run side by side, so a list of addresses that all drop costs one timeout.
from concurrent.futures import ThreadPoolExecutor
probes = json.loads(sys.argv[1])
with ThreadPoolExecutor(max_workers=min(64, len(probes))) as pool:
    results = list(pool.map(lambda probe: globals()[probe[0]](*probe[1:]), probes))
print(json.dumps(results))
'''


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class InternetHost:
    """The test's "internet" namespace and its services; `close()` removes all of it."""

    def __init__(self) -> None:
        suffix = str(os.getpid() % 100000)
        self.netns = f"hearth-test-inet-{suffix}"
        self.host_veth = f"htinet{suffix}"
        self._dir = tempfile.mkdtemp(prefix="hearth-inet-")
        self._services: Optional[subprocess.Popen] = None
        self._route_added = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _run("ip", "addr", "add", f"{INET_HOST_IP}/24", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        ns = ("ip", "-n", self.netns)
        _run(*ns, "link", "set", "lo", "up")
        _run(*ns, "addr", "add", f"{INET_IP}/24", "dev", "eth0")
        _run(*ns, "addr", "add", f"{INET_IP_2}/24", "dev", "eth0")
        _run(*ns, "addr", "add", f"{LINK_LOCAL_IP}/32", "dev", "lo")
        _run(*ns, "link", "set", "eth0", "up")
        _run(*ns, "route", "add", "default", "via", INET_HOST_IP)
        _run("ip", "route", "add", f"{LINK_LOCAL_IP}/32", "via", INET_IP)
        self._route_added = True

        cert = os.path.join(self._dir, "cert.pem")
        key = os.path.join(self._dir, "key.pem")
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=hearth-test-internet", "-keyout", key, "-out", cert)
        script = os.path.join(self._dir, "services.py")
        with open(script, "w") as file:
            file.write(_SERVICES)
        self._services = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, script, cert, key],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self._services.stdout.readline() if self._services.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"test internet services did not start: {self._services.stderr.read()}")

    def reachable(self, targets: List[List[Any]], timeout: float = 2) -> List[List[Any]]:
        """The `[address, port]` pairs to which a TCP connection from the internet
        namespace opens; all are tried at once."""
        code = (
            "import json, socket, sys\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "def opens(target):\n"
            "    try:\n"
            f"        socket.create_connection(tuple(target), timeout={timeout}).close()\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n"
            "targets = json.loads(sys.argv[1])\n"
            "with ThreadPoolExecutor(max_workers=64) as pool:\n"
            "    print(json.dumps(list(pool.map(opens, targets))))\n"
        )
        result = _run("ip", "netns", "exec", self.netns, sys.executable, "-c", code, json.dumps(targets))
        return [target for target, ok in zip(targets, json.loads(result.stdout)) if ok]

    def close(self) -> None:
        if self._services is not None and self._services.poll() is None:
            # `ip netns exec` replaces itself with python: this PID is the server's.
            self._services.kill()
            self._services.wait(timeout=10)
        if self._route_added:
            _run("ip", "route", "del", f"{LINK_LOCAL_IP}/32", check=False)
        _run("ip", "link", "del", self.host_veth, check=False)
        _run("ip", "netns", "del", self.netns, check=False)
        subprocess.run(["rm", "-rf", self._dir], check=False)


def install_probe(sbx: Any) -> None:
    """Write the probe program into the sandbox."""
    sbx.files.write("/tmp/probe.py", PROBE_SCRIPT)


def probe(sbx: Any, *probes: List[Any]) -> List[Dict[str, Any]]:
    """Run probes such as `("http", "198.18.0.2", "example.test")` in the sandbox."""
    command = f"python3 /tmp/probe.py {_shell_quote(json.dumps(list(probes)))}"
    result = sbx.commands.run(command, timeout=120)
    return json.loads(result.stdout)


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def host_ipv4_addresses() -> List[str]:
    """Every IPv4 address of the host's own interfaces, loopback excluded."""
    links = json.loads(_run("ip", "-4", "-j", "addr", "show").stdout)
    return [
        info["local"]
        for link in links
        for info in link.get("addr_info", [])
        if not info["local"].startswith("127.")
    ]


def slot_addresses() -> List[str]:
    """The namespace-side address of every Hearth slot on this host (where the host
    reaches each guest)."""
    addresses = []
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("hearth-") or name.startswith("hearth-test-"):
            continue
        links = json.loads(_run("ip", "-n", name, "-4", "-j", "addr", "show", "dev", "eth0", check=False).stdout or "[]")
        addresses.extend(info["local"] for link in links for info in link.get("addr_info", []))
    return addresses


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
