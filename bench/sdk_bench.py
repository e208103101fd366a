#!/usr/bin/env python3
"""Benchmark a running Hearth server through the official E2B Python SDK.

Run it with the same environment as the SDK suite (E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY), using the venv that contains the SDK:

    /opt/hearth-venv/bin/python bench/sdk_bench.py --sandboxes 20 --out bench-results.md

What it measures, each over many samples and reported as p50/p90/p99/mean:

- create-to-first-output: `Sandbox.create()` then `commands.run("echo hi")`,
  timed from the create request to the first stdout chunk. A local
  `subprocess.run(["echo", "hi"])` is the floor.
- Hearth's share of create latency: the create is sent with httpx so that the
  response's `Server-Timing` header can be read (`slot`, `disk`, `vmm_restore`,
  `envd_init`, `total`, in milliseconds); the sandbox is then attached with
  `Sandbox.connect` for its command. Hearth's share is `total - vmm_restore`;
  its host-side part also leaves out `envd_init`, the time the restored guest
  takes to answer envd's first request.
- `commands.run("true")` round trip, against `true` and `bash -l -c true`
  timed inside the guest (envd starts every command as `/bin/bash -l -c CMD`,
  so the login shell is part of what a run costs), and a local
  `subprocess.run(["true"])`.
- envd's resident set size in each fresh sandbox (`ps -o rss= -C envd`).
- Download throughput of a random file: through envd's `/files` (SDK stream,
  and plain httpx on the signed URL) against a baseline that serves the same
  file from a plain Python socket server in the guest (`os.sendfile`, no
  envd), reached through the same proxy on its own port.

Why that baseline: a raw TCP stream cannot pass the HTTP proxy, and the host
address that routes to a guest differs per sandbox and is known only inside
the server, so a runner cannot export it before the benchmark creates its
sandbox. The baseline therefore shares the proxy, the network slot and the
guest kernel with the envd path and differs only in the program that serves
the bytes.

Loops are bounded by the arguments, every sandbox is killed on exit, and
traffic goes only to the URLs in the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import httpx
from e2b import Sandbox

REQUEST_TIMEOUT = 120
CMD_TIMEOUT = 300
SANDBOX_TIMEOUT = 600
ENVD_PORT = 49983
RAW_PORT = 8001
MIB = 1024 * 1024

BENCH_METADATA_KEY = "hearth-bench"

GUEST_TIMING_SCRIPT = """\
import json, subprocess, sys, time
reps = int(sys.argv[1])
def timed(argv):
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples
print(json.dumps({"true": timed(["true"]), "bash_login_true": timed(["/bin/bash", "-l", "-c", "true"])}))
"""

# Serves one file over HTTP/1.1 with os.sendfile, for any request path.
GUEST_RAW_SERVER = """\
import os, socket, sys
path, port = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(16)
while True:
    conn, _ = server.accept()
    request = b""
    while b"\\r\\n\\r\\n" not in request:
        data = conn.recv(65536)
        if not data:
            break
        request += data
    head = ("HTTP/1.1 200 OK\\r\\nContent-Type: application/octet-stream\\r\\n"
            f"Content-Length: {size}\\r\\nConnection: close\\r\\n\\r\\n")
    try:
        conn.sendall(head.encode())
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                sent = os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent
    except OSError:
        pass
    conn.close()
"""


@dataclass
class Metric:
    """One measured quantity and its samples."""

    name: str
    unit: str
    samples: List[float] = field(default_factory=list)
    note: str = ""

    def pct(self, q: float) -> float:
        return percentile(sorted(self.samples), q)

    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan


@dataclass
class Target:
    """A goal checked against measured metrics."""

    description: str
    measured: str
    met: Optional[bool]


def percentile(sorted_values: List[float], q: float) -> float:
    """Percentile `q` (0..1) with linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def parse_server_timing(values: List[str]) -> Dict[str, float]:
    """Durations in milliseconds by metric name, from Server-Timing header values."""
    durations: Dict[str, float] = {}
    for value in values:
        for entry in value.split(","):
            params = [param.strip() for param in entry.split(";")]
            name = params[0]
            for param in params[1:]:
                key, _, raw = param.partition("=")
                if key.strip().lower() == "dur" and name:
                    try:
                        durations[name] = float(raw.strip().strip('"'))
                    except ValueError:
                        pass
    return durations


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Bench:
    """Runs every phase and keeps the metrics and the sandboxes to kill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:12]
        self.metrics: Dict[str, Metric] = {}
        self.live: set[str] = set()
        self.api_url = os.environ["E2B_API_URL"].rstrip("/")
        self.sandbox_url = os.environ["E2B_SANDBOX_URL"].rstrip("/")
        self.api = httpx.Client(
            base_url=self.api_url,
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
            timeout=REQUEST_TIMEOUT,
        )
        self.missing_server_timing = 0
        self.failures: List[str] = []

    def metric(self, name: str, unit: str, note: str = "") -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit, note=note)
        return self.metrics[name]

    # Sandbox bookkeeping

    def create(self) -> Sandbox:
        sbx = Sandbox.create(
            template=self.args.template,
            timeout=SANDBOX_TIMEOUT,
            metadata={BENCH_METADATA_KEY: self.run_id},
            request_timeout=REQUEST_TIMEOUT,
        )
        self.live.add(sbx.sandbox_id)
        return sbx

    def kill(self, sandbox_id: str) -> None:
        try:
            Sandbox.kill(sandbox_id, request_timeout=REQUEST_TIMEOUT)
        except Exception as err:  # noqa: BLE001 - cleanup reports and goes on
            log(f"killing sandbox {sandbox_id} failed: {err!r}")
        self.live.discard(sandbox_id)

    def kill_all(self) -> None:
        for sandbox_id in list(self.live):
            self.kill(sandbox_id)

    # Phases

    def measure_local_floors(self) -> None:
        true_metric = self.metric("local subprocess.run(['true'])", "ms", "floor for run('true')")
        echo_metric = self.metric("local subprocess.run(['echo','hi'])", "ms", "floor for first output")
        for _ in range(self.args.run_reps):
            start = time.perf_counter()
            subprocess.run(["true"], check=True)
            true_metric.samples.append(ms_since(start))
            start = time.perf_counter()
            subprocess.run(["echo", "hi"], check=True, stdout=subprocess.DEVNULL)
            echo_metric.samples.append(ms_since(start))

    def measure_create_to_first_output(self) -> None:
        """(a) SDK create, then the first stdout chunk of `echo hi`; (e) envd RSS in the fresh sandbox."""
        create_metric = self.metric("Sandbox.create()", "ms")
        first_metric = self.metric("create -> first output of run('echo hi')", "ms")
        done_metric = self.metric("create -> run('echo hi') returned", "ms")
        rss_metric = self.metric("envd RSS in a fresh sandbox", "MiB", "ps -o rss= -C envd")
        kill_metric = self.metric("Sandbox.kill()", "ms")

        for index in range(self.args.sandboxes):
            first_output: List[float] = []
            start = time.perf_counter()
            sbx = self.create()
            create_metric.samples.append(ms_since(start))

            def on_stdout(_chunk: str, started: float = start, seen: List[float] = first_output) -> None:
                if not seen:
                    seen.append(ms_since(started))

            result = sbx.commands.run("echo hi", on_stdout=on_stdout, timeout=CMD_TIMEOUT)
            done_metric.samples.append(ms_since(start))
            if result.stdout != "hi\n":
                raise RuntimeError(f"sandbox {sbx.sandbox_id}: echo hi printed {result.stdout!r}")
            first_metric.samples.append(first_output[0])

            # `ps` exits 1 when no process is named envd; the sample is then missing.
            rss = sbx.commands.run("ps -o rss= -C envd || true", user="root", timeout=CMD_TIMEOUT).stdout.split()
            if rss:
                rss_metric.samples.append(sum(int(value) for value in rss) / 1024)

            start = time.perf_counter()
            sbx.kill()
            kill_metric.samples.append(ms_since(start))
            self.live.discard(sbx.sandbox_id)
            log(f"[a] sandbox {index + 1}/{self.args.sandboxes}: first output after {first_metric.samples[-1]:.1f} ms")

    def measure_server_timing(self) -> None:
        """(c) Create with httpx to read Server-Timing, then connect with the SDK and run a command."""
        client_metric = self.metric("create HTTP request (client-side)", "ms", f"POST {self.args.create_path}")
        components = {
            name: self.metric(f"Server-Timing {name}", "ms")
            for name in ("slot", "disk", "vmm_restore", "envd_init", "total")
        }
        share = self.metric("Hearth share (total - vmm_restore)", "ms", "the target's definition")
        host_side = self.metric(
            "Hearth host-side work (total - vmm_restore - envd_init)", "ms", "slot, disk, API, database"
        )

        for index in range(self.args.sandboxes):
            start = time.perf_counter()
            response = self.api.post(
                self.args.create_path,
                json={
                    "templateID": self.args.template,
                    "timeout": SANDBOX_TIMEOUT,
                    "metadata": {BENCH_METADATA_KEY: self.run_id},
                },
            )
            elapsed = ms_since(start)
            if response.status_code >= 300:
                raise RuntimeError(
                    f"POST {self.args.create_path} failed with {response.status_code}: {response.text[:300]}"
                )
            sandbox_id = response.json()["sandboxID"]
            self.live.add(sandbox_id)
            client_metric.samples.append(elapsed)

            timings = parse_server_timing(response.headers.get_list("server-timing"))
            if not timings:
                self.missing_server_timing += 1
            for name, metric in components.items():
                if name in timings:
                    metric.samples.append(timings[name])
            if "total" in timings and "vmm_restore" in timings:
                share.samples.append(timings["total"] - timings["vmm_restore"])
                if "envd_init" in timings:
                    host_side.samples.append(timings["total"] - timings["vmm_restore"] - timings["envd_init"])

            sbx = Sandbox.connect(sandbox_id, request_timeout=REQUEST_TIMEOUT)
            result = sbx.commands.run("echo hi", timeout=CMD_TIMEOUT)
            if result.stdout != "hi\n":
                raise RuntimeError(f"sandbox {sandbox_id}: echo hi printed {result.stdout!r}")
            self.kill(sandbox_id)
            log(f"[c] sandbox {index + 1}/{self.args.sandboxes}: Server-Timing {timings or 'missing'}")

    def measure_command_round_trip(self) -> None:
        """(b) run('true') round trips; (d) the same work timed inside the guest."""
        rtt_metric = self.metric("commands.run('true') round trip", "ms")
        guest_true = self.metric("in-guest subprocess.run(['true'])", "ms", "python3 in the guest")
        guest_bash = self.metric("in-guest subprocess.run(['bash','-l','-c','true'])", "ms", "what envd runs")

        for index in range(self.args.run_sandboxes):
            sbx = self.create()
            for _ in range(3):
                sbx.commands.run("true", timeout=CMD_TIMEOUT)
            for _ in range(self.args.run_reps):
                start = time.perf_counter()
                sbx.commands.run("true", timeout=CMD_TIMEOUT)
                rtt_metric.samples.append(ms_since(start))

            sbx.files.write("/tmp/hearth_guest_timing.py", GUEST_TIMING_SCRIPT)
            output = sbx.commands.run(
                f"python3 /tmp/hearth_guest_timing.py {self.args.guest_reps}", timeout=CMD_TIMEOUT
            ).stdout
            samples = json.loads(output)
            guest_true.samples.extend(samples["true"])
            guest_bash.samples.extend(samples["bash_login_true"])
            self.kill(sbx.sandbox_id)
            log(f"[b,d] sandbox {index + 1}/{self.args.run_sandboxes}: run('true') p50 {rtt_metric.pct(0.5):.1f} ms")

    def measure_download(self) -> None:
        """(f) Download one random file through envd and through a plain in-guest server."""
        size = self.args.download_mib * MIB
        path = "/home/user/hearth-bench.bin"
        sdk_metric = self.metric("download via envd, SDK files.read(stream)", "MiB/s")
        url_metric = self.metric("download via envd, httpx on download_url", "MiB/s")
        raw_metric = self.metric("download via in-guest sendfile server (baseline)", "MiB/s", "same proxy, no envd")

        sbx = self.create()
        sbx.commands.run(f"head -c {size} /dev/urandom > {path}", timeout=CMD_TIMEOUT)
        sbx.files.write("/tmp/hearth_raw_server.py", GUEST_RAW_SERVER)
        server = sbx.commands.run(f"python3 /tmp/hearth_raw_server.py {path} {RAW_PORT}", background=True, timeout=0)
        raw_url = self.sandbox_url + "/hearth-bench.bin"
        raw_headers = {"Host": sbx.get_host(RAW_PORT)}
        envd_headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
        self.wait_for_raw_server(raw_url, raw_headers)

        for rep in range(self.args.download_reps):
            sdk_metric.samples.append(self.timed_download(size, lambda: sbx.files.read(path, format="stream")))
            url_metric.samples.append(
                self.timed_download(size, lambda: self.httpx_stream(sbx.download_url(path), envd_headers))
            )
            raw_metric.samples.append(self.timed_download(size, lambda: self.httpx_stream(raw_url, raw_headers)))
            log(
                f"[f] rep {rep + 1}/{self.args.download_reps}: sdk {sdk_metric.samples[-1]:.1f}, "
                f"url {url_metric.samples[-1]:.1f}, raw {raw_metric.samples[-1]:.1f} MiB/s"
            )

        server.kill()
        self.kill(sbx.sandbox_id)

    # Download helpers

    def wait_for_raw_server(self, url: str, headers: Dict[str, str]) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with httpx.stream("GET", url, headers=headers, timeout=10) as response:
                    if response.status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the in-guest baseline server did not respond on port {RAW_PORT} within 90 s")

    @staticmethod
    def httpx_stream(url: str, headers: Dict[str, str]):
        """Yield the body of a GET in chunks, failing on a non-200 status."""
        with httpx.stream("GET", url, headers=headers, timeout=REQUEST_TIMEOUT) as response:
            if response.status_code != 200:
                raise RuntimeError(f"GET {url} returned {response.status_code}")
            yield from response.iter_bytes()

    @staticmethod
    def timed_download(expected: int, open_stream: Callable[[], object]) -> float:
        """Throughput in MiB/s of consuming the stream `open_stream` returns."""
        start = time.perf_counter()
        received = 0
        for chunk in open_stream():  # type: ignore[attr-defined]
            received += len(chunk)
        seconds = time.perf_counter() - start
        if received != expected:
            raise RuntimeError(f"download returned {received} bytes, expected {expected}")
        return received / MIB / seconds

    # Report

    def targets(self) -> List[Target]:
        def p50(name: str) -> float:
            metric = self.metrics.get(name)
            return metric.pct(0.5) if metric and metric.samples else math.nan

        def check(value: float, ok: Callable[[float], bool]) -> Optional[bool]:
            return None if math.isnan(value) else ok(value)

        hearth = p50("Hearth share (total - vmm_restore)")
        host_side = p50("Hearth host-side work (total - vmm_restore - envd_init)")
        overhead_bash = p50("commands.run('true') round trip") - p50(
            "in-guest subprocess.run(['bash','-l','-c','true'])"
        )
        overhead_true = p50("commands.run('true') round trip") - p50("in-guest subprocess.run(['true'])")
        rss = p50("envd RSS in a fresh sandbox")
        # The target compares the two paths read by the same client (httpx), so
        # client-side overhead cancels; the SDK's own reader is reported beside it.
        baseline = p50("download via in-guest sendfile server (baseline)")
        ratio = p50("download via envd, httpx on download_url") / baseline
        sdk_ratio = p50("download via envd, SDK files.read(stream)") / baseline
        return [
            Target("Hearth share of create p50 <= 5 ms", f"{hearth:.2f} ms", check(hearth, lambda v: v <= 5)),
            Target(
                "Hearth host-side share of create p50 <= 5 ms (guest's envd_init left out)",
                f"{host_side:.2f} ms",
                check(host_side, lambda v: v <= 5),
            ),
            Target(
                "run('true') p50 <= 1 ms above in-guest `bash -l -c true` p50",
                f"{overhead_bash:+.2f} ms (above plain `true`: {overhead_true:+.2f} ms)",
                check(overhead_bash, lambda v: v <= 1),
            ),
            Target("envd RSS p50 <= 8 MiB", f"{rss:.2f} MiB", check(rss, lambda v: v <= 8)),
            Target(
                "envd download p50 >= 80% of baseline p50 (both read with httpx)",
                f"{ratio * 100:.1f}% (SDK reader: {sdk_ratio * 100:.1f}%)",
                check(ratio, lambda v: v >= 0.8),
            ),
        ]

    def render_markdown(self, wall_seconds: float) -> str:
        lines = [
            "# Hearth SDK benchmark",
            "",
            f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- host: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}",
            f"- command: `{' '.join(sys.argv)}`",
            f"- API {self.api_url}, proxy {self.sandbox_url}, template `{self.args.template}`",
            f"- wall time: {wall_seconds:.0f} s",
            "",
            "| metric | n | p50 | p90 | p99 | mean | unit | note |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for metric in self.metrics.values():
            lines.append(
                f"| {metric.name} | {len(metric.samples)} | {metric.pct(0.5):.2f} | {metric.pct(0.9):.2f} "
                f"| {metric.pct(0.99):.2f} | {metric.mean():.2f} | {metric.unit} | {metric.note} |"
            )
        lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
        for target in self.targets():
            if target.met is None:
                verdict = "n/a"
            elif target.met:
                verdict = "yes"
            else:
                verdict = "NO"
            lines.append(f"| {target.description} | {target.measured} | {verdict} |")
        if self.missing_server_timing:
            lines += [
                "",
                f"{self.missing_server_timing} create responses had no Server-Timing header.",
            ]
        if self.failures:
            lines += ["", "Phases that failed (their metrics are partial or empty):", ""]
            lines += [f"- {failure}" for failure in self.failures]
        lines += [
            "",
            "The download baseline is a Python `os.sendfile` server in the guest reached through the same",
            "proxy, because a raw TCP stream cannot pass the HTTP proxy and the per-sandbox host route is",
            "internal to the server.",
        ]
        return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=20, help="sandboxes for create latency (a, c, e); default 20")
    parser.add_argument("--run-sandboxes", type=int, default=3, help="sandboxes for run('true') timing; default 3")
    parser.add_argument("--run-reps", type=int, default=50, help="run('true') repetitions per sandbox; default 50")
    parser.add_argument("--guest-reps", type=int, default=100, help="in-guest repetitions per sandbox; default 100")
    parser.add_argument("--download-mib", type=int, default=100, help="download size in MiB; default 100")
    parser.add_argument("--download-reps", type=int, default=3, help="downloads per path; default 3")
    parser.add_argument("--template", default="base", help="template to create sandboxes from; default base")
    parser.add_argument(
        "--create-path",
        default="/v2/sandboxes",
        help="API path for the httpx create that reads Server-Timing; default /v2/sandboxes, "
        "the path e2b 2.63.0 uses (/sandboxes is the older one)",
    )
    parser.add_argument("--out", help="write the Markdown report to this file")
    args = parser.parse_args(argv)
    for name in ("sandboxes", "run_sandboxes", "run_reps", "guest_reps", "download_mib", "download_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    missing = [name for name in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY") if not os.environ.get(name)]
    if missing:
        log(f"missing environment variables {', '.join(missing)}: start `hearth serve` and export them first")
        return 2

    bench = Bench(args)
    started = time.perf_counter()
    phases = [
        bench.measure_local_floors,
        bench.measure_create_to_first_output,
        bench.measure_server_timing,
        bench.measure_command_round_trip,
        bench.measure_download,
    ]
    try:
        for phase in phases:
            try:
                phase()
            except Exception as err:  # noqa: BLE001 - reported, and the other phases still run
                log(f"phase {phase.__name__} failed: {err!r}")
                bench.failures.append(f"{phase.__name__}: {err!r}")
            finally:
                bench.kill_all()
    finally:
        bench.kill_all()

    report = bench.render_markdown(time.perf_counter() - started)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(report)
        log(f"wrote {args.out}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
