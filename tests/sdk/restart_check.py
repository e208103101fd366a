#!/usr/bin/env python3
"""Checks that sandboxes outlive a restart of `hearth serve` as documented.

`scripts/test.sh` runs it twice around a restart of the server:

    restart_check.py prepare STATE_FILE   # before the server stops
    restart_check.py verify STATE_FILE    # after it is up again

`prepare` creates three sandboxes, each with a file and a background process: one it
pauses, one created with autoPause (which the clean stop pauses), and one plain running
sandbox (which the stop kills). `verify` resumes the first two through `connect` and
checks the file and the process, and checks that the third is gone. It kills every
sandbox it created. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import json
import sys

from e2b import NotFoundException, Sandbox, SandboxState

REQUEST_TIMEOUT = 120


def prepare(state_file: str) -> None:
    state = {}
    for name, options in (("paused", {}), ("auto_pause", {"lifecycle": {"on_timeout": "pause"}}), ("running", {})):
        sandbox = Sandbox.create("base", timeout=600, request_timeout=REQUEST_TIMEOUT, **options)
        sandbox.files.write("/home/user/restart.txt", name)
        handle = sandbox.commands.run("sleep 3600", background=True)
        state[name] = {"id": sandbox.sandbox_id, "pid": handle.pid}
        if name == "paused":
            sandbox.pause()
    with open(state_file, "w", encoding="utf-8") as out:
        json.dump(state, out)
    print(f"prepared {state}")


def verify(state_file: str) -> None:
    with open(state_file, encoding="utf-8") as source:
        state = json.load(source)
    failures = []
    for name in ("paused", "auto_pause"):
        sandbox_id, pid = state[name]["id"], state[name]["pid"]
        info = Sandbox.get_info(sandbox_id, request_timeout=REQUEST_TIMEOUT)
        if info.state != SandboxState.PAUSED:
            failures.append(f"{name}: state after the restart is {info.state}, expected paused")
            continue
        sandbox = Sandbox.connect(sandbox_id, timeout=120, request_timeout=REQUEST_TIMEOUT)
        content = sandbox.files.read("/home/user/restart.txt")
        if content != name:
            failures.append(f"{name}: file holds {content!r} after the resume")
        pids = [process.pid for process in sandbox.commands.list()]
        if pid not in pids:
            failures.append(f"{name}: process {pid} is gone after the resume (running: {pids})")
        sandbox.kill()
    try:
        Sandbox.get_info(state["running"]["id"], request_timeout=REQUEST_TIMEOUT)
        failures.append("running: a sandbox without autoPause survived the restart")
        Sandbox.kill(state["running"]["id"])
    except NotFoundException:
        pass
    if failures:
        for failure in failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    print("restart check passed: paused and autoPause sandboxes resumed with their files and processes")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "verify"):
        print("usage: restart_check.py prepare|verify STATE_FILE", file=sys.stderr)
        sys.exit(2)
    (prepare if sys.argv[1] == "prepare" else verify)(sys.argv[2])
