"""End-to-end tests of Hearth through the official E2B Python SDK (e2b 2.63.0).

Every test starts real microVMs, so a running `hearth serve` is required:

    export E2B_API_URL=http://127.0.0.1:3000      # control plane
    export E2B_SANDBOX_URL=http://127.0.0.1:3001  # proxy in front of envd and sandbox ports
    export E2B_API_KEY=e2b_<40 hex characters>
    /opt/hearth-venv/bin/python -m pytest tests/sdk

Without these variables every test fails at setup with a message naming the
missing one. Each test module shares one sandbox where its tests do not
interfere; each test gets a hard time limit from pytest-timeout.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import pytest
from e2b import Sandbox, SandboxQuery

from sdk_helpers import REQUEST_TIMEOUT, RUN_ID, SUITE_METADATA_KEY, create_sandbox, kill_quietly

REQUIRED_ENV = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")

# Hard limit per test, in seconds, for tests without their own `timeout` marker.
DEFAULT_TEST_TIMEOUT = 240


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


@pytest.fixture(scope="session", autouse=True)
def hearth_env() -> Iterator[dict[str, str]]:
    """Check the server's environment once, and kill this run's leftover sandboxes at the end."""
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"missing environment variables {', '.join(missing)}: start `hearth serve` and export "
            "E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY before running tests/sdk",
            pytrace=False,
        )
    api_key = os.environ["E2B_API_KEY"]
    if not re.fullmatch(r"e2b_[0-9a-f]{40}", api_key):
        pytest.fail(
            f"E2B_API_KEY has an invalid format (length {len(api_key)}): expected e2b_ followed by "
            "40 lowercase hexadecimal characters",
            pytrace=False,
        )

    yield {name: os.environ[name] for name in REQUIRED_ENV}

    _kill_leftovers()


def _kill_leftovers() -> None:
    """Kill sandboxes tagged with this run's ID that a failed finalizer left running."""
    try:
        paginator = Sandbox.list(
            query=SandboxQuery(metadata={SUITE_METADATA_KEY: RUN_ID}),
            request_timeout=REQUEST_TIMEOUT,
        )
        while paginator.has_next:
            for info in paginator.next_items():
                kill_quietly(info.sandbox_id)
    except Exception as err:  # noqa: BLE001 - teardown reports and goes on
        print(f"teardown: listing this run's sandboxes ({SUITE_METADATA_KEY}={RUN_ID}) failed: {err!r}")


@pytest.fixture(scope="module")
def sandbox(request: pytest.FixtureRequest, hearth_env: dict[str, str]) -> Sandbox:
    """One sandbox shared by the tests of a module; killed when the module ends."""
    return create_sandbox(request.addfinalizer, metadata={"module": request.module.__name__})


@pytest.fixture
def new_sandbox(request: pytest.FixtureRequest, hearth_env: dict[str, str]):
    """Factory for sandboxes owned by one test; each is killed when the test ends."""

    def factory(**kwargs) -> Sandbox:
        return create_sandbox(request.addfinalizer, **kwargs)

    return factory
