"""Background commands: stdin, listing, reattaching from a second client, kill.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import pytest
from e2b import CommandExitException, NotFoundException, Sandbox

from sdk_helpers import CMD_TIMEOUT, REQUEST_TIMEOUT, StreamCollector, wait_until

# Echoes every stdin line back with a prefix, so the output proves the input arrived.
ECHO_LOOP = 'while IFS= read -r line; do echo "got:$line"; done'


def running_pids(sbx: Sandbox) -> set[int]:
    return {process.pid for process in sbx.commands.list()}


def test_background_handle_has_pid(sandbox):
    handle = sandbox.commands.run("sleep 60", background=True, timeout=CMD_TIMEOUT)
    try:
        assert handle.pid > 0
        assert handle.pid in running_pids(sandbox)
    finally:
        handle.kill()


def test_background_stdin_then_kill(sandbox):
    handle = sandbox.commands.run(ECHO_LOOP, background=True, stdin=True, timeout=CMD_TIMEOUT)
    output = StreamCollector(handle)

    handle.send_stdin("first\n")
    assert output.wait_stdout("got:first\n")

    sandbox.commands.send_stdin(handle.pid, "second\n")
    assert output.wait_stdout("got:second\n")

    assert handle.kill() is True
    assert output.wait_done()
    with pytest.raises(CommandExitException) as excinfo:
        handle.wait()
    assert excinfo.value.exit_code != 0
    assert wait_until(lambda: handle.pid not in running_pids(sandbox), 10)


def test_background_cat_close_stdin(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=CMD_TIMEOUT)
    output = StreamCollector(handle)

    handle.send_stdin(b"bytes through cat\n")
    assert output.wait_stdout("bytes through cat\n")

    handle.close_stdin()
    assert output.wait_done()
    result = handle.wait()
    assert result.exit_code == 0
    assert result.stdout == "bytes through cat\n"


def test_background_wait_returns_result(sandbox):
    handle = sandbox.commands.run("sleep 1; echo finished", background=True, timeout=CMD_TIMEOUT)

    result = handle.wait()

    assert result.stdout == "finished\n"
    assert result.exit_code == 0


def test_reattach_from_second_client(sandbox):
    handle = sandbox.commands.run(ECHO_LOOP, background=True, stdin=True, timeout=CMD_TIMEOUT)
    first = StreamCollector(handle)
    handle.send_stdin("before-reattach\n")
    assert first.wait_stdout("got:before-reattach\n")

    other = Sandbox.connect(sandbox.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    assert handle.pid in running_pids(other)
    reattached = other.commands.connect(handle.pid, timeout=CMD_TIMEOUT)
    second = StreamCollector(reattached)

    assert reattached.pid == handle.pid
    other.commands.send_stdin(handle.pid, "after-reattach\n")
    assert second.wait_stdout("got:after-reattach\n")
    assert first.wait_stdout("got:after-reattach\n")

    assert other.commands.kill(handle.pid) is True
    assert second.wait_done()
    assert first.wait_done()
    assert wait_until(lambda: handle.pid not in running_pids(sandbox), 10)


def test_kill_unknown_pid_returns_false(sandbox):
    assert sandbox.commands.kill(999999) is False


def test_connect_unknown_pid_raises(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999999, timeout=CMD_TIMEOUT)
