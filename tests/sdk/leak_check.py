#!/usr/bin/env python3
"""Crash and churn check: nothing of a sandbox outlives it.

scripts/test.sh runs this with its server stopped. It starts `hearth serve` itself (the
command line is everything after `--`), and:

1. counts host interfaces, network namespaces, nftables tables and VMM processes;
2. creates a sandbox and kills its VMM with SIGKILL: the sandbox must disappear;
3. kills the server with SIGKILL while a create is restoring a VM, and starts it again:
   no VMM of the killed server may run afterwards, and the start-up sweep must remove
   its slots;
4. runs `--cycles` create/kill cycles (far more than the test server's slot subnet has slots);
5. checks that egress and the proxy still work for the last sandbox;
6. stops the server and compares every count with step 1.

Usage: leak_check.py --cycles 1000 --log server.log -- hearth serve --data-dir ...
Needs E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY, and root.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import httpx
from e2b import Sandbox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from net_helpers import INET_IP, InternetHost, install_probe, probe, wait_for  # noqa: E402
from sdk_helpers import REQUEST_TIMEOUT, proxy_get_by_host  # noqa: E402

VMM_NAMES = ("qemu-system-x86_64", "firecracker")


def vmm_pids() -> Dict[int, str]:
    """PID and command line of every VMM process on the host."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode(errors="replace")) in VMM_NAMES:
            found[int(entry)] = b" ".join(argv).decode(errors="replace")
    return found


def counts() -> Dict[str, int]:
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {
        "host interfaces": len(os.listdir("/sys/class/net")),
        "network namespaces": len([line for line in namespaces.splitlines() if line.strip()]),
        "nftables tables": len([line for line in tables.splitlines() if line.strip()]),
        "VMM processes": len(vmm_pids()),
    }


class Server:
    """`hearth serve` as a child process, logging to a file."""

    def __init__(self, command: List[str], log_path: str) -> None:
        self.command = command
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        api = os.environ["E2B_API_URL"].rstrip("/")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"hearth serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("hearth serve did not answer /health within 300 s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=300)

    def wait_pool_settled(self) -> Dict[str, int]:
        """Waits until the slot pool has prepared its target and nothing is being created."""
        api = os.environ["E2B_API_URL"].rstrip("/")
        metrics: Dict[str, int] = {}

        def settled() -> bool:
            text = httpx.get(f"{api}/metrics", timeout=10).text
            metrics.clear()
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.split()
                    metrics[name] = int(value)
            return (
                metrics["hearth_slot_pool_creating"] == 0
                and metrics["hearth_slot_pool_ready"] == metrics["hearth_slot_pool_ready_target"]
            )

        if not wait_for(settled, 60, 0.2):
            raise SystemExit(f"slot pool did not settle: {metrics}")
        return dict(metrics)


def check(condition: bool, message: str, failures: List[str]) -> None:
    print(("ok: " if condition else "FAILED: ") + message, flush=True)
    if not condition:
        failures.append(message)


def gone(sandbox_id: str) -> bool:
    try:
        Sandbox.get_info(sandbox_id, request_timeout=REQUEST_TIMEOUT)
    except Exception:  # noqa: BLE001 - the SDK raises its not-found error
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--log", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    failures: List[str] = []

    baseline = counts()
    print(f"baseline: {baseline}", flush=True)
    if baseline["VMM processes"]:
        raise SystemExit(f"VMM processes already run on this host: {vmm_pids()}")
    internet = InternetHost()
    after_internet = counts()
    server = Server(command, args.log)
    try:
        server.start()
        settled = server.wait_pool_settled()
        ready_target = settled["hearth_slot_pool_ready_target"]
        print(f"pool: {settled}", flush=True)

        # 1. A VMM killed with SIGKILL: the sandbox goes, and so does its slot.
        sbx = Sandbox.create(timeout=600, request_timeout=REQUEST_TIMEOUT)
        pids = [pid for pid, line in vmm_pids().items() if sbx.sandbox_id in line]
        check(len(pids) == 1, f"one VMM process for {sbx.sandbox_id}: {pids}", failures)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        check(wait_for(lambda: gone(sbx.sandbox_id), 30), "a sandbox whose VMM was killed is gone", failures)
        server.wait_pool_settled()
        check(counts() == after_internet_plus(after_internet, ready_target), "its slot was removed", failures)

        # 2. The server killed mid-create.
        before = set(vmm_pids())
        create_error: List[BaseException] = []

        def create() -> None:
            try:
                Sandbox.create(timeout=600, request_timeout=REQUEST_TIMEOUT)
            except BaseException as err:  # noqa: BLE001 - expected: the server dies
                create_error.append(err)

        creator = threading.Thread(target=create, daemon=True)
        creator.start()
        started = wait_for(lambda: set(vmm_pids()) - before, 60, 0.002)
        check(bool(started), "a VMM started for the create", failures)
        server.kill()
        creator.join(timeout=REQUEST_TIMEOUT)
        # The VMM gets SIGKILL when the server dies (PR_SET_PDEATHSIG); if one outlives it
        # anyway, the start-up sweep kills it with its slot.
        orphans = set(vmm_pids()) - before
        print(f"VMMs alive after the server was killed: {sorted(orphans)}", flush=True)
        server.start()
        check(not set(vmm_pids()) - before, "no VMM of the killed server runs after the restart", failures)
        server.wait_pool_settled()
        check(counts() == after_internet_plus(after_internet, ready_target), "no slot of the killed server is left", failures)

        # 3. Churn past the subnet's capacity.
        started_at = time.monotonic()
        last: Optional[Sandbox] = None
        for cycle in range(args.cycles):
            sbx = Sandbox.create(timeout=600, request_timeout=REQUEST_TIMEOUT)
            if cycle == args.cycles - 1:
                last = sbx
                break
            sbx.kill(request_timeout=REQUEST_TIMEOUT)
            if (cycle + 1) % 100 == 0:
                print(f"{cycle + 1} cycles in {time.monotonic() - started_at:.0f} s", flush=True)
        assert last is not None
        print(f"{args.cycles} cycles in {time.monotonic() - started_at:.0f} s", flush=True)

        # 4. The last sandbox still has egress and its ports through the proxy.
        install_probe(last)
        http = probe(last, ["http", INET_IP, "leak.test"])[0]
        check(http["ok"], f"egress from the last sandbox: {http}", failures)
        last.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
        check(
            wait_for(lambda: proxy_get_by_host(last, 8000).status_code == 200, 30),
            "the last sandbox's port through the proxy",
            failures,
        )
        last.kill(request_timeout=REQUEST_TIMEOUT)
        server.wait_pool_settled()
        check(counts() == after_internet_plus(after_internet, ready_target), "after the churn only the pool's slots exist", failures)
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()
        internet.close()

    final = counts()
    check(final == baseline, f"counts back to the baseline: {final} (baseline {baseline})", failures)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        return 1
    print("leak check passed", flush=True)
    return 0


def after_internet_plus(after_internet: Dict[str, int], ready_slots: int) -> Dict[str, int]:
    """Expected counts with the server up and idle: each ready slot is one namespace and
    one host interface, and the server owns one nftables table."""
    expected = dict(after_internet)
    expected["network namespaces"] += ready_slots
    expected["host interfaces"] += ready_slots
    expected["nftables tables"] += 1
    return expected


if __name__ == "__main__":
    sys.exit(main())
