#!/usr/bin/env python3
"""Benchmark template builds through the E2B SDK's template builder.

Run it against a running `hearth serve` with the SDK suite's environment (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY) and HEARTH_OCI_PUSH naming `hearth-oci-push`:

    /opt/hearth-venv/bin/python bench/template_bench.py --rounds 3 --out template-bench.md

Two templates, each built cold and then rebuilt with only its last step changed; the
target is a rebuild in at most 15% of the full build's time.

- small image: a 3 MB image (static busybox and bash) pushed to a registry that the
  benchmark starts on loopback, with a new digest every round so that the full build
  pulls, unpacks and formats it; then a RUN, a COPY, ENV, WORKDIR, USER, a last RUN and a
  start command with a ready check.
- Debian base with work: `from_base_image()` (Hearth's base template) with a RUN that
  byte-compiles Python's standard library (CPU work of the kind package installs do),
  a COPY and a last RUN. The first RUN writes the round's marker, so no round reuses
  another's layers.

Each build is timed from the `Template.build` call to its return (the SDK polls the
build status every 0.2 s). Templates are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, List

import httpx
from e2b import Template

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sdk"))
from image_helpers import add_user, loopback_registry, push_tiny_image  # noqa: E402

TARGET_RATIO = 0.15


def timed(build: Callable[[], None]) -> float:
    started = time.monotonic()
    build()
    return time.monotonic() - started


def delete_template(name: str) -> None:
    api = os.environ["E2B_API_URL"]
    headers = {"X-API-Key": os.environ["E2B_API_KEY"]}
    found = httpx.get(f"{api}/templates/aliases/{name}", headers=headers, timeout=30)
    if found.status_code == 200:
        httpx.delete(f"{api}/templates/{found.json()['templateID']}", headers=headers, timeout=120)


def small_image_round(registry: str, context: Path, run_id: str, round_index: int) -> tuple[float, float]:
    image = push_tiny_image(registry, "hearth-bench/tiny", f"{run_id}-{round_index}", marker=f"{run_id}-{round_index}")
    name = f"bench-small-{run_id}-{round_index}"

    def template(last: str) -> Template:
        return (
            Template(file_context_path=str(context))
            .from_image(image)
            .run_cmd(add_user("app", 1234) + " && mkdir -p /srv/www")
            .copy("site/", "/srv/www/", user="app")
            .set_envs({"MODE": "bench"})
            .set_workdir("/srv/www")
            .set_user("app")
            .run_cmd(f"echo {last} > /srv/www/last.txt")
            .set_start_cmd("busybox httpd -f -p 8080 -h /srv/www", "wget -q -O /dev/null http://127.0.0.1:8080/")
        )

    try:
        full = timed(lambda: Template.build(template("first"), name, cpu_count=1, memory_mb=256))
        rebuild = timed(lambda: Template.build(template("second"), name, cpu_count=1, memory_mb=256))
    finally:
        delete_template(name)
    return full, rebuild


def debian_round(context: Path, run_id: str, round_index: int) -> tuple[float, float]:
    name = f"bench-debian-{run_id}-{round_index}"

    def template(last: str) -> Template:
        return (
            Template(file_context_path=str(context))
            .from_base_image()
            # The round's marker makes every step's cache key new, so the full build runs
            # every step and only the rebuild finds cached layers.
            .run_cmd(f"echo {run_id}-{round_index} > /etc/bench-round && python3 -m compileall -q -f /usr/lib/python3.11", user="root")
            .copy("site/", "/home/user/site/", user="user")
            .run_cmd(f"echo {last} > /home/user/last.txt")
        )

    try:
        full = timed(lambda: Template.build(template("first"), name))
        rebuild = timed(lambda: Template.build(template("second"), name))
    finally:
        delete_template(name)
    return full, rebuild


def summary(label: str, fulls: List[float], rebuilds: List[float]) -> str:
    full = statistics.median(fulls)
    rebuild = statistics.median(rebuilds)
    ratio = rebuild / full
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    samples = ", ".join(f"{f:.1f}/{r:.1f}" for f, r in zip(fulls, rebuilds))
    return f"| {label} | {full:.1f} s | {rebuild:.1f} s | {ratio:.0%} ({verdict}) | {samples} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="builds of each template (default 3)")
    parser.add_argument("--skip-debian", action="store_true", help="only the small image")
    parser.add_argument("--out", type=Path, help="also write the result table to this file")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    for variable in ("E2B_API_URL", "E2B_API_KEY"):
        if not os.environ.get(variable):
            parser.error(f"{variable} is not set; start `hearth serve` and export the SDK's variables")

    run_id = uuid.uuid4().hex[:8]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        context = Path(workdir)
        (context / "site").mkdir()
        (context / "site" / "index.html").write_text("benchmark site\n")
        with loopback_registry() as registry:
            fulls, rebuilds = [], []
            for index in range(args.rounds):
                full, rebuild = small_image_round(registry, context, run_id, index)
                print(f"small image round {index + 1}: full {full:.1f} s, rebuild {rebuild:.1f} s", flush=True)
                fulls.append(full)
                rebuilds.append(rebuild)
            rows.append(summary("small image (3 MB, 7 steps, start command)", fulls, rebuilds))
        if not args.skip_debian:
            fulls, rebuilds = [], []
            for index in range(args.rounds):
                full, rebuild = debian_round(context, run_id, index)
                print(f"Debian base round {index + 1}: full {full:.1f} s, rebuild {rebuild:.1f} s", flush=True)
                fulls.append(full)
                rebuilds.append(rebuild)
            rows.append(summary("Debian base, byte-compiling the stdlib", fulls, rebuilds))

    table = "\n".join(
        [
            f"Template builds, p50 of {args.rounds} rounds (target: rebuild ≤ {TARGET_RATIO:.0%} of the full build)",
            "",
            "| template | full build | rebuild, last step changed | rebuild / full | samples (full/rebuild) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
