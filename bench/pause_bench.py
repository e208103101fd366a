#!/usr/bin/env python3
"""Benchmark pause, resume and fork of a running Hearth server through the E2B SDK
and the REST API.

Run it with the SDK suite's environment (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY):

    /opt/hearth-venv/bin/python bench/pause_bench.py --sandboxes 5 --label "512 MiB"

Per sandbox it measures, in this order:

1. a 16 MiB file is written in the guest (page cache the first pause must save);
2. first pause: `POST /sandboxes/{id}/pause`, timed at the client, with the server's
   `Hearth-Bytes-Written` header;
3. first resume: `POST /sandboxes/{id}/resume`, then `commands.run("true")` on the SDK
   object created before the pause; resume-to-first-command spans both. The resume's
   `Server-Timing` gives `vmm_restore` (the VMM's own restore) and `envd_init` (the
   restored guest answering envd's `/init`); Hearth's host-side overhead is
   `total - vmm_restore - envd_init`;
4. second pause and second resume right away, measured the same way;
5. a 4 KiB file is written, then a third pause ("after a small change") and resume;
6. a fork with `count=1`, timed at the client; the fork is killed.

Every sandbox it creates is killed on exit. Traffic goes only to the URLs in the
environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import httpx
from e2b import Sandbox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sdk_bench import Metric, log, ms_since, parse_server_timing  # noqa: E402

REQUEST_TIMEOUT = 300
SANDBOX_TIMEOUT = 900
MIB = 1024 * 1024


class PauseBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.api = httpx.Client(
            base_url=os.environ["E2B_API_URL"],
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
            timeout=REQUEST_TIMEOUT,
        )
        self.metrics: Dict[str, Metric] = {}
        self.created: List[str] = []

    def metric(self, name: str, unit: str = "ms") -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit)
        return self.metrics[name]

    def pause(self, sandbox_id: str, label: str) -> None:
        start = time.perf_counter()
        reply = self.api.post(f"/sandboxes/{sandbox_id}/pause", json={})
        elapsed = ms_since(start)
        if reply.status_code != 204:
            raise RuntimeError(f"pause of {sandbox_id} failed: HTTP {reply.status_code} {reply.text}")
        self.metric(f"{label} pause (client)").samples.append(elapsed)
        written = int(reply.headers.get("hearth-bytes-written", "0"))
        self.metric(f"{label} pause bytes written", "MiB").samples.append(written / MIB)

    def resume_and_run(self, sandbox: Sandbox, label: str) -> None:
        start = time.perf_counter()
        reply = self.api.post(f"/sandboxes/{sandbox.sandbox_id}/resume", json={"timeout": SANDBOX_TIMEOUT})
        resumed = ms_since(start)
        if reply.status_code != 201:
            raise RuntimeError(f"resume of {sandbox.sandbox_id} failed: HTTP {reply.status_code} {reply.text}")
        result = sandbox.commands.run("true", timeout=REQUEST_TIMEOUT)
        first_command = ms_since(start)
        if result.exit_code != 0:
            raise RuntimeError(f"first command after resume exited {result.exit_code}")
        timing = parse_server_timing(reply.headers.get_list("server-timing"))
        self.metric(f"{label} resume (client)").samples.append(resumed)
        self.metric(f"{label} resume-to-first-command").samples.append(first_command)
        for phase in ("vmm_restore", "envd_init", "total"):
            if phase in timing:
                self.metric(f"{label} resume server {phase}").samples.append(timing[phase])
        if {"total", "vmm_restore", "envd_init"} <= timing.keys():
            overhead = timing["total"] - timing["vmm_restore"] - timing["envd_init"]
            self.metric(f"{label} resume Hearth host-side overhead").samples.append(overhead)

    def fork(self, sandbox_id: str) -> None:
        start = time.perf_counter()
        reply = self.api.post(f"/sandboxes/{sandbox_id}/fork", json={"count": 1, "timeout": 120})
        elapsed = ms_since(start)
        if reply.status_code != 201:
            raise RuntimeError(f"fork of {sandbox_id} failed: HTTP {reply.status_code} {reply.text}")
        for entry in reply.json():
            if "sandbox" not in entry:
                raise RuntimeError(f"fork of {sandbox_id} failed: {entry}")
            self.created.append(entry["sandbox"]["sandboxID"])
        self.metric("fork count=1 (client)").samples.append(elapsed)

    def run_one(self, index: int) -> None:
        sandbox = Sandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT, metadata={"hearth-bench": "pause"})
        self.created.append(sandbox.sandbox_id)
        sandbox.commands.run("head -c 16777216 /dev/urandom > /home/user/ballast.bin", timeout=REQUEST_TIMEOUT)

        self.pause(sandbox.sandbox_id, "first")
        self.resume_and_run(sandbox, "first")
        self.pause(sandbox.sandbox_id, "second")
        self.resume_and_run(sandbox, "second")
        sandbox.files.write("/home/user/small.txt", "x" * 4096)
        self.pause(sandbox.sandbox_id, "small-change")
        self.resume_and_run(sandbox, "small-change")
        self.fork(sandbox.sandbox_id)
        log(f"sandbox {index + 1}/{self.args.sandboxes} done")

    def cleanup(self) -> None:
        for sandbox_id in self.created:
            try:
                self.api.delete(f"/sandboxes/{sandbox_id}")
            except httpx.HTTPError as err:
                log(f"kill of {sandbox_id} failed: {err}")

    def report(self) -> str:
        lines = [
            f"### {self.args.label}",
            "",
            "| metric | p50 | p90 | mean | samples |",
            "| --- | --- | --- | --- | --- |",
        ]
        for metric in self.metrics.values():
            lines.append(
                f"| {metric.name} | {metric.pct(0.5):.1f} {metric.unit} | {metric.pct(0.9):.1f} {metric.unit} "
                f"| {metric.mean():.1f} {metric.unit} | {len(metric.samples)} |"
            )
        return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=5, help="sandboxes to measure (default 5)")
    parser.add_argument("--label", default="", help="heading of the result table, such as the memory size")
    parser.add_argument("--out", help="append the Markdown table to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.sandboxes <= 100:
        parser.error(f"invalid --sandboxes {args.sandboxes}: must be between 1 and 100")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    bench = PauseBench(args)
    try:
        for index in range(args.sandboxes):
            bench.run_one(index)
    finally:
        bench.cleanup()
    table = bench.report()
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
