"""Shared helpers for the SDK end-to-end suite: sandbox creation with cleanup,
output collection from streaming handles, polling and proxy requests."""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable, Dict, Optional

import httpx
from e2b import Sandbox

TEMPLATE = "base"

# The guest runs under software emulation (TCG), so every deadline here is far
# above what a KVM host needs.
CMD_TIMEOUT = 120
REQUEST_TIMEOUT = 120
SANDBOX_TIMEOUT = 900

ENVD_PORT = 49983

# Tags every sandbox the suite creates, so a session finalizer can kill leftovers.
SUITE_METADATA_KEY = "hearth-suite"
RUN_ID = os.environ.get("HEARTH_TEST_RUN_ID") or uuid.uuid4().hex[:12]


def create_sandbox(cleanup: Callable[[Callable[[], None]], None], **kwargs: Any) -> Sandbox:
    """Create a sandbox from the `base` template and register its kill with `cleanup`.

    `cleanup` is a finalizer registrar such as `request.addfinalizer`. The suite
    tag is merged into any metadata the caller passes.
    """
    metadata = {SUITE_METADATA_KEY: RUN_ID, **kwargs.pop("metadata", {})}
    kwargs.setdefault("template", TEMPLATE)
    kwargs.setdefault("timeout", SANDBOX_TIMEOUT)
    kwargs.setdefault("request_timeout", REQUEST_TIMEOUT)
    sbx = Sandbox.create(metadata=metadata, **kwargs)
    cleanup(lambda: kill_quietly(sbx.sandbox_id))
    return sbx


def kill_quietly(sandbox_id: str) -> None:
    """Kill a sandbox during teardown, where a failure must not mask the test result."""
    try:
        Sandbox.kill(sandbox_id, request_timeout=REQUEST_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - teardown reports and goes on
        print(f"teardown: killing sandbox {sandbox_id} failed: {err!r}")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it returns true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class StreamCollector:
    """Consumes a command or PTY handle on a background thread and collects its output.

    The SDK's sync handles deliver output only while iterated, so a test that
    sends input and reads the output needs the iteration to run beside it.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.stdout = ""
        self.stderr = ""
        self.pty = bytearray()
        self.error: Optional[BaseException] = None
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        try:
            for stdout, stderr, pty in self.handle:
                with self._cond:
                    if stdout is not None:
                        self.stdout += stdout
                    if stderr is not None:
                        self.stderr += stderr
                    if pty is not None:
                        self.pty.extend(pty)
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - stored for the test to inspect
            with self._cond:
                self.error = err
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[["StreamCollector"], bool], timeout: float) -> bool:
        """Block until `predicate(self)` holds or `timeout` seconds pass; return whether it held."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.done:
                    return predicate(self)
                self._cond.wait(remaining)
            return True

    def wait_stdout(self, text: str, timeout: float = CMD_TIMEOUT) -> bool:
        return self.wait_for(lambda c: text in c.stdout, timeout)

    def wait_pty(self, data: bytes, timeout: float = CMD_TIMEOUT) -> bool:
        return self.wait_for(lambda c: data in bytes(c.pty), timeout)

    def wait_done(self, timeout: float = CMD_TIMEOUT) -> bool:
        return self.wait_for(lambda c: c.done, timeout)


def sandbox_url() -> str:
    """Base URL of Hearth's proxy, as the SDK reads it from E2B_SANDBOX_URL."""
    return os.environ["E2B_SANDBOX_URL"].rstrip("/")


def routing_headers(sbx: Sandbox, port: int) -> Dict[str, str]:
    """Headers that select a sandbox port on the proxy, as the SDK sends them for envd."""
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}


def proxy_get_by_host(sbx: Sandbox, port: int, path: str = "/", **kwargs: Any) -> httpx.Response:
    """GET `path` on a sandbox port through the proxy, addressed by `sbx.get_host(port)`.

    With E2B_SANDBOX_URL set, the SDK sends every request to that one URL, and
    `get_host` returns the `<port>-<sandboxID>.<domain>` name that the proxy
    routes by. The request goes to the proxy's address with that name as the
    Host header, the way a client behind a wildcard DNS entry would send it.
    """
    headers = {"Host": sbx.get_host(port), **kwargs.pop("headers", {})}
    kwargs.setdefault("timeout", REQUEST_TIMEOUT)
    return httpx.get(sandbox_url() + path, headers=headers, **kwargs)
