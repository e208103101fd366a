"""Filesystem through `sandbox.files` and the signed upload/download URLs.

Needs a running `hearth serve` and starts a real VM (see conftest.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import httpx
import pytest
from e2b import FileNotFoundException, FilesystemEventType, FileType

from sdk_helpers import CMD_TIMEOUT, ENVD_PORT, REQUEST_TIMEOUT, routing_headers, wait_until

# Every byte value, so an encoding or newline conversion anywhere shows up.
ALL_BYTES = bytes(range(256)) * 4


@pytest.fixture
def workdir(sandbox) -> str:
    """A fresh directory under the default user's home, unique to the test."""
    path = f"/home/user/files-{uuid.uuid4().hex[:10]}"
    assert sandbox.files.make_dir(path) is True
    return path


def test_write_read_text(sandbox, workdir):
    path = f"{workdir}/hello.txt"
    text = "first line\nsecond line with unicode \u00e9\u4e2d\n"

    info = sandbox.files.write(path, text)

    assert info.path == path
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(path) == text


def test_write_read_bytes(sandbox, workdir):
    path = f"{workdir}/all-bytes.bin"

    sandbox.files.write(path, ALL_BYTES)
    content = sandbox.files.read(path, format="bytes")

    assert isinstance(content, bytearray)
    assert bytes(content) == ALL_BYTES


def test_write_creates_parent_dirs(sandbox, workdir):
    path = f"{workdir}/deep/er/file.txt"

    sandbox.files.write(path, "nested")

    assert sandbox.files.read(path) == "nested"
    assert sandbox.files.get_info(f"{workdir}/deep/er").type == FileType.DIR


def test_write_overwrites(sandbox, workdir):
    path = f"{workdir}/overwrite.txt"
    sandbox.files.write(path, "a much longer original content")

    sandbox.files.write(path, "short")

    assert sandbox.files.read(path) == "short"


def test_written_file_visible_to_commands(sandbox, workdir):
    path = f"{workdir}/seen-by-shell.txt"
    sandbox.files.write(path, "shell can read this")

    result = sandbox.commands.run(f"cat {path}; echo; stat -c %U {path}", timeout=CMD_TIMEOUT)

    assert result.stdout == "shell can read this\nuser\n"


def test_write_files_many(sandbox, workdir):
    entries = [{"path": f"{workdir}/multi-{i}.txt", "data": f"content {i}"} for i in range(3)]

    infos = sandbox.files.write_files(entries)

    assert [info.path for info in infos] == [entry["path"] for entry in entries]
    assert sandbox.files.read(f"{workdir}/multi-2.txt") == "content 2"


def test_write_as_root(sandbox):
    path = f"/root/hearth-{uuid.uuid4().hex[:8]}.txt"

    sandbox.files.write(path, "root-owned", user="root")
    info = sandbox.files.get_info(path, user="root")

    assert info.owner == "root"
    assert sandbox.files.read(path, user="root") == "root-owned"


def test_read_missing_raises(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")


def test_get_info_file(sandbox, workdir):
    path = f"{workdir}/info.txt"
    sandbox.files.write(path, "12345")

    info = sandbox.files.get_info(path)

    assert info.name == "info.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.owner == "user"
    assert info.group == "user"
    assert info.permissions.startswith("-rw")


def test_get_info_dir(sandbox, workdir):
    info = sandbox.files.get_info(workdir)

    assert info.type == FileType.DIR
    assert info.path == workdir
    assert info.permissions.startswith("d")


def test_get_info_missing_raises(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/missing")


def test_mtime_follows_host_clock(sandbox, workdir):
    """A restored guest must have its clock set to the host's, not the snapshot's time."""
    path = f"{workdir}/clock.txt"
    sandbox.files.write(path, "tick")

    modified = sandbox.files.get_info(path).modified_time
    skew = abs((modified - datetime.now(timezone.utc)).total_seconds())

    assert skew < 120


def test_exists(sandbox, workdir):
    path = f"{workdir}/exists.txt"
    sandbox.files.write(path, "x")

    assert sandbox.files.exists(path) is True
    assert sandbox.files.exists(workdir) is True
    assert sandbox.files.exists(f"{workdir}/absent.txt") is False


def test_list_depth(sandbox, workdir):
    sandbox.files.write(f"{workdir}/top.txt", "top")
    sandbox.files.write(f"{workdir}/a/b/leaf.txt", "leaf")

    shallow = {entry.path: entry for entry in sandbox.files.list(workdir)}
    deep = {entry.path: entry for entry in sandbox.files.list(workdir, depth=3)}

    assert set(shallow) == {f"{workdir}/top.txt", f"{workdir}/a"}
    assert shallow[f"{workdir}/a"].type == FileType.DIR
    assert shallow[f"{workdir}/top.txt"].type == FileType.FILE
    assert shallow[f"{workdir}/top.txt"].size == 3
    assert set(deep) == {f"{workdir}/top.txt", f"{workdir}/a", f"{workdir}/a/b", f"{workdir}/a/b/leaf.txt"}
    assert deep[f"{workdir}/a/b/leaf.txt"].name == "leaf.txt"


def test_list_depth_two_stops(sandbox, workdir):
    sandbox.files.write(f"{workdir}/a/b/leaf.txt", "leaf")

    paths = {entry.path for entry in sandbox.files.list(workdir, depth=2)}

    assert paths == {f"{workdir}/a", f"{workdir}/a/b"}


def test_list_missing_raises(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/missing-dir")


def test_rename(sandbox, workdir):
    old = f"{workdir}/old-name.txt"
    new = f"{workdir}/new-name.txt"
    sandbox.files.write(old, "moved content")

    info = sandbox.files.rename(old, new)

    assert info.path == new
    assert info.name == "new-name.txt"
    assert sandbox.files.exists(old) is False
    assert sandbox.files.read(new) == "moved content"


def test_rename_missing_raises(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/missing.txt", f"{workdir}/target.txt")


def test_remove_file(sandbox, workdir):
    path = f"{workdir}/remove-me.txt"
    sandbox.files.write(path, "bye")

    sandbox.files.remove(path)

    assert sandbox.files.exists(path) is False


def test_remove_dir_recursive(sandbox, workdir):
    sandbox.files.write(f"{workdir}/tree/a/b.txt", "b")

    sandbox.files.remove(f"{workdir}/tree")

    assert sandbox.files.exists(f"{workdir}/tree") is False


def test_make_dir(sandbox, workdir):
    path = f"{workdir}/x/y/z"

    assert sandbox.files.make_dir(path) is True
    assert sandbox.files.make_dir(path) is False
    assert sandbox.files.get_info(path).type == FileType.DIR
    assert sandbox.files.get_info(path).owner == "user"


def test_watch_dir_events(sandbox, workdir):
    watched = f"{workdir}/watched"
    sandbox.files.make_dir(watched)
    handle = sandbox.files.watch_dir(watched)
    seen: list[tuple[str, FilesystemEventType]] = []

    def saw(name: str, kind: FilesystemEventType) -> bool:
        seen.extend((event.name, event.type) for event in handle.get_new_events())
        return (name, kind) in seen

    try:
        sandbox.files.write(f"{watched}/new.txt", "one")
        assert wait_until(lambda: saw("new.txt", FilesystemEventType.CREATE), 20)
        assert wait_until(lambda: saw("new.txt", FilesystemEventType.WRITE), 20)

        seen.clear()
        sandbox.files.write(f"{watched}/new.txt", "two")
        assert wait_until(lambda: saw("new.txt", FilesystemEventType.WRITE), 20)

        sandbox.files.remove(f"{watched}/new.txt")
        assert wait_until(lambda: saw("new.txt", FilesystemEventType.REMOVE), 20)

        sandbox.files.make_dir(f"{watched}/subdir")
        assert wait_until(lambda: saw("subdir", FilesystemEventType.CREATE), 20)
    finally:
        handle.stop()


def test_watch_dir_recursive(sandbox, workdir):
    watched = f"{workdir}/watched-tree"
    sandbox.files.make_dir(f"{watched}/inner")
    handle = sandbox.files.watch_dir(watched, recursive=True)
    seen: list[tuple[str, FilesystemEventType]] = []

    def saw(name: str, kind: FilesystemEventType) -> bool:
        seen.extend((event.name, event.type) for event in handle.get_new_events())
        return (name, kind) in seen

    try:
        sandbox.files.write(f"{watched}/inner/deep.txt", "deep")
        assert wait_until(lambda: saw("inner/deep.txt", FilesystemEventType.CREATE), 20)
    finally:
        handle.stop()


def test_watch_missing_dir_raises(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{workdir}/missing-dir")


def test_upload_url_and_download_url(sandbox, workdir):
    """The URLs the SDK signs work with a plain HTTP client that sends no access token."""
    path = f"{workdir}/via-url.bin"
    headers = routing_headers(sandbox, ENVD_PORT)

    upload = httpx.post(
        sandbox.upload_url(path),
        files={"file": ("via-url.bin", ALL_BYTES)},
        headers=headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert upload.status_code == 200
    assert bytes(sandbox.files.read(path, format="bytes")) == ALL_BYTES

    download = httpx.get(sandbox.download_url(path), headers=headers, timeout=REQUEST_TIMEOUT)
    assert download.status_code == 200
    assert download.content == ALL_BYTES


def test_download_url_missing_file_404(sandbox, workdir):
    url = sandbox.download_url(f"{workdir}/missing.bin")

    response = httpx.get(url, headers=routing_headers(sandbox, ENVD_PORT), timeout=REQUEST_TIMEOUT)

    assert response.status_code == 404
