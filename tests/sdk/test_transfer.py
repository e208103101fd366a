"""Streaming upload and download of a 100 MiB random file, checked by SHA-256.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import hashlib
import os
import resource
from typing import Iterator

import httpx
import pytest

from sdk_helpers import ENVD_PORT, REQUEST_TIMEOUT, routing_headers, sandbox_url

SIZE = 100 * 1024 * 1024
CHUNK = 1024 * 1024

# Both directions stream, so the client's peak RSS may grow by far less than the file.
MAX_RSS_GROWTH_KIB = 48 * 1024

GUEST_PATH = "/home/user/transfer-100mib.bin"


def random_chunks(digest) -> Iterator[bytes]:
    """Yield SIZE random bytes in CHUNK pieces, feeding each to `digest` as it goes."""
    for _ in range(SIZE // CHUNK):
        chunk = os.urandom(CHUNK)
        digest.update(chunk)
        yield chunk


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(scope="module")
def uploaded(sandbox):
    """Upload 100 MiB of random bytes once; return (SHA-256 hex digest, peak RSS growth in KiB)."""
    digest = hashlib.sha256()
    rss_before = peak_rss_kib()

    info = sandbox.files.write(GUEST_PATH, random_chunks(digest))

    assert info.path == GUEST_PATH
    return digest.hexdigest(), peak_rss_kib() - rss_before


@pytest.mark.timeout(600)
def test_upload_size_and_hash_in_guest(sandbox, uploaded):
    expected, _ = uploaded

    info = sandbox.files.get_info(GUEST_PATH)
    result = sandbox.commands.run(f"sha256sum {GUEST_PATH}", timeout=300)

    assert info.size == SIZE
    assert result.stdout.split()[0] == expected


@pytest.mark.timeout(600)
def test_upload_streams_without_buffering(uploaded):
    _, rss_growth_kib = uploaded

    assert rss_growth_kib < MAX_RSS_GROWTH_KIB


@pytest.mark.timeout(600)
def test_download_stream_hash(sandbox, uploaded):
    expected, _ = uploaded
    digest = hashlib.sha256()
    received = 0
    rss_before = peak_rss_kib()

    with sandbox.files.read(GUEST_PATH, format="stream") as stream:
        for chunk in stream:
            digest.update(chunk)
            received += len(chunk)

    assert received == SIZE
    assert digest.hexdigest() == expected
    assert peak_rss_kib() - rss_before < MAX_RSS_GROWTH_KIB


@pytest.mark.timeout(600)
def test_download_url_stream_hash(sandbox, uploaded):
    """The signed download URL streams the same bytes through the proxy to a plain client."""
    expected, _ = uploaded
    digest = hashlib.sha256()
    received = 0

    url = sandbox.download_url(GUEST_PATH)
    assert url.startswith(sandbox_url())
    with httpx.stream("GET", url, headers=routing_headers(sandbox, ENVD_PORT), timeout=REQUEST_TIMEOUT) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            received += len(chunk)

    assert received == SIZE
    assert digest.hexdigest() == expected
