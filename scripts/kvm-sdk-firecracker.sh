#!/usr/bin/env bash
# Runs the E2B Python SDK suite against `hearth serve --vmm firecracker`, on a host whose
# /dev/kvm can run a standard guest kernel (bare metal, or a cloud VM with nested KVM).
# Installs Firecracker, builds Hearth, builds the base template in a fresh data directory,
# starts the server, runs tests/sdk, and stops the server. Needs root.
# Exits non-zero on any failure, and prints the end of the server log when tests fail.
#
# The project's own machines cannot run this script: their /dev/kvm is paravirtual (kvm_pvm)
# and guests do not boot under it.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir="$(pwd)"
venv="${HEARTH_VENV:-/opt/hearth-venv}"
api_listen="${HEARTH_TEST_API_LISTEN:-127.0.0.1:3000}"
proxy_listen="${HEARTH_TEST_PROXY_LISTEN:-127.0.0.1:3001}"

if [[ $EUID -ne 0 ]]; then
    echo "error: run as root (Hearth creates network namespaces and runs VMs)" >&2
    exit 1
fi
if [[ ! -c /dev/kvm ]]; then
    echo "error: /dev/kvm is missing; Firecracker needs KVM" >&2
    exit 1
fi
if grep -qw kvm_pvm /proc/modules 2>/dev/null; then
    echo "error: /dev/kvm is provided by kvm_pvm, which cannot run a standard guest kernel;" \
        "use a host with kvm_intel or kvm_amd" >&2
    exit 1
fi

scripts/install-deps.sh
scripts/install-firecracker.sh
scripts/build.sh
export HEARTH_FIRECRACKER_BIN=/usr/local/lib/hearth/firecracker

if ! hearth serve --help 2>/dev/null | grep -q -- '--vmm'; then
    echo "error: this hearth binary has no 'serve --vmm' option; update the source and rerun" >&2
    exit 1
fi
# A template's snapshot is specific to the VMM that wrote it, so the template is built with
# Firecracker too, where the build command offers the choice.
vmm_args=()
if hearth template build-base --help 2>/dev/null | grep -q -- '--vmm'; then
    vmm_args=(--vmm firecracker)
fi

work_dir="$(mktemp -d /tmp/hearth-kvm-fc.XXXXXX)"
data_dir="$work_dir/data"
mkdir -p "$data_dir"
echo "data dir: $data_dir"

server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
}
trap cleanup EXIT

start=$(date +%s)
hearth template build-base --data-dir "$data_dir" "${vmm_args[@]}"
echo "base template built in $(( $(date +%s) - start )) s"

netns_before=$(ip netns list | wc -l)

api_key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
HEARTH_API_KEY="$api_key" hearth serve --vmm firecracker --data-dir "$data_dir" \
    --api-listen "$api_listen" --proxy-listen "$proxy_listen" >"$work_dir/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
    curl -fsS -m 2 "http://$api_listen/health" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work_dir/server.log"; echo "error: hearth serve exited" >&2; exit 1; }
    sleep 1
done
if ! curl -fsS -m 2 "http://$api_listen/health" >/dev/null 2>&1; then
    echo "error: hearth serve did not respond on /health within 300 s; log: $work_dir/server.log" >&2
    exit 1
fi
if ! grep -qi firecracker "$work_dir/server.log"; then
    echo "warning: the server log does not mention Firecracker; check which VMM it chose" >&2
fi

status=0
E2B_API_URL="http://$api_listen" E2B_SANDBOX_URL="http://$proxy_listen" E2B_API_KEY="$api_key" \
    "$venv/bin/python" -m pytest -q "$root_dir/tests/sdk" || status=$?

kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""

netns_after=$(ip netns list | wc -l)
if [[ "$netns_after" != "$netns_before" ]]; then
    echo "error: network namespaces left behind: $netns_before before the server, $netns_after after" >&2
    status=1
fi
if ((status != 0)); then
    echo "--- server log (last 200 lines) ---"
    tail -n 200 "$work_dir/server.log"
fi
exit "$status"
