"""A loopback registry and a tiny test image, shared by the template tests and the
template build benchmark.

The registry is Debian's `docker-registry`, started on 127.0.0.1 with its storage in a
temporary directory and stopped by its PID. The image contains a static busybox and a static
bash and is pushed with `hearth-oci-push`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

REGISTRY_BIN = "/usr/bin/docker-registry"
BUSYBOX = "/bin/busybox"
BASH_STATIC = "/bin/bash-static"
BUSYBOX_APPLETS = [
    "sh", "ls", "cat", "echo", "id", "whoami", "pwd", "env", "printf", "mkdir", "rm", "cp",
    "nc", "httpd", "sleep", "sync", "chmod", "chown", "grep", "stat", "test", "wget",
    "true", "false", "touch", "wc", "head", "tail", "sed", "tr", "uname", "ps", "kill",
]


def oci_push_binary() -> str:
    explicit = os.environ.get("HEARTH_OCI_PUSH")
    if explicit:
        return explicit
    found = shutil.which("hearth-oci-push")
    if found:
        return found
    return str(Path(__file__).resolve().parents[2] / "target" / "release" / "hearth-oci-push")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_registry(credentials: Optional[tuple[str, str]] = None) -> Iterator[str]:
    """Yields `127.0.0.1:PORT` of a fresh registry; stops it and deletes its storage after.
    With `credentials` (user name, password), the registry requires them (htpasswd)."""
    workdir = Path(tempfile.mkdtemp(prefix="hearth-registry-"))
    port = free_port()
    config = workdir / "config.yml"
    auth = ""
    if credentials is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # bcrypt through libxcrypt; the registry accepts only bcrypt hashes

        username, password = credentials
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        (workdir / "htpasswd").write_text(f"{username}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: hearth-test\n    path: {workdir / 'htpasswd'}\n"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    log = open(workdir / "registry.log", "w")
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start: {(workdir / 'registry.log').read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def tiny_rootfs(root: Path, marker: Optional[str] = None) -> None:
    """Writes the tiny image's tree; `marker` adds a file that makes the image's digest new."""
    (root / "bin").mkdir(parents=True)
    for directory in ["etc", "tmp", "root", "usr/bin", "srv"]:
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy2(BASH_STATIC, root / "bin" / "bash")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    if marker is not None:
        (root / "etc" / "image-marker").write_text(marker + "\n")
    os.chmod(root / "tmp", 0o1777)


def push_tiny_image(
    registry: str,
    repository: str,
    tag: str,
    marker: Optional[str] = None,
    credentials: Optional[tuple[str, str]] = None,
) -> str:
    """Pushes the tiny image (with `credentials` when the registry needs them) and returns
    its reference."""
    reference = f"{registry}/{repository}:{tag}"
    env = dict(os.environ)
    if credentials is not None:
        env["HEARTH_OCI_USERNAME"], env["HEARTH_OCI_PASSWORD"] = credentials
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir) / "rootfs"
        tiny_rootfs(root, marker)
        subprocess.run(
            [
                oci_push_binary(), "--rootfs", str(root), "--to", reference,
                "--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--env", "IMAGE_VAR=from the image",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    return reference


def tiny_image_archive(archive: Path, tag: str) -> None:
    """Writes the tiny image as an OCI image layout packed in the tar `archive`, with
    `/srv/index.html` and `/srv` as its working directory."""
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir) / "rootfs"
        tiny_rootfs(root, marker=tag)
        (root / "srv" / "index.html").write_text("from the image archive\n")
        layout = Path(workdir) / "layout"
        subprocess.run(
            [
                oci_push_binary(), "--rootfs", str(root), "--to", f"local/tiny:{tag}", "--out-layout", str(layout),
                "--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--env", "IMAGE_VAR=from the archive",
                "--workdir", "/srv",
            ],
            check=True,
        )
        with tarfile.open(archive, "w") as tar:
            for entry in sorted(layout.rglob("*")):
                tar.add(entry, arcname=str(entry.relative_to(layout)), recursive=False)


def add_user(name: str, uid: int) -> str:
    """Shell commands that add an account; the tiny image has no `adduser`."""
    return (
        f"echo '{name}:x:{uid}:{uid}::/home/{name}:/bin/sh' >> /etc/passwd && "
        f"echo '{name}:x:{uid}:' >> /etc/group && mkdir -p /home/{name} && chown {name}:{name} /home/{name}"
    )
