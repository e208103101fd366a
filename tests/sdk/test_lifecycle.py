"""Sandbox lifecycle through the SDK: create, list, connect, timeout, kill, and API errors.

Needs a running `hearth serve` and starts real VMs (see conftest.py).
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
from e2b import (
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)

from sdk_helpers import CMD_TIMEOUT, REQUEST_TIMEOUT, wait_until

# Well-formed (e2b_ plus 40 hex characters) but never issued by the server.
BAD_API_KEY = "e2b_" + "0" * 40

UNKNOWN_SANDBOX_ID = "hearthnosuchsandbox0"

# Seconds a sandbox may outlive its timeout before the test counts it as not expired.
EXPIRY_GRACE = 30


def list_ids(metadata: dict[str, str]) -> set[str]:
    """IDs of all sandboxes whose metadata contains `metadata`, across all pages."""
    paginator = Sandbox.list(query=SandboxQuery(metadata=metadata), request_timeout=REQUEST_TIMEOUT)
    ids: set[str] = set()
    while paginator.has_next:
        ids.update(info.sandbox_id for info in paginator.next_items())
    return ids


def is_gone(sandbox_id: str) -> bool:
    try:
        Sandbox.get_info(sandbox_id, request_timeout=REQUEST_TIMEOUT)
    except SandboxNotFoundException:
        return True
    return False


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def test_create_then_kill(new_sandbox):
    case = uuid.uuid4().hex
    sbx = new_sandbox(metadata={"case": case})

    assert sbx.is_running()
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.state == SandboxState.RUNNING
    assert info.metadata.get("case") == case
    assert sbx.sandbox_id in list_ids({"case": case})

    assert sbx.kill() is True

    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    # For a sandbox that no longer exists the proxy returns 502 "... was not
    # found", which the SDK raises as SandboxNotRunningException.
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true", timeout=CMD_TIMEOUT)
    assert sbx.is_running() is False
    assert sbx.sandbox_id not in list_ids({"case": case})
    assert Sandbox.kill(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT) is False


def test_list_filters_by_metadata(new_sandbox):
    case = uuid.uuid4().hex
    first = new_sandbox(metadata={"case": case, "role": "first"})
    second = new_sandbox(metadata={"case": case, "role": "second"})

    only_first = list_ids({"case": case, "role": "first"})
    both = list_ids({"case": case})

    assert only_first == {first.sandbox_id}
    assert both == {first.sandbox_id, second.sandbox_id}
    assert list_ids({"case": case, "role": "absent"}) == set()


def test_list_filter_value_with_space(new_sandbox):
    """The SDK percent-encodes metadata filter values twice; the server must decode both layers."""
    case = uuid.uuid4().hex
    blue = new_sandbox(metadata={"case": case, "colour": "blue green"})
    new_sandbox(metadata={"case": case, "colour": "red"})

    assert list_ids({"case": case, "colour": "blue green"}) == {blue.sandbox_id}


def test_list_returns_metadata_and_state(new_sandbox):
    case = uuid.uuid4().hex
    sbx = new_sandbox(metadata={"case": case, "colour": "blue green"})

    paginator = Sandbox.list(query=SandboxQuery(metadata={"case": case}), request_timeout=REQUEST_TIMEOUT)
    listed = paginator.next_items()

    assert [info.sandbox_id for info in listed] == [sbx.sandbox_id]
    assert listed[0].metadata.get("colour") == "blue green"
    assert listed[0].state == SandboxState.RUNNING
    assert listed[0].envd_version != ""


@pytest.mark.timeout(180)
def test_timeout_expiry_removes_sandboxes(new_sandbox):
    """A sandbox created with a short timeout, and one shortened with set_timeout, both expire."""
    timeout = 15
    created_at = time.monotonic()
    short = new_sandbox(timeout=timeout)
    shortened = new_sandbox(timeout=300)
    shortened.set_timeout(timeout)

    remaining = (as_utc(shortened.get_info().end_at) - datetime.now(timezone.utc)).total_seconds()
    assert remaining <= timeout + 5
    assert remaining > 0

    # Both must still run shortly before their deadline: expiry is not immediate.
    time.sleep(max(0.0, created_at + timeout - 7 - time.monotonic()))
    assert short.is_running()
    assert shortened.is_running()

    deadline_left = created_at + timeout + EXPIRY_GRACE - time.monotonic()
    assert wait_until(lambda: is_gone(short.sandbox_id), deadline_left, interval=1.0)
    assert wait_until(lambda: is_gone(shortened.sandbox_id), 5, interval=1.0)
    with pytest.raises(SandboxNotRunningException):
        short.commands.run("true", timeout=CMD_TIMEOUT)


def test_set_timeout_extends(new_sandbox):
    sbx = new_sandbox(timeout=60)

    sbx.set_timeout(600)

    remaining = (as_utc(sbx.get_info().end_at) - datetime.now(timezone.utc)).total_seconds()
    assert remaining > 500
    assert remaining <= 605


def test_connect_second_client(sandbox):
    path = f"/home/user/second-client-{uuid.uuid4().hex}.txt"
    sandbox.files.write(path, "written by client one")

    other = Sandbox.connect(sandbox.sandbox_id, request_timeout=REQUEST_TIMEOUT)

    assert other.sandbox_id == sandbox.sandbox_id
    assert other.commands.run(f"cat {path}", timeout=CMD_TIMEOUT).stdout == "written by client one"
    assert other.files.read(path) == "written by client one"

    other.files.write(path + ".reply", "written by client two")
    assert sandbox.files.read(path + ".reply") == "written by client two"


def test_bad_api_key_create():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=BAD_API_KEY, request_timeout=REQUEST_TIMEOUT)


def test_bad_api_key_list():
    paginator = Sandbox.list(api_key=BAD_API_KEY, request_timeout=REQUEST_TIMEOUT)
    with pytest.raises(AuthenticationException):
        paginator.next_items()


def test_bad_api_key_get_info(sandbox):
    with pytest.raises(AuthenticationException):
        Sandbox.get_info(sandbox.sandbox_id, api_key=BAD_API_KEY, request_timeout=REQUEST_TIMEOUT)


def test_unknown_template_rejected(hearth_env):
    name = f"hearth-no-such-template-{uuid.uuid4().hex[:8]}"

    with pytest.raises(SandboxException) as excinfo:
        Sandbox.create(template=name, request_timeout=REQUEST_TIMEOUT)

    assert excinfo.value.status_code == 404
    assert name in str(excinfo.value)


def test_unknown_sandbox_get_info(hearth_env):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(UNKNOWN_SANDBOX_ID, request_timeout=REQUEST_TIMEOUT)


def test_unknown_sandbox_connect(hearth_env):
    with pytest.raises(NotFoundException):
        Sandbox.connect(UNKNOWN_SANDBOX_ID, request_timeout=REQUEST_TIMEOUT)


def test_unknown_sandbox_set_timeout(hearth_env):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(UNKNOWN_SANDBOX_ID, 60, request_timeout=REQUEST_TIMEOUT)


def test_unknown_sandbox_kill_returns_false(hearth_env):
    assert Sandbox.kill(UNKNOWN_SANDBOX_ID, request_timeout=REQUEST_TIMEOUT) is False
