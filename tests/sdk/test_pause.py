"""Pause, resume, fork and snapshots through the official SDK against a live Hearth:
files and processes survive, the guest clock follows the host, and the SDK's
state filters, connect and autoPause behave as on E2B."""

from __future__ import annotations

import time

import pytest
from e2b import NotFoundException, Sandbox, SandboxException, SandboxQuery, SandboxState

from sdk_helpers import CMD_TIMEOUT, REQUEST_TIMEOUT, StreamCollector, create_sandbox, kill_quietly, wait_until

ECHO_LOOP = 'while IFS= read -r line; do echo "got:$line"; done'


def guest_clock_offset(sbx: Sandbox) -> float:
    """Seconds between the guest's wall clock and the host's, measured around one command."""
    before = time.time()
    guest = float(sbx.commands.run("date +%s.%N", timeout=CMD_TIMEOUT).stdout.strip())
    after = time.time()
    # The command's own duration is not clock error: compare with the nearest host time.
    if before <= guest <= after:
        return 0.0
    return min(abs(guest - before), abs(guest - after))


def state_of(sandbox_id: str) -> SandboxState:
    return Sandbox.get_info(sandbox_id, request_timeout=REQUEST_TIMEOUT).state


def test_pause_resume_keeps_files_processes_and_clock(request):
    sbx = create_sandbox(request.addfinalizer)
    assert guest_clock_offset(sbx) < 1.0
    handle = sbx.commands.run(ECHO_LOOP, background=True, stdin=True, timeout=0)
    sbx.files.write("/home/user/before.txt", "written before the pause")

    assert sbx.pause() is True
    assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED], metadata={}))
    assert sbx.sandbox_id in [s.sandbox_id for s in paused.next_items()]
    running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING]))
    assert sbx.sandbox_id not in [s.sandbox_id for s in running.next_items()]
    time.sleep(3)

    resumed = Sandbox.connect(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    assert state_of(sbx.sandbox_id) == SandboxState.RUNNING
    assert guest_clock_offset(resumed) < 1.0
    assert resumed.files.read("/home/user/before.txt") == "written before the pause"

    listed = [p.pid for p in resumed.commands.list()]
    assert handle.pid in listed
    reattached = resumed.commands.connect(handle.pid, timeout=CMD_TIMEOUT)
    output = StreamCollector(reattached)
    resumed.commands.send_stdin(handle.pid, "after-resume\n")
    assert output.wait_stdout("got:after-resume\n")
    assert resumed.commands.kill(handle.pid) is True


def test_second_pause_of_a_paused_sandbox_returns_false(request):
    sbx = create_sandbox(request.addfinalizer)
    assert sbx.pause() is True
    assert Sandbox.pause(sbx.sandbox_id) is False
    Sandbox.kill(sbx.sandbox_id)
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_auto_pause_at_timeout_then_connect_resumes(request):
    sbx = create_sandbox(request.addfinalizer, timeout=5, lifecycle={"on_timeout": "pause"})
    sbx.files.write("/home/user/auto.txt", "auto")
    assert wait_until(lambda: state_of(sbx.sandbox_id) == SandboxState.PAUSED, 60, interval=1)

    resumed = Sandbox.connect(sbx.sandbox_id, timeout=120, request_timeout=REQUEST_TIMEOUT)
    assert resumed.files.read("/home/user/auto.txt") == "auto"


def test_fork_copies_state_and_keeps_the_parent(request):
    parent = create_sandbox(request.addfinalizer)
    parent.files.write("/home/user/parent.txt", "from the parent")

    forks = parent.fork(count=2, timeout=300)
    for fork in forks:
        assert isinstance(fork, Sandbox), fork
        request.addfinalizer(lambda fork=fork: kill_quietly(fork.sandbox_id))
    assert len({f.sandbox_id for f in forks} | {parent.sandbox_id}) == 3
    for n, fork in enumerate(forks):
        assert fork.files.read("/home/user/parent.txt") == "from the parent"
        fork.files.write("/home/user/fork.txt", f"fork {n}")
    assert forks[1].files.read("/home/user/fork.txt") == "fork 1"
    assert not parent.files.exists("/home/user/fork.txt")
    assert parent.commands.run("true", timeout=CMD_TIMEOUT).exit_code == 0


def test_snapshot_creates_new_sandboxes_and_is_listed(request):
    source = create_sandbox(request.addfinalizer)
    source.files.write("/home/user/snap.txt", "snapshotted")
    name = f"suite-snap-{int(time.time() * 1000)}"

    info = source.create_snapshot(name=name)
    assert info.names == [name]
    listed = [s.snapshot_id for s in source.list_snapshots().next_items()]
    assert info.snapshot_id in listed

    child = create_sandbox(request.addfinalizer, template=info.snapshot_id)
    assert child.files.read("/home/user/snap.txt") == "snapshotted"
    assert source.commands.run("true", timeout=CMD_TIMEOUT).exit_code == 0

    # A snapshot in use cannot be deleted; once its sandbox is gone it can.
    with pytest.raises(SandboxException):
        Sandbox.delete_snapshot(info.snapshot_id)
    child.kill()
    assert Sandbox.delete_snapshot(info.snapshot_id) is True
    assert info.snapshot_id not in [s.snapshot_id for s in source.list_snapshots().next_items()]


def test_auto_resume_on_traffic_through_the_proxy(request):
    sbx = create_sandbox(request.addfinalizer, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sbx.files.write("/home/user/woken.txt", "woken by traffic")
    assert sbx.pause() is True
    assert state_of(sbx.sandbox_id) == SandboxState.PAUSED

    # No connect: the file read reaches the proxy, which resumes the sandbox first.
    assert sbx.files.read("/home/user/woken.txt") == "woken by traffic"
    assert state_of(sbx.sandbox_id) == SandboxState.RUNNING
