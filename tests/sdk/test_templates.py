"""Template builds through the SDK's template builder and `hearth template build`.

A registry (Debian's `docker-registry`) runs on loopback for this module; a tiny image
(busybox and a static bash) is pushed to it with `hearth-oci-push`. Sandboxes created
from the built templates are checked for their user, working directory, environment,
files, and the server their start command started, reached through the proxy right
after the create returns.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

from image_helpers import add_user, loopback_registry, push_tiny_image, tiny_image_archive
from sdk_helpers import RUN_ID, kill_quietly, proxy_get_by_host

# Quotes, backslashes, a newline and a command substitution: they must arrive byte for byte
# and run nothing.
TRICKY_VALUE = 'say "hi" \\ back\\slash $(touch /tmp/pwned) `touch /tmp/pwned2` end'
MULTILINE_VALUE = "line one\nline two"


@pytest.fixture(scope="module")
def registry() -> Iterator[str]:
    with loopback_registry() as address:
        yield address


@pytest.fixture(scope="module")
def tiny_image(registry: str) -> str:
    return push_tiny_image(registry, "hearth-test/tiny", RUN_ID)


def run_ok(sbx: Sandbox, command: str, **kwargs) -> str:
    result = sbx.commands.run(command, **kwargs)
    assert result.exit_code == 0, f"{command!r}: {result.stderr}"
    return result.stdout


def delete_template(name_or_id: str) -> None:
    api = os.environ["E2B_API_URL"]
    headers = {"X-API-Key": os.environ["E2B_API_KEY"]}
    response = httpx.get(f"{api}/templates/aliases/{name_or_id}", headers=headers, timeout=30)
    if response.status_code == 200:
        template_id = response.json()["templateID"]
        httpx.delete(f"{api}/templates/{template_id}", headers=headers, timeout=60)


@pytest.mark.timeout(900)
def test_sdk_template_from_a_registry_image(tiny_image: str, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("hello from the template\n")
    (tmp_path / "site" / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(tmp_path / "site" / "run.sh", 0o750)
    name = f"tiny-sdk-{RUN_ID}"

    def template(last_step: str) -> Template:
        return (
            Template(file_context_path=str(tmp_path))
            .from_image(tiny_image)
            .run_cmd(add_user("app", 1234) + " && mkdir -p /srv/www && echo step-output-visible")
            .copy("site/", "/srv/www/", user="app")
            .set_envs({"TRICKY": TRICKY_VALUE, "MULTI": MULTILINE_VALUE})
            .set_workdir("/srv/www")
            .set_user("app")
            .run_cmd(last_step)
            .set_start_cmd("busybox httpd -f -p 8080 -h /srv/www", "wget -q -O /dev/null http://127.0.0.1:8080/index.html")
        )

    logs: list[str] = []
    started = time.monotonic()
    Template.build(template("echo first > /srv/www/last.txt"), name, cpu_count=1, memory_mb=256,
                   on_build_logs=lambda entry: logs.append(entry.message))
    first_build = time.monotonic() - started
    assert "step-output-visible" in logs, logs

    sbx = Sandbox.create(name, timeout=300)
    try:
        # The start command's server responds through the proxy right after the create.
        page = proxy_get_by_host(sbx, 8080, "/index.html")
        assert page.status_code == 200
        assert page.text == "hello from the template\n"

        assert run_ok(sbx, "whoami").strip() == "app"
        assert run_ok(sbx, "pwd").strip() == "/srv/www"
        assert run_ok(sbx, 'printf %s "$TRICKY"') == TRICKY_VALUE
        assert run_ok(sbx, 'printf %s "$MULTI"') == MULTILINE_VALUE
        assert run_ok(sbx, 'printf %s "$IMAGE_VAR"') == "from the image"
        assert run_ok(sbx, "test ! -e /tmp/pwned && test ! -e /tmp/pwned2 && echo clean").strip() == "clean"
        assert sbx.files.read("/srv/www/last.txt") == "first\n"
        assert run_ok(sbx, "stat -c '%U %a' /srv/www/index.html /srv/www/run.sh").split("\n")[:2] == [
            "app 644",
            "app 750",
        ]
    finally:
        kill_quietly(sbx.sandbox_id)

    # Only the changed last step runs again.
    logs.clear()
    started = time.monotonic()
    Template.build(template("echo second > /srv/www/last.txt"), name, cpu_count=1, memory_mb=256,
                   on_build_logs=lambda entry: logs.append(entry.message))
    rebuild = time.monotonic() - started
    cached = [line for line in logs if "CACHED" in line]
    assert len(cached) >= 5, logs
    assert "step-output-visible" not in logs, "the first RUN ran again"
    print(f"first build {first_build:.1f} s, rebuild with the last step changed {rebuild:.1f} s")

    sbx = Sandbox.create(name, timeout=120)
    try:
        assert sbx.files.read("/srv/www/last.txt") == "second\n"
        assert proxy_get_by_host(sbx, 8080, "/index.html").status_code == 200
    finally:
        kill_quietly(sbx.sandbox_id)


@pytest.mark.timeout(900)
def test_dockerfile_build_with_the_cli(tiny_image: str, tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "site").mkdir(parents=True)
    (context / "site" / "index.html").write_text("dockerfile site\n")
    (context / "site" / "secret.key").write_text("must not be copied\n")
    (context / ".dockerignore").write_text("**/*.key\n")
    (context / "Dockerfile").write_text(
        f"FROM {tiny_image} AS builder\n"
        "RUN mkdir -p /out && echo built-in-stage-one > /out/artifact.txt\n"
        "\n"
        f"FROM {tiny_image}\n"
        "ARG GREETING=\"hello world\"\n"
        "ENV QUOTED='a \"quoted\" value with \\ backslash and $(not run)' \\\n"
        "    GREETING_COPY=\"$GREETING\"\n"
        f"RUN {add_user('web', 1500)}\n"
        "COPY --from=builder /out/artifact.txt /srv/artifact.txt\n"
        "COPY --chown=web site/ /srv/www/\n"
        "WORKDIR /srv/www\n"
        "USER web\n"
        "EXPOSE 8080\n"
        'CMD ["busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]\n'
    )
    name = f"tiny-dockerfile-{RUN_ID}"
    env = dict(os.environ)
    result = subprocess.run(
        ["hearth", "template", "build", "--name", name, "--dockerfile", str(context / "Dockerfile"),
         "--cpu-count", "1", "--memory-mb", "256"],
        env=env, capture_output=True, text=True, timeout=800,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    sbx = Sandbox.create(name, timeout=300)
    try:
        page = proxy_get_by_host(sbx, 8080, "/index.html")
        assert page.status_code == 200
        assert page.text == "dockerfile site\n"
        assert run_ok(sbx, "whoami").strip() == "web"
        assert run_ok(sbx, "pwd").strip() == "/srv/www"
        assert run_ok(sbx, 'printf %s "$QUOTED"') == 'a "quoted" value with \\ backslash and $(not run)'
        assert run_ok(sbx, 'printf %s "$GREETING_COPY"') == "hello world"
        assert sbx.files.read("/srv/artifact.txt") == "built-in-stage-one\n"
        assert run_ok(sbx, "stat -c %U /srv/www/index.html").strip() == "web"
        assert run_ok(sbx, "test ! -e /srv/www/secret.key && echo ignored").strip() == "ignored"
    finally:
        kill_quietly(sbx.sandbox_id)


@pytest.mark.timeout(600)
def test_private_registry_needs_credentials() -> None:
    credentials = ("hearth-user", "s3cret-Pa55")
    with loopback_registry(credentials) as registry:
        image = push_tiny_image(registry, "private/tiny", RUN_ID, credentials=credentials)
        name = f"tiny-private-{RUN_ID}"

        anonymous = Template().from_image(image).run_cmd("echo built > /built.txt")
        with pytest.raises(BuildException) as failure:
            Template.build(anonymous, name, cpu_count=1, memory_mb=256)
        assert "authentication required" in str(failure.value)

        with_credentials = Template().from_image(image, username=credentials[0], password=credentials[1])
        Template.build(with_credentials.run_cmd("echo built > /built.txt"), name, cpu_count=1, memory_mb=256)

    sbx = Sandbox.create(name, timeout=120)
    try:
        assert sbx.files.read("/built.txt") == "built\n"
    finally:
        kill_quietly(sbx.sandbox_id)


@pytest.mark.timeout(600)
def test_image_archive_with_the_cli(tmp_path: Path) -> None:
    archive = tmp_path / "tiny-layout.tar"
    tiny_image_archive(archive, RUN_ID)
    name = f"tiny-archive-{RUN_ID}"
    result = subprocess.run(
        ["hearth", "template", "build", "--name", name, "--image-archive", str(archive),
         "--start-cmd", "busybox httpd -f -p 8080 -h /srv",
         "--ready-cmd", "wget -q -O /dev/null http://127.0.0.1:8080/index.html",
         "--cpu-count", "1", "--memory-mb", "256"],
        capture_output=True, text=True, timeout=500,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    sbx = Sandbox.create(name, timeout=120)
    try:
        page = proxy_get_by_host(sbx, 8080, "/index.html")
        assert page.status_code == 200
        assert page.text == "from the image archive\n"
        assert run_ok(sbx, "pwd").strip() == "/srv"
        assert run_ok(sbx, "whoami").strip() == "root"
        assert run_ok(sbx, 'printf %s "$IMAGE_VAR"') == "from the archive"
    finally:
        kill_quietly(sbx.sandbox_id)


def test_unsupported_dockerfile_instruction_fails_with_its_line(tiny_image: str, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {tiny_image}\nRUN true\nHEALTHCHECK CMD true\n")
    result = subprocess.run(
        ["hearth", "template", "build", "--name", f"bad-{RUN_ID}", "--dockerfile", str(dockerfile)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "line 3" in output, output
    assert "HEALTHCHECK" in output, output


@pytest.mark.timeout(600)
def test_exiting_start_command_fails_build(tiny_image: str) -> None:
    template = Template().from_image(tiny_image).set_start_cmd(
        "echo start-command-said-this; exit 3", "nc -z 127.0.0.1 9"
    )
    with pytest.raises(BuildException) as failure:
        Template.build(template, f"tiny-exits-{RUN_ID}", cpu_count=1, memory_mb=256)
    assert "start-command-said-this" in str(failure.value)
    with pytest.raises(Exception):
        Sandbox.create(f"tiny-exits-{RUN_ID}", timeout=30)


@pytest.mark.timeout(900)
def test_base_image_and_deleting_a_template_in_use(tmp_path: Path) -> None:
    name = f"base-derived-{RUN_ID}"
    template = Template().from_base_image().run_cmd("echo from-build > /home/user/built.txt", user="user")
    Template.build(template, name)
    sbx = Sandbox.create(name, timeout=300)
    try:
        assert run_ok(sbx, "whoami").strip() == "user"
        assert run_ok(sbx, "pwd").strip() == "/home/user"
        assert sbx.files.read("/home/user/built.txt") == "from-build\n"

        delete_template(name)
        # The running sandbox keeps working; new creates are refused.
        assert run_ok(sbx, "cat /home/user/built.txt") == "from-build\n"
        sbx.files.write("/home/user/after-delete.txt", "still here")
        assert sbx.files.read("/home/user/after-delete.txt") == "still here"
        with pytest.raises(Exception):
            Sandbox.create(name, timeout=30)
    finally:
        kill_quietly(sbx.sandbox_id)
