"""Wire test of envd against the E2B Python SDK (e2b 2.63.0 with connectrpc 0.12.1).

Starts a host-run envd on 127.0.0.1:49983 and drives it twice:

1. with the SDK's generated Connect clients (``process_connect``, ``filesystem_connect``)
   in both codecs, binary protobuf and the SDK's JSON codec, plus httpx for ``/files``;
2. with the high-level SDK (``Sandbox.create(debug=True)``), which sends envd calls to
   http://localhost:49983 without any API server.

Needs root (commands run as root and as ``nobody``). Run:

    /opt/hearth-venv/bin/python crates/envd/tests/sdk_wire.py [--envd target/debug/envd]
"""

import argparse
import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from e2b import Sandbox
from e2b.envd.client_shared import ENVD_JSON_CODEC
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from e2b.sandbox.filesystem.filesystem import FileType

PORT = 49983
BASE_URL = f"http://127.0.0.1:{PORT}"
LARGE_FILE_BYTES = 100 * 1024 * 1024

passed = 0
failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def user_header(name):
    encoded = base64.b64encode(f"{name}:".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def start_envd(binary):
    log = open(os.path.join(tempfile.gettempdir(), "envd-sdk-wire.log"), "wb")
    process = subprocess.Popen(
        [binary, "--port", str(PORT), "--default-user", "root"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if httpx.get(f"{BASE_URL}/health").status_code == 204:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("envd did not answer /health within 10 s")


def run_command(client, cmd, envs=None, cwd=None, user=None):
    """Runs `bash -l -c cmd` as the SDK does and returns (stdout, stderr, end event)."""
    request = process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", cmd], envs=envs or {}, cwd=cwd),
        stdin=False,
    )
    headers = {"Keepalive-Ping-Interval": "1"}
    if user:
        headers.update(user_header(user))
    stdout, stderr, end = b"", b"", None
    for response in client.start(request, headers=headers, timeout_ms=30_000):
        event = response.event.event
        if event.field == "data":
            output = event.value.output
            if output.field == "stdout":
                stdout += output.value
            elif output.field == "stderr":
                stderr += output.value
        elif event.field == "end":
            end = event.value
    return stdout, stderr, end


def test_process(client, codec_name):
    stdout, stderr, end = run_command(client, "echo out; echo err >&2; printf '\\xff\\x00'; exit 7")
    check(f"[{codec_name}] stdout", stdout == b"out\n\xff\x00", repr(stdout))
    check(f"[{codec_name}] stderr", stderr == b"err\n", repr(stderr))
    check(f"[{codec_name}] exit code", end is not None and end.exit_code == 7, repr(end))

    stdout, _, _ = run_command(client, "echo $HEARTH_X; pwd", envs={"HEARTH_X": "y z"}, cwd="/tmp")
    check(f"[{codec_name}] env and cwd", stdout == b"y z\n/tmp\n", repr(stdout))

    stdout, _, _ = run_command(client, "whoami; echo $HOME", user="nobody")
    check(f"[{codec_name}] user nobody", stdout.split(b"\n")[0] == b"nobody", repr(stdout))

    # Background process with stdin: send input, see it echoed, then kill it.
    events = client.start(
        process_pb.StartRequest(
            process=process_pb.ProcessConfig(cmd="/bin/cat"),
            stdin=True,
            tag="wire-cat",
        ),
        timeout_ms=30_000,
    )
    first = next(events)
    pid = first.event.event.value.pid
    listed = client.list(process_pb.ListRequest())
    check(f"[{codec_name}] list has tag", any(p.pid == pid and p.tag == "wire-cat" for p in listed.processes))
    selector = process_pb.ProcessSelector(selector=Oneof("pid", pid))
    client.send_input(
        process_pb.SendInputRequest(process=selector, input=process_pb.ProcessInput(input=Oneof("stdin", b"ping\n")))
    )
    echoed = b""
    for response in events:
        event = response.event.event
        if event.field == "data":
            echoed += event.value.output.value
            if b"ping\n" in echoed:
                break
    check(f"[{codec_name}] stdin echoed", echoed == b"ping\n", repr(echoed))

    reattached = client.connect(
        process_pb.ConnectRequest(process=process_pb.ProcessSelector(selector=Oneof("tag", "wire-cat"))),
        timeout_ms=30_000,
    )
    check(f"[{codec_name}] connect start pid", next(reattached).event.event.value.pid == pid)
    client.send_signal(process_pb.SendSignalRequest(process=selector, signal=process_pb.Signal.SIGKILL))
    end = None
    for response in reattached:
        if response.event.event.field == "end":
            end = response.event.event.value
    check(f"[{codec_name}] killed", end is not None and end.status == "signal: killed", repr(end))
    try:
        client.send_signal(process_pb.SendSignalRequest(process=selector, signal=process_pb.Signal.SIGKILL))
        check(f"[{codec_name}] signal after end is not_found", False)
    except ConnectError as err:
        check(f"[{codec_name}] signal after end is not_found", err.code == Code.NOT_FOUND, repr(err))

    # PTY: a shell that echoes its terminal size.
    events = client.start(
        process_pb.StartRequest(
            process=process_pb.ProcessConfig(cmd="/bin/bash", args=["-i", "-l"], envs={"TERM": "xterm"}),
            pty=process_pb.PTY(size=process_pb.PTY.Size(cols=100, rows=30)),
        ),
        timeout_ms=30_000,
    )
    pid = next(events).event.event.value.pid
    selector = process_pb.ProcessSelector(selector=Oneof("pid", pid))
    client.update(
        process_pb.UpdateRequest(process=selector, pty=process_pb.PTY(size=process_pb.PTY.Size(cols=120, rows=40)))
    )
    client.send_input(
        process_pb.SendInputRequest(
            process=selector, input=process_pb.ProcessInput(input=Oneof("pty", b"stty size; exit 5\n"))
        )
    )
    output, end = b"", None
    for response in events:
        event = response.event.event
        if event.field == "data":
            output += event.value.output.value
        elif event.field == "end":
            end = event.value
    check(f"[{codec_name}] pty size", b"40 120" in output, repr(output[-200:]))
    check(f"[{codec_name}] pty exit code", end is not None and end.exit_code == 5, repr(end))


def test_filesystem(client, root, codec_name):
    base = f"{root}/{codec_name}"
    client.make_dir(filesystem_pb.MakeDirRequest(path=f"{base}/sub/deep"))
    try:
        client.make_dir(filesystem_pb.MakeDirRequest(path=f"{base}/sub"))
        check(f"[{codec_name}] make_dir existing", False)
    except ConnectError as err:
        check(f"[{codec_name}] make_dir existing", err.code == Code.ALREADY_EXISTS, repr(err))

    watcher = client.create_watcher(filesystem_pb.CreateWatcherRequest(path=base, recursive=True))
    response = httpx.post(f"{BASE_URL}/files", params={"path": f"{base}/sub/deep/a.txt"}, files=[("file", ("a.txt", b"hello"))])
    check(f"[{codec_name}] upload status", response.status_code == 200, response.text)

    stat = client.stat(filesystem_pb.StatRequest(path=f"{base}/sub/deep/a.txt")).entry
    check(f"[{codec_name}] stat size", stat.size == 5 and stat.type == filesystem_pb.FileType.FILE, repr(stat))
    check(f"[{codec_name}] stat permissions", stat.permissions == "-rw-r--r--" or stat.permissions.startswith("-"), stat.permissions)

    listing = client.list_dir(filesystem_pb.ListDirRequest(path=base, depth=3)).entries
    names = sorted(entry.path[len(base) + 1 :] for entry in listing)
    check(f"[{codec_name}] list depth 3", names == ["sub", "sub/deep", "sub/deep/a.txt"], repr(names))

    moved = client.move(filesystem_pb.MoveRequest(source=f"{base}/sub/deep/a.txt", destination=f"{base}/b.txt")).entry
    check(f"[{codec_name}] move", moved.name == "b.txt", repr(moved))
    client.remove(filesystem_pb.RemoveRequest(path=f"{base}/sub"))
    try:
        client.stat(filesystem_pb.StatRequest(path=f"{base}/sub"))
        check(f"[{codec_name}] removed", False)
    except ConnectError as err:
        check(f"[{codec_name}] removed", err.code == Code.NOT_FOUND, repr(err))

    time.sleep(0.2)
    events = client.get_watcher_events(filesystem_pb.GetWatcherEventsRequest(watcher_id=watcher.watcher_id)).events
    kinds = {(event.name, event.type) for event in events}
    check(f"[{codec_name}] watcher create", ("sub/deep/a.txt", filesystem_pb.EventType.CREATE) in kinds, repr(kinds))
    check(f"[{codec_name}] watcher rename", ("b.txt", filesystem_pb.EventType.CREATE) in kinds, repr(kinds))
    client.remove_watcher(filesystem_pb.RemoveWatcherRequest(watcher_id=watcher.watcher_id))

    # Streaming watch: events arrive while the stream is open.
    stream = client.watch_dir(filesystem_pb.WatchDirRequest(path=base, include_entry=True), timeout_ms=10_000)
    check(f"[{codec_name}] watch start", next(stream).event.field == "start")
    threading.Timer(0.2, lambda: open(f"{base}/watched.txt", "w").write("x")).start()
    got = None
    for response in stream:
        event = response.event
        if event.field == "filesystem" and event.value.name == "watched.txt":
            got = event.value
            break
    stream.close()
    check(f"[{codec_name}] watch event entry", got is not None and got.entry is not None and got.entry.name == "watched.txt", repr(got))


def test_large_file(root):
    path = f"{root}/large.bin"
    source = os.path.join(root, "large-source.bin")
    digest = hashlib.sha256()
    with open(source, "wb") as out:
        block = os.urandom(1024 * 1024)
        for index in range(LARGE_FILE_BYTES // len(block)):
            chunk = bytes([index % 256]) + block[1:]
            digest.update(chunk)
            out.write(chunk)
    expected = digest.hexdigest()

    with open(source, "rb") as data:
        response = httpx.post(
            f"{BASE_URL}/files",
            params={"path": path},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
    check("100 MiB octet-stream upload", response.status_code == 200, response.text)

    downloaded = hashlib.sha256()
    size = 0
    with httpx.stream("GET", f"{BASE_URL}/files", params={"path": path}, timeout=120) as response:
        for chunk in response.iter_bytes():
            downloaded.update(chunk)
            size += len(chunk)
    check("100 MiB download size", size == LARGE_FILE_BYTES, str(size))
    check("100 MiB checksum", downloaded.hexdigest() == expected)

    with open(source, "rb") as data:
        response = httpx.post(
            f"{BASE_URL}/files",
            params={"path": f"{root}/large-multipart.bin"},
            files=[("file", ("large-multipart.bin", data))],
            timeout=120,
        )
    check("100 MiB multipart upload", response.status_code == 200, response.text)
    downloaded = hashlib.sha256()
    with httpx.stream("GET", f"{BASE_URL}/files", params={"path": f"{root}/large-multipart.bin"}, timeout=120) as response:
        for chunk in response.iter_bytes():
            downloaded.update(chunk)
    check("100 MiB multipart checksum", downloaded.hexdigest() == expected)

    response = httpx.get(f"{BASE_URL}/files", params={"path": f"{root}/missing"})
    check("download missing is 404 JSON", response.status_code == 404 and "message" in response.json(), response.text)


def test_high_level_sdk(root):
    sandbox = Sandbox.create(debug=True)
    result = sandbox.commands.run("echo $A; echo e >&2", envs={"A": "b"})
    check("sdk run stdout", result.stdout == "b\n", repr(result))
    check("sdk run stderr", result.stderr == "e\n", repr(result))
    result = sandbox.commands.run("id -un", user="nobody")
    check("sdk run as nobody", result.stdout == "nobody\n", repr(result))

    handle = sandbox.commands.run("read line; echo got $line", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "x\n")
    check("sdk stdin", handle.wait().stdout == "got x\n")

    handle = sandbox.commands.run("sleep 60", background=True)
    check("sdk kill", sandbox.commands.kill(handle.pid))

    sandbox.files.write(f"{root}/sdk/one.txt", "1", metadata={"Owner": "me"})
    check("sdk read", sandbox.files.read(f"{root}/sdk/one.txt") == "1")
    info = sandbox.files.get_info(f"{root}/sdk/one.txt")
    check("sdk metadata", info.metadata == {"owner": "me"}, repr(info))
    written = sandbox.files.write_files([
        {"path": f"{root}/sdk/two.txt", "data": "2"},
        {"path": f"{root}/sdk/three.txt", "data": b"3"},
    ])
    check("sdk write_files", len(written) == 2, repr(written))
    entries = sandbox.files.list(f"{root}/sdk")
    check("sdk list", sorted(e.name for e in entries) == ["one.txt", "three.txt", "two.txt"], repr(entries))
    check("sdk exists", sandbox.files.exists(f"{root}/sdk/two.txt"))
    check("sdk make_dir existing", sandbox.files.make_dir(f"{root}/sdk") is False)
    check("sdk rename", sandbox.files.rename(f"{root}/sdk/two.txt", f"{root}/sdk/2.txt").name == "2.txt")
    sandbox.files.remove(f"{root}/sdk/2.txt")
    check("sdk removed", not sandbox.files.exists(f"{root}/sdk/2.txt"))

    terminal = sandbox.pty.create(size=__import__("e2b").PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(terminal.pid, b"echo pty-$((40+2)); exit\n")
    output = bytearray()
    terminal.wait(on_pty=lambda data: output.extend(data))
    check("sdk pty", b"pty-42" in output, repr(bytes(output[-200:])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    parser.add_argument("--envd", default=os.path.join(repo, "target", "debug", "envd"), help="envd binary to test")
    args = parser.parse_args()

    os.environ["E2B_DEBUG"] = "true"
    envd = start_envd(args.envd)
    root = tempfile.mkdtemp(prefix="envd-sdk-wire-")
    try:
        proto_process = process_connect.ProcessClientSync(BASE_URL)
        json_process = process_connect.ProcessClientSync(BASE_URL, codec=ENVD_JSON_CODEC)
        proto_fs = filesystem_connect.FilesystemClientSync(BASE_URL)
        json_fs = filesystem_connect.FilesystemClientSync(BASE_URL, codec=ENVD_JSON_CODEC)
        test_process(proto_process, "proto")
        test_process(json_process, "json")
        test_filesystem(proto_fs, root, "proto")
        test_filesystem(json_fs, root, "json")
        test_large_file(root)
        test_high_level_sdk(root)
    finally:
        envd.send_signal(signal.SIGTERM)
        envd.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)

    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
