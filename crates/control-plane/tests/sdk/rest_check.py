"""Check that the e2b Python SDK parses the control plane's REST responses.

Run by tests/sdk_python.rs against a server on 127.0.0.1 with the recording runtime, so
no sandbox has a real envd: only REST calls are made. E2B_API_URL and E2B_API_KEY come
from the environment.
"""

import os
import sys

from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
)


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    sandbox = Sandbox.create(template="base", timeout=120, metadata={"suite": "sdk rest", "n": "1"}, envs={"A": "b"})
    check(len(sandbox.sandbox_id) > 0, "create returned no sandbox ID")
    check(sandbox._envd_access_token is not None, "create returned no envd access token")
    other = Sandbox.create(template="base", metadata={"suite": "other"})

    info = Sandbox.get_info(sandbox.sandbox_id)
    check(info.sandbox_id == sandbox.sandbox_id, f"get_info returned {info.sandbox_id}")
    check(info.name == "base", f"get_info name {info.name!r}")
    check(info.metadata == {"suite": "sdk rest", "n": "1"}, f"get_info metadata {info.metadata}")
    check(info.state == SandboxState.RUNNING, f"get_info state {info.state}")
    check(info.cpu_count == 2 and info.memory_mb == 512, f"get_info resources {info.cpu_count} {info.memory_mb}")
    lifetime = (info.end_at - info.started_at).total_seconds()
    check(119 <= lifetime <= 121, f"lifetime {lifetime}")

    paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": "sdk rest"}))
    items = paginator.next_items()
    check([s.sandbox_id for s in items] == [sandbox.sandbox_id], f"metadata filter listed {items}")
    check(not paginator.has_next, "single page reported more pages")

    paginator = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING]), limit=1)
    seen = []
    while paginator.has_next:
        seen.extend(s.sandbox_id for s in paginator.next_items())
    check(sorted(seen) == sorted([sandbox.sandbox_id, other.sandbox_id]), f"paginated list {seen}")

    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    check(paused == [], f"paused list {paused}")

    Sandbox.set_timeout(sandbox.sandbox_id, 600)
    info = Sandbox.get_info(sandbox.sandbox_id)
    remaining = (info.end_at - info.started_at).total_seconds()
    check(remaining >= 599, f"set_timeout did not extend: {remaining}")

    connected = Sandbox.connect(sandbox.sandbox_id)
    check(connected.sandbox_id == sandbox.sandbox_id, "connect returned another sandbox")
    check(connected._envd_access_token == sandbox._envd_access_token, "connect returned another token")

    try:
        Sandbox.create(template="no-such-template")
        check(False, "create with an unknown template succeeded")
    except SandboxException as err:
        check("no-such-template" in str(err), f"unknown template error {err}")

    try:
        Sandbox.set_timeout(sandbox.sandbox_id, 10**9)
        check(False, "set_timeout beyond the maximum succeeded")
    except SandboxException as err:
        check("400" in str(err), f"set_timeout error {err}")

    check(sandbox.pause() is True, "pause returned False")
    check(sandbox.pause() is False, "second pause returned True")
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    check([s.sandbox_id for s in paused] == [sandbox.sandbox_id], f"paused list {paused}")
    check(Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED, "state is not paused")
    resumed = Sandbox.connect(sandbox.sandbox_id)
    check(resumed.sandbox_id == sandbox.sandbox_id, "connect resumed another sandbox")
    check(Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.RUNNING, "connect did not resume")

    check(Sandbox.kill(sandbox.sandbox_id) is True, "kill returned False")
    check(Sandbox.kill(sandbox.sandbox_id) is False, "second kill returned True")
    try:
        Sandbox.get_info(sandbox.sandbox_id)
        check(False, "get_info of a killed sandbox succeeded")
    except NotFoundException:
        pass

    try:
        Sandbox.list(api_key="e2b_" + "f" * 40).next_items()
        check(False, "list with an unknown key succeeded")
    except AuthenticationException:
        pass

    check(Sandbox.kill(other.sandbox_id) is True, "kill of the second sandbox returned False")
    print("sdk rest check passed")


if __name__ == "__main__":
    main()
