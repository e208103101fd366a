"""Pseudo-terminals through `sandbox.pty`: create, input, output, resize, kill.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import time

from e2b import PtySize

from sdk_helpers import CMD_TIMEOUT, StreamCollector, wait_until


def open_pty(sandbox, rows: int = 24, cols: int = 80, **kwargs):
    handle = sandbox.pty.create(PtySize(rows=rows, cols=cols), timeout=CMD_TIMEOUT, **kwargs)
    return handle, StreamCollector(handle)


def test_pty_input_output_resize_kill(sandbox):
    handle, output = open_pty(sandbox)
    try:
        assert handle.pid > 0

        # The shell expands the arithmetic, so the match proves a shell ran the
        # line rather than the terminal echoing the input back.
        sandbox.pty.send_stdin(handle.pid, b"echo pty-$((6*7))\n")
        assert output.wait_pty(b"pty-42")

        sandbox.pty.send_stdin(handle.pid, b"stty size\n")
        assert output.wait_pty(b"24 80")

        sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=132))
        sandbox.pty.send_stdin(handle.pid, b"stty size\n")
        assert output.wait_pty(b"40 132")

        sandbox.pty.send_stdin(handle.pid, b"tty\n")
        assert output.wait_pty(b"/dev/pts/")
    finally:
        killed = sandbox.pty.kill(handle.pid)

    assert killed is True
    assert output.wait_done()
    assert wait_until(lambda: handle.pid not in {p.pid for p in sandbox.commands.list()}, 10)


def test_pty_environment(sandbox):
    handle, output = open_pty(sandbox, envs={"HEARTH_PTY_ENV": "pty-env-value"})
    try:
        sandbox.pty.send_stdin(handle.pid, b'echo "term=$TERM env=$HEARTH_PTY_ENV user=$(whoami)"\n')

        assert output.wait_pty(b"term=xterm-256color env=pty-env-value user=user")
    finally:
        sandbox.pty.kill(handle.pid)


def test_pty_exit_ends_stream(sandbox):
    handle, output = open_pty(sandbox)

    sandbox.pty.send_stdin(handle.pid, b"exit 0\n")

    assert output.wait_done()
    assert handle.wait().exit_code == 0


def test_pty_ctrl_c_interrupts(sandbox):
    handle, output = open_pty(sandbox)
    try:
        sandbox.pty.send_stdin(handle.pid, b"echo sleeping-$((2+3)); sleep 100\n")
        assert output.wait_pty(b"sleeping-5")
        time.sleep(0.5)

        # Without the interrupt, the next line would run only after 100 s,
        # past this wait's limit.
        sandbox.pty.send_stdin(handle.pid, b"\x03")
        sandbox.pty.send_stdin(handle.pid, b"echo after-$((1+1))-interrupt\n")

        assert output.wait_pty(b"after-2-interrupt", timeout=60)
    finally:
        sandbox.pty.kill(handle.pid)
