"""Create a sandbox on a Hearth server with the unchanged E2B SDK, use it, and kill it.

Run with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at the server.
"""

import time

from e2b import Sandbox

started = time.perf_counter()
sandbox = Sandbox.create("base", timeout=120)
print(f"created sandbox {sandbox.sandbox_id} in {(time.perf_counter() - started) * 1000:.0f} ms")

try:
    result = sandbox.commands.run("uname -sr && whoami && python3 --version")
    print(result.stdout, end="")

    sandbox.files.write("/home/user/hello.txt", "hello from Hearth\n")
    print(sandbox.files.read("/home/user/hello.txt"), end="")

    listing = sandbox.commands.run("ls -l /home/user")
    print(listing.stdout, end="")
finally:
    sandbox.kill()
    print(f"killed sandbox {sandbox.sandbox_id}")
