#!/usr/bin/env python3
"""Time `PUT /sandboxes/{id}/network` (the SDK's `update_network`) on a running sandbox.

Each sample replaces the sandbox's rules with a different policy (deny all, a CIDR list,
domain names, open again) and measures the request as the client sees it. The request
returns after the node agent has loaded the rules and reset the guest's connections, so
this is the time until new rules are in force.

Usage (against a running `hearth serve`, with E2B_API_URL and E2B_API_KEY set):
    /opt/hearth-venv/bin/python bench/network_update_bench.py --samples 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx

POLICIES = [
    {"allow_internet_access": False},
    {"denyOut": ["0.0.0.0/0"], "allowOut": ["192.0.2.0/24", "198.51.100.7"]},
    {"denyOut": ["0.0.0.0/0"], "allowOut": ["*.example.com", "api.example.org"]},
    {},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    api = os.environ["E2B_API_URL"].rstrip("/")
    headers = {"X-API-Key": os.environ["E2B_API_KEY"]}
    with httpx.Client(timeout=60, headers=headers) as client:
        created = client.post(f"{api}/sandboxes", json={"templateID": "base", "timeout": 600})
        created.raise_for_status()
        sandbox_id = created.json()["sandboxID"]
        try:
            times = []
            for sample in range(args.samples):
                body = POLICIES[sample % len(POLICIES)]
                started = time.perf_counter()
                reply = client.put(f"{api}/sandboxes/{sandbox_id}/network", json=body)
                times.append((time.perf_counter() - started) * 1000)
                reply.raise_for_status()
        finally:
            client.delete(f"{api}/sandboxes/{sandbox_id}")
    times.sort()
    p90 = times[int(len(times) * 0.9) - 1]
    print(f"update_network: n={len(times)} p50={statistics.median(times):.1f} ms "
          f"p90={p90:.1f} ms max={times[-1]:.1f} ms (target: under 1000 ms)")


if __name__ == "__main__":
    main()
