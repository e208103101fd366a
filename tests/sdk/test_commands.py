"""Foreground commands through `sandbox.commands.run`.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import pytest
from e2b import CommandExitException, Sandbox, TimeoutException

from sdk_helpers import CMD_TIMEOUT, create_sandbox

CREATE_ENVS = {"HEARTH_CREATE_ENV": "from-create", "HEARTH_SHARED_ENV": "create-value"}


@pytest.fixture(scope="module")
def sbx(request: pytest.FixtureRequest, hearth_env) -> Sandbox:
    """A sandbox created with environment variables, shared by this module's tests."""
    return create_sandbox(request.addfinalizer, envs=CREATE_ENVS, metadata={"module": __name__})


def run(sbx: Sandbox, cmd: str, **kwargs):
    kwargs.setdefault("timeout", CMD_TIMEOUT)
    return sbx.commands.run(cmd, **kwargs)


def test_stdout_stderr_exit_code(sbx):
    result = run(sbx, "echo to-stdout; echo to-stderr >&2")

    assert result.stdout == "to-stdout\n"
    assert result.stderr == "to-stderr\n"
    assert result.exit_code == 0
    assert result.error is None


def test_output_callbacks(sbx):
    stdout_chunks: list[str] = []
    stderr_chunks: list[str] = []

    run(sbx, "echo out-line; echo err-line >&2", on_stdout=stdout_chunks.append, on_stderr=stderr_chunks.append)

    assert "".join(stdout_chunks) == "out-line\n"
    assert "".join(stderr_chunks) == "err-line\n"


def test_large_output(sbx):
    result = run(sbx, "seq 1 100000")

    lines = result.stdout.splitlines()
    assert len(lines) == 100000
    assert lines[0] == "1"
    assert lines[-1] == "100000"


def test_failing_command_raises(sbx):
    with pytest.raises(CommandExitException) as excinfo:
        run(sbx, "echo partial; echo went-wrong >&2; exit 3")

    assert excinfo.value.exit_code == 3
    assert excinfo.value.stderr == "went-wrong\n"
    assert excinfo.value.stdout == "partial\n"


def test_missing_binary_exit_127(sbx):
    with pytest.raises(CommandExitException) as excinfo:
        run(sbx, "hearth-no-such-binary")

    assert excinfo.value.exit_code == 127
    assert "hearth-no-such-binary" in excinfo.value.stderr


def test_per_call_envs(sbx):
    result = run(sbx, 'echo "$HEARTH_CALL_ENV"', envs={"HEARTH_CALL_ENV": "from-call"})

    assert result.stdout == "from-call\n"


def test_create_time_envs(sbx):
    result = run(sbx, 'echo "$HEARTH_CREATE_ENV"')

    assert result.stdout == "from-create\n"


def test_per_call_env_overrides_create_env(sbx):
    result = run(sbx, 'echo "$HEARTH_SHARED_ENV"', envs={"HEARTH_SHARED_ENV": "call-value"})

    assert result.stdout == "call-value\n"


def test_per_call_env_does_not_persist(sbx):
    run(sbx, "true", envs={"HEARTH_ONCE_ENV": "set-once"})

    result = run(sbx, 'echo "[${HEARTH_ONCE_ENV:-unset}]"')

    assert result.stdout == "[unset]\n"


def test_default_cwd_is_home(sbx):
    assert run(sbx, "pwd").stdout == "/home/user\n"


def test_cwd_argument(sbx):
    assert run(sbx, "pwd", cwd="/tmp").stdout == "/tmp\n"


def test_default_user(sbx):
    assert run(sbx, "whoami").stdout == "user\n"


def test_root_user(sbx):
    assert run(sbx, "whoami", user="root").stdout == "root\n"


def test_root_user_home(sbx):
    assert run(sbx, 'echo "$HOME"', user="root").stdout == "/root\n"


def test_passwordless_sudo(sbx):
    assert run(sbx, "sudo -n whoami").stdout == "root\n"


def test_non_utf8_output_replaced(sbx):
    """Invalid UTF-8 bytes reach the SDK, which decodes them with U+FFFD replacement."""
    result = run(sbx, r"printf 'ok\377\376end'")

    assert result.stdout == "ok\ufffd\ufffdend"


def test_multibyte_utf8_output(sbx):
    result = run(sbx, "printf 'snow \\342\\230\\203 cat \\360\\237\\220\\210'")

    assert result.stdout == "snow \u2603 cat \U0001f408"


def test_stdin_closed_by_default(sbx):
    """Without stdin=True a command that reads stdin gets end of file instead of hanging."""
    result = run(sbx, "cat; echo after-cat")

    assert result.stdout == "after-cat\n"


def test_command_timeout(sbx):
    with pytest.raises(TimeoutException):
        run(sbx, "sleep 30", timeout=3)


def host_tsc_is_stable() -> bool:
    """Returns whether the host has an invariant TSC that its kernel offers as a clock source."""
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    with open("/sys/devices/system/clocksource/clocksource0/available_clocksource") as sources:
        return {"constant_tsc", "nonstop_tsc"} <= set(flags) and "tsc" in sources.read().split()


def test_guest_clock_has_nanosecond_resolution(sbx):
    if not host_tsc_is_stable():
        pytest.skip("the host's TSC is not stable, so guests keep time with jiffies")
    source = run(sbx, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource").stdout.strip()
    resolution = run(sbx, "python3 -c 'import time; print(time.clock_getres(time.CLOCK_MONOTONIC))'").stdout.strip()

    assert source == "tsc"
    # A jiffies clock source gives 0.004 here: one tick at 250 Hz.
    assert float(resolution) == pytest.approx(1e-9)


PIT_STATUS = """
import os
port = os.open("/dev/port", os.O_RDWR)
os.pwrite(port, bytes([0xE2]), 0x43)  # read-back command: latch the status of channel 0
print(os.pread(port, 1, 0x40)[0])
"""


def test_unused_pit_is_stopped(sbx):
    clockevent = run(sbx, "cat /sys/devices/system/clockevents/clockevent0/current_device").stdout.strip()
    status = int(run(sbx, f"sudo python3 -c '{PIT_STATUS}'").stdout)

    assert clockevent == "lapic"
    # Bits 1 to 3 hold the mode: 0 (one-shot, stopped at terminal count), not QEMU's reset mode 3.
    assert (status >> 1) & 0b111 == 0
