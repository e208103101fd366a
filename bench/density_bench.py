#!/usr/bin/env python3
"""Benchmark create latency with many live sandboxes on the host.

Run it against a running `hearth serve` with the SDK suite's environment (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY):

    /opt/hearth-venv/bin/python bench/density_bench.py --levels 0,50,150 --samples 20 --json density.json

For each level L, in ascending order, the benchmark brings the number of live idle
sandboxes to L (it creates the missing ones through the E2B SDK and keeps them), waits
--settle seconds, then runs --samples create+kill cycles of one more sandbox. Each cycle is
`POST /sandboxes` and `DELETE /sandboxes/{id}` sent with httpx, so the benchmark reads the
create's latency as the client sees it and the server's `Server-Timing` phases (`slot`,
`disk`, `egress_rule`, `vmm_restore`, `envd_init`, `total`, in milliseconds).

The target is a create latency that stays flat: each level's client-side p50 within 10% of
the level-0 p50. At each level the benchmark also records the host's load average, the
available memory (MemAvailable), the server's RSS and the RSS and PSS summed over the
server's child processes (the VMMs). A sandbox's guest RAM is mapped copy-on-write from
the template, so the VMMs share pages and their summed RSS counts those pages once per
VMM; PSS splits each shared page among the processes that map it.

The benchmark stops adding sandboxes when MemAvailable falls under --min-available-mib,
measures at the count it reached and skips the higher levels. Every sandbox it created is
killed at the end, also after an error, Ctrl-C or SIGTERM. Traffic goes only to the URLs in
the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlparse

import httpx
from e2b import Sandbox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sdk_bench import log, ms_since, parse_server_timing, percentile  # noqa: E402

REQUEST_TIMEOUT = 300
# Idle sandboxes must outlive the whole run; the measured ones live for one cycle.
IDLE_SANDBOX_TIMEOUT = 4 * 3600
MEASURED_SANDBOX_TIMEOUT = 300
TARGET_RATIO = 1.10
PHASES = ("slot", "disk", "egress_rule", "vmm_restore", "envd_init", "total")
BENCH_METADATA_KEY = "hearth-bench"


class Terminated(Exception):
    """SIGTERM arrived; raised so that the cleanup in `finally` runs."""


def on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


# Host and process readings


def mem_available_mib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def status_kib(pid: int, field: str) -> int:
    """Read a `kB` field of /proc/<pid>/status, such as VmRSS, or 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def parent_pids() -> Dict[int, int]:
    """Map the PID of every process to its parent PID."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name in brackets may contain spaces; the fields after it do not.
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for child, parent in parent_pids().items():
        children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def listening_pid(port: int) -> Optional[int]:
    """Find the process with a TCP socket listening on `port`, through /proc/net/tcp."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == port and fields[3] == "0A":  # 0A is TCP_LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
        except FileNotFoundError:
            continue
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return None


def host_sample(server_pid: Optional[int]) -> Dict[str, float]:
    load1, load5, load15 = os.getloadavg()
    sample = {
        "load1": load1,
        "load5": load5,
        "load15": load15,
        "mem_available_mib": mem_available_mib(),
    }
    if server_pid is not None:
        children = descendants(server_pid)
        sample["server_rss_mib"] = status_kib(server_pid, "VmRSS") / 1024
        sample["vmm_processes"] = len(children)
        sample["vmm_rss_mib"] = sum(status_kib(pid, "VmRSS") for pid in children) / 1024
        sample["vmm_pss_mib"] = sum(pss_kib(pid) for pid in children) / 1024
    return sample


# The benchmark


class DensityBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:12]
        self.api = httpx.Client(
            base_url=os.environ["E2B_API_URL"].rstrip("/"),
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
            timeout=REQUEST_TIMEOUT,
        )
        self.idle: List[str] = []
        self.measured_live: set[str] = set()
        self.levels: List[Dict[str, object]] = []
        self.stopped_early: Optional[str] = None

    def memory_low(self) -> bool:
        return mem_available_mib() < self.args.min_available_mib

    def add_idle(self, count: int) -> None:
        """Creates idle sandboxes through the SDK until `count` are live, or memory runs low."""
        while len(self.idle) < count:
            if self.memory_low():
                self.stopped_early = (
                    f"MemAvailable fell under {self.args.min_available_mib} MiB "
                    f"with {len(self.idle)} idle sandboxes"
                )
                log(self.stopped_early)
                return
            sandbox = Sandbox.create(
                template=self.args.template,
                timeout=IDLE_SANDBOX_TIMEOUT,
                metadata={BENCH_METADATA_KEY: self.run_id},
                request_timeout=REQUEST_TIMEOUT,
            )
            self.idle.append(sandbox.sandbox_id)
            if len(self.idle) % 10 == 0 or len(self.idle) == count:
                load1 = os.getloadavg()[0]
                log(f"{len(self.idle)} idle sandboxes live; load {load1:.2f}, available {mem_available_mib():.0f} MiB")

    def cycle(self) -> Dict[str, float]:
        """Create and kill one extra sandbox, and return the client and server timings."""
        started = time.perf_counter()
        response = self.api.post(
            "/sandboxes",
            json={
                "templateID": self.args.template,
                "timeout": MEASURED_SANDBOX_TIMEOUT,
                "metadata": {BENCH_METADATA_KEY: self.run_id},
            },
        )
        create_ms = ms_since(started)
        if response.status_code >= 300:
            raise RuntimeError(f"POST /sandboxes failed with {response.status_code}: {response.text[:300]}")
        sandbox_id = response.json()["sandboxID"]
        self.measured_live.add(sandbox_id)

        started = time.perf_counter()
        self.kill(sandbox_id)
        kill_ms = ms_since(started)
        self.measured_live.discard(sandbox_id)

        sample = {"create_ms": create_ms, "kill_ms": kill_ms}
        for name, value in parse_server_timing(response.headers.get_list("server-timing")).items():
            sample[f"server_{name}_ms"] = value
        return sample

    def kill(self, sandbox_id: str) -> None:
        response = self.api.delete(f"/sandboxes/{sandbox_id}")
        if response.status_code not in (204, 404):
            raise RuntimeError(f"DELETE /sandboxes/{sandbox_id} failed with {response.status_code}: {response.text[:300]}")

    def measure_level(self, level: int, server_pid: Optional[int]) -> None:
        self.add_idle(level)
        live = len(self.idle)
        log(f"level {level}: {live} idle sandboxes live; settling for {self.args.settle} s")
        time.sleep(self.args.settle)

        before = host_sample(server_pid)
        samples = []
        for index in range(self.args.samples):
            if self.memory_low():
                self.stopped_early = f"MemAvailable fell under {self.args.min_available_mib} MiB during level {level}"
                log(self.stopped_early)
                break
            sample = self.cycle()
            samples.append(sample)
            log(f"level {level} cycle {index + 1}/{self.args.samples}: create {sample['create_ms']:.1f} ms, "
                f"server total {sample.get('server_total_ms', float('nan')):.1f} ms")
        after = host_sample(server_pid)
        self.levels.append({"level": level, "live": live, "samples": samples, "before": before, "after": after})

    def kill_all(self) -> None:
        leftovers = list(self.measured_live) + self.idle
        if leftovers:
            log(f"killing {len(leftovers)} sandboxes")
        for sandbox_id in leftovers:
            try:
                self.kill(sandbox_id)
            except Exception as err:  # noqa: BLE001 - cleanup reports and goes on
                log(f"killing sandbox {sandbox_id} failed: {err!r}")
        self.idle.clear()
        self.measured_live.clear()

    # Report

    def p(self, level: Dict[str, object], key: str, q: float) -> float:
        values = sorted(s[key] for s in level["samples"] if key in s)
        return percentile(values, q)

    def render(self) -> str:
        base = self.levels[0] if self.levels else None
        base_p50 = self.p(base, "create_ms", 0.5) if base else float("nan")
        lines = [
            "| live sandboxes | n | create p50 | create p90 | p50 / level-0 p50 | within 10% | kill p50 |",
            "| ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for level in self.levels:
            p50 = self.p(level, "create_ms", 0.5)
            ratio = p50 / base_p50
            lines.append(
                f"| {level['live']} | {len(level['samples'])} | {p50:.1f} ms | {self.p(level, 'create_ms', 0.9):.1f} ms "
                f"| {ratio:.2f} | {'yes' if ratio <= TARGET_RATIO else 'NO'} | {self.p(level, 'kill_ms', 0.5):.1f} ms |"
            )

        lines += [
            "",
            "| live sandboxes | " + " | ".join(f"{name} p50" for name in PHASES) + " |",
            "| ---: | " + " | ".join("---:" for _ in PHASES) + " |",
        ]
        for level in self.levels:
            cells = []
            for name in PHASES:
                value = self.p(level, f"server_{name}_ms", 0.5)
                cells.append("-" if value != value else f"{value:.1f}")
            lines.append(f"| {level['live']} | " + " | ".join(cells) + " |")

        lines += [
            "",
            "| live sandboxes | load 1/5/15 min (before → after) | MemAvailable | server RSS | VMMs | VMM RSS sum | VMM PSS sum |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for level in self.levels:
            before, after = level["before"], level["after"]
            load = (f"{before['load1']:.2f}/{before['load5']:.2f}/{before['load15']:.2f} → "
                    f"{after['load1']:.2f}/{after['load5']:.2f}/{after['load15']:.2f}")
            row = f"| {level['live']} | {load} | {after['mem_available_mib']:.0f} MiB"
            if "server_rss_mib" in after:
                row += (f" | {after['server_rss_mib']:.0f} MiB | {after['vmm_processes']} "
                        f"| {after['vmm_rss_mib']:.0f} MiB | {after['vmm_pss_mib']:.0f} MiB |")
            else:
                row += " | - | - | - | - |"
            lines.append(row)
        if self.stopped_early:
            lines += ["", f"Stopped early: {self.stopped_early}."]
        return "\n".join(lines)


def server_pid_from(args: argparse.Namespace) -> Optional[int]:
    if args.server_pid:
        return args.server_pid
    port = urlparse(os.environ["E2B_API_URL"]).port
    pid = listening_pid(port) if port else None
    if pid is None:
        log("no local process listens on the API port; server and VMM memory are not recorded (use --server-pid)")
    return pid


def parse_levels(text: str) -> List[int]:
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --levels {text!r}: expected comma-separated integers such as 0,50,150")
    if not levels or levels[0] < 0:
        raise argparse.ArgumentTypeError(f"invalid --levels {text!r}: expected non-negative integers")
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=parse_levels, default=[0, 50, 150],
                        help="numbers of live idle sandboxes to measure at, comma-separated (default 0,50,150)")
    parser.add_argument("--samples", type=int, default=20, help="create+kill cycles per level (default 20)")
    parser.add_argument("--template", default="base", help="template of every sandbox (default base)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds to wait after reaching a level before measuring (default 15)")
    parser.add_argument("--min-available-mib", type=int, default=3072,
                        help="stop adding sandboxes when MemAvailable falls under this many MiB (default 3072)")
    parser.add_argument("--server-pid", type=int,
                        help="PID of `hearth serve`; by default the local process listening on E2B_API_URL's port")
    parser.add_argument("--json", type=Path, help="also write every sample and reading to this JSON file")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    for variable in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(variable):
            parser.error(f"{variable} is not set; start `hearth serve` and export the SDK's variables")

    signal.signal(signal.SIGTERM, on_sigterm)
    bench = DensityBench(args)
    server_pid = server_pid_from(args)
    started = time.monotonic()
    try:
        for level in args.levels:
            bench.measure_level(level, server_pid)
            if bench.stopped_early:
                break
    except (KeyboardInterrupt, Terminated):
        log("interrupted; killing the benchmark's sandboxes")
        return 130
    except Exception as err:  # noqa: BLE001 - report what was measured, then fail
        log(f"benchmark failed: {err!r}")
        failed = True
    else:
        failed = False
    finally:
        bench.kill_all()
        bench.api.close()

    print(bench.render())
    print(f"\nCommand: `bench/density_bench.py --levels {','.join(map(str, args.levels))} --samples {args.samples}`; "
          f"{time.monotonic() - started:.0f} s in all.")
    if args.json:
        args.json.write_text(json.dumps({
            "levels": bench.levels,
            "stopped_early": bench.stopped_early,
            "args": {"levels": args.levels, "samples": args.samples, "template": args.template, "settle": args.settle},
        }, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
