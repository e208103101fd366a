"""Builds a template with the e2b Python SDK's template builder against a Hearth API
whose builder records the build, then uses the SDK's tag helpers.

Environment: E2B_API_URL, E2B_API_KEY, and CONTEXT_DIR, a directory with `hello.txt`.
Prints "sdk template check passed" on success.
"""

import os

from e2b import Template
from e2b.exceptions import BuildException

context = os.environ["CONTEXT_DIR"]
logs = []

template = (
    Template(file_context_path=context)
    .from_base_image()
    .copy("hello.txt", "/app/hello.txt")
    .run_cmd("echo built")
    .set_envs({"GREETING": "hi"})
    .set_workdir("/app")
    .set_start_cmd("sleep infinity", "true")
)
info = Template.build(template, "sdk-app:v1", tags=["stable"], cpu_count=1, memory_mb=256, on_build_logs=logs.append)
assert info.template_id, info
assert sorted(info.tags) == ["stable", "v1"], info.tags
assert any("line 0" in entry.message for entry in logs), [entry.message for entry in logs]

status = Template.get_build_status(info)
assert status.status.value == "ready", status

assert Template.exists("sdk-app")
assert not Template.exists("no-such-template")

assigned = Template.assign_tags("sdk-app:v1", "prod")
assert assigned.tags == ["prod"], assigned
assert assigned.build_id == info.build_id, (assigned, info)
tags = sorted(tag.tag for tag in Template.get_tags("sdk-app"))
assert tags == ["prod", "stable", "v1"], tags
Template.remove_tags("sdk-app", "prod")
tags = sorted(tag.tag for tag in Template.get_tags("sdk-app"))
assert tags == ["stable", "v1"], tags

# The recording builder fails this build, and the SDK raises the reason.
failing = Template().from_template("sdk-app:v1").run_cmd("false")
try:
    Template.build(failing, "sdk-fail")
except BuildException as err:
    assert "injected failure" in str(err), err
else:
    raise AssertionError("a failed build did not raise")

print("sdk template check passed")
