#!/usr/bin/env bash
# Installs what Hearth needs on a Debian 12 host: the VMM, the tools the template
# builder runs, and a Python virtualenv with the pinned E2B SDK for the tests and examples.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "error: run as root (Hearth creates network namespaces and runs VMs)" >&2
    exit 1
fi

root_dir="$(cd "$(dirname "$0")/.." && pwd)"
venv="${HEARTH_VENV:-/opt/hearth-venv}"

packages=(
    qemu-system-x86 qemu-utils debootstrap busybox-static e2fsprogs cpio xz-utils zstd
    nftables iproute2 conntrack curl ca-certificates python3-venv build-essential pkg-config unzip
    docker-registry bash-static
)
missing_packages() {
    local package
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || echo "$package"
    done
}
# Two passes: installing one package can remove another that conflicts with it (Debian's
# qemu-system-x86 removes a qemu-utils from backports), and the second pass puts it back
# in a matching version.
for _ in 1 2; do
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || break
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
    echo "error: Debian packages still missing after installing: ${missing[*]}" >&2
    exit 1
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust stable (https://rustup.rs) and rerun" >&2
    exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r "$root_dir/tests/sdk/requirements.txt"

# Firecracker, for the driver's API test here and for KVM hosts.
"$root_dir/scripts/install-firecracker.sh"
