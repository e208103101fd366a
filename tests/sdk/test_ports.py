"""HTTP to a port inside the sandbox through Hearth's proxy.

With E2B_SANDBOX_URL set, the SDK sends all envd traffic to that one URL and
selects the sandbox with the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers.
For user ports it offers `sandbox.get_host(port)`, the host name
`<port>-<sandboxID>.<domain>`. These tests reach a port both ways: by sending
that host name as the Host header to the proxy's address, and by the two
routing headers.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from sdk_helpers import REQUEST_TIMEOUT, StreamCollector, proxy_get_by_host, routing_headers, sandbox_url, wait_until

HTTP_PORT = 8000
CLOSED_PORT = 8999
INDEX = f"<p>hearth port test {uuid.uuid4().hex}</p>\n"
SERVER_NOT_READY = "http.server in the sandbox did not respond through the proxy within 90 s"


@pytest.fixture(scope="module")
def http_server(sandbox):
    """`python3 -m http.server 8000` serving one index.html, running until the module ends."""
    sandbox.files.write("/home/user/site/index.html", INDEX)
    handle = sandbox.commands.run(
        f"python3 -m http.server {HTTP_PORT} --bind 0.0.0.0",
        background=True,
        cwd="/home/user/site",
        timeout=0,
    )
    # Drain the server's request log so its output stream never backs up.
    output = StreamCollector(handle)

    def responds() -> bool:
        try:
            return proxy_get_by_host(sandbox, HTTP_PORT, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    ready = wait_until(responds, 90, interval=0.5)
    yield ready
    handle.kill()
    output.wait_done(30)


def test_port_by_host_header(sandbox, http_server):
    assert http_server, SERVER_NOT_READY

    response = proxy_get_by_host(sandbox, HTTP_PORT)

    assert response.status_code == 200
    assert response.text == INDEX


def test_port_by_routing_headers(sandbox, http_server):
    assert http_server, SERVER_NOT_READY

    response = httpx.get(
        sandbox_url() + "/index.html",
        headers=routing_headers(sandbox, HTTP_PORT),
        timeout=REQUEST_TIMEOUT,
    )

    assert response.status_code == 200
    assert response.text == INDEX


def test_port_passes_status_through(sandbox, http_server):
    assert http_server, SERVER_NOT_READY

    response = proxy_get_by_host(sandbox, HTTP_PORT, "/no-such-page.html")

    assert response.status_code == 404


def test_get_host_names_sandbox_and_port(sandbox):
    host = sandbox.get_host(HTTP_PORT)

    assert host.startswith(f"{HTTP_PORT}-{sandbox.sandbox_id}.")


def test_closed_port_error(sandbox):
    response = proxy_get_by_host(sandbox, CLOSED_PORT)

    assert response.status_code == 502
    # The SDK recognises this phrase in the proxy's response.
    assert "port is not open" in response.text


def test_unknown_sandbox_port_error(sandbox):
    host = sandbox.get_host(HTTP_PORT).replace(sandbox.sandbox_id, "hearthnosuchsandbox0")

    response = httpx.get(sandbox_url() + "/", headers={"Host": host}, timeout=REQUEST_TIMEOUT)

    assert response.status_code == 502
    # The SDK recognises this phrase in the proxy's response.
    assert "was not found" in response.text
